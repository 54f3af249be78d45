"""Pieces of ReasonForge train that more than one script needs but that are not glue (see utils.py)."""
