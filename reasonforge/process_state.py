"""Process-wide changes (environment variables, library settings, patched attributes), each made
through one recorder that keeps its undo, so the process is as it was once the work ends.

A training run has one (Run.changes): setup makes its changes through it, and train() undoes them
when the loop ends, as does setup itself when it fails. A script's whole call runs inside
`environment_restored()` (cli_entry), which puts back every environment variable the call set.
What cannot be undone is Unsloth's import, which patches transformers for the life of the process
(models.import_unsloth_first says why it must come first).
"""

from __future__ import annotations

import contextlib
import os

_MISSING = object()


class ProcessChanges:
    """The changes made so far, undone in reverse order by undo() (also on leaving a `with`)."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self.made: list[str] = []  # what was changed, for logs and tests

    def setenv(self, name: str, value: str) -> None:
        before = os.environ.get(name)
        os.environ[name] = value
        self._stack.callback(_restore_env, name, before)
        self.made.append(f"${name}")

    def setattr(self, owner, name: str, value) -> None:
        """setattr(owner, name, value), undone by restoring the old value, or, where a class only
        inherited the attribute, by deleting its own."""
        before = vars(owner).get(name, _MISSING) if isinstance(owner, type) else getattr(owner, name, _MISSING)
        setattr(owner, name, value)
        self._stack.callback(_restore_attr, owner, name, before)
        self.made.append(f"{getattr(owner, '__name__', type(owner).__name__)}.{name}")

    def callback(self, undo, *args, what: str = "") -> None:
        """A change made elsewhere whose undo is `undo(*args)`."""
        self._stack.callback(undo, *args)
        self.made.append(what or getattr(undo, "__qualname__", "undo"))

    def undo(self) -> None:
        self._stack.close()
        self.made.clear()

    def __enter__(self) -> ProcessChanges:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def _restore_env(name: str, before: str | None) -> None:
    if before is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = before


def _restore_attr(owner, name: str, before) -> None:
    if before is _MISSING:
        with contextlib.suppress(AttributeError):
            delattr(owner, name)
    else:
        setattr(owner, name, before)


@contextlib.contextmanager
def environment_restored():
    """Within the block the environment may change; after it, every variable is as it was."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for name in set(os.environ) - set(before):
            os.environ.pop(name, None)
        for name, value in before.items():
            if os.environ.get(name) != value:
                os.environ[name] = value
