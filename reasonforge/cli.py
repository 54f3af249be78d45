"""What wraps each script's main(): logging to stderr, SIGTERM as an exception, one-line errors and exit codes."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
from typing import Iterator

from reasonforge.core import _PATH_ERRNO_FIXES, Terminated, UserError, describe_os_error, log
from reasonforge.rundirs import RunLock


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record: main() called again in one process (tests,
    notebooks) may run under another stderr than the first call, and the old one may be closed."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def _raise_terminated(signum, frame):
    raise Terminated("stopped by SIGTERM; nothing half-written was kept: run the same command again")


@contextlib.contextmanager
def sigterm_raises(handler=_raise_terminated) -> Iterator[None]:
    """Install `handler` for SIGTERM for the duration of the block, then put back the previous one.

    Python's default for SIGTERM is to die at once, skipping cleanup. Signal handlers can only be
    set from the main thread; elsewhere (a script's main() called from a worker thread) this is a no-op.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def setup_logging(verbose: bool = False) -> None:
    """Our own lines go to stderr through the suite's logger, leaving the root logger to the host.

    Without `verbose`, transformers' warnings are held back except its weight-loading report:
    the rest land in the middle of a streamed reply or a progress bar, and the ones we have met
    are advisories about library internals that a user cannot act on.
    """
    logger = logging.getLogger("reasonforge")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    # Unsloth (and any library calling logging.basicConfig) gives the root logger a handler of its
    # own; propagating there printed every line a second time in its format.
    logger.propagate = False
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
    # Library chatter (httpx, botocore) is noise next to our one-line step summaries.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # transformers reads this when it first sets up its logger; importing it here to set the level
    # directly would come before unsloth's import, which has to be first.
    os.environ["TRANSFORMERS_VERBOSITY"] = "warning" if verbose else "error"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(logging.WARNING if verbose else logging.ERROR)
    # Missing or unexpected weights in a checkpoint are worth seeing in every run.
    logging.getLogger("transformers.modeling_utils").setLevel(logging.WARNING)


def cli_entry(main_fn):
    """Wrap a script's main(argv): user mistakes and an environment in the way (full disk,
    read-only folder, a file where a folder should be) become one line on stderr and exit code 2.
    Run locks taken during the call are released however it ends."""
    import functools

    @functools.wraps(main_fn)
    def wrapper(argv=None) -> int:
        try:
            with sigterm_raises():
                return main_fn(argv) or 0
        except UserError as exc:
            log.debug("details of the error below", exc_info=True)
            close_progress_bars()
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:
            message = describe_environment_error(exc)
            if message is None:
                raise
            log.debug("details of the error below", exc_info=True)
            close_progress_bars()
            print(f"error: {message}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:
            close_progress_bars()
            print("interrupted" + (f"; {exc}" if str(exc) else ""), file=sys.stderr)
            return 130
        except Terminated as exc:
            print(exc, file=sys.stderr)
            return 143
        finally:
            RunLock.release_all()

    return wrapper


def close_progress_bars() -> None:
    """Close the tqdm bars still open. An exception skips the code that closes them, and a bar
    closed later (at garbage collection) redraws itself below the error line."""
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", [])):
        bar.close()


# How native writers (the tokenizers and safetensors Rust code) spell an OS error in their messages.
_NATIVE_OS_ERROR = re.compile(r"os error (\d+)|Os \{ code: (\d+)")
FULL_DISK_BYTES = 16 * 2**20


def describe_gpu_out_of_memory(exc: BaseException) -> str:
    """One line for a CUDA out-of-memory error: torch's first two sentences (what it tried to allocate)
    and what to change. Another process taking memory mid-run looks the same, so that is named too."""
    first = ". ".join(str(exc).strip().split(". ")[:2])[:160] or "CUDA out of memory"
    return (f"the GPU ran out of memory ({first}); train_lora.py: --gradient-checkpointing unsloth keeps the least "
            "activations, or lower --batch-size (raising --gradient-accumulation-steps keeps the effective batch) or "
            "--max-seq-length, then --resume-from-checkpoint latest; evaluate_model.py / test_model.py: lower "
            "--batch-size; and check nvidia-smi for other processes on the GPU")


def describe_environment_error(exc: BaseException) -> str | None:
    """One line for a failure the environment caused, or None when it looks like a bug.

    An OSError anywhere in the chain, or a native library's message naming an OS error, counts;
    so does any failure while a run's output disk is full, since torch.save then reports only
    "unexpected pos" and safetensors a Rust error.
    """
    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if type(cur).__name__ == "OutOfMemoryError" or str(cur).startswith("CUDA out of memory"):
            return describe_gpu_out_of_memory(cur)
        if isinstance(cur, OSError) and describe_os_error(cur) is not None:
            return describe_os_error(cur)
        match = _NATIVE_OS_ERROR.search(str(cur))
        if match and int(match.group(1) or match.group(2)) in _PATH_ERRNO_FIXES:
            code = int(match.group(1) or match.group(2))
            where = next(iter(RunLock.held_folders()), "an output file")  # the message names no path
            return describe_os_error(OSError(code, os.strerror(code)), where, "write to")
        cur = cur.__cause__ or cur.__context__
    for folder in RunLock.held_folders():
        with contextlib.suppress(OSError):
            if shutil.disk_usage(folder).free < FULL_DISK_BYTES:
                return describe_os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), folder, "write to")
    return None
