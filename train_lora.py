r"""LoRA fine-tuning of a Qwen chat model: Unsloth 4-bit on a GPU, transformers + PEFT elsewhere.

    # the seed's run: dataset from S3, adapter back to S3
    python train_lora.py --model-name "unsloth/Qwen2.5-Coder-3B-Instruct" \
      --dataset-path "s3://bucket/datasets/processed_reasoning_20251220_143022" --from-s3 \
      --output-dir ./checkpoints/qwen3_4b_reasoning --num-epochs 3 --batch-size 2 \
      --gradient-accumulation-steps 4 --learning-rate 2e-4 --lora-r 16 --lora-alpha 16 --s3-bucket adapters-bucket

    # continue a preempted run on a fresh instance (newest complete checkpoint, local or on S3)
    python train_lora.py ... --s3-bucket adapters-bucket --run-name my-run --resume-from-checkpoint latest

Output folder: checkpoint-N/, final_model/ (best checkpoint by validation loss), training_config.json,
training_metrics.json, logs/ (TensorBoard + metrics.jsonl), loss_curve.png. The run itself is
reasonforge/training.py's setup, train and finish.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import utils
from reasonforge import checkpoints, configfile, train_config, training
from reasonforge.cuda_graphs import cuda_graphs_obstacle, refuse_cuda_graphs
from reasonforge.outputs import run_dir_problem
from utils import UserError


def build_parser() -> argparse.ArgumentParser:
    """The flags, generated from TrainConfig's fields (reasonforge/train_config.py)."""
    p = argparse.ArgumentParser(prog="train_lora.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_config.add_flags(p)
    return p


def validate_args(args) -> None:
    problems = train_config.value_problems(args)  # each flag's own rule, from its field
    problems += utils.number_problems({"--num-epochs": (args.num_epochs, lambda v: v > 0 or args.max_steps > 0,
                                                        "> 0 (or give --max-steps)")})  # a rule over two flags
    problems += method_problems(args)
    if args.eval_steps is not None and args.eval_steps >= 1 and args.save_steps >= 1 and args.save_steps % args.eval_steps:
        problems.append(f"--save-steps {args.save_steps} must be a multiple of --eval-steps {args.eval_steps} "
                        "(the best checkpoint is chosen among saved ones)")
    if args.s3_bucket:
        utils.validate_bucket_name(args.s3_bucket)
    if args.run_name is not None or args.s3_bucket:
        # The S3 URI printed at the end is built from it: S3 must store the key exactly as printed.
        flag = "--run-name" if args.run_name is not None else "--run-name (the --output-dir folder name)"
        problems += filter(None, [utils.s3_key_problem(default_run_name(args), flag)])
    if args.from_s3 and utils.path_kind(args.dataset_path) != "s3" and not args.s3_bucket:
        problems.append("--from-s3 needs an s3:// --dataset-path (or --s3-bucket to read the key from)")
    if args.cuda_graphs == "on":  # the rest (no CUDA) is known once the backend is chosen
        why = cuda_graphs_obstacle(args.backend, args.method, args.packing)
        if why:
            problems.append(refuse_cuda_graphs(why))
    problems += filter(None, [checkpoints.resume_flag_problem(args.resume_from_checkpoint)])  # before minutes of loading
    if not args.target_modules.strip(","):
        problems.append("--target-modules is empty; e.g. " + train_config.DEFAULT_TARGETS)
    problems += filter(None, [run_dir_problem(Path(args.output_dir))])
    try:  # a local folder's files, before the data is read and minutes before the model loads
        utils.check_model_path(args.model_name)
    except UserError as exc:
        problems.append(str(exc))
    if args.save_gguf:  # the extra is checked now, not after hours of training
        from reasonforge import gguf

        problems += filter(None, [gguf.converter_problem()])
    if problems:
        raise UserError("; ".join(problems))
    # last and alone: it may wait a few seconds for a name lookup, and a flag mistake should not
    hub = utils.hub_model_problem(args.model_name, "--model-name")
    if hub:
        raise UserError(hub)


def method_problems(args) -> list[str]:
    """What --method grpo needs of the other flags; --init-adapter's folder is checked when it is fetched."""
    if args.method != "grpo":
        given = [train_config.flag_name(f) for f in train_config.grpo_only() if getattr(args, f.name) != f.default]
        verb, them = ("set", "them") if len(given) > 1 else ("sets", "it")
        return ([f"{', '.join(given)} {verb} how grpo samples and rewards its replies; --method {args.method} "
                 f"samples nothing, so drop {them} (or pass --method grpo)"] if given else [])
    from reasonforge.grpo import GRPOSettings
    from reasonforge.rewards import parse_rewards

    parse_rewards(args.rewards)  # raises its own one-line error naming the bad entry
    settings = GRPOSettings(num_generations=args.num_generations, max_completion_length=args.max_completion_length,
                            beta=args.beta, temperature=args.temperature)
    problems = [p for p in settings.problems(args.batch_size, args.gradient_accumulation_steps)
                if not p.startswith("--learning-rate")]
    if args.packing:
        problems.append("--packing is for sft; grpo scores whole sampled replies, so drop --packing")
    if args.auto_batch:
        problems.append("--auto-batch plans sft batches; for grpo set --batch-size and --gradient-accumulation-steps "
                        "(--gpu-memory-gib still caps the process)")
    if args.prompts_per_generation is not None:
        completions = args.prompts_per_generation * args.num_generations
        if args.prompts_per_generation < 1:
            problems.append(f"--prompts-per-generation {args.prompts_per_generation} must be at least 1")
        elif completions % args.batch_size:
            problems.append(f"--prompts-per-generation {args.prompts_per_generation} x --num-generations "
                            f"{args.num_generations} = {completions} completions do not split into batches of "
                            f"--batch-size {args.batch_size}; choose a multiple of the batch")
    if args.engine == "static" and args.backend == "unsloth":
        problems.append("--engine static runs transformers' forward and cannot run on Unsloth's patched model; drop "
                        "--backend unsloth or pass --engine generate")
    if args.max_completion_length >= args.max_seq_length:
        problems.append(f"--max-completion-length {args.max_completion_length} leaves no room for the question in "
                        f"--max-seq-length {args.max_seq_length}; raise --max-seq-length or lower the completion length")
    return problems


def default_run_name(args) -> str:
    """--run-name, else the output folder's name (as TrainConfig.from_args resolves it)."""
    if args.run_name is not None:
        return args.run_name
    try:
        return Path(args.output_dir).resolve().name
    except RuntimeError:  # a symlink loop (Python 3.11); run_dir_problem reports it
        return Path(args.output_dir).name


@utils.cli_entry
def main(argv=None) -> int:
    args = configfile.parse_args(build_parser(), argv)
    utils.setup_logging(args.verbose)
    validate_args(args)
    run = training.setup(training.TrainConfig.from_args(args), argv)
    result = training.train(run)
    training.finish(run, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
