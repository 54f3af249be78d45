"""CUDA graphs of Unsloth's compiled decoder blocks: whether a run records them, the padding that keeps
their batch shapes few, and Unsloth's settings set (and undone) before its blocks are wrapped."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from reasonforge.core import UserError


def _nothing_to_undo() -> None:
    pass


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
