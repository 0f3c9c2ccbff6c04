"""Shared inputs of the icl.segment tests: small 2-class phantom scans (BTCV layout, optionally an MSD 4D one)
and a tiny checkpoint whose object heads say 'present' (random weights otherwise)."""
from __future__ import annotations

from pathlib import Path

import torch

from icl.data.phantom import make_phantom_dataset

IMAGE_SIZE = 64
SHAPE = (40, 36, 14)
CLASSES = ("ellipsoid", "box")


def make_segment_data(root: Path, seed: int, msd: bool = False) -> dict[str, Path]:
    """``s``/``s_lab`` (support image/label), ``q`` (query), ``ckpt`` and, with ``msd``, ``msd``/``msd_lab``."""
    from engine_fixtures import make_tiny_predictor

    make_phantom_dataset(root / "btcv", "btcv", 2, seed=seed, shape=SHAPE, classes=CLASSES)
    paths = {"s": root / "btcv/img/img0001.nii.gz", "s_lab": root / "btcv/label/label0001.nii.gz",
             "q": root / "btcv/img/img0002.nii.gz", "ckpt": root / "ckpt.pt", "root": root}
    if msd:
        make_phantom_dataset(root / "msd", "msd", 1, seed=seed, shape=SHAPE, classes=CLASSES)
        paths.update(msd=root / "msd/imagesTr/phantom_001.nii.gz", msd_lab=root / "msd/labelsTr/phantom_001.nii.gz")
    torch.save({"model": make_tiny_predictor(seed=0, image_size=IMAGE_SIZE).state_dict()}, paths["ckpt"])
    return paths
