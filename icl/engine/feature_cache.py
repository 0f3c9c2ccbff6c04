"""The image-feature cache of a frozen image encoder (``-feature_cache auto``): encoder outputs stored per slice.

Why: with the image encoder (Hiera trunk + FPN neck) frozen and nothing changing a slice after preprocessing, its
outputs for a slice are the same at every step, and they are most of a step's cost at 512 px. They are computed
the first time a slice is used and stored beside the preprocessing cache, then read instead of running the encoder
(``sam2_ext.predictor.ICLPredictor`` takes them through a state's feature source).

Layout: ``<case entry>/features/<key>/{meta.json, level<i>.npy, sums.npy}``: one memory-mapped ``[Z, C, h, w]``
array per FPN level (fp16 by default, sparse on disk: only slices used take space) and, per slice, the crc32 of
its stored bytes (-1 = not computed yet). The key is a hash of the image encoder's weights, the model's image size,
the preprocessing entry's key and the dtype: any change makes a new folder, and the old ones are deleted (never
reused). A slice counts only once its checksum is written after its data, so a kill mid-write leaves it to be
recomputed; a stored slice whose bytes no longer match its checksum is recomputed, with a note; a truncated or
unreadable file rebuilds the entry. The folder is made under a temp name and renamed, and ``meta.json`` is written
atomically. Memory stays bounded: slices are read from the memory maps one at a time and at most ``open_cases``
entries are open.

Real-volume crops (``real_*`` levels, :class:`CropFeatures`): frozen LiteMedSAM's encoder is most of a step's forward
pass, and real-volume tasks come back to the same crops (a finite bank of variants, boxes snapped to a grid:
``icl.engine.train.real_tasks``). Layout
``<cache_dir>/real_features/<format>_<encoder key>_<size>_<dtype>/<hash of the crop id>/``: one entry of the format above (``slices`` = :data:`MAX_SLICES`, sparse on disk) plus ``inputs.npy``, the
crc32 of the frame each slice was computed from. A stored slice is used only when the frame in hand has that
checksum, so a changed augmentation, crop rule or volume never hands back features of other pixels (recomputed, said
once). Other formats and encoder keys under ``real_features`` are deleted at start.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from icl.data.vocabulary import REAL_LEVELS
from icl.engine.clips import open_training_caches
from icl.engine.train.real_tasks import CROP_PREFIX
from icl.engine.train.schedule import CLIPS, parse_schedule
from icl.errors import InputError
from icl.io import write_json
from icl.model.lora import weights_hash
from sam2_ext.predictor import prepare_frames

# v2: stores made before the frozen encoder was kept in eval mode in training (icl.engine.train.step.frozen_modules)
# may hold TinyViT features normalised by batch statistics; a new format is never handed them
FORMAT = "icl-features-v2"
DTYPES = {"fp16": np.float16, "fp32": np.float32}
DEFAULT_DTYPE = "fp16"  # what -feature_cache auto stores (fp32 doubles the disk cost; the equality tests use it)


def check_frozen(predictor: Any) -> None:
    """Stored outputs are only right for an encoder that never changes."""
    if any(p.requires_grad for p in predictor.image_encoder.parameters()):
        raise InputError("-feature_cache", "auto needs a frozen image encoder, but it is trained here; add "
                                           "-freeze image_encoder (or -peft lora without image_encoder in "
                                           "-lora_targets), or use -feature_cache off")


def _open(path: Path) -> np.memmap:
    """A stored array, writable; a truncated file raises (numpy's "r+" alone would silently extend it with zeros)."""
    np.load(path, mmap_mode="r")
    return np.load(path, mmap_mode="r+")


class CaseFeatures:
    """The stored encoder outputs of one preprocessed case (one key); created on first use."""

    def __init__(self, folder: Path, meta: dict[str, Any]):
        self.folder, self.meta = folder, meta
        self.levels = [_open(folder / f"level{i}.npy") for i in range(len(meta["shapes"]))]
        self.sums = _open(folder / "sums.npy")
        shapes = [list(a.shape[1:]) for a in self.levels]
        if shapes != meta["shapes"] or any(len(a) != meta["slices"] for a in (*self.levels, self.sums)) \
                or any(a.dtype != np.dtype(meta["dtype"]) for a in self.levels):
            raise ValueError("stored arrays do not match meta.json")

    @classmethod
    def create(cls, folder: Path, meta: dict[str, Any]) -> "CaseFeatures":
        """Make the arrays under a temp folder, then rename it to ``folder`` (readers never see a partial one)."""
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i, shape in enumerate(meta["shapes"]):
            np.lib.format.open_memmap(tmp / f"level{i}.npy", mode="w+", dtype=np.dtype(meta["dtype"]),
                                      shape=(meta["slices"], *shape)).flush()
        np.save(tmp / "sums.npy", np.full(meta["slices"], -1, dtype=np.int64))
        write_json(tmp / "meta.json", meta)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        return cls(folder, meta)

    def _checksum(self, z: int) -> int:
        crc = 0
        for level in self.levels:
            crc = zlib.crc32(np.ascontiguousarray(level[z]).tobytes(), crc)
        return crc

    def read(self, z: int) -> list[np.ndarray] | None:
        """Slice ``z``'s levels, or None when not computed yet or when its bytes fail the checksum."""
        if self.sums[z] < 0:
            return None
        if self._checksum(z) != int(self.sums[z]):
            print(f"note: feature cache {self.folder}: slice {z} does not match its checksum; recomputing it",
                  file=sys.stderr)
            return None
        return [np.array(level[z]) for level in self.levels]

    def write(self, z: int, levels: Sequence[np.ndarray]) -> None:
        """Data first, flushed; then its checksum (what makes the slice count)."""
        for store, value in zip(self.levels, levels):
            store[z] = value
            store.flush()
        self.sums[z] = self._checksum(z)
        self.sums.flush()


class FeatureCache:
    """Encoder outputs of the slices of preprocessed cases, for one predictor (its image encoder stays frozen)."""

    def __init__(self, predictor: Any, cases: Sequence[Any], dtype: str = DEFAULT_DTYPE, open_cases: int = 8,
                 crops: Any = None):
        check_frozen(predictor)
        self.crops = crops  # icl.engine.crop_features.CropFeatures: real-volume crops (frames carried by the task)
        self.predictor, self.dtype = predictor, DTYPES[dtype]
        self.cases = {case.id: case for case in cases}
        self.model_key = weights_hash(predictor.image_encoder)
        self.open_cases = open_cases
        self._open: OrderedDict[str, CaseFeatures] = OrderedDict()
        self.computed = self.read = 0  # slices encoded / read from disk (what the tests and the bench count)

    def source(self, sources: Sequence[tuple[str, int]] | None, frames: torch.Tensor | None = None
               ) -> Callable[[int], list[torch.Tensor] | None] | None:
        """A feature source over a task's frames (``sources[f]`` = (case id, slice) of frame f), or None; real-volume
        crops go to :attr:`crops` with the task's ``frames``."""
        if self.crops is not None and sources and frames is not None:
            crop_source = self.crops.source(sources, frames)
            if crop_source is not None:
                return crop_source
        if not sources or any(case_id not in self.cases for case_id, _ in sources):
            return None
        return lambda f: self.levels(*sources[f])

    def levels(self, case_id: str, z: int) -> list[torch.Tensor]:
        """The encoder's levels of slice ``z`` of a case, [1, C, h, w] float32 each: stored, or computed and stored."""
        case = self.cases[case_id]
        store = self._store(case)
        stored = store.read(z) if store is not None else None
        if stored is not None:
            self.read += 1
            return [torch.from_numpy(a).float()[None] for a in stored]
        fresh = self._encode(case, z)
        if store is None:
            store = self._store(case, shapes=[list(x.shape[1:]) for x in fresh])
        store.write(z, [x[0].cpu().numpy().astype(self.dtype) for x in fresh])
        self.computed += 1
        # what is used is what a later read gives back (rounded to the stored dtype), so steps never differ
        return [torch.from_numpy(np.array(level[z])).float()[None] for level in store.levels]

    def _encode(self, case: Any, z: int) -> list[torch.Tensor]:
        p = self.predictor
        image = torch.from_numpy(np.array(case.image[z:z + 1], dtype=np.float32)).to(p.device)  # a copy: writable
        with torch.no_grad():
            return [x.float() for x in p.encode_levels(prepare_frames(image, p.image_size, p.input_rule))]

    def key(self, case: Any) -> dict[str, Any]:
        """What the stored outputs depend on: the encoder's weights, the model's image size, the slices' pixels."""
        entry_key = case.meta.get("key")
        return {"format": FORMAT, "encoder": self.model_key, "image_size": int(self.predictor.image_size),
                "entry": entry_key, "dtype": np.dtype(self.dtype).name, "slices": int(case.num_slices)}

    def folder(self, case: Any) -> Path:
        k = self.key(case)
        name = f"{k['encoder'][:12]}_{k['image_size']}_{str(k['entry'])[:12]}_{k['dtype']}"
        return Path(case.path) / "features" / name

    def _store(self, case: Any, shapes: list[list[int]] | None = None) -> CaseFeatures | None:
        """The case's open entry; opened from disk if valid, created when ``shapes`` are given, else None."""
        if case.id in self._open:
            self._open.move_to_end(case.id)
            return self._open[case.id]
        folder, key = self.folder(case), self.key(case)
        store = None
        meta_file = folder / "meta.json"
        if meta_file.is_file():
            try:
                meta = json.loads(meta_file.read_text())
                if {k: meta.get(k) for k in key} == key:
                    store = CaseFeatures(folder, meta)
            except (ValueError, OSError) as err:  # truncated or unreadable arrays or meta: rebuild, said once
                print(f"note: feature cache {folder} is unreadable ({type(err).__name__}); rebuilding it",
                      file=sys.stderr)
        if store is None:
            if shapes is None:
                return None
            for stale in folder.parent.glob("*"):  # other keys: invalidated, never reused
                if stale != folder:
                    shutil.rmtree(stale, ignore_errors=True)
            store = CaseFeatures.create(folder, {**key, "shapes": shapes})
        self._open[case.id] = store
        while len(self._open) > self.open_cases:
            self._open.popitem(last=False)
        return store


# ------------------------------------------------------------------------------------------------ real crops
MAX_SLICES = 1024  # slices addressable per crop (a scan's extent along any axis); files are sparse on disk


def frame_sum(frame: torch.Tensor) -> int:
    """crc32 of a frame's float32 bytes (what a stored slice was computed from)."""
    return zlib.crc32(np.ascontiguousarray(frame.detach().cpu().numpy(), dtype=np.float32).tobytes())


class CropFeatures:
    """Encoder outputs of real-volume crops for one predictor (its image encoder frozen)."""

    def __init__(self, predictor: Any, root: str | Path, dtype: str = "fp16", open_crops: int = 16):
        check_frozen(predictor)
        self.predictor, self.dtype = predictor, DTYPES[dtype]
        key = (f"{FORMAT}_{weights_hash(predictor.image_encoder)[:12]}_{int(predictor.image_size)}_"
               f"{np.dtype(self.dtype).name}")
        self.root = Path(root) / key
        if Path(root).is_dir():
            for stale in Path(root).iterdir():  # other encoders or sizes: invalidated, never reused
                if stale.is_dir() and stale != self.root:
                    shutil.rmtree(stale, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.open_crops = open_crops
        self._open: OrderedDict[str, tuple[CaseFeatures, np.memmap]] = OrderedDict()
        self.computed = self.read = self.mismatched = 0  # slices encoded / read / found with other pixels

    def source(self, sources: Sequence[tuple[str, int]] | None, frames: torch.Tensor | None
               ) -> Callable[[int], list[torch.Tensor]] | None:
        """A feature source over a task's frames (``sources[f]`` = (crop id, slice)), or None."""
        if not sources or frames is None or not all(str(s).startswith(CROP_PREFIX) for s, _ in sources):
            return None
        return lambda f: self.levels(sources[f][0], int(sources[f][1]), frames[f])

    def levels(self, crop: str, z: int, frame: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's levels of ``frame`` (slice ``z`` of ``crop``), [1, C, h, w] float32: stored or computed."""
        if not 0 <= z < MAX_SLICES:
            raise ValueError(f"slice {z} outside 0..{MAX_SLICES - 1}")
        total = frame_sum(frame)
        entry = self._entry(crop)
        if entry is not None:
            store, inputs = entry
            if int(inputs[z]) == total:
                stored = store.read(z)
                if stored is not None:
                    self.read += 1
                    return [torch.from_numpy(a).float()[None] for a in stored]
            elif int(inputs[z]) >= 0:
                self.mismatched += 1
                if self.mismatched == 1:
                    print(f"note: feature cache {store.folder}: slice {z} was stored from other pixels; "
                          "recomputing (said once)", file=sys.stderr)
        p = self.predictor
        with torch.no_grad():
            fresh = [x.float() for x in p.encode_levels(prepare_frames(frame[None].to(p.device), p.image_size,
                                                                       p.input_rule))]
        if entry is None:
            entry = self._entry(crop, [list(x.shape[1:]) for x in fresh])
        store, inputs = entry
        inputs[z] = -1  # the slice does not count while it is rewritten
        inputs.flush()
        store.write(z, [x[0].cpu().numpy().astype(self.dtype) for x in fresh])
        inputs[z] = total
        inputs.flush()
        self.computed += 1
        return [torch.from_numpy(np.array(level[z])).float()[None] for level in store.levels]

    def _entry(self, crop: str, shapes: list[list[int]] | None = None) -> tuple[CaseFeatures, np.memmap] | None:
        if crop in self._open:
            self._open.move_to_end(crop)
            return self._open[crop]
        folder = self.root / hashlib.sha1(crop.encode()).hexdigest()[:20]
        meta = {"format": "icl-crop-features-v1", "crop": crop, "slices": MAX_SLICES,
                "dtype": np.dtype(self.dtype).name}
        entry = None
        if (folder / "inputs.npy").is_file():
            try:
                saved = CaseFeatures(folder, {**meta, "shapes": _shapes(folder)})
                entry = saved, np.load(folder / "inputs.npy", mmap_mode="r+")
            except (ValueError, OSError):
                print(f"note: feature cache {folder} is unreadable; rebuilding it", file=sys.stderr)
        if entry is None:
            if shapes is None:
                return None
            store = CaseFeatures.create(folder, {**meta, "shapes": shapes})
            np.save(folder / "inputs.npy", np.full(MAX_SLICES, -1, dtype=np.int64))
            entry = store, np.load(folder / "inputs.npy", mmap_mode="r+")
        self._open[crop] = entry
        while len(self._open) > self.open_crops:
            self._open.popitem(last=False)
        return entry


def _shapes(folder: Path) -> list[list[int]]:
    """The level shapes an entry was made with (from its meta.json)."""
    return json.loads((folder / "meta.json").read_text())["shapes"]


def make_feature_cache(cfg: Any, info: Any, predictor: Any) -> FeatureCache | None:
    """``-feature_cache``: the cache over the training run's dataset slices and real-volume crops (under
    ``-cache_dir``/real_features), or None (off, or nothing to cache)."""
    if cfg.feature_cache == "off":
        return None
    check_frozen(predictor)
    if info.world_size > 1:
        raise InputError("-feature_cache", "auto runs in a single process only (ranks would write the same "
                                           "files); use -feature_cache off with -distributed True")
    sources = {name for _, mix in parse_schedule(cfg.tasks) for name in mix}
    real = bool(sources & set(REAL_LEVELS))
    if CLIPS not in sources and not real:
        print("note: -feature_cache auto: -tasks has no dataset clips and no real volumes, nothing to cache",
              file=sys.stderr)
        return None
    cases = open_training_caches(cfg, info)[0] if CLIPS in sources else []
    crops = CropFeatures(predictor, Path(cfg.cache_dir or "cache") / "real_features") if real else None
    return FeatureCache(predictor, cases, dtype=DEFAULT_DTYPE, crops=crops)
