"""The NIfTI reader: ``.nii`` / ``.nii.gz`` as napari layers, in the engine's own view of a scan.

Voxels in the closest canonical (RAS) orientation (``icl.data.frames.Scan``, the view every frame of the engine
is cut from), so an LPS file shows the same anatomy as its RAS copy; the voxel spacing is the layer's scale, the
canonical affine's origin its translate, and the file's affine and header stay in ``layer.metadata`` (the widget
and the writer go back to the file's grid with them). A label map (few non-negative integer values, the rule
query folders use) opens as a Labels layer, anything else as an image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from napari.utils.notifications import show_error

from icl.data.frames import Scan
from icl.errors import InputError
from icl.infer.query_folder import is_nifti, label_map_reason
from icl.napari.grid import Grid

LayerData = tuple[np.ndarray, dict[str, Any], str]


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """npe2's reader hook: our reader for NIfTI paths, None for anything else (another plugin may read it)."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    return read_nifti if paths and all(is_nifti(Path(p)) for p in paths) else None


def read_nifti(path: str | list[str]) -> list[LayerData]:
    """One layer per file; a file that cannot be read is one line in napari's notifications, and no layer."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    layers = []
    for p in paths:
        try:
            layers.append(nifti_layer(Path(p)))
        except InputError as err:
            show_error(f"error: {err}")
    return layers


def nifti_layer(path: Path) -> LayerData:
    """``(data, kwargs, "image" | "labels")`` of one NIfTI file, canonical orientation (module docstring)."""
    scan = Scan.open(path)
    grid = Grid(scan.affine, scan.header, scan.shape, str(path))
    data = np.asarray(scan.canonical)
    kwargs: dict[str, Any] = {"name": _stem(path), "scale": grid.scale, "translate": grid.translate,
                              "metadata": grid.metadata()}
    if label_map_reason(path) is not None:
        return _as_labels(data), kwargs, "labels"
    lo, hi = scan.finite_range  # the engine's non-finite rule sees the same range (and warns once)
    kwargs["contrast_limits"] = (lo, hi if hi > lo else lo + 1)
    return data, kwargs, "image"


def _as_labels(data: np.ndarray) -> np.ndarray:
    """Label values as integers (a label map stored as floats holds whole numbers: the reader checked)."""
    if data.dtype.kind in "iu":
        return np.ascontiguousarray(data)  # painted in place: a plain copy, not a view of the file
    top = float(data.max()) if data.size else 0.0
    return data.astype(np.uint8 if top < 256 else np.int16 if top < 2**15 else np.int32)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
