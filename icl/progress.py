"""Progress: a bar on a terminal; in a log file (a redirected stderr), a plain line now and then instead.

Why both: a redrawn bar appends forever in a file, but a long run that writes nothing looks hung; so off a
terminal a line ``<what>: 40/128 slice (31%), 1m20s`` is printed every ``LINE_EVERY_S`` seconds (none for a run
shorter than that).
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

LINE_EVERY_S = 30.0  # seconds between progress lines when stderr is not a terminal


def on_terminal() -> bool:
    """Whether stderr is an interactive terminal (tqdm redraws a line there; in a file it would append forever)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


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

    def close(self) -> None:
        pass


def progress(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any) -> Any:
    """``tqdm(iterable, **kwargs)`` on a terminal; off one, :class:`LogLines` (no iterable) or a silent tqdm;
    nothing at all when not ``enabled``."""
    if enabled and not on_terminal() and iterable is None:
        return LogLines(kwargs.get("total"), kwargs.get("desc", ""), kwargs.get("unit", "it"), LINE_EVERY_S)
    return tqdm(iterable, disable=not (enabled and on_terminal()), file=sys.stderr, dynamic_ncols=True,
                leave=False, **kwargs)
