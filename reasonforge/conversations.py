"""Rows to chat conversations: schema detection, cell and turn text, formatting and its drops, deduplication, the prompt-disjoint split and the content digest."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import statistics
import unicodedata

from reasonforge import chat_format
from reasonforge.core import UserError

log = logging.getLogger("reasonforge.data")

TARGETS = ("system", "user", "assistant", "reasoning", "answer")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}

# Qwen's special tokens are all spelled <|name|>. Inside a message they are tokenized as the real
# markers, so `<|im_end|><|im_start|>system` in a user turn would open a system turn in training.
# (<think> is an ordinary added token that the data may use.)
CONTROL_TOKEN = re.compile(r"<\|[a-z_]+\|>")
TEXT_PART_TYPES = ("text", "input_text", "output_text")  # OpenAI chat / responses spellings

# Known flat schemas, tried in order: (columns that must be present, column -> target).
FLAT_SCHEMAS = [
    ("alpaca", ("instruction", "output"), {"instruction": "user", "output": "assistant", "system": "system"}),
    ("question/answer", ("question", "answer"),
     {"question": "user", "answer": "assistant", "reasoning": "reasoning", "solution": "reasoning", "system": "system"}),
    ("question/solution", ("question", "solution"), {"question": "user", "solution": "assistant", "system": "system"}),
    ("problem/solution", ("problem", "solution"),
     {"problem": "user", "solution": "assistant", "answer": "answer", "system": "system"}),
    ("prompt/response", ("prompt", "response"), {"prompt": "user", "response": "assistant", "system": "system"}),
    ("prompt/completion", ("prompt", "completion"), {"prompt": "user", "completion": "assistant", "system": "system"}),
]


def detect_schema(columns: list[str], column_map: dict[str, str] | None) -> tuple[str, dict[str, str]]:
    """Return (schema name, column -> target). Conversation columns map to 'conversation'."""
    if column_map:
        missing = [c for c in column_map if c not in columns]
        if missing:
            raise UserError(f"--column-map names columns {missing} that are not in the data (columns: {columns})")
        if "user" not in column_map.values() or "assistant" not in column_map.values():
            raise UserError("--column-map must map one column to user and one to assistant, e.g. question=user,answer=assistant")
        for target in dict.fromkeys(column_map.values()):
            cols = [c for c, t in column_map.items() if t == target]
            if len(cols) > 1:  # only the first would be kept: the others' text would vanish from every row
                raise UserError(f"--column-map maps {' and '.join(cols)} all to {target}; map one column to each role "
                                f"(join {' and '.join(cols)} into one column first if the {target} turn needs both)")
        return "column-map", dict(column_map)
    for conv in ("messages", "conversations", "conversation"):
        if conv in columns:
            mapping = {conv: "conversation"}
            if "answer" in columns:
                mapping["answer"] = "answer"
            return conv, mapping
    for name, required, mapping in FLAT_SCHEMAS:
        if all(c in columns for c in required):
            m = {c: t for c, t in mapping.items() if c in columns}
            if name == "question/answer":
                m["answer"] = "assistant"
            return name, m
    text_cols = ", ".join(columns)
    guess_asst = next((c for c in columns if c.lower() in ("output", "target", "label", "reply", "answer", "response")),
                      columns[-1] if len(columns) > 1 else "COLUMN_B")
    guess_user = next((c for c in columns if c != guess_asst), "COLUMN_A")
    raise UserError(
        f"unrecognised schema; columns found: {text_cols}. Map them explicitly, e.g. "
        f"--column-map {guess_user}=user,{guess_asst}=assistant"
    )


class NonTextContent(UserError):
    """A turn holds image/audio parts; format_dataset counts such rows before refusing them."""

    def __init__(self, kinds: list[str]):
        super().__init__(f"a turn holds non-text content parts ({', '.join(kinds)}); this pipeline trains text-only models")
        self.kinds = kinds


def _preview(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def cell_text(value, where: str) -> str:
    """The text of one cell or content value. None and NaN are missing (""); 3.0 is "3".

    Parquet stores a numeric column with gaps as floats, so an answer of 3 arrives as 3.0 and a
    missing one as NaN; str() would train the model on "3.0" and "nan".
    """
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (str, int)):  # bool is an int: True stays "True"
        return str(value)
    raise UserError(f"{where} holds a {type(value).__name__} ({_preview(value)}), not text; "
                    "map a text column, or turn the value into text before preparing the data")


def content_text(content, where: str) -> str:
    """Text of a message's content: a string, a number, or OpenAI-style content parts.

    Text parts are joined without a separator, as Qwen's own (vision) chat templates render them.
    """
    if not isinstance(content, list):
        return cell_text(content, where)
    texts, other = [], []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and (part.get("type") in TEXT_PART_TYPES or (part.get("type") is None and "text" in part)):
            texts.append(cell_text(part.get("text"), where))
        else:
            other.append(str(part.get("type")) if isinstance(part, dict) else type(part).__name__)
    if other:
        raise NonTextContent(other)
    return "".join(texts)


def conversation_to_messages(turns) -> list[dict]:
    if isinstance(turns, (str, dict)):
        raise UserError(f"a conversation is a {type(turns).__name__} ({_preview(turns)}), not a list of turns; "
                        'write it as [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]')
    out = []
    for i, t in enumerate(turns or []):
        if not isinstance(t, dict):
            raise UserError(f"conversation turn {i} is a {type(t).__name__} ({_preview(t)}), not an object; "
                            'write each turn as {"role": "user", "content": "..."} (or ShareGPT\'s "from"/"value")')
        if "role" in t and t.get("role") is not None:
            role, content = t["role"], t.get("content")
        else:
            role, content = SHAREGPT_ROLES.get(str(t.get("from", "")).lower()), t.get("value")
        if role not in chat_format.ROLES:
            raise UserError(f"conversation turn with unknown role {t.get('role') or t.get('from')!r}; use system/user/assistant")
        reasoning = t.get("reasoning_content")
        out.append({"role": role, "content": content_text(content, f"a {role} turn's content"),
                    "reasoning_content": cell_text(reasoning, f"a {role} turn's reasoning_content") if reasoning is not None else None})
    return out


def has_control_tokens(messages: list[dict]) -> bool:
    return any(CONTROL_TOKEN.search(m.get(k) or "") for m in messages for k in ("content", "reasoning_content"))


def check_column_types(features, mapping: dict[str, str]) -> None:
    """Refuse columns whose values cannot become message text, naming the column and the fix."""
    import datasets

    for col, target in mapping.items():
        feature = features.get(col)
        if feature is None or isinstance(feature, datasets.Json):
            continue  # a column of mixed types: each value is checked as it is converted
        if target == "conversation":
            inner = getattr(feature, "feature", None)
            if isinstance(feature, datasets.Value):
                raise UserError(f"column {col!r} holds {feature.dtype} values, not lists of turns; each row needs "
                                '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]')
            if isinstance(inner, datasets.Value):
                raise UserError(f"column {col!r} holds turns as plain {inner.dtype}s, with no roles; write each turn as "
                                '{"role": "user", "content": "..."}, or map flat columns with --column-map')
        elif not isinstance(feature, datasets.Value):
            kind = "list" if hasattr(feature, "feature") else "struct" if isinstance(feature, dict) else type(feature).__name__
            raise UserError(f"column {col!r} holds {kind} values but is mapped to {target}, which needs text; "
                            "map a text column instead, or turn that column into text before preparing the data")


def row_to_messages(row: dict, mapping: dict[str, str], args) -> tuple[list[dict], str]:
    """Return (messages, reference answer) for one row."""
    reference = ""
    conv_col = next((c for c, t in mapping.items() if t == "conversation"), None)
    if conv_col:
        messages = conversation_to_messages(row[conv_col])
    else:
        by_target: dict[str, str] = {}
        for col, target in mapping.items():
            value = cell_text(row.get(col), f"column {col!r}").strip()
            if value:
                by_target.setdefault(target, value)
        user = by_target.get("user", "")
        extra_input = cell_text(row.get("input"), "column 'input'").strip() if "input" in row else ""
        if extra_input and mapping.get("instruction") == "user":
            user = f"{user}\n\n{extra_input}"
        assistant = by_target.get("assistant", "")
        code = cell_text(row.get("code"), "column 'code'").strip() if args.include_code else ""
        if code:
            assistant = f"{assistant}\n\n```python\n{code}\n```"
        if "reasoning" in by_target and mapping.get("answer") == "assistant" and assistant:
            # an empty answer stays empty, so the row is dropped as one without an answer (not trained as "Answer: ")
            assistant = f"Answer: {assistant}"
        messages = []
        if by_target.get("system"):
            messages.append({"role": "system", "content": by_target["system"], "reasoning_content": None})
        messages.append({"role": "user", "content": user, "reasoning_content": None})
        messages.append({"role": "assistant", "content": assistant, "reasoning_content": by_target.get("reasoning")})
    for col, target in mapping.items():
        if (target == "answer" or col == "answer") and row.get(col) is not None:
            reference = cell_text(row[col], f"column {col!r}").strip()
    if args.system_prompt and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": args.system_prompt, "reasoning_content": None})
    return messages, reference


def format_dataset(ds, mapping: dict[str, str], args, template: str, tokenizer):
    """Map rows to messages/text/answer, keeping scalar metadata columns; flag rows to drop.

    `template` is the jinja source of the `text` preview."""
    consumed = set(mapping) | ({"input"} if "instruction" in mapping else set()) | ({"code"} if args.include_code else set())
    keep = [c for c, f in ds.features.items() if c not in consumed and getattr(f, "dtype", None) in ("string", "int64", "int32", "bool", "float64")]

    check_column_types(ds.features, mapping)

    def convert(row):
        try:
            messages, reference = row_to_messages(row, mapping, args)
        except NonTextContent as exc:
            return {"messages": [], "text": "", "answer": "", "n_tokens": -1, "_drop": "non_text:" + ",".join(exc.kinds),
                    **row_keys([])}
        roles = [m["role"] for m in messages]
        reason = ""
        if "user" not in roles or "assistant" not in roles or any(not m["content"].strip() for m in messages if m["role"] != "system"):
            reason = "empty_or_missing_turn"
        elif has_control_tokens(messages):
            reason = "control_tokens"
        text = chat_format.render_chat(messages, tokenizer=tokenizer, source=template) if not reason else ""
        n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"]) if tokenizer is not None and text else -1
        return {"messages": messages, "text": text, "answer": reference, "n_tokens": n_tokens, "_drop": reason,
                **row_keys(messages)}

    drop_cols = [c for c in ds.column_names if c not in keep]
    settings = sorted((k, str(v)) for k, v in vars(args).items())
    out = ds.map(convert, remove_columns=drop_cols, desc="formatting",
                 new_fingerprint=chat_format.map_fingerprint(ds, tokenizer, "prepare", mapping, settings, template, keep))
    refuse_non_text(out["_drop"])
    return out, keep


def refuse_non_text(reasons: list[str]) -> None:
    """Image/audio turns would train the model to answer about media it never sees: refuse, counted."""
    media = [r.split(":", 1)[1] for r in reasons if r.startswith("non_text:")]
    if media:
        kinds = sorted({k for r in media for k in r.split(",")})
        raise UserError(f"{len(media)} of {len(reasons)} rows hold non-text content parts ({', '.join(kinds)}); "
                        "this pipeline trains text-only chat models: remove those rows or their non-text parts first")


KEY_COLUMNS = ("_digest", "_prompt", "_prompt_raw")


def row_keys(messages: list[dict]) -> dict[str, str]:
    """Short keys computed once per row, so that deduplication and the split never hold every
    conversation in memory at once: the whole row's digest, its prompt key and its raw prompt's digest."""
    raw = first_user_turn(messages)
    whole = json.dumps(chat_format.clean_messages(messages), sort_keys=True)
    return {"_digest": hashlib.sha1(whole.encode()).hexdigest(), "_prompt": prompt_key(messages),
            "_prompt_raw": hashlib.sha1(raw.encode()).hexdigest()}


def filter_rows(ds, args, tokenizer) -> tuple[object, dict[str, int], int]:
    """Drop empty rows, over-long rows (if asked) and exact duplicates; return counts by reason."""
    dropped: dict[str, int] = {}
    too_long = args.max_seq_length if tokenizer is not None else None
    seen: set[str] = set()
    keep_idx = []
    for i, (digest, reason, n_tok) in enumerate(zip(ds["_digest"], ds["_drop"], ds["n_tokens"])):
        if not reason and too_long and n_tok > too_long and args.long_rows == "drop":
            reason = "too_long"
        if not reason:
            if digest in seen:
                reason = "duplicate"
            seen.add(digest)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
        else:
            keep_idx.append(i)
    ds = ds.select(keep_idx).remove_columns(["_drop"])
    return ds, dropped, dropped.get("duplicate", 0)


def token_stats(lengths: list[int], limit: int) -> dict:
    if not lengths or lengths[0] < 0:
        return {}
    s = sorted(lengths)
    return {"min": s[0], "mean": round(statistics.fmean(s), 1), "p50": s[len(s) // 2], "p95": s[int(0.95 * (len(s) - 1))],
            "max": s[-1], "over_max_seq_length": sum(1 for x in s if x > limit), "max_seq_length": limit}


def preview_template(args, tokenizer) -> tuple[str, str]:
    """The template of the `text` preview: the tokenizer's own where one is given, else the one named,
    else qwen2.5 (the seed model's family). A named one that does not fit the tokenizer is warned about."""
    if args.chat_template == "auto" and tokenizer is None:
        return "qwen2.5 (preview only)", chat_format.QWEN25_TEMPLATE
    name, source = chat_format.resolve_chat_template(args.chat_template, tokenizer)
    misfit = chat_format.template_misfit(source, tokenizer) if tokenizer is not None else None
    if misfit:
        log.warning("--chat-template %s does not fit --tokenizer %s: %s", name, args.tokenizer, misfit)
    return name, source


def first_user_turn(messages: list[dict]) -> str:
    return next((m["content"] or "" for m in messages if m["role"] == "user"), "")


def prompt_key(messages: list[dict]) -> str:
    """What makes two rows the same question: their first user turn, case-folded, whitespace
    collapsed. Not all user turns: two conversations that open alike and branch later share their
    opening exchange, which either side would then hold."""
    return " ".join(unicodedata.normalize("NFKC", first_user_turn(messages)).casefold().split())


def split_by_prompt(prompts: list[str], raw_prompts: list[str], val_size: float,
                    seed: int) -> tuple[list[int], list[int], dict]:
    """Train/validation indices such that no prompt lands on both sides.

    `prompts` are the rows' prompt keys (prompt_key), `raw_prompts` digests of their prompts as
    written. Rows are grouped by prompt key; whole groups are drawn at random into validation until
    it holds round(n * val_size) rows. Returns the indices and the counts the manifest records.
    """
    groups: dict[str, list[int]] = {}
    spellings: dict[str, set[str]] = {}
    for i, (key, raw) in enumerate(zip(prompts, raw_prompts)):
        groups.setdefault(key, []).append(i)
        spellings.setdefault(key, set()).add(raw)
    n, target = len(prompts), int(round(len(prompts) * val_size))
    if n < 2 or target < 1 or len(groups) < 2:
        raise UserError(f"{n} usable rows ({len(groups)} distinct prompts) with --val-size {val_size} leave an empty "
                        "split; use more data or a different --val-size")
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    val: list[int] = []
    for key in keys:
        if len(val) + len(groups[key]) <= target:
            val += groups[key]
        if len(val) >= target:
            break
    if not val:  # every group is larger than the target: take the smallest one
        val = list(min(groups.values(), key=len))
    chosen = set(val)
    train = [i for key in keys for i in groups[key] if i not in chosen]
    if not train:
        raise UserError(f"{n} rows share too few prompts to leave a train split; use more data or a smaller --val-size")
    overlap = {prompts[i] for i in train} & {prompts[i] for i in val}
    stats = {"prompt_groups": len(groups),
             "rows_sharing_a_prompt": sum(len(g) for g in groups.values() if len(g) > 1),
             "near_duplicate_prompts": sum(len(v) - 1 for v in spellings.values()),
             "validation_prompts_also_in_train": len(overlap)}
    return train, val, stats


def content_hash(dd) -> str:
    """A digest of what training reads (messages and answers), independent of the preview's template;
    read in batches, so a large dataset is never held whole as Python objects."""
    h = hashlib.sha256()
    for split in ("train", "validation"):
        for batch in dd[split].select_columns(["messages", "answer"]).iter(batch_size=2000):
            for messages, answer in zip(batch["messages"], batch["answer"]):
                h.update(json.dumps([chat_format.clean_messages(messages), answer], sort_keys=True).encode())
                h.update(b"\0")
    return h.hexdigest()
