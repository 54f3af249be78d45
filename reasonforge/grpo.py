"""GRPO training: prompts with reference answers, its settings and TRL config, and the trainer of a train_lora.py Run.

The trainer class is in reasonforge.grpo_trainer and the step log and reward curve in
reasonforge.grpo_logs. The caller loads the model (Unsloth or transformers), attaches or loads the
LoRA adapter and chooses the chat template, as for SFT; nothing here imports Unsloth, and torch,
transformers and TRL are imported inside functions, so a script can import this module before
Unsloth patches them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from reasonforge import chat_format, core, grpo_trainer, rewards as rewards_mod, training_args
from reasonforge.core import UserError
from reasonforge.grpo_logs import reward_metric

log = logging.getLogger(__name__)


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
    """A trl.GRPOConfig from the GRPO settings and the training settings SFT also has
    (training_args.shared_training_args).

    `batch_size` counts completions (TRL's per-device batch): batch_size x gradient_accumulation_steps
    must hold whole groups (see GRPOSettings.problems). `precision` is train_lora's precision plan
    ({bf16, fp16, use_cpu, gradient_checkpointing}); None means fp32 on the CPU. Validation
    generates one greedy reply per prompt (see grpo_trainer.grpo_trainer_class) and the best
    checkpoint is chosen on best_metric(reward_weights), higher being better.
    """
    from trl import GRPOConfig

    _, weights = rewards_mod.reward_functions(reward_weights)
    shared = training_args.shared_training_args(
        output_dir=output_dir, run_name=run_name, seed=seed, num_epochs=num_epochs, max_steps=max_steps,
        batch_size=batch_size, eval_batch_size=eval_batch_size or batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, learning_rate=settings.learning_rate,
        weight_decay=weight_decay, warmup_steps=warmup_steps, lr_scheduler=lr_scheduler, optim=optim,
        logging_steps=logging_steps, save_steps=save_steps, save_total_limit=save_total_limit, eval_steps=eval_steps,
        best_metric=best_metric(reward_weights) if has_eval else None, greater_is_better=True,
        precision=precision, report_to=report_to)
    return GRPOConfig(
        **shared, max_grad_norm=settings.max_grad_norm,
        num_generations=settings.num_generations, num_generations_eval=1,
        generation_batch_size=generation_batch_size,
        max_completion_length=settings.max_completion_length, beta=settings.beta,
        mask_truncated_completions=mask_truncated,
        temperature=settings.temperature, reward_weights=weights,
    )


# ---------------------------------------------------------------------------------------------
# The trainer of a Run
# ---------------------------------------------------------------------------------------------


# Questions per rollout call on a GPU: 8 groups of 8 is batch 64, where a decode step costs little
# more than batch 8's (benchmarks/RESULTS.md, the generation engine), so tokens/s grows nearly with
# the batch while the KV cache stays small.
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


def trainer_config(run):
    """The GRPOConfig of a train_lora.py Run (reasonforge.training): the flags' group size, completion
    length, KL coefficient and temperature, and the batch and precision setup chose."""
    c, batch = run.config, run.batch
    gen_batch = generation_batch_size(c, batch.batch_size, run.processes)
    weights = rewards_mod.parse_rewards(c.rewards)
    settings = GRPOSettings(num_generations=c.num_generations, max_completion_length=c.max_completion_length,
                            beta=c.beta, temperature=c.temperature, learning_rate=c.learning_rate,
                            **({"max_grad_norm": c.max_grad_norm} if c.max_grad_norm else {}))
    return grpo_config(settings, weights, output_dir=c.output_dir, max_steps=c.max_steps, num_epochs=c.num_epochs,
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


def build_trainer(run, callbacks: list):
    """The GRPO trainer of a train_lora.py Run (reasonforge.training): its model with LoRA, its
    prompts, and trainer_config's settings."""
    run.changes.setenv("TENSORBOARD_LOGGING_DIR", str(Path(run.config.output_dir) / "logs"))
    config = trainer_config(run)
    return grpo_trainer.build_grpo_trainer(run.model, run.tokenizer, run.data.train, run.data.validation, config,
                                           rewards_mod.parse_rewards(run.config.rewards), callbacks,
                                           engine=run.engine == "static", changes=run.changes)
