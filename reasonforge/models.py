"""Model loading for training, evaluation and chat: backend choice, saved adapters, GPU memory, the demo model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from reasonforge.core import MAX_SEQ_LENGTH, UserError, absolute_if_local, first_line, log, path_kind, read_json
from reasonforge.s3 import fetch_if_s3

RUN_INFO_FILE = "reasonforge.json"  # written beside an adapter: base model, template, backend


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def unsloth_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("unsloth") is not None


def choose_backend(requested: str) -> tuple[str, str]:
    """Return (backend, reason). `auto` takes unsloth when CUDA and the package are present."""
    has_cuda = cuda_available()
    if requested == "unsloth":
        if not has_cuda:
            raise UserError("--backend unsloth needs a CUDA GPU; use --backend hf (or auto) on this machine")
        if not unsloth_importable():
            raise UserError("--backend unsloth needs the gpu extra: pip install -e '.[gpu]'")
        return "unsloth", "requested"
    if requested == "hf":
        return "hf", "requested"
    if has_cuda and unsloth_importable():
        return "unsloth", "CUDA GPU and unsloth available"
    if has_cuda:
        return "hf", "CUDA GPU found but unsloth is not installed (pip install -e '.[gpu]')"
    return "hf", "no CUDA GPU: transformers + PEFT in full precision on CPU"


def import_unsloth_first() -> None:
    """Unsloth patches transformers/trl/peft when imported, so it must come before them."""
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    import unsloth  # noqa: F401


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_path(name: str, needs: tuple[str, ...] = ("config.json", "adapter_config.json"), what: str = "model") -> None:
    """A path-looking name must be a folder holding one of `needs`; Hub ids pass through."""
    if path_kind(name) == "local":
        p = Path(name).expanduser()
        if p.is_file():
            hint = (" (a GGUF file is for evaluate_model.py and test_model.py; train from the model's Hugging Face "
                    "folder)" if p.suffix.lower() == ".gguf" else "")
            raise UserError(f"{what} {name!r} is a file, not a model folder{hint}; pass a folder with {needs[0]}")
        if not p.is_dir():
            raise UserError(f"{what} folder {name!r} does not exist; pass a Hub id or a folder with {needs[0]}")
        if not any((p / n).is_file() for n in needs):
            found = ", ".join(sorted(x.name for x in p.iterdir())[:10]) or "nothing"
            inner = next((sub for sub in ("final_model", "merged_16bit") if (p / sub / needs[-1]).is_file()
                          or (p / sub / needs[0]).is_file()), None)
            hint = f"; for the run's model pass {p / inner}" if inner else ""
            raise UserError(f"{what} folder {name!r} has no {' or '.join(needs)} (found: {found}){hint}")
        if (p / "config.json").is_file() and not any((p / n).is_file() for n in TOKENIZER_FILES):
            # transformers would fall back to an empty tokenizer, and every row would be 0 tokens long
            raise UserError(f"{what} folder {name!r} has no tokenizer ({', '.join(TOKENIZER_FILES[:2])}); copy the "
                            "tokenizer files from where the model came from into it")


HUB_LOOKUP_S = 3.0  # a resolver that does not answer in this long is as good as none


def hub_model_problem(name: str, flag: str) -> str | None:
    """Why the Hub id `name` cannot be loaded on this machine, found in seconds rather than after a
    minute of retries: offline (HF_HUB_OFFLINE) and not in the local cache, or the Hub's host does
    not resolve. None for local paths, cached ids and a Hub that answers."""
    if path_kind(name) != "hub" or str(name).lower().endswith(".gguf"):  # a GGUF file is never a Hub id
        return None
    import concurrent.futures
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return None
    fix = (f"pass a local model folder instead (the demo's is ./pipeline_run/base_model, see TRAINING_GUIDE.md, "
           f"'A local model'), or fetch it into the cache where there is network (hf download {name})")
    if constants.HF_HUB_OFFLINE:
        return (f"{flag} {name} is a Hugging Face Hub id, HF_HUB_OFFLINE is set and it is not in the local cache "
                f"({constants.HF_HUB_CACHE}); {fix}, then run without HF_HUB_OFFLINE")
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(socket.getaddrinfo, host, 443).result(timeout=HUB_LOOKUP_S)
    except (OSError, concurrent.futures.TimeoutError):
        return (f"{flag} {name} is a Hugging Face Hub id, but {host} cannot be reached from here (its name does not "
                f"resolve) and the model is not in the local cache; {fix}")
    finally:
        pool.shutdown(wait=False)
    return None


def read_adapter_info(path: str | Path) -> dict | None:
    """Adapter metadata of a folder, or None when it holds no adapter."""
    path = Path(path)
    cfg = path / "adapter_config.json"
    if not cfg.is_file():
        return None
    fix = "copy the adapter folder again from its training run (final_model/ or a checkpoint-N/)"
    info = read_json(cfg, "adapter config", fix)
    extra = path / RUN_INFO_FILE
    if extra.is_file():
        info["reasonforge"] = read_json(extra, "adapter run info", fix)
    return info


def load_model(
    model_name: str,
    *,
    backend: str = "auto",
    max_seq_length: int = MAX_SEQ_LENGTH,
    load_in_4bit: bool = True,
    adapter_path: str | Path | None = None,
    trainable_adapter: bool = False,
    dtype: str = "auto",
    trust_remote_code: bool = False,
):
    """Load a base model (optionally with a LoRA adapter) and its tokenizer.

    Returns (model, tokenizer, info) where info names the backend, why it was chosen,
    the dtype and whether 4-bit is on. Training attaches fresh adapters itself (see
    `reasonforge.lora.attach_lora`); evaluation and chat pass `adapter_path`.
    """
    backend, reason = choose_backend(backend)
    check_model_path(model_name)
    try:
        if backend == "unsloth":
            model, tokenizer, info = _load_unsloth(model_name, max_seq_length, load_in_4bit, dtype, trust_remote_code)
        else:
            model, tokenizer, info = _load_hf(model_name, load_in_4bit, dtype, trust_remote_code)
    except (ValueError, KeyError, TypeError) as exc:  # safetensors' and json's errors are ValueErrors or named below
        raise damaged_model_error(model_name, exc) from exc
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        raise damaged_model_error(model_name, exc) from exc
    info.update(backend=backend, backend_reason=reason, base_model=model_name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if adapter_path is not None:
        model, tokenizer = _attach_saved_adapter(model, tokenizer, Path(adapter_path), model_name, trainable_adapter)
        info["adapter"] = str(adapter_path)
    no_bpe_cleanup(tokenizer)
    return model, tokenizer, info


def no_bpe_cleanup(tokenizer) -> None:
    """Turn off clean_up_tokenization_spaces on a BPE tokenizer; decoding gives the same text.

    transformers 5 never applies that cleanup to BPE (it would strip spaces before punctuation),
    but a tokenizer saved with it on (GGUF exports, and adapters trained from them) warns about
    it on its first decode, in the middle of the first streamed reply.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "BPE":
        tokenizer.clean_up_tokenization_spaces = False


