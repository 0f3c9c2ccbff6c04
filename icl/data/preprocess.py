"""Preprocess a dataset ONCE into a slices-first cache: the model's frames [Z, S, S] float32 + labels as .npy.

Why: decoding a gzipped NIfTI, windowing and resampling costs far more than a training step needs; the cache is
memory-mapped (``np.load(mmap_mode="r")``) so sampling a clip touches only the slices it uses. The frames are made
by ``icl.data.frames`` (the one preprocessing the CLI/API also use), so a model sees the same pixels everywhere.
``meta.json`` records how to go back to the source grid (orientation, slice axis, shapes, affine).

Layout: ``<cache>/index.json`` (dataset, label map, case ids) and ``<cache>/<case_id>/{image.npy,label.npy,meta.json}``.
``meta.json`` is written last (atomically), so an entry is valid iff its meta exists and its ``key`` (source sizes +
mtimes + preprocessing parameters) matches; re-running skips valid entries and rebuilds changed ones.

    python -m icl.cli.preprocess --dataset kits --data_path datasets/kits --cache cache/kits --image_size 128
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from icl.data import frames
from icl.data.frames import (  # noqa: F401
    MR_PERCENTILES,
    RAS,
    WINDOWS,
    Scan,
    VolumeFrames,
    canonical_ornt,
    check_window,
    inverse_ornt,
    label_slices,
    parse_window,
    reorient,
    reoriented_shape,
    resize_slices,
)
from icl.data.readers import Case, read_dataset
from icl.data.validate import check_grid, check_label
from icl.errors import InputError
from icl.io import atomic_path, write_json
from icl.progress import progress as progress_bar

CACHE_VERSION = 2  # 2: frames from icl.data.frames (canonical orientation, antialiased resize, non-finite rule)
# Old names kept for callers that predate icl.data.frames (which owns the values).
CT_WINDOWS: dict[str, tuple[float, float]] = {k[3:]: v for k, v in WINDOWS.items() if v is not None}


def _source_stamp(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def case_window(case: Case, window: str | tuple[float, float] | None = None) -> str | tuple[float, float]:
    """The frames window of a case: the given one, else the reader's CT preset, or MR percentiles."""
    if window is not None:
        return check_window(tuple(window) if not isinstance(window, str) else window)
    return f"ct_{case.window}" if case.modality == "CT" else "mr"


