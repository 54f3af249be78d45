"""GPU acceleration of training: packed-attention routing (patch and undo), the varlen kernel, the batch planner, compiler and precision settings, CUDA graphs of Unsloth's blocks."""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass
from typing import Callable

from utils import UserError

log = logging.getLogger("reasonforge.train")


# ---------------------------------------------------------------------------------------------
# Packed attention
# ---------------------------------------------------------------------------------------------

PACKING_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn2",
                     "kernels-community/flash-attn3", "kernels-community/vllm-flash-attn3")


def check_packing(packing: bool, backend: str, model) -> None:
    """Packed rows share one sequence; only varlen attention keeps them from attending to each other."""
    if not packing or backend == "unsloth":
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


def _nothing_to_undo() -> None:
    pass


def route_packed_attention(dispatch, kernel_available: bool, make_kernel=None) -> tuple[str, Callable[[], None]]:
    """Say how Unsloth keeps packed rows apart, first giving it a varlen kernel where it would split.

    Without flash-attn or xformers, Unsloth separates packed rows with torch's varlen_attn, which
    it takes from torch 2.12 on; under older torch it runs one SDPA call per run of equal-length
    documents, many small calls per layer, where one varlen call per layer is faster
    (benchmarks/RESULTS.md). Returns (route, undo): undo puts back what was written into
    `dispatch`, which outlives the run in this process.
    """
    if getattr(dispatch, "HAS_FLASH_ATTENTION", False):
        return "flash-attn varlen", _nothing_to_undo
    if not hasattr(dispatch, "_TORCH_VARLEN_ATTN"):
        return "Unsloth's own (this Unsloth has no varlen hook)", _nothing_to_undo
    segments = getattr(dispatch, "_SDPA_PACKED_SEGMENTS", False)
    # Unsloth prefers torch's varlen over xformers only where torch has one (2.12+) on sm80+ cards.
    if getattr(dispatch, "HAS_XFORMERS", False) and not (segments and getattr(dispatch, "_NATIVE_BEATS_XFORMERS", False)):
        return "xformers block-diagonal", _nothing_to_undo
    if not segments:
        return "SDPA over a dense block-diagonal mask (UNSLOTH_SDPA_PACKED_SEGMENTS=0 as set)", _nothing_to_undo
    if getattr(dispatch._TORCH_VARLEN_ATTN, "reasonforge_flash_varlen", False):
        return INSTALLED_ROUTE, _nothing_to_undo
    if dispatch._TORCH_VARLEN_ATTN is not None:
        return "torch varlen_attn", _nothing_to_undo
    if os.environ.get("UNSLOTH_TORCH_VARLEN", "1").lower() in ("0", "false", "no", "off"):
        return "SDPA per document (UNSLOTH_TORCH_VARLEN=0 as set)", _nothing_to_undo
    if not kernel_available:
        return "SDPA per document (no flash kernel for this GPU in torch)", _nothing_to_undo
    before = {name: getattr(dispatch, name) for name in ("_TORCH_VARLEN_ATTN", "_LEAN_VARLEN") if hasattr(dispatch, name)}
    dispatch._TORCH_VARLEN_ATTN = (make_kernel or flash_varlen_attention)()
    dispatch._LEAN_VARLEN = False  # its lean path needs torch >= 2.12 helpers; ours is already one aten call

    def undo() -> None:
        for name in ("_TORCH_VARLEN_ATTN", "_LEAN_VARLEN"):
            if name in before:
                setattr(dispatch, name, before[name])
            elif hasattr(dispatch, name):
                delattr(dispatch, name)

    return INSTALLED_ROUTE, undo


def configure_packed_attention(packing: bool, backend: str, model) -> tuple[str, Callable[[], None]]:
    """(route, undo) of packed attention for this run; see route_packed_attention."""
    if not packing:
        return "not packing", _nothing_to_undo
    if backend != "unsloth":
        return f"{model.config._attn_implementation} varlen (transformers)", _nothing_to_undo
    from unsloth.utils import attention_dispatch

    return route_packed_attention(attention_dispatch, flash_varlen_available())


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
# recompute adds to the per-token work. Both constants are fitted to the measured grid in
# benchmarks/RESULTS.md with Python launchers; the C++ ones (configure_compiler) make passes
# cheaper, and the alternatives have not been re-timed with them.
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


def choose_batch(config, model, backend: str) -> BatchPlan:
    """The run's BatchPlan: the flags', or --auto-batch's pick from the GPU's free memory (or
    --gpu-memory-gib, which also caps this process's GPU memory), keeping the effective batch."""
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
# fitted to runs 23-24 (benchmarks/RESULTS.md; 3B shape, 2 x 2,048 tokens, 0.28 GiB a layer), where
# the pool added 1.07-1.2 GiB at one padded length and 2.6 GiB once 8 lengths were recorded.
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
# Compiled graphs
# ---------------------------------------------------------------------------------------------

# The C++ wrapper's one-time build makes the first step slower and every later step faster. This is
# the run length after which it repaid its build with cold compile caches on the lent H100
# (benchmarks/RESULTS.md, cold start), so a short run on a fresh machine is never the slower for it.
CPP_WRAPPER_MIN_STEPS = 150


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


