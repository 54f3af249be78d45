"""Float flags refuse NaN and infinity, and every JSON the suite writes is strict JSON
(issue #27's class "non-finite numbers in flags")."""

from __future__ import annotations

import json
import math

import pytest

import data_preparation
import evaluate_model
import test_model as tm
import train_lora
import utils

FLOAT_FLAGS = {
    data_preparation: ["--val-size"],
    train_lora: ["--num-epochs", "--learning-rate", "--weight-decay", "--gpu-memory-gib", "--lora-dropout",
                 "--sigterm-deadline-s", "--beta", "--temperature"],
    evaluate_model: ["--temperature", "--top-p", "--repetition-penalty"],
    tm: ["--temperature", "--top-p", "--repetition-penalty"],
}


@pytest.mark.parametrize("script,flag", [(s, f) for s, flags in FLOAT_FLAGS.items() for f in flags],
                         ids=lambda v: v if isinstance(v, str) else v.__name__)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_float_flags_refuse_non_finite_values(script, flag, value, capsys):
    with pytest.raises(SystemExit) as stop:
        script.build_parser().parse_args([f"{flag}={value}"])  # "-inf" alone would read as an option
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {value!r} is not a finite number" in err


def test_every_float_flag_of_the_scripts_is_checked():
    """A float flag added later without the finite check would fail here."""
    for script, flags in FLOAT_FLAGS.items():
        floats = {opt for action in script.build_parser()._actions if action.type in (float, utils.finite_float)
                  for opt in action.option_strings if opt.startswith("--")}
        assert floats == set(flags), script.__name__
        assert not any(a.type is float for a in script.build_parser()._actions), script.__name__


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
