"""GRPO training: prompts with reference answers, its settings and TRL config, the trainer, its step log and reward curve.

The caller loads the model (Unsloth or transformers), attaches or loads the LoRA adapter and
chooses the chat template, as for SFT; nothing here imports Unsloth, and torch, transformers and
TRL are imported inside functions, so a script can import this module before Unsloth patches them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from reasonforge import chat_format, core, generation, rewards as rewards_mod
from utils import UserError

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def prompt_messages(messages: list[dict]) -> list[dict] | None:
    """The conversation up to and including its last user turn (None without one): what the model
    is asked; the assistant reply after it, which holds the answer, is left out."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    return None if last_user is None else list(messages[:last_user + 1])


def grpo_rows(split, template_source: str, tokenizer=None, *, enable_thinking: bool | None = None,
              max_prompt_tokens: int | None = None, split_name: str = "train"):
    """A prepared split (columns `messages` and `answer`) as GRPO rows: `prompt`, the question
    rendered as text with `template_source` and the assistant generation prompt (the bytes SFT
    training feeds the model before a reply), and `answer`, the reference.

    Rows without an answer or a user turn are dropped, and with `max_prompt_tokens` (needs
    `tokenizer`) rows whose prompt is longer. Raises UserError where the split has no `answer`
    column or no row left.
    """
    if max_prompt_tokens is not None and tokenizer is None:
        raise ValueError("grpo_rows needs the tokenizer to measure prompts against max_prompt_tokens")
    if "answer" not in split.column_names:
        raise UserError(f"the {split_name} split has no 'answer' column (columns: {', '.join(split.column_names)}); "
                        "GRPO rewards need reference answers: prepare the data again with data_preparation.py, "
                        "mapping the reference column with --column-map COLUMN=answer")

    def convert(row):
        asked = prompt_messages(row["messages"] or [])
        answer = str(row["answer"] or "").strip()
        if asked is None or not answer:
            return {"prompt": "", "answer": answer, "_keep": False}
        prompt = chat_format.render_chat(asked, tokenizer=tokenizer, source=template_source, add_generation_prompt=True,
                                   enable_thinking=enable_thinking)
        keep = max_prompt_tokens is None or len(tokenizer.encode(prompt, add_special_tokens=False)) <= max_prompt_tokens
        return {"prompt": prompt, "answer": answer, "_keep": keep}

    rows = split.map(convert, remove_columns=split.column_names, desc=f"GRPO prompts ({split_name})",
                     keep_in_memory=True, new_fingerprint=chat_format.map_fingerprint(
                         split, tokenizer, "grpo", template_source, enable_thinking, max_prompt_tokens))
    kept = rows.filter(lambda r: r["_keep"], keep_in_memory=True).select_columns(["prompt", "answer"])
    answered = sum(1 for a in rows["answer"] if a)
    if answered == 0:
        raise UserError(f"no row of the {split_name} split has a reference answer (all {len(rows)} are empty); "
                        "map the reference column with data_preparation.py --column-map COLUMN=answer")
    if len(kept) == 0:
        raise UserError(f"every {split_name} prompt is longer than {max_prompt_tokens} tokens; raise --max-seq-length "
                        "or lower --max-completion-length")
    if len(kept) < len(rows):
        log.warning("%s: %d of %d rows left out of GRPO (no answer, no user turn, or prompt over %s tokens)",
                    split_name, len(rows) - len(kept), len(rows), max_prompt_tokens)
    return kept


def prepare_data(config, dataset, tokenizer):
    """train_lora.py --method grpo: the (DatasetDict, manifest) from sft.load_dataset as prompt and
    answer rows, rendered with the template SFT would choose for this model (sft.Data)."""
    from reasonforge import sft

    dd, manifest = dataset
    template_name, template_source = sft.choose_template(config, manifest, tokenizer)
    limit = config.max_seq_length - config.max_completion_length
    train, validation = (grpo_rows(dd[name], template_source, tokenizer, max_prompt_tokens=limit, split_name=name)
                         for name in ("train", "validation"))
    rows = {"policy": "drop", "prompt_tokens_limit": limit, "train": {"rows": len(dd["train"]), "kept": len(train)},
            "validation": {"rows": len(dd["validation"]), "kept": len(validation)}}
    return sft.Data(train, validation, template_name, template_source, manifest, rows)


