"""What the API takes as a scan (a NIfTI path, a nibabel image, an array with its affine), and when two scans are
the same scan: by content (grid, affine, voxel values), so a copy of a file is the file and a renamed path is not
a different scan.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from icl.data.frames import Scan
from icl.data.validate import AFFINE_TOL, check_dims, pick_channel
from icl.errors import InputError
from icl.io import same_file

ACCEPTED = "a NIfTI path, a nibabel image, an array or an (array, affine) pair"


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


def describe(source: Any) -> str:
    """How a scan is named in messages and results: its path, or ``<what>`` for an in-memory one."""
    return str(source) if isinstance(source, (str, Path)) else "<array>"


def content_digest(scan: Scan) -> str:
    """A hash of the scan's voxel values (after scl_slope/inter, in canonical order), read in bounded slabs."""
    if "digest" not in scan.memo:
        h = hashlib.blake2b(digest_size=16)
        for block in scan.blocks():
            h.update(np.ascontiguousarray(block, dtype=np.float32).tobytes())
        scan.memo["digest"] = h.hexdigest()
    return scan.memo["digest"]


def same_grid(a: Scan, b: Scan) -> bool:
    """Same voxel grid in space: shape and affine (within the label/image tolerance)."""
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=AFFINE_TOL)


def same_scan(a: Scan, b: Scan) -> bool:
    """One scan, whatever the file names: same grid, affine and voxel values."""
    return a is b or (same_grid(a, b) and content_digest(a) == content_digest(b))


DIRECTIONS = ("auto", "both", "forward")


def check_direction(direction: str) -> str:
    """``auto`` (by content), ``both`` (the query is the support scan) or ``forward`` (support from another scan)."""
    if direction not in DIRECTIONS:
        raise InputError("--direction", f"expected one of {', '.join(DIRECTIONS)}, got {direction!r}")
    return direction


def decide_both_ways(direction: str, query: Scan, support: Scan) -> bool:
    """Whether the support's masks stay on their own slices of the query, tracked both ways (else: prepended,
    forward). ``auto``: exactly when the query is the support scan by content."""
    if direction == "forward":
        return False
    if direction == "both":
        if not same_grid(query, support):
            raise InputError("--direction", "both keeps the support masks on the query's own slices: the query "
                                            f"must be on the support's grid (shape {support.shape}, same affine), "
                                            f"got shape {query.shape}")
        return True
    return same_file(query.path, support.path) or same_scan(query, support)
