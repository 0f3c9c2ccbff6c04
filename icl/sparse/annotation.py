"""What a sparsely annotated label map says about each structure: the two annotation conventions, in one place.

Why its own module: every fill (the model, nearest-slice copy, shape-based interpolation), the self-check and the
write-back must read an annotation the same way.

* **per structure** (the default; 3D Slicer / ITK-SNAP, one structure at a time): structure ``c`` is annotated on
  exactly the slices where ``c`` appears. A slice that carries other labels but not ``c`` says nothing about ``c``.
  Example: ``c = 3`` drawn on slices 10, 16, 22 and ``c = 5`` on 12, 18 — structure 3 is filled on every slice
  (11–15, 17–21, 12 and 18 included), structure 5 too (10, 16 and 22 included); no drawn voxel is overwritten.
* **complete slices** (opt-in, ``complete=True``): every slice that carries any label is annotated for every
  requested structure; a structure absent there is absent on that slice, and its tracking ends there.

Beyond a structure's outermost annotated slices nothing can be checked against the annotation, so every fill has
one rule there (:meth:`Annotation.reach`): a structure extends at most **half its annotation spacing** (the median
gap between its consecutive annotated slices, rounded down) beyond its first and last annotated slice — what the
annotator's own sampling implies when slices are drawn evenly across a structure. The model's object score may end
it earlier. A structure annotated on one slice only takes the median spacing of the others; when no structure has
two annotated slices the spacing is unknown: classic fills keep the annotated slice alone and the model is not
bounded (a warning says so).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from icl.sparse.drawing import is_dense

PER_STRUCTURE = "per_structure"
COMPLETE = "complete"


def _slices_with(zhw: np.ndarray, value: int) -> list[int]:
    return [int(z) for z in np.flatnonzero((zhw == value).reshape(zhw.shape[0], -1).any(1))]


def _median_gap(slices: list[int]) -> int | None:
    return int(np.median(np.diff(slices))) if len(slices) >= 2 else None


@dataclass
class Annotation:
    """Per structure: the slices it is drawn on and the slices annotated without it, along the slice axis.

    ``label_zhw`` is the label map with the slice axis first (a view of the canonical array, never copied).
    """

    label_zhw: np.ndarray
    classes: list[int]
    style: str
    slices: dict[int, list[int]]  # c -> sorted slices where c is drawn
    absent: dict[int, list[int]] = field(default_factory=dict)  # c -> slices annotated without c (complete style)

    @classmethod
    def from_label(cls, label: np.ndarray, slice_axis: int, classes: list[int], complete: bool = False
                   ) -> "Annotation":
        """Read ``label`` (canonical orientation) with the per-structure convention, or complete slices."""
        zhw = np.moveaxis(label, slice_axis, 0)
        drawn = {c: _slices_with(zhw, c) for c in classes}
        if not complete:
            return cls(zhw, list(classes), PER_STRUCTURE, drawn)
        labelled = [int(z) for z in np.flatnonzero(zhw.reshape(zhw.shape[0], -1).any(1))]
        absent = {c: sorted(set(labelled) - set(drawn[c])) for c in classes}
        return cls(zhw, list(classes), COMPLETE, drawn, absent)

    # ------------------------------------------------------------------------------------------ geometry
    @property
    def depth(self) -> int:
        return int(self.label_zhw.shape[0])

    @property
    def in_plane_shape(self) -> tuple[int, int]:
        return int(self.label_zhw.shape[1]), int(self.label_zhw.shape[2])

    def annotated(self) -> list[int]:
        """Every slice annotated for some structure (sorted)."""
        return sorted({z for c in self.classes for z in self.slices[c]} |
                      {z for c in self.classes for z in self.absent.get(c, ())})

    def dense(self, c: int) -> bool:
        """``c`` is drawn on every slice of its extent (three or more): nothing between its slices to fill."""
        return is_dense(self.slices[c])

    def annotated_for(self, c: int) -> int:
        """How many slices are annotated for ``c``: drawn, or (complete slices) annotated without it."""
        return len(self.slices[c]) + len(self.absent.get(c, ()))

    def mask(self, c: int, z: int) -> np.ndarray:
        """Structure ``c``'s drawn mask on slice ``z`` (bool [H, W])."""
        return self.label_zhw[z] == c

    def spacing(self, c: int) -> int | None:
        """The median gap between ``c``'s annotated slices; one slice: the median of the other structures'."""
        own = _median_gap(self.slices[c])
        if own is not None:
            return own
        others = [g for d in self.classes if d != c and (g := _median_gap(self.slices[d])) is not None]
        return int(np.median(others)) if others else None

    def reach(self, c: int) -> int | None:
        """How far ``c`` may extend beyond its outermost annotated slices (None: unknown, not bounded)."""
        spacing = self.spacing(c)
        return None if spacing is None else spacing // 2

    def extent(self, c: int) -> tuple[int, int] | None:
        """The slices ``c`` may be filled on: its outermost annotated slices widened by :meth:`reach` (0 when
        unknown), never across a slice annotated without it; None when ``c`` is drawn nowhere."""
        if not self.slices[c]:
            return None
        first, last = self.slices[c][0], self.slices[c][-1]
        reach = self.reach(c) or 0
        lo, hi = max(first - reach, 0), min(last + reach, self.depth - 1)
        for z in self.absent.get(c, ()):
            if z < first:
                lo = max(lo, z + 1)
            elif z > last:
                hi = min(hi, z - 1)
        return lo, hi

    def stops(self, c: int) -> list[int]:
        """The slices where the propagation rule must end ``c`` (slices it reads as "annotated without it"):
        the complete style's absent slices, and the reach bound's first slice beyond each end."""
        out = set(self.absent.get(c, ()))
        reach = self.reach(c)
        if reach is not None and self.slices[c]:
            first, last = self.slices[c][0], self.slices[c][-1]
            out.update(z for z in (first - reach - 1, last + reach + 1) if 0 <= z < self.depth)
        return sorted(out)

    def box(self, c: int, margin: int) -> tuple[int, int, int, int] | None:
        """``c``'s in-plane bounding box over its annotated slices, widened by ``margin`` (y0, y1, x0, x1; end
        exclusive), or None when it is drawn nowhere."""
        if not self.slices[c]:
            return None
        drawn = (self.label_zhw[self.slices[c]] == c).any(0)
        ys, xs = np.flatnonzero(drawn.any(1)), np.flatnonzero(drawn.any(0))
        h, w = self.in_plane_shape
        return (max(int(ys[0]) - margin, 0), min(int(ys[-1]) + 1 + margin, h),
                max(int(xs[0]) - margin, 0), min(int(xs[-1]) + 1 + margin, w))

    # ------------------------------------------------------------------------------------------ write-back
    def written_back(self, z: int) -> tuple[np.ndarray, np.ndarray] | None:
        """What slice ``z`` keeps as given: (where, values). Per structure, the voxels drawn as a requested
        structure; complete slices, the whole slice (requested structures kept, the rest background)."""
        if self.style == COMPLETE:
            if not any(z in self.slices[c] or z in self.absent[c] for c in self.classes):
                return None
            given = self.label_zhw[z]
            return np.ones(given.shape, bool), np.where(np.isin(given, self.classes), given, 0)
        drawn = [c for c in self.classes if z in self.slices[c]]
        if not drawn:
            return None
        given = self.label_zhw[z]
        where = np.isin(given, drawn)
        return where, np.where(where, given, 0)

    # ------------------------------------------------------------------------------------------ self-check
    def holdout(self) -> tuple["Annotation", dict[int, list[int]]]:
        """Every other annotated slice held out: (the annotation without them, {c: slices to score c on}).

        Per structure: ``c``'s slices 1, 3, 5, … of its own, when it has at least three. Complete slices: every
        other annotated slice of the scan, for every structure drawn on at least one kept slice and one held-out
        one (its empty held-out slices count too). A structure drawn on every slice of its extent is never scored:
        holding out one of its slices would score a fill the real run never makes (:meth:`dense`). The kept
        annotation is what an annotator drawing half as many slices would have given: every rule, the reach
        included, applies to it as it is."""
        if self.style == COMPLETE:
            labelled = self.annotated()
            kept, held = set(labelled[0::2]), labelled[1::2]
            slices = {c: [z for z in self.slices[c] if z in kept] for c in self.classes}
            absent = {c: [z for z in self.absent[c] if z in kept] for c in self.classes}
            scored = {c: list(held) for c in self.classes
                      if slices[c] and set(held) & set(self.slices[c]) and not self.dense(c)}
            return Annotation(self.label_zhw, self.classes, COMPLETE, slices, absent), scored
        slices, scored = {}, {}
        for c in self.classes:
            own = self.slices[c]
            if len(own) >= 3 and not self.dense(c):
                slices[c], scored[c] = own[0::2], own[1::2]
            else:
                slices[c] = list(own)
        return Annotation(self.label_zhw, self.classes, PER_STRUCTURE, slices), scored
