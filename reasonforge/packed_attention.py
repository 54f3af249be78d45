"""Packed attention: which attention keeps packed rows from attending to each other, and where Unsloth
would fall back to many small SDPA calls, torch's flash varlen kernel in their place (with its undo)."""

from __future__ import annotations

import os
from typing import Callable

from reasonforge.core import UserError

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
