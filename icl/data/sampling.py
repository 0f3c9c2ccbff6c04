"""Which slices go into a sample: the seed (GT-slice) protocol, the full-volume protocol, support picking, and
deterministic k-fold case splits.

Why separate from the loader: evaluation, the CLI and training all pick supports and query slices the same way;
these functions work on plain arrays / slice lists so they are easy to test and reuse.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from icl.errors import InputError
from icl.io import write_json


def slices_containing(label_zhw: np.ndarray, class_id: int | Sequence[int]) -> np.ndarray:
    """Sorted indices of the slices of [Z, H, W] that hold ``class_id`` (or any of several source values)."""
    values = [class_id] if np.isscalar(class_id) else list(class_id)
    return np.nonzero(np.isin(label_zhw, values).any(axis=(1, 2)))[0].astype(np.int64)


def labelled_slices(label: np.ndarray, axis: int = 2) -> list[int]:
    """Slices of ``label`` along ``axis`` that carry any label value (the annotated slices of a sparse label)."""
    moved = np.moveaxis(label, axis, 0)
    return [int(z) for z in np.flatnonzero(moved.reshape(moved.shape[0], -1).any(1))]


def extract_object(case: Any, class_id: int, video_length: int, rng: np.random.Generator) -> np.ndarray:
    """Seed protocol: ``video_length`` consecutive entries of the slices that contain ``class_id``.

    ``case`` is a ``CachedCase`` (its meta lists the slices per class, so no voxels are read). The start is random
    (``rng``); when the object spans fewer slices than ``video_length`` all of them are returned (T is shorter).
    """
    slices = case.slices_with(class_id)
    if slices.size == 0:
        raise InputError(getattr(case, "path", "case"), f"class {class_id} is not present in case {case.id}")
    if video_length <= 0 or slices.size <= video_length:
        return slices
    start = int(rng.integers(0, slices.size - video_length + 1))
    return slices[start:start + video_length]


def spread(slices: np.ndarray, n: int) -> np.ndarray:
    """``n`` entries of ``slices`` at the centres of ``n`` equal bins: spread across the extent, avoiding the thin
    first/last slices of an object. Repeats entries when the object has fewer than ``n`` slices."""
    if slices.size == 0:
        raise ValueError("no slices to pick from")
    pos = ((np.arange(n) + 0.5) * slices.size / n).astype(np.int64)
    return slices[np.minimum(pos, slices.size - 1)]


def pick_support_slices(label_zhw: np.ndarray, class_id: int | Sequence[int], n: int) -> np.ndarray:
    """``n`` support slice indices spread across the extent of ``class_id`` in a [Z, H, W] label volume."""
    slices = slices_containing(label_zhw, class_id)
    if slices.size == 0:
        raise InputError("support", f"class {class_id} is not present in the support volume")
    return spread(slices, n)


def full_volume_indices(num_slices: int) -> np.ndarray:
    """Full-volume protocol: every query slice in order, including slices without the class."""
    return np.arange(num_slices, dtype=np.int64)


def make_splits(case_ids: Sequence[str], folds: int, seed: int, path: str | Path | None = None) -> list[dict]:
    """Deterministic k-fold split of case ids; same (ids, folds, seed) → same splits on every machine.

    Ids are sorted before a seeded permutation, so listing order does not matter. Returns
    ``[{"fold": i, "train": [...], "val": [...]}, ...]`` and, with ``path``, writes it to ``splits.json``.
    """
    ids = sorted(set(case_ids))
    if len(ids) != len(case_ids):
        raise InputError("case_ids", "duplicate case ids")
    if folds < 2 or folds > len(ids):
        raise InputError("--folds", f"need 2 <= folds <= number of cases ({len(ids)}), got {folds}")
    order = np.random.default_rng(seed).permutation(len(ids))
    parts = np.array_split(order, folds)
    splits = []
    for i, part in enumerate(parts):
        val = sorted(ids[j] for j in part)
        splits.append({"fold": i, "train": [c for c in ids if c not in set(val)], "val": val})
    if path is not None:
        write_json(path, {"seed": seed, "folds": folds, "splits": splits})
    return splits


def load_splits(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "splits file not found")
    try:
        return json.loads(path.read_text())["splits"]
    except (json.JSONDecodeError, KeyError) as e:
        raise InputError(path, f"invalid splits file ({e})") from None