def _adapter_depth_problem(model, adapter_path: Path, base_name: str) -> str | None:
    """PEFT loads an adapter onto a shallower base of the same width without a word: the weights of
    the layers the base lacks are dropped and the model that answers is a broken one."""
    import re

    weights = adapter_path / "adapter_model.safetensors"
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not weights.is_file() or not isinstance(layers, int):
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as fh:
            indices = {int(m.group(1)) for k in fh.keys() for m in [re.search(r"\.layers\.(\d+)\.", k)] if m}
    except Exception:  # unreadable weights get PEFT's own error below
        return None
    if indices and max(indices) >= layers:
        return (f"adapter {adapter_path} has LoRA weights for decoder layer {max(indices)}, but base model "
                f"{base_name!r} has {layers} layers; pass the --base-model it was trained on")
    return None


def tolerate_old_torchao() -> None:
    """Let PEFT build LoRA layers beside the torchao that Unsloth's extra installs.

    PEFT 0.21 raises ImportError on creating any LoRA layer when a torchao older than 0.16 is
    installed (it probes torchao for its quantised-layer support); the gpu extra brings 0.14.1 with
    Unsloth, which patches the probe itself, so only a process that never imports Unsloth (the
    static engine's --backend hf) meets the error. torchao-quantised bases are never used here, so
    the probe answers False for such a version.
    """
    import importlib
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        return
    from packaging.version import Version

    try:
        if Version(importlib.metadata.version("torchao")) >= Version("0.16.0"):
            return
    except (importlib.metadata.PackageNotFoundError, ValueError):
        pass
    def is_torchao_available() -> bool:
        return False

    # each module bound the probe by name at import, so each binding is replaced
    for name in ("peft.import_utils", "peft.tuners.lora.torchao", "peft.utils.quantization_utils"):
        module = importlib.import_module(name)
        if hasattr(module, "is_torchao_available"):
            module.is_torchao_available = is_torchao_available


