"""Training tasks with a mask prior (``-mask_prior P``): a both-ways task seen the way the sparse fill runs it, a
cross-scan task the way the cross-scan road runs it (the registered labels of the support scan as the prior).

Why: at inference a model trained this way fills a sparse annotation in a square crop around the annotated
structures with the classic interpolation as its dense mask prompt (``icl.sparse.model_fill``); a structure 15
voxels across is 3 cells of the 32 x 32 mask grid on a whole 128 px slice and 3-4 times more in the crop (measured
ceiling of a perfect copy on real MR, every 6th slice: 0.54-0.73 Dice whole-slice vs 0.78-0.85 in the crop). So
training shows the same: the task cut to the square box around its prompts (``square_box``, the fill's own
rule), resized to the model's size, and the interpolation of its prompts (``icl.sparse.prior``) on the tracked
slices. The loss and everything else are the task's own.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from scipy import ndimage

from icl.data.frames import resize_slices
from icl.engine.train.tasks import Task
from icl.sparse.model_fill import square_box
from icl.sparse.prior import annotation_from_prompts, classic_priors


def _as_annotation(prompts: dict, depth: int, shape: tuple[int, int], complete: bool):
    return annotation_from_prompts({k: {z: np.asarray(m) for z, m in per.items()} for k, per in prompts.items()},
                                   (depth, *shape), complete)


def with_mask_prior(task: Task, size: int) -> Task:
    """``task`` (both ways) cropped like the sparse fill and given the interpolation prior of its prompts (a task
    already cut to the fill's box, ``task.cropped``, only gets the prior)."""
    if task.direction != "both":
        return task
    shape = tuple(task.frames.shape[1:])
    complete = any(not bool(m.any()) for per in task.prompts.values() for m in per.values())
    if task.cropped:
        priors = classic_priors(_as_annotation(task.prompts, len(task.frames), shape, complete),
                                list(range(1, len(task.prompts) + 1)))
        return replace(task, priors={c - 1: {z: torch.from_numpy(m) for z, m in per.items()}
                                     for c, per in priors.items()})
    drawn = _as_annotation(task.prompts, len(task.frames), shape, complete)
    boxes = [b for c in drawn.classes if (b := drawn.box(c, 0)) is not None]  # the fill's box rule (ModelFill.box)
    if not boxes:
        return task
    y0, y1, x0, x1 = square_box(boxes, shape)
    out = (size, size)

    def cut(x: torch.Tensor, mode: str) -> torch.Tensor:
        lead = x.shape[:-2]
        flat = x.reshape(-1, *x.shape[-2:])[:, y0:y1, x0:x1]
        return resize_slices(flat, out, mode).float().reshape(*lead, *out)

    prompts = {k: {z: cut(m[None], "label")[0] for z, m in per.items()} for k, per in task.prompts.items()}
    annotation = _as_annotation(prompts, len(task.frames), out, complete)
    priors = classic_priors(annotation, annotation.classes)
    return Task(cut(task.frames, "image").clamp(0, 1), prompts, task.direction, cut(task.targets, "label"),
                task.scored, task.kind, task.name, task.class_ids,
                None if task.distractors is None else cut(task.distractors, "label"), None,
                {c - 1: {z: torch.from_numpy(m) for z, m in per.items()} for c, per in priors.items()})


CROSS = "anat_cross"  # the anatomy level whose support slices come from another scan (icl.data.anatomy_tasks)
CROSS_LEVELS = (CROSS, "real_cross")  # every level whose support comes from another scan (real: icl.data.real_tasks)
#: Simulated residual misregistration of a registered prior, as fractions of the slice size (the task's pixels
#: vary with -image_size): a global in-plane shift of up to SHIFT and a smooth random displacement of about SMOOTH
#: at the scale SMOOTH_SCALE: the boundary errors of a deformable registration of another patient (a voxel or two
#: at 128 px; the registered labels scored 0.87-0.91 Dice on real MR in bench/cross_scan.py).
SHIFT, SMOOTH, SMOOTH_SCALE = 0.015, 0.01, 0.06


def misregistered(masks: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """``masks`` [K, Z, H, W] moved by one smooth random 3D displacement (the same for every structure, as a
    registration's error is): the registered labels of another scan as the model would see them."""
    shape = masks.shape[1:]
    size = float(max(shape[1:]))
    grid = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    coords = []
    for axis, g in enumerate(grid):
        if axis == 0:  # across slices: registration errs in plane and across, but slices are thick; keep z exact
            coords.append(g)
            continue
        field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), SMOOTH_SCALE * size,
                                        mode="reflect")
        field *= SMOOTH * size / max(float(field.std()), 1e-6)
        coords.append(g + float(rng.uniform(-SHIFT, SHIFT)) * size + field)
    out = [ndimage.map_coordinates(m.float().numpy(), coords, order=1, mode="constant") >= 0.5 for m in masks]
    return torch.from_numpy(np.stack(out).astype(np.float32)) if out else masks.clone()


def with_registered_prior(task: Task, rng: np.random.Generator) -> Task:
    """A cross-scan task given what the cross-scan road gives the model (``--fill model``, support from another
    scan): the query's true labels, misregistered (:func:`misregistered`), as the prior of every query slice."""
    query = list(task.scored)
    moved = misregistered(task.targets[:, query], rng)
    priors = {k: {z: moved[k, i] for i, z in enumerate(query)} for k in range(len(task.targets))}
    return replace(task, priors=priors)


class PriorTasks(torch.utils.data.Dataset):
    """A training task set whose both-ways tasks get the mask prior with probability ``p`` (seeded per epoch and
    index, so a resumed run sees the same tasks); the rest stay as they are, so the model keeps working without."""

    def __init__(self, tasks: torch.utils.data.Dataset, p: float, size: int, seed: int = 0):
        self.tasks, self.p, self.size, self.seed, self.epoch = tasks, float(p), int(size), int(seed), 1

    def __len__(self) -> int:
        return len(self.tasks)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.tasks, "set_epoch"):
            self.tasks.set_epoch(epoch)

    def __getitem__(self, index: int) -> Task:
        task = self.tasks[index]
        rng = np.random.default_rng([self.seed, self.epoch, index, 13])
        if rng.random() >= self.p:
            return task
        if task.direction == "both":
            return with_mask_prior(task, self.size)
        return with_registered_prior(task, rng) if task.kind in CROSS_LEVELS else task
