"""The self-check of the cross-scan road: how well registration carries labels, told by the supports themselves.

Why leave one out: the query has no labels to score against, but with two or more labelled supports each can play
the query in turn — the others registered to it and fused, as the query's own labels will be — and be scored
against its own labels. The per-structure mean over these folds is registration's estimate, to stand beside the
model's when a method is chosen per structure. With one support nothing can be checked.

Two ways to get the folds (``--cross-check``):

* ``composed`` (default): from the registrations to the query already made — the other supports' fused
  probabilities on the query carried back onto support i through the inverse of its registration
  (``icl.sparse.fusion.composed_folds``), so each fold goes support j -> query -> support i, two registrations where
  the full check has one. It costs one resampling per support and no registration: k supports cost k
  registrations in all. Chosen by measurement on INIA19 (BENCHMARKS.md) over comparing on the query's grid (no
  resampling; further from the full check) and a coarse registration among the supports (k (k - 1) of them).
* ``full``: every support registered to every other one, k (k - 1) registrations. It depends on the supports
  alone, so it is computed once per set of supports (a cohort pays it once, not per query).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from icl.data.frames import Scan
from icl.errors import InputError
from icl.model.dice import binary_dice
from icl.sparse.fusion import Say, SupportSet, register_set, run_carries, support_scans
from icl.sparse.methods import AUTO, REGISTRATION
from icl.sparse.registration import DEFORMABLE_ITERATIONS, ScanLike, most_probable

CHECKS = ("composed", "full", "none")  # --cross-check: through the query, among the supports, or not at all


def full_folds(supports: SupportSet, deformable: bool = True, threads: int | None = None,
               say: Say | None = None, iterations: Sequence[int] = DEFORMABLE_ITERATIONS) -> np.ndarray:
    """``[supports, structures]``: Dice of "support i as the query, the others registered to it and fused" against
    support i's own labels (NaN where neither has the structure). ``k (k - 1)`` registrations, in parallel
    processes as the cores allow; kept in ``supports.cache`` (they depend on the supports alone)."""
    key = ("full", deformable, tuple(iterations))
    if key in supports.cache:
        return supports.cache[key]
    k, classes, prepared = len(supports), supports.classes, supports.prepared
    if k < 2:
        raise InputError("support", f"leave-one-out needs at least 2 labelled supports, got {k}")
    pairs = [(i, j) for i in range(k) for j in range(k) if j != i]
    done = run_carries([(prepared[i], prepared[j]) for i, j in pairs], classes, deformable, threads, iterations,
                       say=say, what=lambda n: f"check: support {pairs[n][1] + 1} to support {pairs[n][0] + 1}")
    folds = np.full((k, len(classes)), np.nan)
    for i in range(k):
        summed = {c: np.zeros(prepared[i].shape, np.float32) for c in classes}
        for (fold, _), one in zip(pairs, done):  # the others in their order, as one process would add them
            if fold == i:
                for c, m in zip(classes, one.maps):
                    m.add_to(summed[c])
        pred = most_probable(summed, np.float32(k - 1))
        folds[i] = [binary_dice(pred == c, prepared[i].labels == c) for c in classes]
    supports.cache[key] = folds
    return folds


def per_structure(folds: np.ndarray, classes: Sequence[int]) -> dict[int, float]:
    """The mean over folds per structure; NaN where no fold has the structure in its truth or its prediction."""
    return {int(c): (math.nan if np.isnan(col).all() else float(np.nanmean(col))) for c, col in zip(classes, folds.T)}


def leave_one_out(supports: Sequence[tuple[ScanLike, ScanLike]], classes: Sequence[int], deformable: bool = True,
                  threads: int | None = None) -> dict[int, float]:
    """The full check (:func:`full_folds`) of ``[(image, label), ...]``: per structure, the mean Dice over folds."""
    if len(supports) < 2:
        raise InputError("support", f"leave-one-out needs at least 2 labelled supports, got {len(supports)}")
    support_set = SupportSet(support_scans(supports), classes)
    return per_structure(full_folds(support_set, deformable, threads), support_set.classes)


@dataclass
class CrossCheck:
    """One structure's line of the cross-scan road's self-check: registration's leave-one-out estimate, the method."""

    structure: int
    supports: int  # labelled support scans given
    dice: dict[str, float | None]  # leave-one-out Dice per method (None: nothing could be checked)
    chosen: str
    rule: str
    check: str = "none"  # how the folds were made: composed, full, none
    per_support: list[float | None] = field(default_factory=list)  # the fold of each support left out

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """The stderr line: the estimate (your quality estimate for this structure), the method and why."""
        scores = ", ".join(f"{m} {'-' if v is None else f'{v:.3f}'}" for m, v in self.dice.items())
        return f"structure {self.structure}: leave-one-out Dice {scores} -> {self.chosen} ({self.rule})"


#: why ``auto`` takes registration on this road (the model is not trained to read another scan's support)
AUTO_RULE = "auto: registration, the classic fill of this road (the shipped model does not read another scan's support)"
HOW = {"composed": "through the registrations to the query", "full": "each registered to the others"}


def check_rows(folds: np.ndarray | None, classes: Sequence[int], n: int, fill: str, check: str) -> list[CrossCheck]:
    """The table of the cross-scan road: with folds, registration's leave-one-out estimate per structure; without
    (one support, or ``--cross-check none``), a row saying so. ``fill``: ``auto`` / ``registration`` run
    registration, ``model`` the model (its rows carry the estimate of registration beside it)."""
    estimates = per_structure(folds, classes) if folds is not None else {}
    chosen = REGISTRATION if fill in (AUTO, REGISTRATION) else fill
    rule = AUTO_RULE if fill == AUTO else f"fill {fill}"
    if folds is not None:
        held = f"left out each of {n} support scans in turn, {HOW[check]}"
    else:
        held = "one support scan: nothing can be checked" if n < 2 else "not checked (--cross-check none)"
    rows = []
    for k, c in enumerate(classes):
        value = estimates.get(int(c), math.nan)
        fold = [] if folds is None else [None if math.isnan(v) else float(v) for v in folds[:, k]]
        rows.append(CrossCheck(int(c), n, {REGISTRATION: None if math.isnan(value) else value}, chosen,
                               f"{rule}; {held}", check if folds is not None else "none", fold))
    return rows


def registered_and_checked(query: Scan, supports: SupportSet, fill: str, check: str = "composed",
                           say: Say | None = None) -> tuple[np.ndarray, list[CrossCheck]]:
    """The registration road for one query: every support registered to it once and fused (the label map in its
    canonical voxel order), and the check chosen by ``check`` (:data:`CHECKS`)."""
    if check not in CHECKS:
        raise InputError("--cross-check", f"expected one of {', '.join(CHECKS)}, got {check!r}")
    n = len(supports)
    folds = full_folds(supports, say=say) if check == "full" and n >= 2 else None
    fused = register_set(query, supports, check=check == "composed", say=say)
    if check == "composed" and n >= 2:
        folds = fused.folds
    return fused.labels(), check_rows(folds, supports.classes, n, fill, check)
