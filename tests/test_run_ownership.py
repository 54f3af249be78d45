"""A run's checkpoints and outputs belong to it: a new run never starts in a folder, or under an S3
run name, that holds another run's checkpoints or final model; a resume continues that run."""

from __future__ import annotations

import json

import pytest

import train_lora
from conftest import one_error_line


def argv(model, data, out, *extra):
    return ["--model-name", str(model), "--dataset-path", str(data), "--output-dir", str(out), "--batch-size", "4",
            "--gradient-accumulation-steps", "1", "--save-steps", "2", "--eval-steps", "2", "--warmup-steps", "0",
            "--max-seq-length", "384", *extra]


def test_a_new_run_is_refused_in_a_finished_runs_folder(tiny_model, sample_dataset, tmp_path, capsys, monkeypatch):
    """The issue's case: a finished run, then a shorter run at another learning rate into the same
    folder. Before, the second exited 0 beside the first's checkpoints and `latest` later resumed
    the first run. Now it is refused before the model loads, and nothing of the first run changes."""
    out = tmp_path / "OUT"
    assert train_lora.main(argv(tiny_model, sample_dataset, out, "--max-steps", "4")) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    metrics = (out / "training_metrics.json").read_text()

    import reasonforge.models

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the run was refused")

    monkeypatch.setattr(reasonforge.models, "load_model", refuse)
    code = train_lora.main(argv(tiny_model, sample_dataset, out, "--max-steps", "2", "--learning-rate", "1e-3"))
    line = one_error_line(capsys)
    assert code == 2
    assert "holds another run's checkpoint-2, checkpoint-4, final_model" in line
    assert "--resume-from-checkpoint latest" in line and "fresh --output-dir" in line
    after = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".run.lock"}
    assert {k: v for k, v in before.items() if k != ".run.lock"} == after
    assert (out / "training_metrics.json").read_text() == metrics


@pytest.mark.slow
def test_a_resume_continues_the_run_the_folder_holds(tiny_model, sample_dataset, tmp_path):
    out = tmp_path / "OUT"
    assert train_lora.main(argv(tiny_model, sample_dataset, out, "--max-steps", "2")) == 0
    assert train_lora.main(argv(tiny_model, sample_dataset, out, "--max-steps", "4",
                                "--resume-from-checkpoint", "latest")) == 0
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    config = json.loads((out / "training_config.json").read_text())
    assert config["resumed_from"]["step"] == 2


@pytest.mark.slow
def test_a_second_run_under_one_s3_run_name_is_refused(tiny_model, sample_dataset, tmp_path, s3_env, capsys):
    """Other output folder, same --run-name: the second run would overwrite the first's adapter,
    metrics and checkpoints on S3, and a fresh instance's resume would pick the other run's."""
    s3 = ("--s3-bucket", s3_env, "--run-name", "shared")
    assert train_lora.main(argv(tiny_model, sample_dataset, tmp_path / "first", "--max-steps", "2", *s3)) == 0
    code = train_lora.main(argv(tiny_model, sample_dataset, tmp_path / "second", "--max-steps", "2",
                                "--learning-rate", "1e-3", *s3))
    line = one_error_line(capsys)
    assert code == 2 and f"s3://{s3_env}/adapters/shared holds another run's checkpoint-2" in line
    assert "choose another --run-name" in line
    assert not (tmp_path / "second" / "checkpoint-2").exists()
    # another name is a run of its own
    assert train_lora.main(argv(tiny_model, sample_dataset, tmp_path / "second", "--max-steps", "2",
                                "--s3-bucket", s3_env, "--run-name", "other")) == 0
