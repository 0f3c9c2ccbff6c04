"""In-context segmentation on tensors: support slices + masks prompt SAM2, query slices are tracked.

Knows nothing about datasets: slices are float [N, H, W] in [0, 1], masks binary [N, H, W] (or [H, W] per slice).
Every class is one SAM2 object, so all classes share one pass and one image-encoder run per slice.

Empty masks: a support slice on which a class's mask is empty is *not* a conditioning frame for that class (it is
tracked like any other frame for it). A class with no non-empty support mask at all is not tracked; its logits
are all ``NO_OBJ_SCORE`` (-1024, i.e. "absent"), its object score logits too, and its iou_pred is 0.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from sam2.modeling.sam2_base import NO_OBJ_SCORE

from sam2_ext.predictor import ICLPredictor


def _grad_context(grad: bool):
    return contextlib.nullcontext() if grad else torch.no_grad()


def frame_output(state: dict, obj_idx: int, frame_idx: int) -> dict:
    """The stored SAM2 output of one object on one frame (conditioning or tracked)."""
    out = state["output_dict_per_obj"][obj_idx]
    return out["cond_frame_outputs"].get(frame_idx) or out["non_cond_frame_outputs"][frame_idx]


def _empty_result(num_frames: int, classes: list[int], height: int, width: int, device) -> dict:
    return {
        "logits": torch.full((num_frames, len(classes), height, width), NO_OBJ_SCORE, device=device),
        "object_score_logits": torch.full((num_frames, len(classes)), NO_OBJ_SCORE, device=device),
        "iou_pred": torch.zeros(num_frames, len(classes), device=device),
    }


def _collect(predictor: ICLPredictor, state: dict, frame_range: range, col_of: dict[int, int],
             result: dict[str, dict[int, list]], **propagate_kwargs) -> None:
    """Run one propagation; for each frame in ``frame_range`` record logits, object scores and iou_pred."""
    for frame_idx, obj_ids, masks in predictor.train_propagate_in_video(state, **propagate_kwargs):
        if frame_idx not in frame_range:
            continue
        for obj_idx, obj_id in enumerate(obj_ids):
            out = frame_output(state, obj_idx, frame_idx)
            key = (frame_idx, col_of[obj_id])
            result["logits"].setdefault(key, []).append(masks[obj_idx, 0])
            result["object_score_logits"].setdefault(key, []).append(out["object_score_logits"].reshape(()))
            result["iou_pred"].setdefault(key, []).append(out["iou_pred"].reshape(()).to(masks.device))


def _fill(base: dict, collected: dict[str, dict], offset: int) -> dict:
    """Write collected per-(frame, class) values into the dense result (averaging when two passes saw a frame).

    Built with torch.stack rather than in-place writes so the autograd graph stays simple.
    """
    for name, per_key in collected.items():
        if not per_key:
            continue
        dense = base[name]
        rows = []
        for t in range(dense.shape[0]):
            cols = []
            for c in range(dense.shape[1]):
                values = per_key.get((t + offset, c))
                cols.append(torch.stack(values).float().mean(0) if values else dense[t, c])
            rows.append(torch.stack(cols))
        base[name] = torch.stack(rows)
    return base


def _as_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask > 0.5).float()


def segment_with_support(
    predictor: ICLPredictor,
    support_images: torch.Tensor,
    support_masks: Mapping[int, torch.Tensor],
    query_images: torch.Tensor,
    grad: bool = False,
) -> dict[str, torch.Tensor]:
    """Segment ``query_images`` [Q, H, W] from support slices [S, H, W] and their masks {class_id: [S, H, W]}.

    The video is the support slices followed by the query slices; each support mask is added on its slice and
    all classes are propagated forward through the queries. Returns ``logits`` [Q, C, H, W] (query resolution),
    ``object_score_logits`` [Q, C] and ``iou_pred`` [Q, C], C in the order of ``support_masks``.
    ``grad=False`` runs under no_grad (inference); ``grad=True`` keeps the graph for training.
    """
    if support_images.dim() != 3 or query_images.dim() != 3:
        raise ValueError("support_images and query_images must be [N, H, W]")
    if support_images.shape[1:] != query_images.shape[1:]:
        raise ValueError(f"support slices {tuple(support_images.shape[1:])} and query slices "
                         f"{tuple(query_images.shape[1:])} differ in size")
    num_support, height, width = support_images.shape
    classes = list(support_masks)
    for cid, masks in support_masks.items():
        if masks.shape != support_images.shape:
            raise ValueError(f"support mask of class {cid} is {tuple(masks.shape)}, "
                             f"expected {tuple(support_images.shape)}")
    result = _empty_result(len(query_images), classes, height, width, predictor.device)
    frames = torch.cat([support_images, query_images.to(support_images.device)], dim=0)
    with _grad_context(grad):
        state = predictor.init_state_from_frames(frames)
        added = False
        for s in range(num_support):  # slice-major order: one image-encoder run per support slice
            for cid in classes:
                mask = _as_mask(support_masks[cid][s])
                if mask.any():
                    predictor.train_add_new_mask(state, s, cid, mask)
                    added = True
        if not added:
            return result
        collected: dict[str, dict] = {k: {} for k in result}
        col_of = {cid: i for i, cid in enumerate(classes)}
        _collect(predictor, state, range(num_support, len(frames)), col_of, collected)
        return _fill(result, collected, offset=num_support)


def segment_volume_with_support(
    predictor: ICLPredictor,
    volume: torch.Tensor,
    support: Mapping[int, Mapping[int, torch.Tensor]],
    grad: bool = False,
) -> dict[str, torch.Tensor]:
    """Segment a whole scan [Z, H, W] from masks on some of its own slices: {class_id: {slice: mask [H, W]}}.

    Masks are added at their slice positions; then one pass runs forward from the first support slice to the
    last slice and, with the forward pass's non-conditioning memories cleared, one pass runs in reverse from
    the last support slice to slice 0. Slices between the first and last support slice are seen by both
    passes and get the mean of the two logits; slices outside get the one pass that reaches them. Support
    slices return their (GT-derived) conditioning logits. Returns ``logits`` [Z, C, H, W],
    ``object_score_logits`` [Z, C], ``iou_pred`` [Z, C], C in the order of ``support``.
    """
    if volume.dim() != 3:
        raise ValueError(f"volume must be [Z, H, W], got {tuple(volume.shape)}")
    depth, height, width = volume.shape
    classes = list(support)
    result = _empty_result(depth, classes, height, width, predictor.device)
    prompts: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for cid, per_slice in support.items():
        for z, mask in per_slice.items():
            if not 0 <= z < depth:
                raise ValueError(f"support slice {z} of class {cid} outside 0..{depth - 1}")
            if mask.shape != (height, width):
                raise ValueError(f"support mask of class {cid} on slice {z} is {tuple(mask.shape)}, "
                                 f"expected {(height, width)}")
            mask = _as_mask(mask)
            if mask.any():
                prompts.setdefault(z, []).append((cid, mask))
    if not prompts:
        return result
    col_of = {cid: i for i, cid in enumerate(classes)}
    with _grad_context(grad):
        state = predictor.init_state_from_frames(volume)
        for z in sorted(prompts):
            for cid, mask in prompts[z]:
                predictor.train_add_new_mask(state, z, cid, mask)
        collected: dict[str, dict] = {k: {} for k in result}
        first, last = min(prompts), max(prompts)
        _collect(predictor, state, range(depth), col_of, collected, start_frame_idx=first)
        for obj_out in state["output_dict_per_obj"].values():
            obj_out["non_cond_frame_outputs"].clear()
        if last > 0:
            _collect(predictor, state, range(depth), col_of, collected, start_frame_idx=last, reverse=True)
        return _fill(result, collected, offset=0)
