"""Resuming with other settings: refused before anything is written where they cannot apply,
explained where they can (and what the restored optimizer and scheduler keep regardless)."""

import json
import shutil

import pytest

import data_preparation as dp
import train_lora
from reasonforge import checkpoints


def base_argv(model, data, out):
    return ["--model-name", str(model), "--dataset-path", str(data), "--output-dir", str(out), "--max-steps", "4",
            "--save-steps", "2", "--batch-size", "4", "--gradient-accumulation-steps", "1", "--learning-rate", "5e-3",
            "--warmup-steps", "0", "--seed", "5"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model, sample_dataset):
    out = tmp_path_factory.mktemp("resume-settings") / "run"
    assert train_lora.main(base_argv(tiny_model, sample_dataset, out)) == 0
    return out


@pytest.fixture
def run_copy(tmp_path, finished_run):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    shutil.rmtree(out / "final_model")
    return out


def resume(tiny_model, data, out, *extra):
    return train_lora.main(base_argv(tiny_model, data, out) + [*extra, "--resume-from-checkpoint", "latest"])


def test_checkpoint_carries_the_run_settings(finished_run):
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        copy = json.loads((finished_run / ckpt / "training_config.json").read_text())
        assert copy["arguments"]["lora_r"] == 16 and copy["dataset_manifest_sha256"]
        assert "training_config.json" in json.loads((finished_run / ckpt / checkpoints.CHECKPOINT_MARKER).read_text())["files"]


