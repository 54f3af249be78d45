"""Qwen chat templates, rendering, the assistant-only training mask and loading a prepared dataset."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable

from reasonforge.core import UserError, first_line, read_json


IM_START, IM_END = "<|im_start|>", "<|im_end|>"
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Both templates cover system/user/assistant turns (no tool calls). The qwen3 one renders exactly
# what Qwen3's own template renders for such conversations: a <think> block on assistant turns
# after the last user message, emptied when there is no reasoning, dropped from earlier turns.
# Qwen2.5 has no thinking block, so a reasoning field is written in front of the answer.
QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(last_user=messages|length - 1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}"
    "{%- set content = m.content %}{%- set reasoning = '' %}"
    "{%- if m.reasoning_content is defined and m.reasoning_content is not none %}"
    "{%- set reasoning = m.reasoning_content %}"
    "{%- elif '</think>' in m.content %}"
    "{%- set content = m.content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- set reasoning = m.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_user and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}"
    "{{- '<|im_start|>assistant\\n' + content }}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

QWEN25_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN25_DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}"
    "{%- if m.reasoning_content is defined and m.reasoning_content %}"
    "{{- '<|im_start|>assistant\\n' + m.reasoning_content.strip('\\n') + '\\n\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>assistant\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

BUILTIN_TEMPLATES = {"qwen3": QWEN3_TEMPLATE, "qwen2.5": QWEN25_TEMPLATE}
ROLES = ("system", "user", "assistant")


def _jinja_env():
    # Configured as transformers configures its own, so rendering here and through
    # tokenizer.apply_chat_template gives the same bytes.
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    return env


TEMPLATE_CHOICES = ("auto", "qwen3", "qwen2.5", "tokenizer")


def single_token(tokenizer, text: str) -> bool:
    """Whether `text` is one token of the vocabulary (how Qwen3 holds <think>, and Qwen2.5 does not)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return len(ids) == 1


def template_family(tokenizer) -> str | None:
    """The built-in template that fits a tokenizer: qwen3 where <think> is one token, qwen2.5 for
    other ChatML vocabularies, None where <|im_start|> is not a token at all."""
    if single_token(tokenizer, "<think>"):
        return "qwen3"
    if single_token(tokenizer, IM_START):
        return "qwen2.5"
    return None


def template_misfit(source: str, tokenizer) -> str | None:
    """Why a template does not fit a tokenizer, or None. A thinking template on a vocabulary
    without <think> trains six ordinary tokens before every answer; the reverse drops the thinking
    block the model was tuned to expect."""
    wants_think = "<think>" in source
    has_think = single_token(tokenizer, "<think>")
    if wants_think and not has_think:
        return "it writes <think> blocks but <think> is not a token of this model"
    if has_think and not wants_think:
        return "this model has a <think> token but the template never writes a thinking block"
    if IM_START in source and not single_token(tokenizer, IM_START):
        return "it is a ChatML template but <|im_start|> is not a token of this model"
    return None


def resolve_chat_template(template: str | None = "auto", tokenizer=None) -> tuple[str, str]:
    """Return (name, jinja source) for a --chat-template value.

    `auto` is the model's own template: the tokenizer's chat_template where it has one, else the
    built-in one of its family. A built-in name is taken as asked (the caller warns on a misfit).
    """
    template = template or "auto"
    if template in BUILTIN_TEMPLATES:
        return template, BUILTIN_TEMPLATES[template]
    if template not in ("auto", "tokenizer"):
        raise UserError(f"unknown chat template {template!r}; choose one of {', '.join(TEMPLATE_CHOICES)}")
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return "model", tokenizer.chat_template
    if template == "tokenizer":
        raise UserError("--chat-template tokenizer needs a tokenizer with a chat template; pass --tokenizer PATH "
                        "or use --chat-template auto")
    if tokenizer is None:
        raise UserError("--chat-template auto needs the model's tokenizer to find its template")
    family = template_family(tokenizer)
    if family is None:
        raise UserError("the model's tokenizer has no chat template and is not a Qwen (ChatML) vocabulary; "
                        "pass --chat-template qwen2.5 or qwen3 only if it really is one")
    return family, BUILTIN_TEMPLATES[family]


