"""What a training run leaves in its folder and beyond: final_model/, merged_16bit/, metrics, loss curve, S3 and Hub copies."""

from __future__ import annotations

from pathlib import Path

from reasonforge import core, gpu_memory, models, rundirs, s3, sft
from reasonforge.checkpoints import is_checkpoint, local_checkpoints
from reasonforge.core import UserError


# ---------------------------------------------------------------------------------------------
# Which folders a run may write into
# ---------------------------------------------------------------------------------------------


def is_training_run(folder: Path) -> bool:
    """An earlier (or a running) train_lora.py output folder, which a new run may write into."""
    return (any((folder / name).is_file() for name in ("training_config.json", rundirs.RunLock.NAME))
            or bool(local_checkpoints(folder)) or is_final_model(folder / "final_model"))


def is_final_model(folder: Path) -> bool:
    return core.holds_json(folder, models.RUN_INFO_FILE, "base_model")


def is_merged_model(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def run_dir_problem(output_dir: Path) -> str | None:
    """Why a run may not write into `output_dir`: only a new, empty or earlier run folder will do,
    and the final_model/ and merged_16bit/ it replaces at the end must be ours too."""
    for folder in (output_dir, *output_dir.resolve().parents):
        # a checkpoint holds a copy of training_config.json, so it passes for a run folder: a run written
        # into it would mix its files into that checkpoint (and overwrite some)
        if (folder.name.startswith("checkpoint-") and is_checkpoint(folder)) or is_final_model(folder):
            where = "is" if folder == output_dir else f"is inside {folder}, which is"
            return (f"--output-dir {output_dir} {where} a checkpoint or adapter of another run; "
                    "choose a folder outside it, e.g. a new folder beside that run")
    problem = rundirs.output_dir_problem(output_dir, is_training_run, "a train_lora.py run folder", replaced=False)
    if problem or not output_dir.is_dir():
        return problem
    return (rundirs.output_dir_problem(output_dir / "final_model", is_final_model, "an adapter saved by train_lora.py")
            or rundirs.output_dir_problem(output_dir / "merged_16bit", is_merged_model, "a merged model saved by train_lora.py"))


# ---------------------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------------------


def run_info(run, trainer) -> dict:
    """reasonforge.json beside the adapter: what evaluation and chat read back as their defaults."""
    c = run.config
    # local paths absolute: evaluation and chat load the base from wherever they are started
    return {"base_model": core.absolute_if_local(c.model_name), "backend": run.backend, "chat_template": run.data.template_name,
            "max_seq_length": c.max_seq_length, "train_on_responses_only": c.train_on_responses_only,
            "long_rows": c.long_rows, "dataset_manifest_sha256": run.data.manifest.get("content_sha256"),
            # where the training rows are, so evaluation can tell whether its rows were among them
            "dataset_path": sft.dataset_location(c),
            "best_checkpoint": trainer.state.best_model_checkpoint, "method": c.method,
            "best_metric_name": trainer.args.metric_for_best_model, "best_metric": trainer.state.best_metric,
            "best_validation_loss": trainer.state.best_metric if trainer.args.metric_for_best_model == "eval_loss" else None,
            "global_step": trainer.state.global_step, "load_in_4bit": run.load_in_4bit}


def save_final_model(run, trainer) -> Path:
    """Write final_model/ (adapter, tokenizer with the training template, run info) atomically."""
    final = run.config.out / "final_model"
    with rundirs.atomic_directory(final, is_final_model, "an adapter saved by train_lora.py") as tmp:
        trainer.model.save_pretrained(str(tmp), safe_serialization=True)
        run.tokenizer.save_pretrained(str(tmp))
        core.atomic_write_json(tmp / models.RUN_INFO_FILE, run_info(run, trainer))
    c = run.config
    if c.save_merged or c.save_gguf:
        merged = c.out / "merged_16bit"
        with rundirs.atomic_directory(merged, is_merged_model, "a merged model saved by train_lora.py") as tmp:
            save_merged(trainer.model, run.tokenizer, tmp, run.backend, final)
        if c.save_gguf:
            from reasonforge import gguf

            gguf.export(final, c.save_gguf, c.out / "final_model_gguf", merged=merged)
    return final


def save_merged(model, tokenizer, target: Path, backend: str, final: Path) -> None:
    """The adapter merged into its base in 16-bit: Unsloth's own merge on its backend; elsewhere the
    saved adapter `final` merged into the base reloaded in 16-bit (a 4-bit base cannot be merged
    into, and the live model stays as it is)."""
    if backend == "unsloth":
        model.save_pretrained_merged(str(target), tokenizer, save_method="merged_16bit")
        return
    from reasonforge import gguf

    gguf.merge_adapter(final, target)


# ---------------------------------------------------------------------------------------------
# Metrics and the loss curve
# ---------------------------------------------------------------------------------------------


def plot_title(run) -> str:
    """What a plot is of: run name, model (its folder or Hub name) and method."""
    c = run.config
    return f"{c.run_name}: {Path(str(c.model_name)).name}, {c.method}"


def plot_losses(history: list[dict], path: Path, title: str | None = None) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not train:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    save_step_figure(fig, ax, "loss (assistant tokens)", path, title)
    return True


def save_step_figure(fig, ax, ylabel: str, path: Path, title: str | None = None) -> None:
    """Finish a per-step curve (the loss curve, GRPO's reward curve) the same way and write it."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 1.5 on a 4-step run
    if title:
        ax.set_title(title, fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def collect_metrics(run, result) -> dict:
    """training_metrics.json: losses, the best checkpoint, tokens, time and memory of the run."""
    state = result.trainer.state
    history = state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    rewards = [h["reward"] for h in history if h.get("reward") is not None]  # grpo: mean total reward of a step
    evals = [h for h in history if "eval_loss" in h]
    tokens, runtime = state.num_input_tokens_seen, result.runtime_s
    trainable, total = run.parameters
    clock = step_clock(result.trainer)
    return {
        "global_step": state.global_step,
        "epochs": state.epoch,
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_last": train_losses[-1] if train_losses else None,
        "train_loss_mean": mean_logged_loss(history),
        "train_reward_first": rewards[0] if rewards else None,
        "train_reward_last": rewards[-1] if rewards else None,
        "validation_losses": [{"step": h["step"], "loss": h["eval_loss"]} for h in evals],
        # sft chooses on eval_loss, grpo on the validation share of correct answers
        "best_metric_name": result.trainer.args.metric_for_best_model,
        "best_metric": state.best_metric,
        "best_validation_loss": state.best_metric if result.trainer.args.metric_for_best_model == "eval_loss" else None,
        "best_checkpoint": state.best_model_checkpoint,
        "runtime_s": round(runtime, 2),
        "tokens_seen": tokens,
        "tokens_per_s": round(tokens / runtime, 1) if runtime > 0 else None,
        **clock,
        # process start to the training loop, by part; the first step's own time is first_step_s
        "setup_phases_s": run.phases.spans(until=clock.get("loop_start_at")),
        "peak_gpu_memory_gib": round(gpu_memory.gpu_memory_stats().get("peak_gib", 0.0), 3),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_percent": round(100 * trainable / max(total, 1), 4),
        "history": history,
    }


def mean_logged_loss(history: list[dict]) -> float | None:
    """The mean loss a step over the whole run, from the logged losses, each the mean of the steps
    since the previous log. The Trainer's own training_loss divides the losses since a resume by
    every step of the run, so a resumed run would report a mean far too low."""
    total = last = 0
    for h in history:
        if "loss" in h:
            total, last = total + h["loss"] * (h["step"] - last), h["step"]
    return total / last if last else None


def step_clock(trainer) -> dict:
    """Time to first step, setup, first step and steady tokens/s, from the run's StepLogger."""
    from reasonforge.callbacks import StepLogger

    logger = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StepLogger)), None)
    return logger.clock.summary() if logger is not None else {}


