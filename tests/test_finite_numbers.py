"""Float flags refuse NaN and infinity in one error line, and every JSON the suite writes is strict
JSON (issue #27's class "non-finite numbers in flags")."""

from __future__ import annotations

import json
import math

import data_preparation
import evaluate_model
import test_model as tm
import train_lora
import utils

def test_a_nan_sigterm_deadline_is_refused_in_one_line(tmp_path, capsys):
    """The one float flag whose check was a comparison NaN passes ("<= 0"); the others' checks
    (number_problems, GenerationSettings) already refuse NaN and infinity, see test_environment_and_settings_errors."""
    for value in ("nan", "inf"):
        out = tmp_path / value
        assert train_lora.main(["--model-name", "x", "--output-dir", str(out), f"--sigterm-deadline-s={value}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: --sigterm-deadline-s {value} is not a finite number; it must be positive, e.g. 90"
        assert not out.exists()


def test_every_float_flag_is_range_checked_against_nan(tmp_path, capsys):
    """Each float flag of the four scripts, given nan, stops the script with one error line naming it."""
    cases = {
        data_preparation.main: (["--dataset", "sample", "--skip-upload", "--output-dir", str(tmp_path / "d")],
                                ["--val-size"]),
        train_lora.main: (["--model-name", "x", "--output-dir", str(tmp_path / "t")],
                          ["--num-epochs", "--learning-rate", "--weight-decay", "--gpu-memory-gib", "--lora-dropout",
                           "--sigterm-deadline-s", "--max-grad-norm"]),
        evaluate_model.main: (["--model-path", "x"], ["--temperature", "--top-p", "--repetition-penalty"]),
        tm.main: (["--model-path", "x", "--instruction", "hi"], ["--temperature", "--top-p", "--repetition-penalty"]),
    }
    grpo = ["--method", "grpo"]
    for main, (base, flags) in cases.items():
        for flag in flags:
            assert main([*base, f"{flag}=nan"]) == 2, flag
            err = capsys.readouterr().err.strip()
            assert err.startswith("error:") and f"{flag} nan" in err and len(err.splitlines()) == 1, (flag, err)
    for flag in ("--beta", "--temperature"):
        assert train_lora.main(["--model-name", "x", "--output-dir", str(tmp_path / "g"), *grpo, f"{flag}=nan"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and f"{flag} nan" in err, (flag, err)


def strict_loads(text: str):
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_json_files_and_lines_are_strict(tmp_path):
    record = {"loss": math.nan, "grad_norm": math.inf, "nested": [1.5, -math.inf, {"x": math.nan}], "ok": 2.0}
    path = tmp_path / "r.json"
    utils.atomic_write_json(path, record)
    assert strict_loads(path.read_text()) == {"loss": None, "grad_norm": None, "nested": [1.5, None, {"x": None}],
                                              "ok": 2.0}
    assert strict_loads(utils.to_json(record))["ok"] == 2.0


def test_step_log_lines_are_strict_json_with_a_nan_loss(tmp_path):
    from types import SimpleNamespace

    from reasonforge.callbacks import StepLogger

    path = tmp_path / "metrics.jsonl"
    logger = StepLogger(path)
    state = SimpleNamespace(global_step=1, epoch=0.1, num_input_tokens_seen=100, max_steps=2, is_world_process_zero=True)
    logger.on_train_begin(None, state, None)
    logger.on_log(None, state, None, logs={"loss": math.nan, "learning_rate": 1e-4})
    logger.on_train_end(None, state, None)
    rows = [strict_loads(line) for line in path.read_text().splitlines()]
    assert rows[-1]["loss"] is None and rows[-1]["learning_rate"] == 1e-4
