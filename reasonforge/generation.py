"""Generation for evaluation and chat: settings and their flags, stop tokens, loading for inference, batched replies."""

from __future__ import annotations

import time
from dataclasses import dataclass

from reasonforge import core, models, progress
from reasonforge.chat_format import IM_END, IM_START, render_chat, single_token
from reasonforge.core import MAX_SEQ_LENGTH, SEED_MAX, UserError, log, number_problems


@dataclass
class GenerationSettings:
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    max_new_tokens: int = 512
    repetition_penalty: float = 1.1

    LIMITS = {
        # below about 1e-200 the logits divided by it overflow and sampling fails on inf; 1e-4 is already greedy
        "temperature": (float, lambda v: v == 0 or 1e-4 <= v <= 5, "between 0 (greedy) and 5, and 0 or at least 0.0001"),
        "top_p": (float, lambda v: 0 < v <= 1, "in (0, 1]"),
        "top_k": (int, lambda v: v >= 0, "0 (off) or more"),
        "max_new_tokens": (int, lambda v: 1 <= v <= 32768, "between 1 and 32768"),
        "repetition_penalty": (float, lambda v: 0 < v <= 10, "in (0, 10]"),
    }

    def problems(self) -> list[str]:
        return [f"--{k.replace('_', '-')} {getattr(self, k)} must be {rule}"
                for k, (_, ok, rule) in self.LIMITS.items() if not ok(getattr(self, k))]

    def updated(self, name: str, raw: str) -> "GenerationSettings":
        """A copy with one setting changed from text; UserError names the rule when it is invalid."""
        name = name.replace("-", "_")
        if name not in self.LIMITS:
            raise UserError(f"unknown setting {name!r}; settings are {', '.join(self.LIMITS)}")
        kind, ok, rule = self.LIMITS[name]
        try:
            value = kind(raw)
        except ValueError:
            raise UserError(f"{name} must be {'a whole number' if kind is int else 'a number'}, got {raw!r}") from None
        if not ok(value):
            raise UserError(f"{name} {value} must be {rule}")
        return GenerationSettings(**{**self.as_dict(), name: value})

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.LIMITS}

    def generate_kwargs(self, tokenizer, model=None) -> dict:
        sample = self.temperature > 0
        kw = {"max_new_tokens": self.max_new_tokens, "do_sample": sample, "repetition_penalty": self.repetition_penalty,
              "eos_token_id": stop_token_ids(tokenizer, model), "pad_token_id": tokenizer.pad_token_id}
        if sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        return kw


# A ChatML reply ends at <|im_end|>; <|im_start|> or <|endoftext|> after it would be a model
# running on into a turn nobody asked for, so they stop generation too.
CHATML_STOPS = (IM_END, IM_START, "<|endoftext|>")


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends a reply: the model's generation_config eos ids (Qwen lists two), the
    tokenizer's eos and the ChatML turn markers that are single tokens of this vocabulary."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured if isinstance(configured, (list, tuple)) else [configured]):
        if value is not None:
            ids.append(int(value))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    for marker in CHATML_STOPS:
        if single_token(tokenizer, marker):
            ids.append(tokenizer.convert_tokens_to_ids(marker))
    return list(dict.fromkeys(ids))


def reply_tokens(row, stops: set[int]) -> tuple[list[int], bool]:
    """(the generated ids before the first stop id, whether a stop id came): padding after the
    stop is dropped, and a reply without one ran out of --max-new-tokens."""
    out = []
    for tok in row.tolist():
        if tok in stops:
            return out, True
        out.append(tok)
    return out, False


def add_inference_model_flags(parser) -> None:
    """The model flags evaluate_model.py and test_model.py share."""
    m = parser.add_argument_group("model")
    m.add_argument("--model-path", required=True, help="adapter or model folder, s3:// URI, Hub id, or a .gguf file")
    m.add_argument("--is-adapter", action="store_true", help="insist that --model-path is an adapter (detected anyway)")
    m.add_argument("--base-model", default=None, help="base model (default: the one recorded with the adapter)")
    m.add_argument("--backend", choices=["auto", "unsloth", "hf"], default="auto", help="(default: %(default)s)")
    m.add_argument("--max-seq-length", type=int, default=None,
                   help=f"token limit (default: the one training recorded beside the adapter, else {MAX_SEQ_LENGTH})")
    m.add_argument("--no-4bit", dest="load_in_4bit", action="store_false", default=None,
                   help="load the base in 16-bit on GPU (default: as training did, else 4-bit)")
    add_engine_flag(m)
    m.add_argument("--gguf-runtime", choices=["auto", "llama.cpp", "transformers"], default="auto",
                   help="what runs a .gguf --model-path: llama.cpp (llama-cpp-python, the gguf extra), or transformers "
                        "on its weights dequantised; auto: llama.cpp where installed (default: %(default)s)")


