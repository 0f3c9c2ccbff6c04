"""The reader: scans and label maps of every format the engine reads (NIfTI, NRRD, 3D Slicer's ``.seg.nrrd``,
MetaImage, a DICOM series folder) as napari layers, in the engine's own view of a scan.

Voxels in the closest canonical (RAS) orientation (``icl.data.frames.Scan``, the view every frame of the engine
is cut from), so an LPS file shows the same anatomy as its RAS copy; the voxel spacing is the layer's scale, the
canonical affine's origin its translate, and the file's affine and header stay in ``layer.metadata`` (the widget
and the writer go back to the file's grid with them). A label map (a Slicer segmentation, or few non-negative
integer values: the rule query folders use) opens as a Labels layer — a segmentation's segment names as its
features (``index``: the label value, ``name``), their colours as its colormap, the segments kept in its metadata
for the writer — anything else as an image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from napari.utils.notifications import show_error

from icl.data.formats import format_of, suffix_of
from icl.data.frames import Scan
from icl.errors import InputError
from icl.infer.query_folder import label_map_reason
from icl.napari.grid import Grid

LayerData = tuple[np.ndarray, dict[str, Any], str]
SEGMENTS = "segments"  # layer.metadata[SEGMENTS]: the segments (icl.data.formats.slicer.Segment) a label map names


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """npe2's reader hook: our reader for paths of a format read here (a DICOM folder too), None for anything
    else (another plugin may read it)."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    return read_scans if paths and all(format_of(Path(p)) is not None for p in paths) else None


def read_scans(path: str | list[str]) -> list[LayerData]:
    """One layer per file; a file that cannot be read is one line in napari's notifications, and no layer."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    layers = []
    for p in paths:
        try:
            layers.append(scan_layer(Path(p)))
        except InputError as err:
            show_error(f"error: {err}")
    return layers


def scan_layer(path: Path) -> LayerData:
    """``(data, kwargs, "image" | "labels")`` of one file or DICOM series, canonical orientation (module docstring)."""
    scan = Scan.open(path)
    grid = Grid(scan.affine, scan.header, scan.shape, str(path))
    data = np.asarray(scan.canonical)
    kwargs: dict[str, Any] = {"name": _stem(path), "scale": grid.scale, "translate": grid.translate,
                              "metadata": grid.metadata()}
    if scan.segments is not None or label_map_reason(path) is not None:
        labels = _as_labels(data)
        kwargs.update(segment_kwargs(scan.segments, np.unique(labels)))
        kwargs["metadata"][SEGMENTS] = scan.segments
        return labels, kwargs, "labels"
    lo, hi = scan.finite_range  # the engine's non-finite rule sees the same range (and warns once)
    kwargs["contrast_limits"] = (lo, hi if hi > lo else lo + 1)
    return data, kwargs, "image"


def segment_kwargs(segments: Sequence[Any] | None, values: Sequence[int]) -> dict[str, Any]:
    """A Labels layer's ``features`` (one row per label value: ``index``, ``name``) and, for named segments, a
    colormap of their colours; empty for a label map that names nothing."""
    if not segments:
        return {}
    named = {s.value: s for s in segments}
    rows = sorted({0, *(int(v) for v in values), *named})
    colors = {None: (0.0, 0.0, 0.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0)}
    colors.update({v: (*named[v].color, 1.0) for v in named})
    return {"features": {"index": rows, "name": [named[v].name if v in named else ("background" if v == 0 else
                                                                                   f"Segment_{v}") for v in rows]},
            "colormap": colors}


def _as_labels(data: np.ndarray) -> np.ndarray:
    """Label values as integers (a label map stored as floats holds whole numbers: the reader checked)."""
    if data.dtype.kind in "iu":
        return np.ascontiguousarray(data)  # painted in place: a plain copy, not a view of the file
    top = float(data.max()) if data.size else 0.0
    return data.astype(np.uint8 if top < 256 else np.int16 if top < 2**15 else np.int32)


def _stem(path: Path) -> str:
    suffix = suffix_of(path)
    return path.name[: -len(suffix)] if suffix else path.name
