"""In-context tasks on real labelled volumes (levels ``real_sparse``, ``real_adjacent``, ``real_far``,
``real_cross``): the anatomy generator's task kinds (``icl.data.anatomy_tasks.task_from_scans``) on slabs of real
scans.

A task: one volume of the bank, one variant (``icl.data.real_volumes``), one of the three canonical axes, an anchor
structure drawn uniformly among the kept ones, a slab of ``depth`` slices along the axis over its extent, and a
neighbourhood around it of a random reach (half, one or two of its own size beyond its box), so that targets are
the anchor and its neighbours, alone or together, near or apart. Structures not wholly inside the neighbourhood
are background for the task (never a target cut at a border). ``real_cross`` takes the support slices from the
other variant of the same contrast group (warped, its own bias and gamma: another subject registered onto the
query's grid, as the cross-scan road gives it) at the same places.

Frames stay at the scan's in-plane resolution, whole slices: cropping like the fill and resizing is the engine's
(``icl.engine.train.real_tasks``), which knows the fill's box rule. The task dict is the anatomy generator's plus
``volume``, ``axis``, ``variants`` (query, support), ``sources`` ((variant, slice of the volume) of every frame)
and ``values`` (the targets' original label values).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from icl.data.anatomy_tasks import task_from_scans
from icl.data.real_volumes import RealVolume
from icl.data.vocabulary import ANATOMY_LEVELS, REAL_LEVELS

REACH = (0.5, 1.0, 2.0)  # neighbourhood beyond the anchor's box, in units of its larger in-plane side
MIN_REACH = 8  # voxels


def _extent(box: tuple[slice, slice, slice], axis: int) -> tuple[int, int, tuple[int, int, int, int]]:
    """(first, last) slice along ``axis`` and the in-plane box (y0, y1, x0, x1) of a find_objects box."""
    plane = [box[a] for a in range(3) if a != axis]
    return box[axis].start, box[axis].stop - 1, (plane[0].start, plane[0].stop, plane[1].start, plane[1].stop)


def _slab(rng: np.random.Generator, first: int, last: int, depth: int, size: int) -> range:
    """``depth`` consecutive slices of ``size`` over the extent first..last: all of it when it fits (at a random
    offset, so its ends fall anywhere in the slab), else a random window that keeps at least part of it."""
    depth = min(depth, size)
    if last - first + 1 <= depth:
        lo, hi = last - depth + 1, first
    else:
        lo, hi = first - depth // 4, last - (3 * depth) // 4
    lo, hi = max(lo, 0), min(hi, size - depth)
    start = int(rng.integers(lo, hi + 1)) if hi >= lo else max(0, min(first, size - depth))
    return range(start, start + depth)


def _neighbourhood(rng: np.random.Generator, plane: tuple[int, int, int, int], shape: tuple[int, int]
                   ) -> tuple[int, int, int, int]:
    y0, y1, x0, x1 = plane
    reach = max(int(round(float(rng.choice(REACH)) * max(y1 - y0, x1 - x0))), MIN_REACH)
    return max(y0 - reach, 0), min(y1 + reach, shape[0]), max(x0 - reach, 0), min(x1 + reach, shape[1])


def _inside(boxes: list, axis: int, window: tuple[int, int, int, int], slab: range) -> list[int]:
    """Compact ids whose box lies wholly inside the in-plane ``window`` and meets the slab."""
    wy0, wy1, wx0, wx1 = window
    out = []
    for i, box in enumerate(boxes, start=1):
        if box is None:
            continue
        first, last, (y0, y1, x0, x1) = _extent(box, axis)
        if last >= slab.start and first < slab.stop and y0 >= wy0 and y1 <= wy1 and x0 >= wx0 and x1 <= wx1:
            out.append(i)
    return out


def _cut(variant, axis: int, slab: range, lut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels as task ids, image) of ``slab`` along ``axis``: [Z, H, W] copies."""
    labels = np.moveaxis(variant.labels, axis, 0)[slab.start:slab.stop]
    image = np.moveaxis(variant.image, axis, 0)[slab.start:slab.stop]
    return lut[labels], np.ascontiguousarray(image, dtype=np.float32)


def make_real_task(volumes: Sequence[RealVolume], seed: int, level: str = "real_sparse", depth: int = 12,
                   k: int | None = None, style: str | None = None, every: int | None = None,
                   num_support: int | None = None, axis: int | None = None) -> dict:
    """One seeded task of ``level`` on ``volumes`` (module docstring); same arguments -> same arrays."""
    if level not in REAL_LEVELS:
        raise ValueError(f"unknown real-volume level {level!r}; choose from {', '.join(REAL_LEVELS)}")
    anatomy_level = ANATOMY_LEVELS[REAL_LEVELS.index(level)]
    rng = np.random.default_rng([int(seed), REAL_LEVELS.index(level), int(depth), 31])
    for _ in range(20):  # a draw without a usable target (a structure too thin along the axis) is drawn again
        task = _attempt(rng, volumes, level, anatomy_level, depth, k, style, every, num_support, axis)
        if task is not None:
            return task
    raise RuntimeError(f"no usable {level} task for seed {seed} with {depth} slices")


def _attempt(rng, volumes, level, anatomy_level, depth, k, style, every, num_support, axis) -> dict | None:
    v = int(rng.integers(len(volumes)))
    volume = volumes[v]
    group = int(rng.integers(len(volume.variants) // 2))
    first_view = int(rng.integers(2))
    query = 2 * group + first_view
    support = 2 * group + 1 - first_view
    ax = int(rng.integers(3)) if axis is None else int(axis)
    variant = volume.variants[query]
    anchor = int(rng.integers(1, volume.structures + 1))
    box = variant.boxes[anchor - 1]
    if box is None:
        return None
    first, last, plane = _extent(box, ax)
    size = variant.labels.shape[ax]
    shape = tuple(s for a, s in enumerate(variant.labels.shape) if a != ax)
    slab = _slab(rng, first, last, depth, size)
    window = _neighbourhood(rng, plane, shape)
    kept = _inside(variant.boxes, ax, window, slab)
    if anchor not in kept:
        return None
    lut = np.zeros(volume.structures + 1, np.int32)
    lut[kept] = np.arange(1, len(kept) + 1)
    scans = [_cut(variant, ax, slab, lut)]
    if level == "real_cross":
        scans.append(_cut(volume.variants[support], ax, slab, lut))
    task = task_from_scans(rng, anatomy_level, scans, len(kept), int(k or rng.integers(1, 4)), style, every,
                           num_support)
    if task is None:
        return None
    which = (query, support)
    task["level"] = level
    task["sources"] = [(which[scan], slab.start + z) for scan, z in task.pop("slices")]
    task["values"] = [int(volume.values[kept[t - 1]]) for t in task["structures"]]
    task.update(volume=v, axis=ax, variants=which if level == "real_cross" else (query,))
    return task
