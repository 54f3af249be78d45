"""Packed attention on the GPU at hand: what torch and Unsloth offer, and one packed row's attention
timed both ways (GPU only; output in benchmarks/results/probe_packed_attention.log).

    python benchmarks/probe_packed_attention.py

Prints torch's varlen_attn signature and the aten flash schemas, Unsloth's packed-attention switches,
the route train_lora.py picks, then 36 layers of attention forward plus backward over a 4,096-token
row of chat-like documents (Qwen2.5-3B heads: 16 query, 2 K/V, dim 128): Unsloth's per-document SDPA
against one varlen call, twice each (the first pass includes warm-up). It reads Unsloth internals
(`unsloth.utils.attention_dispatch`) on purpose: those are what decide the route.
"""

import inspect
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils  # noqa: E402

utils.import_unsloth_first()
import torch  # noqa: E402
from unsloth.utils import attention_dispatch as dispatch  # noqa: E402

from reasonforge import packed_attention  # noqa: E402
from bench_train import chat_length  # noqa: E402

HEADS, KV_HEADS, DIM, LAYERS, ROW = 16, 2, 128, 36, 4096


def chat_lengths(total: int, seed: int = 0) -> list[int]:
    """The benchmark's length distribution, cut to fill one row."""
    rng, lengths = random.Random(seed), []
    while sum(lengths) < total:
        lengths.append(min(chat_length(rng, 2048), total - sum(lengths)))
    return lengths


def main() -> int:
    print("torch", torch.__version__, torch.version.cuda)
    try:
        from torch.nn.attention import varlen
        print("varlen_attn", inspect.signature(varlen.varlen_attn))
    except ImportError as exc:
        print("no torch.nn.attention.varlen:", exc)
    print("fwd schema", torch.ops.aten._flash_attention_forward.default._schema)
    print("bwd schema", torch.ops.aten._flash_attention_backward.default._schema)
    print({k: getattr(dispatch, k, None) for k in ("HAS_FLASH_ATTENTION", "HAS_XFORMERS", "_TORCH_VARLEN_ATTN",
                                                    "_LEAN_VARLEN", "_SDPA_PACKED_SEGMENTS", "_NATIVE_BEATS_XFORMERS")})
    lengths = chat_lengths(ROW)
    print("lengths", lengths)
    q = torch.randn(1, HEADS, ROW, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, KV_HEADS, ROW, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    route, undo = packed_attention.route_packed_attention(dispatch, packed_attention.flash_varlen_available())
    print("route", route)
    groups = HEADS // KV_HEADS
    print("takes", dispatch._torch_varlen_takes(q, k, v, {}, True, None),
          "beats", dispatch._torch_varlen_beats_segments(q, k, tuple(lengths), groups, True))
    cu = torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(len(lengths))], device="cuda", dtype=torch.int32)
    seq_info = (torch.tensor(lengths, dtype=torch.int32), cu, max(lengths))

    def per_document():
        return dispatch._sdpa_packed_segments(q, k, v, tuple(lengths), n_groups=groups, is_causal=True,
                                              sliding_window=None, sdpa_kwargs={}, training=True)

    def one_varlen_call():
        return dispatch._torch_varlen_packed(q, k, v, seq_info, n_groups=groups, is_causal=True,
                                             sliding_window=None, scale=None)

    a, b = per_document(), one_varlen_call()
    print("max abs diff segments vs varlen", (a.float() - b.float()).abs().max().item(), a.shape, b.shape)
    for name, fn in (("per-document SDPA", per_document), ("varlen", one_varlen_call)) * 2:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(LAYERS):
            out = fn()
            out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
        print(f"{name}: {LAYERS} layers fwd+bwd {1e3 * (time.perf_counter() - t):.1f} ms")
    undo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
