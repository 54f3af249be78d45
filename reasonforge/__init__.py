"""The jobs behind utils.py and the scripts, one module each; utils.py re-exports what the scripts share."""
