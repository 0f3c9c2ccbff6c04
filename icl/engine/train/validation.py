"""Validation during training: 3D Dice of every task's objects on its scored frames, and whether the support is read.

* Clips: Dice per class (``val/dice_class_<id>``), as the seed's training reported it.
* Look-alike tasks: ``val/<level>_marked`` (each object's prediction against its own truth) and ``val/<level>_others``
  (against the look-alikes it was *not* shown). A model that segments every look-alike scores ~0.65 on both; one that
  reads its support scores high on the first and 0 on the second.
* ``val/selection_score``, what ``best.pth`` is chosen by (highest wins): the mean over the clip classes' Dice and
  every look-alike level's margin, Dice(marked) - Dice(others), which is negative for a model that follows the
  look-alikes rather than its support. Why a margin: marked Dice alone rewards segmenting every look-alike.
  ``val/dice_class_mean`` is the plain mean of the clip classes' Dice (a score, not what selects).

Dice is taken at ``out_size`` on ``logit > 0``; a pair with empty truth and empty prediction is not counted (NaN).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from icl.engine import distributed as dd
from icl.engine.train.logging import overlay
from icl.engine.train.losses import scored_logits
from icl.engine.train.schedule import CLIPS
from icl.engine.train.tasks import Task
from icl.model.dice import binary_dice as dice
from icl.model.precision import autocast
from icl.progress import progress

SELECTION = "val/selection_score"  # what best.pth is chosen by (module docstring)


def task_dice(out: dict, task: Task, size: int) -> dict[str, list[float]]:
    """``{key: [dice, ...]}`` of one task (keys ``c<class>`` for clips, ``<level>_marked/_others`` else)."""
    logits, target = scored_logits(out, task, size)
    pred, truth = logits > 0, target > 0.5  # [T, K, S, S]
    scores: dict[str, list[float]] = {}
    distractors = []  # the look-alikes nobody marked, at the same size as the truth
    if task.kind != CLIPS and task.distractors is not None and len(task.distractors):
        _, extra = scored_logits(out, Task(task.frames, {}, task.direction, task.distractors, task.scored), size)
        distractors = [extra[:, j] > 0.5 for j in range(extra.shape[1])]
    for k in range(pred.shape[1]):
        if task.kind == CLIPS:
            scores.setdefault(f"c{task.class_ids[k]}", []).append(dice(pred[:, k], truth[:, k]))
            continue
        scores.setdefault(f"{task.kind}_marked", []).append(dice(pred[:, k], truth[:, k]))
        others = [truth[:, j] for j in range(truth.shape[1]) if j != k] + distractors
        scores.setdefault(f"{task.kind}_others", []).extend(dice(pred[:, k], o) for o in others)
    return scores


@torch.no_grad()
def validate_tasks(model: Any, loader: Any, info: dd.DistInfo, device: str, amp_dtype: torch.dtype | None,
                   size: int, limit: int = 0, images: int = 0) -> tuple[dict[str, float], list]:
    """Metrics over this rank's validation tasks, reduced over ranks; plus up to ``images`` overlays."""
    sums: dict[str, float] = {}
    overlays: list[tuple[np.ndarray, str]] = []
    for i, task in enumerate(progress(loader, enabled=info.is_main, desc="validate")):
        if limit and i >= limit:
            break
        task = task.to(device)
        with autocast(device, amp_dtype):
            out = model(task)
        for key, values in task_dice(out, task, size).items():
            for v in values:
                if not math.isnan(v):
                    sums[f"{key}|sum"] = sums.get(f"{key}|sum", 0.0) + v
                    sums[f"{key}|n"] = sums.get(f"{key}|n", 0.0) + 1
        if len(overlays) < images:
            overlays.append(_overlay_of(out, task, size))
    return summarise(dd.all_reduce_sum(dd.with_all_keys(sums, info), info)), overlays


def summarise(sums: dict[str, float]) -> dict[str, float]:
    """Means per key, ``val/dice_class_mean`` and the selection score ``val/selection_score`` (module docstring)."""
    means = {key: sums[f"{key}|sum"] / sums[f"{key}|n"]
             for key in sorted({k.split("|")[0] for k in sums}) if sums.get(f"{key}|n")}
    out, classes, margins = {}, [], []
    for key, value in means.items():
        if key.startswith("c") and key[1:].isdigit():
            out[f"val/dice_class_{key[1:]}"] = value
            classes.append(value)
        else:
            out[f"val/{key}"] = value
            if key.endswith("_marked"):
                margins.append(value - means.get(key.replace("_marked", "_others"), 0.0))
    if classes:
        out["val/dice_class_mean"] = float(np.mean(classes))
    out[SELECTION] = float(np.mean(classes + margins)) if classes or margins else math.nan
    return out


def _overlay_of(out: dict, task: Task, size: int) -> tuple[np.ndarray, str]:
    """The scored frame with the most truth of the first object (prediction red, truth green)."""
    logits, target = scored_logits(out, task, size)
    t = int(target[:, 0].flatten(1).sum(1).argmax())
    frame = torch.nn.functional.interpolate(task.frames[task.scored[t]][None, None].float(), size=(size, size),
                                            mode="bilinear")[0, 0]
    pic = overlay(frame.cpu().numpy(), (logits[t, 0] > 0).float().cpu().numpy(), target[t, 0].float().cpu().numpy())
    what = f"class {task.class_ids[0]}" if task.kind == CLIPS else task.kind
    return pic, f"{task.name or task.kind} {what} frame {task.scored[t]} dice {dice(logits[:, 0] > 0, target[:, 0] > 0.5):.3f}"
