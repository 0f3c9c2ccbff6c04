"""A small scan with three structures, its full label and sparse drawings of it (identity affine: RAS, so file
axes are canonical axes), for the tests of issue #27 (never silently wrong, never lose a file)."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (30, 28, 26)
CENTRES = {1: (9, 9, 9), 2: (20, 18, 12), 3: (12, 19, 17)}
RADII = {1: (5, 6, 6), 2: (6, 5, 7), 3: (5, 5, 5)}


def make_volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(float32 image, int label) of three ellipsoids in a textured background."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1).astype(np.float32)
    label = np.zeros(SHAPE, np.int16)
    for c, centre in CENTRES.items():
        d = (((grid - np.array(centre)) / np.array(RADII[c])) ** 2).sum(-1)
        label[d <= 1] = c
    image = rng.normal(0, 7.3, SHAPE).astype(np.float32) + 100.25 + 40.5 * label
    return image, label


def draw(label: np.ndarray, axis: int, every: int = 4) -> np.ndarray:
    """Each structure drawn on every ``every``-th slice of its own extent along ``axis`` (as in 3D Slicer)."""
    out = np.zeros_like(label)
    moved_in, moved_out = np.moveaxis(label, axis, 0), np.moveaxis(out, axis, 0)
    for c in np.unique(label[label > 0]):
        zs = np.flatnonzero((moved_in == c).reshape(label.shape[axis], -1).any(1))
        for z in range(int(zs[0]) + 1, int(zs[-1]), every):
            moved_out[z][moved_in[z] == c] = c
    return out


def save(array: np.ndarray, path: Path, affine: np.ndarray | None = None, dtype=None) -> Path:
    img = nib.Nifti1Image(array, np.eye(4) if affine is None else affine)
    if dtype is not None:
        img.set_data_dtype(dtype)
    nib.save(img, str(path))
    return path


def write_case(root: Path, axis: int = 2, every: int = 4) -> dict[str, Path]:
    """``scan``, ``label`` (dense), ``drawn`` (sparse along ``axis``) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    image, label = make_volume()
    return {"scan": save(image, root / "scan.nii.gz"), "label": save(label, root / "label.nii.gz"),
            "drawn": save(draw(label, axis, every), root / f"drawn_{axis}.nii.gz")}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float(np.count_nonzero(a & b)) / max(1, int(np.count_nonzero(a)) + int(np.count_nonzero(b)))


def read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)
