"""Importing a script loads nothing heavy: --help stays instant, and on a GPU Unsloth can be
imported first (it patches transformers, TRL and PEFT, so they must not be loaded before it)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "trl", "peft", "datasets", "unsloth", "boto3")


@pytest.mark.parametrize("script", ["data_preparation", "train_lora", "evaluate_model", "test_model", "utils",
                                    "reasonforge.training", "reasonforge.sft", "reasonforge.packed_attention",
                                    "reasonforge.batch_plan", "reasonforge.cuda_graphs", "reasonforge.graph_wrapper",
                                    "reasonforge.training_args", "reasonforge.grpo", "reasonforge.grpo_trainer",
                                    "reasonforge.grpo_logs",
                                    "reasonforge.checkpoints", "reasonforge.outputs", "reasonforge.preemption",
                                    "reasonforge.sources", "reasonforge.conversations"])
def test_importing_a_script_loads_nothing_heavy(script):
    code = f"import sys, {script}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {script} loaded {out.stdout.strip()}"


def test_no_script_imports_another():
    scripts = ["data_preparation", "train_lora", "evaluate_model", "test_model"]
    for script in scripts:
        text = (ROOT / f"{script}.py").read_text()
        for other in scripts:
            if other != script:
                assert f"import {other}" not in text, f"{script}.py imports {other}"
