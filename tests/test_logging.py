"""Console output: each log line printed once, library warnings kept out of replies."""

import pytest
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import data_preparation as dp
import utils

ROOT = Path(__file__).resolve().parents[1]

# Unsloth calls logging.basicConfig when it is imported, which train_lora.py does after
# setup_logging; a CPU machine has no unsloth, so this does the same at the same point.
SCRIPT = """
import logging, sys
import utils
setup = utils.setup_logging
def setup_then_root_handler(verbose=False):
    setup(verbose)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s|%(levelname)s]%(message)s")
utils.setup_logging = setup_then_root_handler
import train_lora
sys.exit(train_lora.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_warning_is_printed_once(tmp_path, tiny_model):
    data = tmp_path / "data"
    assert dp.main(["--dataset", "sample", "--max-samples", "24", "--skip-upload", "--output-dir", str(data)]) == 0
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    # 128 tokens is shorter than most sample conversations, so training warns about dropping them.
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "--model-name", str(tiny_model), "--dataset-path", str(data),
                           "--output-dir", str(tmp_path / "run"), "--max-seq-length", "128", "--max-steps", "1",
                           "--batch-size", "4", "--gradient-accumulation-steps", "1", "--save-steps", "1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [line for line in proc.stderr.splitlines()
              if "train: dropping" in line and "longer than --max-seq-length 128" in line]
    assert len(events) == 1, events
    assert " WARNING train: " in events[0] and "[reasonforge" not in proc.stderr


def test_tokenizer_saved_with_bpe_cleanup_loads_without_it(tiny_model, tmp_path):
    # GGUF exports save clean_up_tokenization_spaces=True; transformers ignores it for BPE and
    # warns about it on the first decode, which is in the middle of the first streamed reply.
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    _, tokenizer, _ = utils.load_model(str(folder), backend="hf")
    assert tokenizer.clean_up_tokenization_spaces is False
    assert tokenizer.decode(tokenizer("a , b .")["input_ids"]) == "a , b ."
