"""Overlay PNGs for eyeballing results: grey image, truth in green, prediction in red (tinted fill + solid contour).

Overlap of truth and prediction fills yellowish; the contours stay pure colours (prediction drawn last), so a
reviewer can tell under- from over-segmentation at a glance. Case overlays (``eval_3d.py -save_pic``) show the
cache's canonical axial slices the radiological way and are named by plane.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from icl.io import atomic_path

TRUTH_RGB = (0, 255, 0)
PRED_RGB = (255, 0, 0)
FILL_ALPHA = 0.35
PLANES = {0: "sagittal", 1: "coronal", 2: "axial"}  # the canonical (RAS) axis a slice is cut across


def radiological(plane: np.ndarray) -> np.ndarray:
    """A canonical (RAS) slice [a, b] as displayed: rows from high to low ``b`` (anterior / superior up), columns
    from high to low ``a`` (the patient's right, or anterior, on the image's left)."""
    return np.asarray(plane).T[::-1, ::-1]


def _contour(mask: np.ndarray) -> np.ndarray:
    """Inner one-pixel boundary: mask pixels with a 4-neighbour outside the mask (image border counts as outside)."""
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1), border_value=0)
    return mask & ~eroded


def _mask_2d(name: str, mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
    if mask is None:
        return None
    arr = np.asarray(mask)
    if arr.shape != shape:
        raise ValueError(f"{name}: shape {arr.shape} differs from the image's {shape}")
    return arr > 0.5 if arr.dtype != np.bool_ else arr


def overlay_rgb(image_hw: np.ndarray, truth_hw: np.ndarray | None, pred_hw: np.ndarray | None) -> np.ndarray:
    """The overlay as a uint8 ``[H, W, 3]`` array (what :func:`save_overlay_png` writes)."""
    img = np.asarray(image_hw, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"image_hw: expected a 2D slice, got shape {img.shape}")
    grey = np.clip(np.nan_to_num(img), 0.0, 1.0) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=2)
    masks = [
        (_mask_2d("truth_hw", truth_hw, img.shape), np.array(TRUTH_RGB, np.float32)),
        (_mask_2d("pred_hw", pred_hw, img.shape), np.array(PRED_RGB, np.float32)),
    ]
    for mask, colour in masks:
        if mask is not None:
            rgb[mask] = (1 - FILL_ALPHA) * rgb[mask] + FILL_ALPHA * colour
    for mask, colour in masks:
        if mask is not None:
            rgb[_contour(mask)] = colour
    return np.round(rgb).astype(np.uint8)


def save_overlay_png(
    image_hw: np.ndarray, truth_hw: np.ndarray | None, pred_hw: np.ndarray | None, path: str | Path
) -> Path:
    """Write one slice's overlay as a PNG of the slice's own size (W × H), atomically. ``image_hw`` is in [0, 1]."""
    rgb = overlay_rgb(image_hw, truth_hw, pred_hw)
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    return path


def pick_slices(truth: np.ndarray | None, pred: np.ndarray | None, num_slices: int, max_slices: int) -> list[int]:
    """Up to ``max_slices`` slice indices spread evenly over the slices where truth or prediction is present
    (over the whole volume if neither is anywhere), so the PNGs show the object, not empty background."""
    present = np.zeros(num_slices, dtype=bool)
    for m in (truth, pred):
        if m is not None:
            present |= np.asarray(m).reshape(num_slices, -1).any(axis=1)
    candidates = np.flatnonzero(present) if present.any() else np.arange(num_slices)
    if len(candidates) <= max_slices:
        return candidates.tolist()
    picks = np.linspace(0, len(candidates) - 1, max_slices).round().astype(int)
    return candidates[np.unique(picks)].tolist()


def save_case_overlays(
    image_zhw: np.ndarray,
    truth: np.ndarray | None,
    pred: np.ndarray | None,
    out_dir: str | Path,
    name: str,
    max_slices: int = 8,
) -> list[Path]:
    """Write ``<out_dir>/<name>_axial_<index>.png`` for up to ``max_slices`` informative slices of a canonical
    ``[Z, H, W]`` case (slices across canonical axis 2), displayed radiologically."""
    image = np.asarray(image_zhw)
    if image.ndim != 3:
        raise ValueError(f"image_zhw: expected [Z, H, W], got shape {image.shape}")
    for label, m in (("truth", truth), ("pred", pred)):
        if m is not None and np.shape(m) != image.shape:
            raise ValueError(f"{label}: shape {np.shape(m)} differs from the image's {image.shape}")
    if max_slices < 1:
        raise ValueError(f"max_slices: expected >= 1, got {max_slices}")
    out_dir = Path(out_dir)
    paths = []
    for z in pick_slices(truth, pred, image.shape[0], max_slices):
        t = None if truth is None else radiological(np.asarray(truth)[z])
        p = None if pred is None else radiological(np.asarray(pred)[z])
        paths.append(save_overlay_png(radiological(image[z]), t, p, out_dir / f"{name}_{PLANES[2]}_{z:04d}.png"))
    return paths
