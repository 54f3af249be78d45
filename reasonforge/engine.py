"""The generation engine: a static KV cache and, on CUDA, a decode step replayed as a CUDA graph.

`model.generate` runs a decode step as some two thousand kernel launches issued one by one from
Python (a 36-layer 4-bit model with LoRA on seven projections); on an H100 the GPU finishes each
kernel long before the next is issued, so a step costs the same ~55 ms at batch 8 or 64. Here the
step is recorded once as a CUDA graph and replayed with a single launch, on transformers'
StaticCache, so its cost becomes what the GPU needs. The model is the one given: the 4-bit base
with its LoRA adapter attached and unmerged, exactly what was trained.

A batch runs in three phases:
- prefill: the left-padded prompts through the ordinary forward with a DynamicCache, in row chunks
  that bound activation memory; the first token comes from its logits, as in `generate`;
- copy: those keys and values into one StaticCache of `max_cache_len` = longest prompt + new tokens;
- decode: one token a step for every row. The step reads the token, position and mask from fixed
  buffers (the mask allows the prompt's real tokens and the positions written so far) and writes
  the logits to a fixed buffer; sampling and stopping stay outside the graph, in eager PyTorch, with
  transformers' own logits processors, so every setting `generate` honours is honoured here.

Without CUDA (tests, the CPU demo) the same loop runs eagerly. Greedy replies equal `generate`'s.
Rows that stop early keep decoding pad tokens until the batch ends, as in `generate`; the batch
planner keeps rows of like length together so little is wasted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from reasonforge import generation
from reasonforge.decode_attention import grouped_decode

# Share of the free GPU memory the KV cache of one batch may take; the rest holds the prefill's
# activations, the graph's pool and the logits.
CACHE_SHARE = 0.6
MAX_BATCH = 256  # past this the step is compute-bound on an H100 and latency per reply only grows
CACHE_LEN_STEP = 256  # cache lengths are whole steps of this many tokens
PREFILL_TOKENS = 16384  # prompt tokens per prefill chunk: bounds the MLP activations at long prompts


@dataclass
class Reply:
    ids: list[int]  # generated ids before the stop id (the stop id itself is not included)
    stopped: bool  # a stop id came; False where the reply ran out of max_new_tokens
    seconds: float  # the batch's generation time shared out by tokens
    stop_id: int | None = None


@dataclass
class EngineStats:
    """What the last `generate` call did: for reports and benchmarks."""
    engine: str = "static"
    cuda_graphs: bool = False
    grouped_attention: bool = False
    batches: int = 0
    batch_size: int = 0
    tokens: int = 0
    decode_steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    capture_s: float = 0.0
    seconds: float = 0.0
    kv_cache_gib: float = 0.0
    replay_ms: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["tokens_per_s"] = round(self.tokens / self.seconds, 1) if self.seconds else None
        out["decode_ms_per_step"] = round(1000 * self.decode_s / self.decode_steps, 3) if self.decode_steps else None
        return out


def kv_bytes_per_token(model) -> int:
    """Bytes the KV cache holds per token per row: 2 (K and V) x layers x KV heads x head dim x dtype."""
    import torch

    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dtype = compute_dtype(model)
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def compute_dtype(model):
    """The dtype activations (and so the KV cache) have: the embedding's, which 4-bit loading keeps in 16 bits."""
    return model.get_input_embeddings().weight.dtype


def plan_batch_size(model, rows: int, cache_len: int, requested: int | None = None,
                    free_bytes: int | None = None) -> tuple[int, str]:
    """(rows per batch, why). An explicit request wins (capped at `rows`); on CUDA the batch is as
    many rows as CACHE_SHARE of the free memory holds at `cache_len` tokens each (at most MAX_BATCH);
    without CUDA, 8, the size whose CPU cost per row was lowest before."""
    import torch

    if requested:
        return max(1, min(requested, rows)), "--batch-size"
    if not torch.cuda.is_available() or getattr(model, "device", torch.device("cpu")).type != "cuda":
        return max(1, min(8, rows)), "CPU default"
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info()
    size = rows_that_fit(free_bytes, kv_bytes_per_token(model), cache_len, rows)
    return size, f"{CACHE_SHARE:.0%} of {free_bytes / 1024**3:.1f} GiB free at {cache_len} tokens a row"


