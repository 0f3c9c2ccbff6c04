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


def annotate_sparse(label: np.ndarray, classes: list[int], step: int, style: str = "per_structure",
                    axis: int = 2) -> tuple[np.ndarray, dict[int, list[int]]]:
    """An annotator's sparse label, the development protocol's way (``../shared/data/inia19/README.md``):

    * ``per_structure``: structure ``c`` drawn on slices ``z0 + step//2, + step, …`` of its own extent ``z0..z1``
      (its middle slice only when the extent has ≤ ``step`` slices); a slice drawn for ``c`` carries ``c`` only;
    * ``complete``: every structure drawn on the same slices, chosen that way from the union extent.

    Returns the sparse label and, per structure, the slices on which it is annotated (drawn and present)."""
    zhw = np.moveaxis(label, axis, 0)

    def pick(z0: int, z1: int) -> list[int]:
        return [(z0 + z1) // 2] if z1 - z0 + 1 <= step else list(range(z0 + step // 2, z1 + 1, step))

    extents = {c: np.flatnonzero((zhw == c).reshape(zhw.shape[0], -1).any(1)) for c in classes}
    if style == "complete":
        union = np.concatenate([e for e in extents.values()])
        shared = pick(int(union.min()), int(union.max()))
        chosen = {c: shared for c in classes}
    else:
        chosen = {c: pick(int(e[0]), int(e[-1])) for c, e in extents.items()}
    sparse = np.zeros_like(label)
    out_zhw = np.moveaxis(sparse, axis, 0)
    drawn = {}
    for c, zs in chosen.items():
        for z in zs:
            out_zhw[z][zhw[z] == c] = c
        drawn[c] = [z for z in zs if (zhw[z] == c).any()]
    return sparse, drawn


def sparse_dice(pred: np.ndarray, truth: np.ndarray, classes: list[int],
                skip: dict[int, list[int]] | None = None, axis: int = 2) -> dict[int, float]:
    """3D Dice per structure (``pred == c`` vs ``truth == c``) on the slices where it was not annotated
    (``skip[c]``); NaN where both are empty there."""
    from icl.engine.metrics import binary_dice

    out = {}
    for c in classes:
        keep = np.ones(pred.shape[axis], bool)
        if skip:
            keep[skip[c]] = False
        out[c] = float(binary_dice(np.compress(keep, pred == c, axis=axis), np.compress(keep, truth == c, axis=axis)))
    return out


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


def random_walker_fill(image: np.ndarray, sparse: np.ndarray, drawn: dict[int, list[int]], axis: int = 2,
                       beta: float = 130, margin: int = 8) -> np.ndarray | None:
    """scikit-image's ``random_walker`` per structure (None when scikit-image is not installed): seeds are the
    structure and the rest of its annotated slices, in its bounding box (``margin`` voxels wider in-plane, half
    an annotation spacing beyond its outermost slices); overlaps go to the higher probability."""
    if importlib.util.find_spec("skimage") is None:
        return None
    from skimage.segmentation import random_walker

    img, lab = np.moveaxis(image, axis, 0), np.moveaxis(sparse, axis, 0)
    lo, hi = np.percentile(img, (0.5, 99.5))
    img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    out, best = np.zeros(lab.shape, sparse.dtype), np.zeros(lab.shape, np.float32)
    for c, zs in drawn.items():
        if not zs:
            continue
        reach = int(np.median(np.diff(zs))) // 2 if len(zs) > 1 else 0
        z0, z1 = max(zs[0] - reach, 0), min(zs[-1] + reach + 1, lab.shape[0])
        ys, xs = np.nonzero((lab[zs] == c).any(0))
        y0, y1 = max(ys.min() - margin, 0), min(ys.max() + margin + 1, lab.shape[1])
        x0, x1 = max(xs.min() - margin, 0), min(xs.max() + margin + 1, lab.shape[2])
        seeds = np.zeros((z1 - z0, y1 - y0, x1 - x0), np.int32)
        for z in zs:
            seeds[z - z0] = np.where(lab[z, y0:y1, x0:x1] == c, 1, 2)
        if len(zs) == 1 and reach == 0:
            prob = (seeds == 1).astype(np.float32)
        else:
            prob = random_walker(img[z0:z1, y0:y1, x0:x1], seeds, beta=beta, mode="cg", return_full_prob=True)[0]
        region, labels = best[z0:z1, y0:y1, x0:x1], out[z0:z1, y0:y1, x0:x1]
        win = (prob > 0.5) & (prob > region)
        region[win], labels[win] = prob[win], c
    return np.moveaxis(out, 0, axis)


def affine_label_transfer(fixed: np.ndarray, moving: np.ndarray, moving_label: np.ndarray) -> np.ndarray | None:
    """Affine registration of ``moving`` onto ``fixed`` (SimpleITK: Mattes mutual information, 3 levels) and its
    labels carried over (nearest neighbour); None when SimpleITK is not installed."""
    if importlib.util.find_spec("SimpleITK") is None:
        return None
    import SimpleITK as sitk

    f = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(fixed, (2, 1, 0))).astype(np.float32))
    m = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(moving, (2, 1, 0))).astype(np.float32))
    init = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(3),
                                             sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.05, seed=0)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 200)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SetInitialTransform(init, inPlace=False)
    transform = reg.Execute(f, m)
    lab = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(moving_label, (2, 1, 0))).astype(np.int32))
    moved = sitk.Resample(lab, f, transform, sitk.sitkNearestNeighbor, 0)
    return np.transpose(sitk.GetArrayFromImage(moved), (2, 1, 0)).astype(moving_label.dtype)


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
