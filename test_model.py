r"""Chat with a fine-tuned model: interactive, one instruction, or a batch from a file.

    python test_model.py --model-path ./checkpoints/qwen3_4b_reasoning/final_model --interactive
    python test_model.py --model-path ./checkpoints/qwen3_4b_reasoning/final_model \
        --instruction "A train travels at 60 km/h for 2 hours. How far does it go?"
    python test_model.py --model-path s3://adapters-bucket/adapters/my-run/final_model \
        --batch --instructions-file prompts.json --output-file ./test_results/inference.json

Interactive commands: `settings` asks for max_new_tokens and temperature in turn (Enter keeps
a value, Ctrl-D cancels), `settings NAME VALUE` changes any one (temperature, top_p, top_k,
max_new_tokens, repetition_penalty), `reset` clears the conversation, `quit` / `exit` / Ctrl-D
leave. Ctrl-C while a reply is being written stops that reply and keeps it out of the
conversation. Each session's turns are written as they happen to
OUTPUT_FOLDER/chat_<UTC stamp>.jsonl (OUTPUT_FOLDER: the folder of --output-file).
The instructions file is a JSON list of strings or of objects with an "instruction" field (and an
optional Alpaca "input", joined after it as training data joins it).
Batch results are appended to OUTPUT.partial.jsonl as they complete, so an interrupted batch
resumes where it stopped; the final JSON is written when all are done. That file's first line
records the model and generation settings, and a resume with others is refused, so one report
never mixes answers of two models. The chat and a single instruction never replace a batch's
report: by default each mode writes its own file under ./test_results/, and an --output-file that
names a batch's report is refused for them before the model loads.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path

import utils
from reasonforge import configfile, progress
from utils import UserError

log = logging.getLogger("reasonforge.chat")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configfile.add_config_flag(p)
    utils.add_inference_model_flags(p)
    mode = p.add_argument_group("mode (one of)")
    mode.add_argument("--interactive", action="store_true", help="chat in the terminal")
    mode.add_argument("--instruction", default=None, help="answer one instruction")
    mode.add_argument("--batch", action="store_true", help="answer every instruction of --instructions-file")
    mode.add_argument("--instructions-file", default=None, help="JSON list of strings or {\"instruction\": ...} objects")
    mode.add_argument("--batch-size", type=int, default=None,
                      help="prompts generated together in --batch (default: as many as free GPU memory holds with "
                           "--engine static, else 8)")
    utils.add_generation_flags(p)
    p.add_argument("--output-file", default=None,
                   help="report file (default: ./test_results/ and inference.json for --batch, instruction.json for "
                        "--instruction, chat.json for --interactive, so no mode replaces another's report; the chat's "
                        "transcripts go beside it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true")
    return p


REPORT_KEYS = ("results", "generation", "created_at")  # how an earlier report of ours is recognised


DEFAULT_OUTPUT = {"batch": "./test_results/inference.json", "instruction": "./test_results/instruction.json",
                  "interactive": "./test_results/chat.json"}


def validate_args(args) -> None:
    modes = [bool(args.interactive), args.instruction is not None, bool(args.batch)]
    if sum(modes) != 1:
        raise UserError("choose exactly one of --interactive, --instruction TEXT, --batch --instructions-file FILE")
    if args.output_file is None:
        args.output_file = DEFAULT_OUTPUT["batch" if args.batch else "interactive" if args.interactive else "instruction"]
    if args.batch and not args.instructions_file:
        raise UserError("--batch needs --instructions-file FILE (a JSON list of instructions)")
    if args.instruction is not None and not args.instruction.strip():
        raise UserError("--instruction is empty; give the text to answer")
    problems = ([f"--batch-size {args.batch_size} must be a positive integer"]
                if args.batch_size is not None and args.batch_size < 1 else [])
    problems += utils.inference_flag_problems(args)
    # Checked before the model loads, so a bad --output-file cannot cost the answers.
    problems += filter(None, [utils.report_file_problem(args.output_file, "--output-file", "test_model.py", REPORT_KEYS)])
    if not args.batch and not problems:
        mode = "interactive" if args.interactive else "instruction"
        problems += filter(None, [batch_report_problem(Path(args.output_file), mode)])
    if problems:
        raise UserError("; ".join(problems))


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


def read_instructions(path: str) -> list[str]:
    """Parse the instructions file; errors name the position of the offending entry."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"instructions file {path!r} " + ("is a folder, not a file" if file.is_dir() else "does not exist"))
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"instructions file {path} is not UTF-8 text; save it as a JSON list of strings") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"instructions file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    if not isinstance(data, list):
        raise UserError(f"instructions file {path} must hold a JSON list, found a {type(data).__name__}")
    if not data:
        raise UserError(f"instructions file {path} is an empty list")
    out = []
    for i, item in enumerate(data):
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


