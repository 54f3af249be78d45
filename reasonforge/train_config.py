"""train_lora.py's settings, each defined once: name, type, default, help, check and resume rule.

TrainConfig's fields are the single source. train_lora.py's parser, the per-flag checks, the
resume comparison (checkpoints.py) and the flag table in TRAINING_GUIDE.md are generated from
them; adding a flag is adding a field here. The flag is the field's name with hyphens.

Resume rules: "fixed" (a resume under another value is refused: the adapter's shape, its data or
its optimizer state depend on it), "resolved" (compared as what the flag resolved to: the
optimizer, the rendered template's hash, the effective batch), "kept" (the checkpoint's value stays
in force, and the difference is reported), "applied" (the new value takes effect, with the effect
reported), "free" (where data and outputs live, how the run is watched: nothing to compare).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from reasonforge import core, s3
from reasonforge.graph_wrapper import CPP_WRAPPER_MIN_STEPS
from reasonforge.compile_cache import DEFAULT as COMPILE_CACHE_DEFAULT
from reasonforge.rewards import DEFAULT_REWARDS, REWARDS

DEFAULT_MODEL = "unsloth/Qwen2.5-Coder-3B-Instruct"
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# GRPO's updates come from sampled rewards, far noisier than SFT's token targets; Unsloth's and
# TRL's GRPO recipes for LoRA on 1-8B models use 5e-6, SFT's usual LoRA rate 2e-4.
DEFAULT_LEARNING_RATE = {"sft": 2e-4, "grpo": 5e-6}
GROUPS = ("model", "data", "training", "LoRA", "checkpoints and evaluation", "upload",
          "method (grpo: reinforcement on verified answers, after or instead of sft)", None)
RESHAPED = ("; the schedule's shape is rebuilt on the checkpoint's base learning rate from the second resumed step "
            "on (the first uses the rate the checkpoint's schedule had reached)")
POSITIVE = (lambda v: v >= 1, "a positive integer")


def setting(default, help: str, *, group: str | None, resume: str = "free", effect: str = "", choices=None,
            metavar: str | None = None, check=None, action: str | None = None, flag: str | None = None,
            env: str | None = None, shown: str | None = None):
    """A TrainConfig field and its flag. `action`: None (takes a value), "true" (a switch),
    "false" (a switch that turns the field off: `flag` names it), "both" (--x / --no-x). `check`:
    (test, rule) for one value; cross-flag rules stay in train_lora.validate_args. `env`: an
    environment variable that overrides the default. `shown`: how the resume messages name it."""
    meta = dict(help=help, group=group, resume=resume, effect=effect, choices=choices, metavar=metavar, check=check,
                action=action, flag=flag, env=env, shown=shown)
    return dataclasses.field(default=default, metadata=meta)


M, D, T, L, C, U, R = GROUPS[:7]


@dataclass(frozen=True)
class TrainConfig:
    """train_lora.py's flags, one field each in the parser's order, built once after validation.

    Never changed afterwards: what setup learns (the batch --auto-batch picks, the template, row
    counts, precision) goes on the Run.
    """

    model_name: str = setting(DEFAULT_MODEL, "Hub id or local folder (default: %(default)s)", group=M, resume="fixed")
    backend: str = setting("auto", "unsloth (CUDA) or transformers+PEFT; auto picks and says why (default: %(default)s)",
                           group=M, choices=["auto", "unsloth", "hf"], resume="applied",
                           effect="takes effect (speed and memory; the arithmetic differs in the last bits)")
    max_seq_length: int = setting(core.MAX_SEQ_LENGTH, "tokens per example (default: %(default)s)", group=M,
                                  check=POSITIVE, resume="fixed")
    load_in_4bit: bool = setting(True, "load the base in 16-bit on GPU", group=M, action="false", flag="--no-4bit",
                                 resume="applied", shown="4-bit loading",
                                 effect="takes effect: the base weights are loaded at the new precision")
    trust_remote_code: bool = setting(False, "allow model code from the Hub (off by default)", group=M, action="true")
    dataset_path: str = setting("./data_cache/processed_reasoning",
                                "folder from data_preparation.py, or s3:// URI (default: %(default)s)", group=D)
    from_s3: bool = setting(False, "read --dataset-path from S3 (an s3:// URI, or a key in --s3-bucket)", group=D,
                            action="true")
    chat_template: str = setting(
        "auto", "template to render messages: auto = the model's own (its tokenizer's, else the built-in of its "
        "family); dataset = the one data preparation recorded, refused if it does not fit the model; qwen3/qwen2.5 = "
        "that built-in, as asked (default: %(default)s)", group=D,
        choices=["auto", "dataset", "qwen3", "qwen2.5", "tokenizer"], resume="resolved")
    long_rows: str = setting("drop", "rows longer than --max-seq-length: drop them (counted on the banner), or cut "
                             "them, losing their end and <|im_end|> (default: %(default)s)", group=D,
                             choices=["drop", "truncate"], resume="fixed")
    train_on_responses_only: bool = setting(True, "loss on assistant tokens only (default: on)", group=D,
                                            action="both", resume="applied",
                                            effect="takes effect: the loss now covers other tokens")
    packing: bool = setting(False, "pack short examples into full sequences", group=D, action="true", resume="fixed")
    num_epochs: float = setting(3, "(default: %(default)s)", group=T, resume="applied",
                                effect="takes effect: training ends at the new length" + RESHAPED)
    max_steps: int = setting(-1, "stop after this many optimizer steps (default: epochs)", group=T, resume="applied",
                             check=(lambda v: v == -1 or v >= 1, "a positive number of steps, or -1 for --num-epochs"),
                             effect="takes effect: training ends at the new length" + RESHAPED)
    batch_size: int = setting(2, "per-device micro-batch (default: %(default)s)", group=T, check=POSITIVE,
                              resume="resolved")
    gradient_accumulation_steps: int = setting(4, "(default: %(default)s)", group=T, check=POSITIVE, resume="resolved")
    learning_rate: float | None = setting(
        None, f"(default: {DEFAULT_LEARNING_RATE['sft']} for sft, {DEFAULT_LEARNING_RATE['grpo']} for grpo)", group=T,
        check=(lambda v: 0 < v < 1, "in (0, 1), e.g. 2e-4"), resume="kept",
        effect="the restored optimizer and scheduler keep {old}'s schedule")
    weight_decay: float = setting(0.01, "(default: %(default)s)", group=T, check=(lambda v: 0 <= v <= 1, "in [0, 1], e.g. 0.01"),
                                  resume="kept", effect="the restored optimizer keeps weight decay {old}")
    warmup_steps: int = setting(5, "(default: %(default)s)", group=T, check=(lambda v: v >= 0, "0 or more"),
                                resume="applied", effect="takes effect" + RESHAPED)
    max_grad_norm: float | None = setting(
        None, "clip the gradient to this norm before each update (default: 1.0 for sft, as TRL's; 0.1 for grpo, whose "
        "sampled rewards make noisier gradients)", group=T, check=(lambda v: v > 0, "positive, e.g. 1.0"),
        resume="applied", effect="takes effect from the next step")
    lr_scheduler: str = setting("linear", "transformers scheduler name (default: %(default)s)", group=T,
                                resume="applied", effect="takes effect" + RESHAPED)
    optim: str = setting("auto", "optimizer; auto = adamw_8bit where bitsandbytes works, else adamw_torch", group=T,
                         resume="resolved")
    seed: int = setting(3407, "(default: %(default)s)", group=T, check=(lambda v: 0 <= v <= core.SEED_MAX,
                                                                         f"from 0 to {core.SEED_MAX}"),
                        resume="applied", effect="takes effect on the data order: the shuffle follows --seed, so rows "
                                                 "of the current epoch are repeated or skipped")
    auto_batch: bool = setting(False, "pick micro-batch and checkpointing from the GPU's free memory, keeping the "
                               "effective batch", group=T, action="true", resume="applied",
                               effect="takes effect (the effective batch is compared on its own)")
    gpu_memory_gib: float | None = setting(None, "treat the GPU as having this much memory (caps this process to it); "
                                           "default: what is free", group=T,
                                           check=(lambda v: v > 0, "a positive number of GiB, e.g. 24"), resume="applied",
                                           effect="takes effect (memory only)")
    gradient_checkpointing: str = setting(
        "auto", "auto: on the unsloth backend (sft), Unsloth's offloaded checkpointing, with as many decoder layers "
        "left out of it (no recompute: faster, more memory) as fit 85%% of what this process holds plus what is free "
        "on the GPU (or --gpu-memory-gib) at the longest batch; plain checkpointing on other GPUs; off on CPU. "
        "unsloth: every layer checkpointed, the least memory (default: %(default)s)", group=T,
        choices=["auto", "unsloth", "on", "off"], resume="applied", effect="takes effect (memory and speed only)")
    logging_steps: int = setting(1, "(default: %(default)s)", group=T, check=POSITIVE, resume="applied",
                                 effect="takes effect")
    graph_wrapper: str = setting(
        "auto", "launcher code for Unsloth's compiled graphs: cpp steps faster but its build adds a minute or more to "
        f"the first step; auto takes it, without CUDA graphs, for runs of at least {CPP_WRAPPER_MIN_STEPS} steps "
        "(default: %(default)s)", group=T, choices=["auto", "cpp", "python"], resume="applied",
        effect="takes effect (speed only)")
    cuda_graphs: str = setting(
        "auto", "replay Unsloth's compiled decoder blocks as CUDA graphs, which frees each step from the CPU's "
        "kernel-launch rate; batches are then padded to a few lengths. auto: on for sft on the unsloth backend "
        "without --packing, on GPUs of compute capability 9.0+ such as the H100 (default: %(default)s)", group=T,
        choices=["auto", "on", "off"], resume="applied", effect="takes effect (speed only)")
    compile_cache_dir: str = setting(
        COMPILE_CACHE_DEFAULT, "keep compiled graphs and kernels here between runs, so a rerun or resume on this "
        "machine skips most of the first step's compile; none: torch's own /tmp caches (default: "
        "$REASONFORGE_COMPILE_CACHE, else %(default)s)", group=T, env="REASONFORGE_COMPILE_CACHE")
    lora_r: int = setting(16, "(default: %(default)s)", group=L, check=POSITIVE, resume="fixed")
    lora_alpha: int = setting(16, "(default: %(default)s)", group=L, check=POSITIVE, resume="fixed")
    lora_dropout: float = setting(0.0, "(default: %(default)s)", group=L, check=(lambda v: 0 <= v < 1, "in [0, 1)"),
                                  resume="fixed")
    target_modules: str = setting(DEFAULT_TARGETS, "comma-separated (default: %(default)s)", group=L, resume="fixed")
    output_dir: str = setting("./checkpoints/qwen_lora", "(default: %(default)s)", group=C)
    run_name: str | None = setting(None, "name on S3 and in logs (default: output folder name)", group=C)
    save_steps: int = setting(100, "(default: %(default)s)", group=C, check=POSITIVE, resume="applied",
                              effect="takes effect")
    save_total_limit: int | None = setting(3, "(default: %(default)s)", group=C,
                                           check=(lambda v: v >= 1, "at least 1"), resume="applied",
                                           effect="takes effect")
    eval_steps: int | None = setting(None, "validate every N steps (default: --save-steps)", group=C,
                                     check=(lambda v: v >= 1, "a positive number of steps"), resume="applied",
                                     effect="takes effect")
    early_stopping_patience: int | None = setting(None, "stop after N evaluations without improvement", group=C,
                                                  check=(lambda v: v >= 1, "at least 1"), resume="applied",
                                                  effect="takes effect")
    resume_from_checkpoint: str | None = setting(None, "a checkpoint folder, or 'latest' (newest complete one, local "
                                                 "or on S3)", group=C, metavar="PATH|latest")
    save_merged: bool = setting(False, "also save a 16-bit merged model beside the adapter", group=C, action="true")
    save_gguf: str | None = setting(None, "also export the merged model as GGUF (q8_0, f16 or bf16) with an Ollama "
                                    "Modelfile into final_model_gguf/ (implies --save-merged; needs the gguf extra)",
                                    group=C, choices=("q8_0", "f16", "bf16"), metavar="TYPE")
    sigterm_deadline_s: float = setting(90, "on SIGTERM a checkpoint is saved at the end of the current step; exit "
                                        "without one if none has begun after this many seconds (spot instances get "
                                        "120) (default: %(default)s)", group=C,
                                        check=(lambda v: v > 0, "positive, e.g. 90"))
    s3_bucket: str | None = setting(None, "sync checkpoints and the final adapter to s3://BUCKET/adapters/RUN/", group=U)
    skip_s3_upload: bool = setting(False, "never upload, even with --s3-bucket", group=U, action="true")
    push_to_hub: str | None = setting(None, "push the final adapter to this Hub repo", group=U, metavar="REPO")
    method: str = setting("sft", "sft: learn the dataset's replies; grpo: sample groups of replies to each question "
                          "and reward those whose final answer matches the `answer` column (default: %(default)s)",
                          group=R, choices=["sft", "grpo"], resume="fixed")
    init_adapter: str | None = setting(None, "start from this saved adapter (e.g. an sft run's final_model) instead of "
                                       "fresh LoRA weights; its r, alpha and targets must match the LoRA flags",
                                       group=R, metavar="PATH|s3://...")  # the checkpoint already holds its weights
    rewards: str = setting(DEFAULT_REWARDS, f"grpo rewards, NAME[=WEIGHT],...: {', '.join(REWARDS)} (default: "
                           "%(default)s)", group=R, resume="applied", effect="takes effect from the next step")
    num_generations: int = setting(8, "grpo: replies sampled per question; batch x accumulation must hold whole "
                                   "groups (default: %(default)s)", group=R, resume="applied",
                                   effect="takes effect: groups of the new size from the next step")
    max_completion_length: int = setting(512, "grpo: tokens per sampled reply; the question gets --max-seq-length "
                                         "minus this (default: %(default)s)", group=R, resume="applied",
                                         effect="takes effect from the next step")
    beta: float = setting(0.0, "grpo: KL penalty towards the starting policy; 0 skips the reference pass (default: "
                          "%(default)s)", group=R, resume="applied",
                          effect="takes effect from the next step")
    temperature: float = setting(1.0, "grpo: sampling temperature (default: %(default)s)", group=R,
                                 resume="applied",
                                 effect="takes effect from the next step")
    engine: str = setting(
        "auto", "grpo: what generates rollouts and validation replies. static: reasonforge.engine (static KV cache, "
        "decode step as a CUDA graph) on transformers' forward, so the model loads with --backend hf; generate and "
        "auto: TRL's generate (Unsloth's fast decode under Unsloth) (default: %(default)s)", group=R,
        choices=["auto", "static", "generate"], resume="applied", effect="takes effect (speed only)")
    prompts_per_generation: int | None = setting(
        None, "grpo: questions whose groups are generated in one call; TRL spreads their completions over the next "
        "optimizer steps (its generation_batch_size). Default: 8 on a GPU, one optimizer step's worth on a CPU",
        group=R, resume="applied", effect="takes effect from the next generation")
    verbose: bool = setting(False, "", group=None, action="true")
    # last: the file's values are the parser's defaults (configfile.parse_args)
    config: str | None = setting(None, "", group=None)
    # where each value not left at its default came from ({flag: "command line" | "config"}); not a flag
    settings_from: dict = dataclasses.field(default_factory=dict, metadata={"not_a_flag": True})

    @classmethod
    def from_args(cls, args) -> TrainConfig:
        """From train_lora.build_parser()'s namespace; --run-name defaults to the output folder's name
        and --learning-rate to the method's."""
        return cls(**{**vars(args), "settings_from": getattr(args, "settings_from", {}),
                      "run_name": args.run_name or Path(args.output_dir).resolve().name,
                      "learning_rate": args.learning_rate or DEFAULT_LEARNING_RATE[args.method]})

    @property
    def out(self) -> Path:
        return Path(self.output_dir)

    @property
    def targets(self) -> list[str]:
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]

    @property
    def run_uri(self) -> s3.S3Uri | None:
        """s3://BUCKET/adapters/RUN/, the mirror of checkpoints and outputs; None when nothing is uploaded."""
        if not self.s3_bucket or self.skip_s3_upload:
            return None
        return s3.S3Uri(self.s3_bucket, f"adapters/{self.run_name}")


