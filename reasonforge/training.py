"""The training flow behind train_lora.py: a frozen config from the flags, setup(config) -> Run, train(run) -> Result, finish(run, result)."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reasonforge import (batch_plan, checkpoints, compile_cache, core, cuda_graphs, generation, graph_wrapper, grpo, grpo_logs,
                         lora, models, outputs, packed_attention, preemption, report, rundirs, s3, sft)
from reasonforge.core import UserError
from reasonforge.process_state import ProcessChanges
from reasonforge.train_config import TrainConfig

log = logging.getLogger("reasonforge.train")


@dataclass(frozen=True)
class Run:
    """What setup() built and learned, for train() and finish()."""

    config: TrainConfig
    state: Any  # accelerate's PartialState: rank 0 alone prints, writes and uploads
    guard: preemption.PreemptionGuard
    backend: str
    backend_reason: str
    dtype: str | None
    load_in_4bit: bool | None
    model: Any  # the base with fresh LoRA adapters
    tokenizer: Any
    data: sft.Data
    batch: batch_plan.BatchPlan
    precision: dict  # the Trainer's bf16/fp16/use_cpu and checkpointing switches
    parameters: tuple[int, int]  # (trainable, total)
    optim: str
    optim_reason: str
    packed_attention: str
    compiler: str
    cuda_graphs: cuda_graphs.GraphPlan
    kept_layers: batch_plan.KeepPlan  # layers that skip gradient checkpointing
    compile_cache: str  # where compiled graphs and kernels are kept between runs, and whether it was warm
    cache_mirror: compile_cache.Mirror | None  # its copy beside the run on S3
    resume: str | None  # the checkpoint folder training continues from
    changes: ProcessChanges  # what setup changed outside the run, undone when training ends
    phases: report.Phases  # where the time before the first step went
    engine: str = "generate"  # what generates grpo's rollouts: "static" (reasonforge.engine) or TRL's "generate"

    @property
    def main_rank(self) -> bool:
        return self.state.is_main_process

    @property
    def processes(self) -> int:
        return self.state.num_processes


@dataclass(frozen=True)
class Result:
    trainer: Any
    output: Any  # trainer.train()'s TrainOutput
    runtime_s: float  # the training loop alone


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


def method_module(config: TrainConfig):
    """The module of --method: its prepare_data(config, dataset, tokenizer) and build_trainer(run, callbacks)."""
    return grpo if config.method == "grpo" else sft


def rollout_engine_and_backend(config: TrainConfig) -> tuple[str, str]:
    """(what generates grpo's rollouts, the --backend to load with). sft generates nothing. grpo's
    auto keeps TRL's generate on the backend chosen for training: the static engine needs
    transformers' own forward (--backend hf), and grpo's training on that backend has not been run
    on a GPU, so it is asked for with --engine static, which brings --backend hf with it."""
    if config.method != "grpo" or config.engine != "static":
        return "generate", config.backend
    return generation.resolve_engine("static", config.backend)


def setup(config: TrainConfig, argv: list[str] | None = None, pretokenized: tuple | None = None) -> Run:
    """Everything before the first step; prints the banner and writes training_config.json (rank 0).

    `argv` is the command line the SIGTERM message repeats (default sys.argv); `pretokenized`, a
    (train, validation) pair of lists of input_ids/labels rows, stands in for --dataset-path.
    Every process-wide change goes through the run's ProcessChanges; a failed setup undoes them.
    """
    changes = ProcessChanges()
    try:
        return _setup(config, argv, pretokenized, changes)
    except BaseException:
        changes.undo()
        raise


def _setup(config: TrainConfig, argv: list[str] | None, pretokenized: tuple | None, changes: ProcessChanges) -> Run:
    phases = report.Phases()
    engine, backend_flag = rollout_engine_and_backend(config)
    backend, backend_reason = models.choose_backend(backend_flag)
    if backend_flag != config.backend:
        backend_reason = ("grpo's rollouts through the static engine run transformers' forward (Unsloth's patched "
                          "attention keeps a KV cache of its own)")
    # train_lora.py refused what it could; the backend "auto" becomes is known only now, before the model loads
    why = cuda_graphs.cuda_graphs_obstacle(backend, config.method, config.packing)
    if config.cuda_graphs == "on" and why:
        raise UserError(cuda_graphs.refuse_cuda_graphs(f"{why} (backend {backend}: {backend_reason})"))
    mirror = compile_cache.Mirror.for_run(config.compile_cache_dir, backend, config.run_uri)
    if mirror is not None:  # first, so that the banner's account of the folder includes what it brought
        phases.mark("start-up")
        restored = mirror.restore()
        phases.mark("compile cache from S3")
    cache = compile_cache.use(config.compile_cache_dir, backend, changes)  # before Unsloth and Inductor read their folders
    if mirror is not None:
        cache += f"; S3 copy: {restored}"
    if backend == "unsloth":
        models.import_unsloth_first()  # before datasets/transformers/peft are imported, so its patches apply
    check_trainer_names(config)
    state = distributed_state()
    guard = preemption.PreemptionGuard(argv, config.out, config.sigterm_deadline_s, config.run_uri,
                                       state.is_main_process)
    guard.install()
    outputs.preflight_hub(config.push_to_hub)
    if state.is_main_process:
        claim_output_dir(config)
    phases.mark("imports")
    dataset = sft.load_dataset(config) if pretokenized is None else None
    phases.mark("dataset load")
    optim, optim_reason = choose_optim(config.optim)
    # the checkpoint is found and its settings compared before minutes of model loading; only the
    # template's hash waits for the tokenizer (report.record_config)
    resume = checkpoints.resume_on_all_ranks(config.resume_from_checkpoint, config.out, config.run_uri, state)
    if resume:
        manifest = dataset[1] if dataset is not None else {}
        checkpoints.refuse_resume_early({"arguments": dataclasses.asdict(config), "optim": optim,
                                         "dataset_manifest_sha256": manifest.get("content_sha256")}, Path(resume),
                                        config.out)
    model, tokenizer, info = lora.load_base_model(config, backend, state.is_main_process)
    phases.mark("model load")
    packed_attention.check_packing(config.packing, backend, model)
    route, undo = packed_attention.configure_packed_attention(config.packing, backend, model)
    changes.callback(undo, what="packed-attention routing")
    batch = batch_plan.choose_batch(config, model, backend, changes)
    data = (sft.Data.given(*pretokenized) if dataset is None
            else method_module(config).prepare_data(config, dataset, tokenizer))
    tokenizer = sft.run_tokenizer(tokenizer, data)
    phases.mark("tokenise")
    lengths = train_lengths(config, data)
    graphs = plan_cuda_graphs(config, backend, lengths, batch, len(data.train), state.num_processes)
    keep = plan_kept_layers(config, backend, model, batch, graphs, lengths, state.num_processes)
    # before get_peft_model wraps the decoder blocks
    changes.callback(cuda_graphs.install_cuda_graphs(graphs, backend, model), what="CUDA graphs of the decoder blocks")
    model = lora.attach_lora(model, config, backend=backend, load_in_4bit=info.get("load_in_4bit"),
                        checkpointing=batch.gradient_checkpointing, keep_layers=keep.kept)
    graphs = cuda_graphs.confirm_cuda_graphs(graphs, model)
    if config.init_adapter:
        lora.load_init_adapter(model, config)
    phases.mark("LoRA attach")
    total = batch_plan.planned_steps(len(data.train), batch, epochs=config.num_epochs,
                                       max_steps=config.max_steps, processes=state.num_processes)
    done = checkpoints.checkpoint_step(Path(resume)) if resume else 0
    steps = max(total - done, 0)
    if resume and not steps and state.is_main_process:
        log.warning("%s is at step %d, and this run plans %d (--max-steps, --num-epochs): no step is trained; "
                    "the final outputs come from its best checkpoint", resume, done, total)
    run = Run(config=config, state=state, guard=guard, backend=backend, backend_reason=backend_reason,
              dtype=info.get("dtype"), load_in_4bit=info.get("load_in_4bit"), model=model, tokenizer=tokenizer,
              data=data, batch=batch, precision=batch_plan.precision_plan(backend, batch.gradient_checkpointing),
              parameters=lora.count_parameters(model), optim=optim, optim_reason=optim_reason,
              packed_attention=route, cuda_graphs=graphs, kept_layers=keep,
              compiler=graph_wrapper.configure_compiler(backend, config.graph_wrapper, steps, graphs.on,
                                                       changes=changes),
              compile_cache=cache, cache_mirror=mirror, resume=resume, changes=changes, phases=phases,
              engine=engine)
    if run.main_rank:
        report.print_setup(run)
    report.record_config(run)
    phases.mark("resume and banner")
    return run


def train_lengths(config: TrainConfig, data: sft.Data) -> list[int]:
    """The distinct token lengths of the train rows, each at most --max-seq-length (packed rows and
    grpo's prompts: --max-seq-length alone)."""
    if config.packing or "input_ids" not in data.train.column_names or not len(data.train):
        return [config.max_seq_length]
    import pyarrow.compute as pc

    # The distinct lengths from Arrow: a Python list of every row's ids would cost gigabytes on big sets.
    ids = data.train.select_columns(["input_ids"]).with_format("arrow")[:]["input_ids"]
    return sorted({min(n, config.max_seq_length) for n in pc.unique(pc.list_value_length(ids)).to_pylist()})


def plan_cuda_graphs(config: TrainConfig, backend: str, lengths: list[int], batch: batch_plan.BatchPlan,
                     train_rows: int, processes: int) -> cuda_graphs.GraphPlan:
    """--cuda-graphs for this run: the padding follows the lengths of the train rows actually kept."""
    import torch

    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    if capability is None:
        backend = "cpu"  # no compiled blocks, whatever was asked
    return cuda_graphs.plan_cuda_graphs(
        config.cuda_graphs, backend=backend, method=config.method, packing=config.packing, lengths=lengths,
        max_length=config.max_seq_length,
        batch_sizes=batch_plan.micro_batch_sizes(train_rows, batch.batch_size, processes), capability=capability)


def plan_kept_layers(config: TrainConfig, backend: str, model, batch: batch_plan.BatchPlan,
                     graphs: cuda_graphs.GraphPlan, lengths: list[int], processes: int = 1) -> batch_plan.KeepPlan:
    """--gradient-checkpointing auto for this run: sized at its longest padded batch, against what this
    process holds plus what is free on the GPU (or --gpu-memory-gib where lower); under several
    processes, the smallest count any rank can keep."""
    import torch

    # Under graphs the plan's multiple keeps every padded length within --max-seq-length (length_bucket).
    longest = cuda_graphs.padded_length(max(lengths), graphs.pad_to_multiple_of) if graphs.on else max(lengths)
    budget = used = None
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        used = torch.cuda.memory_allocated() / 2**30
        # --gpu-memory-gib may name more than this card has, or than other processes leave it.
        budget = min(config.gpu_memory_gib or math.inf, used + free / 2**30)
    plan = batch_plan.plan_kept_layers(
        batch.gradient_checkpointing, backend=backend, method=config.method, model_config=model.config,
        micro=batch.batch_size, seq_len=longest, budget_gib=budget, used_gib=used or 0.0,
        graph_shapes=graphs.shapes if graphs.on else 0,
        chosen_by="--auto-batch chose checkpointing" if batch.auto else "--gradient-checkpointing")
    if processes > 1:
        # Every rank must keep the same layers: each sized K on its own card, so all take the smallest.
        from accelerate.utils import gather_object

        fewest = min(gather_object([plan.kept]))
        if fewest != plan.kept:
            plan = dataclasses.replace(plan, kept=fewest, reason=f"{plan.reason}; the fewest any rank could keep")
    return plan


# Schedulers transformers builds only from lr_scheduler_kwargs, which this script does not pass.
SCHEDULERS_NEEDING_KWARGS = {"cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay"}


def check_trainer_names(config: TrainConfig) -> None:
    """--lr-scheduler and --optim against the names this transformers knows, before the model loads.

    Apart from train_lora.validate_args because it imports transformers, which on a GPU must follow unsloth.
    """
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    problems = []
    schedulers = [s.value for s in SchedulerType if s.value not in SCHEDULERS_NEEDING_KWARGS]
    if config.lr_scheduler not in schedulers:
        why = "needs scheduler arguments this script does not pass" if config.lr_scheduler in SCHEDULERS_NEEDING_KWARGS else "is unknown"
        problems.append(f"--lr-scheduler {config.lr_scheduler!r} {why}; choose one of {', '.join(schedulers)}")
    optims = ["auto", *(o.value for o in OptimizerNames)]
    if config.optim not in optims:
        # Names that extend what was typed first ("adamw" -> adamw_torch); difflib alone picks oddities.
        close = [o for o in optims if o.startswith(config.optim)][:3] or difflib.get_close_matches(config.optim, optims, n=3)
        problems.append(f"--optim {config.optim!r} is unknown; " + (f"did you mean {' or '.join(close)}? " if close else "")
                        + "e.g. auto, adamw_torch, adamw_8bit (all: transformers.training_args.OptimizerNames)")
    if problems:
        raise UserError("; ".join(problems))


def distributed_state():
    """Accelerate's process state: rank 0 alone prints, writes and uploads under accelerate/torchrun."""
    import torch
    from accelerate import PartialState

    # On CPU, torchrun/accelerate workers only form a (gloo) group when told they run on CPU.
    return PartialState(cpu=not torch.cuda.is_available())


def claim_output_dir(config: TrainConfig) -> None:
    # One run per folder: two would interleave checkpoints and metrics. Released by cli_entry.
    created = not config.out.exists()
    config.out.mkdir(parents=True, exist_ok=True)
    rundirs.RunLock(config.out, remove_if_empty=created).acquire()
    if config.run_uri is not None:
        s3.check_s3_bucket(config.s3_bucket, "upload")
    # a checkpoint belongs to its run: a new run never starts among another run's checkpoints
    problem = checkpoints.previous_run_problem(config.out, config.run_uri, config.resume_from_checkpoint)
    if problem:
        raise UserError(problem)


def choose_optim(requested: str) -> tuple[str, str]:
    if requested != "auto":
        return requested, "requested"
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        return "adamw_8bit", "bitsandbytes available on CUDA"
    return "adamw_torch", "no CUDA/bitsandbytes, so 8-bit Adam is unavailable"


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def standard_callbacks(run: Run) -> list:
    """Progress lines, the NaN stop, validation at epoch ends, checkpoint marking and S3 sync, early stopping."""
    from reasonforge.callbacks import CheckpointSync, CompileCacheSync, EvalAtEpochEnd, StepLogger, StopOnNonFinite

    c = run.config
    log_path = c.out / "logs" / "metrics.jsonl"
    callbacks = [grpo_logs.grpo_step_logger(log_path) if c.method == "grpo" else StepLogger(log_path),
                 StopOnNonFinite(checkpoints.last_good_checkpoint),
                 EvalAtEpochEnd(),
                 CheckpointSync(c.run_uri, checkpoints.write_checkpoint_marker, checkpoints.upload_checkpoint)]
    if run.cache_mirror is not None:
        callbacks.append(CompileCacheSync(run.cache_mirror, run.guard))
    if c.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=c.early_stopping_patience))
    return callbacks