def clean_messages(messages: Iterable[dict], template_source: str | None = None) -> list[dict]:
    """Keep role/content (and reasoning_content when set); arrow stores absent fields as None.

    A template that knows nothing of reasoning_content (Qwen2.5's, SmolLM2's) would silently drop
    it, so there the reasoning is written in front of the answer, as the qwen2.5 built-in does.
    """
    keeps_reasoning = template_source is None or "reasoning_content" in template_source
    out = []
    for m in messages:
        item = {"role": m["role"], "content": m.get("content") or ""}
        reasoning = m.get("reasoning_content")
        if reasoning and keeps_reasoning:
            item["reasoning_content"] = reasoning
        elif reasoning and m["role"] == "assistant":
            item["content"] = reasoning.strip("\n") + "\n\n" + item["content"]
        out.append(item)
    return out


def render_chat(
    messages: list[dict],
    template: str | None = None,
    tokenizer=None,
    add_generation_prompt: bool = False,
    enable_thinking: bool | None = None,
    source: str | None = None,
) -> str:
    """Render messages to text: with a tokenizer, through its own apply_chat_template (so the bytes
    are the model's by construction); without one, a built-in template by name. `source`, a jinja
    template's text, overrides both names."""
    if source is None and template is None and getattr(tokenizer, "chat_template", None):
        source = tokenizer.chat_template
    elif source is None:
        _, source = resolve_chat_template(template, tokenizer)
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    msgs = clean_messages(messages, source)
    if tokenizer is not None:
        return tokenizer.apply_chat_template(msgs, chat_template=source, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **kwargs)
    return _compiled_template(source).render(messages=msgs, add_generation_prompt=add_generation_prompt, **kwargs)


_TEMPLATE_CACHE: dict[str, Any] = {}


def _compiled_template(source: str):
    if source not in _TEMPLATE_CACHE:
        _TEMPLATE_CACHE[source] = _jinja_env().from_string(source)
    return _TEMPLATE_CACHE[source]


_ASSISTANT_TURN = re.compile(re.escape(IM_START + "assistant\n") + r"(.*?" + re.escape(IM_END) + ")", re.S)


def assistant_spans(text: str) -> list[tuple[int, int]]:
    """Character spans the model must learn: each assistant turn's body and its closing <|im_end|>.

    The `<|im_start|>assistant\\n` header is the generation prompt, so it is context, not target;
    the closing <|im_end|> is target, so the model learns to stop.
    """
    return [m.span(1) for m in _ASSISTANT_TURN.finditer(text)]