def configure_compiler(backend: str, wrapper: str = "auto", steps: int | None = None, graphs: bool = False) -> str:
    """Choose Inductor's C++ or Python wrapper for the graphs Unsloth compiles; say which and why.

    At small micro-batches the GPU waits on Python to launch kernels; the C++ wrapper launches a
    compiled graph's kernels without the Python loop, but its build makes the first step far
    slower. `auto` takes it only for runs long enough to repay that, and never under CUDA graphs,
    whose replays launch a block's kernels without either wrapper.
    """
    if backend != "unsloth":
        return "no compiled graphs on this backend"
    if "TORCHINDUCTOR_CPP_WRAPPER" in os.environ:
        return f"TORCHINDUCTOR_CPP_WRAPPER={os.environ['TORCHINDUCTOR_CPP_WRAPPER']} as set"
    import torch._inductor.config

    short = steps is not None and steps < CPP_WRAPPER_MIN_STEPS
    if wrapper == "python" or (wrapper == "auto" and (graphs or short)):
        torch._inductor.config.cpp_wrapper = False
        why = ("--graph-wrapper python" if wrapper == "python" else
               "CUDA graphs replay the kernels, so the C++ wrapper's build would not pay; --graph-wrapper cpp forces it"
               if graphs else
               f"{steps} planned steps, fewer than the {CPP_WRAPPER_MIN_STEPS} that repay the C++ wrapper's "
               "build; --graph-wrapper cpp forces it")
        return f"Python wrapper ({why})"
    compiler = next((c for c in (os.environ.get("CXX"), "g++", "clang++") if c and shutil.which(c)), None)
    if compiler is None:
        return "Python wrapper: no C++ compiler found (install g++ for faster steps on long runs)"
    torch._inductor.config.cpp_wrapper = True
    why = "--graph-wrapper cpp" if wrapper == "cpp" else f"{steps} planned steps repay its build"
    return f"C++ wrapper ({why}; {compiler}; --graph-wrapper python turns it off)"


# ---------------------------------------------------------------------------------------------
# CUDA graphs
# ---------------------------------------------------------------------------------------------

# Unsloth records one set of CUDA graphs per input shape of a decoder-layer kind and, past a cap
# (UNSLOTH_BLOCK_CUDAGRAPHS_MAX_SHAPES, 8 by default), runs that kind without graphs for the rest of
# the process. Padding each batch to a multiple chosen from the rows' lengths keeps the lengths under it.
LENGTH_BUCKETS = 8
BUCKET_ALIGN = 8  # bf16 tensor cores take multiples of 8


@dataclass(frozen=True)
class GraphPlan:
    """Whether Unsloth's compiled decoder blocks replay as CUDA graphs, and the padding that keeps
    their input shapes few enough to record once each."""

    on: bool
    reason: str
    pad_to_multiple_of: int | None = None
    max_shapes: int = 0
    shapes: int = 0  # batch shapes the rows can bring: padded lengths x micro-batch sizes

    def describe(self) -> str:
        if not self.on:
            return f"off ({self.reason})"
        return (f"on ({self.reason}): batches padded to a multiple of {self.pad_to_multiple_of} tokens, "
                f"at most {self.max_shapes} shapes recorded; --cuda-graphs off turns it off")


