"""Attention for the engine's decode step without copying the grouped KV heads.

transformers' SDPA path repeats each key/value head to every query head of its group whenever a
mask is given (the fused GQA kernels take no mask). In a decode step over a static cache, which
always carries a mask, that copy is the largest memory traffic after the weights: for the
Qwen2.5-3B shape at batch 64 and a 512-token cache it writes and reads about 9.6 GB a step.

With one query position, the query heads of a group can stand in for query positions instead:
(batch, kv_heads * groups, 1, dim) is viewed as (batch, kv_heads, groups, dim) and attends to the
cache as it is. Every row's mask is the same for all its heads, so it broadcasts; the arithmetic
per head is unchanged. Any other call (prefill, a single head group, no 4D mask) is SDPA's.
"""

from __future__ import annotations

from contextlib import contextmanager

NAME = "reasonforge_grouped_decode"


def grouped_decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_len, dim = query.shape
    if (q_len != 1 or groups == 1 or dropout or attention_mask is None or attention_mask.dim() != 4
            or attention_mask.shape[1] != 1 or kwargs.get("position_bias") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    kv_heads = key.shape[1]
    # repeat_kv maps query head j to kv head j // groups: heads are kv-head-major
    grouped = query.reshape(batch, kv_heads, groups, dim)
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask,
                                                           scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def register() -> None:
    """Add the name to transformers' attention and mask registries (idempotent; an added name
    changes nothing for models that do not select it)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, grouped_decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def text_configs(model) -> list:
    """The config objects whose `_attn_implementation` the decoder's layers read."""
    configs, seen = [], set()
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and id(cfg) not in seen and hasattr(cfg, "_attn_implementation"):
            seen.add(id(cfg))
            configs.append(cfg)
    return configs


@contextmanager
def grouped_decode(model, enabled: bool = True):
    """Within the block, a model on SDPA attention uses grouped_decode_attention; restored after.
    Models on eager, flash or another implementation are left as they are."""
    configs = [c for c in text_configs(model) if c._attn_implementation == "sdpa"] if enabled else []
    if configs:
        register()
    for cfg in configs:
        cfg._attn_implementation = NAME
    try:
        yield bool(configs)
    finally:
        for cfg in configs:
            cfg._attn_implementation = "sdpa"
