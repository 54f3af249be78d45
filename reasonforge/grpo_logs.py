"""GRPO's per-step log and reward curve: the metric names, one summary and printed line per step, the
step logger that writes them, and the plot of rewards over steps."""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

# Metrics TRL's GRPOTrainer logs (evaluation adds the eval_ prefix); the generation rate is ours.
COMPLETION_LENGTH = "completions/mean_length"
GENERATION_RATE = "generation/tokens_per_s"
# Where a step's time goes, per phase; log-probabilities and the backward pass are the step's rest.
GENERATION_SECONDS = "time/generation_s"
REWARD_SECONDS = "time/rewards_s"
LOGPROB_SECONDS = "time/logprobs_s"
STEP_TIME = "step_time"


def reward_metric(name: str) -> str:
    """TRL's per-step mean of one reward function, e.g. rewards/correctness/mean."""
    return f"rewards/{name}/mean"


def step_summary(logs: dict, completions_per_step: int) -> dict:
    """The GRPO figures of one log record: mean reward per function, share of correct answers,
    mean completion length and generation tokens/s, under plain names (eval_ ones for validation).

    The generation rate is the one ReasonForgeGRPOTrainer measured; where a patched trainer did not
    log it, it is estimated as completion tokens over the whole step time (so it reads low).
    """
    prefix = "eval_" if any(k.startswith("eval_") for k in logs) else ""
    out: dict = {}
    for key, value in logs.items():
        if key.startswith(prefix + "rewards/") and key.endswith("/mean"):
            out[f"{prefix}reward_{key[len(prefix) + 8:-5]}"] = value
    if f"{prefix}{reward_metric('correctness')}" in logs:
        out[f"{prefix}share_correct"] = logs[f"{prefix}{reward_metric('correctness')}"]
    length = logs.get(prefix + COMPLETION_LENGTH)
    if length is not None:
        out[f"{prefix}completion_length_mean"] = length
    phases = ((GENERATION_SECONDS, "generation_s"), (REWARD_SECONDS, "rewards_s"), (LOGPROB_SECONDS, "logprobs_s"))
    for key, name in phases:
        if logs.get(prefix + key) is not None:
            out[f"{prefix}{name}"] = logs[prefix + key]
    rate = logs.get(prefix + GENERATION_RATE)
    if rate is None and length is not None and logs.get(STEP_TIME) and not prefix:
        rate = length * completions_per_step / logs[STEP_TIME]
        out["generation_tokens_per_s_estimated"] = True
    if rate is not None:
        out[f"{prefix}generation_tokens_per_s"] = round(rate, 1)
    return out


def summary_line(summary: dict, step: int, max_steps: int) -> str | None:
    """One readable line of a step_summary, or None where it holds no reward."""
    prefix = "eval_" if any(k.startswith("eval_") for k in summary) else ""
    rewards = {k[len(prefix) + 7:]: v for k, v in summary.items() if k.startswith(prefix + "reward_")}
    if not rewards:
        return None
    parts = [f"step {step}/{max_steps}" + (" | validation" if prefix else ""),
             "reward " + " ".join(f"{k} {v:.3f}" for k, v in rewards.items() if v is not None)]
    if summary.get(prefix + "share_correct") is not None:
        parts.append(f"correct {100 * summary[prefix + 'share_correct']:.1f}%")
    if summary.get(prefix + "completion_length_mean") is not None:
        parts.append(f"completion {summary[prefix + 'completion_length_mean']:.0f} tok")
    if summary.get(prefix + "generation_tokens_per_s") is not None:
        parts.append(f"generation {summary[prefix + 'generation_tokens_per_s']:,.0f} tok/s")
    phases = [f"{label} {summary[prefix + key]:.1f}s" for key, label in
              (("generation_s", "generate"), ("rewards_s", "rewards"), ("logprobs_s", "log-probs"))
              if summary.get(prefix + key) is not None]
    if phases:
        parts.append(" ".join(phases))
    return " | ".join(parts)



@functools.cache
def grpo_step_logger_class():
    """GRPOStepLogger, defined once per process: reasonforge.callbacks is imported only when a run
    asks for it (it imports transformers)."""
    from reasonforge.callbacks import StepLogger

    class GRPOStepLogger(StepLogger):
        def on_log(self, args, state, control, logs=None, **kw):
            line = None
            if logs:
                per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
                summary = step_summary(logs, per_step)
                # GRPO's validation "loss" is a placeholder 0; its figures are the rewards.
                logs = {**{k: v for k, v in logs.items() if k != "eval_loss"}, **summary}
                line = summary_line(summary, state.global_step, state.max_steps)
            super().on_log(args, state, control, logs=logs, **kw)
            if line and self.bar is not None:
                lr = logs.get("learning_rate")
                self.bar.write(line + (f" | lr {lr:.2e}" if lr is not None and "loss" in logs else ""))

        def step_line(self, state, logs, rate, mem):
            return None  # GRPO's loss is a surrogate near 0: its line is the rewards' (summary_line)

    return GRPOStepLogger


def grpo_step_logger(jsonl_path: str | Path):
    """reasonforge.callbacks.StepLogger (progress bar, JSON lines, step clock) whose JSON lines also
    carry step_summary's figures, and whose printed line per step is the rewards' (no loss line)."""
    return grpo_step_logger_class()(Path(jsonl_path))


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON lines file (the step log), skipping a last line cut short by a kill."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def running_mean(values, window: int) -> list[float]:
    """The mean of each value and the window - 1 before it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_rewards(history: list[dict], path: str | Path, title: str | None = None) -> bool:
    """The reward curve beside the loss curve: mean training reward per function per step, and the
    validation share of correct answers. `history` is trainer.state.log_history or the step log's
    records. False (nothing drawn) where it holds no reward."""
    names = sorted({k[8:-5] for h in history for k in h if k.startswith("rewards/") and k.endswith("/mean")})
    if not names:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        steps, values = zip(*[(h["step"], h[reward_metric(name)]) for h in history
                              if h.get(reward_metric(name)) is not None])
        line, = ax.plot(steps, values, lw=0.6, alpha=0.45)
        # A step scores only a few groups, so the raw curve is noise around the trend; the running mean shows it.
        ax.plot(steps, running_mean(values, max(1, len(values) // 10)), color=line.get_color(), lw=1.8,
                label=f"train {name} (running mean)")
    val = [(h["step"], h["eval_" + reward_metric("correctness")]) for h in history
           if h.get("eval_" + reward_metric("correctness")) is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="validation correct (greedy)")
    from reasonforge.outputs import save_step_figure

    save_step_figure(fig, ax, "mean reward", path, title)
    return True
