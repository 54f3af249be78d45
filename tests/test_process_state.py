"""Process-wide changes go through reasonforge.process_state and are undone: after a training run
ends, or its setup fails, the process is as it was (environment, Inductor settings, signal
handlers, patched library functions), so a notebook or a second run in the same process starts
from the same state."""

from __future__ import annotations

import os
import signal
import sys

import pytest

import train_lora
from conftest import train_argv
from reasonforge.process_state import ProcessChanges, environment_restored


class Base:
    def f(self):
        return "base"


class Child(Base):
    pass


def test_changes_are_undone_in_reverse_and_inherited_attributes_deleted(monkeypatch):
    monkeypatch.setenv("RF_TEST_KEEP", "mine")
    monkeypatch.delenv("RF_TEST_NEW", raising=False)
    changes = ProcessChanges()
    changes.setenv("RF_TEST_KEEP", "run")
    changes.setenv("RF_TEST_NEW", "run")
    changes.setenv("RF_TEST_KEEP", "later")
    changes.setattr(Child, "f", lambda self: "patched")
    order = []
    changes.callback(order.append, "undone", what="a callback")
    assert Child().f() == "patched" and os.environ["RF_TEST_KEEP"] == "later"
    assert changes.made == ["$RF_TEST_KEEP", "$RF_TEST_NEW", "$RF_TEST_KEEP", "Child.f", "a callback"]
    changes.undo()
    assert order == ["undone"] and os.environ["RF_TEST_KEEP"] == "mine" and "RF_TEST_NEW" not in os.environ
    assert "f" not in vars(Child) and Child().f() == "base" and changes.made == []


def test_environment_restored_puts_back_set_changed_and_removed_variables(monkeypatch):
    monkeypatch.setenv("RF_TEST_A", "a")
    monkeypatch.setenv("RF_TEST_B", "b")
    with environment_restored():
        os.environ["RF_TEST_A"] = "changed"
        del os.environ["RF_TEST_B"]
        os.environ["RF_TEST_C"] = "new"
    assert (os.environ["RF_TEST_A"], os.environ["RF_TEST_B"], os.environ.get("RF_TEST_C")) == ("a", "b", None)


def process_state() -> dict:
    """What a run may change outside itself, as far as this process has imported it."""
    state = {"environ": dict(os.environ), "sigterm": signal.getsignal(signal.SIGTERM),
             "sigint": signal.getsignal(signal.SIGINT)}
    inductor = sys.modules.get("torch._inductor.config")
    if inductor is not None:
        state["cpp_wrapper"] = inductor.cpp_wrapper
    for module_name, owner, attr in PATCHED:
        module = sys.modules.get(module_name)
        if module is not None:
            target = getattr(module, owner) if owner else module
            state[f"{module_name}.{owner}.{attr}"] = vars(target).get(attr) if owner else getattr(module, attr, None)
    hf = sys.modules.get("transformers.utils.logging")
    if hf is not None:
        state["transformers_verbosity"] = hf.get_verbosity()
    return state


# (module, class or "", attribute) the suite patches during a run
PATCHED = [
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2DecoderLayer", "forward"),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2Attention", "forward"),
    ("trl.trainer.utils", "", "_ChunkedLogProbFunction"),  # None without Triton; grpo_trainer stands in for it
    ("trl.trainer.utils", "", "selective_log_softmax"),
]


@pytest.fixture
def warm_imports(tiny_model, sample_dataset, tmp_path):
    """One run first, so that what importing the libraries does once is not counted as the run's."""
    import trl.trainer.grpo_trainer  # noqa: F401  (the grpo run would import it, adding what it holds)

    assert train_lora.main(train_argv(tiny_model, sample_dataset, tmp_path / "warm")) == 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "grpo"])
def test_a_finished_run_leaves_the_process_as_it_was(warm_imports, tiny_qwen25, sample_dataset, tmp_path, method):
    extra = ["--method", "grpo", "--num-generations", "2", "--max-completion-length", "16",
             "--max-seq-length", "256"] if method == "grpo" else []
    before = process_state()
    assert train_lora.main(train_argv(tiny_qwen25, sample_dataset, tmp_path / "run", *extra)) == 0
    assert process_state() == before


@pytest.mark.slow
def test_a_failed_setup_leaves_the_process_as_it_was(warm_imports, tiny_model, sample_dataset, tmp_path, capsys):
    """--target-modules that the model lacks fails after the model loaded and setup changed things."""
    before = process_state()
    assert train_lora.main(train_argv(tiny_model, sample_dataset, tmp_path / "run", "--target-modules", "nope")) == 2
    assert "nope" in capsys.readouterr().err
    assert process_state() == before


@pytest.mark.slow
def test_setup_train_finish_without_the_cli_wrapper_undo_their_own_changes(warm_imports, tiny_model, sample_dataset,
                                                                           tmp_path):
    """The benchmark's path (training.setup/train/finish called directly): the run's own recorder,
    not cli_entry's, has to put everything back."""
    from reasonforge import training

    args = train_lora.build_parser().parse_args(train_argv(tiny_model, sample_dataset, tmp_path / "run"))
    before = process_state()
    run = training.setup(training.TrainConfig.from_args(args), [])
    training.finish(run, training.train(run))
    after = process_state()
    signal.signal(signal.SIGTERM, before["sigterm"])  # the guard's handler is cli_entry's to put back
    after.pop("sigterm"), before.pop("sigterm")
    assert after == before
