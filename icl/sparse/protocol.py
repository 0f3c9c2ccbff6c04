"""A simulated annotator and the score of a fill: the development protocol's sparse annotation (as a person draws in
3D Slicer or ITK-SNAP, one structure at a time or complete slices), and Dice on the slices that were not drawn.

Why in the package: the demo, the benchmarks and the tests annotate and score the same way (the protocol is
``../shared/data/inia19/README.md``'s, written for any scan). Label arrays have the slice axis last (``axis=2``) by
default, as the engine's canonical axial slices are.
"""
from __future__ import annotations

import numpy as np

from icl.data.sampling import labelled_slices
from icl.model.dice import binary_dice


def sparse_label(label: np.ndarray, every: int, axis: int = 2) -> tuple[np.ndarray, list[int]]:
    """``label`` kept on every ``every``-th slice from its first labelled one (else 0); returns it and those slices."""
    first = labelled_slices(label, axis)[0]
    kept = list(range(first, label.shape[axis], every))
    sparse = np.zeros_like(label)
    index: list = [slice(None)] * label.ndim
    index[axis] = kept
    sparse[tuple(index)] = label[tuple(index)]
    return sparse, kept


def annotate_sparse(label: np.ndarray, classes: list[int], step: int, style: str = "per_structure",
                    axis: int = 2) -> tuple[np.ndarray, dict[int, list[int]]]:
    """An annotator's sparse label, the development protocol's way (``../shared/data/inia19/README.md``):

    * ``per_structure``: structure ``c`` drawn on slices ``z0 + step//2, + step, …`` of its own extent ``z0..z1``
      (its middle slice only when the extent has ≤ ``step`` slices); a slice drawn for ``c`` carries ``c`` only;
    * ``complete``: every structure drawn on the same slices, chosen that way from the union extent.

    Returns the sparse label and, per structure, the slices on which it is annotated (drawn and present)."""
    zhw = np.moveaxis(label, axis, 0)

    def pick(z0: int, z1: int) -> list[int]:
        return [(z0 + z1) // 2] if z1 - z0 + 1 <= step else list(range(z0 + step // 2, z1 + 1, step))

    extents = {c: np.flatnonzero((zhw == c).reshape(zhw.shape[0], -1).any(1)) for c in classes}
    if style == "complete":
        union = np.concatenate([e for e in extents.values()])
        shared = pick(int(union.min()), int(union.max()))
        chosen = {c: shared for c in classes}
    else:
        chosen = {c: pick(int(e[0]), int(e[-1])) for c, e in extents.items()}
    sparse = np.zeros_like(label)
    out_zhw = np.moveaxis(sparse, axis, 0)
    drawn = {}
    for c, zs in chosen.items():
        for z in zs:
            out_zhw[z][zhw[z] == c] = c
        drawn[c] = [z for z in zs if (zhw[z] == c).any()]
    return sparse, drawn


def sparse_dice(pred: np.ndarray, truth: np.ndarray, classes: list[int],
                skip: dict[int, list[int]] | None = None, axis: int = 2) -> dict[int, float]:
    """3D Dice per structure (``pred == c`` vs ``truth == c``) on the slices where it was not annotated
    (``skip[c]``); NaN where both are empty there."""
    out = {}
    for c in classes:
        keep = np.ones(pred.shape[axis], bool)
        if skip:
            keep[skip[c]] = False
        out[c] = float(binary_dice(np.compress(keep, pred == c, axis=axis), np.compress(keep, truth == c, axis=axis)))
    return out
