"""The switch: does a model follow the object its support marks, and by how much does it beat copying?

Three look-alike objects (one shape class, one intensity distribution; ``icl.data.lookalike``) in one scan; each in
turn is marked on every ``every``-th slice and the scan is filled from that sparse label. Same image, only the
support differs, so Dice(marked) high and Dice(others) low means the support was read. Nearest-annotated-slice copy
is scored on the same tasks: it follows the marked object by construction, so a model is worth its cost only by
its margin over copying. One loop for ``bench/icl_switch.py`` and the default model's test.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import nibabel as nib
import numpy as np

from bench.baselines import nearest_copy
from icl.data.lookalike import make_task
from icl.sparse.methods import INTERPOLATION
from icl.sparse.methods import NEAREST as NEAREST_FILL
from icl.sparse.protocol import sparse_dice, sparse_label

MODEL, NEAREST = "model", "nearest annotated slice"


def switch_scores(seg: Any, work: Path, seeds: Iterable[int], size: int, depth: int,
                  every: int = 4) -> dict[str, dict[str, float]]:
    """``{method: {"marked", "others", "n"}}``: mean Dice of each fill with the marked object and with the other
    look-alikes, on the slices not given as support, for ``seg`` (an ``ICLSegmenter`` in labelled mode) and for
    nearest-slice copy of the same sparse labels."""
    scores: dict[str, dict[str, list[float]]] = {m: {"marked": [], "others": []} for m in (MODEL, NEAREST)}
    for i, seed in enumerate(seeds):
        task = make_task(seed, "sparse", size=size, depth=depth, k=3, same_prob=1.0, every=every)
        image = _save(np.transpose(task["volume"], (1, 2, 0)), work / f"switch{i}.nii.gz")
        masks = (np.transpose(task["masks"], (0, 2, 3, 1)) > 0).astype(np.uint8)  # [K, H, W, Z]
        for j in range(len(masks)):
            sparse, kept = sparse_label(masks[j], every)
            label = _save(sparse, work / f"switch{i}_{j}.nii.gz")
            fills = {MODEL: seg.segment(image, image, label).labels > 0, NEAREST: nearest_copy(sparse) > 0}
            for method, pred in fills.items():
                dice = [sparse_dice(pred.astype(np.uint8), masks[o], [1], {1: kept})[1] for o in range(len(masks))]
                scores[method]["marked"].append(dice[j])
                scores[method]["others"] += [d for o, d in enumerate(dice) if o != j]
    return {m: {"marked": float(np.nanmean(s["marked"])), "others": float(np.nanmean(s["others"])),
                "n": len(s["marked"])} for m, s in scores.items()}


def _save(arr: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    return path


ENGINE_FILLS = (MODEL, INTERPOLATION, NEAREST_FILL)  # the engine's --fill names


def anatomy_scores(seg: Any, work: Path, seeds: Iterable[int], size: int = 128, depth: int = 24,
                   every: int = 4) -> dict[str, float]:
    """``{fill: mean Dice}`` on generated anatomy-like volumes (``icl.data.anatomy_tasks``, per-structure sparse
    annotation every ``every`` slices, one target at a time, drawn on its own slices only), for the engine's
    model, interpolation and nearest fills through ``seg`` (an ``ICLSegmenter`` in labelled mode), scored on the
    slices the target was not drawn on."""
    from icl.data.anatomy_tasks import make_anatomy_task

    scores: dict[str, list[float]] = {m: [] for m in ENGINE_FILLS}
    chosen = seg.fill
    try:
        for i, seed in enumerate(seeds):
            task = make_anatomy_task(seed, "anat_sparse", size=size, depth=depth, k=1, style="per_structure",
                                     every=every)
            image = _save(np.transpose(task["frames"], (1, 2, 0)).astype(np.float32), work / f"anat{i}.nii.gz")
            truth = np.transpose(task["targets"][0], (1, 2, 0)).astype(np.uint8)
            kept = sorted(task["prompts"][0])
            sparse = np.zeros_like(truth)
            sparse[..., kept] = truth[..., kept]
            label = _save(sparse, work / f"anat{i}_label.nii.gz")
            for fill in ENGINE_FILLS:
                seg.fill = fill
                pred = (seg.segment(image, image, label).labels > 0).astype(np.uint8)
                scores[fill].append(sparse_dice(pred, truth, [1], {1: kept})[1])
    finally:
        seg.fill = chosen
    return {m: float(np.nanmean(s)) for m, s in scores.items()}
