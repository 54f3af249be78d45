"""LoRA fine-tuning of a Qwen chat model: Unsloth 4-bit on a GPU, transformers + PEFT elsewhere.

    # the seed's run: dataset from S3, adapter back to S3
    python train_lora.py --model-name "unsloth/Qwen2.5-Coder-3B-Instruct" \
      --dataset-path "s3://bucket/datasets/processed_reasoning_20251220_143022" --from-s3 \
      --output-dir ./checkpoints/qwen3_4b_reasoning --num-epochs 3 --batch-size 2 \
      --gradient-accumulation-steps 4 --learning-rate 2e-4 --lora-r 16 --lora-alpha 16 --s3-bucket adapters-bucket

    # continue a preempted run on a fresh instance (newest complete checkpoint, local or on S3)
    python train_lora.py ... --s3-bucket adapters-bucket --run-name my-run --resume-from-checkpoint latest

Output folder: checkpoint-N/, final_model/ (best checkpoint by validation loss), training_config.json,
training_metrics.json, logs/ (TensorBoard + metrics.jsonl), loss_curve.png.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import logging
import math
import os
import shlex
import shutil
import sys
import threading
import time
from pathlib import Path

import utils
from utils import UserError

log = logging.getLogger("reasonforge.train")

DEFAULT_MODEL = "unsloth/Qwen2.5-Coder-3B-Instruct"
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
CHECKPOINT_MARKER = "reasonforge_checkpoint.json"  # written last: a checkpoint without it is incomplete


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model-name", default=DEFAULT_MODEL, help="Hub id or local folder (default: %(default)s)")
    m.add_argument("--backend", choices=["auto", "unsloth", "hf"], default="auto",
                   help="unsloth (CUDA) or transformers+PEFT; auto picks and says why (default: %(default)s)")
    m.add_argument("--max-seq-length", type=int, default=2048, help="tokens per example (default: %(default)s)")
    m.add_argument("--no-4bit", dest="load_in_4bit", action="store_false", help="load the base in 16-bit on GPU")
    m.add_argument("--trust-remote-code", action="store_true", help="allow model code from the Hub (off by default)")
    d = p.add_argument_group("data")
    d.add_argument("--dataset-path", default="./data_cache/processed_reasoning",
                   help="folder from data_preparation.py, or s3:// URI (default: %(default)s)")
    d.add_argument("--from-s3", action="store_true", help="read --dataset-path from S3 (an s3:// URI, or a key in --s3-bucket)")
    d.add_argument("--chat-template", default="auto", choices=["auto", "dataset", "qwen3", "qwen2.5", "tokenizer"],
                   help="template to render messages: auto = the model's own (its tokenizer's, else the built-in of "
                        "its family); dataset = the one data preparation recorded, refused if it does not fit the "
                        "model; qwen3/qwen2.5 = that built-in, as asked (default: %(default)s)")
    d.add_argument("--long-rows", choices=["drop", "truncate"], default="drop",
                   help="rows longer than --max-seq-length: drop them (counted on the banner), or cut them, "
                        "losing their end and <|im_end|> (default: %(default)s)")
    d.add_argument("--train-on-responses-only", action=argparse.BooleanOptionalAction, default=True,
                   help="loss on assistant tokens only (default: on)")
    d.add_argument("--packing", action="store_true", help="pack short examples into full sequences")
    t = p.add_argument_group("training")
    t.add_argument("--num-epochs", type=float, default=3, help="(default: %(default)s)")
    t.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (default: epochs)")
    t.add_argument("--batch-size", type=int, default=2, help="per-device micro-batch (default: %(default)s)")
    t.add_argument("--gradient-accumulation-steps", type=int, default=4, help="(default: %(default)s)")
    t.add_argument("--learning-rate", type=float, default=2e-4, help="(default: %(default)s)")
    t.add_argument("--weight-decay", type=float, default=0.01, help="(default: %(default)s)")
    t.add_argument("--warmup-steps", type=int, default=5, help="(default: %(default)s)")
    t.add_argument("--lr-scheduler", default="linear", help="transformers scheduler name (default: %(default)s)")
    t.add_argument("--optim", default="auto", help="optimizer; auto = adamw_8bit where bitsandbytes works, else adamw_torch")
    t.add_argument("--seed", type=int, default=3407, help="(default: %(default)s)")
    t.add_argument("--auto-batch", action="store_true",
                   help="pick micro-batch and checkpointing from the GPU's free memory, keeping the effective batch")
    t.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="treat the GPU as having this much memory (caps this process to it); default: what is free")
    t.add_argument("--gradient-checkpointing", choices=["auto", "unsloth", "on", "off"], default="auto",
                   help="auto: Unsloth's offloaded checkpointing on that backend, plain checkpointing on other "
                        "GPUs, off on CPU (default: %(default)s)")
    t.add_argument("--logging-steps", type=int, default=1, help="(default: %(default)s)")
    t.add_argument("--graph-wrapper", choices=["auto", "cpp", "python"], default="auto",
                   help="launcher code for Unsloth's compiled graphs: cpp steps faster but its build adds a minute "
                        "or more to the first step; auto takes it for runs of at least "
                        f"{CPP_WRAPPER_MIN_STEPS} steps (default: %(default)s)")
    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora-r", type=int, default=16, help="(default: %(default)s)")
    lo.add_argument("--lora-alpha", type=int, default=16, help="(default: %(default)s)")
    lo.add_argument("--lora-dropout", type=float, default=0.0, help="(default: %(default)s)")
    lo.add_argument("--target-modules", default=DEFAULT_TARGETS, help="comma-separated (default: %(default)s)")
    c = p.add_argument_group("checkpoints and evaluation")
    c.add_argument("--output-dir", default="./checkpoints/qwen_lora", help="(default: %(default)s)")
    c.add_argument("--run-name", default=None, help="name on S3 and in logs (default: output folder name)")
    c.add_argument("--save-steps", type=int, default=100, help="(default: %(default)s)")
    c.add_argument("--save-total-limit", type=int, default=3, help="(default: %(default)s)")
    c.add_argument("--eval-steps", type=int, default=None, help="validate every N steps (default: --save-steps)")
    c.add_argument("--early-stopping-patience", type=int, default=None, help="stop after N evaluations without improvement")
    c.add_argument("--resume-from-checkpoint", default=None, metavar="PATH|latest",
                   help="a checkpoint folder, or 'latest' (newest complete one, local or on S3)")
    c.add_argument("--save-merged", action="store_true", help="also save a 16-bit merged model beside the adapter")
    c.add_argument("--sigterm-deadline-s", type=float, default=90,
                   help="on SIGTERM a checkpoint is saved at the end of the current step; exit without one if "
                        "none has begun after this many seconds (spot instances get 120) (default: %(default)s)")
    u = p.add_argument_group("upload")
    u.add_argument("--s3-bucket", default=None, help="sync checkpoints and the final adapter to s3://BUCKET/adapters/RUN/")
    u.add_argument("--skip-s3-upload", action="store_true", help="never upload, even with --s3-bucket")
    u.add_argument("--push-to-hub", default=None, metavar="REPO", help="push the final adapter to this Hub repo")
    p.add_argument("--verbose", action="store_true")
    return p


# Schedulers transformers builds only from lr_scheduler_kwargs, which this script does not pass.
SCHEDULERS_NEEDING_KWARGS = {"cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay"}


def check_trainer_names(args) -> None:
    """--lr-scheduler and --optim against the names this transformers knows, before the model loads.

    Apart from validate_args because it imports transformers, which on a GPU must follow unsloth.
    """
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    problems = []
    schedulers = [s.value for s in SchedulerType if s.value not in SCHEDULERS_NEEDING_KWARGS]
    if args.lr_scheduler not in schedulers:
        why = "needs scheduler arguments this script does not pass" if args.lr_scheduler in SCHEDULERS_NEEDING_KWARGS else "is unknown"
        problems.append(f"--lr-scheduler {args.lr_scheduler!r} {why}; choose one of {', '.join(schedulers)}")
    optims = ["auto", *(o.value for o in OptimizerNames)]
    if args.optim not in optims:
        # Names that extend what was typed first ("adamw" -> adamw_torch); difflib alone picks oddities.
        close = [o for o in optims if o.startswith(args.optim)][:3] or difflib.get_close_matches(args.optim, optims, n=3)
        problems.append(f"--optim {args.optim!r} is unknown; " + (f"did you mean {' or '.join(close)}? " if close else "")
                        + "e.g. auto, adamw_torch, adamw_8bit (all: transformers.training_args.OptimizerNames)")
    if problems:
        raise UserError("; ".join(problems))


def validate_args(args) -> None:
    problems = []
    positive = {"--batch-size": args.batch_size, "--gradient-accumulation-steps": args.gradient_accumulation_steps,
                "--lora-r": args.lora_r, "--lora-alpha": args.lora_alpha, "--save-steps": args.save_steps,
                "--max-seq-length": args.max_seq_length, "--logging-steps": args.logging_steps}
    problems += [f"{k} {v} must be a positive integer" for k, v in positive.items() if v < 1]
    problems += utils.number_problems({
        "--learning-rate": (args.learning_rate, lambda v: 0 < v < 1, "in (0, 1), e.g. 2e-4"),
        "--num-epochs": (args.num_epochs, lambda v: v > 0 or args.max_steps > 0, "> 0 (or give --max-steps)"),
        "--max-steps": (args.max_steps, lambda v: v == -1 or v >= 1, "a positive number of steps, or -1 for --num-epochs"),
        "--weight-decay": (args.weight_decay, lambda v: 0 <= v <= 1, "in [0, 1], e.g. 0.01"),
        "--warmup-steps": (args.warmup_steps, lambda v: v >= 0, "0 or more"),
        "--lora-dropout": (args.lora_dropout, lambda v: 0 <= v < 1, "in [0, 1)"),
        "--seed": (args.seed, lambda v: 0 <= v <= utils.SEED_MAX, f"from 0 to {utils.SEED_MAX}"),
        "--gpu-memory-gib": (args.gpu_memory_gib, lambda v: v > 0, "a positive number of GiB, e.g. 24"),
        "--early-stopping-patience": (args.early_stopping_patience, lambda v: v >= 1, "at least 1"),
    })
    if args.eval_steps is not None and (args.eval_steps < 1 or args.save_steps % args.eval_steps):
        problems.append(f"--save-steps {args.save_steps} must be a multiple of --eval-steps {args.eval_steps} "
                        "(the best checkpoint is chosen among saved ones)")
    if args.sigterm_deadline_s <= 0:
        problems.append(f"--sigterm-deadline-s {args.sigterm_deadline_s} must be positive, e.g. 90")
    if args.save_total_limit is not None and args.save_total_limit < 1:
        problems.append("--save-total-limit must be at least 1")
    if args.s3_bucket:
        utils.validate_bucket_name(args.s3_bucket)
    if args.run_name is not None or args.s3_bucket:
        # The S3 URI printed at the end is built from it: S3 must store the key exactly as printed.
        flag = "--run-name" if args.run_name is not None else "--run-name (the --output-dir folder name)"
        problems += filter(None, [utils.s3_key_problem(default_run_name(args), flag)])
    if args.from_s3 and not args.dataset_path.startswith("s3://") and not args.s3_bucket:
        problems.append("--from-s3 needs an s3:// --dataset-path (or --s3-bucket to read the key from)")
    if not args.target_modules.strip(","):
        problems.append("--target-modules is empty; e.g. " + DEFAULT_TARGETS)
    problems += filter(None, [run_dir_problem(Path(args.output_dir))])
    if problems:
        raise UserError("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def resolve_dataset_path(args) -> Path:
    path = args.dataset_path
    if args.from_s3 and not path.startswith("s3://"):
        path = f"s3://{args.s3_bucket}/{path.strip('/')}"
    return utils.fetch_if_s3(path)


def choose_template(args, manifest: dict, tokenizer) -> tuple[str, str]:
    """(name, jinja source) of the template training renders with; see --chat-template."""
    requested = args.chat_template
    if requested == "dataset":
        recorded = manifest.get("chat_template", {})
        if recorded.get("source") and "preview" not in str(recorded.get("name")):
            misfit = utils.template_misfit(recorded["source"], tokenizer)
            if misfit:
                raise UserError(
                    f"the dataset's recorded template {recorded.get('name')!r} does not fit {args.model_name}: {misfit}; "
                    f"use --chat-template auto (the model's own), or --chat-template {recorded.get('name')} to insist")
            return recorded.get("name", "dataset"), recorded["source"]
        log.info("the dataset records no template of its own (only a preview's); using the model's")
        requested = "auto"
    name, source = utils.resolve_chat_template(requested, tokenizer)
    misfit = utils.template_misfit(source, tokenizer)
    if misfit and requested in utils.BUILTIN_TEMPLATES:
        log.warning("--chat-template %s does not fit %s (%s); using it because it was named", name, args.model_name, misfit)
    return name, source


def tokenize_splits(dd, tokenizer, template_source: str, args):
    """Render with the chosen template, tokenize and mask; rows over --max-seq-length are dropped
    (or cut with --long-rows truncate) and rows left with no target are dropped.

    Returns (train, validation, counts per split for the banner and training_config.json).
    """
    tokenizer.chat_template = template_source
    limit = args.max_seq_length

    def encode(row):
        return utils.encode_conversation(row["messages"], tokenizer, args.train_on_responses_only, limit)

    out, counts = {}, {"policy": args.long_rows, "max_seq_length": limit}
    for split in ("train", "validation"):
        ds = dd[split]
        # In memory: no cache files written into the prepared dataset folder (shared by every rank).
        ds = ds.map(encode, remove_columns=ds.column_names, desc=f"tokenizing {split}", keep_in_memory=True)
        lengths = ds.select_columns(["n_tokens", "n_target"]).to_list()
        over = [r["n_tokens"] > limit for r in lengths]
        no_target = [r["n_target"] == 0 for r in lengths]
        keep = [utils.keeps_row(r, limit, args.long_rows) for r in lengths]
        counts[split] = {"rows": len(ds), "over_max_seq_length": sum(over), "kept": sum(keep),
                         "longest_tokens": max(ds["n_tokens"]), "no_answer_tokens": sum(no_target)}
        if not any(keep):
            shortest = min(ds["n_tokens"])
            raise UserError(
                f"--max-seq-length {limit} is shorter than every {split} row (shortest {shortest} tokens); "
                f"raise --max-seq-length to at least {shortest}" + (" or pass --long-rows truncate" if args.long_rows == "drop" else ""))
        if sum(over):
            verb = "dropping" if args.long_rows == "drop" else "cutting (their answers lose the end and <|im_end|>)"
            log.warning("%s: %s %d of %d rows longer than --max-seq-length %d (longest %d tokens)",
                        split, verb, sum(over), len(ds), limit, counts[split]["longest_tokens"])
        ds = ds.select([i for i, k in enumerate(keep) if k]).remove_columns(["n_target", "n_tokens"])
        out[split] = ds
    return out["train"], out["validation"], counts


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def linear_module_names(model) -> list[str]:
    import torch

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            leaf = name.rsplit(".", 1)[-1]
            if leaf != "lm_head":
                names.add(leaf)
    return sorted(names)


def attach_lora(model, info: dict, args):
    """Wrap the base model with fresh LoRA adapters (Unsloth's or PEFT's path)."""
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    available = linear_module_names(model)
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise UserError(f"--target-modules {unknown} not in this model; its linear modules are: {', '.join(available)}")
    if info["backend"] == "unsloth":
        from unsloth import FastLanguageModel

        return FastLanguageModel.get_peft_model(
            model, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=targets,
            bias="none", use_gradient_checkpointing={"auto": "unsloth", "unsloth": "unsloth", "on": True, "off": False}[
                args.gradient_checkpointing], random_state=args.seed, max_seq_length=args.max_seq_length,
        )
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if info.get("load_in_4bit"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing != "off",
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


PACKING_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn2",
                     "kernels-community/flash-attn3", "kernels-community/vllm-flash-attn3")


def check_packing(args, model, info: dict) -> None:
    """Packed rows share one sequence; only varlen attention keeps them from attending to each other."""
    if not args.packing or info["backend"] == "unsloth":
        return
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in PACKING_ATTENTION:
        raise UserError(f"--packing with attention {impl!r} would let packed rows attend to each other; "
                        "use the unsloth backend on a GPU, install flash-attn, or drop --packing")


def flash_varlen_available() -> bool:
    import torch

    return (torch.cuda.is_available() and torch.version.hip is None
            and torch.cuda.get_device_capability()[0] >= 8
            and getattr(torch.backends.cuda, "is_flash_attention_available", lambda: False)()
            and hasattr(torch.ops.aten, "_flash_attention_forward"))


def flash_varlen_attention():
    """torch.nn.attention.varlen.varlen_attn's call, on torch's own flash kernel.

    torch's own varlen_attn takes grouped-query heads only from 2.12 on; the aten flash op under it
    has taken cumulative sequence lengths and fewer K/V heads for much longer.
    """
    import torch

    forward_op, backward_op = torch.ops.aten._flash_attention_forward, torch.ops.aten._flash_attention_backward

    class FlashVarlen(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, left, right):
            out, lse, seed, offset, _ = forward_op(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale,
                                                   window_size_left=left, window_size_right=right)
            ctx.save_for_backward(q, k, v, cu_q, cu_k, out, lse, seed, offset)
            ctx.settings = (max_q, max_k, causal, scale, left, right)
            return out

        @staticmethod
        def backward(ctx, grad_out):
            q, k, v, cu_q, cu_k, out, lse, seed, offset = ctx.saved_tensors
            max_q, max_k, causal, scale, left, right = ctx.settings
            dq, dk, dv = backward_op(grad_out.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal,
                                     seed, offset, scale=scale, window_size_left=left, window_size_right=right)
            return dq, dk, dv, *([None] * 8)

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                    enable_gqa=False):
        if key.shape[1] != query.shape[1] and not enable_gqa:
            raise ValueError("key/value have fewer heads than query; pass enable_gqa=True")
        cu_seq_k = cu_seq_q if cu_seq_k is None else cu_seq_k
        # (-1, 0) is plain causal; any other window is passed through as the kernel's local window.
        causal = tuple(window_size) == (-1, 0)
        left, right = (-1, -1) if causal else window_size
        return FlashVarlen.apply(query, key, value, cu_seq_q, cu_seq_k, int(max_q), int(max_k), causal, scale,
                                 left, right)

    varlen_attn.reasonforge_flash_varlen = True
    return varlen_attn


INSTALLED_ROUTE = "torch flash varlen, one call per layer (UNSLOTH_TORCH_VARLEN=0 turns it off)"


def route_packed_attention(dispatch, kernel_available: bool, make_kernel=None) -> str:
    """Say how Unsloth keeps packed rows apart, first giving it a varlen kernel where it would split.

    Without flash-attn or xformers, Unsloth 2026.10 separates packed rows with torch's varlen_attn,
    which it takes from torch 2.12 on; under older torch it runs one SDPA call per run of equal-length
    documents, about eight small calls per layer at chat-like lengths. One varlen call instead gave
    1.35x and 1.46x the packed tokens/s on an H100 with torch 2.11 (benchmarks/RESULTS.md).
    """
    if getattr(dispatch, "HAS_FLASH_ATTENTION", False):
        return "flash-attn varlen"
    if not hasattr(dispatch, "_TORCH_VARLEN_ATTN"):
        return "Unsloth's own (this Unsloth has no varlen hook)"
    segments = getattr(dispatch, "_SDPA_PACKED_SEGMENTS", False)
    # Unsloth prefers torch's varlen over xformers only where torch has one (2.12+) on sm80+ cards.
    if getattr(dispatch, "HAS_XFORMERS", False) and not (segments and getattr(dispatch, "_NATIVE_BEATS_XFORMERS", False)):
        return "xformers block-diagonal"
    if not segments:
        return "SDPA over a dense block-diagonal mask (UNSLOTH_SDPA_PACKED_SEGMENTS=0 as set)"
    if getattr(dispatch._TORCH_VARLEN_ATTN, "reasonforge_flash_varlen", False):
        return INSTALLED_ROUTE
    if dispatch._TORCH_VARLEN_ATTN is not None:
        return "torch varlen_attn"
    if os.environ.get("UNSLOTH_TORCH_VARLEN", "1").lower() in ("0", "false", "no", "off"):
        return "SDPA per document (UNSLOTH_TORCH_VARLEN=0 as set)"
    if not kernel_available:
        return "SDPA per document (no flash kernel for this GPU in torch)"
    dispatch._TORCH_VARLEN_ATTN = (make_kernel or flash_varlen_attention)()
    dispatch._LEAN_VARLEN = False  # its lean path needs torch >= 2.12 helpers; ours is already one aten call
    return INSTALLED_ROUTE


def configure_packed_attention(args, model, info: dict) -> str:
    if not args.packing:
        return "not packing"
    if info["backend"] != "unsloth":
        return f"{model.config._attn_implementation} varlen (transformers)"
    from unsloth.utils import attention_dispatch

    return route_packed_attention(attention_dispatch, flash_varlen_available())


# Activation memory per token, calibrated on the lent H100 with a Qwen2.5-3B-shaped model at sequence
# length 2048 under Unsloth (benchmarks/RESULTS.md): 2.66 MiB per token without checkpointing,
# 0.17 MiB with Unsloth's offloaded checkpointing; scaled here by layer count and widths.
def activation_bytes_per_token(config, checkpointing: bool) -> float:
    layers, hidden, inter = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    if checkpointing:
        return layers * 2 * hidden * 1.2
    return layers * 2 * (10.5 * hidden + 1.6 * inter)


# Cost of one optimizer step, in token-equivalents: every micro-batch pass pays a fixed price
# (about 5,500 tokens' worth on the H100, fitted to the measured grid in benchmarks/RESULTS.md),
# twice with checkpointing since the recompute is a second forward, and checkpointing's recompute
# adds about a third to the per-token work. A profile later showed the fixed price is mostly
# kernel-launch time, not dequantisation. It was fitted with Python launchers; the alternatives
# have not been re-timed with the C++ ones (configure_compiler), which make passes cheaper.
PASS_COST_TOKENS, RECOMPUTE_FACTOR = 5500, 1.33


def plan_auto_batch(config, seq_len: int, effective: int, budget_gib: float, base_gib: float) -> dict:
    """The fastest (micro-batch, checkpointing) that fits the budget, micro-batch dividing the
    effective batch. Keeps 15% of the budget free for fragmentation and transient buffers."""
    usable = 0.85 * budget_gib
    options = []
    for checkpointing in (False, True):
        per_sample = activation_bytes_per_token(config, checkpointing) * seq_len / 2**30
        for micro in (d for d in range(effective, 0, -1) if effective % d == 0):
            predicted = base_gib + micro * per_sample
            passes = (effective // micro) * (2 if checkpointing else 1)
            cost = passes * PASS_COST_TOKENS + effective * seq_len * (RECOMPUTE_FACTOR if checkpointing else 1.0)
            options.append((predicted > usable, cost, micro, checkpointing, predicted))
    over, _, micro, checkpointing, predicted = min(options, key=lambda o: (o[0], o[0] and o[4], o[1]))
    return {"batch_size": micro, "gradient_accumulation_steps": effective // micro,
            "gradient_checkpointing": "unsloth" if checkpointing else "off", "predicted_peak_gib": round(predicted, 2),
            "budget_gib": round(budget_gib, 2), "fits": not over}


def apply_auto_batch(args, model, info: dict) -> dict | None:
    """Resolve --auto-batch (and --gpu-memory-gib) into batch size, accumulation and checkpointing."""
    import torch

    if not torch.cuda.is_available():
        if args.auto_batch:
            log.info("--auto-batch: no GPU, keeping batch %d x %d", args.batch_size, args.gradient_accumulation_steps)
        return None
    free, total = torch.cuda.mem_get_info()
    if args.gpu_memory_gib:
        fraction = min(1.0, args.gpu_memory_gib * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(fraction)
    if not args.auto_batch:
        return None
    used = torch.cuda.memory_allocated() / 2**30
    budget = args.gpu_memory_gib if args.gpu_memory_gib else used + free / 2**30
    effective = args.batch_size * args.gradient_accumulation_steps
    plan = plan_auto_batch(model.config, args.max_seq_length, effective, budget, base_gib=used + 0.5)
    if info["backend"] != "unsloth" and plan["gradient_checkpointing"] == "unsloth":
        plan["gradient_checkpointing"] = "on"
    args.batch_size, args.gradient_accumulation_steps = plan["batch_size"], plan["gradient_accumulation_steps"]
    args.gradient_checkpointing = plan["gradient_checkpointing"]
    print(f"auto-batch: {plan['budget_gib']} GiB budget -> micro-batch {args.batch_size} x accumulation "
          f"{args.gradient_accumulation_steps} (effective {effective}), checkpointing {args.gradient_checkpointing}, "
          f"predicted peak {plan['predicted_peak_gib']} GiB")
    return plan


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())
    return trainable, total


# The C++ wrapper's one-time build makes the first step slower and every later step faster. On an
# H100 pinned to 4 cores (Qwen2.5-3B shape, 2 x 4 rows of about 2,000 tokens) it repaid its build
# after 146 steps with cold compile caches and 56 with warm ones (benchmarks/RESULTS.md, cold
# start); the cold figure is the bar, so a short run on a fresh machine is never the slower for it.
CPP_WRAPPER_MIN_STEPS = 150


def planned_steps(args, train_rows: int, processes: int = 1, done: int = 0) -> int:
    """Optimizer steps this process will run: --max-steps, else the epochs over the train rows,
    less the `done` steps of a checkpoint resumed from."""
    if args.max_steps > 0:
        total = args.max_steps
    else:
        batches = math.ceil(train_rows / (args.batch_size * processes))
        total = math.ceil(math.ceil(batches / args.gradient_accumulation_steps) * args.num_epochs)
    return max(total - done, 0)


def configure_compiler(backend: str, wrapper: str = "auto", steps: int | None = None) -> str:
    """Choose Inductor's C++ or Python wrapper for the graphs Unsloth compiles; say which and why.

    At micro-batch 2 on an H100 the GPU sat idle about 40% of each step waiting for Python to launch
    kernels; the C++ wrapper launches a compiled graph's kernels without the Python loop, but its
    build makes the first step far slower. `auto` takes it only for runs long enough to repay that.
    """
    if backend != "unsloth":
        return "no compiled graphs on this backend"
    if "TORCHINDUCTOR_CPP_WRAPPER" in os.environ:
        return f"TORCHINDUCTOR_CPP_WRAPPER={os.environ['TORCHINDUCTOR_CPP_WRAPPER']} as set"
    import torch._inductor.config

    if wrapper == "python" or (wrapper == "auto" and steps is not None and steps < CPP_WRAPPER_MIN_STEPS):
        torch._inductor.config.cpp_wrapper = False
        why = "--graph-wrapper python" if wrapper == "python" else (
            f"{steps} planned steps, fewer than the {CPP_WRAPPER_MIN_STEPS} that repay the C++ wrapper's "
            "build; --graph-wrapper cpp forces it")
        return f"Python wrapper ({why})"
    compiler = next((c for c in (os.environ.get("CXX"), "g++", "clang++") if c and shutil.which(c)), None)
    if compiler is None:
        return "Python wrapper: no C++ compiler found (install g++ for faster steps on long runs)"
    torch._inductor.config.cpp_wrapper = True
    why = "--graph-wrapper cpp" if wrapper == "cpp" else f"{steps} planned steps repay its build"
    return f"C++ wrapper ({why}; {compiler}; --graph-wrapper python turns it off)"


def choose_optim(requested: str) -> tuple[str, str]:
    if requested != "auto":
        return requested, "requested"
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        return "adamw_8bit", "bitsandbytes available on CUDA"
    return "adamw_torch", "no CUDA/bitsandbytes, so 8-bit Adam is unavailable"


# ---------------------------------------------------------------------------------------------
# Checkpoints: completeness, resume, S3 mirror
# ---------------------------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def write_checkpoint_marker(ckpt: Path) -> None:
    # A copy of the run's resolved settings travels with the checkpoint, so a resume on a fresh
    # instance (checkpoint fetched from S3, no training_config.json beside it) can still compare.
    config = ckpt.parent / "training_config.json"
    if config.is_file():
        shutil.copyfile(config, ckpt / "training_config.json")
    files = {p.relative_to(ckpt).as_posix(): p.stat().st_size for p in sorted(ckpt.rglob("*"))
             if p.is_file() and p.name != CHECKPOINT_MARKER}
    utils.atomic_write_json(ckpt / CHECKPOINT_MARKER, {"step": checkpoint_step(ckpt), "files": files})


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from, or None when it is complete."""
    marker = ckpt / CHECKPOINT_MARKER
    if not marker.is_file():
        return "no completion marker (interrupted while saving)"
    try:
        files = utils.read_json(marker, "completion marker").get("files")
        utils.read_json(ckpt / "trainer_state.json", "trainer state")
    except utils.CorruptFile as exc:
        return str(exc).split(";")[0]
    if not isinstance(files, dict) or not all(isinstance(s, int) for s in files.values()):
        return f"{CHECKPOINT_MARKER} has no valid file list (damaged)"
    for rel, size in files.items():
        f = ckpt / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} is {f.stat().st_size} bytes, expected {size} (truncated)"
    weights = ckpt / "adapter_model.safetensors"
    if not weights.is_file():
        return "adapter_model.safetensors is missing"
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as fh:
            # A run that diverged saves NaN weights as readily as good ones; resuming them goes nowhere.
            diverged = [k for k in fh.keys() if not fh.get_tensor(k).isfinite().all()]
    except Exception as exc:
        return f"adapter_model.safetensors is unreadable ({utils.first_line(exc, 120)})"
    if diverged:
        return f"adapter weights hold NaN or inf ({len(diverged)} tensors, e.g. {diverged[0]}): the run had diverged"
    return None


