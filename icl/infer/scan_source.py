"""What the API takes as a scan (a path of any format ``icl.data.formats`` reads, a nibabel image, an array with its
affine), and when two scans are the same scan: by content, in world space, so a copy of a file is the file and a
renamed path is not a different scan.

"The same scan" (:func:`compare_scans`): after the closest-canonical reorientation (the engine reads every scan
that way) the same voxel grid in space — canonical shape and affine — and the same voxel values within what storing
them can change: a re-save as int16 with ``scl_slope`` rounds each value by up to half a step, float64 → float32
by one part in 2^24. So an LPS copy of a RAS file, a re-save with scaling and a float32 copy of a float64 scan are
all the scan itself; a value that differs by more than its storage's precision makes another scan.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from icl.data.formats import format_of
from icl.data.frames import Scan
from icl.data.validate import AFFINE_TOL, check_dims, pick_channel
from icl.errors import InputError
from icl.io import same_file

ACCEPTED = ("a path (NIfTI, NRRD, MetaImage, a DICOM series), a nibabel image, an array or an (array, affine) "
            "pair")


def open_scan(source: Any, channel: int | None = None, what: str = "scan") -> Scan:
    """``source`` as a lazily read :class:`Scan`; anything else is an InputError naming ``what``."""
    if isinstance(source, Scan):
        return source
    if isinstance(source, (str, Path)):
        return Scan.open(source, channel)
    if isinstance(source, nib.spatialimages.SpatialImage):
        return _from_image(source, channel, what)
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], np.ndarray):
        array, affine = source
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.isfinite(affine).all():
            raise InputError(what, f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
        return _from_image(nib.Nifti1Image(array, affine), channel, what)
    if isinstance(source, np.ndarray):
        return _from_image(nib.Nifti1Image(source, np.eye(4)), channel, what)
    raise InputError(what, f"expected {ACCEPTED}, got {type(source).__name__}")


def _from_image(img: Any, channel: int | None, what: str) -> Scan:
    """An in-memory image as a scan: the same dimension and channel rules as a file (``Scan.open``)."""
    data = np.asanyarray(img.dataobj)
    if data.dtype.kind not in "biuf":
        raise InputError(what, f"voxels must be numbers, got dtype {data.dtype}")
    check_dims(img.shape, what)
    channel = pick_channel(img.shape, channel, what)
    voxels = data[..., channel] if data.ndim == 4 else data
    header = img.header if isinstance(img, nib.Nifti1Image) else nib.Nifti1Header()
    return Scan(f"<{what}>", lambda: voxels, img.affine, header, voxels.shape)


def segments_of(label: Any) -> tuple | None:
    """The segments a label names (a Slicer segmentation's names, colours, values; the first of a list's), read
    from its header only; None for a label that names none (NIfTI, arrays)."""
    label = label[0] if isinstance(label, list) and label else label
    if isinstance(label, Scan):
        return label.segments
    if isinstance(label, (str, Path)) and format_of(label) == "nrrd":
        return Scan.open(label).segments
    return None


def describe(source: Any) -> str:
    """How a scan is named in messages and results: its path, or ``<what>`` for an in-memory one."""
    return str(source) if isinstance(source, (str, Path)) else "<array>"


FLOAT32_RELATIVE = 2.0 ** -23  # two float32 roundings of a value (a float64 re-saved as float32, then read)


def canonical_affine(scan: Scan) -> np.ndarray:
    """The affine of the scan's canonical (RAS-ordered) voxel array: the same grid whatever the file's order."""
    return scan.affine @ nib.orientations.inv_ornt_aff(scan.ornt, scan.shape)


def same_grid(a: Scan, b: Scan) -> bool:
    """The same voxel grid in space, read canonically: canonical shape and affine (within the label/image
    tolerance), so a RAS file and its LPS copy share their grid."""
    return (a.canonical_shape == b.canonical_shape
            and np.allclose(canonical_affine(a), canonical_affine(b), atol=AFFINE_TOL))


def storage_step(scan: Scan) -> float:
    """How far a stored value may sit from the value it stores: integer storage rounds to ``|scl_slope|``; float
    storage is exact up to its relative precision (counted apart)."""
    return abs(scan.slope) if scan.raw.dtype.kind in "biu" and scan.scaled else 0.0


@dataclass(frozen=True)
class Comparison:
    """Whether two scans are the same scan, and what the voxel values say (for the line that explains it)."""

    same: bool
    grid: bool  # the same canonical grid
    largest_difference: float | None = None  # over all voxels (None: grids differ)
    tolerance: float | None = None  # allowed by storage: half a scaling step each, plus float32 rounding

    def why(self) -> str:
        if not self.grid:
            return "it is on another grid (shape or affine)"
        return (f"its voxel values differ by up to {self.largest_difference:.4g}, more than storage precision "
                f"allows ({self.tolerance:.3g})")


def compare_scans(a: Scan, b: Scan) -> Comparison:
    """:func:`same_scan` with its evidence: one slab-wise pass over both scans' canonical values."""
    if a is b:
        return Comparison(True, True, 0.0, 0.0)
    if not same_grid(a, b):
        return Comparison(False, False)
    step = (storage_step(a) + storage_step(b)) / 2
    largest, worst_tol, same = 0.0, step, True
    for block_a, block_b in zip(a.blocks(), b.blocks()):
        da, db = block_a.astype(np.float64), block_b.astype(np.float64)
        both_nan = np.isnan(da) & np.isnan(db)
        diff = np.where(both_nan, 0.0, np.abs(da - db))
        tol = step * (1 + 1e-6) + FLOAT32_RELATIVE * np.maximum(np.abs(da), np.abs(db))
        over = ~(diff <= np.where(np.isfinite(tol), tol, 0.0)) & ~(da == db)
        if diff.size:
            largest = max(largest, float(np.nanmax(diff)) if np.isfinite(diff).any() else np.inf)
        if over.any():
            same = False
            worst_tol = float(np.max(tol[over]))
    return Comparison(same, True, largest, worst_tol)


def same_scan(a: Scan, b: Scan) -> bool:
    """One scan, whatever the file names, orientation or storage (module docstring)."""
    return compare_scans(a, b).same


DIRECTIONS = ("auto", "both", "forward")


def check_direction(direction: str) -> str:
    """``auto`` (by content), ``both`` (the query is the support scan) or ``forward`` (support from another scan)."""
    if direction not in DIRECTIONS:
        raise InputError("--direction", f"expected one of {', '.join(DIRECTIONS)}, got {direction!r}")
    return direction


def decide_both_ways(direction: str, query: Scan, support: Scan) -> tuple[bool, Comparison | None]:
    """Whether the support's masks stay on their own slices of the query, tracked both ways (else: prepended,
    forward), and with ``auto`` the comparison it rests on: both ways exactly when the query is the support scan
    by content (:func:`compare_scans`)."""
    if direction == "forward":
        return False, None
    if direction == "both":
        if not same_grid(query, support):
            raise InputError("--direction", "both keeps the support masks on the query's own slices: the query "
                                            f"must be on the support's grid (shape {support.canonical_shape} read "
                                            f"canonically, same affine), got shape {query.canonical_shape}")
        return True, None
    if same_file(query.path, support.path):
        return True, None
    comparison = compare_scans(query, support)
    return comparison.same, comparison
