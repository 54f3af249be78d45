r"""Turn an instruction/reasoning dataset into Qwen chat format, split it, save it, upload it.

    # the built-in offline sample (no network), kept local
    python data_preparation.py --dataset sample --max-samples 1000 --skip-upload

    # the seed's dataset from the Hub, uploaded to S3 under a timestamped prefix
    python data_preparation.py --dataset "TuringEnterprises/Turing-Open-Reasoning" --s3-bucket my-bucket --val-size 0.1

    # local files, with an explicit mapping and token-length checks against a tokenizer
    python data_preparation.py --dataset data/ --column-map prompt=user,reply=assistant \
        --tokenizer Qwen/Qwen2.5-Coder-3B-Instruct --max-seq-length 2048 --skip-upload

The output folder holds a datasets `DatasetDict` (train, validation), `manifest.json` and
`preview.jsonl`. It appears only once complete; `train_lora.py` refuses a folder without a manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import utils
from reasonforge.conversations import (
    CONTROL_TOKEN,
    KEY_COLUMNS,
    TARGETS,
    cell_text,  # noqa: F401  (tests and callers reach it as data_preparation.cell_text)
    content_hash,
    detect_schema,
    filter_rows,
    format_dataset,
    preview_template,
    prompt_key,  # noqa: F401  (tests and callers reach it as data_preparation.prompt_key)
    split_by_prompt,
    token_stats,
)
from reasonforge import configfile
from reasonforge.sources import load_source
from utils import UserError

log = logging.getLogger("reasonforge.data")

DEFAULT_OUTPUT = "./data_cache/processed_reasoning"
DEFAULT_DATASET = "sample"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="data_preparation.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configfile.add_config_flag(p)
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
    fmt.add_argument("--max-seq-length", type=int, default=utils.MAX_SEQ_LENGTH, help="token limit checked with --tokenizer (default: %(default)s)")
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
        if not args.s3_bucket:  # else it was dropped without a word and nothing went to S3
            problems.append(f"--s3-prefix {args.s3_prefix} needs --s3-bucket BUCKET, the bucket it names a place in")
    if args.system_prompt and CONTROL_TOKEN.search(args.system_prompt):
        # else every row would be dropped as holding control tokens, and the split found empty
        problems.append(f"--system-prompt holds a chat control token ({CONTROL_TOKEN.search(args.system_prompt).group(0)}), "
                        "which the tokenizer reads as a real turn marker; remove it from --system-prompt")
    if args.column_map:
        bad = {k: v for k, v in utils.parse_key_value_list(args.column_map, "--column-map").items() if v not in TARGETS}
        if bad:
            problems.append(f"--column-map targets {bad} unknown; use {', '.join(TARGETS)}")
    problems += filter(None, [utils.output_dir_problem(args.output_dir, is_prepared_dataset, "a data_preparation.py output")])
    if problems:
        raise UserError("; ".join(problems))


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
    if len(filtered) == 0:  # say why, rather than an empty split
        reasons = ", ".join(f"{n} {why}" for why, n in dropped.items())
        raise UserError(f"no row of {args.dataset} is usable: {len(formatted)} read, all dropped ({reasons}); "
                        "empty_or_missing_turn means a question or an answer is empty (check --column-map)")
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
    args = configfile.parse_args(build_parser(), argv)
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
    template = manifest["chat_template"]["name"]
    if "preview only" in template:  # no --tokenizer: the rows are chat messages; training renders them with the model's template
        print(f"Schema: {manifest['schema']}; chat messages (training renders them with the model's own template; "
              f"the text preview uses {template.split(' ')[0]})")
    else:
        print(f"Schema: {manifest['schema']}; template: {template}")
    print(f"Saved to: {out.resolve()}")
    if uri:
        print(f"S3 URI: {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