def last_good_checkpoint(output_dir: Path) -> Path | None:
    good = [p for p in local_checkpoints(output_dir) if checkpoint_problem(p) is None]
    return good[-1] if good else None


def local_checkpoints(output_dir: Path) -> list[Path]:
    return sorted((p for p in output_dir.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) >= 0), key=checkpoint_step)


def s3_run_uri(args) -> utils.S3Uri | None:
    if not args.s3_bucket or args.skip_s3_upload:
        return None
    return utils.S3Uri(args.s3_bucket, f"adapters/{args.run_name}")


def upload_checkpoint(ckpt: Path, run_uri: utils.S3Uri) -> None:
    """Upload a checkpoint with its marker last, so a listing never shows a half-uploaded one as complete."""
    dest = run_uri.join("checkpoints", ckpt.name)
    marker = utils.read_json(ckpt / CHECKPOINT_MARKER, "completion marker")
    utils.upload_directory(ckpt, dest, desc=f"s3 {ckpt.name}", progress=False, exclude={CHECKPOINT_MARKER})
    utils.s3_put_json(dest.join(CHECKPOINT_MARKER), marker)


def s3_complete_checkpoints(run_uri: utils.S3Uri) -> list[int]:
    steps = []
    for name in utils.list_s3_subfolders(run_uri.join("checkpoints")):
        step = checkpoint_step(Path(name))
        if step < 0:
            continue
        try:
            marker = utils.s3_get_json(run_uri.join("checkpoints", name, CHECKPOINT_MARKER))
        except utils.CorruptFile as exc:
            log.warning("skipping %s on S3: %s", name, exc)
            continue
        if marker is not None:
            steps.append(step)
    return sorted(steps)


