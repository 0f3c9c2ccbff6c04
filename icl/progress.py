"""Progress: a bar on a terminal; in a log file (a redirected stderr), a plain line now and then instead.

Why both: a redrawn bar appends forever in a file, but a long run that writes nothing looks hung; so off a
terminal a line ``<what>: 40/128 slice (31%), 1m20s`` is printed every ``LINE_EVERY_S`` seconds (none for a run
shorter than that).

A caller with its own display (the napari plugin's progress bar and Cancel button) can :func:`observe` the bars the
engine opens in its thread: each step is reported to a callback, shown or not on the terminal, and the callback may
raise to stop the work there (the engine closes its bars in ``finally`` blocks, so nothing is left half-done).
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm

LINE_EVERY_S = 30.0  # seconds between progress lines when stderr is not a terminal
Observer = Callable[[str, int, "int | None"], None]  # (description, steps done, total or None)
_observers = threading.local()


_lines_only = False  # lines_only(): bars are never drawn in this process


def on_terminal() -> bool:
    """Whether stderr is an interactive terminal (tqdm redraws a line there; in a file it would append forever)."""
    return not _lines_only and bool(getattr(sys.stderr, "isatty", lambda: False)())


def lines_only() -> None:
    """Progress as plain lines in this process even on a terminal: several worker processes share one, and their
    redrawn bars would write over each other."""
    global _lines_only
    _lines_only = True


class LogLines:
    """The progress of a run off a terminal: ``update``/``close`` like a bar, one line every ``every`` seconds."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", every: float = LINE_EVERY_S):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n, self.start = 0, time.monotonic()
        self.last = self.start

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
            elapsed = int(now - self.start)
            print(f"{self.desc}: {self.n}/{self.total if self.total else '?'} {self.unit}{share}, "
                  f"{elapsed // 60}m{elapsed % 60:02d}s", file=sys.stderr, flush=True)

    def set_postfix(self, **kwargs: Any) -> None:
        """Nothing to show between lines (a bar's postfix)."""

    def close(self) -> None:
        pass


class Observed:
    """A bar (tqdm or :class:`LogLines`) whose every step is also reported to an observer."""

    def __init__(self, bar: Any, iterable: Iterable | None, observer: Observer, desc: str, total: int | None):
        self.bar, self.iterable, self.observer, self.desc, self.total, self.done = bar, iterable, observer, desc, \
            total, 0
        observer(desc, 0, total)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.done += int(n or 0)
        self.observer(self.desc, self.done, self.total)

    def set_postfix(self, **kwargs: Any) -> None:
        self.bar.set_postfix(**kwargs)

    def close(self) -> None:
        self.bar.close()

    def __iter__(self) -> Iterator[Any]:
        for item in self.bar:  # a bar made over an iterable (tqdm) counts and shows itself
            yield item
            self.done += 1
            self.observer(self.desc, self.done, self.total)


@contextmanager
def observe(observer: Observer) -> Iterator[None]:
    """Inside the block, every bar :func:`progress` opens in this thread reports its steps to ``observer``."""
    previous = getattr(_observers, "current", None)
    _observers.current = observer
    try:
        yield
    finally:
        _observers.current = previous


def progress(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any) -> Any:
    """``tqdm(iterable, **kwargs)`` on a terminal; off one, :class:`LogLines` (no iterable) or a silent tqdm;
    nothing at all when not ``enabled``; every step also reported to the thread's observer, if any."""
    if enabled and not on_terminal() and iterable is None:
        bar: Any = LogLines(kwargs.get("total"), kwargs.get("desc", ""), kwargs.get("unit", "it"), LINE_EVERY_S)
    else:
        bar = tqdm(iterable, disable=not (enabled and on_terminal()), file=sys.stderr, dynamic_ncols=True,
                   leave=False, **kwargs)
    observer = getattr(_observers, "current", None)
    if observer is None:
        return bar
    total = kwargs.get("total", len(iterable) if hasattr(iterable, "__len__") else None)
    return Observed(bar, iterable, observer, str(kwargs.get("desc") or ""), total)
