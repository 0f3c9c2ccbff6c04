"""A small real-like labelled volume for the real-volume tests: NIfTI image + label, structures in homologue pairs
(``v`` and ``v + 1000``, as INIA19's NeuroMaps), touching neighbours, tissue-like intensities, an oblique-free LAS
affine (so the canonical view differs from the file's order).

    from real_fixtures import real_pair, HELD_OUT  # noqa: F401  (fixture)
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SHAPE = (44, 40, 36)
HELD_OUT = (3, 1003)  # a homologue pair the tests hold out
PAIRS = (3, 5, 8, 12, 20)  # left values; right = value + 1000


def labelled_volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, labels int16): ellipsoids on both sides of the midline, a nested pair, some touching."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    labels = np.zeros(SHAPE, np.int16)
    image = np.full(SHAPE, 0.0, np.float32)
    body = ((zz - 22) / 20) ** 2 + ((yy - 20) / 18) ** 2 + ((xx - 18) / 16) ** 2 <= 1
    image[body] = 80.0
    for i, value in enumerate(PAIRS):
        centre = np.array([10 + 5 * i, 12 + 3 * (i % 3), 9 + 2 * (i % 2)], float)
        radii = np.array([4 + i % 3, 5, 4], float)
        for side, v in ((0, value), (1, value + 1000)):
            c = centre.copy()
            c[2] = c[2] if side == 0 else SHAPE[2] - 1 - c[2]
            inside = (((zz - c[0]) / radii[0]) ** 2 + ((yy - c[1]) / radii[1]) ** 2
                      + ((xx - c[2]) / radii[2]) ** 2) <= 1
            labels[inside & body] = v
            image[inside & body] = 120.0 + 25 * i
    image += rng.normal(0, 3, SHAPE).astype(np.float32) * body
    return image, labels


@pytest.fixture(scope="session")
def real_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(image path, label path) of :func:`labelled_volume`, LAS-oriented NIfTI."""
    folder = tmp_path_factory.mktemp("real_volume")
    image, labels = labelled_volume()
    affine = np.diag([-0.5, 0.5, 0.5, 1.0])  # L-R flipped in the file: canonical RAS reverses axis 0
    paths = folder / "scan.nii.gz", folder / "scan_labels.nii.gz"
    nib.save(nib.Nifti1Image(image[::-1].copy(), affine), paths[0])
    nib.save(nib.Nifti1Image(labels[::-1].copy(), affine), paths[1])
    return paths