def test_adapter_shape_change_refused_before_config_is_written(run_copy, tiny_model, sample_dataset, capsys,
                                                              no_model_load):
    before = (run_copy / "training_config.json").read_bytes()
    code = resume(tiny_model, sample_dataset, run_copy, "--lora-r", "8", "--target-modules", "q_proj,v_proj",
                  "--max-seq-length", "1024", "--max-steps", "6")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"error: cannot resume from {run_copy / 'checkpoint-4'}: "), err[-3:]
    assert len([line for line in err if line.startswith("error:")]) == 1
    assert "--lora-r 8 (checkpoint: 16)" in err[-1]
    assert "--target-modules q_proj,v_proj (checkpoint: down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj)" in err[-1]
    assert "--max-seq-length 1024 (checkpoint: 2048)" in err[-1] and "start a new run" in err[-1]
    assert (run_copy / "training_config.json").read_bytes() == before
    assert sorted(p.name for p in run_copy.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_refused_from_the_checkpoint_copy_alone(run_copy, tiny_model, sample_dataset, capsys):
    (run_copy / "training_config.json").unlink()  # a fresh instance: the checkpoint came from S3
    code = resume(tiny_model, sample_dataset, run_copy, "--lora-alpha", "32", "--lora-dropout", "0.1")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "--lora-alpha 32 (checkpoint: 16); --lora-dropout 0.1 (checkpoint: 0.0)" in err[-1], err[-3:]
    assert not (run_copy / "training_config.json").exists()


def test_other_dataset_refused(run_copy, tiny_model, tmp_path, capsys, no_model_load):
    other = tmp_path / "other-data"
    assert dp.main(["--dataset", "sample", "--max-samples", "60", "--skip-upload", "--output-dir", str(other)]) == 0
    capsys.readouterr()
    code = resume(tiny_model, other, run_copy)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "dataset content " in err[-1] and "(checkpoint: " in err[-1], err[-3:]


def test_learning_rate_change_is_announced_and_the_old_schedule_kept(run_copy, tiny_model, sample_dataset, caplog):
    code = resume(tiny_model, sample_dataset, run_copy, "--learning-rate", "1e-3", "--max-steps", "6")
    assert code == 0
    assert ("--learning-rate 0.001 differs from the checkpoint's 0.005: the restored optimizer and scheduler keep "
            "0.005's schedule") in caplog.text
    assert "--max-steps 6 differs from the checkpoint's 4: takes effect" in caplog.text
    history = json.loads((run_copy / "training_metrics.json").read_text())["history"]
    lr = {h["step"]: h["learning_rate"] for h in history if "learning_rate" in h}
    # Step 5 runs at the rate the checkpoint's 4-step schedule had reached (0); from step 6 on, linear
    # decay over the new 6 steps on the checkpoint's base rate: 5e-3 * (6 - 5) / 6, not 1e-3 * (6 - 5) / 6.
    assert lr[5] == 0.0 and lr[6] == pytest.approx(5e-3 / 6, rel=1e-6)
    config = json.loads((run_copy / "training_config.json").read_text())
    assert config["arguments"]["learning_rate"] == 0.005  # what ran, not what was asked
    diffs = {d["setting"]: d for d in config["resumed_from"]["differences"]}
    assert diffs["learning_rate"]["now"] == 0.001 and diffs["learning_rate"]["kept"] is True
    assert diffs["max_steps"]["kept"] is False and config["arguments"]["max_steps"] == 6


def config(**arguments):
    args = {"model_name": "m", "lora_r": 16, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "q_proj,v_proj",
            "max_seq_length": 2048, "packing": False, "batch_size": 2, "gradient_accumulation_steps": 4,
            "learning_rate": 2e-4, "weight_decay": 0.01, "seed": 3407}
    top = {k: arguments.pop(k) for k in list(arguments) if k in ("optim", "chat_template", "chat_template_sha256",
                                                                 "dataset_manifest_sha256")}
    return {"arguments": {**args, **arguments}, "optim": "adamw_8bit", "chat_template": "qwen3",
            "chat_template_sha256": "a" * 64, "dataset_manifest_sha256": "d" * 64, **top}


def test_resume_differences_sorts_refusals_from_notes():
    refused, notes = checkpoints.resume_differences(config(target_modules="v_proj, q_proj"), config())
    assert refused == [] and notes == []  # the same modules in another order and spacing
    refused, _ = checkpoints.resume_differences(
        config(packing=True, optim="adamw_torch", chat_template_sha256="b" * 64, model_name="other"), config())
    assert refused == ["--model-name other (checkpoint: m)", "--packing True (checkpoint: False)",
                       "--optim adamw_torch (checkpoint: adamw_8bit)", "chat template bbbbbbbbbbbb (checkpoint: aaaaaaaaaaaa)"]
    _, notes = checkpoints.resume_differences(config(batch_size=8, gradient_accumulation_steps=1), config())
    assert notes[0]["text"].startswith("batch (--batch-size x --gradient-accumulation-steps x processes) 8 x 1 "
                                       "differs from the checkpoint's 2 x 4: takes effect; same effective batch")
    _, notes = checkpoints.resume_differences({**config(batch_size=1), "processes": 2}, config())
    assert "1 x 4 x 2 differs from the checkpoint's 2 x 4: takes effect; same effective batch" in notes[0]["text"]
    _, notes = checkpoints.resume_differences(config(batch_size=4, learning_rate=1e-4, weight_decay=0.0, seed=1), config())
    text = [n["text"] for n in notes]
    assert "rows of the current epoch are repeated or skipped" in text[0]
    assert "--learning-rate 0.0001 differs from the checkpoint's 0.0002: the restored optimizer and scheduler keep 0.0002's schedule" in text
    assert "--weight-decay 0.0 differs from the checkpoint's 0.01: the restored optimizer keeps weight decay 0.01" in text
    assert any(t.startswith("--seed 1 differs from the checkpoint's 3407: takes effect on the data order") for t in text)


@pytest.mark.parametrize("change,shown", [(("--method", "grpo", "--num-generations", "4"), "--method grpo (checkpoint: sft)"),
                                          (("--long-rows", "truncate"), "--long-rows truncate (checkpoint: drop)")])
def test_method_and_long_rows_are_compared_before_the_model_loads(run_copy, tiny_model, sample_dataset, capsys,
                                                                  no_model_load, change, shown):
    """Every flag has a resume rule (train_config.py); the ones known without the model are checked
    before it loads (no_model_load fails the test otherwise)."""
    code = resume(tiny_model, sample_dataset, run_copy, *change)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and shown in err[-1] and err[-1].startswith("error: cannot resume from"), err[-3:]

