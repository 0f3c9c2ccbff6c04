"""Classic ways a user would otherwise fill or transfer labels — what the engine is compared with in ``bench/``.

* :func:`nearest_copy`: every slice takes the labels of the nearest annotated slice (a user's "copy the mask down";
  the nearest-slice rule is the engine's own, :func:`icl.sparse.classic.nearest_annotated`).
* :func:`classic_fills`: nearest copy and, when installed, ITK's contour interpolation (:mod:`icl.sparse.itk_contour`).
* :func:`random_walker_fill`: scikit-image's random walker seeded by the annotation (optional).
* :func:`affine_label_transfer`: affine registration + label transfer (SimpleITK, optional).

Volumes are label arrays with the slice axis last (``axis=2``), as the engine's canonical axial slices are.
"""
from __future__ import annotations

import importlib.util

import numpy as np

from icl.data.sampling import labelled_slices
from icl.sparse.classic import nearest_annotated
from icl.sparse.itk_contour import itk_interpolation


def nearest_copy(sparse: np.ndarray, axis: int = 2) -> np.ndarray:
    """Every slice gets the labels of the nearest annotated slice (ties: the lower one)."""
    kept = labelled_slices(sparse, axis)
    return np.take(sparse, [nearest_annotated(kept, z) for z in range(sparse.shape[axis])], axis=axis)


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
