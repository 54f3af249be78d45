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
import os
import sys
from pathlib import Path

import utils
from reasonforge import checkpoints, compile_cache, configfile, training
from reasonforge.cuda_graphs import cuda_graphs_obstacle, refuse_cuda_graphs
from reasonforge.graph_wrapper import CPP_WRAPPER_MIN_STEPS
from reasonforge.outputs import run_dir_problem
from reasonforge.rewards import DEFAULT_REWARDS, REWARDS
from utils import UserError

DEFAULT_MODEL = "unsloth/Qwen2.5-Coder-3B-Instruct"
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_lora.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model-name", default=DEFAULT_MODEL, help="Hub id or local folder (default: %(default)s)")
    m.add_argument("--backend", choices=["auto", "unsloth", "hf"], default="auto",
                   help="unsloth (CUDA) or transformers+PEFT; auto picks and says why (default: %(default)s)")
    m.add_argument("--max-seq-length", type=int, default=utils.MAX_SEQ_LENGTH, help="tokens per example (default: %(default)s)")
    m.add_argument("--no-4bit", dest="load_in_4bit", action="store_false", help="load the base in 16-bit on GPU")
    m.add_argument("--trust-remote-code", action="store_true", help="allow model code from the Hub (off by default)")
    d = p.add_argument_group("data")
    d.add_argument("--dataset-path", default="./data_cache/processed_reasoning",
                   help="folder from data_preparation.py, or s3:// URI (default: %(default)s)")
    d.add_argument("--from-s3", action="store_true", help="read --dataset-path from S3 (an s3:// URI, or a key in --s3-bucket)")
    d.add_argument("--chat-template", default="auto", choices=["auto", "dataset", "qwen3", "qwen2.5", "tokenizer"],
                   help="template to render messages: auto = the model's own (its tokenizer's, else the built-in of "
                        "its family); dataset = the one data preparation recorded, refused if it does not fit the "
                        "model; qwen3/qwen2.5 = that built-in, as asked (default: %(default)s)")
    d.add_argument("--long-rows", choices=["drop", "truncate"], default="drop",
                   help="rows longer than --max-seq-length: drop them (counted on the banner), or cut them, "
                        "losing their end and <|im_end|> (default: %(default)s)")
    d.add_argument("--train-on-responses-only", action=argparse.BooleanOptionalAction, default=True,
                   help="loss on assistant tokens only (default: on)")
    d.add_argument("--packing", action="store_true", help="pack short examples into full sequences")
    t = p.add_argument_group("training")
    t.add_argument("--num-epochs", type=float, default=3, help="(default: %(default)s)")
    t.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (default: epochs)")
    t.add_argument("--batch-size", type=int, default=2, help="per-device micro-batch (default: %(default)s)")
    t.add_argument("--gradient-accumulation-steps", type=int, default=4, help="(default: %(default)s)")
    t.add_argument("--learning-rate", type=float, default=None,
                   help=f"(default: {training.DEFAULT_LEARNING_RATE['sft']} for sft, {training.DEFAULT_LEARNING_RATE['grpo']} for grpo)")
    t.add_argument("--weight-decay", type=float, default=0.01, help="(default: %(default)s)")
    t.add_argument("--warmup-steps", type=int, default=5, help="(default: %(default)s)")
    t.add_argument("--lr-scheduler", default="linear", help="transformers scheduler name (default: %(default)s)")
    t.add_argument("--optim", default="auto", help="optimizer; auto = adamw_8bit where bitsandbytes works, else adamw_torch")
    t.add_argument("--seed", type=int, default=3407, help="(default: %(default)s)")
    t.add_argument("--auto-batch", action="store_true",
                   help="pick micro-batch and checkpointing from the GPU's free memory, keeping the effective batch")
    t.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="treat the GPU as having this much memory (caps this process to it); default: what is free")
    t.add_argument("--gradient-checkpointing", choices=["auto", "unsloth", "on", "off"], default="auto",
                   help="auto: on the unsloth backend (sft), Unsloth's offloaded checkpointing, with as many "
                        "decoder layers left out of it (no recompute: faster, more memory) as fit 85%% of what this "
                        "process holds plus what is free on the GPU (or --gpu-memory-gib) at the longest batch; "
                        "plain checkpointing on other GPUs; off on CPU. unsloth: every layer checkpointed, the least "
                        "memory (default: %(default)s)")
    t.add_argument("--logging-steps", type=int, default=1, help="(default: %(default)s)")
    t.add_argument("--graph-wrapper", choices=["auto", "cpp", "python"], default="auto",
                   help="launcher code for Unsloth's compiled graphs: cpp steps faster but its build adds a minute "
                        "or more to the first step; auto takes it, without CUDA graphs, for runs of at least "
                        f"{CPP_WRAPPER_MIN_STEPS} steps (default: %(default)s)")
    t.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                   help="replay Unsloth's compiled decoder blocks as CUDA graphs, which frees each step from the "
                        "CPU's kernel-launch rate; batches are then padded to a few lengths. auto: on for sft on the "
                        "unsloth backend without --packing, on GPUs of compute capability 9.0+ such as the H100 "
                        "(default: %(default)s)")
    t.add_argument("--compile-cache-dir", default=os.environ.get("REASONFORGE_COMPILE_CACHE", compile_cache.DEFAULT),
                   help="keep compiled graphs and kernels here between runs, so a rerun or resume on this machine "
                        "skips most of the first step's compile; none: torch's own /tmp caches (default: "
                        "$REASONFORGE_COMPILE_CACHE, else %(default)s)")
    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora-r", type=int, default=16, help="(default: %(default)s)")
    lo.add_argument("--lora-alpha", type=int, default=16, help="(default: %(default)s)")
    lo.add_argument("--lora-dropout", type=float, default=0.0, help="(default: %(default)s)")
    lo.add_argument("--target-modules", default=DEFAULT_TARGETS, help="comma-separated (default: %(default)s)")
    c = p.add_argument_group("checkpoints and evaluation")
    c.add_argument("--output-dir", default="./checkpoints/qwen_lora", help="(default: %(default)s)")
    c.add_argument("--run-name", default=None, help="name on S3 and in logs (default: output folder name)")
    c.add_argument("--save-steps", type=int, default=100, help="(default: %(default)s)")
    c.add_argument("--save-total-limit", type=int, default=3, help="(default: %(default)s)")
    c.add_argument("--eval-steps", type=int, default=None, help="validate every N steps (default: --save-steps)")
    c.add_argument("--early-stopping-patience", type=int, default=None, help="stop after N evaluations without improvement")
    c.add_argument("--resume-from-checkpoint", default=None, metavar="PATH|latest",
                   help="a checkpoint folder, or 'latest' (newest complete one, local or on S3)")
    c.add_argument("--save-merged", action="store_true", help="also save a 16-bit merged model beside the adapter")
    c.add_argument("--save-gguf", default=None, choices=("q8_0", "f16", "bf16"), metavar="TYPE",
                   help="also export the merged model as GGUF (q8_0, f16 or bf16) with an Ollama Modelfile into "
                        "final_model_gguf/ (implies --save-merged; needs the gguf extra)")
    c.add_argument("--sigterm-deadline-s", type=float, default=90,
                   help="on SIGTERM a checkpoint is saved at the end of the current step; exit without one if "
                        "none has begun after this many seconds (spot instances get 120) (default: %(default)s)")
    u = p.add_argument_group("upload")
    u.add_argument("--s3-bucket", default=None, help="sync checkpoints and the final adapter to s3://BUCKET/adapters/RUN/")
    u.add_argument("--skip-s3-upload", action="store_true", help="never upload, even with --s3-bucket")
    u.add_argument("--push-to-hub", default=None, metavar="REPO", help="push the final adapter to this Hub repo")
    r = p.add_argument_group("method (grpo: reinforcement on verified answers, after or instead of sft)")
    r.add_argument("--method", choices=["sft", "grpo"], default="sft",
                   help="sft: learn the dataset's replies; grpo: sample groups of replies to each question and "
                        "reward those whose final answer matches the `answer` column (default: %(default)s)")
    r.add_argument("--init-adapter", default=None, metavar="PATH|s3://...",
                   help="start from this saved adapter (e.g. an sft run's final_model) instead of fresh LoRA "
                        "weights; its r, alpha and targets must match the LoRA flags")
    r.add_argument("--rewards", default=DEFAULT_REWARDS,
                   help=f"grpo rewards, NAME[=WEIGHT],...: {', '.join(REWARDS)} (default: %(default)s)")
    r.add_argument("--num-generations", type=int, default=8,
                   help="grpo: replies sampled per question; batch x accumulation must hold whole groups (default: %(default)s)")
    r.add_argument("--max-completion-length", type=int, default=512,
                   help="grpo: tokens per sampled reply; the question gets --max-seq-length minus this (default: %(default)s)")
    r.add_argument("--beta", type=float, default=0.0,
                   help="grpo: KL penalty towards the starting policy; 0 skips the reference pass (default: %(default)s)")
    r.add_argument("--temperature", type=float, default=1.0, help="grpo: sampling temperature (default: %(default)s)")
    r.add_argument("--engine", choices=["auto", "static", "generate"], default="auto",
                   help="grpo: what generates rollouts and validation replies. static: reasonforge.engine (static KV "
                        "cache, decode step as a CUDA graph) on transformers' forward, so the model loads with "
                        "--backend hf; generate and auto: TRL's generate (Unsloth's fast decode under Unsloth) "
                        "(default: %(default)s)")
    r.add_argument("--prompts-per-generation", type=int, default=None,
                   help="grpo: questions whose groups are generated in one call; TRL spreads their completions over "
                        "the next optimizer steps (its generation_batch_size). Default: 8 on a GPU, one optimizer "
                        "step's worth on a CPU")
    p.add_argument("--verbose", action="store_true")
    # last, as its TrainConfig field is: the dataclass's fields follow the parser's order
    configfile.add_config_flag(p, ", e.g. a run's training_config.json to repeat it")
    return p


