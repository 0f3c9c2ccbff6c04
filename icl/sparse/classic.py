"""The classic fills of a sparse annotation, built into the engine: nearest-slice copy and shape-based interpolation.

Why in the engine: a user must never get a fill worse than what 3D Slicer's "Fill between slices" would give
them, and the self-check (:mod:`icl.sparse.fill`) needs them as candidates beside the model.

Both work per structure, from that structure's own annotated slices only (:class:`~icl.sparse.annotation.
Annotation`), and give a *signed score* per slice: positive inside, in voxels (a signed distance map), so that
structures filled by different methods meet by "highest score wins" as the model's logits do.

* ``nearest``: every slice within the structure's extent takes the nearest annotated slice's mask (ties: the
  lower slice).
* ``interpolation``: shape-based interpolation (Raya & Udupa 1990; Herman et al. 1992): the signed distance maps
  (``scipy.ndimage.distance_transform_edt``) of two consecutive annotated slices blended linearly by the distance
  to each, after both are moved to the interpolated centroid (a structure that drifts across slices keeps its
  size instead of shrinking to the overlap — the alignment step ITK's morphological contour interpolation has too).
  Beyond the outermost annotated slices (within the annotation's reach rule) the outermost map is kept and shrinks
  as structures taper toward their ends: at the end of the reach it has lost ``TAPER`` of its inscribed radius.

Scores are computed on demand for one slice at a time inside the structure's in-plane box, so memory is one
distance map per annotated slice and structure, cropped.
"""
from __future__ import annotations

import bisect
from collections.abc import Mapping

import numpy as np
from scipy.ndimage import center_of_mass, distance_transform_edt
from scipy.ndimage import shift as nd_shift

from icl.sparse.annotation import Annotation
from icl.sparse.methods import INTERPOLATION, NEAREST, SHAPE_FILLS

BOX_MARGIN = 2  # voxels around the drawn masks (plus the alignment's shift): where a classic fill can reach
TAPER = 0.5  # beyond the outermost slice: the fraction of its inscribed radius lost at the end of the reach


def nearest_annotated(annotated: list[int], z: int) -> int:
    """THE nearest-slice rule: the annotated slice (sorted list) closest to ``z``; ties go to the lower slice."""
    i = bisect.bisect_left(annotated, z)
    if i == len(annotated):
        return annotated[-1]
    if i == 0 or annotated[i] == z:
        return annotated[i]
    below, above = annotated[i - 1], annotated[i]
    return below if z - below <= above - z else above


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Signed distance map of a 2D mask in voxels: > 0 inside (distance to the outside), <= 0 outside."""
    mask = mask.astype(bool)
    return (distance_transform_edt(mask) - distance_transform_edt(~mask)).astype(np.float32)


Box = tuple[int, int, int, int]  # in-plane y0, y1, x0, x1 (end exclusive)
Score = tuple[Box, np.ndarray]  # (in-plane box; signed score inside it)


class BoxedFill:
    """What every fill of drawn masks shares (the shape fills here, registration in ``slice_registration``): each
    structure scored in its own in-plane box, the drawn masks' signed distance maps computed once, and the
    full-plane mask of a score. Subclasses give :meth:`score`."""

    def __init__(self, annotation: Annotation, boxes: Mapping[int, Box | None]):
        self.annotation = annotation
        self._boxes = dict(boxes)
        self._extents = {c: annotation.extent(c) for c in annotation.classes}
        self._sdf: dict[tuple[int, int], np.ndarray] = {}

    def _distance(self, c: int, z: int) -> np.ndarray:
        """Drawn slice ``z``'s signed distance map of ``c``, in ``c``'s box."""
        key = (c, z)
        if key not in self._sdf:
            y0, y1, x0, x1 = self._boxes[c]
            self._sdf[key] = signed_distance(self.annotation.mask(c, z)[y0:y1, x0:x1])
        return self._sdf[key]

    def score(self, c: int, z: int) -> Score | None:
        raise NotImplementedError

    def mask(self, c: int, z: int) -> np.ndarray:
        """Structure ``c`` on slice ``z`` as a full-plane bool mask (what the self-check scores)."""
        return place(self.score(c, z), self.annotation.in_plane_shape)


class ClassicFill(BoxedFill):
    """One classic fill of one annotation; :meth:`score` gives structure ``c``'s signed score on slice ``z``."""

    def __init__(self, annotation: Annotation, method: str, align: bool = True, taper: float = TAPER):
        """``align=False, taper=0`` is the plain shape-based interpolation (a benchmark baseline)."""
        if method not in SHAPE_FILLS:
            raise ValueError(f"a shape fill must be one of {SHAPE_FILLS}, got {method!r}")
        super().__init__(annotation, {c: annotation.box(c, BOX_MARGIN) for c in annotation.classes})
        self.method, self.align, self.taper = method, align, taper
        self._centroids: dict[tuple[int, int], np.ndarray] = {}

    def score(self, c: int, z: int) -> Score | None:
        """Structure ``c`` on slice ``z`` (None where this fill says it is absent)."""
        extent = self._extents.get(c)
        if extent is None or not extent[0] <= z <= extent[1]:
            return None
        drawn = self.annotation.slices[c]
        i = bisect.bisect_left(drawn, z)
        if i < len(drawn) and drawn[i] == z:
            return self._boxes[c], self._distance(c, z)
        below = drawn[i - 1] if i > 0 else None
        above = drawn[i] if i < len(drawn) else None
        if below is None or above is None:  # beyond the outermost annotated slices: within reach
            outer = above if below is None else below
            sdf = self._distance(c, outer)
            if self.method == INTERPOLATION and self.taper:
                reach = self.annotation.reach(c) or 0
                sdf = sdf - self.taper * abs(z - outer) / (reach + 1) * max(float(sdf.max()), 0.0)
            return self._boxes[c], sdf
        if self.method == NEAREST:
            return self._boxes[c], self._distance(c, nearest_annotated(drawn, z))
        t = (z - below) / (above - below)
        a, b = self._distance(c, below), self._distance(c, above)
        if self.align:
            ca, cb = self._centroid(c, below), self._centroid(c, above)
            target = (1 - t) * ca + t * cb  # both maps moved to where the structure's centre is at z, then blended
            a = nd_shift(a, target - ca, order=1, mode="nearest")
            b = nd_shift(b, target - cb, order=1, mode="nearest")
        return self._boxes[c], (1 - t) * a + t * b

    def _centroid(self, c: int, z: int) -> np.ndarray:
        key = (c, z)
        if key not in self._centroids:  # every interpolated slice between two annotated ones reads the same two
            self._centroids[key] = np.array(center_of_mass(self._distance(c, z) > 0))
        return self._centroids[key]

def place(score: Score | None, shape: tuple[int, int]) -> np.ndarray:
    """A boxed signed score → a full-plane bool mask (score > 0)."""
    out = np.zeros(shape, bool)
    if score is not None:
        (y0, y1, x0, x1), values = score
        out[y0:y1, x0:x1] = values > 0
    return out
