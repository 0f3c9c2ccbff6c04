"""THE Dice of the engine, from masks or from voxel counts: training's validation, the sparse fill's self-check, the
benchmarks and the protocol's scores all read the same definition.

Both empty is undefined (NaN, never 1): an empty-vs-empty slice or case says nothing about a method. The per-case
metrics of evaluation (``icl.engine.eval.metrics``, MONAI) follow the same definition and add surface distances.
"""
from __future__ import annotations

import math
from typing import Any


def dice_from_counts(inter: float, pred: float, truth: float) -> float:
    """Dice from the overlap and the two sizes (voxel counts or sums of them); NaN when both are empty."""
    return math.nan if pred + truth == 0 else 2.0 * float(inter) / float(pred + truth)


def binary_dice(pred: Any, truth: Any) -> float:
    """Dice of two boolean masks of the same shape (numpy or torch, any dimension); NaN when both are empty."""
    return dice_from_counts(int((pred & truth).sum()), int(pred.sum()), int(truth.sum()))
