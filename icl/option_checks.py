"""Checks of single option values (``check=`` of :func:`icl.options.opt`): each returns the value, normalised, or
raises ValueError with the problem in one line. Data vocabularies are imported late: those modules are heavy."""
from __future__ import annotations

import re

from icl.errors import InputError


def exp_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", value):
        raise ValueError(f"use letters, digits, '.', '_' or '-' only, got {value!r}")
    return value


def schedule(text: str) -> str:
    from icl.engine.tasks import parse_schedule

    try:
        parse_schedule(text)
    except InputError as err:
        raise ValueError(err.problem) from None
    return text


def _names(text: str, allowed: tuple[str, ...], what: str) -> str:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; choose from {', '.join(allowed)}")
    return ",".join(names)


def shape_list(text: str) -> str:
    """Look-alike shape classes (``-held_out_shapes``)."""
    from icl.data.lookalike import SHAPES

    return _names(text, tuple(SHAPES), "shape class(es)")


def generator_parts(text: str) -> str:
    """Parts of the anatomy generator an ablation leaves out (``-anatomy_drop``)."""
    from icl.data.anatomy_tasks import GENERATOR_PARTS

    return _names(text, GENERATOR_PARTS, "generator part(s)")


def class_list(value: str) -> str:
    text = value.strip().lower().replace(" ", "") or "all"
    if text == "all":
        return text
    try:
        ids = [int(c) for c in text.split(",") if c]
    except ValueError:
        raise ValueError(f"expected all or comma-separated integers, got {value!r}") from None
    if not ids or min(ids) < 1:
        raise ValueError(f"class ids are >= 1 (0 is background), got {value!r}")
    return text
