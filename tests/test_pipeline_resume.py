"""run_pipeline.sh rerun after a kill: finished stages are skipped and named, training resumes from
its newest checkpoint, and the final adapter is the one an uninterrupted run makes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pipeline_env(work: Path, model: Path) -> dict:
    return {**os.environ, "PYTHON": sys.executable, "WORK": str(work), "MODEL": str(model), "DATASET": "sample-easy",
            "MAX_SAMPLES": "60", "MAX_STEPS": "6", "SAVE_STEPS": "2", "BATCH": "2", "EVAL_ROWS": "2",
            "NEW_TOKENS": "4"}


def run(work: Path, model: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "run_pipeline.sh")], env=pipeline_env(work, model), capture_output=True,
                          text=True, timeout=900)


def adapter_tensors(work: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(work / "checkpoints" / "final_model" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_killed_mid_training_and_rerun_gives_the_uninterrupted_adapter(tiny_model, tmp_path):
    whole = tmp_path / "whole"
    done = run(whole, tiny_model)
    assert done.returncode == 0, done.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(["bash", str(ROOT / "run_pipeline.sh")], env=pipeline_env(killed, tiny_model),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = killed / "checkpoints" / "checkpoint-4" / "reasonforge_checkpoint.json"  # written last
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the pipeline ended before it could be killed mid-training"
    os.killpg(proc.pid, signal.SIGKILL)  # the instance is gone: no handler runs
    proc.wait()
    assert not (killed / "checkpoints" / "final_model").exists()

    again = run(killed, tiny_model)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "== data: skipped" in again.stdout and "Skipped, complete from an earlier run: data" in again.stdout
    assert "resuming from" in again.stderr and "checkpoint-4" in again.stderr
    a, b = adapter_tensors(whole), adapter_tensors(killed)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    # a third run has nothing left to do, and says so
    third = run(killed, tiny_model)
    assert third.returncode == 0 and "Skipped, complete from an earlier run: data sft evaluation-sft batch" in third.stdout

    # a finished training stage is not continued under other settings: the fix is named instead
    changed = subprocess.run(["bash", str(ROOT / "run_pipeline.sh")], capture_output=True, text=True, timeout=600,
                             env={**pipeline_env(killed, tiny_model), "MAX_STEPS": "8"})
    assert changed.returncode == 2 and "the sft stage finished in an earlier run with other settings" in changed.stderr
