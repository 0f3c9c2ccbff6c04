"""Along which axis a label map was drawn, and whether it is a sparse drawing at all (read from the label alone).

Why: a structure drawn on every 5th sagittal slice, read along the axial axis, is drawn on *every* axial slice of
its extent — the fill then has nothing to fill and returns the drawn stripes, while a self-check holding out every
other axial slice scores them as if it had filled something. The drawing itself says along which axis it was made:
the axis along which the drawn slices of a structure leave gaps.

A structure is **sparse** along an axis when its drawn slices leave gaps and cover at most about half of its
extent there (every 2nd slice still counts; a structure split in two, as twin blobs are, does not); **dense** when
it is drawn on every slice of an extent of at least three slices. An axis fits the drawing when more structures are
sparse or drawn on one slice only than dense along it; of several, the axial axis (2) first, then the one with
most sparse structures.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

AXIS_PREFERENCE = (2, 0, 1)  # ties: the engine's default slice axis first


@dataclass(frozen=True)
class AxisReading:
    """How the structures of a label sit along one axis."""

    axis: int
    sparse: tuple[int, ...]  # structures whose drawn slices leave gaps (at most about half their extent drawn)
    dense: tuple[int, ...]  # structures drawn on every slice of an extent of three slices or more
    single: tuple[int, ...] = ()  # structures drawn on one slice only

    @property
    def fits(self) -> bool:
        return len(self.sparse) + len(self.single) > len(self.dense)


def drawn_slices(presence: np.ndarray) -> np.ndarray:
    """The slice indices where a structure is drawn, from its per-slice presence vector."""
    return np.flatnonzero(presence)


def is_sparse(slices: Sequence[int]) -> bool:
    """Drawn slices that leave gaps and cover at most about half of their extent (module docstring)."""
    if len(slices) < 2:
        return False
    extent = int(slices[-1]) - int(slices[0]) + 1
    return len(slices) < extent and 2 * len(slices) <= extent + 1


def is_dense(slices: Sequence[int]) -> bool:
    """Drawn on every slice of an extent of three slices or more: nothing between them to fill or check."""
    return len(slices) >= 3 and int(slices[-1]) - int(slices[0]) + 1 == len(slices)


def presence(label: np.ndarray, classes: Sequence[int]) -> list[dict[int, np.ndarray]]:
    """Per axis, ``{structure: bool vector of the slices holding it}`` (one pass over the label per axis)."""
    values, inverse = np.unique(np.asarray(label), return_inverse=True)
    inverse = inverse.reshape(np.shape(label))
    column = {int(v): i for i, v in enumerate(values)}
    out = []
    for axis in range(3):
        moved = np.moveaxis(inverse, axis, 0).reshape(inverse.shape[axis], -1)
        held = np.zeros((moved.shape[0], len(values)), dtype=bool)
        for z in range(moved.shape[0]):
            held[z] = np.bincount(moved[z], minlength=len(values)) > 0
        out.append({c: held[:, column[c]] if c in column else np.zeros(moved.shape[0], bool) for c in classes})
    return out


def read_axes(label: np.ndarray, classes: Sequence[int]) -> list[AxisReading]:
    """One :class:`AxisReading` per axis of the (canonical) label."""
    readings = []
    for axis, per_class in enumerate(presence(label, classes)):
        slices = {c: drawn_slices(v) for c, v in per_class.items()}
        readings.append(AxisReading(axis, tuple(c for c in classes if is_sparse(slices[c])),
                                    tuple(c for c in classes if is_dense(slices[c])),
                                    tuple(c for c in classes if len(slices[c]) == 1)))
    return readings


def drawing_axis(label: np.ndarray, classes: Sequence[int]) -> int | None:
    """The axis the label was drawn along (its drawn slices leave gaps), or None: dense along every axis."""
    fitting = [r for r in read_axes(label, classes) if r.fits]
    if not fitting:
        return None
    return max(fitting, key=lambda r: (r.axis == AXIS_PREFERENCE[0], len(r.sparse),
                                       -AXIS_PREFERENCE.index(r.axis))).axis
