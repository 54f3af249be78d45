"""Batch planning of a training run: micro-batch and accumulation (--auto-batch), the decoder layers kept
out of gradient checkpointing, the Trainer's precision switches, and the steps and micro-batch sizes they give."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

log = logging.getLogger("reasonforge.train")


# ---------------------------------------------------------------------------------------------
# Batch: micro-batch, accumulation and checkpointing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPlan:
    """Micro-batch, accumulation and checkpointing a run trains with: the flags', or --auto-batch's pick."""

    batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: str
    auto: dict | None = None  # plan_auto_batch's record, where --auto-batch chose


# Activation memory per token, fitted to peak memory measured with a Qwen2.5-3B-shaped model at
# sequence length 2048 under Unsloth, with and without its offloaded checkpointing
# (benchmarks/RESULTS.md), and scaled here by layer count and widths.
def activation_bytes_per_token(config, checkpointing: bool) -> float:
    layers, hidden, inter = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    if checkpointing:
        return layers * 2 * hidden * 1.2
    return layers * 2 * (10.5 * hidden + 1.6 * inter)


# Cost of one optimizer step, in token-equivalents: every micro-batch pass pays a fixed price (mostly
# kernel-launch time), twice with checkpointing since the recompute is a second forward, and the
# recompute adds to the per-token work. Both constants are fitted to a grid measured with Python
# launchers (benchmarks/RESULTS.md); the C++ ones (graph_wrapper) make a pass cheaper, so under them
# the planner leans towards fewer, larger passes than it needs to.
PASS_COST_TOKENS, RECOMPUTE_FACTOR = 5500, 1.33

# Memory plans (--auto-batch's and the kept layers') fill this share of their budget, leaving the rest
# to fragmentation and transient buffers, and count this much beside the model for the CUDA context's
# workspaces, LoRA weights, gradients and optimizer state.
USABLE_SHARE, BESIDE_MODEL_GIB = 0.85, 0.5


def plan_auto_batch(config, seq_len: int, effective: int, budget_gib: float, base_gib: float) -> dict:
    """The fastest (micro-batch, checkpointing) that fits the budget, micro-batch dividing the
    effective batch. Keeps 1 - USABLE_SHARE of the budget free for fragmentation and transient buffers."""
    usable = USABLE_SHARE * budget_gib
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


def choose_batch(config, model, backend: str, changes) -> BatchPlan:
    """The run's BatchPlan: the flags', or --auto-batch's pick from the GPU's free memory (or
    --gpu-memory-gib, which also caps this process's GPU memory through `changes`, the run's
    ProcessChanges, until the run ends), keeping the effective batch."""
    import torch

    asked = BatchPlan(config.batch_size, config.gradient_accumulation_steps, config.gradient_checkpointing)
    if not torch.cuda.is_available():
        if config.auto_batch:
            log.info("--auto-batch: no GPU, keeping batch %d x %d", asked.batch_size, asked.gradient_accumulation_steps)
        return asked
    free, total = torch.cuda.mem_get_info()
    if config.gpu_memory_gib:
        fraction = min(1.0, config.gpu_memory_gib * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(fraction)
        changes.callback(torch.cuda.set_per_process_memory_fraction, 1.0, what="GPU memory cap")
    if not config.auto_batch:
        return asked
    used = torch.cuda.memory_allocated() / 2**30
    budget = config.gpu_memory_gib if config.gpu_memory_gib else used + free / 2**30
    effective = asked.batch_size * asked.gradient_accumulation_steps
    plan = plan_auto_batch(model.config, config.max_seq_length, effective, budget, base_gib=used + BESIDE_MODEL_GIB)
    if backend != "unsloth" and plan["gradient_checkpointing"] == "unsloth":
        plan["gradient_checkpointing"] = "on"
    batch = BatchPlan(plan["batch_size"], plan["gradient_accumulation_steps"], plan["gradient_checkpointing"], plan)
    print(f"auto-batch: {plan['budget_gib']} GiB budget -> micro-batch {batch.batch_size} x accumulation "
          f"{batch.gradient_accumulation_steps} (effective {effective}), checkpointing {batch.gradient_checkpointing}, "
          f"predicted peak {plan['predicted_peak_gib']} GiB")
    return batch


# ---------------------------------------------------------------------------------------------
# Checkpointing: how many decoder layers keep their activations instead of recomputing them
# ---------------------------------------------------------------------------------------------

# What a CUDA graph pool adds to peak memory, in units of one layer's activations at the micro-batch:
# fitted to the measured pool sizes (benchmarks/RESULTS.md, CUDA graphs: about 4 layers' worth at one
# padded length, and three quarters of a layer more for each further length recorded).
GRAPH_POOL_LAYERS, GRAPH_POOL_LAYERS_PER_SHAPE = 4.0, 0.75


@dataclass(frozen=True)
class KeepPlan:
    """Decoder layers that skip gradient checkpointing (Unsloth's checkpoint_skip_layers): each one
    kept saves its recompute in backward and its offload copies, and holds its activations instead."""

    kept: int
    layers: int
    reason: str
    predicted_peak_gib: float | None = None
    env: str | None = None  # UNSLOTH_GC_KEEP_LAYERS as the user set it: Unsloth applies that instead

    def describe(self) -> str:
        if self.env:
            return f"Unsloth keeps layers as UNSLOTH_GC_KEEP_LAYERS={self.env} says (set by you)"
        if not self.kept:
            return f"every layer recomputed in backward ({self.reason})"
        peak = (f"; predicted peak {self.predicted_peak_gib} GiB; --gradient-checkpointing unsloth recomputes all"
                if self.predicted_peak_gib is not None else "")
        if self.kept == self.layers:
            return f"every layer keeps its activations, none recomputed ({self.reason}{peak})"
        return f"{self.kept} of {self.layers} layers keep their activations, the rest recompute ({self.reason}{peak})"


def plan_kept_layers(checkpointing: str, *, backend: str, method: str, model_config, micro: int, seq_len: int,
                     budget_gib: float | None, used_gib: float, graph_shapes: int = 0,
                     chosen_by: str = "--gradient-checkpointing") -> KeepPlan:
    """How many layers the run keeps un-checkpointed under --gradient-checkpointing auto.

    Unsloth recomputes every layer by default, which costs about a third of the GPU's matmul work
    and the offload copies, to save memory that an 80 GB card, or a small model on a 24 GB one,
    does not need. As many layers are kept as fit in 85% of the budget (what this process holds
    plus what is free on the GPU, or --gpu-memory-gib where lower) at the run's longest padded
    batch, beside the model, the checkpointed layers' offloaded inputs and, under CUDA graphs, their
    pool (`graph_shapes` batch shapes recorded; 0: no graphs). Keeping a layer does not change the
    loss: the recompute reproduces the same forward. `chosen_by` names who chose `checkpointing`.
    """
    layers = model_config.num_hidden_layers
    if checkpointing == "off":
        return KeepPlan(layers, layers, f"{chosen_by} off")
    if backend != "unsloth":
        if budget_gib is None and checkpointing != "on":  # precision_plan's rule for the CPU
            return KeepPlan(layers, layers, "no GPU: the CPU checkpoints only under --gradient-checkpointing on")
        return KeepPlan(0, layers, "transformers' plain checkpointing of every layer on this backend")
    # get_peft_model is handed 0 below, and Unsloth then reads the variable whatever the other settings.
    env = os.environ.get("UNSLOTH_GC_KEEP_LAYERS", "").strip()
    if env not in ("", "0"):
        return KeepPlan(0, layers, f"UNSLOTH_GC_KEEP_LAYERS={env} as set", env=env)
    if checkpointing != "auto":
        return KeepPlan(0, layers, f"{chosen_by} {checkpointing}")
    if method == "grpo":
        return KeepPlan(0, layers, "grpo: its generation's memory is not in the estimate")
    if budget_gib is None:
        return KeepPlan(0, layers, "no GPU")
    tokens = micro * seq_len
    per_layer = tokens * (activation_bytes_per_token(model_config, False)
                          - activation_bytes_per_token(model_config, True)) / layers / 2**30
    base = used_gib + BESIDE_MODEL_GIB + tokens * activation_bytes_per_token(model_config, True) / 2**30
    if graph_shapes:
        base += per_layer * (GRAPH_POOL_LAYERS + GRAPH_POOL_LAYERS_PER_SHAPE * (graph_shapes - 1))
    usable = USABLE_SHARE * budget_gib
    kept = max(0, min(layers, int((usable - base) // per_layer))) if per_layer > 0 else 0
    why = f"auto: {usable:.1f} of {budget_gib:.1f} GiB usable at {micro} x {seq_len} tokens"
    return KeepPlan(kept, layers, why, round(base + kept * per_layer, 2))


def precision_plan(backend: str, checkpointing: str = "auto") -> dict:
    """The Trainer's bf16/fp16/CPU and checkpointing switches for this machine and backend."""
    import torch

    if not torch.cuda.is_available():
        return {"bf16": False, "fp16": False, "use_cpu": True, "gradient_checkpointing": checkpointing == "on"}
    bf16 = torch.cuda.is_bf16_supported()
    # Unsloth sets up its own checkpointing in get_peft_model; the Trainer must not add another layer of it.
    hf_ckpt = backend == "hf" and checkpointing != "off"
    return {"bf16": bf16, "fp16": not bf16, "use_cpu": False, "gradient_checkpointing": hf_ckpt}


# ---------------------------------------------------------------------------------------------
# Steps and micro-batch sizes over the train rows
# ---------------------------------------------------------------------------------------------


def planned_steps(train_rows: int, batch: BatchPlan, *, epochs: float, max_steps: int = -1, processes: int = 1,
                  done: int = 0) -> int:
    """Optimizer steps this process will run: `max_steps` where positive, else the epochs over the
    train rows, less the `done` steps of a checkpoint resumed from."""
    if max_steps > 0:
        total = max_steps
    else:
        batches = math.ceil(train_rows / (batch.batch_size * processes))
        total = math.ceil(math.ceil(batches / batch.gradient_accumulation_steps) * epochs)
    return max(total - done, 0)


def micro_batch_sizes(train_rows: int, batch_size: int, processes: int = 1) -> set[int]:
    """The micro-batch sizes a run sees: the full one and, in one process, the epoch's remainder
    (under several, accelerate fills each rank's last batch up to full size)."""
    sizes = {min(batch_size, math.ceil(train_rows / processes))}
    if processes == 1 and train_rows % batch_size:
        sizes.add(train_rows % batch_size)
    return sizes
