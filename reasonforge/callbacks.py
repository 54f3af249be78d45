"""The Trainer callbacks of train_lora.py: progress lines, stops (NaN loss, SIGTERM), checkpoint sync.

Imported only once training is being set up: this module imports transformers at the top, and a
script that did so at import time would load it before Unsloth, which must patch it first.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback

from reasonforge import core, gpu_memory, progress, rundirs
from reasonforge.core import UserError


class StepLogger(TrainerCallback):
    """A progress bar (reasonforge.progress) plus one line per logging step (step/total, loss, lr, tokens/s, memory); JSON lines too."""

    def __init__(self, jsonl_path: Path):
        self.jsonl_path = jsonl_path
        self.bar = None
        self.last = None  # (time, tokens) at the previous log
        self.clock = StepClock()

    def on_train_begin(self, args, state, control, **kw):
        self.clock.train_begin(state.num_input_tokens_seen)
        if state.is_world_process_zero:
            self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            self.bar = progress.bar(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                                    dynamic_ncols=True, periodic=False)
            self.last = (time.perf_counter(), state.num_input_tokens_seen)

    def on_step_begin(self, args, state, control, **kw):
        self.clock.step_begin()

    def on_step_end(self, args, state, control, **kw):
        first = self.clock.step_end(state.num_input_tokens_seen)
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            if first:
                c = self.clock.summary()
                self.bar.write(f"first step done {core.sig4(c['time_to_first_step_s'])} s after start "
                               f"(setup {core.sig4(c['setup_s'])} s, the step itself {core.sig4(c['first_step_s'])} s "
                               "with any compiling)")

    def on_log(self, args, state, control, logs=None, **kw):
        if self.bar is None or not logs:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        record = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **logs}
        if "loss" in logs:
            rate = (tokens - self.last[1]) / max(now - self.last[0], 1e-9)
            self.last = (now, tokens)
            mem = gpu_memory.gpu_memory_stats()
            record.update(tokens_per_s=round(rate, 1), peak_gpu_gib=round(mem.get("peak_gib", 0.0), 3))
            line = self.step_line(state, logs, rate, mem)
            if line:
                self.bar.write(line)
        elif "eval_loss" in logs:
            self.bar.write(f"step {state.global_step}/{state.max_steps} | validation loss {logs['eval_loss']:.4f}")
        # strict JSON writes a NaN or infinite value as null; the names say which ones were
        bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            record["non_finite"] = bad
        with open(self.jsonl_path, "a", encoding="utf-8") as fh:
            fh.write(core.to_json(record) + "\n")

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()

    def step_line(self, state, logs: dict, rate: float, mem: dict) -> str | None:
        """The printed line of a logging step (None: the subclass prints its own)."""
        return (f"step {state.global_step}/{state.max_steps} | loss {logs['loss']:.4f} | "
                f"lr {logs.get('learning_rate', 0):.2e} | {rate:,.0f} tok/s"
                + (f" | peak {mem['peak_gib']:.2f} GiB" if mem else ""))


class StepClock:
    """Where a run's time goes: setup (process start to the first step), the first step (which pays
    for compiling), and the steady rate after it, which is what a longer run would see. Step times
    run from on_step_begin to on_step_end, so validation and checkpoint saves are not in them."""

    SKIP = 2  # steps left out of the steady rate: the first compiles, the second may still recompile

    def __init__(self):
        self.started = rundirs.process_start_time()
        self.begun = self.step_started = None
        self.first_end = self.last_end = None
        self.tokens_before = 0
        self.steps = 0
        self.steady_seconds, self.steady_tokens = 0.0, 0

    def train_begin(self, tokens: int) -> None:
        self.begun, self.tokens_before = time.time(), tokens

    def step_begin(self) -> None:
        self.step_started = time.time()

    def step_end(self, tokens: int) -> bool:
        """Record a step; True for the first step of this process."""
        now = self.last_end = time.time()
        self.steps += 1
        if self.steps > self.SKIP and self.step_started is not None:
            self.steady_seconds += now - self.step_started
            self.steady_tokens += tokens - self.tokens_before
        self.tokens_before = tokens
        if self.first_end is None:
            self.first_end = now
            return True
        return False

    def summary(self) -> dict:
        if self.first_end is None:
            return {}
        return {"time_to_first_step_s": round(self.first_end - self.started, 2),
                "first_step_end_at": round(self.first_end, 3), "last_step_end_at": round(self.last_end, 3),
                "setup_s": round(self.begun - self.started, 2), "loop_start_at": round(self.begun, 3),
                "first_step_s": round(self.first_end - self.begun, 2),
                "steady_tokens_per_s": (round(self.steady_tokens / self.steady_seconds, 1)
                                        if self.steady_seconds > 0 else None),
                "steady_steps": max(self.steps - self.SKIP, 0)}


class StopOnNonFinite(TrainerCallback):
    """Stop at the first NaN or inf loss or gradient norm, naming the last good checkpoint.

    Every later step only spreads it through the weights, and the run would end with exit 0 and
    an adapter of NaNs. Raised from on_log, which comes before that step's save, so no checkpoint
    (and no final_model) is written from the diverged weights.
    """

    WATCHED = ("loss", "grad_norm", "eval_loss")

    def __init__(self, last_good: Callable[[Path], Path | None]):
        self.last_good = last_good

    def on_log(self, args, state, control, logs=None, **kw):
        bad = [(k, logs[k]) for k in self.WATCHED
               if isinstance((logs or {}).get(k), (int, float)) and not math.isfinite(logs[k])]
        if not bad:
            return
        name, value = bad[0]
        good = self.last_good(Path(args.output_dir))
        where = (f"the last good checkpoint is {good} (resume from it with --resume-from-checkpoint {good})"
                 if good else "no good checkpoint was saved before it")
        raise UserError(f"training {name.replace('_', ' ')} became {value} at step {state.global_step}; {where}; "
                        f"lower --learning-rate (now {args.learning_rate:g}) or raise --warmup-steps "
                        f"(now {args.warmup_steps}); no final_model was written")


class EvalAtEpochEnd(TrainerCallback):
    """Validate (and save, so the result can become the best checkpoint) at every epoch end too."""

    def on_epoch_end(self, args, state, control, **kw):
        if state.global_step < state.max_steps:
            control.should_evaluate = True
            control.should_save = True
        return control


class CheckpointSync(TrainerCallback):
    """Mark each checkpoint complete once the Trainer has written it, then mirror it to S3."""

    def __init__(self, run_uri, mark, upload):
        self.run_uri, self.mark, self.upload = run_uri, mark, upload

    def on_save(self, args, state, control, **kw):
        if not state.is_world_process_zero:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not ckpt.is_dir():
            return
        self.mark(ckpt)
        if self.run_uri is not None:
            self.upload(ckpt, self.run_uri)


class CompileCacheSync(TrainerCallback):
    """Copy the compile cache beside the run on S3 once: at the first checkpoint (the training and
    validation graphs are compiled by then) or at the end of training, whichever comes first.

    Never while a SIGTERM stop is pending: a spot notice's seconds belong to the checkpoint.
    """

    def __init__(self, mirror, guard):
        self.mirror, self.guard = mirror, guard

    def _publish(self, state) -> None:
        if state.is_world_process_zero and not self.guard.stop_requested():
            self.mirror.publish()

    def on_save(self, args, state, control, **kw):
        self._publish(state)

    def on_train_end(self, args, state, control, **kw):
        self._publish(state)


class EvaluationStopped(BaseException):
    """Raised out of a validation pass that SIGTERM cut short; train_or_stop saves and stops."""


class PlannedEndReached(Exception):
    """Raised before a step past the run's last: train_or_stop finishes from the checkpoint as it is."""