# ---------------------------------------------------------------------------------------------
# What is generated from the fields
# ---------------------------------------------------------------------------------------------


def flags() -> list[dataclasses.Field]:
    """The fields that are flags, in the parser's order."""
    return [f for f in dataclasses.fields(TrainConfig) if not f.metadata.get("not_a_flag")]


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def value_type(f: dataclasses.Field):
    """int or float; None (argparse's own: the text as given) for strings."""
    name = f.type if isinstance(f.type, str) else f.type.__name__  # a field made at run time carries the type
    return {"int": int, "float": float, "str": None}[name.split("|")[0].strip()]


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One argument per field, in groups; --config (from configfile) is added by its own helper."""
    from reasonforge import configfile

    groups = {None: parser}
    for f in flags():
        meta = f.metadata
        if f.name == "config":
            configfile.add_config_flag(parser, ", e.g. a run's training_config.json to repeat it")
            continue
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        kwargs = {"help": meta["help"] or None, "dest": f.name}
        if meta["action"] == "true":
            kwargs.update(action="store_true")
        elif meta["action"] == "false":
            kwargs.update(action="store_false")
        elif meta["action"] == "both":
            kwargs.update(action=argparse.BooleanOptionalAction, default=f.default)
        else:
            default = os.environ.get(meta["env"], f.default) if meta["env"] else f.default
            kwargs.update(type=value_type(f), default=default, choices=meta["choices"], metavar=meta["metavar"])
        group.add_argument(flag_name(f), **kwargs)


def value_problems(args) -> list[str]:
    """Each flag's own rule (`check`), in the parser's order; NaN and inf never pass."""
    ranges = {}
    for f in flags():
        check = f.metadata.get("check")
        if check is not None:
            test, rule = check
            ranges[flag_name(f)] = (getattr(args, f.name), test, rule)
    return core.number_problems(ranges)


def grpo_only() -> list[dataclasses.Field]:
    """The flags that only grpo reads (its group, less --method and --init-adapter, which sft reads too)."""
    return [f for f in flags() if f.metadata.get("group") == GROUPS[6] and f.name not in ("method", "init_adapter")]


def resume_rules(rule: str) -> dict[str, dataclasses.Field]:
    """{field name: field} of the flags under one resume rule."""
    return {f.name: f for f in flags() if f.metadata.get("resume", "free") == rule}


def shown_name(f: dataclasses.Field) -> str:
    return f.metadata.get("shown") or flag_name(f)


def markdown_table() -> str:
    """TRAINING_GUIDE.md's flag table (between its flag-table markers): `python -m reasonforge.train_config`."""
    rows = ["| flag | default | on resume | what it does |", "| --- | --- | --- | --- |"]
    for f in flags():
        meta, bar = f.metadata, "\\|"  # a bar inside a table cell
        if meta["action"] in ("true", "false"):
            default = "off"  # a switch, not given
        elif meta["action"] == "both":
            default = "on" if f.default else "off"
        elif f.default is None or f.name == "config":
            default = ""
        else:
            default = f"`{f.default}`"
        text = (meta["help"] or "").replace("%(default)s", str(f.default)).replace("%%", "%")
        text = text.split(" (default: ")[0].replace("|", bar)
        choices = f" `{bar.join(meta['choices'])}`" if meta["choices"] else ""
        rows.append(f"| `{flag_name(f)}`{choices} | {default} | {meta.get('resume', 'free')} | {text} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
