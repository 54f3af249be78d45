"""Output folders: the run lock, the checks before writing, atomic swaps and the leftovers of killed runs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from reasonforge.core import UserError, describe_os_error, first_line, holds_json, log


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
    start-up included; from /proc, else None (for this process: when this module was imported)."""
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


class RunLock:
    """A lock file in an output folder, so that two runs never write into the same one (or, with
    `name` and `target`, beside an output file: test_model.py's batch report).

    Created with O_CREAT|O_EXCL, so of two processes exactly one gets it. It holds pid and host:
    a refusal names the holder, and a lock left by a killed process on this host is taken over.
    Locks are released when the script's main returns, however it returns (see cli_entry).
    """

    NAME = ".reasonforge.lock"
    STALE_UNREADABLE_S = 30  # a lock still empty after this long was left by a process killed while writing it
    _held: list["RunLock"] = []

    def __init__(self, folder: str | Path, flag: str = "--output-dir", remove_if_empty: bool = False,
                 name: str | None = None, target: str | None = None):
        self.path = Path(folder) / (name or self.NAME)
        self.flag = flag
        self.target = target or str(self.path.parent)  # what the refusal says is in use
        # a folder this run created is removed again where the run ended before writing anything into it
        self.remove_if_empty = remove_if_empty
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
            if self.remove_if_empty:
                with contextlib.suppress(OSError):  # not empty: the run wrote something, which stays
                    self.path.parent.rmdir()

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
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
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
        return (f"{self.target} is in use by another run ({who}); wait for it to finish or choose another "
                f"{self.flag}; if that run is gone, delete {self.path}")
