"""Torch dataset/loader producing ICL samples (docs/CONTRACTS.md) from preprocessed caches.

Why: the engine wants one dict per step — query clip, its binary GT, support slices with their GT — independent of
dataset layout. Cases stay memory-mapped; in chunked mode (the combined set) only ``chunk_size`` cases are resident
in RAM at once and the resident chunk rotates across epochs (``set_epoch``), so RAM stays flat for any number of cases.
"""
from __future__ import annotations

import json

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from icl.data.preprocess import CachedCase, open_cache
from icl.data.readers import unify_label_maps
from icl.data.sampling import extract_object, full_volume_indices, spread
from icl.errors import InputError

PROTOCOLS = ("gt_slices", "full_volume")


def open_caches(
    caches: Sequence[str | Path], classes: Sequence[str] | None = None
) -> tuple[list[CachedCase], dict[int, str]]:
    """Open one or several caches. Several (the combined set) are mapped onto one class list by name
    (``readers.unify_label_maps``); each case's remap becomes source value → unified class id. A case id found in
    more than one cache becomes ``<cache folder name>/<id>`` so ids stay unique."""
    opened = [open_cache(c) for c in caches]
    check_same_size(caches)
    if len(opened) == 1 and classes is None:
        return opened[0]
    unified, maps = unify_label_maps([lm for _, lm in opened], classes)
    seen: dict[str, int] = {}
    for cases, _ in opened:
        for c in cases:
            seen[c.id] = seen.get(c.id, 0) + 1
    out: list[CachedCase] = []
    for path, (cases, _), m in zip(caches, opened, maps):
        for c in cases:
            c.remap = {s: m.get(cls, 0) for s, cls in c.remap.items()}
            if seen[c.id] > 1:  # ids must stay unique for splits and support_instance
                c.id = f"{Path(path).name}/{c.id}"
            out.append(c)
    return out, unified


def check_same_size(caches: Sequence[str | Path]) -> None:
    """Caches of several image sizes cannot be mixed: their slices would meet the model at different sizes."""
    sizes = {}
    for cache in caches:
        try:
            size = json.loads((Path(cache) / "index.json").read_text()).get("image_size")
        except (OSError, ValueError):
            size = None  # open_cache has already said what is wrong with it
        if size is not None:
            sizes.setdefault(int(size), []).append(str(cache))
    if len(sizes) > 1:
        shown = "; ".join(f"{s} px: {', '.join(names)}" for s, names in sorted(sizes.items()))
        raise InputError(caches[0], f"caches of different image sizes cannot be mixed ({shown}): preprocess them "
                                    "at one --image_size")