def train(run: Run, callbacks: list = ()) -> Result:
    """The training loop, SIGTERM served as a checkpoint and a stop. `callbacks` join the standard
    ones (the benchmark's timers). What setup changed outside the run is put back however it ends."""
    import torch

    from reasonforge.callbacks import StopOnSigterm

    try:
        trainer = method_module(run.config).build_trainer(run, [*standard_callbacks(run), *callbacks])
        run.phases.mark("trainer build")
        trainer.add_callback(StopOnSigterm(run.guard))  # last, so that its on_save follows CheckpointSync's upload
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        output = preemption.train_or_stop(trainer, run.resume, run.guard)
        return Result(trainer, output, time.perf_counter() - start)
    finally:
        run.changes.undo()


# ---------------------------------------------------------------------------------------------
# Finish
# ---------------------------------------------------------------------------------------------


def finish(run: Run, result: Result) -> None:
    """Rank 0: final adapter, metrics, plot, uploads and the closing summary; every rank waits for it."""
    if run.main_rank:
        c = run.config
        final = outputs.save_final_model(run, result.trainer)
        metrics = outputs.collect_metrics(run, result)
        core.atomic_write_json(c.out / "training_metrics.json", metrics)
        title = outputs.plot_title(run)
        # GRPO's curve is its rewards: its loss is a surrogate near 0 and its validation measures rewards, not loss
        plotted = c.method == "sft" and outputs.plot_losses(metrics["history"], c.out / "loss_curve.png", title)
        if c.method == "grpo":
            grpo_logs.plot_rewards(metrics["history"], c.out / "reward_curve.png", title)
        if c.run_uri is not None:
            outputs.upload_outputs(c.run_uri, final, c.out)
        if c.push_to_hub:
            outputs.push_to_hub(final, c.push_to_hub)
        report.print_summary(run, metrics, final, plotted)
    run.state.wait_for_everyone()