def load_for_inference(args):
    """Resolve --model-path (adapter, base, s3://) and load it ready for generation.

    Returns (model, tokenizer, info, adapter metadata); info["load_s"] is the load time and
    info["resolved"] the settings the load decided (the engine, the recorded ones the flags left
    unset, where each came from), for the caller's next frozen settings (core.frozen).
    """
    from reasonforge import gguf, gguf_runtime

    if gguf.is_gguf(args.model_path):  # llama.cpp (or transformers) runs it: no backend choice of ours
        model, tokenizer, info, recorded = gguf_runtime.load(args.model_path, args.max_seq_length, args.gguf_runtime)
        info["resolved"] = {**recorded_settings(args, recorded),
                            "engine": "llama.cpp" if info["backend"] == "llama.cpp" else "generate"}
        return model, tokenizer, info, {"reasonforge": recorded} if recorded else {}
    engine, backend_flag = resolve_engine(args.engine, args.backend)
    backend, backend_reason = models.choose_backend(backend_flag)
    if backend_flag != args.backend:
        backend_reason = ("--engine static runs transformers' own forward with a static KV cache "
                          "(Unsloth's patched attention keeps a cache of its own)")
    if backend == "unsloth":
        models.import_unsloth_first()
    base, adapter_dir, adapter_info = models.resolve_model_for_inference(args.model_path, args.is_adapter, args.base_model)
    resolved = {**recorded_settings(args, adapter_info.get("reasonforge", {})), "engine": engine}
    args = core.frozen(args, **resolved)
    from transformers import set_seed

    set_seed(args.seed)
    t0 = time.perf_counter()
    model, tokenizer, info = models.load_model(base, backend=backend, max_seq_length=args.max_seq_length,
                                        load_in_4bit=args.load_in_4bit, adapter_path=adapter_dir)
    info.update(load_s=round(time.perf_counter() - t0, 2), backend_reason=backend_reason, resolved=resolved)
    context = context_length(model)
    if context and args.max_new_tokens >= context:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} does not fit the model's context of {context} tokens, "
                        f"which must hold the prompt too; use a smaller value, e.g. --max-new-tokens {context // 4}")
    return prepare_for_inference(model, info["backend"]), tokenizer, info, adapter_info


# What training records beside the adapter that evaluation and chat must use the same way, with
# the value assumed where nothing is recorded (a plain model, an adapter from elsewhere).
RECORDED_DEFAULTS = {"max_seq_length": MAX_SEQ_LENGTH, "load_in_4bit": True, "train_on_responses_only": True, "long_rows": "drop"}


def recorded_settings(args, run_info: dict) -> dict:
    """Values for the flags the user left unset, from the adapter's run info, so evaluation measures
    the rows, mask and precision training used (a flag given on the command line wins), and
    `settings_source`: where each came from."""
    values, chosen = {}, {}
    for name, fallback in RECORDED_DEFAULTS.items():
        if getattr(args, name, None) is None:
            values[name] = run_info.get(name, fallback)
            chosen[name] = "recorded" if name in run_info else "default"
        else:
            chosen[name] = "flag"
    return {**values, "settings_source": chosen}


