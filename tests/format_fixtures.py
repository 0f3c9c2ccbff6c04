"""Test data for the formats (#33): a grid that is neither RAS nor axis-ordered (permuted, flipped, slightly
rotated, anisotropic) so that any mix-up of axes, LPS/RAS or transposition shows, volumes with structure along
every axis; the files themselves are written by other libraries than the readers' (``bench/format_writers.py``)."""
from __future__ import annotations

import numpy as np



def oblique_affine(spacing=(0.8, 1.1, 2.5), origin=(12.5, -30.25, 40.0), degrees: float = 7.0) -> np.ndarray:
    """Voxel → RAS: axes permuted (i runs A→P, j R→L, k I→S), rotated ``degrees`` about S, anisotropic."""
    t = np.radians(degrees)
    rotation = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    axes = np.array([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).T  # columns: i, j, k directions
    affine = np.eye(4)
    affine[:3, :3] = rotation @ axes @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def image_volume(shape=(14, 11, 9), seed: int = 3) -> np.ndarray:
    """int16 values with structure along every axis (a transposed or flipped read never equals it)."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return (i * 100 + j * 10 + k - 300 + rng.integers(-3, 4, shape)).astype(np.int16)  # negative: no label map


def label_volume(shape=(14, 11, 9)) -> np.ndarray:
    """Three boxes: values 1, 2 and 5."""
    label = np.zeros(shape, np.uint8)
    label[2:6, 2:5, 1:4] = 1
    label[7:12, 5:9, 3:7] = 2
    label[3:5, 7:10, 5:8] = 5
    return label


def dicom_affine(spacing=(0.7, 0.9, 2.0), origin=(-20.0, 15.0, 30.0)) -> np.ndarray:
    """An axial grid as a scanner writes it: i → patient left (RAS -x), j → posterior (RAS -y), k → superior."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = origin
    return affine
