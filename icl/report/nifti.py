"""Write predicted masks as NIfTI that line up with the source scan in any viewer (same affine, same header).

The mask must already be on the reference's voxel grid (same shape, same axis order as the reference file);
undoing our slices-first resampling is the data side's job. We copy the reference header, set the integer dtype
(uint8 or int16) and drop intensity scaling so label values are stored verbatim.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from icl.errors import InputError
from icl.io import atomic_path

MASK_DTYPES = (np.uint8, np.int16)


def _reference(reference: str | Path | tuple[np.ndarray, nib.Nifti1Header]) -> tuple[np.ndarray, nib.Nifti1Header]:
    if isinstance(reference, (str, Path)):
        try:
            img = nib.load(str(reference))
        except Exception as exc:  # nibabel raises several types for missing / corrupt files
            raise InputError(reference, f"cannot read reference NIfTI ({exc.__class__.__name__}: {exc})") from None
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise InputError(reference, f"reference is a {type(img).__name__}, expected NIfTI")
        return img.affine, img.header
    affine, header = reference
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"reference affine: expected 4x4, got shape {affine.shape}")
    if not isinstance(header, (nib.Nifti1Header, nib.Nifti2Header)):
        raise ValueError(f"reference header: expected a NIfTI header, got {type(header).__name__}")
    return affine, header


def _squeeze_tail(shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def mask_array(mask: np.ndarray, dtype: type = np.uint8) -> np.ndarray:
    """``mask`` (bool or integer labels) as ``dtype`` (uint8 or int16); non-integer values or values that do not fit
    are a ``ValueError``. Every label-map writer stores its labels through this check."""
    dtype = np.dtype(dtype)
    if dtype not in [np.dtype(d) for d in MASK_DTYPES]:
        raise ValueError(f"dtype: expected uint8 or int16, got {dtype}")
    arr = np.asarray(mask)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.array_equal(arr, np.round(arr)):
            raise ValueError("mask: expected integer labels, got non-integer values")
    info = np.iinfo(dtype)
    if arr.size and (arr.min() < info.min or arr.max() > info.max):
        raise ValueError(f"mask: values {arr.min()}..{arr.max()} do not fit {dtype}")
    return arr.astype(dtype, copy=False)


def write_mask_nifti(
    mask: np.ndarray,
    reference: str | Path | tuple[np.ndarray, nib.Nifti1Header],
    path: str | Path,
    dtype: type = np.uint8,
) -> Path:
    """Write ``mask`` (bool or integer labels) to ``path`` with the reference's affine and header, atomically.

    ``reference`` is a NIfTI path or an ``(affine, header)`` pair. ``dtype`` is ``np.uint8`` (default) or
    ``np.int16``; values that do not fit raise ``ValueError``, as does a shape that differs from the reference.
    """
    affine, ref_header = _reference(reference)
    arr = mask_array(mask, dtype)
    ref_shape = tuple(int(s) for s in ref_header.get_data_shape())
    if _squeeze_tail(arr.shape) != _squeeze_tail(ref_shape):  # a [X,Y,Z,1] reference takes an [X,Y,Z] mask
        raise ValueError(f"mask: shape {arr.shape} differs from the reference's {ref_shape}")

    header = ref_header.copy()
    header.set_data_dtype(arr.dtype)
    header.set_slope_inter(1.0, 0.0)  # labels verbatim: never rescaled by a reader
    klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = klass(arr, affine, header=header)
    # nibabel resets qform/sform codes when given an affine; restore the reference's. The qform is copied verbatim
    # (scanners often store a qform slightly different from the sform); the sform carries the affine.
    q_code, s_code = int(ref_header["qform_code"]), int(ref_header["sform_code"])
    img.set_qform(ref_header.get_qform() if q_code else None, code=q_code)
    img.set_sform(affine, code=s_code if s_code or q_code else 2)
    path = Path(path)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path