def _attach_saved_adapter(model, tokenizer, adapter_path: Path, base_name: str, trainable: bool):
    """Load a saved LoRA adapter onto `model`; the adapter folder's tokenizer (and so its chat
    template, the one training used) replaces the base's."""
    from peft import PeftModel

    tolerate_old_torchao()

    problem = safetensors_problem(adapter_path / "adapter_model.safetensors", "adapter file")
    if problem:
        raise UserError(problem)
    # the file's own values, checked before a failure would be blamed on the base model
    saved = read_json(adapter_path / "adapter_config.json", "adapter_config.json")
    bad = [f"{key} {saved.get(key)!r}" for key in ("r", "lora_alpha")
           if not isinstance(saved.get(key), (int, float)) or isinstance(saved.get(key), bool) or saved.get(key) <= 0]
    if bad:
        raise UserError(f"{adapter_path / 'adapter_config.json'} is not a valid adapter config ({', '.join(bad)}: "
                        "must be positive); copy the adapter folder again")
    depth_problem = _adapter_depth_problem(model, adapter_path, base_name)
    if depth_problem:
        raise UserError(depth_problem)
    try:
        model = PeftModel.from_pretrained(model, str(adapter_path), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(
            f"adapter {adapter_path} does not fit base model {base_name!r} ({first_line(exc, 160)}); "
            "pass the --base-model it was trained on"
        ) from exc
    if (adapter_path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(adapter_path))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _torch_dtype(dtype: str):
    import torch

    if dtype == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
            "fp32": torch.float32, "float32": torch.float32}[dtype]


def safetensors_problem(path: Path, what: str) -> str | None:
    """A .safetensors file that cannot be read (empty, cut, a header that is not one), named with the
    fix, before a library fails on it with a traceback; None when its header and size agree."""
    import struct

    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            header = json.loads(fh.read(length)) if length is not None and 8 + length <= size else None
    except (OSError, ValueError) as exc:
        header, size = None, getattr(exc, "strerror", None) or first_line(exc, 80)
    if isinstance(header, dict):
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
                and len(v.get("data_offsets") or []) == 2]
        if 8 + length + max(ends, default=0) <= size:
            return None
    shown = f"{size} bytes" if isinstance(size, int) else size
    return f"{what} {path} is damaged or incomplete ({shown}, no readable safetensors header or data); copy it again"


def damaged_model_error(model_name: str, exc: BaseException) -> Exception:
    """A local model folder whose files cannot be read (a config.json without model_type, a cut
    model.safetensors) as one line naming the folder and the fix; other errors are returned as they are."""
    if path_kind(model_name) != "local":
        return exc
    return UserError(f"model folder {model_name!r} cannot be loaded ({type(exc).__name__}: {first_line(exc, 160)}); "
                     "its files look damaged or incomplete (config.json, *.safetensors): copy or download it again")


