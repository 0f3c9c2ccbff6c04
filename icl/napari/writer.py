"""The writer: a Labels layer back to a label-map file on the grid of the scan it was drawn on (its voxel order,
affine and header), atomically, by the engine's one label-map writer (``icl.report.label_map``): the format
follows the file name (NIfTI, NRRD, MetaImage, or a 3D Slicer ``.seg.nrrd`` that keeps the segment names and
colours the layer came with).

The layer's grid is the one kept in its metadata (a layer the reader opened, or the widget's fill); a Labels layer
made in napari has none and is written on the canonical grid its scale and translate describe.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from napari.utils.notifications import show_error

from icl.errors import InputError
from icl.infer.outputs import label_map_name
from icl.napari.grid import Grid
from icl.napari.reader import SEGMENTS
from icl.report.label_map import write_label_map


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """npe2's single-layer writer hook: the written path, or no path (and one line in napari) on bad input."""
    try:
        return [str(save_labels(path, np.asarray(data), meta))]
    except (InputError, ValueError) as err:
        show_error(f"error: {path}: {err}" if isinstance(err, ValueError) else f"error: {err}")
        return []


def save_labels(path: str, data: np.ndarray, meta: dict) -> Any:
    """Write ``data`` (a Labels layer's canonical-order array) on its grid (module docstring)."""
    if data.ndim != 3:
        raise ValueError(f"labels are {data.ndim}D {data.shape}: a label map here is 3D")
    grid = Grid.of_layer(data.shape, meta.get("metadata"), meta.get("scale"), meta.get("translate"))
    values = grid.file_order(data)
    top, low = (int(values.max()), int(values.min())) if values.size else (0, 0)
    if low < 0 or top >= 2**15:
        raise ValueError(f"label values {low}..{top} do not fit a label map (0..32767)")
    dtype = np.uint8 if top < 256 else np.int16
    segments = (meta.get("metadata") or {}).get(SEGMENTS)
    return write_label_map(values, grid.affine, grid.label_header(), label_map_name(path), dtype=dtype,
                           segments=segments)