# ---------------------------------------------------------------------------------------------
# Settings and TRL config
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GRPOSettings:
    """The GRPO knobs, with defaults sized for Qwen2.5-3B in 4-bit on a 24 GB GPU.

    A group of 8 is Unsloth's Qwen2.5-3B GRPO recipe (on a 16 GB T4, with 200-token completions);
    512 tokens leaves room for worked reasoning on 24 GB. beta 0 is TRL's default and the DAPO / Dr. GRPO choice: no reference
    forward pass per step, and the LoRA rank already bounds how far the policy can move.
    Temperature 1 keeps the groups diverse: the advantage is reward minus the group mean, so a
    group of identical completions teaches nothing. 5e-6 with max_grad_norm 0.1 is that recipe's
    learning rate and clipping for LoRA on a 3B model; rewards make gradients spiky.
    """

    num_generations: int = 8
    max_completion_length: int = 512
    beta: float = 0.0
    temperature: float = 1.0
    learning_rate: float = 5e-6
    max_grad_norm: float = 0.1

    def problems(self, batch_size: int, gradient_accumulation_steps: int, processes: int = 1) -> list[str]:
        """Every invalid setting, named by its flag, with the fix."""
        out = core.number_problems({
            "--num-generations": (self.num_generations, lambda v: isinstance(v, int) and v >= 2, "2 or more"),
            "--max-completion-length": (self.max_completion_length, lambda v: isinstance(v, int) and v >= 1, "1 or more"),
            "--beta": (self.beta, lambda v: v >= 0, "0 (no reference model) or more"),
            "--temperature": (self.temperature, lambda v: v > 0, "above 0 (GRPO samples its groups)"),
            "--learning-rate": (self.learning_rate, lambda v: v > 0, "above 0"),
            "--max-grad-norm": (self.max_grad_norm, lambda v: v > 0, "above 0"),
        })
        per_step = batch_size * gradient_accumulation_steps * processes
        if self.num_generations >= 2 and per_step % self.num_generations:
            out.append(f"--batch-size {batch_size} x --gradient-accumulation-steps {gradient_accumulation_steps}"
                       + (f" x {processes} processes" if processes > 1 else "")
                       + f" = {per_step} completions per step is not a multiple of --num-generations "
                       f"{self.num_generations}; GRPO scores whole groups, so make it {self.num_generations} "
                       f"or a multiple (e.g. --gradient-accumulation-steps "
                       f"{self.num_generations // math.gcd(self.num_generations, max(batch_size * processes, 1))})")
        return out

    def as_dict(self) -> dict:
        return asdict(self)


def best_metric(reward_weights: dict[str, float]) -> str:
    """What the best checkpoint is chosen on: the validation share of correct answers where
    correctness is one of the rewards, else the validation total reward."""
    return "eval_" + (reward_metric("correctness") if "correctness" in reward_weights else "reward")


