"""train_lora.py's settings are defined once (reasonforge/train_config.py): the parser, the per-flag
checks, the resume rules and TRAINING_GUIDE.md's flag table all come from TrainConfig's fields, so
a flag added as one field reaches every one of them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import train_lora
from reasonforge import checkpoints, train_config
from reasonforge.core import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_training_guide_flag_table_is_the_generated_one():
    guide = (ROOT / "TRAINING_GUIDE.md").read_text()
    begin = guide.index("-->\n", guide.index("<!-- flag-table")) + 4
    assert guide[begin:guide.index("\n<!-- /flag-table -->")] == train_config.markdown_table(), \
        "regenerate the table: python -m reasonforge.train_config"


def test_every_flag_has_one_resume_rule_and_the_tables_follow_it():
    rules = {f.name: f.metadata.get("resume", "free") for f in train_config.flags()}
    assert set(rules.values()) <= {"fixed", "resolved", "kept", "applied", "free"}
    assert {"method", "long_rows", "lora_r", "model_name"} <= set(checkpoints.fixed_on_resume())
    changeable = checkpoints.changeable_on_resume()
    assert changeable["learning_rate"][1] == "kept" and changeable["seed"][1] == "applied"
    assert changeable["load_in_4bit"][0] == "4-bit loading"
    assert not set(changeable) & set(checkpoints.fixed_on_resume())


def test_a_flag_added_as_one_field_reaches_parser_checks_resume_and_docs(monkeypatch):
    """The field alone: its flag parses with its type and default, its rule refuses a bad value,
    a resume under another value is refused, and the docs table lists it."""
    extra = dataclasses.make_dataclass(
        "TrainConfig", [("eval_max_new_tokens", int, train_config.setting(
            256, "tokens per validation reply (default: %(default)s)", group="training", check=train_config.POSITIVE,
            resume="fixed"))], bases=(train_config.TrainConfig,), frozen=True)
    monkeypatch.setattr(train_config, "TrainConfig", extra)
    args = train_lora.build_parser().parse_args(["--eval-max-new-tokens", "64"])
    assert args.eval_max_new_tokens == 64 and train_lora.build_parser().parse_args([]).eval_max_new_tokens == 256
    args.eval_max_new_tokens = 0
    with pytest.raises(UserError, match="--eval-max-new-tokens 0 must be a positive integer"):
        train_lora.validate_args(args)
    refused, _ = checkpoints.resume_differences({"arguments": {"eval_max_new_tokens": 64}},
                                                {"arguments": {"eval_max_new_tokens": 256}})
    assert refused == ["--eval-max-new-tokens 64 (checkpoint: 256)"]
    assert "| `--eval-max-new-tokens` | `256` | fixed | tokens per validation reply |" in train_config.markdown_table()


def test_parser_defaults_are_the_fields_defaults(monkeypatch):
    monkeypatch.delenv("REASONFORGE_COMPILE_CACHE", raising=False)
    args = vars(train_lora.build_parser().parse_args([]))
    fields = {f.name: f.default for f in train_config.flags()}
    assert args == fields


def test_evaluate_and_chat_settings_are_frozen_once_resolved():
    """evaluate_model.py and test_model.py resolve their settings into frozen objects (core.frozen)
    rather than writing into argparse's namespace, so a report records what ran."""
    import argparse
    import re

    settings = train_config.core.frozen(argparse.Namespace(a=1, b=None), b=2)
    assert (settings.a, settings.b) == (1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.a = 3
    later = train_config.core.frozen(settings, c=3)
    assert (later.a, later.b, later.c, settings.b) == (1, 2, 3, 2)
    for name in ("evaluate_model.py", "test_model.py", "reasonforge/evaluation.py", "reasonforge/chat.py",
                 "reasonforge/batch.py", "reasonforge/generation.py"):
        text = (ROOT / name).read_text()
        assert not re.search(r"setattr\(args|^\s*args\.\w+(, args\.\w+)* = ", text, re.M), name