def padded_length(length: int, multiple: int) -> int:
    """`length` rounded up to a multiple of `multiple`, as the collator pads a batch."""
    return -(-length // multiple) * multiple


def length_bucket(lengths, cap: int, buckets: int = LENGTH_BUCKETS, align: int = BUCKET_ALIGN) -> tuple[int, int] | None:
    """(multiple, padded lengths): the smallest multiple of `align` that pads every row length to one
    of at most `buckets` lengths, none over `cap`; None if there is none. A batch is as long as its
    longest row, so no batch can bring a length outside that set, whatever the shuffle.

    The cap is --max-seq-length: Unsloth cuts longer inputs back to it but not their labels.
    """
    unique = sorted(set(lengths)) or [1]
    for multiple in range(align, unique[-1] + align, align):
        padded = {padded_length(n, multiple) for n in unique}
        if len(padded) <= buckets and max(padded) <= cap:
            return multiple, len(padded)
    return None


def micro_batch_sizes(train_rows: int, batch_size: int, processes: int = 1) -> set[int]:
    """The micro-batch sizes a run sees: the full one and, in one process, the epoch's remainder
    (under several, accelerate fills each rank's last batch up to full size)."""
    sizes = {min(batch_size, math.ceil(train_rows / processes))}
    if processes == 1 and train_rows % batch_size:
        sizes.add(train_rows % batch_size)
    return sizes


# Where auto records graphs: GPUs fast enough to outrun the CPU's kernel launches at micro-batch 2.
# An H100 ran a 3B step's kernels in 0.87 s while launching them took Python 1.45-1.61 s
# (benchmarks/RESULTS.md, trail step 4). By their spec sheets an A10G or L4 has about an eighth of
# its dense bf16 rate and an A100 about a third, so their steps should wait on the GPU, where graphs
# would add memory and padding for no speed (not measured on those cards).
GRAPHS_MIN_CAPABILITY = (9, 0)


def cuda_graphs_obstacle(backend: str, method: str, packing: bool) -> str | None:
    """Why no block of this run can replay as a CUDA graph, whatever the GPU; None if nothing stands in
    the way. `backend` may still be train_lora.py's "auto", which may yet become unsloth."""
    if backend == "hf":
        return "the hf backend has no compiled blocks"
    if backend not in ("unsloth", "auto"):
        return "no compiled blocks on this backend"
    if method == "grpo":
        return "grpo's completion lengths change every step"
    return "packed rows run outside Unsloth's compiled blocks" if packing else None


def refuse_cuda_graphs(why: str) -> str:
    return f"--cuda-graphs on: {why}; drop the flag or use --cuda-graphs auto"


def plan_cuda_graphs(choice: str, *, backend: str, method: str, packing: bool, lengths, max_length: int,
                     batch_sizes: set[int], capability: tuple[int, int] | None = None) -> GraphPlan:
    """The run's GraphPlan for --cuda-graphs auto|on|off.

    Each optimizer step of a LoRA run at a small micro-batch issues tens of thousands of kernels;
    on a few CPU cores the GPU waits for them to be launched. A CUDA graph replays a whole block's
    kernels in one launch. Only Unsloth's per-block compile records them, and only where the block
    runs compiled: not for packed rows (Unsloth keeps those layers eager) nor GRPO (a new completion
    length nearly every step).
    """
    if choice == "off":
        return GraphPlan(False, "--cuda-graphs off")
    why_not = cuda_graphs_obstacle(backend, method, packing)
    if why_not:
        if choice == "on":
            raise UserError(refuse_cuda_graphs(why_not))
        return GraphPlan(False, why_not)
    env = os.environ.get("UNSLOTH_BLOCK_CUDAGRAPHS")
    if choice == "auto" and env is not None:
        on, reason = env == "1", f"UNSLOTH_BLOCK_CUDAGRAPHS={env} as set"
    elif choice == "auto" and capability is not None and tuple(capability) < GRAPHS_MIN_CAPABILITY:
        on, reason = False, (f"auto: on this compute capability {capability[0]}.{capability[1]} GPU a step should "
                             "wait on the GPU, not on kernel launches; --cuda-graphs on to record them anyway")
    else:
        on, reason = True, "--cuda-graphs on" if choice == "on" else "auto: sft on Unsloth's compiled blocks, fast GPU"
    bucket = length_bucket(lengths, max_length) if on else None
    if on and bucket is None:
        on, reason = False, (f"no padding multiple keeps these rows within {LENGTH_BUCKETS} lengths and "
                             f"--max-seq-length {max_length}")
    if not on:
        return GraphPlan(False, reason)
    multiple, padded = bucket
    return GraphPlan(True, reason, multiple, max(padded * len(batch_sizes), LENGTH_BUCKETS), padded * len(batch_sizes))


def confirm_cuda_graphs(plan: GraphPlan, model) -> GraphPlan:
    """The plan as it stands once get_peft_model has run: Unsloth compiles no blocks at all under
    UNSLOTH_BLOCK_COMPILE=0, UNSLOTH_COMPILE_DISABLE or an older torch, and then nothing records."""
    if not plan.on or any(getattr(type(m).forward, "_unsloth_block_compiled", False) for m in model.modules()):
        return plan
    return GraphPlan(False, "Unsloth compiled no decoder blocks here (UNSLOTH_BLOCK_COMPILE, "
                            "UNSLOTH_COMPILE_DISABLE or its torch version)")


def install_cuda_graphs(plan: GraphPlan, backend: str, model) -> Callable[[], None]:
    """Set Unsloth's per-block compile to record CUDA graphs or not, before get_peft_model wraps the
    decoder blocks of `model`; returns an undo for the module settings.

    Unsloth wraps each decoder-layer class once per process with the setting of that moment, and
    may already have done so while loading (its FastModel path) or for an earlier run in this process
    (tests, a notebook): such a class is unwrapped here, to be wrapped again with this run's setting.
    """
    if backend != "unsloth":
        return _nothing_to_undo
    from unsloth.models import _block_compile as blocks

    before = (dict(blocks._COMPILE_OPTIONS), blocks._CUDAGRAPH_MAX_SHAPES)
    blocks._COMPILE_OPTIONS["triton.cudagraphs"] = plan.on
    blocks._CUDAGRAPH_MAX_SHAPES = max(plan.max_shapes, before[1])
    for cls in {type(m) for m in model.modules()}:
        original = getattr(cls.__dict__.get("forward"), "_unsloth_block_original", None)
        if original is not None:
            cls.forward = original

    def undo() -> None:
        blocks._COMPILE_OPTIONS.clear()
        blocks._COMPILE_OPTIONS.update(before[0])
        blocks._CUDAGRAPH_MAX_SHAPES = before[1]

    return undo