# ---------------------------------------------------------------------------------------------
# Copies: S3 and the Hub
# ---------------------------------------------------------------------------------------------


def upload_outputs(run_uri: s3.S3Uri, final: Path, output_dir: Path) -> None:
    s3.upload_directory(final, run_uri.join("final_model"), desc="upload final_model")
    if (output_dir / "final_model_gguf").is_dir():
        s3.upload_directory(output_dir / "final_model_gguf", run_uri.join("final_model_gguf"), desc="upload GGUF")
    for name in ("training_config.json", "training_metrics.json", "loss_curve.png", "reward_curve.png"):
        if (output_dir / name).is_file():
            s3.upload_file(output_dir / name, run_uri.join(name))


def preflight_hub(repo: str | None) -> None:
    """Fail before training, not after it, when the Hub push cannot work."""
    if not repo:
        return
    from huggingface_hub import HfApi
    from huggingface_hub.utils import get_token

    if not get_token():
        raise UserError(f"--push-to-hub {repo}: no Hugging Face token; run `hf auth login` or set HF_TOKEN")
    try:
        HfApi().whoami()
    except Exception as exc:
        raise UserError(f"--push-to-hub {repo}: the Hub is unreachable or the token is invalid ({type(exc).__name__}); "
                        "check network and HF_TOKEN, or drop --push-to-hub") from exc


def push_to_hub(final: Path, repo: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, exist_ok=True, private=True)
    api.upload_folder(folder_path=str(final), repo_id=repo, commit_message="Upload LoRA adapter (ReasonForge train)")
