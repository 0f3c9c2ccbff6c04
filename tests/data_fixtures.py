"""Shared, session-scoped phantom datasets and caches (tiny, so any test module may import them).

    from data_fixtures import phantom_datasets, phantom_caches  # noqa: F401  (pytest fixtures)

``phantom_datasets`` → {layout: dataset folder} for kits / btcv / msd / nnunet (3 cases each, 40x36x20 voxels);
``phantom_caches`` → {layout: cache folder} preprocessed at ``PHANTOM_IMAGE_SIZE``.
Treat both as read-only: copy them (shutil.copytree) before modifying anything.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from icl.data.phantom import make_phantom_dataset
from icl.data.preprocess import preprocess_dataset

PHANTOM_LAYOUTS = ("kits", "btcv", "msd", "nnunet")
PHANTOM_SHAPE = (40, 36, 20)
PHANTOM_CASES = 3
PHANTOM_IMAGE_SIZE = 32
# Modules that import these fixtures each get their own copy of the fixture; this memo makes the data once per run.
_MADE: dict[str, dict[str, Path]] = {}


@pytest.fixture(scope="session")
def phantom_datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if "datasets" not in _MADE:
        root = tmp_path_factory.mktemp("phantom")
        _MADE["datasets"] = {layout: make_phantom_dataset(root / layout, layout, PHANTOM_CASES, seed=0,
                                                          shape=PHANTOM_SHAPE) for layout in PHANTOM_LAYOUTS}
    return _MADE["datasets"]


@pytest.fixture(scope="session")
def phantom_caches(phantom_datasets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if "caches" not in _MADE:
        root = tmp_path_factory.mktemp("phantom_cache")
        for layout, path in phantom_datasets.items():
            preprocess_dataset(layout, path, root / layout, image_size=PHANTOM_IMAGE_SIZE, progress=False)
        _MADE["caches"] = {layout: root / layout for layout in phantom_datasets}
    return _MADE["caches"]
