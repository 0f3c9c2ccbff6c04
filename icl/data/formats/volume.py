"""What every reader of :mod:`icl.data.formats` yields: a :class:`Volume`, the NIfTI reader's own view of a file.

Why one shape for all: the rest of the road (``icl.data.frames.Scan``: closest-canonical orientation, the NaN rule,
windows; the output writers; the viewer) was written against NIfTI's voxel grid — an array indexed ``[i, j, k]``
(channels last) and a 4x4 voxel-to-RAS affine. A reader of another format hands over exactly that, plus a NIfTI
header made from the grid (the writers of a NIfTI output copy it), so nothing downstream knows the file's format.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np

from icl.data.validate import check_dims, pick_channel
from icl.errors import InputError


@dataclass
class Volume:
    """One file's grid and a lazy loader of its voxels (file voxel order, channels last for 4D)."""

    path: Path
    load: Callable[[], np.ndarray]  # the stored voxels of ``channel`` (3D), read on first use
    affine: np.ndarray  # voxel [i, j, k] -> RAS mm
    header: Any  # a NIfTI header (the file's own, or one made from the grid)
    shape: tuple[int, ...]  # the stored shape: 3D, or 4D channels-last
    slope: float = 1.0  # stored value * slope + inter = value (NIfTI's scl_*; readers of other formats apply it)
    inter: float = 0.0
    channel: int | None = None
    segments: tuple[Any, ...] | None = field(default=None)  # a segmentation's segments (``formats.slicer``)


def channel_loader(path: Path, shape: tuple[int, ...], channel: int | None,
                   read: Callable[[], np.ndarray]) -> tuple[int | None, Callable[[], np.ndarray]]:
    """(the channel picked, a loader of that channel's 3D voxels): the dimension and channel rules of NIfTI files
    (``icl.data.validate``) for a reader whose ``read`` gives the whole array, channels last."""
    check_dims(shape, path)
    channel = pick_channel(shape, channel, path)

    def load() -> np.ndarray:
        arr = read()
        if tuple(arr.shape) != tuple(shape):
            raise InputError(path, f"voxels of shape {arr.shape}, but the header says {tuple(shape)}")
        return arr[..., channel] if arr.ndim == 4 else arr

    return channel, load


def nifti_header(shape: tuple[int, ...], affine: np.ndarray, dtype: Any) -> nib.Nifti1Header:
    """A NIfTI header for a grid read from another format (scanner coordinates, no intensity scaling)."""
    header = nib.Nifti1Header()
    header.set_data_shape(tuple(int(s) for s in shape))
    try:
        header.set_data_dtype(np.dtype(dtype))
    except Exception:  # a dtype NIfTI cannot store (bool): the writers set their own
        header.set_data_dtype(np.float32)
    affine = np.asarray(affine, dtype=np.float64)
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    header.set_xyzt_units("mm")
    return header


_SAID: set[str] = set()


def say_once(line: str) -> None:
    """A note or warning about a file, on stderr once per run (a file is opened by several checks)."""
    if line not in _SAID:
        _SAID.add(line)
        print(line, file=sys.stderr)
