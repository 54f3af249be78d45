"""test_model.py's batch mode: instructions from a file, answers saved batch by batch to a partial
file that a rerun resumes (refused with other settings), the final report written once, atomically."""

from __future__ import annotations

import json
import time
from pathlib import Path

from reasonforge import core, generation, progress
from reasonforge.chat import conversation
from reasonforge.core import UserError

DEFAULT_OUTPUT = {"batch": "./test_results/inference.json", "instruction": "./test_results/instruction.json",
                  "interactive": "./test_results/chat.json"}


def batch_report_problem(path: Path, mode: str) -> str | None:
    """A chat or one answer must not replace a batch's report: those answers cost a whole run."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or not isinstance(report.get("results"), list):
        return None
    # reports from before "mode" was written: a batch's results, and only they, carry an index
    legacy_batch = bool(report["results"]) and all(isinstance(r, dict) and "index" in r for r in report["results"])
    if report.get("mode", "batch" if legacy_batch else None) != "batch":
        return None
    what = "the chat" if mode == "interactive" else "this instruction"
    return (f"--output-file {path} holds a batch report ({len(report['results'])} answers); pass another "
            f"--output-file for {what}, e.g. --output-file {path.with_name(Path(DEFAULT_OUTPUT[mode]).name)}")


class _RepeatedKey(dict):
    """An object of the instructions file that gives a key twice; `key` is the first such key."""

    key = ""


def _keys_once(pairs):
    """object_pairs_hook: core.unique_keys, except that the object comes back marked rather than
    the whole parse failing, so the refusal can name the entry it is in."""
    try:
        return core.unique_keys(pairs)
    except core.DuplicateKey as exc:
        marked = _RepeatedKey(pairs)
        marked.key = exc.args[0]
        return marked


def _repeated_key(value) -> str | None:
    if isinstance(value, _RepeatedKey):
        return value.key
    inner = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next(filter(None, map(_repeated_key, inner)), None)


def read_instructions(path: str) -> list[str]:
    """Parse the instructions file; errors name the position of the offending entry."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"instructions file {path!r} " + ("is a folder, not a file" if file.is_dir() else "does not exist"))
    try:
        data = json.loads(file.read_text(encoding="utf-8-sig"), object_pairs_hook=_keys_once)  # a BOM is not content
    except UnicodeDecodeError as exc:
        converted = file.with_name(file.stem + ".utf8.json")
        raise UserError(f"instructions file {path} is not UTF-8 (byte 0x{exc.object[exc.start]:02x} at byte offset "
                        f"{exc.start}); save it as UTF-8, e.g. iconv -f latin1 -t utf-8 {path} > {converted}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"instructions file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    if not isinstance(data, list):
        found = "dict" if isinstance(data, dict) else type(data).__name__
        raise UserError(f"instructions file {path} must hold a JSON list, found a {found}")
    if not data:
        raise UserError(f"instructions file {path} is an empty list")
    out = []
    for i, item in enumerate(data):
        repeated = _repeated_key(item)
        if repeated is not None:
            raise UserError(f"instructions file {path}: entry {i} has the key {repeated!r} twice; keep one of them "
                            "(a JSON reader would silently keep the last)")
        text = item.get("instruction") if isinstance(item, dict) else item
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"instructions file {path}: entry {i} is not a non-empty string or an object with "
                            "an \"instruction\" string")
        extra = item.get("input") if isinstance(item, dict) else None
        if extra is not None and not isinstance(extra, str):
            raise UserError(f"instructions file {path}: entry {i} has an \"input\" that is not a string")
        if extra and extra.strip():  # Alpaca rows: joined as data_preparation.py joins them for training
            text = f"{text.strip()}\n\n{extra.strip()}"
        out.append(text)
    return out


def partial_path(output_file: Path) -> Path:
    return output_file.with_name(output_file.name + ".partial.jsonl")


def weights_stamp(model_path: str) -> str | None:
    """A digest of a local model folder's weight files: a retrained adapter saved to the same folder
    is another model, while the same adapter copied again (a new instance, fresh mtimes) is not.
    Each file's size and its first and last MiB: the values differ there, and a 6 GB merged model
    is not read whole. None for s3:// and Hub ids (their path names them)."""
    import hashlib

    folder = Path(model_path).expanduser()
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    files = sorted(f for pattern in ("*.safetensors", "*.bin") for f in folder.glob(pattern))
    for f in files:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(2**20)
            fh.seek(max(size - 2**20, 0))
            h.update(f"{f.name}:{size}:".encode() + head + fh.read())
    return h.hexdigest()[:16] if files else None


