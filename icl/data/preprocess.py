"""Preprocess a dataset ONCE into a slices-first cache: windowed/normalised [Z, H, W] float32 + uint8 labels as .npy.

Why: decoding a gzipped NIfTI, windowing and resampling costs far more than a training step needs; the cache is
memory-mapped (``np.load(mmap_mode="r")``) so sampling a clip touches only the slices it uses.

Layout: ``<cache>/index.json`` (dataset, label map, case ids) and ``<cache>/<case_id>/{image.npy,label.npy,meta.json}``.
``meta.json`` is written last (atomically), so an entry is valid iff its meta exists and its ``key`` (source sizes +
mtimes + preprocessing parameters) matches; re-running skips valid entries and rebuilds changed ones.

    python -m icl.data.preprocess --dataset kits --data_path datasets/kits19 --cache cache/kits --image_size 128
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from icl.data.readers import READERS, Case, read_dataset
from icl.data.validate import check_pair
from icl.errors import InputError, report
from icl.io import atomic_path, write_json

CACHE_VERSION = 1
# CT windows (HU). kidney: nnU-Net's KiTS19 foreground 0.5-99.5 percentiles; abdomen: soft-tissue window used for
# BTCV by UNETR / Swin-UNETR.
CT_WINDOWS: dict[str, tuple[float, float]] = {"kidney": (-79.0, 304.0), "abdomen": (-175.0, 250.0)}
MR_PERCENTILES = (0.5, 99.5)


def _source_stamp(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _key(case: Case, image_size: int, window: tuple[float, float] | None) -> str:
    """Everything the cached arrays depend on; any change invalidates the entry."""
    parts = {
        "version": CACHE_VERSION, "image": _source_stamp(case.image), "label": _source_stamp(case.label),
        "image_size": image_size, "window": window, "modality": case.modality, "channel": case.channel,
        "slice_axis": case.slice_axis,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def normalise_intensity(volume: np.ndarray, modality: str, window: tuple[float, float] | None) -> np.ndarray:
    """CT: clip to ``window`` and scale to [0, 1]; MR: 0.5-99.5 percentile scaling to [0, 1]."""
    from monai.transforms import ScaleIntensityRange, ScaleIntensityRangePercentiles  # heavy: import when used

    if modality == "CT":
        lo, hi = window if window is not None else CT_WINDOWS["abdomen"]
        t = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    else:
        t = ScaleIntensityRangePercentiles(lower=MR_PERCENTILES[0], upper=MR_PERCENTILES[1], b_min=0.0, b_max=1.0,
                                           clip=True)
    return np.asarray(t(volume[None].astype(np.float32))[0], dtype=np.float32)


def resize_inplane(volume_zhw: np.ndarray, size: Sequence[int], order: int) -> np.ndarray:
    """Resize every slice of [Z, H, W] to ``size`` (order 1 bilinear, order 0 nearest-exact; Z is untouched)."""
    import torch
    from monai.transforms import Resize

    size = tuple(int(s) for s in size)
    if tuple(volume_zhw.shape[1:]) == size:
        return np.array(volume_zhw)
    mode = "bilinear" if order == 1 else "nearest-exact"
    kw = {"align_corners": False, "anti_aliasing": False} if order == 1 else {}
    t = Resize(spatial_size=size, mode=mode, **kw)
    src = torch.from_numpy(np.array(volume_zhw, dtype=np.float32))  # a writable copy (memmaps are read-only)
    out = t(src)
    out = out.as_tensor() if hasattr(out, "as_tensor") else out
    out = out.numpy()
    return out if order == 1 else np.rint(out).astype(volume_zhw.dtype)


def to_slices_first(volume: np.ndarray, slice_axis: int) -> np.ndarray:
    return np.moveaxis(volume, slice_axis, 0)


def to_original_grid(volume_zhw: "np.ndarray | torch.Tensor", meta: dict[str, Any], order: int = 0) -> np.ndarray:
    """Undo the cache's in-plane resample and axis move: [Z, S, S] → the source NIfTI's voxel order and shape.

    ``order`` 0 (nearest, for labels/masks) or 1 (bilinear, for probabilities). Used to write predictions as NIfTI
    on the original grid (with ``meta["affine"]``) and to score against the original label.
    """
    if hasattr(volume_zhw, "detach"):  # a torch tensor
        volume_zhw = volume_zhw.detach().cpu().numpy()
    shape = tuple(meta["original_shape"])
    axis = int(meta["slice_axis"])
    inplane = tuple(s for i, s in enumerate(shape) if i != axis)
    if volume_zhw.ndim != 3 or volume_zhw.shape[0] != shape[axis]:
        raise InputError("volume", f"expected [{shape[axis]}, H, W] for case {meta.get('id')}, got "
                                   f"{tuple(volume_zhw.shape)}")
    back = resize_inplane(volume_zhw, inplane, order)
    return np.ascontiguousarray(np.moveaxis(back, 0, axis))


def prepare_image(image: np.ndarray, slice_axis: int, modality: str, window: tuple[float, float] | None,
                  image_size: int) -> np.ndarray:
    """One NIfTI-ordered volume → engine input: windowed/normalised, slices-first, resized ``[Z, S, S]`` in [0, 1].

    The same transform the cache applies; the inference CLI calls it on a single volume (no cache needed).
    """
    out = resize_inplane(normalise_intensity(to_slices_first(image, slice_axis), modality, window),
                         (image_size, image_size), order=1)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def prepare_label(label: np.ndarray, slice_axis: int, image_size: int) -> np.ndarray:
    """Label volume → slices-first ``[Z, S, S]`` uint8, nearest resampling (class ids preserved)."""
    return resize_inplane(to_slices_first(label, slice_axis).astype(np.uint8), (image_size, image_size), 0)


def grid_meta(original_shape: Sequence[int], slice_axis: int) -> dict[str, Any]:
    """The minimal ``meta`` for ``to_original_grid`` when a volume was prepared without the cache."""
    return {"original_shape": [int(s) for s in original_shape], "slice_axis": int(slice_axis)}


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
                    window: tuple[float, float] | None = None) -> tuple[CachedCase, bool]:
    """Cache one case; returns ``(cached, rebuilt)``. Validation runs before anything is written."""
    if case.label is None:
        raise InputError(case.image, "no label file for this case")
    entry = Path(cache) / case.id
    window = window if window is not None else (CT_WINDOWS.get(case.window) if case.modality == "CT" else None)
    key = _key(case, image_size, window)
    meta = _entry_valid(entry, key)
    label_info = {"remap": {str(k): v for k, v in case.remap.items()},
                  "label_map": {str(k): v for k, v in case.label_map.items()}}
    if meta is not None:
        if any(meta.get(k) != v for k, v in label_info.items()):  # label mode changed: arrays stay valid
            write_json(entry / "meta.json", {**meta, **label_info})
        return CachedCase(entry), False
    image, label, affine = check_pair(case.image, case.label, channel=case.channel, allowed=case.remap.keys())
    img_zhw = prepare_image(image, case.slice_axis, case.modality, window, image_size)
    lab_zhw = prepare_label(label, case.slice_axis, image_size)
    class_slices = {str(int(v)): np.nonzero((lab_zhw == v).any(axis=(1, 2)))[0].tolist()
                    for v in np.unique(lab_zhw) if v > 0}
    _save_npy(entry / "image.npy", img_zhw)
    _save_npy(entry / "label.npy", lab_zhw)
    write_json(entry / "meta.json", {
        "id": case.id, "dataset": case.dataset, "key": key, "version": CACHE_VERSION,
        "source": {"image": _source_stamp(case.image), "label": _source_stamp(case.label)},
        "image_size": image_size, "cached_shape": list(img_zhw.shape), "original_shape": list(label.shape),
        "slice_axis": case.slice_axis, "spacing": list(case.spacing), "affine": np.asarray(affine).tolist(),
        "modality": case.modality, "channel": case.channel, "window": list(window) if window else None,
        "class_slices": class_slices, **label_info,
    })
    return CachedCase(entry), True


def preprocess_cases(cases: Sequence[Case], cache: str | Path, image_size: int = 128,
                     window: tuple[float, float] | None = None, progress: bool = True) -> list[CachedCase]:
    """Cache every case (skipping valid entries) and write ``<cache>/index.json``."""
    if not cases:
        raise InputError(cache, "no cases to preprocess")
    out = []
    for case in tqdm(cases, desc="preprocess", disable=not progress, unit="case"):
        out.append(preprocess_case(case, cache, image_size, window)[0])
    write_json(Path(cache) / "index.json", {
        "dataset": cases[0].dataset, "image_size": image_size, "cases": [c.id for c in cases],
        "label_map": {str(k): v for k, v in cases[0].label_map.items()},
    })
    return out


def preprocess_dataset(dataset: str, data_path: str | Path, cache: str | Path, image_size: int = 128,
                       window: tuple[float, float] | None = None, progress: bool = True,
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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m icl.data.preprocess", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, choices=sorted(READERS), help="dataset layout")
    p.add_argument("--data_path", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--label_mode", default=None, help="KiTS: per_class | seed")
    p.add_argument("--modality", type=int, default=None, help="MSD/nnU-Net: input channel")
    p.add_argument("--window", default=None, help="CT window 'lo,hi' in HU (default per dataset)")
    a = p.parse_args(argv)
    opts: dict[str, Any] = {}
    if a.label_mode is not None:
        opts["label_mode"] = a.label_mode
    if a.modality is not None:
        opts["modality"] = a.modality
    try:
        if a.image_size < 8:
            raise InputError("--image_size", f"must be >= 8, got {a.image_size}")
        window = None
        if a.window:
            try:
                lo, hi = (float(v) for v in a.window.split(","))
            except ValueError:
                raise InputError("--window", f"expected 'lo,hi', got {a.window!r}") from None
            window = (lo, hi)
        cases = preprocess_dataset(a.dataset, a.data_path, a.cache, a.image_size, window, **opts)
    except InputError as e:
        return report(e)
    print(f"cached {len(cases)} cases in {a.cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