def grpo_config(settings: GRPOSettings, reward_weights: dict[str, float], *, output_dir: str | Path,
                max_steps: int = -1, num_epochs: float = 1.0, batch_size: int = 8, gradient_accumulation_steps: int = 1,
                eval_batch_size: int | None = None, generation_batch_size: int | None = None, save_steps: int = 50,
                eval_steps: int | None = None, save_total_limit: int | None = None, logging_steps: int = 1, seed: int = 42, warmup_steps: int = 0,
                lr_scheduler: str = "linear", weight_decay: float = 0.0, optim: str = "adamw_torch",
                precision: dict | None = None, report_to: tuple[str, ...] = ("tensorboard",),
                run_name: str | None = None, has_eval: bool = True, mask_truncated: bool = False):
    """A trl.GRPOConfig from the GRPO settings and the training settings SFT also has.

    `batch_size` counts completions (TRL's per-device batch): batch_size x gradient_accumulation_steps
    must hold whole groups (see GRPOSettings.problems). `precision` is train_lora's precision plan
    ({bf16, fp16, use_cpu, gradient_checkpointing}); None means fp32 on the CPU. Validation
    generates one greedy reply per prompt (see grpo_trainer_class) and the best checkpoint is
    chosen on best_metric(reward_weights), higher being better.
    """
    from trl import GRPOConfig

    precision = precision or {"bf16": False, "fp16": False, "use_cpu": True, "gradient_checkpointing": False}
    checkpointing = precision["gradient_checkpointing"]
    _, weights = rewards_mod.reward_functions(reward_weights)
    evaluate = {"eval_strategy": "steps", "eval_steps": eval_steps or save_steps, "load_best_model_at_end": True,
                "metric_for_best_model": best_metric(reward_weights), "greater_is_better": True} if has_eval else {}
    return GRPOConfig(
        output_dir=str(output_dir), run_name=run_name, seed=seed, data_seed=seed,
        num_train_epochs=num_epochs, max_steps=max_steps,
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=eval_batch_size or batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, learning_rate=settings.learning_rate,
        max_grad_norm=settings.max_grad_norm, weight_decay=weight_decay, warmup_steps=warmup_steps,
        lr_scheduler_type=lr_scheduler, optim=optim, logging_steps=logging_steps, report_to=list(report_to),
        save_strategy="steps", save_steps=save_steps, save_total_limit=save_total_limit, **evaluate,
        num_generations=settings.num_generations, num_generations_eval=1,
        generation_batch_size=generation_batch_size,
        max_completion_length=settings.max_completion_length, beta=settings.beta,
        mask_truncated_completions=mask_truncated,
        temperature=settings.temperature, reward_weights=weights,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        bf16=precision["bf16"], fp16=precision["fp16"], use_cpu=precision["use_cpu"],
        disable_tqdm=True, dataloader_num_workers=0, save_only_model=False, ddp_find_unused_parameters=False,
        # As in SFT: the default would replace a NaN loss by the running mean and hide it from StopOnNonFinite.
        logging_nan_inf_filter=False,
    )


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


class TorchLogProbs:
    """TRL's fused LM-head log-probabilities in plain torch, for machines without Triton.

    TRL 1.15's GRPOTrainer always scores completions through a Triton kernel
    (trl.kernels.ChunkedLogProbFunction); where Triton cannot be imported (CPU builds of torch)
    that name is None and the first step fails with "'NoneType' object has no attribute 'apply'".
    This computes the same five outputs with ordinary autograd, materialising the [tokens, vocab]
    logits the kernel avoids: fine for CPU-sized runs, and never used where the kernel exists.
    """

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs):
        import torch

        z = (hidden @ weight.to(hidden.dtype).t()).float()
        if bias is not None:
            z = z + bias.float()
        z = z * logit_scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        z = z / temperature
        logp = torch.log_softmax(z, dim=-1)
        token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1) if "entropy" in outputs else None
        with torch.no_grad():
            sq = torch.logsumexp(2 * logp, dim=-1) if "log_sum_sq_probs" in outputs else None
            mean = z.mean(-1) if "mean_logits" in outputs else None
            top1 = z.argmax(-1) == targets if "is_top1" in outputs else None
        return token_logp, entropy, sq, mean, top1


def use_torch_logprobs_without_triton() -> bool:
    """Install TorchLogProbs where TRL found no Triton kernel; True where it did so."""
    from trl.trainer import utils as trl_utils

    if getattr(trl_utils, "_ChunkedLogProbFunction", True) is not None:
        return False
    trl_utils._ChunkedLogProbFunction = TorchLogProbs
    return True


