"""Progress bars that show on a terminal and stay quiet in log files (a redirected stderr gets no bar at all).

A caller with its own display (the napari plugin's progress bar and Cancel button) can :func:`observe` the bars the
engine opens in its thread: each step is reported to a callback, shown or not on the terminal, and the callback may
raise to stop the work there (the engine closes its bars in ``finally`` blocks, so nothing is left half-done).
"""
from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm

Observer = Callable[[str, int, "int | None"], None]  # (description, steps done, total or None)
_observers = threading.local()


def on_terminal() -> bool:
    """Whether stderr is an interactive terminal (tqdm redraws a line there; in a file it would append forever)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class _ObservedBar(tqdm):
    """A tqdm bar that also reports every update to an observer (counted here: a disabled tqdm counts nothing)."""

    def __init__(self, *args: Any, observer: Observer, **kwargs: Any):
        self._observer, self._done, self._desc = observer, 0, str(kwargs.get("desc") or "")
        super().__init__(*args, **kwargs)
        self._observer(self._desc, 0, self.total)

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        self._done += int(n or 0)
        self._observer(self._desc, self._done, self.total)
        return shown

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            self.update()


@contextmanager
def observe(observer: Observer) -> Iterator[None]:
    """Inside the block, every bar :func:`progress` opens in this thread reports its steps to ``observer``."""
    previous = getattr(_observers, "current", None)
    _observers.current = observer
    try:
        yield
    finally:
        _observers.current = previous


def progress(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, shown only when ``enabled`` and stderr is a terminal (and reported to the
    thread's observer, if any)."""
    options = dict(disable=not (enabled and on_terminal()), file=sys.stderr, dynamic_ncols=True, leave=False)
    observer = getattr(_observers, "current", None)
    if observer is None:
        return tqdm(iterable, **options, **kwargs)
    return _ObservedBar(iterable, observer=observer, **options, **kwargs)
