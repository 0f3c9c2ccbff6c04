"""The ``-tasks`` schedule: which sources training draws its samples from, and with which weights, along the steps.

Why its own module: the option check reads it before anything is built; it needs only the sources' names
(:mod:`icl.data.vocabulary`), never the generators.
"""
from __future__ import annotations

import numpy as np

from icl.data.vocabulary import ANATOMY_LEVELS, LEVELS, REAL_LEVELS, level_name
from icl.errors import InputError

CLIPS = "clips"  # the schedule's name for samples of the preprocessed datasets
TASK_LEVELS = (*LEVELS, *ANATOMY_LEVELS, *REAL_LEVELS)  # every task level: look-alike, anatomy, real volumes
SOURCES = (*TASK_LEVELS, CLIPS)


def source_name(name: str) -> str:
    """A schedule source by name (look-alike levels also by number) -> its name; ValueError if unknown."""
    name = name.strip()
    return name if name == CLIPS or name in ANATOMY_LEVELS or name in REAL_LEVELS else level_name(name)


def parse_schedule(text: str, flag: str = "-tasks") -> list[tuple[int, dict[str, float]]]:
    """``"0:adjacent=1;300:sparse=0.5,clips=0.5"`` -> ``[(0, {...}), (300, {...})]`` (a source mix from a step on)."""
    out = []
    try:
        for part in filter(None, (p.strip() for p in text.split(";"))):
            start, _, mix = part.partition(":")
            weights = {}
            for item in mix.split(","):
                name, _, weight = item.partition("=")
                name = source_name(name)
                weights[name] = float(weight)
            if not weights or min(weights.values()) < 0 or sum(weights.values()) <= 0:
                raise ValueError("weights must be >= 0 and not all 0")
            out.append((int(start), weights))
    except ValueError as err:
        raise InputError(flag, f"expected 'STEP:source=weight,...;STEP:...' with sources from {', '.join(SOURCES)} "
                               f"({err})") from None
    out.sort()
    if not out or out[0][0] != 0:
        raise InputError(flag, f"the schedule must start at step 0, got {text!r}")
    return out


def source_at(schedule: list[tuple[int, dict[str, float]]], step: int, rng: np.random.Generator) -> str:
    """The source of one sample at ``step``, drawn with the weights in force there."""
    mix = [w for s, w in schedule if s <= step][-1]
    names = [n for n in mix if mix[n] > 0]
    p = np.array([mix[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]
