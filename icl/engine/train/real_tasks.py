"""Real-volume tasks (``icl.data.real_tasks``) as training Tasks: cut to the box the engine would run the model
in, resized to the model's size.

Why: weights trained with a mask prior run in a box around the structures (``--crop auto``), so training shows
them the same crops. Same-scan levels take the sparse fill's rule on the prompts (``ModelFill.box``: the square box
around the drawn structures' boxes, ``square_box``); ``real_cross`` the cross-scan road's (``RegisteredMemory.box``:
the registered structures on every query slice, here the query's truth, which its misregistered prior stands for).
Frames are cut from the scan's own voxels, then resized, as ``VolumeFrames(crop=box)`` does at inference.

The box is then snapped to a grid (side up to a multiple of ``2 * GRID``, centre to a multiple of ``GRID``): a few
voxels more margin, so that tasks on the same structures share their crops and the frozen encoder's outputs of a
crop are stored once and read again (``-feature_cache auto``, ``icl.engine.crop_features``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from icl.data.frames import resize_slices
from icl.data.real_tasks import make_real_task
from icl.data.real_volumes import RealVolume
from icl.engine.train.tasks import Task
from icl.sparse.model_fill import square_box

GRID = 8  # voxels: the snapping step of a crop's centre (its side snaps to twice that)
CROP_PREFIX = "real:"  # feature sources of real crops: "real:<volume key>:<variant>:<axis>:<y0>-<y1>-<x0>-<x1>"


def mask_box(masks: np.ndarray) -> tuple[int, int, int, int] | None:
    """In-plane box (y0, y1, x0, x1; end exclusive) of the union of ``masks`` [..., H, W], None when empty."""
    union = masks.reshape(-1, *masks.shape[-2:]).any(0)
    if not union.any():
        return None
    ys, xs = np.flatnonzero(union.any(1)), np.flatnonzero(union.any(0))
    return int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1


def fill_box(task: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """The box the engine runs the model in for this task (module docstring), at the scan's resolution."""
    shape = tuple(task["frames"].shape[1:])
    if task["level"] == "real_cross":
        boxes = [mask_box(np.asarray(task["targets"])[:, list(task["scored"])])]
    else:
        boxes = [mask_box(np.stack([np.asarray(m) for m in per.values()])) for per in task["prompts"].values()]
    boxes = [b for b in boxes if b is not None]
    return square_box(boxes, shape) if boxes else (0, shape[0], 0, shape[1])


def snapped(box: tuple[int, int, int, int], shape: tuple[int, int], grid: int = GRID) -> tuple[int, int, int, int]:
    """``box`` with its side rounded up to a multiple of ``2 * grid`` and its start to a multiple of ``grid`` about
    the same centre, kept inside ``shape`` (never larger than the slice)."""
    y0, y1, x0, x1 = box
    side = -(-max(y1 - y0, x1 - x0) // (2 * grid)) * 2 * grid

    def span(lo: int, hi: int, size: int) -> tuple[int, int]:
        length = min(side, size)
        start = int(round(((lo + hi) / 2 - length / 2) / grid)) * grid
        start = min(max(start, 0), size - length)
        return start, start + length

    return (*span(y0, y1, shape[0]), *span(x0, x1, shape[1]))


def crop_id(volume: RealVolume, variant: int, axis: int, box: tuple[int, int, int, int]) -> str:
    y0, y1, x0, x1 = box
    return f"{CROP_PREFIX}{volume.key}:{variant}:{axis}:{y0}-{y1}-{x0}-{x1}"


def _cut(x: np.ndarray, box: tuple[int, int, int, int], size: int, mode: str) -> torch.Tensor:
    """[..., H, W] cut to ``box`` and resized to ``size`` (frames bilinear + antialiasing, masks nearest)."""
    y0, y1, x0, x1 = box
    lead = x.shape[:-2]
    flat = np.ascontiguousarray(x.reshape(-1, *x.shape[-2:])[:, y0:y1, x0:x1])
    out = torch.from_numpy(resize_slices(flat, (size, size), mode)).float()
    return out.reshape(*lead, size, size)


def task_from_real(task: Mapping[str, Any], volumes: Sequence[RealVolume], size: int) -> Task:
    """A real-volume task dict as a Task cut to its (snapped) fill box at ``size`` px, with the feature sources of
    its frames (``cropped``: a prior is added without cutting again)."""
    frames = np.asarray(task["frames"])
    box = snapped(fill_box(task), tuple(frames.shape[1:]))
    volume = volumes[task["volume"]]
    image = _cut(frames, box, size, "image").clamp_(0.0, 1.0)
    prompts = {k: {z: _cut(np.asarray(m, np.uint8), box, size, "label") for z, m in per.items()}
               for k, per in task["prompts"].items()}
    targets = _cut(np.asarray(task["targets"], np.uint8), box, size, "label")
    distractors = _cut(np.asarray(task["distractors"], np.uint8), box, size, "label")
    sources = [(crop_id(volume, variant, task["axis"], box), int(z)) for variant, z in task["sources"]]
    return Task(image, prompts, task["direction"], targets, list(task["scored"]), task["level"],
                f"{volume.name}:axis{task['axis']}", distractors=distractors, sources=sources, cropped=True)


class RealTaskSource:
    """``source(level, seed)`` -> the Task of one ``real_*`` level on the volumes (what ``TaskMix`` and the
    validation set draw from; ``depth`` slices per slab, frames at ``size`` px)."""

    def __init__(self, volumes: Sequence[RealVolume], size: int, depth: int):
        self.volumes, self.size, self.depth = list(volumes), int(size), int(depth)

    def __call__(self, level: str, seed: int) -> Task:
        return task_from_real(make_real_task(self.volumes, seed, level, self.depth), self.volumes, self.size)
