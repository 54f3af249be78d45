"""Output redirected to a file (`nohup`, `| tee`): plain timestamped lines, no carriage-return
frames, each message once; RF_PROGRESS=bars brings the bars back. GRPO runs report rewards, not a
loss."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def logged(tmp_path, name: str, *args, env: dict | None = None) -> str:
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as fh:
        done = subprocess.run([sys.executable, str(ROOT / name), *args], cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "RF_PROGRESS_INTERVAL_S": "0", **(env or {})},
                              timeout=600)
    text = log.read_bytes().decode()  # read_text would turn a carriage return into a newline
    assert done.returncode == 0, text[-3000:]
    return text


@pytest.mark.slow
def test_a_training_and_evaluation_log_file_holds_plain_lines(tiny_model, sample_dataset, tmp_path):
    text = logged(tmp_path, "train_lora.py", "--model-name", str(tiny_model), "--dataset-path", str(sample_dataset),
                  "--output-dir", "run", "--max-steps", "4", "--save-steps", "2", "--eval-steps", "2",
                  "--batch-size", "2", "--gradient-accumulation-steps", "1", "--warmup-steps", "0")
    text += logged(tmp_path, "evaluate_model.py", "--model-path", "run/final_model", "--compute-perplexity",
                   "--compare-base", "--compute-accuracy", "--max-eval-samples", "3", "--max-new-tokens", "4",
                   "--output-file", "e.json")
    assert "\r" not in text
    steps = [l for l in text.splitlines() if re.fullmatch(r"\d\d:\d\d:\d\d step \d/4 \| loss .*", l)]
    assert len(steps) == 4  # one timestamped line per step, each once
    assert re.search(r"^\d\d:\d\d:\d\d perplexity \(finetuned\): 3/3 row", text, re.M)
    assert "GPU memory: n/a" not in text
    assert re.search(r"^Perplexity \(finetuned\): \d+\.\d{3} ", text, re.M)
    assert "Filter" not in text  # datasets' unnamed bar
    lines = [l for l in text.splitlines() if l.strip() and not re.match(r"\d\d:\d\d:\d\d ", l)]
    assert len(lines) == len(set(lines)) or all(l.startswith("=") for l in lines if lines.count(l) > 1)


@pytest.mark.slow
def test_rf_progress_bars_keeps_the_bars_in_a_file(tiny_model, tmp_path):
    text = logged(tmp_path, "test_model.py", "--model-path", str(tiny_model), "--batch", "--instructions-file",
                  str(_instructions(tmp_path)), "--max-new-tokens", "2", "--output-file", "b.json",
                  env={"RF_PROGRESS": "bars"})
    assert "\r" in text and "batch:" in text


def _instructions(tmp_path) -> Path:
    path = tmp_path / "i.json"
    path.write_text('["one", "two"]')
    return path


@pytest.mark.slow
def test_grpo_is_reported_as_grpo(tiny_qwen25, sample_dataset, tmp_path):
    text = logged(tmp_path, "train_lora.py", "--model-name", str(tiny_qwen25), "--dataset-path", str(sample_dataset),
                  "--output-dir", "grpo", "--method", "grpo", "--num-generations", "2", "--max-completion-length", "8",
                  "--batch-size", "2", "--gradient-accumulation-steps", "1", "--max-steps", "2", "--save-steps", "2",
                  "--eval-steps", "2", "--warmup-steps", "0", "--max-seq-length", "384")
    banner = next(l for l in text.splitlines() if l.startswith("Dataset:"))
    assert "GRPO on the questions" in banner and "loss on assistant tokens" not in banner
    summary = next(l for l in text.splitlines() if l.startswith("Steps:"))
    assert "train reward" in summary and "train loss" not in summary
    assert not re.search(r"step \d/2 \| loss", text)  # the step lines are the rewards'
    assert re.search(r"step \d/2 \| reward correctness", text)
    assert (tmp_path / "grpo" / "reward_curve.png").is_file() and not (tmp_path / "grpo" / "loss_curve.png").exists()
    assert "Loss curve:" not in text and "Reward curve:" in text
