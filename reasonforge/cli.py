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

from reasonforge import progress
from reasonforge.core import _PATH_ERRNO_FIXES, Terminated, UserError, describe_os_error, log
from reasonforge.process_state import environment_restored
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


class PipeSafeStream:
    """A standard stream whose reader may go away (`... | head -3`): the first write into the closed
    pipe points the stream's descriptor at /dev/null, and the run carries on as if nobody read its
    output (training keeps training; its metrics and checkpoints are files), where BrokenPipeError
    would have ended it with a traceback and no checkpoint."""

    def __init__(self, stream):
        self._stream = stream
        self.reader_gone = False

    def write(self, text):
        if self.reader_gone:
            return len(text)
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._reader_gone()
            return len(text)

    def flush(self):
        if self.reader_gone:
            return
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._reader_gone()

    def _reader_gone(self) -> None:
        self.reader_gone = True
        # the buffer still holds the unwritten text, which the interpreter flushes at exit: into /dev/null now
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def pipe_safe_output() -> Iterator[None]:
    """sys.stdout and sys.stderr as PipeSafeStreams for the duration of the block."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (s if isinstance(s, PipeSafeStream) else PipeSafeStream(s) for s in saved)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def cli_entry(main_fn):
    """Wrap a script's main(argv): user mistakes and an environment in the way (full disk,
    read-only folder, a file where a folder should be) become one line on stderr and exit code 2.
    Run locks taken during the call are released however it ends, and the environment variables it
    set are put back (a notebook or test calling main() keeps its own)."""
    import functools

    @functools.wraps(main_fn)
    def wrapper(argv=None) -> int:
        # the error lines below inside too: stderr may be a closed pipe as well
        with pipe_safe_output(), environment_restored():
            try:
                check_utf8_arguments(sys.argv[1:] if argv is None else argv)
                with sigterm_raises(), progress.library_bars_off_in_line_mode():
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


def not_utf8(text: str) -> int | None:
    """The first byte that is not UTF-8 in a string Python decoded with surrogateescape (command-line
    arguments, and stdin under a C locale), else None."""
    for ch in text:
        if "\udc80" <= ch <= "\udcff":
            return ord(ch) - 0xDC00
    return None


def check_utf8_arguments(argv) -> None:
    """Refuse an argument that is not UTF-8 text in one line: it would fail later, when it is written
    into a JSON file, a prompt or a path's name, with a traceback (and possibly after the work)."""
    for i, arg in enumerate(argv):
        byte = not_utf8(str(arg))
        if byte is not None:
            flag = next((a for a in reversed(argv[:i]) if str(a).startswith("--")), None) if not str(arg).startswith("--") else None
            shown = f"the value of {flag}" if flag else f"argument {str(arg).encode('utf-8', 'backslashreplace').decode()!r}"
            raise UserError(f"{shown} is not UTF-8 text (byte 0x{byte:02x}); pass it as UTF-8, "
                            "e.g. convert it with iconv -f latin1 -t utf-8")


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
