"""The result of a segmentation: a label map on the query's own voxel grid, with what saving it and drawing
overlays need (its header, the frames, the self-check table, the support's named segments)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from icl.data.frames import DEFAULT_SLICE_AXIS, Scan, VolumeFrames
from icl.sparse.cross_check import CrossCheck
from icl.sparse.fill import StructureCheck


@dataclass
class Segmentation:
    """A label map on the query's voxel grid, with what is needed to save it and to draw overlays."""

    labels: np.ndarray  # query's own voxel order and shape; original label values, 0 = background
    affine: np.ndarray
    header: nib.Nifti1Header
    query: Path
    classes: list[int]
    support_slices: list[int]  # support-scan slices (canonical axis ``slice_axis``) used as prompts (the model on
    # another scan with weights trained with a prior: the first support's registered slices, on the query's grid)
    mode: str  # "both_ways" (support is the query), "prepended" (another scan's slices tracked), "registered"
    slice_axis: int = DEFAULT_SLICE_AXIS
    frames: VolumeFrames | None = field(default=None, repr=False)  # the query's lazy frames (overlays)
    checks: list[StructureCheck | CrossCheck] = field(default_factory=list)  # the self-check, per structure
    supports: int = 1  # support scans given (several: other scans, registered and fused, or all in memory)
    segments: tuple | None = None  # the support label's named segments (Slicer's): a .seg.nrrd output keeps them

    def report(self) -> dict:
        """The self-check table as written by ``--report`` (JSON-ready)."""
        return {"query": str(self.query), "structures": [c.as_dict() for c in self.checks]}

    def canonical_labels(self) -> np.ndarray:
        """The label map in the frames' canonical orientation (a view; slice ``z`` matches ``frames[z]``)."""
        return self.frames.scan.to_canonical(self.labels) if self.frames is not None else self.labels


def empty_labels(scan: Scan, classes: Sequence[int]) -> np.ndarray:
    """The output label map on the scan's own grid: uint8 while the label values fit, else int16."""
    return np.zeros(scan.shape, dtype=np.uint8 if max(classes) < 256 else np.int16)


def header_3d(scan: Scan) -> nib.Nifti1Header:
    """The query's header for a 3D label map (one channel of a 4D image → a 3D header on the same grid)."""
    header = scan.header.copy()
    if len(header.get_data_shape()) != 3:
        header.set_data_shape(scan.shape)
    return header
