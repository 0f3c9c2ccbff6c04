"""Variants of a real labelled volume: the same anatomy as other contrasts, scanners and subjects would show it.

Why: a model that learns from one T1 scan learns T1's grey levels, and the engine is judged on other contrasts,
species and resolutions. Each variant keeps the anatomy and changes what acquisition changes:

* tissue contrast: a remap of the intensities inside the body (T2/PD-like inversion, a random piecewise-linear
  remap that may reorder tissues, a CT-like narrow window with saturated ends), the air kept dark;
* gamma, a smooth multiplicative bias field, blur and noise;
* (``warped``) a smooth random 3D displacement and a small shift: another subject of the same anatomy, as a
  deformable registration would leave it on the query's grid (the cross-scan support).

The result is windowed the way the engine windows an MR scan (0.5-99.5 percentiles to [0, 1]). Variants form a
finite bank made once per run (``icl.data.real_volumes``), so the frozen encoder's outputs of their crops can be
stored and read again (``-feature_cache auto``). Nothing here is fitted to any scan: every range is a property of
scanners (contrast orderings, bias of a few tens of percent, a few voxels of registration error).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from icl.data.frames import MR_PERCENTILES, PERCENTILE_VOXEL_BUDGET, percentile_step, window01

AIR = 0.02  # windowed intensity at or below which a voxel counts as air (stays dark in every contrast)
CONTRASTS = ("as_is", "inverted", "remap", "ct_window")  # contrast kinds, cycled over the bank's contrast groups
WARP_VOXELS = (1.0, 3.0)  # smooth displacement amplitude (voxels, standard deviation per axis)
WARP_SHIFT = 2.0  # global shift of a warped variant (voxels, each axis)
WARP_GRID = 5  # control points per axis of the smooth displacement


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], grid: int) -> np.ndarray:
    """A smooth random field of unit standard deviation on ``shape`` (cubic upsampling of ``grid`` points/axis)."""
    coarse = rng.standard_normal((grid,) * len(shape)).astype(np.float32)
    field = ndimage.zoom(coarse, [s / grid for s in shape], order=3, mode="nearest", grid_mode=True)
    field = field[tuple(slice(0, s) for s in shape)]
    if field.shape != tuple(shape):  # zoom may round one short: pad by repeating the edge
        field = np.pad(field, [(0, s - f) for s, f in zip(shape, field.shape)], mode="edge")
    return field / max(float(field.std()), 1e-6)


def contrast_remap(rng: np.random.Generator, image: np.ndarray, kind: str) -> np.ndarray:
    """``image`` ([0, 1]) with its tissue contrast changed by ``kind`` (one of :data:`CONTRASTS`); air stays 0."""
    body = image > AIR
    out = image.astype(np.float32, copy=True)
    if kind == "as_is" or not body.any():
        return out
    x = image[body]
    if kind == "inverted":  # T2 / PD-like: fluid bright, white matter dark
        y = (1.0 - x) ** float(rng.uniform(0.7, 1.4)) * float(rng.uniform(0.7, 1.0)) + float(rng.uniform(0, 0.2))
    elif kind == "remap":  # tissues reordered: 5 knots at the body's quantiles, random levels
        knots = np.quantile(x, np.linspace(0, 1, 5))
        knots = np.maximum.accumulate(knots + np.arange(5) * 1e-6)
        y = np.interp(x, knots, rng.uniform(0.1, 1.0, 5))
    elif kind == "ct_window":  # soft-tissue window: low tissue contrast, saturated ends
        lo, hi = np.quantile(x, [0.02, 0.98])
        centre = lo + (hi - lo) * float(rng.uniform(0.3, 0.7))
        width = (hi - lo) * float(rng.uniform(0.5, 2.5))
        y = np.clip((x - centre) / width + 0.5, 0.0, 1.0) * float(rng.uniform(0.5, 0.9)) + 0.1
    else:
        raise ValueError(f"unknown contrast {kind!r}; choose from {', '.join(CONTRASTS)}")
    out[body] = y
    return out


def acquisition(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Gamma, a smooth bias field, blur and noise on a [0, 1] volume (float32, not windowed yet)."""
    out = image ** float(rng.uniform(0.6, 1.6))
    bias = np.exp(float(rng.uniform(0.05, 0.3)) * _smooth_field(rng, image.shape, 3))
    out = out * bias
    sigma = float(rng.uniform(0.0, 0.8))
    if sigma > 0.2:
        out = ndimage.gaussian_filter(out, sigma)
    out = out + rng.normal(0.0, float(rng.uniform(0.0, 0.04)), out.shape).astype(np.float32)
    return out.astype(np.float32, copy=False)


def window_mr(image: np.ndarray) -> np.ndarray:
    """The engine's MR rule (``icl.data.frames.mr_percentiles``) on a whole volume: its 0.5-99.5 percentiles
    (over the same regular subsample) to [0, 1], clipped (float32)."""
    step = percentile_step(image.shape, PERCENTILE_VOXEL_BUDGET)
    lo, hi = (float(p) for p in np.percentile(image[::step, ::step, ::step], MR_PERCENTILES))
    return window01(image, lo, max(hi, lo + 1e-6))


def smooth_warp(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (linear) and ``labels`` (nearest) moved by one smooth random displacement plus a small shift."""
    amplitude = float(rng.uniform(*WARP_VOXELS))
    grid = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in image.shape), indexing="ij", copy=False)
    coords = [g + amplitude * _smooth_field(rng, image.shape, WARP_GRID) + float(rng.uniform(-WARP_SHIFT, WARP_SHIFT))
              for g in grid]
    moved = ndimage.map_coordinates(image, coords, order=1, mode="nearest").astype(np.float32)
    moved_labels = ndimage.map_coordinates(labels, coords, order=0, mode="constant", cval=0).astype(labels.dtype)
    return moved, moved_labels


def make_variant(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray, contrast: str, warped: bool,
                 acquire: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One variant (image windowed to [0, 1], labels on the same grid) of a windowed volume and its labels."""
    out = contrast_remap(rng, image, contrast)
    if acquire:
        out = acquisition(rng, out)
    if warped:
        out, labels = smooth_warp(rng, out, labels)
    return window_mr(out), labels
