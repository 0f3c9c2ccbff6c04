"""Dense in-context segmentation on tensors, over :func:`sam2_ext.track.track` (the one propagation rule).

Knows nothing about datasets: slices are float [N, H, W] in [0, 1], masks binary [N, H, W] (or [H, W] per slice).
Every class is one SAM2 object; all classes run as one batch. Use these when the whole result fits in memory
(training clips, evaluation volumes); stream ``track`` itself for large scans.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sam2_ext.predictor import ICLPredictor
from sam2_ext.track import Tracked, to_size, track


def _dense(results, first: int, count: int, size: tuple[int, int]) -> dict:
    """Stack the results of slices ``first .. first + count - 1`` (in slice order) at ``size``."""
    kept = sorted((r for r in results if first <= r.index < first + count), key=lambda r: r.index)
    tracked: list[tuple[int, Tracked]] = [(r.index - first, t) for r in kept for t in r.tracked]
    return {
        "logits": to_size(torch.stack([r.logits for r in kept]), size),
        "object_score_logits": torch.stack([r.object_score_logits for r in kept]),
        "iou_pred": torch.stack([r.iou_pred for r in kept]),
        "tracked": tracked,
    }


def segment_with_support(
    predictor: ICLPredictor,
    support_images: torch.Tensor,
    support_masks: Mapping[int, torch.Tensor],
    query_images: torch.Tensor,
    grad: bool = False,
    features: Any = None,
) -> dict:
    """Segment ``query_images`` [Q, H, W] from support slices [S, H, W] and their masks {class_id: [S, H, W]}.
    ``features``: stored image-encoder outputs of the video's frames (support then query; see ``track``).

    The video is the support slices followed by the query slices, tracked forward (``direction="forward"``).
    Returns ``logits`` [Q, C, H, W], ``object_score_logits`` [Q, C], ``iou_pred`` [Q, C] (C in the order of
    ``support_masks``) and ``tracked``: ``[(query slice, Tracked)]``, the heads' raw outputs (grad mode only).
    """
    if support_images.dim() != 3 or query_images.dim() != 3:
        raise ValueError("support_images and query_images must be [N, H, W]")
    if support_images.shape[1:] != query_images.shape[1:]:
        raise ValueError(f"support slices {tuple(support_images.shape[1:])} and query slices "
                         f"{tuple(query_images.shape[1:])} differ in size")
    for cid, masks in support_masks.items():
        if masks.shape != support_images.shape:
            raise ValueError(f"support mask of class {cid} is {tuple(masks.shape)}, "
                             f"expected {tuple(support_images.shape)}")
    num_support = len(support_images)
    frames = torch.cat([support_images, query_images.to(support_images.device)], dim=0)
    prompts = {cid: {s: masks[s] for s in range(num_support)} for cid, masks in support_masks.items()}
    results = list(track(predictor, frames, prompts, "forward", grad=grad, features=features))
    return _dense(results, num_support, len(query_images), tuple(query_images.shape[1:]))


def segment_volume_with_support(
    predictor: ICLPredictor,
    volume: torch.Tensor,
    support: Mapping[int, Mapping[int, torch.Tensor]],
    grad: bool = False,
) -> dict:
    """Segment a whole scan [Z, H, W] from masks on some of its own slices: {class_id: {slice: mask [H, W]}}.

    Both directions (``direction="both"``, see ``sam2_ext.track``). Returns ``logits`` [Z, C, H, W],
    ``object_score_logits`` [Z, C], ``iou_pred`` [Z, C], C in the order of ``support``, and ``tracked``.
    """
    if volume.dim() != 3:
        raise ValueError(f"volume must be [Z, H, W], got {tuple(volume.shape)}")
    depth, height, width = volume.shape
    for cid, per_slice in support.items():
        for z, mask in per_slice.items():
            if tuple(mask.shape) != (height, width):
                raise ValueError(f"support mask of class {cid} on slice {z} is {tuple(mask.shape)}, "
                                 f"expected {(height, width)}")
    results = list(track(predictor, volume, support, "both", grad=grad))
    return _dense(results, 0, depth, (height, width))
