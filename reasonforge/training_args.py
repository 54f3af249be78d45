"""The transformers TrainingArguments fields SFT and GRPO set alike, built in one place so that the two
methods' TRL configs (SFTConfig, GRPOConfig) cannot drift apart; each method adds its own fields."""

from __future__ import annotations

from pathlib import Path

# What the CPU trains in where the caller names no precision plan: fp32, no checkpointing.
CPU_PRECISION = {"bf16": False, "fp16": False, "use_cpu": True, "gradient_checkpointing": False}


def shared_training_args(*, output_dir: str | Path, run_name: str | None, seed: int, num_epochs: float,
                         max_steps: int, batch_size: int, eval_batch_size: int, gradient_accumulation_steps: int,
                         learning_rate: float, weight_decay: float, warmup_steps: int, lr_scheduler: str, optim: str,
                         logging_steps: int, save_steps: int, save_total_limit: int | None, eval_steps: int | None,
                         best_metric: str | None, greater_is_better: bool, precision: dict | None,
                         report_to: tuple[str, ...] | list[str] = ("tensorboard",)) -> dict:
    """Keyword arguments for SFTConfig / GRPOConfig: seeds, schedule, batch, saving, validation and
    precision, and the switches both methods set the same way.

    Validation runs every `eval_steps` (default: every `save_steps`) and the best checkpoint, on
    `best_metric`, is loaded at the end; `best_metric` None means no validation at all. `precision`
    is train_lora's precision plan ({bf16, fp16, use_cpu, gradient_checkpointing}); None means fp32
    on the CPU.
    """
    precision = precision or CPU_PRECISION
    checkpointing = precision["gradient_checkpointing"]
    evaluate = {"eval_strategy": "steps", "eval_steps": eval_steps or save_steps, "load_best_model_at_end": True,
                "metric_for_best_model": best_metric, "greater_is_better": greater_is_better} if best_metric else {}
    return dict(
        output_dir=str(output_dir), run_name=run_name, seed=seed, data_seed=seed,
        num_train_epochs=num_epochs, max_steps=max_steps,
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=eval_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, learning_rate=learning_rate,
        weight_decay=weight_decay, warmup_steps=warmup_steps, lr_scheduler_type=lr_scheduler, optim=optim,
        logging_steps=logging_steps, report_to=list(report_to),
        save_strategy="steps", save_steps=save_steps, save_total_limit=save_total_limit, **evaluate,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        bf16=precision["bf16"], fp16=precision["fp16"], use_cpu=precision["use_cpu"],
        disable_tqdm=True, dataloader_num_workers=0, save_only_model=False, ddp_find_unused_parameters=False,
        # The default replaces a NaN loss by the running mean in the logs, hiding a diverged run from StopOnNonFinite.
        logging_nan_inf_filter=False,
    )
