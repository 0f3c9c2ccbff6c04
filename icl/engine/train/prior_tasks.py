"""Training tasks with a mask prior (``-mask_prior P``): a both-ways task seen the way the sparse fill runs it.

Why: at inference a model trained this way fills a sparse annotation in a square crop around the annotated
structures with the classic interpolation as its dense mask prompt (``icl.sparse.model_fill``); a structure 15
voxels across is 3 cells of the 32 x 32 mask grid on a whole 128 px slice and 3-4 times more in the crop (measured
ceiling of a perfect copy on real MR, every 6th slice: 0.54-0.73 Dice whole-slice vs 0.78-0.85 in the crop). So
training shows the same: the task cut to the square box around its prompts (``square_box``, the fill's own
rule), resized to the model's size, and the interpolation of its prompts (``icl.sparse.prior``) on the tracked
slices. The loss and everything else are the task's own.
"""
from __future__ import annotations

import numpy as np
import torch

from icl.data.frames import resize_slices
from icl.engine.train.tasks import Task
from icl.sparse.model_fill import square_box
from icl.sparse.prior import annotation_from_prompts, interpolation_priors


def _as_annotation(prompts: dict, depth: int, shape: tuple[int, int], complete: bool):
    return annotation_from_prompts({k: {z: np.asarray(m) for z, m in per.items()} for k, per in prompts.items()},
                                   (depth, *shape), complete)


def with_mask_prior(task: Task, size: int) -> Task:
    """``task`` (both ways) cropped like the sparse fill and given the interpolation prior of its prompts."""
    if task.direction != "both":
        return task
    shape = tuple(task.frames.shape[1:])
    complete = any(not bool(m.any()) for per in task.prompts.values() for m in per.values())
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
    priors = interpolation_priors(annotation, annotation.classes)
    return Task(cut(task.frames, "image").clamp(0, 1), prompts, task.direction, cut(task.targets, "label"),
                task.scored, task.kind, task.name, task.class_ids,
                None if task.distractors is None else cut(task.distractors, "label"), None,
                {c - 1: {z: torch.from_numpy(m) for z, m in per.items()} for c, per in priors.items()})


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
        if task.direction == "both" and np.random.default_rng([self.seed, self.epoch, index, 13]).random() < self.p:
            return with_mask_prior(task, self.size)
        return task
