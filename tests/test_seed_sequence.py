"""The README's seed sequence top to bottom, pointed at a local model and a local S3 server: data to
S3, training from the S3 dataset, evaluation with no --dataset-path scores the rows it trained on;
and a Hub id that cannot be loaded here fails fast, naming the fix, with nothing created."""

from __future__ import annotations

import json
import re
import time

import pytest

import data_preparation as dp
import evaluate_model as ev
import train_lora
from conftest import one_error_line


@pytest.mark.slow
def test_seed_sequence_evaluates_on_the_trained_data(tiny_model, s3_env, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the scripts' default folders (data_cache/, ...) land here
    assert dp.main(["--dataset", "sample", "--max-samples", "80", "--s3-bucket", s3_env, "--val-size", "0.1"]) == 0
    uri = re.search(r"S3 URI: (s3://\S+)", capsys.readouterr().out).group(1)
    # the README's second command: the default sample set into the default local folder
    assert dp.main(["--max-samples", "60", "--skip-upload"]) == 0
    assert train_lora.main(["--model-name", str(tiny_model), "--dataset-path", uri, "--from-s3",
                            "--output-dir", "./checkpoints/seed", "--max-steps", "2", "--save-steps", "2",
                            "--batch-size", "2", "--gradient-accumulation-steps", "1", "--s3-bucket", s3_env]) == 0
    info = json.loads((tmp_path / "checkpoints/seed/final_model/reasonforge.json").read_text())
    assert info["dataset_path"] == uri
    capsys.readouterr()
    assert ev.main(["--model-path", "./checkpoints/seed/final_model", "--compute-perplexity",
                    "--max-eval-samples", "4", "--output-file", "e.json"]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["dataset_path"] == uri and report["dataset_path_source"] == "recorded by the adapter"
    assert report["trained_rows_check"]["same_dataset_as_training"] is True
    assert "warning" not in capsys.readouterr().out
    # the local folder the README's second command wrote is other data: one warning, naming what to pass
    assert ev.main(["--model-path", "./checkpoints/seed/final_model", "--dataset-path", "./data_cache/processed_reasoning",
                    "--compute-perplexity", "--max-eval-samples", "4", "--output-file", "e2.json"]) == 0
    out = capsys.readouterr()
    warnings = [l for l in (out.out + out.err).splitlines() if "not the data this adapter trained on" in l]
    assert len(warnings) == 1 and f"pass --dataset-path {uri}" in warnings[0]


@pytest.mark.parametrize("script", ["train_lora", "evaluate_model"])
def test_an_offline_hub_id_fails_fast_naming_the_fix(script, tmp_path, monkeypatch, capsys, sample_dataset):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    if script == "train_lora":
        code = train_lora.main(["--model-name", "someone/not-cached-model", "--dataset-path", str(sample_dataset),
                                "--output-dir", "out"])
    else:
        code = ev.main(["--model-path", "someone/not-cached-model", "--compute-perplexity", "--output-file", "e.json"])
    line = one_error_line(capsys)
    assert code == 2 and time.perf_counter() - started < 5
    assert "HF_HUB_OFFLINE is set and it is not in the local cache" in line and "local model folder" in line
    assert list(tmp_path.iterdir()) == []  # nothing downloaded or created
