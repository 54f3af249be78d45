"""The model a run trains: the base model loaded and seeded, LoRA attached (by Unsloth where it
runs, so that its fast paths serve the adapter), a saved adapter's weights continued
(--init-adapter), and the parameter count."""

from __future__ import annotations

import logging
from pathlib import Path

from reasonforge import core, gpu_memory, models, s3
from reasonforge.core import UserError
from reasonforge.train_config import TrainConfig

log = logging.getLogger("reasonforge.train")


def load_base_model(config: TrainConfig, backend: str, main_rank: bool):
    """(model, tokenizer, info) of the base model, seeded first so that the adapters start the same."""
    from transformers import set_seed

    set_seed(config.seed)
    model, tokenizer, info = models.load_model(config.model_name, backend=backend, max_seq_length=config.max_seq_length,
                                              load_in_4bit=config.load_in_4bit, trust_remote_code=config.trust_remote_code)
    memory = gpu_memory.gpu_memory_stats()
    if main_rank and memory:
        print(f"after model load: {gpu_memory.format_memory_stats(memory)}")
    return model, tokenizer, info


def linear_module_names(model) -> list[str]:
    import torch

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            leaf = name.rsplit(".", 1)[-1]
            if leaf != "lm_head":
                names.add(leaf)
    return sorted(names)


def attach_lora(model, config: TrainConfig, *, backend: str, load_in_4bit: bool | None, checkpointing: str,
                keep_layers: int = 0):
    """Wrap the base model with fresh LoRA adapters (Unsloth's or PEFT's path); on Unsloth's,
    `keep_layers` decoder layers, evenly spaced, skip gradient checkpointing."""
    targets = config.targets
    available = linear_module_names(model)
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise UserError(f"--target-modules {unknown} not in this model; its linear modules are: {', '.join(available)}")
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        return FastLanguageModel.get_peft_model(
            model, r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=targets, bias="none",
            use_gradient_checkpointing={"auto": "unsloth", "unsloth": "unsloth", "on": True, "off": False}[checkpointing],
            random_state=config.seed, max_seq_length=config.max_seq_length,
            # 0 leaves Unsloth to read UNSLOTH_GC_KEEP_LAYERS, where a user set it
            checkpoint_skip_layers=keep_layers if checkpointing != "off" else 0,
        )
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from reasonforge.models import tolerate_old_torchao

    tolerate_old_torchao()

    if load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing != "off",
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def load_init_adapter(model, config: TrainConfig) -> None:
    """Copy a saved adapter's weights (--init-adapter, local or s3://) into the fresh LoRA layers.

    The layers are attached first, by Unsloth where it runs, so its fast LoRA path and offloaded
    checkpointing serve a continued adapter exactly as a new one; the saved shape must match.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = s3.fetch_if_s3(config.init_adapter)
    models.check_model_path(str(folder), needs=("adapter_config.json",), what="--init-adapter adapter")
    saved = core.read_json(folder / "adapter_config.json", "--init-adapter's adapter_config.json")
    wanted = {"r": config.lora_r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.targets)}
    found = {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"), "target_modules": sorted(saved.get("target_modules") or [])}
    if found != wanted:
        raise UserError(f"--init-adapter {config.init_adapter} has r {found['r']}, alpha {found['lora_alpha']}, targets "
                        f"{','.join(found['target_modules'])}; pass --lora-r {found['r']} --lora-alpha {found['lora_alpha']} "
                        f"--target-modules {','.join(found['target_modules'])} to continue it")
    recorded = init_adapter_base(folder, saved)
    if recorded and core.absolute_if_local(recorded) != core.absolute_if_local(config.model_name):
        # as evaluation does for --base-model: the same model under another path or id is common; the shapes are checked below
        log.warning("--init-adapter %s was trained on %s, not --model-name %s; continuing it on %s",
                    config.init_adapter, recorded, config.model_name, config.model_name)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"--init-adapter {config.init_adapter} has no adapter_model.safetensors; give a final_model/ "
                        "or checkpoint-N/ folder written by train_lora.py")
    problem = models.safetensors_problem(weights, "--init-adapter's file")
    if problem:
        raise UserError(problem)
    result = set_peft_model_state_dict(model, load_file(str(weights)))
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise UserError(f"--init-adapter {config.init_adapter}: {len(unexpected)} saved tensors fit no layer of "
                        f"{config.model_name} (e.g. {unexpected[0]}); was it trained on another base model?")
    log.info("LoRA weights loaded from %s", config.init_adapter)


def init_adapter_base(folder: Path, adapter_config: dict) -> str | None:
    """The base model an adapter folder records: train_lora's run info, else PEFT's config."""
    info = folder / models.RUN_INFO_FILE
    recorded = core.read_json(info, "the adapter's run info").get("base_model") if info.is_file() else None
    return recorded or adapter_config.get("base_model_name_or_path")


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())
    return trainable, total
