"""Supervised fine-tuning, the training method: the prepared rows rendered and masked, and TRL's SFTTrainer built for a Run."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reasonforge import chat_format, core, s3, training_args
from reasonforge.core import UserError

log = logging.getLogger("reasonforge.train")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    """The rows a run trains and validates on, the template they were rendered with, and their source."""

    train: Any
    validation: Any
    template_name: str
    template_source: str
    manifest: dict  # data_preparation.py's manifest.json
    rows: dict | None  # rows per split over --max-seq-length, dropped or cut: the banner and training_config.json

    @classmethod
    def given(cls, train: list[dict], validation: list[dict]) -> Data:
        """Rows the caller tokenized itself (input_ids, labels), such as the benchmark's."""
        import datasets

        return cls(datasets.Dataset.from_list(train), datasets.Dataset.from_list(validation), "given", "", {}, None)


def dataset_location(config) -> str:
    """Where --dataset-path is: an s3:// URI (also a bucket-relative path under --from-s3) or an
    absolute local folder. reasonforge.json records it, so evaluation can find the same rows."""
    path = config.dataset_path
    if config.from_s3 and core.path_kind(path) != "s3":
        return f"s3://{config.s3_bucket}/{path.strip('/')}"
    return core.absolute_if_local(path)


def load_dataset(config):
    """(DatasetDict, manifest) of --dataset-path, fetched first when it is on S3."""
    return chat_format.load_prepared_dataset(s3.fetch_if_s3(dataset_location(config)))


def choose_template(config, manifest: dict, tokenizer) -> tuple[str, str]:
    """(name, jinja source) of the template training renders with; see --chat-template."""
    requested = config.chat_template
    if requested == "dataset":
        recorded = manifest.get("chat_template", {})
        if recorded.get("source") and "preview" not in str(recorded.get("name")):
            misfit = chat_format.template_misfit(recorded["source"], tokenizer)
            if misfit:
                raise UserError(
                    f"the dataset's recorded template {recorded.get('name')!r} does not fit {config.model_name}: {misfit}; "
                    f"use --chat-template auto (the model's own), or --chat-template {recorded.get('name')} to insist")
            return recorded.get("name", "dataset"), recorded["source"]
        log.info("the dataset records no template of its own (only a preview's); using the model's")
        requested = "auto"
    name, source = chat_format.resolve_chat_template(requested, tokenizer)
    misfit = chat_format.template_misfit(source, tokenizer)
    if misfit and requested in chat_format.BUILTIN_TEMPLATES:
        log.warning("--chat-template %s does not fit %s (%s); using it because it was named", name, config.model_name, misfit)
    return name, source


def tokenize_splits(dd, tokenizer, template_source: str, config):
    """Render with the chosen template, tokenize and mask; rows over --max-seq-length are dropped
    (or cut with --long-rows truncate) and rows left with no target are dropped. A multi-turn row
    whose template rewrites earlier turns becomes one row per assistant turn (chat_format.encode_rows).

    Returns (train, validation, counts per split for the banner and training_config.json).
    """
    limit = config.max_seq_length

    def encode(batch):
        out: dict[str, list] = {"input_ids": [], "labels": [], "n_tokens": [], "n_target": [], "turns": []}
        for messages in batch["messages"]:
            rows = chat_format.encode_rows(messages, tokenizer, config.train_on_responses_only, limit, template_source)
            for i, row in enumerate(rows):
                for key in ("input_ids", "labels", "n_tokens", "n_target"):
                    out[key].append(row[key])
                out["turns"].append(len(rows) if i == 0 else 0)  # on a conversation's first row only
        return out

    out, counts = {}, {"policy": config.long_rows, "max_seq_length": limit}
    for split in ("train", "validation"):
        ds = dd[split]
        conversations = len(ds)
        # In memory: no cache files written into the prepared dataset folder (shared by every rank).
        ds = ds.map(encode, batched=True, batch_size=64, remove_columns=ds.column_names, desc=f"tokenizing {split}",
                    keep_in_memory=True,
                    new_fingerprint=chat_format.map_fingerprint(ds, tokenizer, "sft", template_source, limit,
                                                          config.train_on_responses_only))
        lengths = ds.select_columns(["n_tokens", "n_target", "turns"]).to_list()
        over = [r["n_tokens"] > limit for r in lengths]
        no_target = [r["n_target"] == 0 for r in lengths]
        keep = [chat_format.keeps_row(r, limit, config.long_rows) for r in lengths]
        per_turn = [r["turns"] for r in lengths if r["turns"] > 1]
        counts[split] = {"rows": len(ds), "over_max_seq_length": sum(over), "kept": sum(keep),
                         "longest_tokens": max(ds["n_tokens"]), "no_answer_tokens": sum(no_target),
                         "conversations": conversations,
                         # conversations whose template rewrites earlier turns, trained as one row per assistant turn
                         "conversations_one_row_per_turn": len(per_turn), "rows_one_per_turn": sum(per_turn)}
        if not any(keep):
            shortest = min(ds["n_tokens"])
            raise UserError(
                f"--max-seq-length {limit} is shorter than every {split} row (shortest {shortest} tokens); "
                f"raise --max-seq-length to at least {shortest}" + (" or pass --long-rows truncate" if config.long_rows == "drop" else ""))
        if sum(over):
            verb = "dropping" if config.long_rows == "drop" else "cutting (their answers lose the end and <|im_end|>)"
            log.warning("%s: %s %d of %d rows longer than --max-seq-length %d (longest %d tokens)",
                        split, verb, sum(over), len(ds), limit, counts[split]["longest_tokens"])
        ds = ds.select([i for i, k in enumerate(keep) if k]).remove_columns(["n_target", "n_tokens", "turns"])
        out[split] = ds
    return out["train"], out["validation"], counts