class ICLDataset(Dataset):
    """One item = (query case, class id). ``protocol``: ``"gt_slices"`` (seed protocol: ``video_length`` slices
    holding the class) or ``"full_volume"`` (all slices in order).

    Supports: ``num_support`` slices spread across the class from the ``support_instance`` case (by id, searched in
    ``support_cases`` then ``cases``), else from another case holding the class (random, seeded), else from the
    query case itself when no other case has it. Randomness is seeded by ``(seed, epoch, index)``.
    """

    def __init__(
        self,
        cases: Sequence[CachedCase],
        protocol: str = "gt_slices",
        video_length: int = 8,
        num_support: int = 1,
        class_ids: Sequence[int] | None = None,
        support_instance: str | None = None,
        support_cases: Sequence[CachedCase] | None = None,
        seed: int = 0,
        chunk_size: int | None = None,
        samples_per_epoch: int | None = None,
    ):
        if protocol not in PROTOCOLS:
            raise InputError("--protocol", f"unknown protocol {protocol!r} ({' | '.join(PROTOCOLS)})")
        if not cases:
            raise InputError("cases", "no cases given to the dataset")
        if num_support < 1:
            raise InputError("--num_support", f"must be >= 1, got {num_support}")
        if chunk_size is not None and chunk_size < 1:
            raise InputError("--chunk_size", f"must be >= 1, got {chunk_size}")
        self.cases = list(cases)
        self.protocol, self.video_length, self.num_support = protocol, video_length, num_support
        self.seed, self.epoch, self.chunk_size = seed, 0, chunk_size
        present = sorted({c for case in self.cases for c in case.class_ids()})
        self.class_ids = list(class_ids) if class_ids is not None else present
        if not set(self.class_ids) & set(present):
            raise InputError("--classes", f"none of classes {self.class_ids} occur in the cases (present: {present})")
        self.support_pool = list(support_cases) if support_cases is not None else self.cases
        self.support_case: CachedCase | None = None
        if support_instance is not None:
            found = [c for c in [*self.support_pool, *self.cases] if c.id == support_instance]
            if not found:
                raise InputError("--support_instance", f"case {support_instance!r} not found")
            self.support_case = found[0]
            missing = [c for c in self.class_ids if c not in self.support_case.class_ids()]
            if missing:
                raise InputError("--support_instance",
                                 f"case {support_instance!r} lacks classes {missing}")
        self._all_items = [(i, c) for i, case in enumerate(self.cases) for c in self.class_ids
                           if c in case.class_ids()]
        self._chunk: list[int] | None = None
        # Fixed length (a DistributedSampler sizes itself once): a chunk's share of the items when chunked.
        n = len(self.cases)
        if samples_per_epoch is not None:
            self._fixed_len = samples_per_epoch
        elif chunk_size is None:
            self._fixed_len = len(self._all_items)
        else:
            self._fixed_len = max(1, math.ceil(len(self._all_items) * min(chunk_size, n) / n))

    # ---- chunking -------------------------------------------------------------------------------------------
    @property
    def num_chunks(self) -> int:
        return 1 if self.chunk_size is None else math.ceil(len(self.cases) / self.chunk_size)

    def chunk_cases(self, epoch: int) -> list[int]:
        """Case indices resident in ``epoch``: a seeded permutation per round of chunks, then the epoch's slice."""
        if self.chunk_size is None:
            return list(range(len(self.cases)))
        rnd, k = divmod(epoch, self.num_chunks)
        order = np.random.default_rng([self.seed, 7, rnd]).permutation(len(self.cases))
        return sorted(order[k * self.chunk_size:(k + 1) * self.chunk_size].tolist())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's chunk; cases leaving the chunk are released now, new ones load on first access."""
        self.epoch = epoch
        if self.chunk_size is not None:
            keep = set(self.chunk_cases(epoch))
            for i, case in enumerate(self.cases):
                if i not in keep and case is not self.support_case:
                    case.release()
            self._chunk = None

    def _ensure_chunk(self) -> list[tuple[int, int]]:
        if self.chunk_size is None:
            return self._all_items
        if self._chunk is None:
            self._chunk = self.chunk_cases(self.epoch)
            for i in self._chunk:
                self.cases[i].load()
            if self.support_case is not None and not self.support_case.resident:
                self.support_case.load()
        chunk = set(self._chunk)
        return [it for it in self._all_items if it[0] in chunk]

    def resident_ids(self) -> list[str]:
        """Ids of cases whose arrays are currently held in RAM (not just memory-mapped)."""
        return [c.id for c in {id(c): c for c in [*self.cases, *self.support_pool]}.values() if c.resident]

    # ---- samples --------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._fixed_len

    def _support(self, query_index: int, class_id: int, rng: np.random.Generator,
                 resident: set[int] | None) -> tuple[CachedCase, np.ndarray]:
        if self.support_case is not None:
            case = self.support_case
        else:
            query = self.cases[query_index]
            pool = [c for c in self.support_pool if c is not query and class_id in c.class_ids()]
            if resident is not None:  # chunked: only resident cases may serve as support
                ids = {id(self.cases[i]) for i in resident}
                pool = [c for c in pool if id(c) in ids]
            case = pool[int(rng.integers(len(pool)))] if pool else query
        return case, spread(case.slices_with(class_id), self.num_support)

    def __getitem__(self, index: int) -> dict[str, Any]:
        items = self._ensure_chunk()
        if not items:
            raise InputError("chunk", f"epoch {self.epoch}'s chunk holds none of classes {self.class_ids}")
        qi, class_id = items[index % len(items)]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        case = self.cases[qi]
        if self.protocol == "gt_slices":
            idx = extract_object(case, class_id, self.video_length, rng)
        else:
            idx = full_volume_indices(case.num_slices)
        sup_case, sup_idx = self._support(qi, class_id, rng, set(self._chunk) if self._chunk is not None else None)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(case.image[idx], dtype=np.float32)),
            "label": torch.from_numpy(case.mask(class_id, idx)),
            "support_image": torch.from_numpy(np.ascontiguousarray(sup_case.image[sup_idx], dtype=np.float32)),
            "support_label": torch.from_numpy(sup_case.mask(class_id, sup_idx)),
            "name": case.id,
            "class_id": int(class_id),
            "slice_index": torch.from_numpy(np.asarray(idx, dtype=np.int64)),
            "support_name": sup_case.id,  # where the frames come from: the image-feature cache reads by slice
            "support_slice_index": torch.from_numpy(np.asarray(sup_idx, dtype=np.int64)),
        }


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """batch_size 1: tensors get a leading batch dim of 1; ``name`` and ``class_id`` stay plain values."""
    if len(batch) != 1:
        raise ValueError(f"ICL samples have variable length; use batch_size=1 (got {len(batch)})")
    return {k: v.unsqueeze(0) if isinstance(v, torch.Tensor) else v for k, v in batch[0].items()}


def make_loader(
    dataset: ICLDataset, shuffle: bool = True, num_workers: int = 0, distributed: bool = False, seed: int = 0,
    num_replicas: int | None = None, rank: int | None = None, collate_fn: Any = None,
) -> DataLoader:
    """DataLoader with batch_size 1 and ``collate``; ``distributed`` uses a DistributedSampler (call
    ``set_epoch(loader, epoch)`` every epoch so shuffling and chunk rotation move on)."""
    if distributed:
        sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
    elif shuffle:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_fn or collate, persistent_workers=False)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Advance both the sampler (DDP shuffling) and the dataset (chunk rotation, per-sample seeds)."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