def batch_identity(args, settings) -> dict:
    """What a batch's answers depend on, as given on the command line; a resume must match it."""
    return json.loads(json.dumps({
        "model_path": core.absolute_if_local(args.model_path),
        "model_weights": weights_stamp(args.model_path), "base_model": args.base_model, "backend": args.backend,
        "max_seq_length": args.max_seq_length, "load_in_4bit": args.load_in_4bit,
        "system_prompt": args.system_prompt, **settings.as_dict()}))


def read_partial(partial: Path, instructions: list[str], identity: dict) -> dict[int, dict]:
    """The answers kept from an interrupted batch, by index. Refuses answers of another model or
    other settings (resuming would mix two models' answers in one report) and answers to other
    instructions (starting afresh would throw them away)."""
    done: dict[int, dict] = {}
    recorded, other = None, 0
    if not partial.is_file():
        return done
    for line in partial.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by the interruption
        if isinstance(rec, dict) and isinstance(rec.get("batch_of"), dict):
            recorded = rec["batch_of"]
        elif isinstance(rec, dict) and isinstance(rec.get("index"), int) and 0 <= rec["index"] < len(instructions) \
                and instructions[rec["index"]] == rec.get("instruction"):
            done[rec["index"]] = rec
        elif isinstance(rec, dict) and "index" in rec:
            other += 1
    if other:
        raise UserError(f"{partial} holds {other} answers to instructions that are not at those places in "
                        "--instructions-file (was the file changed since the batch stopped?); run with the file it "
                        "was started with to resume it, or choose another --output-file to start afresh")
    if done and recorded is not None and recorded != identity:
        changed = ", ".join(f"{k} {recorded.get(k)!r} there, {identity[k]!r} here"
                            for k in identity if recorded.get(k) != identity[k])
        raise UserError(f"{partial} holds {len(done)} answers of an interrupted batch run with other settings ({changed}); "
                        "run with the same ones to resume it, or choose another --output-file to start afresh")
    if done and recorded is None:
        print(f"warning: {partial} does not record the model and settings its {len(done)} answers came from "
              "(written by an older version); they are kept as they are", flush=True)
    return done


def run_batch(model, tokenizer, instructions: list[str], settings, args, output_file: Path,
              done: dict[int, dict] | None = None, identity: dict | None = None) -> list[dict]:
    """Answer every instruction; finished ones are appended to a JSONL file and skipped on resume."""
    partial = partial_path(output_file)
    if done is None:
        identity = identity or batch_identity(args, settings)
        done = read_partial(partial, instructions, identity)
    if done:
        print(f"resuming: {len(done)} of {len(instructions)} instructions already answered in {partial}")
    todo = [i for i in range(len(instructions)) if i not in done]
    partial.parent.mkdir(parents=True, exist_ok=True)
    if not done:  # a new batch: the first line says which run its answers belong to
        with open(partial, "w", encoding="utf-8") as fh:
            first = {"batch_of": identity or batch_identity(args, settings)}
            fh.write(core.to_json(first, ensure_ascii=False) + "\n")
    with open(partial, "a", encoding="utf-8") as fh, progress.bar(total=len(instructions), initial=len(done), desc="batch",
                                                           unit="prompt") as bar:
        # answers reach the partial file a batch at a time, so a Ctrl-C loses at most the batch in flight
        step = generation.planned_batch_size(model, tokenizer, [conversation(instructions[i], args.system_prompt) for i in todo],
                                        settings, args.engine, args.batch_size)
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            convs = [conversation(instructions[i], args.system_prompt) for i in chunk]
            for i, out in zip(chunk, generation.generate_batch(model, tokenizer, convs, settings, args.batch_size, desc=None,
                                                          engine=args.engine)):
                done[i] = {"index": i, "instruction": instructions[i], **out}
                fh.write(core.to_json(done[i], ensure_ascii=False) + "\n")
            fh.flush()
            bar.update(len(chunk))
    return [done[i] for i in range(len(instructions))]


def write_results(output_file: Path, results: list[dict], args, settings, info: dict) -> None:
    tokens = sum(r["tokens"] for r in results)
    seconds = sum(r["seconds"] for r in results)
    used = {json.dumps(r["generation"], sort_keys=True) for r in results if "generation" in r}
    if len(used) > 1:  # a chat whose settings changed: no one set describes it, each result has its own
        settings = None
    core.atomic_write_json(output_file, {
        "mode": "batch" if args.batch else "chat" if args.interactive else "instruction",
        "model_path": args.model_path, "base_model": info.get("base_model"), "backend": info.get("backend"),
        "engine": args.engine, "generation": settings.as_dict() if settings else None,
        "system_prompt": args.system_prompt, "count": len(results),
        "tokens_generated": tokens, "tokens_per_s": round(tokens / seconds, 2) if seconds else None,
        "results": results, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
