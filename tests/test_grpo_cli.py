"""train_lora.py --method grpo as a user runs it: after an SFT run (--init-adapter), its flags' checks, its outputs."""

from __future__ import annotations

import json

import pytest

import train_lora
import utils
from reasonforge import train_config, training


def argv(model, data, out, *extra):
    return ["--model-name", str(model), "--dataset-path", str(data), "--output-dir", str(out), "--max-steps", "2",
            "--save-steps", "2", "--eval-steps", "2", "--warmup-steps", "0", "--max-seq-length", "384", *extra]


GRPO_SMALL = ("--method", "grpo", "--num-generations", "2", "--max-completion-length", "8",
              "--batch-size", "2", "--gradient-accumulation-steps", "1")


def lora_b_norm(folder) -> float:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    return sum(float(t.float().norm()) for k, t in tensors.items() if "lora_B" in k)


@pytest.mark.slow
def test_sft_then_grpo_from_its_adapter(tiny_qwen25, sample_dataset, tmp_path):
    sft = tmp_path / "sft"
    assert train_lora.main(argv(tiny_qwen25, sample_dataset, sft, "--batch-size", "4", "--gradient-accumulation-steps",
                                "1", "--learning-rate", "5e-3")) == 0
    grpo = tmp_path / "grpo"
    assert train_lora.main(argv(tiny_qwen25, sample_dataset, grpo, *GRPO_SMALL,
                                "--init-adapter", str(sft / "final_model"))) == 0

    info = json.loads((grpo / "final_model" / utils.RUN_INFO_FILE).read_text())
    assert info["method"] == "grpo" and info["best_metric_name"] == "eval_rewards/correctness/mean"
    metrics = json.loads((grpo / "training_metrics.json").read_text())
    assert metrics["best_metric_name"] == "eval_rewards/correctness/mean" and metrics["best_validation_loss"] is None
    records = [json.loads(line) for line in (grpo / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward_correctness" in r]
    assert len(steps) == 2 and all("reward_format" in r and "completion_length_mean" in r for r in steps)
    assert any("eval_share_correct" in r for r in records)
    assert (grpo / "reward_curve.png").stat().st_size > 0
    config = json.loads((grpo / "training_config.json").read_text())["arguments"]
    assert config["learning_rate"] == train_config.DEFAULT_LEARNING_RATE["grpo"] and config["init_adapter"]

    # Fresh LoRA starts with B = 0, and two steps at 5e-6 barely move it; the SFT run's B is far
    # from 0. A GRPO adapter that kept the SFT weights therefore keeps most of their size.
    started, ended = lora_b_norm(sft / "final_model"), lora_b_norm(grpo / "final_model")
    assert started > 0.1 and ended > 0.5 * started


@pytest.mark.parametrize("extra, words", [
    (("--packing",), "--packing is for sft"),
    (("--auto-batch",), "--auto-batch plans sft batches"),
    (("--gradient-accumulation-steps", "3", "--num-generations", "4"), "not a multiple of --num-generations"),
    (("--rewards", "correctness,speed"), "unknown reward 'speed'"),
    (("--max-completion-length", "384"), "leaves no room for the question"),
])
def test_grpo_flag_problems_are_one_line_errors(tmp_path, extra, words):
    args = ["--method", "grpo", "--output-dir", str(tmp_path / "out"), "--batch-size", "2",
            "--gradient-accumulation-steps", "4", "--max-seq-length", "384", *extra]
    with pytest.raises(utils.UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        train_lora.validate_args(train_lora.build_parser().parse_args(args))


def test_learning_rate_defaults_follow_the_method(tmp_path):
    parse = train_lora.build_parser().parse_args
    sft = training.TrainConfig.from_args(parse(["--output-dir", str(tmp_path / "a")]))
    grpo = training.TrainConfig.from_args(parse(["--output-dir", str(tmp_path / "b"), "--method", "grpo"]))
    given = training.TrainConfig.from_args(parse(["--output-dir", str(tmp_path / "c"), "--method", "grpo",
                                                  "--learning-rate", "1e-5"]))
    assert (sft.learning_rate, grpo.learning_rate, given.learning_rate) == (2e-4, 5e-6, 1e-5)


@pytest.mark.slow
def test_init_adapter_of_another_shape_is_refused(tiny_qwen25, sample_dataset, tmp_path, capsys):
    sft = tmp_path / "sft"
    assert train_lora.main(argv(tiny_qwen25, sample_dataset, sft, "--batch-size", "4", "--gradient-accumulation-steps",
                                "1", "--max-steps", "1", "--save-steps", "1", "--eval-steps", "1")) == 0
    code = train_lora.main(argv(tiny_qwen25, sample_dataset, tmp_path / "grpo", *GRPO_SMALL, "--lora-r", "8",
                                "--init-adapter", str(sft / "final_model")))
    assert code != 0
    assert "pass --lora-r 16 --lora-alpha 16" in capsys.readouterr().err
    assert not (tmp_path / "grpo" / "final_model").exists()


@pytest.mark.slow
def test_init_adapter_of_another_base_is_named_in_one_warning(tiny_qwen25, tiny_model, sample_dataset, tmp_path, capsys):
    """Same shape, other base model: the weights load, and one line says whose adapter it was."""
    sft = tmp_path / "sft"
    assert train_lora.main(argv(tiny_qwen25, sample_dataset, sft, "--batch-size", "4", "--gradient-accumulation-steps",
                                "1", "--max-steps", "1", "--save-steps", "1", "--eval-steps", "1")) == 0
    capsys.readouterr()
    assert train_lora.main(argv(tiny_model, sample_dataset, tmp_path / "grpo", *GRPO_SMALL,
                                "--init-adapter", str(sft / "final_model"))) == 0
    lines = [l for l in capsys.readouterr().err.splitlines() if "was trained on" in l]
    assert len(lines) == 1 and str(tiny_qwen25) in lines[0] and f"not --model-name {tiny_model}" in lines[0]


@pytest.mark.parametrize("stages", ["dpo", "sft,dpo", "sft grpo"])
def test_pipeline_refuses_an_unknown_stage_before_doing_anything(tmp_path, stages):
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["bash", str(root / "run_pipeline.sh")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "STAGES": stages, "WORK": str(tmp_path / "work")})
    assert proc.returncode == 2 and "STAGES=" in proc.stderr and "use sft, grpo or sft,grpo" in proc.stderr
    assert not (tmp_path / "work").exists()


def test_grpo_only_flags_are_refused_for_sft_by_name(tmp_path, capsys):
    code = train_lora.main(["--output-dir", str(tmp_path / "o"), "--num-generations", "3", "--rewards", "bogus",
                            "--temperature", "0.5", "--beta", "0.1", "--max-completion-length", "64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: --rewards, --num-generations, --max-completion-length, --beta, --temperature set "
                             "how grpo samples and rewards its replies; --method sft samples nothing")