def _key(case: Case, image_size: int, window: str | tuple[float, float]) -> str:
    """Everything the cached arrays depend on; any change invalidates the entry."""
    parts = {
        "version": CACHE_VERSION, "image": _source_stamp(case.image), "label": _source_stamp(case.label),
        "image_size": image_size, "window": window, "modality": case.modality, "channel": case.channel,
        "slice_axis": case.slice_axis, "percentile_budget": frames.PERCENTILE_VOXEL_BUDGET,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def grid_meta(original_shape: Sequence[int], slice_axis: int, affine: np.ndarray | None = None) -> dict[str, Any]:
    """What ``to_original_grid`` needs to go back to a file's voxel grid (the cache stores it in meta.json)."""
    ornt = canonical_ornt(np.eye(4) if affine is None else affine)
    return {"original_shape": [int(s) for s in original_shape], "slice_axis": int(slice_axis),
            "orientation": ornt.tolist(), "canonical_shape": list(reoriented_shape(original_shape, ornt))}


def to_original_grid(volume_zhw: "np.ndarray | torch.Tensor", meta: dict[str, Any], order: int = 0) -> np.ndarray:
    """Undo the cache's resize, axis move and orientation: [Z, S, S] → the source NIfTI's voxel order and shape.

    ``order`` 0 (nearest, for labels/masks) or 1 (bilinear, for logits/probabilities). Used to write predictions
    as NIfTI on the original grid (with ``meta["affine"]``) and to score against the original label.
    """
    if hasattr(volume_zhw, "detach"):  # a torch tensor
        volume_zhw = volume_zhw.detach().cpu().numpy()
    ornt = np.asarray(meta.get("orientation", RAS), dtype=np.float64)
    canonical = reoriented_shape(meta["original_shape"], ornt)
    axis = int(meta["slice_axis"])
    inplane = tuple(s for i, s in enumerate(canonical) if i != axis)
    if volume_zhw.ndim != 3 or volume_zhw.shape[0] != canonical[axis]:
        raise InputError("volume", f"expected [{canonical[axis]}, H, W] for case {meta.get('id')}, got "
                                   f"{tuple(volume_zhw.shape)}")
    back = resize_slices(volume_zhw, inplane, "label" if order == 0 else "logits")
    return np.ascontiguousarray(reorient(np.moveaxis(back, 0, axis), inverse_ornt(ornt)))


def _frames_window(modality: str, window: tuple[float, float] | None) -> str | tuple[float, float]:
    return (tuple(window) if window is not None else "ct_abdomen") if modality == "CT" else "mr"


def prepare_image(image: np.ndarray, slice_axis: int, modality: str, window: tuple[float, float] | None,
                  image_size: int, affine: np.ndarray | None = None) -> np.ndarray:
    """One in-memory volume (file voxel order, ``affine`` default identity) → the cache's frames ``[Z, S, S]``.

    Exactly ``VolumeFrames`` (``slice_axis`` is canonical); for files prefer ``VolumeFrames(Scan.open(path))``.
    """
    scan = Scan.from_array(image, affine)
    return VolumeFrames(scan, _frames_window(modality, window), image_size, slice_axis).stack()


def prepare_label(label: np.ndarray, slice_axis: int, image_size: int, affine: np.ndarray | None = None) -> np.ndarray:
    """Label volume (file voxel order) → slices-first ``[Z, S, S]`` uint8, nearest (class ids preserved)."""
    scan = Scan.from_array(np.asarray(label).astype(np.uint8), affine)
    return label_slices(scan, slice_axis, None, image_size)


class CachedCase:
    """A preprocessed case: lazily memory-mapped ``image``/``label`` [Z, H, W] plus ``meta``.

    ``remap`` (source label value → class id) defaults to the one recorded at preprocessing; class queries
    (``slices_with``, ``mask``) are in class ids. ``load()`` copies the arrays into RAM (a resident case),
    ``release()`` drops them.
    """

    def __init__(self, path: str | Path, remap: dict[int, int] | None = None):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise InputError(self.path, "not a cached case (meta.json missing); run python -m icl.data.preprocess")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        self.id: str = self.meta["id"]
        self.remap = {int(k): int(v) for k, v in (remap or self.meta["remap"]).items()}
        self._image: np.ndarray | None = None
        self._label: np.ndarray | None = None

    def _open(self, name: str) -> np.ndarray:
        f = self.path / f"{name}.npy"
        try:
            return np.load(f, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise InputError(f, f"unreadable cache array ({e}); delete the entry and re-run preprocessing") from None

    @property
    def image(self) -> np.ndarray:
        if self._image is None:
            self._image = self._open("image")
        return self._image

    @property
    def label(self) -> np.ndarray:
        if self._label is None:
            self._label = self._open("label")
        return self._label

    @property
    def num_slices(self) -> int:
        return int(self.meta["cached_shape"][0])

    def load(self) -> "CachedCase":
        self._image, self._label = np.array(self.image), np.array(self.label)
        return self

    def release(self) -> None:
        self._image = self._label = None

    @property
    def resident(self) -> bool:
        return isinstance(self._image, np.ndarray) and not isinstance(self._image, np.memmap)

    def sources(self, class_id: int) -> list[int]:
        return [s for s, c in self.remap.items() if c == class_id]

    def class_ids(self) -> list[int]:
        """Class ids present in this case (after remap)."""
        present = {int(v) for v in self.meta["class_slices"]}
        return sorted({c for s, c in self.remap.items() if c > 0 and s in present})

    def slices_with(self, class_id: int) -> np.ndarray:
        """Sorted slice indices holding ``class_id``, from meta (no voxel read)."""
        idx: set[int] = set()
        for s in self.sources(class_id):
            idx.update(self.meta["class_slices"].get(str(s), []))
        return np.array(sorted(idx), dtype=np.int64)

    def mask(self, class_id: int, index: np.ndarray | slice | None = None) -> np.ndarray:
        """Binary float32 mask of ``class_id`` on the chosen slices."""
        lab = self.label if index is None else self.label[index]
        return np.isin(lab, self.sources(class_id)).astype(np.float32)


def _entry_valid(entry: Path, key: str) -> dict[str, Any] | None:
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("key") != key or not (entry / "image.npy").is_file() or not (entry / "label.npy").is_file():
        return None
    return meta


def _save_npy(target: Path, arr: np.ndarray) -> None:
    with atomic_path(target) as tmp:
        np.save(tmp, arr)


def preprocess_case(case: Case, cache: str | Path, image_size: int,
                    window: str | tuple[float, float] | None = None) -> tuple[CachedCase, bool]:
    """Cache one case; returns ``(cached, rebuilt)``. Validation runs before anything is written.

    The image is ``VolumeFrames(Scan.open(image, channel), window, image_size, slice_axis)`` stacked item by item
    into the .npy (so a cached frame is the CLI's frame, bit for bit); the label is ``label_slices``.
    """
    if case.label is None:
        raise InputError(case.image, "no label file for this case")
    entry = Path(cache) / case.id
    window = case_window(case, window)
    key = _key(case, image_size, window)
    meta = _entry_valid(entry, key)
    label_info = {"remap": {str(k): v for k, v in case.remap.items()},
                  "label_map": {str(k): v for k, v in case.label_map.items()}}
    if meta is not None:
        if any(meta.get(k) != v for k, v in label_info.items()):  # label mode changed: arrays stay valid
            write_json(entry / "meta.json", {**meta, **label_info})
        return CachedCase(entry), False
    image, label = Scan.open(case.image, case.channel), Scan.open(case.label)
    check_grid(image.shape, image.affine, label.shape, label.affine, case.label)
    label_dtype = check_label(label.canonical, case.label, case.remap.keys()).dtype
    lab_zhw = label_slices(label, case.slice_axis, None, image_size).astype(label_dtype)
    vf = VolumeFrames(image, window, image_size, case.slice_axis)
    with atomic_path(entry / "image.npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(vf), image_size, image_size))
        vf.stack(out)
        out.flush()
        del out
    _save_npy(entry / "label.npy", lab_zhw)
    class_slices = {str(int(v)): np.nonzero((lab_zhw == v).any(axis=(1, 2)))[0].tolist()
                    for v in np.unique(lab_zhw) if v > 0}
    resolved = vf.window
    write_json(entry / "meta.json", {
        "id": case.id, "dataset": case.dataset, "key": key, "version": CACHE_VERSION,
        "source": {"image": _source_stamp(case.image), "label": _source_stamp(case.label)},
        "image_size": image_size, "cached_shape": [len(vf), image_size, image_size],
        **grid_meta(image.shape, case.slice_axis, image.affine),
        "axcodes": list(nib.aff2axcodes(image.affine)), "spacing": list(case.spacing),
        "affine": image.affine.tolist(), "modality": case.modality, "channel": case.channel,
        "window": None if resolved == "mr" else list(vf.value_range),
        "window_name": resolved if isinstance(resolved, str) else "custom",
        "value_range": list(vf.value_range), "nonfinite_replaced": image.nonfinite,
        "class_slices": class_slices, **label_info,
    })
    return CachedCase(entry), True


def preprocess_cases(cases: Sequence[Case], cache: str | Path, image_size: int = 128,
                     window: str | tuple[float, float] | None = None, progress: bool = True) -> list[CachedCase]:
    """Cache every case (skipping valid entries) and write ``<cache>/index.json``."""
    if not cases:
        raise InputError(cache, "no cases to preprocess")
    out = []
    for case in progress_bar(cases, enabled=progress, desc="preprocess", unit="case"):
        out.append(preprocess_case(case, cache, image_size, window)[0])
    write_json(Path(cache) / "index.json", {
        "dataset": cases[0].dataset, "image_size": image_size, "cases": [c.id for c in cases],
        "label_map": {str(k): v for k, v in cases[0].label_map.items()},
    })
    return out


def preprocess_dataset(dataset: str, data_path: str | Path, cache: str | Path, image_size: int = 128,
                       window: str | tuple[float, float] | None = None, progress: bool = True,
                       **reader_options: Any) -> list[CachedCase]:
    """Read ``data_path`` with the ``dataset`` layout reader and cache it under ``cache``."""
    return preprocess_cases(read_dataset(dataset, data_path, **reader_options), cache, image_size, window, progress)


def open_cache(cache: str | Path, remap: dict[int, int] | None = None) -> tuple[list[CachedCase], dict[int, str]]:
    """Open a preprocessed cache folder: ``(cases, label_map)``."""
    index = Path(cache) / "index.json"
    if not index.is_file():
        raise InputError(cache, "no index.json: not a preprocessed cache (run python -m icl.data.preprocess)")
    info = json.loads(index.read_text())
    cases = [CachedCase(Path(cache) / cid, remap) for cid in info["cases"]]
    return cases, {int(k): v for k, v in info["label_map"].items()}
