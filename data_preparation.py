"""Turn an instruction/reasoning dataset into Qwen chat format, split it, save it, upload it.

    # the built-in offline sample (no network), kept local
    python data_preparation.py --dataset sample --max-samples 1000 --skip-upload

    # the seed's dataset from the Hub, uploaded to S3 under a timestamped prefix
    python data_preparation.py --dataset "TuringEnterprises/Turing-Open-Reasoning" --s3-bucket my-bucket --val-size 0.1

    # local files, with an explicit mapping and token-length checks against a tokenizer
    python data_preparation.py --dataset data/*.jsonl --column-map prompt=user,reply=assistant \
        --tokenizer Qwen/Qwen2.5-Coder-3B-Instruct --max-seq-length 2048 --skip-upload

The output folder holds a datasets `DatasetDict` (train, validation), `manifest.json` and
`preview.jsonl`. It appears only once complete; `train_lora.py` refuses a folder without a manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import re
import statistics
import sys
import time
import unicodedata
from pathlib import Path

import utils
from utils import UserError

log = logging.getLogger("reasonforge.data")

DEFAULT_OUTPUT = "./data_cache/processed_reasoning"
DEFAULT_DATASET = "sample"
FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("source")
    src.add_argument("--dataset", default=DEFAULT_DATASET,
                     help="Hub id, a .json/.jsonl/.csv/.parquet file, a folder of them, a save_to_disk folder, "
                          "or 'sample' / 'sample-easy' for a built-in offline set: multi-step or one-step word "
                          "problems (default: %(default)s)")
    src.add_argument("--split", default="train", help="source split to read (default: %(default)s)")
    src.add_argument("--max-samples", type=int, default=None, help="keep at most this many rows (default: all)")
    src.add_argument("--column-map", default=None,
                     help="COLUMN=TARGET pairs; targets: system,user,assistant,reasoning,answer "
                          "(e.g. question=user,answer=assistant)")
    src.add_argument("--include-code", action="store_true",
                     help="append a `code` column to the assistant answer as a python block")
    fmt = p.add_argument_group("formatting")
    fmt.add_argument("--chat-template", default="auto", choices=list(utils.TEMPLATE_CHOICES),
                     help="template of the `text` preview column; auto = --tokenizer's own template, else qwen2.5 "
                          "for the preview. Training renders the stored messages with the model's own template "
                          "(default: %(default)s)")
    fmt.add_argument("--system-prompt", default=None, help="system message added to rows that have none")
    fmt.add_argument("--tokenizer", default=None, help="tokenizer (Hub id or folder) to measure token lengths")
    fmt.add_argument("--max-seq-length", type=int, default=2048, help="token limit checked with --tokenizer (default: %(default)s)")
    fmt.add_argument("--long-rows", choices=["drop", "keep"], default="drop",
                     help="what to do with rows over --max-seq-length (default: %(default)s)")
    out = p.add_argument_group("output")
    out.add_argument("--val-size", type=float, default=0.1, help="validation fraction, in (0, 1) (default: %(default)s)")
    out.add_argument("--seed", type=int, default=42, help="shuffle/split seed (default: %(default)s)")
    out.add_argument("--output-dir", default=DEFAULT_OUTPUT, help="local output folder (default: %(default)s)")
    out.add_argument("--s3-bucket", default=None, help="bucket to upload to (needs credentials)")
    out.add_argument("--s3-prefix", default=None,
                     help="key prefix (default: datasets/processed_reasoning_<UTC YYYYmmdd_HHMMSS>)")
    out.add_argument("--skip-upload", action="store_true", help="do not upload to S3")
    p.add_argument("--verbose", action="store_true")
    return p


def validate_args(args) -> None:
    problems = []
    if not 0 < args.val_size < 1:
        problems.append(f"--val-size {args.val_size} must be between 0 and 1 (exclusive), e.g. 0.1")
    if args.max_samples is not None and args.max_samples < 2:
        problems.append(f"--max-samples {args.max_samples} must be at least 2 (one row per split)")
    if args.max_seq_length < 16:
        problems.append(f"--max-seq-length {args.max_seq_length} is too small; use at least 16")
    problems += utils.number_problems({"--seed": (args.seed, lambda v: 0 <= v <= utils.SEED_MAX, f"from 0 to {utils.SEED_MAX}")})
    if args.chat_template == "tokenizer" and not args.tokenizer:
        problems.append("--chat-template tokenizer needs --tokenizer PATH")
    if args.s3_bucket:
        utils.validate_bucket_name(args.s3_bucket)
    if args.s3_prefix is not None:
        problems += filter(None, [utils.s3_key_problem(args.s3_prefix, "--s3-prefix")])
    if args.column_map:
        bad = {k: v for k, v in utils.parse_key_value_list(args.column_map, "--column-map").items() if v not in TARGETS}
        if bad:
            problems.append(f"--column-map targets {bad} unknown; use {', '.join(TARGETS)}")
    problems += filter(None, [utils.output_dir_problem(args.output_dir, is_prepared_dataset, "a data_preparation.py output")])
    if problems:
        raise UserError("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


UTF_BOMS = [(b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"), (b"\xff\xfe", "utf-16"),
             (b"\xfe\xff", "utf-16")]


def check_utf8(path: Path) -> None:
    """Refuse a text file that is not UTF-8, naming where it breaks and how to convert it."""
    import codecs

    with open(path, "rb") as fh:
        head = fh.read(4)
        for bom, encoding in UTF_BOMS:
            if head.startswith(bom):
                raise UserError(f"{path} is {encoding.upper()} text, not UTF-8; convert it: "
                                f"iconv -f {encoding} -t utf-8 {path} > {path.with_suffix('.utf8' + path.suffix)}")
        fh.seek(0)
        decoder, offset, lineno = codecs.getincrementaldecoder("utf-8")(), 0, 1
        for block in iter(lambda: fh.read(1 << 20), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                bad = offset + exc.start
                lineno += block[:exc.start].count(b"\n")
                raise UserError(
                    f"{path} is not UTF-8 (byte 0x{block[exc.start]:02x} at line {lineno}, byte offset {bad}); convert it, "
                    f"e.g. iconv -f latin1 -t utf-8 {path} > {path.with_suffix('.utf8' + path.suffix)} (latin1 or cp1252 for Western text)"
                ) from None
            offset += len(block)
            lineno += block.count(b"\n")


def check_json_file(path: Path) -> None:
    """Find the first malformed record of a JSON / JSON-lines file and name its line."""
    check_utf8(path)
    with open(path, encoding="utf-8") as fh:
        head = fh.read(1 << 16).lstrip()
    if not head:
        raise UserError(f"dataset file {path} is empty; point --dataset at a file with records")
    if head.startswith("["):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"malformed JSON in {path} at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
        except RecursionError:
            raise UserError(f"{path} nests JSON arrays/objects deeper than the parser allows (about "
                            f"{sys.getrecursionlimit()} levels); a chat record needs a few: flatten the data") from None
        return
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"malformed JSON line in {path} at line {lineno}: {exc.msg}; fix or remove that line") from exc
            except RecursionError:
                raise UserError(f"{path} line {lineno} nests JSON arrays/objects deeper than the parser allows (about "
                                f"{sys.getrecursionlimit()} levels); a chat record needs a few: flatten or remove it") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path} line {lineno} is not a JSON object; each line must be one {{...}} record")


def local_data_files(path: Path) -> tuple[str, list[str]]:
    if path.is_file():
        kind = FILE_TYPES.get(path.suffix.lower())
        if kind is None:
            raise UserError(f"unsupported file type {path.suffix!r} for {path}; use .json, .jsonl, .csv or .parquet")
        return kind, [str(path)]
    files = sorted(f for f in path.iterdir() if f.suffix.lower() in FILE_TYPES)
    kinds = {FILE_TYPES[f.suffix.lower()] for f in files}
    if not files:
        raise UserError(f"folder {path} holds no .json/.jsonl/.csv/.parquet files and is not a save_to_disk folder")
    if len(kinds) > 1:
        raise UserError(f"folder {path} mixes file types {sorted(kinds)}; keep one type per folder")
    return kinds.pop(), [str(f) for f in files]


def load_source(args):
    """Return (Dataset, source description)."""
    import datasets

    name = args.dataset
    if name in ("sample", "sample-easy"):
        import sample_data

        n = args.max_samples or 3000
        return datasets.Dataset.from_list(sample_data.sample_rows(n, seed=1234, level=name)), f"builtin:{name}"
    path = Path(name).expanduser()
    if utils.path_kind(name) == "local" or path.suffix.lower() in FILE_TYPES:
        if not path.exists():
            raise UserError(f"dataset path {name!r} does not exist; pass a file, a folder, a Hub id or 'sample'")
        return load_local(path, args.split), f"local:{path.resolve()}"
    try:
        ds = datasets.load_dataset(name, split=args.split)
    except ValueError as exc:
        raise UserError(f"dataset {name!r} has no split {args.split!r}: {utils.first_line(exc)}") from exc
    except Exception as exc:  # the Hub raises many kinds: offline, gated, missing
        raise UserError(
            f"cannot load {name!r} from the Hugging Face Hub ({type(exc).__name__}: {utils.first_line(exc, 200)}); "
            "check the id and network, or pass a local file / 'sample'"
        ) from exc
    return ds, f"hub:{name}"


def load_local(path: Path, split: str):
    import datasets

    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:  # datasets raises file, JSON and arrow errors for a damaged folder
            raise UserError(f"cannot load the save_to_disk folder {path} ({type(exc).__name__}: "
                            f"{utils.first_line(exc, 160)}); save it again or point --dataset at the source files") from exc
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UserError(f"{path} has splits {list(loaded)}, not {split!r}; pass --split NAME")
            return loaded[split]
        return loaded
    kind, files = local_data_files(path)
    if kind == "json":
        for f in files:
            check_json_file(Path(f))
    elif kind == "csv":
        for f in files:
            check_utf8(Path(f))
    try:
        return datasets.load_dataset(kind, data_files=files, split="train")
    except Exception as exc:
        raise UserError(f"cannot read {path} as {kind}: {utils.first_line(exc)}") from exc


# ---------------------------------------------------------------------------------------------
# Schema detection and conversion to messages
# ---------------------------------------------------------------------------------------------


def detect_schema(columns: list[str], column_map: dict[str, str] | None) -> tuple[str, dict[str, str]]:
    """Return (schema name, column -> target). Conversation columns map to 'conversation'."""
    if column_map:
        missing = [c for c in column_map if c not in columns]
        if missing:
            raise UserError(f"--column-map names columns {missing} that are not in the data (columns: {columns})")
        if "user" not in column_map.values() or "assistant" not in column_map.values():
            raise UserError("--column-map must map one column to user and one to assistant, e.g. question=user,answer=assistant")
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
        if role not in utils.ROLES:
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
        if "reasoning" in by_target and mapping.get("answer") == "assistant":
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
        text = utils.render_chat(messages, tokenizer=tokenizer, source=template) if not reason else ""
        n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"]) if tokenizer is not None and text else -1
        return {"messages": messages, "text": text, "answer": reference, "n_tokens": n_tokens, "_drop": reason,
                **row_keys(messages)}

    drop_cols = [c for c in ds.column_names if c not in keep]
    out = ds.map(convert, remove_columns=drop_cols, desc="formatting")
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
    raw = "\n".join(m["content"] for m in messages if m["role"] == "user")
    whole = json.dumps(utils.clean_messages(messages), sort_keys=True)
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
        return "qwen2.5 (preview only)", utils.QWEN25_TEMPLATE
    name, source = utils.resolve_chat_template(args.chat_template, tokenizer)
    misfit = utils.template_misfit(source, tokenizer) if tokenizer is not None else None
    if misfit:
        log.warning("--chat-template %s does not fit --tokenizer %s: %s", name, args.tokenizer, misfit)
    return name, source


def prompt_key(messages: list[dict]) -> str:
    """What makes two rows the same question: their user turns, case-folded, whitespace collapsed."""
    users = "\n".join(m["content"] for m in messages if m["role"] == "user")
    return " ".join(unicodedata.normalize("NFKC", users).casefold().split())


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
                h.update(json.dumps([utils.clean_messages(messages), answer], sort_keys=True).encode())
                h.update(b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------


def load_tokenizer(name: str | None):
    if not name:
        return None
    from transformers import AutoTokenizer

    utils.check_model_path(name, ("tokenizer_config.json", "tokenizer.json"), "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:
        raise UserError(f"cannot load tokenizer {name!r}: {utils.first_line(exc, 200)}") from exc


def prepare(args):
    """Load, convert, filter and split. Returns (DatasetDict, manifest)."""
    import datasets

    raw, source = load_source(args)
    if len(raw) == 0:
        raise UserError(f"dataset {args.dataset!r} split {args.split!r} is empty")
    n_input = len(raw)
    if args.max_samples and len(raw) > args.max_samples:
        raw = raw.shuffle(seed=args.seed).select(range(args.max_samples))
    column_map = utils.parse_key_value_list(args.column_map, "--column-map") if args.column_map else None
    schema, mapping = detect_schema(raw.column_names, column_map)
    tokenizer = load_tokenizer(args.tokenizer)
    template_name, template_source = preview_template(args, tokenizer)
    formatted, kept_meta = format_dataset(raw, mapping, args, template_source, tokenizer)
    filtered, dropped, n_dupes = filter_rows(formatted, args, tokenizer)
    train_idx, val_idx, split_stats = split_by_prompt(filtered["_prompt"], filtered["_prompt_raw"], args.val_size,
                                                      args.seed)
    filtered = filtered.remove_columns(list(KEY_COLUMNS))
    dd = datasets.DatasetDict({"train": filtered.select(train_idx), "validation": filtered.select(val_idx)})
    manifest = {
        "source": source,
        "split": args.split,
        "schema": schema,
        "column_mapping": mapping,
        "metadata_columns": kept_meta,
        "arguments": utils.redact_secrets(vars(args)),
        "counts": {"input_rows": n_input, "sampled_rows": len(raw), "kept_rows": len(filtered),
                   "train": len(dd["train"]), "validation": len(dd["validation"])},
        "dropped": dropped,
        "duplicates_removed": n_dupes,
        "token_lengths": token_stats(list(filtered["n_tokens"]), args.max_seq_length),
        "tokenizer": args.tokenizer,
        "split_by_prompt": split_stats,
        # The preview's template only: training renders `messages` with the model's own template.
        "chat_template": {"name": template_name, "sha256": hashlib.sha256(template_source.encode()).hexdigest(),
                          "source": template_source, "explicit": args.chat_template in utils.BUILTIN_TEMPLATES},
        "reference_answers": sum(1 for a in filtered["answer"] if a),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    manifest["content_sha256"] = content_hash(dd)
    return dd, manifest


def is_prepared_dataset(folder: Path) -> bool:
    """An earlier output of this script, which a rerun may replace: recognised by its manifest."""
    return utils.holds_json(folder, "manifest.json", "content_sha256", "counts")


def save(dd, manifest: dict, output_dir: str) -> Path:
    """Write the dataset, preview and manifest into a scratch folder, then move it into place."""
    final = Path(output_dir)
    with utils.atomic_directory(final, is_prepared_dataset, "a data_preparation.py output") as tmp:
        dd.save_to_disk(str(tmp))
        preview = [json.dumps({"messages": r["messages"], "text": r["text"], "answer": r["answer"]}, ensure_ascii=False)
                   for r in dd["train"].select(range(min(5, len(dd["train"]))))]
        (tmp / "preview.jsonl").write_text("\n".join(preview) + "\n", encoding="utf-8")
        # Written last: its presence is what marks the folder complete.
        utils.atomic_write_json(tmp / "manifest.json", manifest)
    return final


def upload(output_dir: Path, args) -> str:
    prefix = (args.s3_prefix or f"datasets/processed_reasoning_{utils.utc_stamp()}").strip("/")
    uri = utils.S3Uri(args.s3_bucket, prefix)
    stats = utils.upload_directory(output_dir, uri, desc="upload")
    log.info("uploaded %d files (%d unchanged) to %s", stats["uploaded"], stats["skipped"], uri)
    return str(uri)


@utils.cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    utils.setup_logging(args.verbose)
    validate_args(args)
    if not args.skip_upload and not args.s3_bucket:
        log.info("no --s3-bucket given: keeping the dataset local (pass --skip-upload to say so explicitly)")
    if args.s3_bucket and not args.skip_upload:
        utils.check_s3_bucket(args.s3_bucket, "upload")
    dd, manifest = prepare(args)
    out = save(dd, manifest, args.output_dir)
    uri = upload(out, args) if args.s3_bucket and not args.skip_upload else None
    c = manifest["counts"]
    print(f"Rows: {c['input_rows']} read, {c['kept_rows']} kept -> train {c['train']}, validation {c['validation']}; "
          f"dropped {manifest['dropped'] or 'none'}")
    print(f"Schema: {manifest['schema']}; template: {manifest['chat_template']['name']}")
    print(f"Saved to: {out.resolve()}")
    if uri:
        print(f"S3 URI: {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
