"""The chat template saved beside the adapter (and in checkpoints) is the one the run rendered its
rows with, for both methods, whatever the model's own template is."""

from __future__ import annotations

import json

import pytest

import train_lora
import utils
from test_grpo_cli import GRPO_SMALL, argv


def saved_template(folder) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).chat_template


@pytest.mark.slow
@pytest.mark.parametrize("method", [(), GRPO_SMALL], ids=["sft", "grpo"])
def test_adapter_carries_the_template_it_trained_with(tiny_qwen25, sample_dataset, tmp_path, method):
    out = tmp_path / "run"
    assert train_lora.main(argv(tiny_qwen25, sample_dataset, out, "--chat-template", "qwen3", *method)) == 0
    info = json.loads((out / "final_model" / utils.RUN_INFO_FILE).read_text())
    assert info["chat_template"] == "qwen3"
    assert saved_template(out / "final_model") == utils.QWEN3_TEMPLATE
    assert saved_template(out / "checkpoint-2") == utils.QWEN3_TEMPLATE
    # the model folder itself keeps its own template: the run worked on a copy of its tokenizer
    assert saved_template(tiny_qwen25) != utils.QWEN3_TEMPLATE