def download_checkpoint(run_uri: utils.S3Uri, step: int, output_dir: Path) -> Path:
    final = output_dir / f"checkpoint-{step}"
    with utils.atomic_directory(final, is_checkpoint, "a checkpoint folder") as tmp:
        utils.download_prefix(run_uri.join("checkpoints", final.name), tmp, desc=f"fetch {final.name}")
    return final


def is_checkpoint(folder: Path) -> bool:
    return any((folder / name).is_file() for name in (CHECKPOINT_MARKER, "trainer_state.json", "adapter_config.json"))


def resolve_resume(args, output_dir: Path) -> str | None:
    """Turn --resume-from-checkpoint into a complete local checkpoint folder (or None to start fresh)."""
    spec = args.resume_from_checkpoint
    if spec is None:
        return None
    if spec != "latest":
        path = Path(spec)
        if not path.is_dir():
            raise UserError(f"--resume-from-checkpoint {spec!r} is not a folder; pass a checkpoint-N folder or 'latest'")
        problem = checkpoint_problem(path)
        if problem:
            raise UserError(f"cannot resume from {spec}: {problem}; pick an older checkpoint or 'latest'")
        return str(path)
    candidates = {checkpoint_step(p): ("local", p) for p in local_checkpoints(output_dir)}
    run_uri = s3_run_uri(args)
    if run_uri is not None:
        for step in s3_complete_checkpoints(run_uri):
            candidates.setdefault(step, ("s3", step))
    for step in sorted(candidates, reverse=True):
        where, ref = candidates[step]
        path = ref if where == "local" else download_checkpoint(run_uri, step, output_dir)
        problem = checkpoint_problem(path)
        if problem is None:
            log.info("resuming from %s (%s, step %d)", path, where, step)
            fetch_best_checkpoint(path, run_uri, output_dir)
            return str(path)
        log.warning("skipping %s: %s; trying the previous checkpoint", path, problem)
    log.warning("--resume-from-checkpoint latest: no complete checkpoint in %s%s; starting from scratch",
                output_dir, f" or {run_uri}" if run_uri else "")
    return None