class StopAtPlannedEnd(TrainerCallback):
    """Refuse any step past state.max_steps.

    The Trainer checks its step limit only after a step, so a run resumed from its own last
    checkpoint (preempted while writing final_model, say) or given a lower --max-steps would train
    one step more than planned, at a learning rate the schedule has already run down to zero.
    """

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step >= state.max_steps:
            raise PlannedEndReached(state.global_step)


class StopOnSigterm(TrainerCallback):
    """Turn a SIGTERM request into a Trainer checkpoint (model, optimizer, scheduler, RNG) and a stop.

    Added after CheckpointSync, so on_save runs once the checkpoint is marked complete and uploaded.
    A request that arrives during an upload is served by that very checkpoint.
    """

    def __init__(self, guard: PreemptionGuard):
        self.guard = guard
        self.first_step = None

    def on_train_begin(self, args, state, control, **kw):
        self.first_step = state.global_step

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.first_step and self.guard.stop_requested():
            # Nothing trained in this process yet: the checkpoint resumed from (if any) is the state.
            raise core.Terminated(self.guard.message(None, f"before step {state.global_step + 1} began"))

    def on_step_end(self, args, state, control, **kw):
        if self.guard.stop_requested():
            self.guard.saving = True
            control.should_save = True
            control.should_evaluate = False  # the validation due now would only delay the save
        return control

    def on_prediction_step(self, args, state, control, **kw):
        if self.guard.stop_requested():
            self.guard.saving = True
            raise EvaluationStopped

    def on_evaluate(self, args, state, control, **kw):
        if self.guard.stop_requested():
            self.guard.saving = True
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kw):
        if self.guard.stop_requested():
            # Raised rather than should_training_stop: the Trainer's wrap-up would reload the best
            # checkpoint and, with --save-total-limit 1, delete the one just written.
            raise core.Terminated(self.guard.message(Path(args.output_dir) / f"checkpoint-{state.global_step}"))
