"""SFT's SFTConfig and GRPO's GRPOConfig take their shared TrainingArguments fields from one builder
(reasonforge.training_args), with the values each method set by hand before it existed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import train_lora
import utils
from reasonforge import batch_plan, cuda_graphs, grpo, sft, train_config, training, training_args

CPU = {"bf16": False, "fp16": False, "use_cpu": True, "gradient_checkpointing": False}
FLAGS = ["--eval-steps", "3", "--save-steps", "6", "--save-total-limit", "2", "--warmup-steps", "5",
         "--lr-scheduler", "cosine", "--weight-decay", "0.01", "--seed", "7", "--logging-steps", "2",
         "--num-epochs", "2", "--max-steps", "11", "--run-name", "xyz", "--learning-rate", "3e-5",
         "--num-generations", "4", "--max-completion-length", "64", "--beta", "0.01", "--temperature", "0.9",
         "--prompts-per-generation", "3", "--rewards", "correctness=2,format"]

# Fields the two methods set differently, on purpose: GRPO validates one greedy reply per prompt in
# bigger batches, picks its best checkpoint on a reward (higher is better) and clips harder.
DIFFERENT = {"per_device_eval_batch_size", "metric_for_best_model", "greater_is_better", "learning_rate"}


def fake_run(tmp_path, method: str, flags=(), *, precision=None, validation_rows: int = 3, pad: int | None = None,
             batch=(4, 2, "on"), engine: str = "static"):
    """A Run as setup() would hand build_trainer, without a model: what trainer_config reads."""
    args = train_lora.build_parser().parse_args(["--output-dir", str(tmp_path / "out"), "--method", method, *flags])
    return SimpleNamespace(config=training.TrainConfig.from_args(args), batch=batch_plan.BatchPlan(*batch),
                           precision=precision or CPU, optim="adamw_torch", processes=1, engine=engine,
                           cuda_graphs=cuda_graphs.GraphPlan(pad is not None, "test", pad),
                           data=SimpleNamespace(train=[], validation=[0] * validation_rows), model=None, tokenizer=None)


def both(tmp_path, flags=FLAGS, **kw):
    return (sft.trainer_config(fake_run(tmp_path, "sft", flags, **kw)).to_dict(),
            grpo.trainer_config(fake_run(tmp_path, "grpo", flags, **kw)).to_dict())


def test_sft_and_grpo_share_the_training_arguments_they_set_alike(tmp_path):
    checkpointing = {**CPU, "gradient_checkpointing": True}
    s, g = both(tmp_path, precision=checkpointing, pad=16)
    # What the hand-written SFTConfig(...) and GRPOConfig(...) produced for these flags.
    expected = {
        "output_dir": str(tmp_path / "out"), "run_name": "xyz", "seed": 7, "data_seed": 7, "num_train_epochs": 2.0,
        "max_steps": 11, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "weight_decay": 0.01,
        "warmup_steps": 5, "lr_scheduler_type": "cosine", "optim": "adamw_torch", "logging_steps": 2,
        "report_to": ["tensorboard"], "save_strategy": "steps", "save_steps": 6, "save_total_limit": 2,
        "eval_strategy": "steps", "eval_steps": 3, "load_best_model_at_end": True, "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False}, "bf16": False, "fp16": False, "use_cpu": True,
        "disable_tqdm": True, "dataloader_num_workers": 0, "save_only_model": False,
        "ddp_find_unused_parameters": False, "logging_nan_inf_filter": False,
    }
    for name, config in (("sft", s), ("grpo", g)):
        assert {k: config[k] for k in expected} == expected, name
    assert (s["learning_rate"], g["learning_rate"]) == (3e-5, 3e-5)
    assert (s["metric_for_best_model"], s["greater_is_better"], s["per_device_eval_batch_size"]) == ("eval_loss", False, 4)
    # the engine validates as many prompts per call as training generates: 3 groups of 4 completions
    assert (g["metric_for_best_model"], g["greater_is_better"], g["per_device_eval_batch_size"]) == (
        "eval_rewards/correctness/mean", True, 12)

    # Every field the builder sets is equal in both methods' configs, but for those set apart on purpose.
    shared = training_args.shared_training_args(
        output_dir="x", run_name=None, seed=1, num_epochs=1, max_steps=1, batch_size=1, eval_batch_size=1,
        gradient_accumulation_steps=1, learning_rate=1.0, weight_decay=0.0, warmup_steps=0, lr_scheduler="linear",
        optim="adamw_torch", logging_steps=1, save_steps=1, save_total_limit=None, eval_steps=None,
        best_metric="eval_loss", greater_is_better=False, precision=None)
    assert set(expected) | DIFFERENT == set(shared)
    assert {k: s[k] for k in set(shared) - DIFFERENT} == {k: g[k] for k in set(shared) - DIFFERENT}


def test_each_method_keeps_its_own_fields(tmp_path):
    s, g = both(tmp_path, pad=16)
    assert {k: s[k] for k in ("max_length", "packing", "padding_free", "dataset_kwargs", "include_num_input_tokens_seen",
                              "remove_unused_columns", "pad_to_multiple_of", "max_grad_norm")} == {
        "max_length": 2048, "packing": False, "padding_free": False, "dataset_kwargs": {"skip_prepare_dataset": True},
        "include_num_input_tokens_seen": "non_padding", "remove_unused_columns": False, "pad_to_multiple_of": 16,
        "max_grad_norm": 1.0}
    assert {k: g[k] for k in ("num_generations", "num_generations_eval", "generation_batch_size",
                              "max_completion_length", "beta", "temperature", "reward_weights",
                              "mask_truncated_completions", "max_grad_norm")} == {
        "num_generations": 4, "num_generations_eval": 1, "generation_batch_size": 12, "max_completion_length": 64,
        "beta": 0.01, "temperature": 0.9, "reward_weights": [2.0, 1.0], "mask_truncated_completions": False,
        "max_grad_norm": 0.1}
    assert s["gradient_checkpointing_kwargs"] is None and g["gradient_checkpointing_kwargs"] is None


@pytest.mark.parametrize("validation_rows", [0, 3])
def test_grpo_without_validation_rows_saves_without_evaluating(tmp_path, validation_rows):
    s, g = both(tmp_path, ["--num-generations", "2"], validation_rows=validation_rows, batch=(2, 3, "off"),
                engine="transformers")
    # SFT sets its evaluation whatever its validation rows, as its hand-written SFTConfig did
    assert (s["eval_strategy"], s["eval_steps"], s["load_best_model_at_end"]) == ("steps", 100, True)
    if validation_rows:
        assert (g["eval_strategy"], g["eval_steps"], g["metric_for_best_model"]) == (
            "steps", 100, "eval_rewards/correctness/mean")
    else:
        assert (g["eval_strategy"], g["eval_steps"], g["load_best_model_at_end"], g["metric_for_best_model"],
                g["greater_is_better"]) == ("no", None, False, None, None)
    assert (s["per_device_eval_batch_size"], g["per_device_eval_batch_size"]) == (2, 6)
    assert s["learning_rate"] == train_config.DEFAULT_LEARNING_RATE["sft"]
    assert g["learning_rate"] == train_config.DEFAULT_LEARNING_RATE["grpo"]


def test_max_grad_norm_flag_reaches_both_methods_and_keeps_their_defaults(tmp_path):
    """--max-grad-norm, added as one TrainConfig field (plus the line where each method hands it to TRL)."""
    s, g = both(tmp_path)
    assert (s["max_grad_norm"], g["max_grad_norm"]) == (1.0, 0.1)
    s, g = both(tmp_path, [*FLAGS, "--max-grad-norm", "0.5"])
    assert (s["max_grad_norm"], g["max_grad_norm"]) == (0.5, 0.5)
    with pytest.raises(utils.UserError, match="--max-grad-norm nan is not a finite number"):
        train_lora.validate_args(train_lora.build_parser().parse_args(["--max-grad-norm", "nan"]))
