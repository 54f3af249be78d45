"""Progress that reads well where it lands: tqdm bars on a terminal, plain timestamped lines in a
file or a pipe (`nohup`, `| tee run.log`), where carriage-return frames pile up as garbage.

RF_PROGRESS=bars|lines|auto (default auto: bars when stderr is a terminal) chooses. In lines mode
the suite's own progress prints one line at most every RF_PROGRESS_INTERVAL_S seconds (default 30)
and one when it ends; the libraries' bars (datasets, transformers, the Hub) are switched off for the
run and back on after it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time
from typing import Iterator

from reasonforge.core import UserError

MODE_ENV, INTERVAL_ENV = "RF_PROGRESS", "RF_PROGRESS_INTERVAL_S"
# what the Hub (and transformers, which follows it) reads when imported to leave its bars out
LIBRARY_SWITCHES = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def mode() -> str:
    """"bars" or "lines", from RF_PROGRESS (auto: bars on a terminal)."""
    wanted = os.environ.get(MODE_ENV, "auto").strip().lower()
    if wanted in ("bars", "lines"):
        return wanted
    if wanted not in ("auto", ""):
        raise UserError(f"{MODE_ENV}={os.environ[MODE_ENV]!r} is not a progress mode; set it to bars, lines or auto")
    stream = sys.stderr
    return "bars" if getattr(stream, "isatty", lambda: False)() else "lines"


def check_settings() -> None:
    """RF_PROGRESS and RF_PROGRESS_INTERVAL_S, refused in one line when they make no sense."""
    mode()
    raw = os.environ.get(INTERVAL_ENV)
    if raw is not None:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise UserError(f"{INTERVAL_ENV}={raw!r} is not a number of seconds; set it to 0 or more, e.g. 30")


def interval_s() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, "30")))
    except ValueError:
        return 30.0


class LineProgress:
    """tqdm's interface as far as the suite uses it (update, set_postfix, set_description, n, total,
    close, a context manager), written as plain lines to stderr."""

    def __init__(self, total=None, desc=None, unit="it", initial=0, disable=False, unit_scale=False, periodic=True,
                 **_ignored):
        self.total, self.desc, self.unit, self.n, self.disable = total, desc, unit.strip(), initial, disable
        self.periodic = periodic  # False where the caller prints its own line per step (training)
        self.unit_scale = unit_scale
        self._start = self._last = time.monotonic()
        self._start_n = initial
        self._postfix = ""
        self._closed = False
        self._shown = None  # (n, postfix) of the last line printed: the closing line is not a repeat

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.periodic and now - self._last >= interval_s():
            self._last = now
            self._print()

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh=True) -> None:
        self._postfix = s

    def set_description(self, desc=None, refresh=True) -> None:
        self.desc = desc

    def refresh(self) -> None:
        pass

    def write(self, text: str) -> None:
        """A message of the caller's (tqdm.write's place: stdout), timestamped as the lines are."""
        print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.periodic:
                self._print()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _amount(self, n) -> str:
        if not self.unit_scale:
            return f"{n:,}"
        for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if n >= scale:
                return f"{n / scale:.1f}{suffix}"
        return f"{n:.0f}"

    def _print(self) -> None:
        if self.disable or not self.desc or self._shown == (self.n, self._postfix):
            return
        self._shown = (self.n, self._postfix)
        seconds = time.monotonic() - self._start
        rate = (self.n - self._start_n) / seconds if seconds > 0 else 0.0
        of = f"/{self._amount(self.total)}" if self.total else ""
        extra = f", {self._postfix}" if self._postfix else ""
        print(f"{time.strftime('%H:%M:%S')} {self.desc}: {self._amount(self.n)}{of} {self.unit} in {seconds:.0f} s "
              f"({rate:,.2f} {self.unit}/s{extra})", file=sys.stderr, flush=True)


def bar(periodic: bool = True, **kwargs):
    """A tqdm bar, or a LineProgress where output goes to a file or a pipe (see mode). `periodic`
    False: in lines mode no progress lines of its own, only the caller's write()s."""
    if mode() == "lines":
        return LineProgress(periodic=periodic, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(**kwargs)


@contextlib.contextmanager
def library_bars_off_in_line_mode() -> Iterator[None]:
    """In lines mode for the duration of the block: datasets' bars (formatting, tokenizing, saving:
    the long ones) written as LineProgress lines, the Hub's and transformers' bars (downloads, weight
    loading: short) off; everything as it was afterwards."""
    check_settings()
    if mode() != "lines":
        yield
        return
    saved = {k: os.environ.get(k) for k in LIBRARY_SWITCHES}
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    undo = []
    import datasets.arrow_dataset
    import datasets.builder

    for module in (datasets.arrow_dataset, datasets.builder):
        undo.append(functools.partial(setattr, module, "hf_tqdm", module.hf_tqdm))
        module.hf_tqdm = _DatasetsLines
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if not are_progress_bars_disabled():
        disable_progress_bars()
        undo.append(enable_progress_bars)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            undo.append(hf_logging.enable_progress_bar)
    try:
        yield
    finally:
        for fn in reversed(undo):
            fn()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _DatasetsLines(LineProgress):
    """datasets' bar class (hf_tqdm) as lines: also the class-level hooks tqdm offers (the lock that
    thread_map takes) and iteration over an iterable."""

    def __init__(self, iterable=None, *args, **kwargs):
        super().__init__(**kwargs)
        self.iterable = iterable

    def __iter__(self):
        with self:
            for item in self.iterable:
                yield item
                self.update(1)

    @classmethod
    def get_lock(cls):
        import threading

        if getattr(cls, "_lock", None) is None:  # tqdm's thread_map deletes it again when it is done
            cls._lock = threading.RLock()
        return cls._lock

    @classmethod
    def set_lock(cls, lock) -> None:
        cls._lock = lock
