"""NIfTI (``.nii``, ``.nii.gz``) through nibabel: the engine's first format, and the one the others imitate."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from icl.data.formats.volume import Volume
from icl.data.validate import check_dims, load_nifti_header, pick_channel
from icl.errors import InputError

SUFFIXES = (".nii.gz", ".nii")


def open_nifti(path: Path, channel: int | None = None) -> Volume:
    """The header now; the stored (unscaled) voxels of ``channel`` on first use — a memmap for an uncompressed
    ``.nii``; ``scl_slope``/``scl_inter`` are kept apart and applied by the scan."""
    img = load_nifti_header(path)
    check_dims(img.shape, path)
    channel, proxy = pick_channel(img.shape, channel, path), img.dataobj

    def load() -> np.ndarray:
        try:  # the stored dtype, unscaled: a memmap for uncompressed .nii
            raw = proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else np.asanyarray(proxy)
        except Exception as e:  # nibabel/zlib/mmap raise many types
            raise InputError(path, f"unreadable or truncated NIfTI data ({type(e).__name__}: {e})") from None
        return raw[..., channel] if raw.ndim == 4 else raw

    slope, inter = (float(getattr(proxy, k, d)) for k, d in (("slope", 1.0), ("inter", 0.0)))
    return Volume(path, load, img.affine, img.header, tuple(img.shape), slope, inter, channel)


def stored_shape(path: Path) -> tuple[int, ...]:
    return tuple(int(s) for s in load_nifti_header(path).shape)