def rows_that_fit(free_bytes: int, per_token: int, cache_len: int, rows: int) -> int:
    """Rows whose KV cache of `cache_len` tokens fits CACHE_SHARE of `free_bytes`, from 1 to MAX_BATCH."""
    fits = int(CACHE_SHARE * free_bytes // max(per_token * cache_len, 1))
    return max(1, min(rows, MAX_BATCH, fits))


class Engine:
    """Generates replies for batches of prompt token ids on one model.

    `cuda_graphs`: None replays the decode step as a CUDA graph where the model is on CUDA; False
    runs it eagerly (the same arithmetic, launch by launch). The captured graph and its cache are
    kept for the next batch of the same shape, and dropped when the model's adapter is switched
    on or off (evaluation's base pass), since the graph would replay the other path.
    """

    def __init__(self, model, pad_id: int, *, cuda_graphs: bool | None = None, compile_step: bool = False,
                 grouped_attention: bool = True):
        import torch

        self.model = model
        # decode attention on the grouped KV heads as cached (reasonforge.decode_attention); False is
        # transformers' SDPA path, which copies them to every query head
        self.grouped_attention = grouped_attention
        # torch.compile fuses the step's small kernels before it is captured; costs a compile per shape
        self._step_fn = torch.compile(self._step, dynamic=False) if compile_step else self._step
        self.pad_id = int(pad_id)
        self.device = model.device if hasattr(model, "device") else next(model.parameters()).device
        on_cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.cuda_graphs = on_cuda if cuda_graphs is None else (cuda_graphs and on_cuda)
        self.stats = EngineStats(cuda_graphs=self.cuda_graphs)
        self._slot = None  # the cache, buffers and graph of the last batch shape

    # -----------------------------------------------------------------------------------------
    # Public
    # -----------------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], settings, stops: set[int], *, batch_size: int | None = None,
                 context: int | None = None, on_batch=None, on_step=None) -> list[Reply]:
        """One reply per prompt (lists of token ids). `settings` is a GenerationSettings; `stops`
        the ids that end a reply. `on_batch(done_rows)` is called after each batch; `on_step(row,
        token_id)` after each token of a batch of one (the chat's streaming)."""
        import torch

        self.stats = EngineStats(cuda_graphs=self.cuda_graphs)
        started = time.perf_counter()
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        longest = len(prompts[order[0]]) if prompts else 0
        max_new = settings.max_new_tokens
        # Each row may generate up to max_new tokens, or what its own prompt leaves of the model's
        # context (positions are per row); the cache, laid out left-padded, holds the longest prompt
        # plus max_new, rounded up so that the next call of a like size (a chat's next turn, the next
        # batch) finds its graph already captured.
        cache_len = -(-(longest + max_new) // CACHE_LEN_STEP) * CACHE_LEN_STEP
        size, why = plan_batch_size(self.model, len(prompts), cache_len, batch_size)
        self.stats.batch_size = size
        self.stats.notes.append(f"batch {size} ({why})")
        replies: dict[int, Reply] = {}
        with torch.no_grad(), grouped_decode(self.model, self.grouped_attention) as grouped:
            self.stats.grouped_attention = grouped
            for start in range(0, len(order), size):
                idx = order[start:start + size]
                rows = [prompts[i] for i in idx]
                # every batch shares one cache length, so one captured graph serves them all
                limits = [max(1, min(max_new, context - len(r))) if context else max_new for r in rows]
                outs = self._run_batch(rows, settings, stops, limits, cache_len, size, on_step)
                for i, reply in zip(idx, outs):
                    replies[i] = reply
                self.stats.batches += 1
                if on_batch is not None:
                    on_batch(len(idx))
        self.stats.seconds = time.perf_counter() - started
        self.stats.tokens = sum(len(r.ids) + (r.stop_id is not None) for r in replies.values())
        return [replies[i] for i in range(len(prompts))]

    def release(self) -> None:
        """Free the cache and graph (GPU memory) held for the next batch."""
        self._slot = None

    # -----------------------------------------------------------------------------------------
    # One batch
    # -----------------------------------------------------------------------------------------

    def _run_batch(self, rows: list[list[int]], settings, stops: set[int], limits: list[int], cache_len: int,
                   slots: int, on_step) -> list[Reply]:
        """Replies to `rows`, row i at most limits[i] tokens long."""
        import torch

        n = len(rows)
        max_new = max(limits)
        # a short last batch is padded with copies of its first row, so the captured graph fits it
        padded_rows = rows + [rows[0]] * (slots - n) if self.cuda_graphs else rows
        width = max(len(r) for r in padded_rows)
        t0 = time.perf_counter()
        slot, first_logits, prompt_ids = self._prefill(padded_rows, width, cache_len)
        self.stats.prefill_s += time.perf_counter() - t0
        processors = generation.logits_processors(settings)
        sample = settings.temperature > 0
        history = torch.full((len(padded_rows), width + max_new), self.pad_id, dtype=torch.long, device=self.device)
        history[:, :width] = prompt_ids
        stop_tensor = torch.tensor(sorted(stops), device=self.device)
        done = torch.zeros(len(padded_rows), dtype=torch.bool, device=self.device)
        done[n:] = True  # padding rows never count
        stop_at = torch.full((len(padded_rows),), -1, dtype=torch.long, device=self.device)
        limit = torch.tensor(limits + [1] * (len(padded_rows) - n), device=self.device)
        logits = first_logits
        t1 = time.perf_counter()
        steps = 0
        for step in range(max_new):
            scores = processors(history[:, :width + step], logits.float()) if processors else logits.float()
            if sample:
                nxt = torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1)
            else:
                nxt = scores.argmax(dim=-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            history[:, width + step] = nxt
            hit = torch.isin(nxt, stop_tensor) & ~done
            stop_at = torch.where(hit, torch.full_like(stop_at, step), stop_at)
            done |= hit | (limit <= step + 1)  # a row out of tokens is done, without a stop
            if on_step is not None and n == 1:
                on_step(0, int(nxt[0]))
            # one host read per step: it waits for the step to finish, a gap of microseconds between
            # replays of milliseconds, and lets the batch end as soon as every row has stopped
            if step == max_new - 1 or bool(done.all()):
                break
            logits = self._decode(slot, nxt, step)
            steps += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t1
        self.stats.decode_s += seconds
        self.stats.decode_steps += steps
        return self._replies(history[:n, width:], stop_at[:n], limits, seconds + (t1 - t0))

    def _replies(self, generated, stop_at, limits: list[int], seconds: float) -> list[Reply]:
        generated, stop_at = generated.tolist(), stop_at.tolist()
        out = []
        for ids, at, most in zip(generated, stop_at, limits):
            if at >= 0:
                out.append(Reply(ids[:at], True, 0.0, ids[at]))
            else:
                out.append(Reply(ids[:most], False, 0.0))
        total = max(sum(len(r.ids) for r in out), 1)
        for r in out:
            r.seconds = round(seconds * len(r.ids) / total, 4)
        return out

    # -----------------------------------------------------------------------------------------
    # Cache, prefill, decode step
    # -----------------------------------------------------------------------------------------

    def _prepare_slot(self, batch: int, cache_len: int, dtype):
        """The StaticCache and the step's fixed buffers for this shape: the last ones where the
        shape and the adapter state match, else new ones (the old graph is freed first). `dtype` is
        the prefill's keys': a model prepared for k-bit training keeps some layers in float32."""
        import torch
        from transformers import StaticCache

        key = (batch, cache_len, dtype, adapter_state(self.model), self.grouped_attention)
        if self._slot is not None and self._slot.key == key:
            self._slot.reset()
            return self._slot
        self._slot = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        cache = StaticCache(config=self.model.config, max_cache_len=cache_len)
        cfg = self.model.config.get_text_config(decoder=True)
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        cache.early_initialization(batch, getattr(cfg, "num_key_value_heads", None) or heads, head_dim, dtype,
                                   self.device)
        self._slot = _Slot(key, cache, batch, cache_len, self.device)
        self.stats.kv_cache_gib = kv_bytes_per_token(self.model) * batch * cache_len / 1024**3
        return self._slot

    def _prefill(self, rows: list[list[int]], width: int, cache_len: int):
        """Prompts through the ordinary forward (DynamicCache, left padding, positions from the
        mask, as `generate` does), their keys and values copied into the static cache; returns
        (the slot, the last position's logits, the padded prompt ids)."""
        import torch

        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        chunk = max(1, PREFILL_TOKENS // width)
        logits, slot = [], None
        for start in range(0, len(rows), chunk):
            part = slice(start, start + chunk)
            positions = (mask[part].cumsum(-1) - 1).clamp(min=0)
            out = self.model(input_ids=ids[part], attention_mask=mask[part], position_ids=positions, use_cache=True,
                             logits_to_keep=1)
            logits.append(out.logits[:, -1, :])
            layers = cache_tensors(out.past_key_values)
            if slot is None:
                slot = self._prepare_slot(len(rows), cache_len, layers[0][0].dtype)
            for layer, (k, v) in zip(slot.cache.layers, layers):
                layer.keys[part, :, :width].copy_(k)
                layer.values[part, :, :width].copy_(v)
        for layer in slot.cache.layers:
            layer.cumulative_length.fill_(width)
        slot.mask[:, 0, 0, :width] = mask.bool()
        slot.write_pos.fill_(width)
        slot.pos.copy_(mask.sum(-1, keepdim=True))  # the next token's position: the row's real length
        return slot, torch.cat(logits), ids

    def _decode(self, slot, tokens, step: int):
        """One decode step for every row: logits of the next token. Eager for the first two steps
        (they warm up cuBLAS and the allocator), then captured once and replayed."""
        import torch

        slot.tok.copy_(tokens.view(-1, 1))
        if not self.cuda_graphs:
            self._step_fn(slot)
            return slot.logits
        if slot.graph is None and slot.warm < 2:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._step_fn(slot)
            torch.cuda.current_stream().wait_stream(stream)
            slot.warm += 1
            return slot.logits
        if slot.graph is None:
            t0 = time.perf_counter()
            # its own memory pool: a pool shared with a freed graph of another shape trips an allocator assert
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step_fn(slot)
            slot.graph = graph
            self.stats.capture_s += time.perf_counter() - t0
        if 8 <= step < 16:  # a few replays timed alone, to tell the GPU's share of a step from the host's
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            slot.graph.replay()
            torch.cuda.synchronize()
            self.stats.replay_ms.append(round(1000 * (time.perf_counter() - t0), 3))
        else:
            slot.graph.replay()
        return slot.logits

    def _step(self, slot) -> None:
        """The recorded step: allow the position about to be written, run the model on the fixed
        buffers (the cache advances its own write position), keep the logits, advance positions."""
        slot.mask.index_fill_(3, slot.write_pos, True)
        out = self.model(input_ids=slot.tok, attention_mask=slot.mask, position_ids=slot.pos,
                         past_key_values=slot.cache, use_cache=True)
        if slot.logits is None:
            slot.logits = out.logits[:, -1, :].clone()
        else:
            slot.logits.copy_(out.logits[:, -1, :])
        slot.pos.add_(1)
        slot.write_pos.add_(1)


class _Slot:
    """A batch shape's StaticCache, the decode step's fixed input and output buffers and its graph."""

    def __init__(self, key, cache, batch: int, cache_len: int, device):
        import torch

        self.key, self.cache = key, cache
        self.tok = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.pos = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.write_pos = torch.zeros(1, dtype=torch.long, device=device)
        # bool 4D mask: transformers uses a 4D mask as given, so nothing data-dependent runs in the step
        self.mask = torch.zeros((batch, 1, 1, cache_len), dtype=torch.bool, device=device)
        self.logits = None  # made by the first (eager) step with the model's vocabulary width
        self.graph = None
        self.warm = 0

    def reset(self) -> None:
        self.mask.zero_()


def cache_tensors(cache):
    """(keys, values) per layer of a transformers cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def adapter_state(model) -> bool:
    """Whether LoRA layers are active (False inside PEFT's disable_adapter())."""
    for module in model.modules():
        if hasattr(module, "disable_adapters") and hasattr(module, "lora_A"):
            return not module.disable_adapters
    return False