def conversation(instruction: str, system_prompt: str | None, history: list[dict] | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + list(history or []) + [{"role": "user", "content": instruction}]


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------


class ReplyInterrupted(KeyboardInterrupt):
    """Ctrl-C during generation; `result` holds what was written of the reply until then."""

    def __init__(self, result: dict):
        super().__init__()
        self.result = result


def collecting_streamer(tokenizer):
    """A TextStreamer that also keeps the text and token count, so a stopped reply is not lost."""
    from transformers import TextStreamer

    class CollectingStreamer(TextStreamer):
        text, tokens = "", 0

        def put(self, value):
            if not self.next_tokens_are_prompt:
                self.tokens += int(value.numel())
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False):
            self.text += text
            super().on_finalized_text(text, stream_end)

    return CollectingStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def stream_reply(model, tokenizer, messages: list[dict], settings: utils.GenerationSettings,
                 engine: str = "static") -> dict:
    """Generate one reply, printing tokens as they arrive; Ctrl-C raises ReplyInterrupted."""
    import torch

    prompt = utils.render_chat(messages, template=None, tokenizer=tokenizer, add_generation_prompt=True)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    streamer = collecting_streamer(tokenizer)
    t0 = time.perf_counter()
    kwargs = utils.fit_to_context(model, enc["input_ids"].shape[1], settings.generate_kwargs(tokenizer, model))
    stops = set(kwargs["eos_token_id"])
    try:
        if getattr(model, "is_gguf", False):  # llama.cpp, token by token
            streamer.put(enc["input_ids"][0])
            room = kwargs["max_new_tokens"]
            ids, stopped = model.generate(enc["input_ids"][0].tolist(), settings, stops, room,
                                          on_token=lambda tok: streamer.put(torch.tensor([tok])))
            streamer.end()
        elif engine == "static":
            streamer.put(enc["input_ids"][0])  # the prompt, which the streamer skips

            def on_step(_row, tok):
                if tok not in stops:
                    streamer.put(torch.tensor([tok]))

            reply = utils.engine_for(model, tokenizer).generate(
                [enc["input_ids"][0].tolist()], settings, stops, batch_size=1,
                context=utils.context_length(model), on_step=on_step)[0]
            streamer.end()
            ids, stopped = reply.ids, reply.stopped
        else:
            with torch.inference_mode():
                out = model.generate(**enc, streamer=streamer, **kwargs)
            ids, stopped = utils.reply_tokens(out[0, enc["input_ids"].shape[1]:], stops)
    except KeyboardInterrupt:
        streamer.end()  # prints the words still held back, so the screen shows what the partial reply is
        raise ReplyInterrupted({"response": streamer.text.strip(), "tokens": streamer.tokens,
                                "seconds": round(time.perf_counter() - t0, 3)}) from None
    return {"response": tokenizer.decode(ids, skip_special_tokens=True).strip(), "tokens": len(ids),
            "seconds": round(time.perf_counter() - t0, 3), "stopped": stopped}


# The seed's dialog asks these, in this order; `settings NAME VALUE` reaches the others.
DIALOG_SETTINGS = ("max_new_tokens", "temperature")


def settings_dialog(settings: utils.GenerationSettings, ask=input):
    """Ask for each of DIALOG_SETTINGS with its current value; Enter keeps it, a refused value is
    asked again, and Ctrl-D or Ctrl-C leaves every setting as it was. Returns (settings, text)."""
    new = settings
    try:
        for name in DIALOG_SETTINGS:
            while True:
                raw = ask(f"New {name} [{getattr(new, name)}]: ").strip()
                if not raw:
                    break
                try:
                    new = new.updated(name, raw)
                    break
                except UserError as exc:
                    print(f"refused: {exc}", flush=True)
    except (EOFError, KeyboardInterrupt):
        return settings, "\nsettings unchanged"
    values = ", ".join(f"{k}={getattr(new, k)}" for k in DIALOG_SETTINGS)
    return new, f"Settings {'updated' if new != settings else 'unchanged'}: {values}"


