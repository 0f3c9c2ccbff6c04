"""Classic ways to fill a scan annotated on a few slices — what the engine's sparse → dense is compared with.

* :func:`nearest_copy`: every slice takes the labels of the nearest annotated slice (a user's "copy the mask down").
* :func:`itk_interpolation`: ITK's morphological contour interpolation (Albu et al. 2008), the algorithm behind
  3D Slicer's "Fill between slices". Optional: ``pip install -r bench/requirements-bench.txt`` (ITK is large);
  without it the function returns None and callers say so.
* :func:`sparse_label`: a dense label volume annotated only on every k-th slice (to simulate such a user).

Volumes are label arrays with the slice axis last (``axis=2``), as the engine's canonical axial slices are.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from icl.data.sampling import labelled_slices

ITK_PACKAGE = "itk-morphologicalcontourinterpolation"


def sparse_label(label: np.ndarray, every: int, axis: int = 2) -> tuple[np.ndarray, list[int]]:
    """``label`` kept on every ``every``-th slice from its first labelled one (else 0); returns it and those slices."""
    first = labelled_slices(label, axis)[0]
    kept = list(range(first, label.shape[axis], every))
    sparse = np.zeros_like(label)
    index: list = [slice(None)] * label.ndim
    index[axis] = kept
    sparse[tuple(index)] = label[tuple(index)]
    return sparse, kept


def nearest_copy(sparse: np.ndarray, axis: int = 2) -> np.ndarray:
    """Every slice gets the labels of the nearest annotated slice (ties: the lower one)."""
    kept = np.array(labelled_slices(sparse, axis))
    source = kept[np.abs(np.arange(sparse.shape[axis])[:, None] - kept[None]).argmin(1)]
    return np.take(sparse, source, axis=axis)


def itk_interpolation(sparse: np.ndarray, axis: int = 2) -> np.ndarray | None:
    """ITK morphological contour interpolation of every label between annotated slices along ``axis`` (slices
    before the first or after the last annotation stay empty: it interpolates, it does not extrapolate).
    None when ITK is not installed.

    Runs in a child process: the SWIG-wrapped ITK was seen to corrupt the heap at interpreter exit next to torch
    ("malloc_consolidate(): unaligned fastbin chunk"), which must not take the caller down with it.
    """
    if importlib.util.find_spec("itk") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "sparse.npy", Path(tmp) / "filled.npy"
        np.save(src, np.ascontiguousarray(sparse))
        subprocess.run([sys.executable, "-m", "icl.baselines", str(src), str(dst), str(axis)], check=False,
                       capture_output=True, timeout=600)
        if not dst.is_file():
            raise RuntimeError("ITK contour interpolation failed (no output)")
        return np.load(dst)


def classic_fills(sparse: np.ndarray, axis: int = 2) -> dict[str, np.ndarray]:
    """The baselines a fill is compared with, by display name: nearest-slice copy, and ITK's interpolation when
    installed (absent from the dict otherwise)."""
    fills = {"nearest annotated slice": nearest_copy(sparse, axis)}
    itk = itk_interpolation(sparse, axis)
    if itk is not None:
        fills["ITK contour interpolation"] = itk
    return fills


def _itk_fill(src: str, dst: str, axis: str) -> None:
    """The child's work: numpy [X, Y, Z] -> ITK (index order reversed) -> filled -> numpy, written atomically."""
    import itk

    sparse = np.load(src)
    volume = np.ascontiguousarray(np.transpose(sparse, (2, 1, 0))).astype(np.uint16)
    filled = itk.morphological_contour_interpolator(itk.image_from_array(volume), axis=int(axis))
    out = np.transpose(itk.array_from_image(filled), (2, 1, 0)).astype(sparse.dtype)
    tmp = dst + ".tmp.npy"
    np.save(tmp, out)
    os.replace(tmp, dst)


if __name__ == "__main__":
    _itk_fill(*sys.argv[1:4])