def _load_unsloth(model_name, max_seq_length, load_in_4bit, dtype, trust_remote_code):
    import_unsloth_first()
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_name,
        max_seq_length=max_seq_length,
        load_in_4bit=load_in_4bit,
        dtype=None if dtype == "auto" else _torch_dtype(dtype),
        trust_remote_code=trust_remote_code,
    )
    return model, tokenizer, {"dtype": str(getattr(model, "dtype", "")), "load_in_4bit": load_in_4bit}


def _load_hf(model_name, load_in_4bit, dtype, trust_remote_code):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _torch_dtype(dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    quantized = bool(load_in_4bit and torch.cuda.is_available())
    if quantized:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    elif torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    kwargs["attn_implementation"] = "sdpa"
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(model_name, **kwargs)
    except OSError as exc:
        owner = str(model_name).split("/")[0]
        hint = (f"; and there is no local folder {str(model_name)!r} (the folder {owner!r} exists: check the path)"
                if "/" in str(model_name) and Path(owner).is_dir() and not Path(model_name).exists() else "")
        raise UserError(f"cannot load model {model_name!r}: {first_line(exc)}{hint}") from exc
    return model, tokenizer, {"dtype": str(torch_dtype).replace("torch.", ""), "load_in_4bit": quantized}


def resolve_model_for_inference(model_path: str, is_adapter: bool, base_model: str | None) -> tuple[str, Path | None, dict]:
    """Work out (base model, adapter folder or None, adapter metadata) for evaluation and chat.

    `model_path` may be an s3:// URI (mirrored locally first), an adapter folder (detected by
    adapter_config.json), or a full model folder / Hub id.
    """
    kind = path_kind(model_path)
    problem = hub_model_problem(model_path, "--model-path")
    if problem:
        raise UserError(problem)
    local = fetch_if_s3(model_path, cache_root="./model_cache/s3") if kind == "s3" else Path(model_path)
    looks_local = kind != "hub"
    if looks_local and not local.is_dir():
        raise UserError(f"model folder {model_path!r} does not exist; pass a final_model folder, an s3:// URI or a Hub id")
    adapter = read_adapter_info(local) if looks_local else None
    if is_adapter and adapter is None:
        found = ", ".join(sorted(p.name for p in local.iterdir())[:12]) if looks_local else "a Hub id"
        raise UserError(f"--is-adapter given but {model_path} has no adapter_config.json (found: {found or 'nothing'})")
    if adapter is None:
        if looks_local:  # before the dataset and the model load
            check_model_path(str(local))
        return (str(local) if looks_local else model_path), None, {}
    weights = [n for n in ("adapter_model.safetensors",) if (local / n).is_file()]
    if not weights:
        found = ", ".join(sorted(p.name for p in local.iterdir())[:12])
        if (local / "adapter_model.bin").is_file():
            raise UserError(f"{local} holds adapter_model.bin; only safetensors adapters are loaded (found: {found})")
        raise UserError(f"{local} has adapter_config.json but no adapter_model.safetensors (found: {found})")
    recorded = adapter.get("reasonforge", {}).get("base_model") or adapter.get("base_model_name_or_path")
    base = base_model or recorded
    if not base:
        raise UserError(f"{local} does not record its base model; pass --base-model")
    if base_model and recorded and absolute_if_local(base_model) != absolute_if_local(recorded):
        log.warning("--base-model %s differs from the recorded base %s; the shapes are checked on load", base_model, recorded)
    problem = hub_model_problem(base, "--base-model" if base_model else "the adapter's base model (--base-model)")
    if problem:
        raise UserError(problem)
    if not base_model and path_kind(base) == "local" and not Path(base).is_dir():
        raise UserError(f"{local} records its base model as {base!r}, which does not exist here; pass --base-model with "
                        "that model's folder or Hub id")
    return base, local, adapter