def tokenize_for_training(text: str, tokenizer, train_on_responses_only: bool = True,
                          last_turn_only: bool = False) -> dict[str, list[int]]:
    """Tokenize rendered chat text; labels are -100 outside the assistant spans (outside the last
    one with `last_turn_only`).

    Works on the whole text with character offsets, so token merges at turn boundaries are
    exactly those of inference-time tokenization.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if not train_on_responses_only:
        return {"input_ids": ids, "labels": list(ids)}
    spans = assistant_spans(text)
    if last_turn_only:
        spans = spans[-1:]
    labels, k = [], 0
    for tok, (start, end) in zip(ids, enc["offset_mapping"]):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        inside = k < len(spans) and spans[k][0] <= start < spans[k][1]
        labels.append(tok if inside else -100)
    return {"input_ids": ids, "labels": labels}


def load_prepared_dataset(path: Path):
    """Load a data_preparation.py folder (training and evaluation read it); returns (DatasetDict, manifest)."""
    import datasets

    if not path.is_dir():
        raise UserError(f"dataset folder {str(path)!r} does not exist; run data_preparation.py first or fix --dataset-path")
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        raise UserError(f"{path} has no manifest.json: it is not a complete data_preparation.py output; prepare it again")
    try:
        dd = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise UserError(f"cannot load dataset from {path} ({first_line(exc, 160)}); the folder is damaged or "
                        "incomplete: prepare it again with data_preparation.py") from exc
    missing = [s for s in ("train", "validation") if s not in dd]
    if missing:
        raise UserError(f"dataset {path} lacks split(s) {missing} (has {list(dd)}); re-run data_preparation.py")
    for split in ("train", "validation"):
        if "messages" not in dd[split].column_names:
            raise UserError(f"split {split!r} of {path} has no 'messages' column (columns: {dd[split].column_names})")
        if len(dd[split]) == 0:
            raise UserError(f"split {split!r} of {path} is empty; prepare more data or change --val-size")
    return dd, read_json(manifest_file, "dataset manifest", "prepare the dataset again with data_preparation.py")


def training_turns(messages: list[dict], tokenizer, source: str | None = None) -> list[list[dict]]:
    """The conversations one row is trained as, each ending in the assistant turn it teaches.

    One (the row itself) where the template renders every earlier assistant turn exactly as it
    rendered that turn when it was the last. A template that rewrites history does not: Qwen3's
    drops the <think> block of earlier turns, so in the whole conversation an earlier reply sits
    as a bare answer right after `<|im_start|>assistant\\n`, where at inference the model opens
    <think>. Such a row becomes one conversation per assistant turn, cut after it, so every target
    is rendered as the model would produce it then, earlier reasoning included (TRAINING_GUIDE,
    "Multi-turn rows").
    """
    ends = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if len(ends) < 2:
        return [messages]
    whole = render_chat(messages, tokenizer=tokenizer, source=source)
    if all(whole.startswith(render_chat(messages[:i + 1], tokenizer=tokenizer, source=source)) for i in ends[:-1]):
        return [messages]
    return [messages[:i + 1] for i in ends]


def encode_rows(messages: list[dict], tokenizer, train_on_responses_only: bool = True, limit: int | None = None,
                source: str | None = None) -> list[dict]:
    """A conversation as the rows training learns from (see training_turns), rendered with `source`
    (default: the tokenizer's template). Training and evaluate_model.py's perplexity share it, so
    both see the same tokens and mask.

    With `limit`, ids and labels are cut to it and each row also carries its full length
    (`n_tokens`) and the target tokens left after the cut (`n_target`), for keeps_row.
    """
    turns = training_turns(messages, tokenizer, source)
    out = []
    for conversation in turns:
        text = render_chat(conversation, tokenizer=tokenizer, source=source)
        enc = tokenize_for_training(text, tokenizer, train_on_responses_only, last_turn_only=len(turns) > 1)
        if limit is not None:
            labels = enc["labels"][:limit]
            enc = {"input_ids": enc["input_ids"][:limit], "labels": labels, "n_tokens": len(enc["input_ids"]),
                   "n_target": sum(1 for x in labels if x != -100)}
        out.append(enc)
    return out


def encode_conversation(messages: list[dict], tokenizer, train_on_responses_only: bool = True,
                        limit: int | None = None, source: str | None = None) -> dict:
    """One conversation as one row, every assistant turn a target (see encode_rows for what training uses)."""
    enc = tokenize_for_training(render_chat(messages, tokenizer=tokenizer, source=source), tokenizer,
                                train_on_responses_only)
    if limit is None:
        return enc
    labels = enc["labels"][:limit]
    return {"input_ids": enc["input_ids"][:limit], "labels": labels, "n_tokens": len(enc["input_ids"]),
            "n_target": sum(1 for x in labels if x != -100)}


def map_fingerprint(ds, tokenizer, *settings) -> str:
    """The fingerprint for a `map` over `ds` whose function holds `tokenizer`.

    Left to make its own, datasets pickles the function with everything it captures to hash it,
    the tokenizer's whole vocabulary included: about 4.5 s per split for Qwen's, paid by every run
    before its first step. The rows' own fingerprint, the tokenizer's name and size and the settings
    that shape the output identify the result just as well.
    """
    key = [ds._fingerprint, getattr(tokenizer, "name_or_path", None), len(tokenizer) if tokenizer is not None else None,
           _code_digest(), *map(str, settings)]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """The code that turns rows into messages and tokens, and the tokenizer library's version: with
    only the data and settings in the fingerprint, a rerun after an upgrade or a fix was served the
    old rows from the datasets cache."""
    from importlib.metadata import version

    h = hashlib.sha256(version("transformers").encode())
    for name in ("chat_format.py", "conversations.py", "sft.py", "grpo.py"):
        h.update((Path(__file__).with_name(name)).read_bytes())
    return h.hexdigest()[:16]


def keeps_row(row: dict, limit: int, long_rows: str) -> bool:
    """--long-rows, the same in training and evaluation: a row over `limit` goes under `drop` and
    stays cut under `truncate`; a row with no target token left goes either way."""
    return row["n_target"] > 0 and not (row["n_tokens"] > limit and long_rows == "drop")
