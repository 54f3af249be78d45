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
conversation; Ctrl-C at the prompt ends the chat (exit 130) and writes its report as `quit` does.
Each session's turns are written as they happen to
OUTPUT_FOLDER/chat_<UTC stamp>.jsonl (OUTPUT_FOLDER: the folder of --output-file).
The instructions file is a JSON list of strings or of objects with an "instruction" field (and an
optional Alpaca "input", joined after it as training data joins it).
Batch results are appended to OUTPUT.partial.jsonl as they complete, so an interrupted batch
resumes where it stopped; the final JSON is written when all are done. That file's first line
records the model and generation settings, and a resume with others is refused, so one report
never mixes answers of two models. Every mode holds OUTPUT.lock while it runs, so a second run into
the same --output-file is refused. The chat and a single instruction never replace a batch's
report: by default each mode writes its own file under ./test_results/, and an --output-file that
names a batch's report is refused for them before the model loads.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import utils
from reasonforge import configfile
from reasonforge.batch import (DEFAULT_OUTPUT, batch_identity, batch_report_problem, partial_path, read_instructions,
                               read_partial, run_batch, write_results)
from reasonforge.chat import ChatInterrupted, conversation, run_interactive, stream_reply
from utils import UserError

log = logging.getLogger("reasonforge.chat")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="test_model.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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

MODES = "choose exactly one of --interactive, --instruction TEXT, --batch --instructions-file FILE"


def validate_args(args) -> None:
    given = [flag for flag, on in (("--interactive", args.interactive), ("--instruction", args.instruction is not None),
                                   ("--batch", args.batch)) if on]
    if len(given) != 1:
        raise UserError(f"{', '.join(given[:-1])} and {given[-1]} are separate modes; {MODES}" if given else MODES)
    if args.instructions_file is not None and not args.batch:  # it would be silently ignored
        raise UserError(f"{given[0]} and --instructions-file conflict: the file is read only by --batch; drop "
                        f"--instructions-file, or pass --batch --instructions-file FILE instead of {given[0]}")
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


def claim_output_file(output_file: Path) -> None:
    """A run holds OUT.lock while it runs: a second batch into the same --output-file would append to
    the first one's partial file and replace its report. Released when main returns (cli_entry)."""
    created = not output_file.parent.exists()
    output_file.parent.mkdir(parents=True, exist_ok=True)
    utils.RunLock(output_file.parent, "--output-file", remove_if_empty=created, name=output_file.name + ".lock",
                  target=f"--output-file {output_file}").acquire()


@utils.cli_entry
def main(argv=None) -> int:
    args = configfile.parse_args(build_parser(), argv)
    mode = "batch" if args.batch else "interactive" if args.interactive else "instruction"
    args = utils.frozen(args, output_file=args.output_file or DEFAULT_OUTPUT[mode])
    utils.setup_logging(args.verbose)
    validate_args(args)
    settings = utils.generation_settings_from_args(args)
    instructions = read_instructions(args.instructions_file) if args.batch else None
    output_file = Path(args.output_file)
    # every mode holds the lock: an instruction's or chat's report would replace a running batch's
    claim_output_file(output_file)
    if args.batch:  # before the model loads: a resume with other settings is refused at once
        identity = batch_identity(args, settings)
        done = read_partial(partial_path(output_file), instructions, identity)
    model, tokenizer, info, _ = utils.load_for_inference(args)
    args = utils.frozen(args, **info.pop("resolved"))
    if args.interactive:
        try:
            results, settings = run_interactive(model, tokenizer, settings, args, info, output_file)
        except ChatInterrupted as stop:  # Ctrl-C at the prompt: the chat so far is as complete as after `quit`
            write_results(output_file, stop.turns, args, stop.settings, info)
            raise KeyboardInterrupt(f"the chat so far is saved in {output_file.resolve()} "
                                    f"(transcript: {stop.transcript})") from None
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
