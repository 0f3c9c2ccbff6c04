"""The self-check of the cross-scan road: how well registration carries labels, told by the supports themselves.

Why leave one out: the query has no labels to score against, but with two or more labelled supports each can play
the query in turn — the others registered to it and fused, as the query's own labels will be — and be scored
against its own labels. The per-structure mean over these folds is registration's estimate, to stand beside the
model's when a method is chosen per structure. With one support nothing can be checked.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from icl.errors import InputError
from icl.model.dice import binary_dice
from icl.sparse.methods import AUTO, REGISTRATION
from icl.sparse.registration import ScanLike, check_classes, fused_canonical, support_labels, support_scans


def leave_one_out(supports: Sequence[tuple[ScanLike, ScanLike]], classes: Sequence[int], deformable: bool = True,
                  threads: int = 1) -> dict[int, float]:
    """Per structure, the mean Dice over folds of "support i as the query, the others registered to it and fused",
    against support i's own labels; NaN where no fold has the structure in its truth or its prediction.
    Costs ``n (n - 1)`` registrations for ``n`` supports."""
    classes = check_classes(classes)
    if len(supports) < 2:
        raise InputError("support", f"leave-one-out needs at least 2 labelled supports, got {len(supports)}")
    pairs = support_scans(supports)
    truths = [support_labels(s, lab, classes) for s, lab in pairs]
    folds = []
    for i, (query, _) in enumerate(pairs):
        others = pairs[:i] + pairs[i + 1:]
        pred = fused_canonical(query, others, classes, deformable, threads, probabilities=False)
        folds.append([binary_dice(pred == c, truths[i] == c) for c in classes])
    scores = np.array(folds, dtype=np.float64)
    return {c: (math.nan if np.isnan(col).all() else float(np.nanmean(col))) for c, col in zip(classes, scores.T)}


@dataclass
class CrossCheck:
    """One structure's line of the cross-scan road's self-check: registration's leave-one-out estimate, the method."""

    structure: int
    supports: int  # labelled support scans given
    dice: dict[str, float | None]  # leave-one-out Dice per method (None: nothing could be checked)
    chosen: str
    rule: str

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """The stderr line: the estimate (your quality estimate for this structure), the method and why."""
        scores = ", ".join(f"{m} {'-' if v is None else f'{v:.3f}'}" for m, v in self.dice.items())
        return f"structure {self.structure}: leave-one-out Dice {scores} -> {self.chosen} ({self.rule})"


#: why ``auto`` takes registration on this road (the model is not trained to read another scan's support)
AUTO_RULE = "auto: registration, the classic fill of this road (the shipped model does not read another scan's support)"


def cross_checks(supports: Sequence[tuple[ScanLike, ScanLike]], classes: Sequence[int], fill: str,
                 threads: int = 1) -> list[CrossCheck]:
    """The table of the cross-scan road: with two or more supports, registration's leave-one-out estimate per
    structure; with one, a row saying that nothing can be checked. ``fill``: ``auto`` / ``registration`` run
    registration, ``model`` the model (its rows carry the estimate of registration beside it)."""
    n = len(supports)
    estimates = leave_one_out(supports, classes, threads=threads) if n >= 2 else {}
    chosen = REGISTRATION if fill in (AUTO, REGISTRATION) else fill
    rule = AUTO_RULE if fill == AUTO else f"fill {fill}"
    held = f"left out each of {n} support scans in turn" if n >= 2 else "one support scan: nothing can be checked"
    return [CrossCheck(int(c), n, {REGISTRATION: None if math.isnan(estimates.get(c, math.nan)) else estimates[c]},
                       chosen, f"{rule}; {held}") for c in classes]
