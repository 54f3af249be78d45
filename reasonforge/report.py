"""What a run says about itself: the setup banner, training_config.json, where the time before the first step went, and the closing summary."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

from reasonforge import checkpoints, configfile, core, gpu_memory, grpo, rundirs
from reasonforge.rewards import parse_rewards


class Phases:
    """Consecutive spans of setup, from process start (interpreter start-up included) to each mark.

    The spans add up to the time before the training loop, so a slow start names its own cause
    (imports, model load, tokenising, LoRA attach, trainer build) instead of one opaque total.
    """

    def __init__(self, started: float | None = None):
        self.started = started if started is not None else (rundirs.process_start_time() or time.time())
        self.marks: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        """Close the span that ends now and call it `name`."""
        self.marks.append((name, time.time()))

    def spans(self, until: float | None = None, rest: str = "trainer start") -> dict[str, float]:
        """{name: seconds} in order; with `until`, the time from the last mark to it as `rest`."""
        out, before = {}, self.started
        for name, at in self.marks:
            out[name] = round(out.get(name, 0.0) + at - before, 2)
            before = at
        if until is not None and until >= before:
            out[rest] = round(until - before, 2)
        return out

    @staticmethod
    def line(spans: dict[str, float]) -> str:
        return ", ".join(f"{name} {core.sig4(s)} s" for name, s in spans.items())


def print_setup(run) -> None:
    c, batch, rows = run.config, run.batch, run.data.rows or {}
    trainable, total = run.parameters
    eff = batch.batch_size * batch.gradient_accumulation_steps * run.processes
    print("=" * 72)
    print(f"Model:      {c.model_name}  [backend {run.backend}: {run.backend_reason}]")
    sources = configfile.describe_sources(c.settings_from, c.config)
    if sources:
        print(f"Settings:   {sources}")
    print(f"Precision:  {run.dtype}, 4-bit {'on' if run.load_in_4bit else 'off'}; compiled graphs: {run.compiler}")
    if run.backend == "unsloth":
        print(f"CUDA graphs: {run.cuda_graphs.describe()}")
        print(f"Compile cache: {run.compile_cache}")
    if c.packing:
        print(f"Packing:    best-fit rows of {c.max_seq_length} tokens; attention {run.packed_attention}")
        if run.backend == "unsloth" and not c.auto_batch:
            # Unsloth keeps packed layers out of its compiled blocks, so each pass pays eager launch cost.
            print("            packed passes are launch-bound: --auto-batch makes them fewer and larger")
    learns = ("GRPO on the questions, scored by --rewards " + c.rewards if c.method == "grpo" else
              f"loss on {'assistant tokens' if c.train_on_responses_only else 'all tokens'}")
    print(f"Dataset:    {c.dataset_path}: train {len(run.data.train)} / validation {len(run.data.validation)} rows "
          f"(template {run.data.template_name}, {learns})")
    over = {k: rows[k]["over_max_seq_length"] for k in ("train", "validation") if rows.get(k, {}).get("over_max_seq_length")}
    if over:
        verb = "dropped" if c.long_rows == "drop" else "cut to fit"
        print(f"Long rows:  {', '.join(f'{n} {k}' for k, n in over.items())} rows over {c.max_seq_length} tokens "
              f"{verb} (--long-rows {c.long_rows})")
    per_turn = {k: rows[k] for k in ("train", "validation") if rows.get(k, {}).get("conversations_one_row_per_turn")}
    if per_turn:
        convs = ", ".join(f"{r['conversations_one_row_per_turn']} {k}" for k, r in per_turn.items())
        made = ", ".join(f"{r['rows_one_per_turn']} {k}" for k, r in per_turn.items())
        print(f"Multi-turn: {convs} conversations trained as one row per assistant turn ({made} rows): template "
              f"{run.data.template_name} renders earlier turns differently, so each reply is taught as it is generated")
    processes = f" x {run.processes} processes" if run.processes > 1 else ""
    print(f"Training:   epochs {c.num_epochs}, max steps {c.max_steps}, batch {batch.batch_size} x accum "
          f"{batch.gradient_accumulation_steps}{processes} = {eff}, lr {c.learning_rate} ({c.lr_scheduler}), "
          f"optim {run.optim} ({run.optim_reason})")
    # Off the unsloth backend the Trainer's switch is what runs: auto and unsloth become plain or none.
    ckpt = (batch.gradient_checkpointing if run.backend == "unsloth" else
            f"{'on' if run.precision['gradient_checkpointing'] else 'off'} (--gradient-checkpointing {batch.gradient_checkpointing})")
    print(f"Checkpointing: {ckpt}; {run.kept_layers.describe()}")
    print(f"LoRA:       r {c.lora_r}, alpha {c.lora_alpha}, dropout {c.lora_dropout}, targets {c.target_modules}"
          + (f"; weights from {c.init_adapter}" if c.init_adapter else ""))
    if c.method == "grpo":
        print(f"GRPO:       {c.num_generations} replies of up to {c.max_completion_length} tokens per question, "
              f"temperature {c.temperature}, beta {c.beta}, rewards {c.rewards}; best checkpoint on "
              f"{grpo.best_metric(parse_rewards(c.rewards))}")
        gen = grpo.generation_batch_size(c, batch.batch_size, run.processes)
        how = ("TRL's generate" if run.engine != "static" else "static KV cache, decode step replayed as a CUDA graph"
               if run.precision.get("use_cpu") is False else "static KV cache, decode steps run eagerly: no CUDA")
        print(f"Rollouts:   engine {run.engine} ({how})"
              + (f"; {gen} completions generated per call" if gen else "; one optimizer step's completions per call"))
    print(f"Parameters: {trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.3f}%)")
    memory = gpu_memory.gpu_memory_stats()
    if memory:  # on a CPU there is nothing to say, once
        print(gpu_memory.format_memory_stats(memory))
    print("=" * 72)


MULTI_TURN_POLICY = ("every assistant turn is a target; where the template renders earlier turns differently "
                     "from the last (qwen3 drops their reasoning), one row per assistant turn, only its last turn a target")


def training_config(run) -> dict:
    """training_config.json: the flags as they ran (the batch --auto-batch picked) and what setup found."""
    batch = run.batch
    arguments = {**dataclasses.asdict(run.config), "batch_size": batch.batch_size,
                 "gradient_accumulation_steps": batch.gradient_accumulation_steps,
                 "gradient_checkpointing": batch.gradient_checkpointing}
    manifest = run.data.manifest
    cfg = {"arguments": arguments, "backend": run.backend, "backend_reason": run.backend_reason, "dtype": run.dtype,
           "load_in_4bit": run.load_in_4bit, "compiler": run.compiler,
           "cuda_graphs": dataclasses.asdict(run.cuda_graphs), "kept_layers": dataclasses.asdict(run.kept_layers),
           "compile_cache": run.compile_cache, "packed_attention": run.packed_attention,
           "optim": run.optim, "rollout_engine": run.engine if run.config.method == "grpo" else None,
           "rows": run.data.rows, "chat_template": run.data.template_name,
           "multi_turn_policy": MULTI_TURN_POLICY if run.config.method == "sft" else None,
           "dataset_manifest_sha256": manifest.get("content_sha256"), "dataset_source": manifest.get("source"),
           "versions": core.library_versions(), "gpu": gpu_memory.gpu_memory_stats()}
    cfg = core.redact_secrets(cfg)
    cfg.update(auto_batch_plan=batch.auto, processes=run.processes,
               chat_template_sha256=hashlib.sha256(run.data.template_source.encode()).hexdigest())
    return cfg


def record_config(run) -> None:
    config = training_config(run)
    if run.resume:  # every rank checks, so that all of them refuse together
        config = checkpoints.check_resume_settings(config, Path(run.resume), run.config.out, announce=run.main_rank)
    if run.main_rank:
        core.atomic_write_json(run.config.out / "training_config.json", config)


def print_summary(run, metrics: dict, final: Path, plotted: bool) -> None:
    c = run.config
    print("=" * 72)
    checkpoint = Path(str(metrics["best_checkpoint"])).name
    if c.method == "grpo":  # GRPO's loss is a policy-gradient surrogate near 0, not a measure of anything learned
        first, last = metrics.get("train_reward_first"), metrics.get("train_reward_last")
        reward = (f"train reward {core.sig4(first)} -> {core.sig4(last)} (mean over each step's completions)"
                  if first is not None else "no reward logged")
        print(f"Steps: {metrics['global_step']}, {reward}, best {metrics['best_metric_name']} "
              f"{core.sig4(metrics['best_metric'])} ({checkpoint})")
    else:
        print(f"Steps: {metrics['global_step']}, train loss {core.sig4(metrics['train_loss_first'])} -> "
              f"{core.sig4(metrics['train_loss_last'])}, best validation loss "
              f"{core.sig4(metrics['best_validation_loss'])} ({checkpoint})")
    steady = metrics.get("steady_tokens_per_s")
    if metrics.get("setup_phases_s"):
        print(f"Setup: {Phases.line(metrics['setup_phases_s'])}")
    if metrics.get("time_to_first_step_s") is None:
        print(f"Time: no step trained in this run; training loop {metrics['runtime_s']:.1f} s in all")
    else:
        print(f"Time: first step {core.sig4(metrics['time_to_first_step_s'])} s after start "
              f"(the step itself {core.sig4(metrics.get('first_step_s'))} s); then "
              + (f"{steady:,.0f} tokens/s steady over {metrics['steady_steps']} steps" if steady else
                 "too few steps for a steady rate")
              + f"; training loop {metrics['runtime_s']:.1f} s in all")
    memory = gpu_memory.gpu_memory_stats()
    if memory:
        print(gpu_memory.format_memory_stats(memory))
    print(f"Adapter: {final.resolve()}" + (f"\nLoss curve: {(c.out / 'loss_curve.png').resolve()}" if plotted else ""))
    if (c.out / "reward_curve.png").is_file() and c.method == "grpo":
        print(f"Reward curve: {(c.out / 'reward_curve.png').resolve()}")
    gguf_file = next((c.out / "final_model_gguf").glob("*.gguf"), None) if c.save_gguf else None
    if gguf_file is not None:
        print(f"GGUF: {gguf_file.resolve()} (Ollama: ollama create NAME -f {gguf_file.parent.resolve()}/Modelfile)")
    if c.run_uri is not None:
        print(f"S3 URI: {c.run_uri.join('final_model')}")
    if c.push_to_hub:
        print(f"Hub: https://huggingface.co/{c.push_to_hub}")
