"""GRPO's trainer: TRL's GRPOTrainer with greedy validation, timed phases and engine rollouts, and
TRL's fused log-probabilities in plain torch where Triton is missing."""

from __future__ import annotations

import contextlib
import time

from reasonforge import generation, rewards as rewards_mod
from reasonforge.grpo_logs import GENERATION_RATE, GENERATION_SECONDS, LOGPROB_SECONDS, REWARD_SECONDS


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


def use_torch_logprobs_without_triton(changes) -> bool:
    """Install TorchLogProbs where TRL found no Triton kernel, through `changes` (a ProcessChanges,
    which puts TRL's back); True where it did so."""
    from trl.trainer import utils as trl_utils

    if getattr(trl_utils, "_ChunkedLogProbFunction", True) is not None:
        return False
    changes.setattr(trl_utils, "_ChunkedLogProbFunction", TorchLogProbs)
    return True


def grpo_trainer_class():
    """TRL's GRPOTrainer (Unsloth's patched one where Unsloth was imported first) with three changes:
    validation decodes greedily, one reply per prompt, so the best-checkpoint metric is the
    accuracy evaluate_model.py would measure rather than a sample of it (and eight times cheaper);
    every generation call is timed, logged as generation/tokens_per_s; and where the trainer is
    given `engine=True` (a model that runs transformers' own forward), rollouts and validation go
    through reasonforge.engine instead of `generate`."""
    from transformers import GenerationConfig
    from trl import GRPOTrainer

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
                       callbacks: list | None = None, engine: bool = False, *, changes):
    """A GRPOTrainer over `model` (already LoRA-wrapped by the caller, e.g. a PeftModel) with the
    named rewards; `config` comes from grpo.grpo_config with the same `reward_weights`. The stock
    printers are removed: GRPOStepLogger (see grpo_logs.grpo_step_logger) prints one summary per step.
    On a machine without Triton, TorchLogProbs stands in for TRL's kernel, through `changes`."""
    funcs, weights = rewards_mod.reward_functions(reward_weights)
    if list(config.reward_weights or []) != weights:
        raise ValueError(f"config.reward_weights {config.reward_weights} do not match the rewards {reward_weights}; "
                         "build the config with grpo_config(..., reward_weights) from the same rewards")
    use_torch_logprobs_without_triton(changes)
    trainer = grpo_trainer_class()(model=model, reward_funcs=funcs, args=config, train_dataset=train_ds,
                                   eval_dataset=eval_ds, processing_class=tokenizer, callbacks=callbacks,
                                   engine=engine)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for stock in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(stock)
    return trainer
