r"""Evaluate a fine-tuned adapter: perplexity (base vs tuned), answer accuracy, sample generations.

    # the adapter from train_lora.py against its recorded base, on the validation split of the data it
    # trained on (recorded beside it; --dataset-path to evaluate other data)
    python evaluate_model.py --model-path ./checkpoints/qwen3_4b_reasoning/final_model \
        --compute-perplexity --compare-base --compute-accuracy --generate-samples --num-samples 10

    # everything from S3
    python evaluate_model.py --model-path s3://adapters-bucket/adapters/my-run/final_model \
        --dataset-path s3://my-bucket/datasets/processed_reasoning_20251220_143022 --compute-perplexity

Perplexity is exp(total NLL / total target tokens) over assistant tokens, masked exactly as in
training. With an adapter, the base pass runs on the same loaded model with the adapter disabled.
The report goes to --output-file (JSON, written atomically).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import utils
from reasonforge import configfile
from reasonforge.evaluation import (SEED_DATASET, dataset_to_evaluate, load_eval_split,
                                    print_summary, run_measurements, samples, trained_rows_check)
from utils import UserError

log = logging.getLogger("reasonforge.eval")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate_model.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configfile.add_config_flag(p)
    utils.add_inference_model_flags(p)
    d = p.add_argument_group("data")
    d.add_argument("--dataset-path", default=None,
                   help="prepared folder or s3:// URI (default: the data the adapter trained on, as recorded beside "
                        f"it; else {SEED_DATASET})")
    d.add_argument("--split", default="validation", help="(default: %(default)s)")
    d.add_argument("--max-eval-samples", type=int, default=None, help="evaluate at most this many rows")
    d.add_argument("--batch-size", type=int, default=None,
                   help="rows per batch (default: 8 for perplexity; for generation, as many as free GPU memory "
                        "holds with --engine static, else 8)")
    w = p.add_argument_group("what to measure (default: perplexity and samples)")
    w.add_argument("--compute-perplexity", action="store_true")
    w.add_argument("--compare-base", action="store_true", help="also measure the base model (adapter disabled)")
    w.add_argument("--compute-accuracy", action="store_true", help="greedy answers scored against the reference")
    w.add_argument("--generate-samples", action="store_true")
    w.add_argument("--num-samples", type=int, default=10, help="(default: %(default)s)")
    # unset: samples use the chat default, --compute-accuracy none (see accuracy_settings)
    utils.add_generation_flags(p, penalty_unset_help=(
        f"(default: {utils.GenerationSettings().repetition_penalty} for --generate-samples; "
        "none for --compute-accuracy unless given)"))
    p.add_argument("--output-file", default="./eval_results/evaluation.json", help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true")
    return p


REPORT_KEYS = ("metrics", "generation", "created_at")  # how an earlier report of ours is recognised


def validate_args(args) -> None:
    problems = [f"{flag} {v} must be a positive integer" for flag, v in
                (("--batch-size", args.batch_size), ("--num-samples", args.num_samples)) if v is not None and v < 1]
    if args.max_eval_samples is not None and args.max_eval_samples < 1:
        problems.append(f"--max-eval-samples {args.max_eval_samples} must be at least 1")
    problems += utils.inference_flag_problems(args)
    # Checked before the model loads, so a bad --output-file cannot cost the whole evaluation.
    problems += filter(None, [utils.report_file_problem(args.output_file, "--output-file", "evaluate_model.py",
                                                        REPORT_KEYS)])
    if problems:
        raise UserError("; ".join(problems))


@utils.cli_entry
def main(argv=None) -> int:
    args = configfile.parse_args(build_parser(), argv)
    given = args.repetition_penalty is not None
    nothing_asked = not (args.compute_perplexity or args.compute_accuracy or args.generate_samples)
    args = utils.frozen(args, repetition_penalty_given=given,
                        repetition_penalty=args.repetition_penalty if given else utils.GenerationSettings().repetition_penalty,
                        compute_perplexity=args.compute_perplexity or nothing_asked,
                        generate_samples=args.generate_samples or nothing_asked)
    utils.setup_logging(args.verbose)
    validate_args(args)
    hub = utils.hub_model_problem(args.model_path, "--model-path")  # before any data is fetched
    if hub:
        raise UserError(hub)
    if utils.path_kind(args.model_path) == "local" and not Path(args.model_path).exists():
        raise UserError(f"--model-path {args.model_path} does not exist; pass an adapter or model folder (a run's "
                        "final_model/ once training has finished), a .gguf file, an s3:// URI or a Hub id")
    if Path(args.model_path).is_dir() and not args.is_adapter:  # its files, before the dataset it names is looked for
        utils.check_model_path(args.model_path)
    dataset_path, dataset_source = dataset_to_evaluate(args)
    args = utils.frozen(args, dataset_path=dataset_path, dataset_source=dataset_source)
    if args.dataset_source != "--dataset-path":
        log.info("evaluating on %s (%s)", args.dataset_path, args.dataset_source)
    settings = utils.generation_settings_from_args(args)
    rows, manifest = load_eval_split(args)
    model, tokenizer, info, adapter_info = utils.load_for_inference(args)
    args = utils.frozen(args, **info.pop("resolved"))
    has_adapter = "adapter" in info
    if args.compare_base and not has_adapter:
        log.warning("--compare-base: %s is a plain model, not an adapter, so there is no base to compare; "
                    "only its own numbers are measured", args.model_path)
    leak = trained_rows_check(rows, args, manifest, adapter_info.get("reasonforge", {})) if has_adapter else None
    measured = run_measurements(model, tokenizer, rows, args, settings, has_adapter)
    sample_speed: dict = {}
    report = {
        "model_path": args.model_path, "base_model": info["base_model"], "adapter": info.get("adapter"),
        "backend": info["backend"], "engine": args.engine, "runtime": info.get("runtime"),
        "quantization": info.get("quantization"), "dataset_path": args.dataset_path,
        "dataset_path_source": args.dataset_source, "split": args.split, "rows": len(rows),
        "dataset_manifest_sha256": manifest.get("content_sha256"),
        "adapter_dataset_manifest_sha256": adapter_info.get("reasonforge", {}).get("dataset_manifest_sha256"),
        "trained_rows_check": leak,
        "generation": settings.as_dict(), "metrics": measured["metrics"],
        "settings": {name: getattr(args, name) for name in utils.RECORDED_DEFAULTS},
        "settings_source": args.settings_source, "config": args.config, "settings_from": args.settings_from,
        "samples": samples(model, tokenizer, rows, args, settings, sample_speed) if args.generate_samples else [],
        "samples_generation_speed": sample_speed or None,
        "timings": {"model_load_s": info["load_s"], **measured["timings"]},
        "memory": utils.gpu_memory_stats(), "versions": utils.library_versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    output_file = Path(args.output_file)
    utils.atomic_write_json(output_file, utils.redact_secrets(report))
    print_summary(report, output_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
