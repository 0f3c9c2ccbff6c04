"""The self-check of the cross-scan road: how well registration carries labels, told by the supports themselves.

Why leave one out: the query has no labels to score against, but with two or more labelled supports each can play
the query in turn — the others registered to it and fused, as the query's own labels will be — and be scored
against its own labels. The per-structure mean over these folds is registration's estimate, to stand beside the
model's when a method is chosen per structure. With one support nothing can be checked.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from icl.errors import InputError
from icl.model.dice import binary_dice
from icl.sparse.registration import ScanLike, as_scan, check_classes, fused_canonical, support_labels


def leave_one_out(supports: Sequence[tuple[ScanLike, ScanLike]], classes: Sequence[int], deformable: bool = True,
                  threads: int = 1) -> dict[int, float]:
    """Per structure, the mean Dice over folds of "support i as the query, the others registered to it and fused",
    against support i's own labels; NaN where no fold has the structure in its truth or its prediction.
    Costs ``n (n - 1)`` registrations for ``n`` supports."""
    classes = check_classes(classes)
    if len(supports) < 2:
        raise InputError("support", f"leave-one-out needs at least 2 labelled supports, got {len(supports)}")
    pairs = [(as_scan(s, f"support {i + 1}"), as_scan(lab, f"support label {i + 1}"))
             for i, (s, lab) in enumerate(supports)]
    truths = [support_labels(s, lab, classes) for s, lab in pairs]
    folds = []
    for i, (query, _) in enumerate(pairs):
        others = pairs[:i] + pairs[i + 1:]
        pred = fused_canonical(query, others, classes, deformable, threads, probabilities=False)
        folds.append([binary_dice(pred == c, truths[i] == c) for c in classes])
    scores = np.array(folds, dtype=np.float64)
    return {c: (math.nan if np.isnan(col).all() else float(np.nanmean(col))) for c, col in zip(classes, scores.T)}
