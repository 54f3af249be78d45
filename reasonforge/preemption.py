"""What SIGTERM (a spot instance's notice) does to a training run: a checkpoint at the next safe point, then a stop with the resume command."""

from __future__ import annotations

import os
import shlex
import sys
import threading
from pathlib import Path

from reasonforge import core, s3
from reasonforge.checkpoints import checkpoint_step, last_good_checkpoint

SIGTERM_EXIT = 143  # 128 + SIGTERM, what a shell reports for a process the signal ended


def resume_command(argv: list[str] | None) -> str:
    """This run's command line with `--resume-from-checkpoint latest` in place of any resume flag."""
    args, skip = [], False
    for a in (sys.argv[1:] if argv is None else list(argv)):
        if skip:
            skip = False
        elif a == "--resume-from-checkpoint":
            skip = True
        elif not a.startswith("--resume-from-checkpoint="):
            args.append(a)
    script = sys.argv[0] if sys.argv[0].endswith("train_lora.py") else "train_lora.py"
    launcher = ["python"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        launcher = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', os.environ['WORLD_SIZE'])}"]
    return shlex.join([*launcher, script, *args, "--resume-from-checkpoint", "latest"])


class PreemptionGuard:
    """What SIGTERM does to this process.

    Outside the training loop it raises core.Terminated at once (nothing is half-written there
    that a scratch folder does not clean up). Inside it, the handler only records the request:
    tensors and files are mid-update, so StopOnSigterm asks the Trainer to save at the next safe
    point (end of the step, end or inside of a validation pass, right after a checkpoint upload)
    and then stops. A step can outlast the notice (the first one compiles for minutes on a fresh
    GPU instance), so a watchdog exits on its own once `deadline_s` passes with no save begun.
    """

    def __init__(self, argv: list[str] | None, output_dir: Path, deadline_s: float, run_uri: s3.S3Uri | None,
                 main_rank: bool = True):
        self.argv, self.output_dir, self.deadline_s, self.main_rank = argv, output_dir, deadline_s, main_rank
        self.run_uri = run_uri
        self.phase = "setup"  # then "training", then "finishing"
        self.requested = False
        self.saving = False
        self.watchdog = None

    def install(self) -> None:
        """Take over SIGTERM from cli_entry's handler (which puts the original back when main returns)."""
        import signal

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        if self.phase == "setup":
            raise core.Terminated(self.message(None, "before the training loop began"))
        if self.phase == "finishing":
            raise core.Terminated(self.message(None, "after the last step, before the final outputs were complete"))
        if self.requested:
            return
        self.requested = True
        if self.main_rank:
            print(f"SIGTERM: saving a checkpoint at the next safe point (end of this step or validation batch), "
                  f"then stopping (watchdog: {self.deadline_s:g} s)", file=sys.stderr, flush=True)
        self.watchdog = threading.Timer(self.deadline_s, self.expire)
        self.watchdog.daemon = True
        self.watchdog.start()

    def stand_down(self) -> None:
        """The training loop is over (stopped, finished or failed): the watchdog has nothing left to
        guard, and firing later it would kill whatever the process does next."""
        if self.watchdog is not None:
            self.watchdog.cancel()

    def expire(self) -> None:
        if self.saving or self.phase != "training":
            return  # a checkpoint is being written, or the loop is over: cutting it short would gain nothing
        if self.main_rank:
            print(self.message(None, f"no checkpoint could begin within {self.deadline_s:g} s (a step was still "
                                     "running)"), file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(SIGTERM_EXIT)  # the main thread is busy in a step; no exception can reach it in time

    def stop_requested(self) -> bool:
        """The request, agreed by every rank: they must stop at the same step or the collectives hang."""
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            flag = torch.tensor([int(self.requested)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.requested = bool(flag.item())
        return self.requested

    def message_for_interrupt(self) -> str:
        if not self.main_rank:
            return ""
        newest = last_good_checkpoint(self.output_dir)
        return ((f"the newest complete checkpoint is {newest}" if newest else "no checkpoint of this run exists yet")
                + f"\nresume with:\n  {resume_command(self.argv)}")

    def message(self, saved: Path | None, why: str = "") -> str:
        if not self.main_rank:
            return "stopped by SIGTERM"
        if saved is not None:
            where = f"{saved}" + (f" and {self.run_uri.join('checkpoints', saved.name)}" if self.run_uri else "")
            head = f"stopped by SIGTERM at step {checkpoint_step(saved)}: checkpoint saved to {where}"
        else:
            newest = last_good_checkpoint(self.output_dir)
            head = (f"stopped by SIGTERM {why}; " + (f"the newest complete checkpoint is {newest}" if newest else
                                                     "no checkpoint of this run exists yet"))
        return f"{head}\nresume with:\n  {resume_command(self.argv)}"


def train_or_stop(trainer, resume: str | None, guard: PreemptionGuard):
    """trainer.train(), with SIGTERM served as a checkpoint and core.Terminated, and Ctrl-C
    naming the checkpoint to resume from."""
    import time

    from reasonforge.callbacks import EvaluationStopped, PlannedEndReached, StopAtPlannedEnd

    guard.phase = "training"
    trainer.add_callback(StopAtPlannedEnd())
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except PlannedEndReached:
        # Resumed at or past the last planned step: the state, weights and best checkpoint are the
        # checkpoint's; the Trainer's own wrap-up loads the best one, as after a full run.
        result = trainer._finalize_training(None, 0, time.time())
    except KeyboardInterrupt:
        raise KeyboardInterrupt(guard.message_for_interrupt()) from None
    except EvaluationStopped:
        # The step's weights, optimizer and scheduler are whole; only the validation pass was cut
        # short, so the checkpoint is the one the step's end would have written.
        trainer._save_checkpoint(trainer.model, trial=None)
        trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)
        raise  # not reached: StopOnSigterm.on_save raises Terminated
    finally:
        guard.phase = "finishing"
        guard.stand_down()
    if guard.requested:
        # The signal came after the last step (while the Trainer wrapped up); the final outputs
        # might not finish within the notice, and the newest checkpoint is the resume point.
        raise core.Terminated(guard.message(None, "after the last step, before the final outputs were complete"))
    return result
