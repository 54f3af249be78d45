"""--config FILE for the four scripts: a file sets flags, the command line overrides it, the run says
where each value came from, and a run's training_config.json given back as --config reproduces it."""

from __future__ import annotations

import json

import pytest

import data_preparation as dp
import evaluate_model as ev
import test_model as tm
import train_lora
from conftest import one_error_line
from reasonforge import configfile


@pytest.mark.slow
def test_training_config_json_reproduces_the_run(tiny_model, sample_dataset, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model-name: {tiny_model}\ndataset_path: {sample_dataset}\nmax-steps: 2\nsave_steps: 2\n"
                   "batch-size: 2\ngradient_accumulation_steps: 1\nlearning-rate: 3e-3\nlora-r: 8\nlora_alpha: 16\n"
                   "warmup_steps: 0\n")
    first = tmp_path / "first"
    assert train_lora.main(["--config", str(cfg), "--output-dir", str(first), "--seed", "7"]) == 0
    banner = capsys.readouterr().out
    assert f"Settings:   10 from --config {cfg}, 2 from the command line; the rest are defaults" in banner
    recorded = json.loads((first / "training_config.json").read_text())["arguments"]
    assert recorded["settings_from"]["learning_rate"] == "config" and recorded["settings_from"]["seed"] == "command line"
    assert recorded["lora_r"] == 8 and recorded["learning_rate"] == 3e-3 and recorded["seed"] == 7

    second = tmp_path / "second"
    assert train_lora.main(["--config", str(first / "training_config.json"), "--output-dir", str(second)]) == 0
    replayed = json.loads((second / "training_config.json").read_text())["arguments"]
    differ = {k for k in recorded if recorded[k] != replayed.get(k)}
    assert differ == {"output_dir", "config", "settings_from"}, differ


@pytest.mark.parametrize("content, suffix, words", [
    ('{"learning_rate": 1e-4, "lerning_rate": 2}', ".json", "'lerning_rate' is not a flag of this script"),
    ('{"max_steps": "many"}', ".json", "max_steps 'many' is not valid for --max-steps"),
    ('{"backend": "tpu"}', ".json", "backend 'tpu' is not one of auto, unsloth, hf"),
    ('{"packing": "yes"}', ".json", "packing is a switch (--packing); give it true or false"),
    ("max_steps: [1\n", ".yaml", "is not valid YAML"),
    ('{"max_steps": 2,}', ".json", "is not valid JSON"),
    ("[1, 2]", ".json", "holds a list, not a mapping"),
    ('{"batch_size": 2.5}', ".json", "batch_size 2.5 is not a whole number"),
    ('{"lora_r": 8, "lora_r": 4}', ".json", "the key 'lora_r' appears twice"),
    ('{"dataset_path": null}', ".json", "dataset_path is null; give --dataset-path a value"),
    ('{"config": "other.json"}', ".json", "names another config file"),
])
def test_a_bad_config_file_is_one_error_line(tmp_path, capsys, content, suffix, words, no_model_load):
    cfg = tmp_path / f"c{suffix}"
    cfg.write_text(content)
    assert train_lora.main(["--config", str(cfg), "--output-dir", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys)
    assert words in line and str(cfg) in line
    assert not (tmp_path / "o").exists()


def test_a_missing_config_file_is_named(tmp_path, capsys):
    assert dp.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "--config" in one_error_line(capsys)


def test_every_script_takes_a_config(tmp_path, capsys):
    cfg = tmp_path / "p.json"
    cfg.write_text(json.dumps({"dataset": "sample", "max-samples": 40, "skip_upload": True,
                               "output_dir": str(tmp_path / "data")}))
    assert dp.main(["--config", str(cfg), "--max-samples", "30"]) == 0
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["counts"]["input_rows"] == 30  # the command line wins over the file
    for module in (ev, tm):
        parser = module.build_parser()
        e = tmp_path / "e.yaml"
        e.write_text("model-path: some/model\nmax_new_tokens: 7\ntemperature: 0\n")
        args = configfile.parse_args(parser, ["--config", str(e), "--temperature", "0.5"])
        assert args.model_path == "some/model" and args.max_new_tokens == 7 and args.temperature == 0.5
        assert args.settings_from == {"model_path": "config", "max_new_tokens": "config", "temperature": "command line"}


def test_config_values_in_their_natural_form(tmp_path):
    """A YAML list or mapping, or 2.0 for an int flag, is what the flag takes on the command line."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("target_modules: [q_proj, v_proj]\nmax_steps: 2.0\n")
    args = configfile.parse_args(train_lora.build_parser(), ["--config", str(cfg)])
    assert args.target_modules == "q_proj,v_proj" and args.max_steps == 2 and isinstance(args.max_steps, int)
    cm = tmp_path / "cm.yaml"
    cm.write_text("column_map:\n  question: user\n  answer: assistant\n")
    assert configfile.parse_args(dp.build_parser(), ["--config", str(cm)]).column_map == "question=user,answer=assistant"


def test_a_training_config_given_to_another_script_says_so(tmp_path, capsys):
    run = tmp_path / "training_config.json"
    run.write_text(json.dumps({"arguments": {"model_name": "m", "lora_r": 8}}))
    assert ev.main(["--config", str(run), "--model-path", "m"]) == 2
    assert "is a training run's config, whose settings are train_lora.py's" in one_error_line(capsys)
    assert dp.main(["--config", str(tmp_path)]) == 2
    assert "is a folder" in one_error_line(capsys)


@pytest.mark.parametrize("script", ["data_preparation", "train_lora", "evaluate_model", "test_model"])
def test_a_config_file_that_is_not_utf8_is_one_line_and_a_bom_is_read(script, tmp_path, capsys):
    import importlib

    main = importlib.import_module(script).main
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"verbose: caf\xe9\n")
    assert main(["--config", str(cfg)]) == 2
    assert "is not UTF-8 text (byte 0xe9 at offset 12); save it as UTF-8" in one_error_line(capsys)
    cfg.write_bytes(b"\xef\xbb\xbfnot_a_flag: 1\n")
    assert main(["--config", str(cfg)]) == 2
    assert "'not_a_flag' is not a flag of this script" in one_error_line(capsys)  # the key, not '\ufeffnot_a_flag'


@pytest.mark.parametrize("script, flag", [("train_lora", "--model-name"), ("train_lora", "--dataset-path"),
                                          ("evaluate_model", "--model-path"), ("data_preparation", "--dataset"),
                                          ("test_model", "--model-path")])
def test_an_empty_path_flag_is_named(script, flag, capsys):
    import importlib

    assert importlib.import_module(script).main([flag, ""]) == 2
    assert f"{flag} is empty; give it a path" in one_error_line(capsys)