def handle_command(line: str, settings: utils.GenerationSettings):
    """Apply a `settings ...` command; returns the (possibly new) settings and the text to show."""
    parts = line.replace("=", " ").split()
    if len(parts) == 1:
        return settings_dialog(settings)
    if len(parts) != 3:
        return settings, "usage: settings (asks for each), or settings NAME VALUE (e.g. settings temperature 0.3)"
    try:
        new = settings.updated(parts[1], parts[2])
    except UserError as exc:
        return settings, f"refused: {exc}"
    return new, "settings: " + ", ".join(f"{k}={v}" for k, v in new.as_dict().items())


class Transcript:
    """A chat session as JSON lines: one session line, then a line per turn (and per reset),
    flushed as each is written so a crash or a closed terminal keeps everything said so far."""

    def __init__(self, folder: Path, session: dict):
        folder = folder.resolve()
        folder.mkdir(parents=True, exist_ok=True)
        stamp = utils.utc_stamp()
        for n in itertools.count(1):
            self.path = folder / (f"chat_{stamp}.jsonl" if n == 1 else f"chat_{stamp}_{n}.jsonl")
            try:
                self._fh = open(self.path, "x", encoding="utf-8")  # never append to another session's file
                break
            except FileExistsError:
                continue
        self.write({"type": "session", **session})

    def write(self, record: dict) -> None:
        record = {**record, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._fh.write(utils.to_json(record, ensure_ascii=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def chat_turn(model, tokenizer, text: str, system_prompt: str | None, history: list[dict], settings,
              engine: str = "static") -> dict:
    """One reply; a Ctrl-C while it is written stops it and marks it interrupted."""
    try:
        print("assistant> ", end="", flush=True)
        result = stream_reply(model, tokenizer, conversation(text, system_prompt, history), settings, engine)
    except KeyboardInterrupt as exc:
        partial = exc.result if isinstance(exc, ReplyInterrupted) else {"response": "", "tokens": 0, "seconds": 0.0}
        print("[reply stopped; it is left out of the conversation]", flush=True)
        return {"instruction": text, **partial, "interrupted": True}
    return {"instruction": text, **result}


def interactive(model, tokenizer, settings: utils.GenerationSettings, system_prompt: str | None,
                transcript: Transcript | None = None, engine: str = "static"):
    """Run the chat loop; returns (turns, the settings in force at the end)."""
    history: list[dict] = []
    turns: list[dict] = []
    saved = f" (transcript: {transcript.path})" if transcript else ""
    print("Chat ready. Commands: settings, settings NAME VALUE, reset, quit; Ctrl-C stops a reply." + saved, flush=True)
    while True:
        try:
            line = input("\nyou> ")
        except EOFError:
            print()
            break
        except UnicodeDecodeError:  # stdin is strict UTF-8 under a UTF-8 locale
            line = "\udcff"
        if utils.not_utf8(line) is not None:  # under a C locale the bytes arrive as surrogates instead
            print("refused: that line is not UTF-8 text; type it again (check the terminal's encoding)", flush=True)
            continue
        text = line.strip()
        if not text:
            continue
        if text.lower() in ("quit", "exit"):
            break
        if text.lower() == "reset":
            history = []
            if transcript:
                transcript.write({"type": "reset"})
            print("conversation cleared", flush=True)
            continue
        if text.lower().split()[0] == "settings":
            settings, shown = handle_command(text, settings)
            print(shown, flush=True)
            continue
        try:
            turn = chat_turn(model, tokenizer, text, system_prompt, history, settings, engine)
            if turn.get("stopped") is False:  # the limit, not the model, ended it: say so where it stops
                print(f"\n[reply cut at --max-new-tokens {settings.max_new_tokens}; raise it with "
                      f"`settings max_new_tokens N`]", flush=True)
        except KeyboardInterrupt:  # landed as the reply started or ended, outside its own handler: the same stop
            print("\n[reply stopped; it is left out of the conversation]", flush=True)
            turn = {"instruction": text, "response": "", "tokens": 0, "seconds": 0.0, "interrupted": True}
        if not turn.get("interrupted"):
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": turn["response"]}]
        turn["generation"] = settings.as_dict()  # settings change mid-chat: each reply keeps its own
        turns.append(turn)
        if transcript:
            transcript.write({"type": "turn", "turn": len(turns), **turn, "interrupted": bool(turn.get("interrupted"))})
    print("bye" + saved, flush=True)
    return turns, settings


def run_interactive(model, tokenizer, settings, args, info: dict, output_file: Path):
    """The chat with its transcript beside --output-file; returns (turns, final settings)."""
    transcript = Transcript(output_file.parent, {
        "model_path": args.model_path, "base_model": info.get("base_model"), "adapter": info.get("adapter"),
        "backend": info.get("backend"), "engine": args.engine, "system_prompt": args.system_prompt,
        "generation": settings.as_dict(),
    })
    try:
        return interactive(model, tokenizer, settings, args.system_prompt, transcript, args.engine)
    finally:
        transcript.close()


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
        "model_path": utils.absolute_if_local(args.model_path),
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
            fh.write(utils.to_json(first, ensure_ascii=False) + "\n")
    with open(partial, "a", encoding="utf-8") as fh, progress.bar(total=len(instructions), initial=len(done), desc="batch",
                                                           unit="prompt") as bar:
        # answers reach the partial file a batch at a time, so a Ctrl-C loses at most the batch in flight
        step = utils.planned_batch_size(model, tokenizer, [conversation(instructions[i], args.system_prompt) for i in todo],
                                        settings, args.engine, args.batch_size)
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            convs = [conversation(instructions[i], args.system_prompt) for i in chunk]
            for i, out in zip(chunk, utils.generate_batch(model, tokenizer, convs, settings, args.batch_size, desc=None,
                                                          engine=args.engine)):
                done[i] = {"index": i, "instruction": instructions[i], **out}
                fh.write(utils.to_json(done[i], ensure_ascii=False) + "\n")
            fh.flush()
            bar.update(len(chunk))
    return [done[i] for i in range(len(instructions))]


def write_results(output_file: Path, results: list[dict], args, settings, info: dict) -> None:
    tokens = sum(r["tokens"] for r in results)
    seconds = sum(r["seconds"] for r in results)
    used = {json.dumps(r["generation"], sort_keys=True) for r in results if "generation" in r}
    if len(used) > 1:  # a chat whose settings changed: no one set describes it, each result has its own
        settings = None
    utils.atomic_write_json(output_file, {
        "mode": "batch" if args.batch else "chat" if args.interactive else "instruction",
        "model_path": args.model_path, "base_model": info.get("base_model"), "backend": info.get("backend"),
        "engine": args.engine, "generation": settings.as_dict() if settings else None,
        "system_prompt": args.system_prompt, "count": len(results),
        "tokens_generated": tokens, "tokens_per_s": round(tokens / seconds, 2) if seconds else None,
        "results": results, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })


@utils.cli_entry
def main(argv=None) -> int:
    args = configfile.parse_args(build_parser(), argv)
    utils.setup_logging(args.verbose)
    validate_args(args)
    settings = utils.generation_settings_from_args(args)
    instructions = read_instructions(args.instructions_file) if args.batch else None
    output_file = Path(args.output_file)
    if args.batch:  # before the model loads: a resume with other settings is refused at once
        identity = batch_identity(args, settings)
        done = read_partial(partial_path(output_file), instructions, identity)
    model, tokenizer, info, _ = utils.load_for_inference(args)
    if args.interactive:
        results, settings = run_interactive(model, tokenizer, settings, args, info, output_file)
    elif args.batch:
        results = run_batch(model, tokenizer, instructions, settings, args, output_file, done, identity)
    else:
        print("assistant> ", end="", flush=True)
        results = [stream_reply(model, tokenizer, conversation(args.instruction, args.system_prompt), settings,
                                args.engine)]
        results[0] = {"instruction": args.instruction, **results[0]}
    write_results(output_file, results, args, settings, info)
    if args.batch:
        partial_path(output_file).unlink(missing_ok=True)
        tokens, seconds = sum(r["tokens"] for r in results), sum(r["seconds"] for r in results)
        if seconds:
            print(f"Generated {tokens} tokens for {len(results)} prompts in {seconds:.1f} s of generation "
                  f"({tokens / seconds:,.0f} tokens/s; engine {args.engine})")
    print(f"\nResults: {output_file.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