def fetch_best_checkpoint(ckpt: Path, run_uri, output_dir: Path) -> None:
    """The Trainer reloads the best checkpoint at the end; on a fresh instance it must be fetched too."""
    state = utils.read_json(ckpt / "trainer_state.json", "trainer state")
    best = state.get("best_model_checkpoint")
    if not best:
        return
    local = output_dir / Path(best).name
    if not local.is_dir() and run_uri is not None:
        download_checkpoint(run_uri, checkpoint_step(local), output_dir)
    state["best_model_checkpoint"] = str(local)
    utils.atomic_write_json(ckpt / "trainer_state.json", state)
    marker = utils.read_json(ckpt / CHECKPOINT_MARKER, "completion marker")
    marker["files"]["trainer_state.json"] = (ckpt / "trainer_state.json").stat().st_size
    utils.atomic_write_json(ckpt / CHECKPOINT_MARKER, marker)


# What a resume cannot change: the adapter's shape, the tokens the checkpoint was trained on, and
# the optimizer whose state it holds. Loading it under other values crashes (shapes, optimizer
# state) or quietly trains on other data than the first part of the run.
FIXED_ON_RESUME = {"model_name": "--model-name", "lora_r": "--lora-r", "lora_alpha": "--lora-alpha",
                   "lora_dropout": "--lora-dropout", "target_modules": "--target-modules",
                   "max_seq_length": "--max-seq-length", "packing": "--packing"}