def run_tokenizer(tokenizer, data: Data):
    """The tokenizer the run trains, validates and saves with: the loaded one with the run's chat
    template (a shallow copy, so the loaded tokenizer is not changed). Both methods take this step,
    so the template saved beside the adapter and in checkpoints is the one the rows were rendered
    with, whatever the model's own."""
    import copy

    if not data.template_source:  # rows tokenized by the caller (Data.given): no template chosen here
        return tokenizer
    tokenizer = copy.copy(tokenizer)
    tokenizer.chat_template = data.template_source
    return tokenizer


def prepare_data(config, dataset, tokenizer) -> Data:
    """The (DatasetDict, manifest) from load_dataset, rendered with the chosen template and masked."""
    dd, manifest = dataset
    template_name, template_source = choose_template(config, manifest, tokenizer)
    train, validation, rows = tokenize_splits(dd, tokenizer, template_source, config)
    return Data(train, validation, template_name, template_source, manifest, rows)


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


def sft_trainer_class():
    """TRL's SFTTrainer with a token-weighted validation loss (see below), using the model's own loss
    where TRL's fused head cannot run: CPU builds of torch ship no Triton for TRL's chunked kernel,
    and the model's cross-entropy over the same labels gives the same token-level mean."""
    import torch
    from transformers import Trainer
    from trl import SFTTrainer
    from trl.trainer import utils as trl_utils

    fused_head = getattr(trl_utils, "_ChunkedLogProbFunction", None) is not None

    class ReasonForgeSFTTrainer(SFTTrainer):
        """The stock eval_loss is a mean of per-batch means, so a batch of short answers weighs as
        much as one of long answers and the number moves with the eval batch size. The best
        checkpoint is chosen here on sum(NLL) / sum(target tokens) instead: the quantity
        evaluate_model.py reports as log-perplexity."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if fused_head:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            if loss is not None and "labels" in inputs:
                # The batch loss is a mean over its shifted target tokens; times their count it is their NLL.
                targets = (inputs["labels"][..., 1:] != -100).sum().to(loss.device)
                self._eval_sums += torch.stack([loss.detach().float() * targets, targets.float()])
            return loss, logits, labels

        def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                            metric_key_prefix="eval"):
            self._eval_sums = torch.zeros(2, device=self.args.device)
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            nll, tokens = self.accelerator.reduce(self._eval_sums, reduction="sum").tolist()
            if tokens > 0:
                output.metrics[f"{metric_key_prefix}_loss"] = nll / tokens
                output.metrics[f"{metric_key_prefix}_target_tokens"] = int(tokens)
            return output

    return ReasonForgeSFTTrainer


def trainer_config(run):
    """The SFTConfig of `run`: the training settings GRPO shares (training_args.shared_training_args),
    validation on the token-weighted eval_loss, and SFT's own length, packing and padding."""
    from trl import SFTConfig

    c, batch = run.config, run.batch
    shared = training_args.shared_training_args(
        output_dir=c.output_dir, run_name=c.run_name, seed=c.seed, num_epochs=c.num_epochs, max_steps=c.max_steps,
        batch_size=batch.batch_size, eval_batch_size=batch.batch_size,
        gradient_accumulation_steps=batch.gradient_accumulation_steps, learning_rate=c.learning_rate,
        weight_decay=c.weight_decay, warmup_steps=c.warmup_steps, lr_scheduler=c.lr_scheduler, optim=run.optim,
        logging_steps=c.logging_steps, save_steps=c.save_steps, save_total_limit=c.save_total_limit,
        eval_steps=c.eval_steps, best_metric="eval_loss", greater_is_better=False, precision=run.precision)
    return SFTConfig(
        **shared, max_length=c.max_seq_length, packing=c.packing,
        padding_free=c.packing, dataset_kwargs={"skip_prepare_dataset": not c.packing},
        include_num_input_tokens_seen="non_padding", remove_unused_columns=False,
        max_grad_norm=c.max_grad_norm or 1.0,
        # Under CUDA graphs every new batch shape is a new recording: a few padded lengths keep them few.
        pad_to_multiple_of=run.cuda_graphs.pad_to_multiple_of,
    )


def build_trainer(run, callbacks: list):
    """The SFT trainer for `run`, with `callbacks` (the stock console printers removed)."""
    run.changes.setenv("TENSORBOARD_LOGGING_DIR", str(Path(run.config.output_dir) / "logs"))
    config = trainer_config(run)
    trainer = sft_trainer_class()(model=run.model, args=config, train_dataset=run.data.train,
                                  eval_dataset=run.data.validation, processing_class=run.tokenizer, callbacks=callbacks)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    # StepLogger prints one readable line per step; the stock printers would dump raw dicts beside it.
    for stock in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(stock)
    return trainer
