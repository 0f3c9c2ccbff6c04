"""ITK's morphological contour interpolation (Albu et al. 2008), the algorithm behind 3D Slicer's "Fill between
slices": the classic fill a user of Slicer would otherwise run, shown beside the engine's by the demo and the
benchmarks. Optional: ``pip install -r bench/requirements-bench.txt`` (ITK is large); without it
:func:`itk_interpolation` returns None and callers say so.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ITK_PACKAGE = "itk-morphologicalcontourinterpolation"


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
        subprocess.run([sys.executable, "-m", "icl.sparse.itk_contour", str(src), str(dst), str(axis)], check=False,
                       capture_output=True, timeout=600)
        if not dst.is_file():
            raise RuntimeError("ITK contour interpolation failed (no output)")
        return np.load(dst)


def _itk_fill(src: str, dst: str, axis: str) -> None:
    """The child's work: numpy [X, Y, Z] -> ITK (index order reversed) -> filled -> numpy, written atomically."""
    import itk  # optional (bench/requirements-bench.txt), and only in the child process

    sparse = np.load(src)
    volume = np.ascontiguousarray(np.transpose(sparse, (2, 1, 0))).astype(np.uint16)
    filled = itk.morphological_contour_interpolator(itk.image_from_array(volume), axis=int(axis))
    out = np.transpose(itk.array_from_image(filled), (2, 1, 0)).astype(sparse.dtype)
    tmp = dst + ".tmp.npy"
    np.save(tmp, out)
    os.replace(tmp, dst)


if __name__ == "__main__":
    _itk_fill(*sys.argv[1:4])
