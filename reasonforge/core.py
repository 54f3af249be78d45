"""Errors, one-line messages, atomic JSON files and the small checks every script shares."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("reasonforge")


class UserError(Exception):
    """A mistake the user can fix. Scripts print it as one line and exit with code 2."""


class CorruptFile(UserError):
    """A metadata file that is missing, unreadable or not the JSON object it should be.

    A subclass so that code which can fall back (an older checkpoint) catches just this.
    """


class Terminated(BaseException):
    """SIGTERM, raised as an exception so that `finally` blocks and scratch-folder cleanup run.

    A BaseException, like KeyboardInterrupt, so that library code catching Exception cannot swallow
    it. Its message says what was kept and how to continue; scripts exit with 143 (128 + SIGTERM).
    """


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


def path_kind(name: str | Path) -> str:
    """Where a model or dataset value points: "s3" (an s3:// URI), "local" (written as a path, or
    naming something on this machine) or "hub" (anything else: a Hugging Face Hub id).

    The one rule of every script, so that a value means the same wherever it is passed.
    """
    name = str(name)
    if name.startswith("s3://"):
        return "s3"
    if name.startswith((".", "/", "~")) or Path(name).expanduser().exists():
        return "local"
    if name.count("/") > 1 or "\\" in name:  # a Hub id is NAME or OWNER/NAME: this is a path that is not there
        return "local"
    return "hub"


def absolute_if_local(name: str | Path) -> str:
    """A local path made absolute (so it means the same from any working folder); an s3:// URI or a
    Hub id as given."""
    return str(Path(name).expanduser().resolve()) if path_kind(name) == "local" else str(name)


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


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so that readers see either the old content or the whole new one."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        # mkstemp makes the file owner-only; a report should get the mode a plain write would give
        # (or keep the one of the file it replaces), so colleagues on a shared box can still read it
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~_umask())
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


def finite_json(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None: json.dumps would write them as the
    bare words NaN and Infinity, which strict JSON readers (jq, JavaScript, most other languages) refuse."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def to_json(obj: Any, **kwargs) -> str:
    """Strict JSON text of `obj` (non-finite numbers as null); every file and line the suite writes goes through it."""
    return json.dumps(finite_json(obj), allow_nan=False, **kwargs)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, to_json(obj, indent=2, sort_keys=False, default=str) + "\n")


_SECRET_NAME = re.compile(r"(secret|password|passwd|api[_-]?key|access[_-]?key|credential|(^|_)token$|^auth)", re.I)


def redact_secrets(obj: Any) -> Any:
    """Replace string values whose key looks like a secret, recursively. Used on everything we persist."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if isinstance(v, str) and v and _SECRET_NAME.search(str(k)) else redact_secrets(v))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_secrets(v) for v in obj]
    return obj


RECORDED_LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "unsloth", "boto3")


def library_versions(names: tuple[str, ...] = RECORDED_LIBRARIES) -> dict[str, str]:
    """Python's version and those of the installed `names`; a package not installed is left out."""
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in names:
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


class DuplicateKey(ValueError):
    """A JSON object with one key twice (json.loads would silently keep the last)."""


def unique_keys(pairs):
    """json.loads' object_pairs_hook that raises DuplicateKey instead of keeping the last value."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKey(key)
        seen[key] = value
    return seen


# tokens per example, the one default of every script and of model loading
MAX_SEQ_LENGTH = 2048
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


def utc_stamp() -> str:
    return time.strftime("%Y%m%d_%H%M%S", time.gmtime())


def frozen(namespace, **resolved):
    """A script's settings as a frozen object: the parsed flags (an argparse Namespace or an earlier
    frozen one) with `resolved` values in place of what was given. Changing a setting later is an
    error, so what a report records is what ran; frozen(settings, **more) makes the next version."""
    import dataclasses

    values = {**vars(namespace), **resolved}
    cls = dataclasses.make_dataclass("Settings", list(values), frozen=True)
    return cls(**values)
