"""THE label-map writer: a label map on a scan's grid, written in the format its file name asks for — NIfTI
(``icl.report.nifti``: the reference's own header), NRRD, MetaImage, or a 3D Slicer segmentation (``.seg.nrrd``)
whose segments keep the names, colours and label values they came with (``icl.data.formats.slicer``).

Why one writer: the CLI, the API and the viewer save the same label map; the format is the only thing a user
chooses, by the suffix of ``--out`` (or of the viewer's save dialog). Every format is written atomically.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from icl.data.formats import OUTPUT_SUFFIXES, output_suffix
from icl.data.formats.itk import image_of, write_image
from icl.data.formats.slicer import Segment, segment_fields, segments_for
from icl.errors import InputError
from icl.report.nifti import mask_array, write_mask_nifti


def write_label_map(labels: np.ndarray, affine: np.ndarray, header, path: str | Path, dtype: type = np.uint8,
                    segments: Sequence[Segment] | None = None, values: Iterable[int] | None = None) -> Path:
    """Write ``labels`` (the scan's voxel order) on ``affine``'s grid to ``path``. A ``.seg.nrrd`` gets one segment
    per label value in ``values`` (default: the values present): those ``segments`` name keep their name, colour,
    ID and terminology; the others are named ``Segment_<value>``, their number kept."""
    path = Path(path)
    suffix = output_suffix(path)
    if suffix is None:
        raise InputError(path, f"not a label-map file name: expected {', '.join(OUTPUT_SUFFIXES)}")
    if suffix in (".nii.gz", ".nii"):
        return write_mask_nifti(labels, (affine, header), path, dtype=dtype)
    arr = mask_array(labels, dtype)
    if arr.ndim != 3:
        raise ValueError(f"mask: a label map is 3D, got shape {arr.shape}")
    fields = {}
    if suffix == ".seg.nrrd":
        present = np.unique(arr) if values is None else values
        fields = segment_fields(arr, segments_for(present, segments))
    return write_image(image_of(arr, affine, fields), path)
