"""Shared test helpers for the engine: a seeded tiny SAM2 predictor (random weights) and toy slices.

Import in a test module with ``from engine_fixtures import tiny_predictor, make_tiny_predictor, toy_slices``
(the ``tiny_predictor`` name then works as a pytest fixture in that module).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from sam2_ext.build import build_icl_predictor

TINY_CONFIG = "tiny_cpu"


def make_tiny_predictor(seed: int = 0, image_size: int | None = None, predictor_cls: type | None = None,
                        object_bias: float = 5.0):
    """Build the tiny config with seeded random weights, in eval mode, on CPU.

    Random SAM2 weights give object-score logits near 0, so SAM2 often declares "no object" and replaces
    every mask logit by -1024 (no gradient, trivially equal outputs). ``object_bias`` is added to the
    object-score head's last bias so objects are predicted present and the tests exercise real masks.
    """
    torch.manual_seed(seed)
    model = build_icl_predictor(TINY_CONFIG, "cpu", image_size=image_size, predictor_cls=predictor_cls)
    with torch.no_grad():
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.add_(object_bias)
    return model.eval()


def toy_slices(num: int, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` grey slices [num, size, size] in [0, 1] with a bright disc drifting across, and its masks."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, masks = [], []
    for i in range(num):
        cy, cx, r = size * 0.45 + i, size * 0.4 + 1.5 * i, size * 0.2
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).float()
        images.append((0.2 + 0.6 * disc + 0.1 * torch.rand(size, size, generator=g)).clamp(0, 1))
        masks.append(disc)
    return torch.stack(images), torch.stack(masks)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch single-threaded: on 2 shared cores the tiny model is ~6x faster than with 2 threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def tiny_predictor():
    """A seeded tiny ICLPredictor (eval mode, CPU), with torch single-threaded during the test."""
    with single_thread():
        yield make_tiny_predictor(seed=0)