# What a resume can change, and what the change does. In transformers 5.17 the restored optimizer
# brings back its param groups (learning rate, weight decay) and the restored LambdaLR its base
# learning rates, while the schedule's shape (warmup, decay, total steps) is rebuilt from this run's
# arguments; the data position is recomputed as global_step % steps-per-epoch.
RESHAPED = ("; the schedule's shape is rebuilt on the checkpoint's base learning rate from the second resumed step "
            "on (the first uses the rate the checkpoint's schedule had reached)")
CHANGEABLE_ON_RESUME = {
    "learning_rate": ("--learning-rate", "kept", "the restored optimizer and scheduler keep {old}'s schedule"),
    "weight_decay": ("--weight-decay", "kept", "the restored optimizer keeps weight decay {old}"),
    "warmup_steps": ("--warmup-steps", "applied", "takes effect" + RESHAPED),
    "lr_scheduler": ("--lr-scheduler", "applied", "takes effect" + RESHAPED),
    "max_steps": ("--max-steps", "applied", "takes effect: training ends at the new length" + RESHAPED),
    "num_epochs": ("--num-epochs", "applied", "takes effect: training ends at the new length" + RESHAPED),
    "seed": ("--seed", "applied", "takes effect on the data order: the shuffle follows --seed, so rows of the "
                                  "current epoch are repeated or skipped"),
    "train_on_responses_only": ("--train-on-responses-only", "applied", "takes effect: the loss now covers other tokens"),
    "save_steps": ("--save-steps", "applied", "takes effect"),
    "eval_steps": ("--eval-steps", "applied", "takes effect"),
    "logging_steps": ("--logging-steps", "applied", "takes effect"),
    "save_total_limit": ("--save-total-limit", "applied", "takes effect"),
    "early_stopping_patience": ("--early-stopping-patience", "applied", "takes effect"),
    "gradient_checkpointing": ("--gradient-checkpointing", "applied", "takes effect (memory and speed only)"),
    "load_in_4bit": ("4-bit loading", "applied", "takes effect: the base weights are loaded at the new precision"),
}


def _setting(config: dict, key: str):
    value = config.get("arguments", {}).get(key)
    if key == "target_modules" and isinstance(value, str):
        return sorted(t.strip() for t in value.split(",") if t.strip())
    return value


def _shown(value) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)


def recorded_config(ckpt: Path, output_dir: Path) -> dict | None:
    """The settings `ckpt` was trained with: its own copy, else (older checkpoints) the run's."""
    for path in (ckpt / "training_config.json", output_dir / "training_config.json"):
        if path.is_file():
            return json.loads(path.read_text())
    return None


def resume_differences(config: dict, recorded: dict) -> tuple[list[str], list[dict]]:
    """(settings that forbid the resume, notes on settings that differ but may), each in words."""
    refused = [f"{flag} {_shown(_setting(config, key))} (checkpoint: {_shown(_setting(recorded, key))})"
               for key, flag in FIXED_ON_RESUME.items() if _setting(config, key) != _setting(recorded, key)]
    for key, flag in (("optim", "--optim"), ("dataset_manifest_sha256", "dataset content"),
                      ("chat_template_sha256" if "chat_template_sha256" in recorded else "chat_template", "chat template")):
        now, then = config.get(key), recorded.get(key)
        if now is not None and then is not None and now != then:
            shown = (now[:12], then[:12]) if key.endswith("sha256") else (now, then)
            refused.append(f"{flag} {shown[0]} (checkpoint: {shown[1]})")
    notes = []

    def batch(cfg):  # (shown, effective) of micro-batch x accumulation x processes
        micro, accum = _setting(cfg, "batch_size") or 0, _setting(cfg, "gradient_accumulation_steps") or 0
        procs = cfg.get("processes") or 1
        return f"{micro} x {accum}" + (f" x {procs}" if procs > 1 else ""), micro * accum * procs

    (new_shown, new_effective), (old_shown, old_effective) = batch(config), batch(recorded)
    if new_shown != old_shown and old_effective:
        effect = ("takes effect; same effective batch, so the loss curve continues unchanged" if new_effective == old_effective
                  else "takes effect, but the position in the data is recomputed from the step count, so rows of "
                       "the current epoch are repeated or skipped")
        notes.append({"setting": "effective batch", "checkpoint": old_effective, "now": new_effective, "effect": effect,
                      "text": f"batch (--batch-size x --gradient-accumulation-steps x processes) {new_shown} differs "
                              f"from the checkpoint's {old_shown}: {effect}"})
    for key, (flag, kind, effect) in CHANGEABLE_ON_RESUME.items():
        now, then = _setting(config, key), _setting(recorded, key)
        if key not in recorded.get("arguments", {}) or now == then:
            continue
        effect = effect.format(old=then)
        notes.append({"setting": key, "checkpoint": then, "now": now, "kept": kind == "kept", "effect": effect,
                      "text": f"{flag} {now} differs from the checkpoint's {then}: {effect}"})
    return refused, notes