def grpo_trainer_class():
    """TRL's GRPOTrainer (Unsloth's patched one where Unsloth was imported first) with three changes:
    validation decodes greedily, one reply per prompt, so the best-checkpoint metric is the
    accuracy evaluate_model.py would measure rather than a sample of it (and eight times cheaper);
    every generation call is timed, logged as generation/tokens_per_s; and where the trainer is
    given `engine=True` (a model that runs transformers' own forward), rollouts and validation go
    through reasonforge.engine instead of `generate`. On a machine without Triton it also installs
    TorchLogProbs (see there)."""
    from transformers import GenerationConfig
    from trl import GRPOTrainer

    use_torch_logprobs_without_triton()

    class ReasonForgeGRPOTrainer(GRPOTrainer):
        def __init__(self, *args, engine: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self._use_engine = engine

        @contextlib.contextmanager
        def _greedy(self):
            sampling = self.generation_config
            if not hasattr(self, "_greedy_config"):
                kwargs = {**self.generation_kwargs, "do_sample": False, "temperature": None, "top_p": None,
                          "top_k": None, "min_p": None}
                self._greedy_config = GenerationConfig(**kwargs, disable_compile=True)
            self.generation_config = self._greedy_config
            try:
                yield
            finally:
                self.generation_config = sampling

        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            mode = "train" if self.model.training else "eval"
            greedy = mode == "eval" and getattr(self, "generation_config", None) is not None
            started = time.perf_counter()
            if self._use_engine:
                completion_ids, logprobs = self._engine_rollouts(prompt_ids, greedy=mode == "eval")
            else:
                with self._greedy() if greedy else contextlib.nullcontext():
                    completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
            seconds = time.perf_counter() - started
            tokens = sum(len(ids) for ids in completion_ids)
            self._metrics[mode][GENERATION_RATE].append(tokens / max(seconds, 1e-9))
            self._metrics[mode][GENERATION_SECONDS].append(seconds)
            return completion_ids, logprobs

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            started = time.perf_counter()
            # TRL's own rule (its clipped_ratio): a completion not ended by a stop or pad token was cut by
            # --max-completion-length; the rewards read this column, so a cut reply earns no correctness
            ends = {*self.eos_token_ids, self._tokenizer.pad_token_id}
            inputs = [{**row, "truncated": not ids or ids[-1] not in ends}
                      for row, ids in zip(inputs, completion_ids_list)]
            out = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            self._metrics["train" if self.model.training else "eval"][REWARD_SECONDS].append(
                time.perf_counter() - started)
            return out

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            # the forward passes that score completions (the old policy's, the reference's, the loss's)
            started = time.perf_counter()
            out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
            key = "train" if self.model.training else "eval"
            self._metrics[key].setdefault(LOGPROB_SECONDS, []).append(time.perf_counter() - started)
            return out

        def _engine_rollouts(self, prompt_ids, greedy: bool):
            """Completions as TRL's generate path returns them: the ids up to and including the
            stop token. The policy runs in eval mode (no LoRA dropout, as vLLM would sample it);
            the captured graph and cache are freed afterwards for the backward pass."""
            engine = generation.engine_for(self.model, self._tokenizer)
            settings = generation.GenerationSettings(
                temperature=0.0 if greedy else self.temperature, top_p=1.0 if greedy else self.top_p,
                top_k=0 if greedy else (self.top_k or 0), max_new_tokens=self.max_completion_length,
                repetition_penalty=self.repetition_penalty)
            was_training = self.model.training
            self.model.eval()
            try:
                replies = engine.generate([list(p) for p in prompt_ids], settings, set(self.eos_token_ids))
            finally:
                engine.release()
                self.model.train(was_training)
            return [r.ids + ([r.stop_id] if r.stopped else []) for r in replies], None

    return ReasonForgeGRPOTrainer


def build_grpo_trainer(model, tokenizer, train_ds, eval_ds, config, reward_weights: dict[str, float],
                       callbacks: list | None = None, engine: bool = False):
    """A GRPOTrainer over `model` (already LoRA-wrapped by the caller, e.g. a PeftModel) with the
    named rewards; `config` comes from grpo_config with the same `reward_weights`. The stock
    printers are removed: GRPOStepLogger (see grpo_step_logger) prints one summary per step."""
    funcs, weights = rewards_mod.reward_functions(reward_weights)
    if list(config.reward_weights or []) != weights:
        raise ValueError(f"config.reward_weights {config.reward_weights} do not match the rewards {reward_weights}; "
                         "build the config with grpo_config(..., reward_weights) from the same rewards")
    trainer = grpo_trainer_class()(model=model, reward_funcs=funcs, args=config, train_dataset=train_ds,
                                   eval_dataset=eval_ds, processing_class=tokenizer, callbacks=callbacks,
                                   engine=engine)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for stock in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(stock)
    return trainer


# ---------------------------------------------------------------------------------------------
# Per-step log and reward curve
# ---------------------------------------------------------------------------------------------


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


_LOGGER_CLASS = None


def grpo_step_logger(jsonl_path: str | Path):
    """reasonforge.callbacks.StepLogger (progress bar, JSON lines, step clock) whose JSON lines also
    carry step_summary's figures, and whose printed line per step is the rewards' (no loss line)."""
    global _LOGGER_CLASS
    if _LOGGER_CLASS is None:
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

        _LOGGER_CLASS = GRPOStepLogger
    return _LOGGER_CLASS(Path(jsonl_path))


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


# Questions per rollout call on a GPU: 8 groups of 8 is batch 64, where a decode step costs about
# what batch 8's does (benchmarks/RESULTS.md, run 27: 6.2x the tokens/s of one group with Unsloth's
# generate, 17x with the static engine) while the KV cache stays small.
GPU_PROMPTS_PER_GENERATION = 8


def generation_batch_size(config, batch_size: int, processes: int = 1, on_gpu: bool | None = None) -> int | None:
    """TRL's generation_batch_size: --prompts-per-generation groups, by default 8 on a GPU; on a CPU
    None (one optimizer step's completions, TRL's default), where a bigger batch gains nothing.
    Rounded up to whole groups and whole global batches, both of which TRL requires."""
    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    prompts = config.prompts_per_generation or (GPU_PROMPTS_PER_GENERATION if on_gpu else None)
    if prompts is None:
        return None
    completions = prompts * config.num_generations
    unit = math.lcm(batch_size * processes, config.num_generations)
    return -(-completions // unit) * unit


def build_trainer(run, callbacks: list):
    """The GRPO trainer of a train_lora.py Run (reasonforge.training): its model with LoRA, its
    prompts, the flags' group size, completion length, KL coefficient and temperature."""
    import os

    c, batch = run.config, run.batch
    gen_batch = generation_batch_size(c, batch.batch_size, run.processes)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(c.output_dir) / "logs")
    weights = rewards_mod.parse_rewards(c.rewards)
    settings = GRPOSettings(num_generations=c.num_generations, max_completion_length=c.max_completion_length,
                            beta=c.beta, temperature=c.temperature, learning_rate=c.learning_rate)
    config = grpo_config(settings, weights, output_dir=c.output_dir, max_steps=c.max_steps, num_epochs=c.num_epochs,
                         batch_size=batch.batch_size, gradient_accumulation_steps=batch.gradient_accumulation_steps,
                         # Validation decodes one greedy reply per prompt; with the engine as many
                         # prompts per call as training generates completions: a batch known to fit.
                         eval_batch_size=max(batch.batch_size * batch.gradient_accumulation_steps,
                                             gen_batch if run.engine == "static" and gen_batch else 0),
                         generation_batch_size=gen_batch,
                         save_steps=c.save_steps, eval_steps=c.eval_steps, save_total_limit=c.save_total_limit,
                         logging_steps=c.logging_steps, seed=c.seed, warmup_steps=c.warmup_steps,
                         lr_scheduler=c.lr_scheduler, weight_decay=c.weight_decay, optim=run.optim,
                         precision=run.precision, run_name=c.run_name, has_eval=len(run.data.validation) > 0)
    return build_grpo_trainer(run.model, run.tokenizer, run.data.train, run.data.validation, config, weights, callbacks,
                              engine=run.engine == "static")