def validate_args(args) -> None:
    problems = []
    positive = {"--batch-size": args.batch_size, "--gradient-accumulation-steps": args.gradient_accumulation_steps,
                "--lora-r": args.lora_r, "--lora-alpha": args.lora_alpha, "--save-steps": args.save_steps,
                "--max-seq-length": args.max_seq_length, "--logging-steps": args.logging_steps}
    problems += [f"{k} {v} must be a positive integer" for k, v in positive.items() if v < 1]
    problems += method_problems(args)
    problems += utils.number_problems({
        "--learning-rate": (args.learning_rate, lambda v: 0 < v < 1, "in (0, 1), e.g. 2e-4"),
        "--num-epochs": (args.num_epochs, lambda v: v > 0 or args.max_steps > 0, "> 0 (or give --max-steps)"),
        "--max-steps": (args.max_steps, lambda v: v == -1 or v >= 1, "a positive number of steps, or -1 for --num-epochs"),
        "--weight-decay": (args.weight_decay, lambda v: 0 <= v <= 1, "in [0, 1], e.g. 0.01"),
        "--warmup-steps": (args.warmup_steps, lambda v: v >= 0, "0 or more"),
        "--lora-dropout": (args.lora_dropout, lambda v: 0 <= v < 1, "in [0, 1)"),
        "--seed": (args.seed, lambda v: 0 <= v <= utils.SEED_MAX, f"from 0 to {utils.SEED_MAX}"),
        "--gpu-memory-gib": (args.gpu_memory_gib, lambda v: v > 0, "a positive number of GiB, e.g. 24"),
        "--early-stopping-patience": (args.early_stopping_patience, lambda v: v >= 1, "at least 1"),
    })
    if args.eval_steps is not None and args.eval_steps < 1:
        problems.append(f"--eval-steps {args.eval_steps} must be a positive number of steps")
    elif args.eval_steps is not None and args.save_steps % args.eval_steps:
        problems.append(f"--save-steps {args.save_steps} must be a multiple of --eval-steps {args.eval_steps} "
                        "(the best checkpoint is chosen among saved ones)")
    # NaN passes a "<= 0" test, and a NaN deadline saves no checkpoint on SIGTERM
    problems += utils.number_problems({"--sigterm-deadline-s": (args.sigterm_deadline_s, lambda v: v > 0,
                                                                "positive, e.g. 90")})
    if args.save_total_limit is not None and args.save_total_limit < 1:
        problems.append("--save-total-limit must be at least 1")
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
        problems.append("--target-modules is empty; e.g. " + DEFAULT_TARGETS)
    problems += filter(None, [run_dir_problem(Path(args.output_dir))])
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
        given = [flag for flag, unset in (("--engine", args.engine == "auto"),
                                          ("--prompts-per-generation", args.prompts_per_generation is None)) if not unset]
        verb, them = ("set", "them") if len(given) > 1 else ("sets", "it")
        return ([f"{' and '.join(given)} {verb} how grpo generates its rollouts; --method {args.method} generates "
                 f"nothing, so drop {them} (or pass --method grpo)"] if given else [])
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