def check_resume_settings(config: dict, ckpt: Path, output_dir: Path, announce: bool = True) -> dict:
    """Refuse a resume whose settings cannot apply to `ckpt`; say what the others do.

    Returns the config to record: values the checkpoint keeps regardless (learning rate, weight
    decay) are recorded as the checkpoint's, so training_config.json says what actually ran.
    """
    recorded = recorded_config(ckpt, output_dir)
    if recorded is None:
        if announce:
            log.warning("%s records no settings (training_config.json): resuming without comparing them", ckpt)
        return config
    refused, notes = resume_differences(config, recorded)
    if refused:
        raise UserError(
            f"cannot resume from {ckpt}: {'; '.join(refused)}. These fix the adapter's shape, its data or its "
            "optimizer state: resume with the checkpoint's values, or start a new run (a new --output-dir "
            "without --resume-from-checkpoint)"
        )
    config = json.loads(json.dumps(config, default=str))
    for note in notes:
        if announce:
            log.warning(note.pop("text"))
        else:
            note.pop("text")
        if note.get("kept"):
            config["arguments"][note["setting"]] = note["checkpoint"]
    config["resumed_from"] = {"checkpoint": str(ckpt), "step": checkpoint_step(ckpt), "differences": notes}
    return config


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


def sft_trainer_class():
    """TRL's SFTTrainer with a token-weighted validation loss (see below), using the model's own loss
    where TRL's fused head cannot run: CPU builds of torch ship no Triton for TRL's chunked kernel,
    and the model's cross-entropy over the same labels gives the same token-level mean."""
    import torch
    from transformers import Trainer
    from trl import SFTTrainer
    from trl.trainer import utils as trl_utils

    fused_head = getattr(trl_utils, "_ChunkedLogProbFunction", None) is not None

    class ReasonForgeSFTTrainer(SFTTrainer):
        """The stock eval_loss is a mean of per-batch means, so a batch of short answers weighs as
        much as one of long answers and the number moves with the eval batch size. The best
        checkpoint is chosen here on sum(NLL) / sum(target tokens) instead: the quantity
        evaluate_model.py reports as log-perplexity."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if fused_head:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            if loss is not None and "labels" in inputs:
                # The batch loss is a mean over its shifted target tokens; times their count it is their NLL.
                targets = (inputs["labels"][..., 1:] != -100).sum().to(loss.device)
                self._eval_sums += torch.stack([loss.detach().float() * targets, targets.float()])
            return loss, logits, labels

        def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                            metric_key_prefix="eval"):
            self._eval_sums = torch.zeros(2, device=self.args.device)
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            nll, tokens = self.accelerator.reduce(self._eval_sums, reduction="sum").tolist()
            if tokens > 0:
                output.metrics[f"{metric_key_prefix}_loss"] = nll / tokens
                output.metrics[f"{metric_key_prefix}_target_tokens"] = int(tokens)
            return output

    return ReasonForgeSFTTrainer


def build_trainer(model, tokenizer, train_ds, eval_ds, args, precision: dict, optim: str):
    from trl import SFTConfig

    eval_steps = args.eval_steps or args.save_steps
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(args.output_dir) / "logs")
    config = SFTConfig(
        output_dir=args.output_dir, run_name=args.run_name, seed=args.seed, data_seed=args.seed,
        num_train_epochs=args.num_epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, lr_scheduler_type=args.lr_scheduler,
        optim=optim, logging_steps=args.logging_steps, report_to=["tensorboard"],
        eval_strategy="steps", eval_steps=eval_steps, save_strategy="steps", save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, load_best_model_at_end=True, metric_for_best_model="eval_loss",
        greater_is_better=False, max_length=args.max_seq_length, packing=args.packing,
        padding_free=args.packing, dataset_kwargs={"skip_prepare_dataset": not args.packing},
        gradient_checkpointing=precision["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False} if precision["gradient_checkpointing"] else None,
        bf16=precision["bf16"], fp16=precision["fp16"], use_cpu=precision["use_cpu"],
        include_num_input_tokens_seen="non_padding", disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0, save_only_model=False, ddp_find_unused_parameters=False,
        # The default replaces a NaN loss by the running mean in the logs, hiding a diverged run from StopOnNonFinite.
        logging_nan_inf_filter=False,
    )
    from reasonforge.callbacks import CheckpointSync, EvalAtEpochEnd, StepLogger, StopOnNonFinite

    callbacks = [StepLogger(Path(args.output_dir) / "logs" / "metrics.jsonl"),
                 StopOnNonFinite(last_good_checkpoint),
                 EvalAtEpochEnd(),
                 CheckpointSync(s3_run_uri(args), write_checkpoint_marker, upload_checkpoint)]
    if args.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience))
    trainer = sft_trainer_class()(model=model, args=config, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, callbacks=callbacks)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    # StepLogger prints one readable line per step; the stock printers would dump raw dicts beside it.
    for stock in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(stock)
    return trainer


def precision_plan(info: dict, checkpointing: str = "auto") -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"bf16": False, "fp16": False, "use_cpu": True, "gradient_checkpointing": checkpointing == "on"}
    bf16 = torch.cuda.is_bf16_supported()
    # Unsloth sets up its own checkpointing in get_peft_model; the Trainer must not add another layer of it.
    hf_ckpt = info["backend"] == "hf" and checkpointing != "off"
    return {"bf16": bf16, "fp16": not bf16, "use_cpu": False, "gradient_checkpointing": hf_ckpt}


# ---------------------------------------------------------------------------------------------
# Preemption: SIGTERM saves a checkpoint at the current step, then stops
# ---------------------------------------------------------------------------------------------

SIGTERM_EXIT = 143  # 128 + SIGTERM, what a shell reports for a process the signal ended


def resume_command(argv: list[str] | None) -> str:
    """This run's command line with `--resume-from-checkpoint latest` in place of any resume flag."""
    args, skip = [], False
    for a in (sys.argv[1:] if argv is None else list(argv)):
        if skip:
            skip = False
        elif a == "--resume-from-checkpoint":
            skip = True
        elif not a.startswith("--resume-from-checkpoint="):
            args.append(a)
    script = sys.argv[0] if sys.argv[0].endswith("train_lora.py") else "train_lora.py"
    launcher = ["python"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        launcher = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', os.environ['WORLD_SIZE'])}"]
    return shlex.join([*launcher, script, *args, "--resume-from-checkpoint", "latest"])


class PreemptionGuard:
    """What SIGTERM does to this process.

    Outside the training loop it raises utils.Terminated at once (nothing is half-written there
    that a scratch folder does not clean up). Inside it, the handler only records the request:
    tensors and files are mid-update, so StopOnSigterm asks the Trainer to save at the next safe
    point (end of the step, end or inside of a validation pass, right after a checkpoint upload)
    and then stops. A step can outlast the notice (the first one compiles for minutes on a fresh
    GPU instance), so a watchdog exits on its own once `deadline_s` passes with no save begun.
    """

    def __init__(self, args, argv, output_dir: Path, deadline_s: float, main_rank: bool = True):
        self.argv, self.output_dir, self.deadline_s, self.main_rank = argv, output_dir, deadline_s, main_rank
        self.run_uri = s3_run_uri(args)
        self.phase = "setup"  # then "training", then "finishing"
        self.requested = False
        self.saving = False
        self.watchdog = None

    def install(self) -> None:
        """Take over SIGTERM from cli_entry's handler (which puts the original back when main returns)."""
        import signal

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        if self.phase == "setup":
            raise utils.Terminated(self.message(None, "before the training loop began"))
        if self.phase == "finishing":
            raise utils.Terminated(self.message(None, "after the last step, before the final outputs were complete"))
        if self.requested:
            return
        self.requested = True
        if self.main_rank:
            print(f"SIGTERM: saving a checkpoint at the next safe point (end of this step or validation batch), "
                  f"then stopping (watchdog: {self.deadline_s:g} s)", file=sys.stderr, flush=True)
        self.watchdog = threading.Timer(self.deadline_s, self.expire)
        self.watchdog.daemon = True
        self.watchdog.start()

    def stand_down(self) -> None:
        """The training loop is over (stopped, finished or failed): the watchdog has nothing left to
        guard, and firing later it would kill whatever the process does next."""
        if self.watchdog is not None:
            self.watchdog.cancel()

    def expire(self) -> None:
        if self.saving or self.phase != "training":
            return  # a checkpoint is being written, or the loop is over: cutting it short would gain nothing
        if self.main_rank:
            print(self.message(None, f"no checkpoint could begin within {self.deadline_s:g} s (a step was still "
                                     "running)"), file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(SIGTERM_EXIT)  # the main thread is busy in a step; no exception can reach it in time

    def stop_requested(self) -> bool:
        """The request, agreed by every rank: they must stop at the same step or the collectives hang."""
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            flag = torch.tensor([int(self.requested)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.requested = bool(flag.item())
        return self.requested

    def newest_complete(self) -> Path | None:
        return last_good_checkpoint(self.output_dir)

    def message(self, saved: Path | None, why: str = "") -> str:
        if not self.main_rank:
            return "stopped by SIGTERM"
        if saved is not None:
            where = f"{saved}" + (f" and {self.run_uri.join('checkpoints', saved.name)}" if self.run_uri else "")
            head = f"stopped by SIGTERM at step {checkpoint_step(saved)}: checkpoint saved to {where}"
        else:
            newest = self.newest_complete()
            head = (f"stopped by SIGTERM {why}; " + (f"the newest complete checkpoint is {newest}" if newest else
                                                     "no checkpoint of this run exists yet"))
        return f"{head}\nresume with:\n  {resume_command(self.argv)}"


def train_or_stop(trainer, resume: str | None, guard: PreemptionGuard):
    """trainer.train(), with SIGTERM served as a checkpoint and utils.Terminated."""
    from reasonforge.callbacks import EvaluationStopped

    guard.phase = "training"
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except EvaluationStopped:
        # The step's weights, optimizer and scheduler are whole; only the validation pass was cut
        # short, so the checkpoint is the one the step's end would have written.
        trainer._save_checkpoint(trainer.model, trial=None)
        trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)
        raise  # not reached: StopOnSigterm.on_save raises Terminated
    finally:
        guard.phase = "finishing"
        guard.stand_down()
    if guard.requested:
        # The signal came after the last step (while the Trainer wrapped up); the final outputs
        # might not finish within the notice, and the newest checkpoint is the resume point.
        raise utils.Terminated(guard.message(None, "after the last step, before the final outputs were complete"))
    return result


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def is_training_run(folder: Path) -> bool:
    """An earlier (or a running) train_lora.py output folder, which a new run may write into."""
    return (any((folder / name).is_file() for name in ("training_config.json", utils.RunLock.NAME))
            or bool(local_checkpoints(folder)) or is_final_model(folder / "final_model"))


def is_final_model(folder: Path) -> bool:
    return utils.holds_json(folder, utils.RUN_INFO_FILE, "base_model")


def is_merged_model(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def run_dir_problem(output_dir: Path) -> str | None:
    """Why a run may not write into `output_dir`: only a new, empty or earlier run folder will do,
    and the final_model/ and merged_16bit/ it replaces at the end must be ours too."""
    problem = utils.output_dir_problem(output_dir, is_training_run, "a train_lora.py run folder", replaced=False)
    if problem or not output_dir.is_dir():
        return problem
    return (utils.output_dir_problem(output_dir / "final_model", is_final_model, "an adapter saved by train_lora.py")
            or utils.output_dir_problem(output_dir / "merged_16bit", is_merged_model, "a merged model saved by train_lora.py"))


def save_final_model(trainer, tokenizer, args, run_info: dict) -> Path:
    """Write final_model/ (adapter, tokenizer with the training template, run info) atomically."""
    final = Path(args.output_dir) / "final_model"
    with utils.atomic_directory(final, is_final_model, "an adapter saved by train_lora.py") as tmp:
        trainer.model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        utils.atomic_write_json(tmp / utils.RUN_INFO_FILE, run_info)
    if args.save_merged:
        merged = Path(args.output_dir) / "merged_16bit"
        with utils.atomic_directory(merged, is_merged_model, "a merged model saved by train_lora.py") as tmp:
            save_merged(trainer.model, tokenizer, tmp, run_info["backend"])
    return final


def save_merged(model, tokenizer, target: Path, backend: str) -> None:
    if backend == "unsloth":
        model.save_pretrained_merged(str(target), tokenizer, save_method="merged_16bit")
        return
    merged = model.merge_and_unload() if not getattr(model, "is_loaded_in_4bit", False) else None
    if merged is None:
        raise UserError("--save-merged with --backend hf in 4-bit is not supported; use the unsloth backend or --no-4bit")
    merged.save_pretrained(str(target), safe_serialization=True)
    tokenizer.save_pretrained(str(target))


def plot_losses(history: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not train:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def collect_metrics(trainer, train_result, params: tuple[int, int], runtime: float) -> dict:
    state = trainer.state
    history = state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    tokens = state.num_input_tokens_seen
    return {
        "global_step": state.global_step,
        "epochs": state.epoch,
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_last": train_losses[-1] if train_losses else None,
        "train_loss_mean": train_result.training_loss,
        "validation_losses": [{"step": h["step"], "loss": h["eval_loss"]} for h in evals],
        "best_validation_loss": state.best_metric,
        "best_checkpoint": state.best_model_checkpoint,
        "runtime_s": round(runtime, 2),
        "tokens_seen": tokens,
        "tokens_per_s": round(tokens / runtime, 1) if runtime > 0 else None,
        **step_clock(trainer),
        "peak_gpu_memory_gib": round(utils.gpu_memory_stats().get("peak_gib", 0.0), 3),
        "trainable_parameters": params[0],
        "total_parameters": params[1],
        "trainable_percent": round(100 * params[0] / max(params[1], 1), 4),
        "history": history,
    }


def step_clock(trainer) -> dict:
    """Time to first step, setup, first step and steady tokens/s, from the run's StepLogger."""
    from reasonforge.callbacks import StepLogger

    logger = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StepLogger)), None)
    return logger.clock.summary() if logger is not None else {}


def preflight_hub(repo: str | None) -> None:
    """Fail before training, not after it, when the Hub push cannot work."""
    if not repo:
        return
    from huggingface_hub import HfApi
    from huggingface_hub.utils import get_token

    if not get_token():
        raise UserError(f"--push-to-hub {repo}: no Hugging Face token; run `hf auth login` or set HF_TOKEN")
    try:
        HfApi().whoami()
    except Exception as exc:
        raise UserError(f"--push-to-hub {repo}: the Hub is unreachable or the token is invalid ({type(exc).__name__}); "
                        "check network and HF_TOKEN, or drop --push-to-hub") from exc


def push_to_hub(final: Path, repo: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, exist_ok=True, private=True)
    api.upload_folder(folder_path=str(final), repo_id=repo, commit_message="Upload LoRA adapter (ReasonForge train)")


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------


def default_run_name(args) -> str:
    """--run-name, else the output folder's name (main() uses the same)."""
    if args.run_name is not None:
        return args.run_name
    try:
        return Path(args.output_dir).resolve().name
    except RuntimeError:  # a symlink loop (Python 3.11); run_dir_problem reports it
        return Path(args.output_dir).name


def print_setup(args, info, dd, train_ds, eval_ds, params, optim, optim_reason, template_name, processes=1):
    trainable, total = params
    eff = args.batch_size * args.gradient_accumulation_steps * processes
    print("=" * 72)
    print(f"Model:      {args.model_name}  [backend {info['backend']}: {info['backend_reason']}]")
    print(f"Precision:  {info.get('dtype')}, 4-bit {'on' if info.get('load_in_4bit') else 'off'}; "
          f"compiled graphs: {info.get('compiler', 'n/a')}")
    if args.packing:
        print(f"Packing:    best-fit rows of {args.max_seq_length} tokens; attention {info.get('packed_attention')}")
        if info["backend"] == "unsloth" and not args.auto_batch:
            # Unsloth keeps packed layers out of its compiled blocks, so each pass pays eager launch cost.
            print("            packed passes are launch-bound: --auto-batch (fewer, larger passes) measured "
                  "about 2.7x the tokens/s on an H100")
    print(f"Dataset:    {args.dataset_path}: train {len(train_ds)} / validation {len(eval_ds)} rows "
          f"(template {template_name}, loss on {'assistant tokens' if args.train_on_responses_only else 'all tokens'})")
    rows = info.get("rows", {})
    over = {k: rows[k]["over_max_seq_length"] for k in ("train", "validation") if rows.get(k, {}).get("over_max_seq_length")}
    if over:
        verb = "dropped" if args.long_rows == "drop" else "cut to fit"
        print(f"Long rows:  {', '.join(f'{n} {k}' for k, n in over.items())} rows over {args.max_seq_length} tokens "
              f"{verb} (--long-rows {args.long_rows})")
    print(f"Training:   epochs {args.num_epochs}, max steps {args.max_steps}, batch {args.batch_size} x accum "
          f"{args.gradient_accumulation_steps}{f' x {processes} processes' if processes > 1 else ''} = {eff}, lr {args.learning_rate} ({args.lr_scheduler}), "
          f"optim {optim} ({optim_reason})")
    print(f"LoRA:       r {args.lora_r}, alpha {args.lora_alpha}, dropout {args.lora_dropout}, targets {args.target_modules}")
    print(f"Parameters: {trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.3f}%)")
    print(utils.format_memory_stats(utils.gpu_memory_stats()))
    print("=" * 72)


def training_config(args, info, manifest, template_name, optim) -> dict:
    cfg = {"arguments": vars(args).copy(), "backend": info["backend"], "backend_reason": info["backend_reason"],
           "dtype": info.get("dtype"), "load_in_4bit": info.get("load_in_4bit"), "compiler": info.get("compiler"),
           "packed_attention": info.get("packed_attention"), "optim": optim, "rows": info.get("rows"),
           "chat_template": template_name, "dataset_manifest_sha256": manifest.get("content_sha256"),
           "dataset_source": manifest.get("source"), "versions": utils.library_versions(),
           "gpu": utils.gpu_memory_stats()}
    return utils.redact_secrets(cfg)


def distributed_state():
    """Accelerate's process state: rank 0 alone prints, writes and uploads under accelerate/torchrun."""
    import torch
    from accelerate import PartialState

    # On CPU, torchrun/accelerate workers only form a (gloo) group when told they run on CPU.
    return PartialState(cpu=not torch.cuda.is_available())


def resume_on_all_ranks(args, output_dir: Path, state) -> str | None:
    """Rank 0 finds (and, from S3, downloads) the checkpoint; the others wait and take the same one."""
    resume = resolve_resume(args, output_dir) if state.is_main_process else None
    state.wait_for_everyone()
    if not state.is_main_process and args.resume_from_checkpoint:
        complete = [p for p in local_checkpoints(output_dir) if checkpoint_problem(p) is None]
        resume = str(complete[-1]) if args.resume_from_checkpoint == "latest" and complete else (
            args.resume_from_checkpoint if args.resume_from_checkpoint != "latest" else None)
    return resume


def finish_run(trainer, tokenizer, args, info, manifest, template_name, result, params, runtime) -> None:
    """Rank 0: final adapter, metrics, plot, uploads and the closing summary."""
    output_dir = Path(args.output_dir)
    run_info = {"base_model": args.model_name, "backend": info["backend"], "chat_template": template_name,
                "max_seq_length": args.max_seq_length, "train_on_responses_only": args.train_on_responses_only,
                "long_rows": args.long_rows,
                "dataset_manifest_sha256": manifest.get("content_sha256"), "best_checkpoint": trainer.state.best_model_checkpoint,
                "best_validation_loss": trainer.state.best_metric, "global_step": trainer.state.global_step,
                "load_in_4bit": info.get("load_in_4bit")}
    final = save_final_model(trainer, tokenizer, args, run_info)
    metrics = collect_metrics(trainer, result, params, runtime)
    utils.atomic_write_json(output_dir / "training_metrics.json", metrics)
    plotted = plot_losses(metrics["history"], output_dir / "loss_curve.png")

    run_uri = s3_run_uri(args)
    if run_uri is not None:
        utils.upload_directory(final, run_uri.join("final_model"), desc="upload final_model")
        for name in ("training_config.json", "training_metrics.json", "loss_curve.png"):
            if (output_dir / name).is_file():
                utils.upload_file(output_dir / name, run_uri.join(name))
    if args.push_to_hub:
        push_to_hub(final, args.push_to_hub)

    print("=" * 72)
    print(f"Steps: {metrics['global_step']}, train loss {utils.sig4(metrics['train_loss_first'])} -> "
          f"{utils.sig4(metrics['train_loss_last'])}, best validation loss {utils.sig4(metrics['best_validation_loss'])} "
          f"({Path(str(metrics['best_checkpoint'])).name})")
    steady = metrics.get("steady_tokens_per_s")
    print(f"Time: first step {utils.sig4(metrics.get('time_to_first_step_s'))} s after start "
          f"(the step itself {utils.sig4(metrics.get('first_step_s'))} s); then "
          + (f"{steady:,.0f} tokens/s steady over {metrics['steady_steps']} steps" if steady else
             "too few steps for a steady rate")
          + f"; training loop {metrics['runtime_s']:.1f} s in all")
    print(utils.format_memory_stats(utils.gpu_memory_stats()))
    print(f"Adapter: {final.resolve()}" + (f"\nLoss curve: {(output_dir / 'loss_curve.png').resolve()}" if plotted else ""))
    if run_uri is not None:
        print(f"S3 URI: {run_uri.join('final_model')}")
    if args.push_to_hub:
        print(f"Hub: https://huggingface.co/{args.push_to_hub}")


@utils.cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    utils.setup_logging(args.verbose)
    validate_args(args)
    args.run_name = args.run_name or Path(args.output_dir).resolve().name
    output_dir = Path(args.output_dir)
    backend, backend_reason = utils.choose_backend(args.backend)
    if backend == "unsloth":
        utils.import_unsloth_first()  # before datasets/transformers/peft are imported, so its patches apply
    check_trainer_names(args)
    state = distributed_state()
    main_rank = state.is_main_process
    guard = PreemptionGuard(args, argv, output_dir, args.sigterm_deadline_s, main_rank)
    guard.install()
    preflight_hub(args.push_to_hub)

    if main_rank:
        # One run per folder: two would interleave checkpoints and metrics. Released by cli_entry.
        output_dir.mkdir(parents=True, exist_ok=True)
        utils.RunLock(output_dir).acquire()
        if s3_run_uri(args) is not None:
            utils.check_s3_bucket(args.s3_bucket, "upload")

    dd, manifest = utils.load_prepared_dataset(resolve_dataset_path(args))
    import torch
    from transformers import set_seed

    set_seed(args.seed)
    model, tokenizer, info = utils.load_model(args.model_name, backend=backend, max_seq_length=args.max_seq_length,
                                              load_in_4bit=args.load_in_4bit, trust_remote_code=args.trust_remote_code)
    info.update(backend_reason=backend_reason)
    if main_rank:
        print(f"after model load: {utils.format_memory_stats(utils.gpu_memory_stats())}")
    check_packing(args, model, info)
    info["packed_attention"] = configure_packed_attention(args, model, info)
    auto_plan = apply_auto_batch(args, model, info)
    template_name, template_source = choose_template(args, manifest, tokenizer)
    train_ds, eval_ds, row_counts = tokenize_splits(dd, tokenizer, template_source, args)
    info["rows"] = row_counts
    model = attach_lora(model, info, args)
    params = count_parameters(model)
    optim, optim_reason = choose_optim(args.optim)
    resume = resume_on_all_ranks(args, output_dir, state)
    steps = planned_steps(args, len(train_ds), state.num_processes, checkpoint_step(Path(resume)) if resume else 0)
    info["compiler"] = configure_compiler(backend, args.graph_wrapper, steps)
    if main_rank:
        print_setup(args, info, dd, train_ds, eval_ds, params, optim, optim_reason, template_name, state.num_processes)
    config = training_config(args, info, manifest, template_name, optim)
    config.update(auto_batch_plan=auto_plan, processes=state.num_processes,
                  chat_template_sha256=hashlib.sha256(template_source.encode()).hexdigest())
    if resume:  # every rank checks, so that all of them refuse together
        config = check_resume_settings(config, Path(resume), output_dir, announce=main_rank)
    if main_rank:
        utils.atomic_write_json(output_dir / "training_config.json", config)
    trainer = build_trainer(model, tokenizer, train_ds, eval_ds, args, precision_plan(info, args.gradient_checkpointing), optim)
    from reasonforge.callbacks import StopOnSigterm

    trainer.add_callback(StopOnSigterm(guard))  # last, so that its on_save follows CheckpointSync's upload
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train_or_stop(trainer, resume, guard)
    runtime = time.perf_counter() - start
    if main_rank:
        finish_run(trainer, tokenizer, args, info, manifest, template_name, result, params, runtime)
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
