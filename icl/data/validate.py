"""Input validation for NIfTI volumes and image/label pairs.

Why: a corrupt or mismatched file must stop the run with one line naming the file (``InputError``), before anything
is cached, trained on or written; never a numpy traceback three modules later.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable

import nibabel as nib
import numpy as np

from icl.errors import InputError

AFFINE_TOL = 1e-3  # mm; affines written by different tools differ in float noise only


def load_nifti_header(path: str | Path) -> nib.Nifti1Image:
    """Open a NIfTI lazily (header only); missing or unreadable files raise ``InputError``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, OSError)
        raise InputError(path, f"unreadable NIfTI ({type(e).__name__}: {e})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(path, f"not a NIfTI image ({type(img).__name__})")
    return img


def check_dims(shape: tuple[int, ...], path: str | Path) -> None:
    """A volume is 3D, or 4D with channels last; an axis of size 1 among the first three means a 2D image."""
    if len(shape) not in (3, 4):
        raise InputError(path, f"volume is {len(shape)}D {shape}, expected 3D")
    if min(shape[:3]) < 2:
        raise InputError(path, f"volume {shape} is 2D (an axis of size {min(shape[:3])}), expected 3D")


NONFINITE_RULE = "NaN/-inf -> min, +inf -> max"


def warn_nonfinite(where: str | Path, count: int) -> None:
    """The one warning line of the engine's non-finite rule (printed once per volume)."""
    print(f"warning: {where}: {count} non-finite voxels replaced ({NONFINITE_RULE})", file=sys.stderr)


def no_finite_voxels(where: str | Path) -> InputError:
    return InputError(where, "no finite voxels (every voxel is NaN or inf)")


def replace_nonfinite(arr: np.ndarray, where: str | Path) -> np.ndarray:
    """The engine's one rule for images, in memory: NaN/-inf → finite minimum, +inf → finite maximum (in place
    when ``arr`` is writable); warns once; a volume with no finite voxel is an InputError."""
    if arr.dtype.kind not in "fc":
        return arr
    finite = np.isfinite(arr)
    bad = arr.size - int(np.count_nonzero(finite))
    if bad == 0:
        return arr
    if bad == arr.size:
        raise no_finite_voxels(where)
    lo, hi = arr[finite].min(), arr[finite].max()
    warn_nonfinite(where, bad)
    return np.nan_to_num(arr, copy=not arr.flags.writeable, nan=lo, posinf=hi, neginf=lo)


def pick_channel(shape: tuple[int, ...], channel: int | None, path: str | Path) -> int | None:
    """Which channel of a (channels-last) 4D image to use: required when it has several; None for 3D (a channel
    names a channel of the 4D files only, so a 3D support and a 4D query run with one ``--channel``)."""
    if len(shape) != 4:
        return None
    n = shape[3]
    if channel is None:
        if n > 1:
            raise InputError(path, f"4D image {tuple(shape)} has {n} channels: choose one (--channel 0..{n - 1})")
        return 0
    if not 0 <= int(channel) < n:
        raise InputError(path, f"channel {channel} out of range for image {tuple(shape)} (--channel 0..{n - 1})")
    return int(channel)


def load_nifti_volume(
    path: str | Path, channel: int | None = None, dtype: type | None = None, nonfinite: str = "error"
) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Load a 3D volume (or one ``channel`` of a 4D one): ``(array, affine, header)``, in NIfTI voxel order.

    ``dtype`` None keeps the stored dtype (labels stay integer). ``nonfinite``: "error" (labels: NaN/inf voxels are
    an InputError) or "replace" (images: the engine's rule, see :func:`replace_nonfinite`).
    """
    img = load_nifti_header(path)
    shape = img.shape
    check_dims(shape, path)
    channel = pick_channel(shape, channel, path)
    try:
        arr = np.asanyarray(img.dataobj)
        if len(shape) == 4:
            arr = arr[..., channel]
        arr = np.asarray(arr, dtype=dtype) if dtype is not None else np.asarray(arr)
    except Exception as e:
        raise InputError(path, f"unreadable or truncated NIfTI data ({type(e).__name__}: {e})") from None
    if nonfinite == "replace":
        arr = replace_nonfinite(arr, path)
    elif arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(path, f"{int((~np.isfinite(arr)).sum())} NaN/inf voxels")
    return arr, img.affine.copy(), img.header


def check_grid(
    image_shape: tuple[int, ...], image_affine: np.ndarray, label_shape: tuple[int, ...], label_affine: np.ndarray,
    label_path: str | Path,
) -> None:
    """Image and label must share voxel grid and world placement."""
    if tuple(image_shape[:3]) != tuple(label_shape[:3]):
        raise InputError(label_path,
                         f"label shape {tuple(label_shape)} does not match image shape {tuple(image_shape)}")
    if not np.allclose(image_affine, label_affine, atol=AFFINE_TOL):
        raise InputError(label_path, "label affine does not match the image affine")


def check_integer_labels(label: np.ndarray, path: str | Path) -> None:
    """Label voxels are finite integers: labels, unlike images, have no replacement rule for NaN/inf."""
    if label.dtype.kind != "f":
        return
    if not np.isfinite(label).all():
        raise InputError(path, "NaN/inf voxels in label")
    if not np.array_equal(label, np.round(label)):
        odd = np.unique(label[label != np.round(label)])
        shown = ", ".join(f"{v:g}" for v in odd[:5]) + (f" (and {odd.size - 5} more)" if odd.size > 5 else "")
        raise InputError(path, f"label has non-integer values: {shown}")


def check_label(label: np.ndarray, path: str | Path, allowed: Iterable[int] | None = None) -> np.ndarray:
    """Labels are non-negative integers from ``allowed`` (background 0 always allowed) with some foreground."""
    check_integer_labels(label, path)
    values = np.unique(label)
    if values.size and values.min() < 0:
        raise InputError(path, f"negative label value {int(values.min())}")
    if not (values > 0).any():
        raise InputError(path, "label is empty (no foreground voxels)")
    if allowed is not None:
        unknown = sorted(set(int(v) for v in values) - set(int(a) for a in allowed) - {0})
        if unknown:
            raise InputError(path, f"unknown label values {unknown} (expected {sorted(set(allowed))})")
    return label.astype(np.uint8 if values.max() < 256 else np.int32)


def check_pair(
    image_path: str | Path, label_path: str | Path, channel: int | None = None, allowed: Iterable[int] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load and cross-check an image/label pair: ``(image float32, label int, affine)``, all in NIfTI voxel order.

    Non-finite image voxels follow the engine's rule (replaced, one warning); in the label they are an error.
    """
    image, affine, _ = load_nifti_volume(image_path, channel=channel, dtype=np.float32, nonfinite="replace")
    label, label_affine, _ = load_nifti_volume(label_path)
    check_grid(image.shape, affine, label.shape, label_affine, label_path)
    return image, check_label(label, label_path, allowed), affine


def require_dir(path: str | Path, what: str = "dataset folder") -> Path:
    """Missing or empty folders are user errors, not an empty training run."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, f"{what} not found")
    if not any(path.iterdir()):
        raise InputError(path, f"{what} is empty")
    return path