def context_length(model) -> int | None:
    """The most tokens (prompt plus reply) the model's positions cover, or None when unknown."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def fit_to_context(model, prompt_tokens: int, kwargs: dict) -> dict:
    """Generation kwargs whose max_new_tokens leaves the prompt room in the model's context.

    Past the context the model's positions run out: transformers errors or the output degrades,
    so the reply is clipped with a warning, and a prompt that fills the context alone is refused.
    """
    context = context_length(model)
    if context is None or prompt_tokens + kwargs["max_new_tokens"] <= context:
        return kwargs
    room = context - prompt_tokens
    if room < 1:
        raise UserError(f"a prompt of {prompt_tokens} tokens fills the model's context of {context} tokens; "
                        "shorten it (or its system prompt)")
    log.warning("prompt of %d tokens + --max-new-tokens %d exceed the model's context of %d tokens; "
                "generating at most %d tokens", prompt_tokens, kwargs["max_new_tokens"], context, room)
    return {**kwargs, "max_new_tokens": room}


def inference_flag_problems(args) -> list[str]:
    """Problems of the flags evaluate_model.py and test_model.py share (model, seed, generation)."""
    problems = number_problems({
        "--max-seq-length": (args.max_seq_length, lambda v: v >= 1, "a positive integer"),
        "--seed": (args.seed, lambda v: 0 <= v <= SEED_MAX, f"from 0 to {SEED_MAX}"),
    })
    return problems + GenerationSettings(args.temperature, args.top_p, args.top_k, args.max_new_tokens,
                                         args.repetition_penalty).problems()


def add_generation_flags(parser, penalty_unset_help: str | None = None) -> None:
    """The generation group. With `penalty_unset_help`, --repetition-penalty defaults to None (the
    caller tells "not given" from the default) and says so in that help."""
    g = parser.add_argument_group("generation")
    d = GenerationSettings()
    g.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=d.top_p, help="(default: %(default)s)")
    g.add_argument("--top-k", type=int, default=d.top_k, help="(default: %(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="(default: %(default)s)")
    g.add_argument("--repetition-penalty", type=float,
                   default=None if penalty_unset_help else d.repetition_penalty,
                   help=penalty_unset_help or "(default: %(default)s)")
    g.add_argument("--system-prompt", default=None, help="system message for every prompt")


def generation_settings_from_args(args) -> GenerationSettings:
    settings = GenerationSettings(args.temperature, args.top_p, args.top_k, args.max_new_tokens, args.repetition_penalty)
    if settings.problems():
        raise UserError("; ".join(settings.problems()))
    return settings


def prepare_for_inference(model, backend: str):
    if backend == "llama.cpp":
        return model
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    model.eval()
    return model


ENGINES = ("auto", "static", "generate")


def add_engine_flag(group) -> None:
    group.add_argument("--engine", choices=ENGINES, default="auto",
                       help="static: a static KV cache with the decode step replayed as a CUDA graph (reasonforge."
                            "engine); generate: transformers' generate, launch by launch (with --backend unsloth, "
                            "Unsloth's fast decode); auto: static on a GPU unless --backend unsloth, else generate "
                            "(default: %(default)s)")


def resolve_engine(requested: str, backend_flag: str) -> tuple[str, str]:
    """(engine, backend flag to load with). The static engine runs transformers' own forward:
    Unsloth replaces the attention forward with one that keeps its own KV cache (tuples), which a
    StaticCache cannot feed, so under auto the model is loaded with --backend hf for it."""
    if requested == "static" and backend_flag == "unsloth":
        raise UserError("--engine static runs transformers' forward and cannot run on Unsloth's patched model; "
                        "drop --backend unsloth (the 4-bit base and adapter load the same with --backend hf), "
                        "or pass --engine generate")
    if requested == "auto":
        import torch

        if backend_flag == "unsloth" or not torch.cuda.is_available():
            # without a GPU there is no graph to replay, and the eager static step costs a little more
            # than generate's (its attention spans the whole cache)
            log.info("generation: transformers' generate (%s)", "--backend unsloth: Unsloth's fast decode"
                     if backend_flag == "unsloth" else "no CUDA device; the static engine's gain is its CUDA graph")
            requested = "generate"
        else:
            requested = "static"
    return requested, ("hf" if requested == "static" else backend_flag)


def engine_for(model, tokenizer):
    """The model's reasonforge.engine.Engine, made once and kept on the model, so its captured
    graph and cache serve every later call of the same shape."""
    from reasonforge.engine import Engine

    engine = getattr(model, "_reasonforge_engine", None)
    if engine is None:
        engine = Engine(model, tokenizer.pad_token_id)
        model._reasonforge_engine = engine
    return engine


def generate_batch(model, tokenizer, conversations: list[list[dict]], settings: GenerationSettings,
                   batch_size: int | None = None, desc: str | None = "generating", engine: str = "auto",
                   stats: dict | None = None) -> list[dict]:
    """Generate one reply per conversation.

    Returns per conversation {response, tokens, seconds, stopped}; seconds is the batch's wall time
    shared out by generated tokens; stopped is False where the reply hit --max-new-tokens.
    `engine` "static" runs reasonforge.engine (batch None: sized from free GPU memory), "generate"
    transformers' generate (batch None: 8), "auto" static where the model is on CUDA, else generate.
    `stats`, where given, receives the run's figures (tokens, seconds, tokens_per_s, batch_size, engine).
    """
    prompts = [tokenizer(render_chat(c, tokenizer=tokenizer, add_generation_prompt=True), add_special_tokens=False)
               ["input_ids"] for c in conversations]
    if not prompts:
        return []
    # refuses a prompt that fills the context alone, warns where replies will be clipped to fit it
    fit_to_context(model, max(len(p) for p in prompts), {"max_new_tokens": settings.max_new_tokens})
    stops = stop_token_ids(tokenizer, model)
    if engine == "auto":
        engine = "static" if getattr(model, "device", None) is not None and model.device.type == "cuda" else "generate"
    started = time.perf_counter()
    if getattr(model, "is_gguf", False):
        outs = _generate_gguf(model, prompts, settings, set(stops), desc)
        figures = {"engine": "llama.cpp", "batch_size": 1}
    elif engine == "static":
        runner = engine_for(model, tokenizer)
        with progress.bar(total=len(prompts), desc=desc, unit="prompt", disable=desc is None) as bar:
            replies = runner.generate(prompts, settings, set(stops), batch_size=batch_size,
                                      context=context_length(model), on_batch=bar.update)
        outs = [(r.ids, r.stopped, r.seconds) for r in replies]
        figures = runner.stats.as_dict()
    else:
        outs = _generate_hf(model, tokenizer, prompts, settings, batch_size or 8, desc)
        figures = {"engine": "generate", "batch_size": min(batch_size or 8, len(prompts))}
    seconds = time.perf_counter() - started
    tokens = sum(len(ids) for ids, _, _ in outs)
    if stats is not None:
        stats.update(figures, tokens=tokens, seconds=round(seconds, 3),
                     tokens_per_s=round(tokens / seconds, 1) if seconds else None)
    return [{"response": tokenizer.decode(ids, skip_special_tokens=True).strip(), "tokens": len(ids),
             "seconds": secs, "stopped": stopped} for ids, stopped, secs in outs]


def planned_batch_size(model, tokenizer, conversations: list[list[dict]], settings: GenerationSettings,
                       engine: str, batch_size: int | None = None) -> int:
    """The rows generate_batch would put in one batch for these conversations: what a caller that
    saves answers batch by batch (test_model.py --batch) should hand it at a time."""
    if batch_size:
        return batch_size
    if engine != "static" or not conversations:
        return 8
    from reasonforge.engine import plan_batch_size

    longest = max(len(tokenizer(render_chat(c, tokenizer=tokenizer, add_generation_prompt=True),
                                add_special_tokens=False)["input_ids"]) for c in conversations)
    return plan_batch_size(model, len(conversations), longest + settings.max_new_tokens)[0]


def _generate_gguf(model, prompts: list[list[int]], settings, stops: set[int], desc):
    """A GGUF file under llama.cpp, one prompt at a time: [(ids, stopped, seconds)] per prompt."""
    outs = []
    with progress.bar(total=len(prompts), desc=desc, unit="prompt", disable=desc is None) as bar:
        for prompt in prompts:
            t0 = time.perf_counter()
            room = fit_to_context(model, len(prompt), {"max_new_tokens": settings.max_new_tokens})["max_new_tokens"]
            ids, stopped = model.generate(prompt, settings, stops, room)
            outs.append((ids, stopped, round(time.perf_counter() - t0, 4)))
            bar.update(1)
    return outs


def _generate_hf(model, tokenizer, prompts: list[list[int]], settings, batch_size: int, desc):
    """transformers' generate over left-padded batches: [(ids, stopped, seconds)] per prompt."""
    import torch
    kwargs = settings.generate_kwargs(tokenizer, model)
    stops = set(kwargs["eos_token_id"])
    # Longest first, so that each batch holds prompts of like length and pads little.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    by_index: dict[int, tuple] = {}
    with progress.bar(total=len(prompts), desc=desc, unit="prompt", disable=desc is None) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                     **fit_to_context(model, width, kwargs))
            seconds = time.perf_counter() - t0
            replies = [reply_tokens(row, stops) for row in out[:, width:]]
            total = max(sum(len(r) for r, _ in replies), 1)
            for i, (reply, stopped) in zip(idx, replies):
                by_index[i] = (reply, stopped, round(seconds * len(reply) / total, 4))
            bar.update(len(idx))
    return [by_index[i] for i in range(len(prompts))]


def logits_processors(settings):
    """transformers' processors for these settings, in `generate`'s order (repetition penalty,
    then temperature, top-k, top-p for sampling); None where the raw logits are used as they are."""
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    procs = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if settings.temperature > 0:
        if settings.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            procs.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            procs.append(TopPLogitsWarper(settings.top_p))
    return procs or None
