"""The model's mask prior on a sparse annotation: a classic fill of each structure, slice by slice.

Why: a model trained with ``-mask_prior`` (``icl.engine.train.loop.prior_tasks``) reads, on every slice it tracks
between and just beyond a structure's annotated slices, a classic fill of that structure as SAM2's dense mask prompt
(``sam2_ext.priors``) and learns to correct it. Training computes it here with the shape-based interpolation; the
sparse fill hands each structure's best classic fill of its self-check (``icl.sparse.fill``; the interpolation when
none is given). Either way from the annotation's own slices only, within the annotation's reach rule, cut to the
model's in-plane box.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from icl.sparse.annotation import COMPLETE, PER_STRUCTURE, Annotation
from icl.sparse.classic import ClassicFill, place
from icl.sparse.methods import INTERPOLATION
from sam2_ext.priors import prior_input


class Fill(Protocol):
    """A classic fill of an annotation (``icl.sparse.classic``, ``icl.sparse.slice_registration``)."""
    annotation: Annotation

    def score(self, c: int, z: int) -> Any: ...


def classic_priors(annotation: Annotation, classes: list[int], box: tuple[int, int, int, int] | None = None,
                   size: int | None = None, fills: Mapping[int, Fill] | None = None) -> dict[int, dict[int, Any]]:
    """``{class: {slice: bool mask [h, w] inside box}}`` on every slice of each class's extent that is not
    annotated for it (an empty mask where the fill says the structure is not there). With ``size`` each mask comes
    already as the model's mask input (float [size, size], ``sam2_ext.priors.prior_input``), so a long scan never
    holds its full-resolution priors at once. ``fills``: ``{class: its prior's fill}`` of ``annotation`` (default:
    the interpolation for every class; a caller that keeps them has their distance maps computed once)."""
    interpolation = None
    out: dict[int, dict[int, np.ndarray]] = {}
    for c in classes:
        fill = (fills or {}).get(c)
        if fill is None:
            interpolation = interpolation or ClassicFill(annotation, INTERPOLATION)
            fill = interpolation
        extent = annotation.extent(c)
        if extent is None:
            continue
        drawn = set(annotation.slices[c])
        per: dict[int, np.ndarray] = {}
        for z in range(extent[0], extent[1] + 1):
            if z in drawn:
                continue
            mask = classic_prior(fill, c, z, box)
            per[z] = mask if size is None else prior_input(mask, size, "cpu")[0, 0]
        out[c] = per
    return out


def classic_prior(fill: Fill, c: int, z: int, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """One slice of :func:`classic_priors` at the scan's resolution: bool [h, w] inside ``box``. The sparse
    fill reads it slice by slice for weights whose residual is read at the output's resolution (sam2_ext.priors)."""
    h, w = fill.annotation.in_plane_shape
    y0, y1, x0, x1 = box if box is not None else (0, h, 0, w)
    return place(fill.score(c, z), (h, w))[y0:y1, x0:x1]


def annotation_from_prompts(prompts: Mapping[int, Mapping[int, np.ndarray]], shape: tuple[int, int, int],
                            complete: bool) -> Annotation:
    """The :class:`Annotation` a training task's prompts stand for (``{object: {slice: mask}}``; empty masks are
    "annotated without it"): object ``k`` is label ``k + 1``."""
    labels = np.zeros(shape, np.int32)
    slices: dict[int, list[int]] = {}
    absent: dict[int, list[int]] = {}
    for k, per in prompts.items():
        c = int(k) + 1
        slices[c], absent[c] = [], []
        for z, mask in sorted(per.items()):
            mask = np.asarray(mask) > 0.5
            if mask.any():
                labels[int(z)][mask] = c
                slices[c].append(int(z))
            else:
                absent[c].append(int(z))
    classes = sorted(slices)
    style = COMPLETE if complete else PER_STRUCTURE
    return Annotation(labels, classes, style, slices, absent if complete else {})
