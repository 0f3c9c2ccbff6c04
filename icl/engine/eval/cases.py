"""The cases of an evaluation (``eval_3d.py``): which are scored, which one gives the support, and their rows.

Why its own module: choosing cases and scoring them against the original label files is the data side of the
evaluation; :mod:`icl.engine.eval.evaluate` runs the model over them. The caches are training's own
(:func:`icl.engine.clips.open_training_caches`), the truth is the original NIfTI label at its own resolution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from icl.data.preprocess import CachedCase, open_cache, to_original_grid
from icl.data.sampling import load_splits, make_splits, pick_support_slices
from icl.data.validate import load_nifti_volume
from icl.engine.clips import open_training_caches
from icl.engine.distributed import DistInfo
from icl.engine.eval.metrics import MetricRows, logits_to_mask
from icl.errors import InputError
from icl.options.evaluate import EvalConfig


# ----------------------------------------------------------------------------------------------------- cases
def open_eval_cache(cfg: EvalConfig) -> tuple[list[CachedCase], dict[int, str], Path]:
    """The evaluation data as cached cases: ``(cases, label_map, cache folder)``.

    Same caches as ``train_3d.py`` (``icl.engine.clips.prepare_caches``: ``<cache_dir or cache>/<dataset>_<folder>_
    <image_size>``, preprocessed once, valid entries skipped; ``combined`` maps classes by name). A ``-cache_dir``
    that is itself a cache (holds ``index.json``) is opened as is.
    """
    if cfg.cache_dir and (Path(cfg.cache_dir) / "index.json").is_file():
        cases, label_map = open_cache(cfg.cache_dir)
        return cases, label_map, Path(cfg.cache_dir)
    if not Path(cfg.data_path).is_dir():
        raise InputError("-data_path", f"dataset folder {cfg.data_path} does not exist (see datasets/README.md)")
    cases, label_map, caches = open_training_caches(cfg, DistInfo())
    return cases, label_map, caches[0]


def _find_splits(cfg: EvalConfig, places: Sequence[Path]) -> Path | None:
    if cfg.splits:
        if not Path(cfg.splits).is_file():
            raise InputError("-splits", f"splits file {cfg.splits} not found")
        return Path(cfg.splits)
    return next((p for p in places if p.is_file()), None)


def split_cases(cases: Sequence[CachedCase], cfg: EvalConfig,
                places: Sequence[Path] = ()) -> tuple[list[CachedCase], list[CachedCase]]:
    """``(evaluation cases, training cases)`` for ``-split``; folds from splits.json if found, else made from -seed."""
    by_id = {c.id: c for c in cases}
    if cfg.split == "all":
        return list(cases), list(cases)
    path = _find_splits(cfg, places)
    if path is not None:
        folds = {int(s["fold"]): s for s in load_splits(path)}
        if cfg.fold not in folds:
            raise InputError(path, f"has no fold {cfg.fold} (folds {sorted(folds)})")
        split = folds[cfg.fold]
        unknown = [c for c in split["train"] + split["val"] if c not in by_id]
        if unknown:
            raise InputError(path, f"names cases not in the data: {', '.join(unknown[:5])}")
    else:
        split = make_splits(sorted(by_id), cfg.folds, cfg.seed)[cfg.fold]
    train = [by_id[c] for c in split["train"]]
    chosen = [by_id[c] for c in split[cfg.split]]
    if not chosen:
        raise InputError("-fold", f"the {cfg.split} split of fold {cfg.fold} is empty")
    return chosen, train


def choose_support(cases: Sequence[CachedCase], train: Sequence[CachedCase], key: str | None) -> CachedCase:
    """The case ``key`` (``EvalConfig.support_case``), else (None) the training case with most classes."""
    if key is not None:
        for case in cases:
            if case.id == key:
                return case
        have = ", ".join(c.id for c in list(cases)[:5])
        raise InputError("-support_instance", f"case {key!r} not found in the data (cases: {have}, ...)")
    pool = list(train) or list(cases)
    return max(sorted(pool, key=lambda c: c.id), key=lambda c: len(c.class_ids()))


def support_slices(support: CachedCase, class_ids: Sequence[int], num_support: int) -> dict[int, np.ndarray]:
    """Unique support slice indices per class, spread over its extent; classes the support lacks are left out."""
    out = {}
    present = set(support.class_ids())
    for cid in class_ids:
        if cid in present:
            out[cid] = np.unique(pick_support_slices(support.label, support.sources(cid), num_support))
    return out


# ----------------------------------------------------------------------------------------------------- scoring
@dataclass
class Truth:
    """A case's original label (source values, NIfTI voxel order) with its affine, header and spacing (mm)."""

    label: np.ndarray
    affine: np.ndarray
    header: Any
    spacing: tuple[float, float, float]


def read_truth(case: CachedCase) -> Truth:
    """Read the original label file named in the cache meta; check it still matches the cached grid."""
    path = case.meta["source"]["label"]["path"]
    label, affine, header = load_nifti_volume(path)
    if tuple(label.shape) != tuple(case.meta["original_shape"]):
        raise InputError(path, f"label shape {label.shape} differs from the cached {case.meta['original_shape']}; "
                               "re-run preprocessing")
    spacing = tuple(float(z) for z in header.get_zooms()[:3])
    return Truth(label, affine, header, spacing)  # type: ignore[arg-type]


def label_dtype(values: Sequence[int]) -> type:
    """The smallest NIfTI integer type holding these label values."""
    return np.uint8 if max(values, default=0) < 256 else np.int16


def score_case(rows: MetricRows, case: CachedCase, truth: Truth, logits: dict[int, np.ndarray],
               class_ids: Sequence[int], label_map: dict[int, str], protocol: str, epoch: int | None,
               extra: dict[str, Any]) -> np.ndarray:
    """Add one row per class (original grid); returns the predicted label map (source values, highest logit wins)."""
    labels = np.zeros(truth.label.shape, dtype=np.int16)
    best = np.full(truth.label.shape, -np.inf, dtype=np.float32)
    for cid in class_ids:
        name = label_map.get(cid, str(cid))
        common = dict(case=case.id, class_id=cid, class_name=name, protocol=protocol, epoch=epoch, **extra)
        if cid not in logits:
            rows.rows.append({**common, "dice": math.nan, "iou": math.nan, "hd95": math.nan, "nsd": math.nan,
                              "note": f"class absent from support case {extra.get('support_case')}; not evaluated"})
            continue
        orig = to_original_grid(logits[cid], case.meta, order=1).astype(np.float32)
        pred = logits_to_mask(orig)
        truth_c = np.isin(truth.label, case.sources(cid))
        rows.add(pred=pred, truth=truth_c, spacing=truth.spacing, note="", **common)
        win = pred & (orig > best)
        best[win] = orig[win]
        labels[win] = min(case.sources(cid))
    return labels
