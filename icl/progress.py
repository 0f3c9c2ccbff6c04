"""Progress bars that show on a terminal and stay quiet in log files (a redirected stderr gets no bar at all)."""
from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm


def on_terminal() -> bool:
    """Whether stderr is an interactive terminal (tqdm redraws a line there; in a file it would append forever)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, shown only when ``enabled`` and stderr is a terminal."""
    return tqdm(iterable, disable=not (enabled and on_terminal()), file=sys.stderr, dynamic_ncols=True,
                leave=False, **kwargs)
