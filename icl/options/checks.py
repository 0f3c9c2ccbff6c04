"""Checks of single option values (``check=`` of :class:`icl.options.spec.Opt`): each returns the value, normalised,
or raises ValueError with the problem in one line. The checks of one command's
options live with them (:mod:`icl.options.train`)."""
from __future__ import annotations

import math
import re
from typing import Any, Callable

NONE_WORDS = ("", "none", "null")


def at_least(low: float, strict: bool = False, unit: str = "") -> Callable[[Any], Any]:
    """A check: the value is finite and ``>= low`` (``> low`` when ``strict``)."""
    def check(value: Any) -> Any:
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise ValueError(f"must be {'>' if strict else '>='} {low:g}{unit}, got {value}")
        return value
    return check


POSITIVE, NON_NEGATIVE = at_least(0, strict=True), at_least(0)


def none_word(value: str) -> str | None:
    """A check for optional names: ``none``, ``null`` or an empty value become None."""
    return None if str(value).strip().lower() in NONE_WORDS else value


def probability(value: float) -> float:
    """A check: the value is in [0, 1]."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be a probability in [0, 1], got {value}")
    return value


def exp_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", value):
        raise ValueError(f"use letters, digits, '.', '_' or '-' only, got {value!r}")
    return value
