"""THE propagation rule: how masks on some slices become logits on every slice, for every class in one run.

Training (with grad), evaluation, ``python -m icl.segment`` and ``icl.api.ICLSegmenter`` all call :func:`track`.

* Prompts are ``{class: {slice: mask}}``. A non-empty mask makes the slice a conditioning frame of that class. A
  class without any non-empty mask is absent on every slice. An empty mask is never a conditioning frame; with
  ``direction="both"`` it says "annotated, and the class is not here" (see below); with ``"forward"`` it is ignored
  (support slices of another scan say nothing about where the class is in the query).
* Every class has its own bounds: ``first`` and ``last``, its first and last prompted slice.
* ``direction="forward"`` (the support slices are put in front of the query, e.g. support from another scan): one
  pass from the earliest ``first`` to the last slice; a class is tracked from its own ``first`` on. On slices before
  its ``first`` the class is absent.
* ``direction="both"`` (the support lies in the scan itself, e.g. a few annotated slices): the forward pass, then,
  with every tracked memory dropped, a reverse pass from the latest ``last`` down to slice 0, a class tracked from
  its own ``last`` down. A slice gets the mean logits of the passes that tracked the class there: between ``first``
  and ``last`` both passes, after ``last`` the forward pass, before ``first`` the reverse pass. A class is not
  propagated across a slice annotated without it: from its nearest empty mask after ``last`` on, and up to its
  nearest empty mask before ``first``, it is absent (what a sparse annotation says: the structure ended there).
* A class's prompted slices give its conditioning output (the mask itself as +-10 logits, object score +10).
* Absent means: logits ``NO_OBJ_SCORE`` (-1024, SAM2's own "no object" value), object score ``NO_OBJ_SCORE``,
  predicted IoU 0.
* All classes tracked on a slice run as one batch (image features once per slice and pass); each class keeps
  ``predictor.history_to_keep()`` tracked outputs behind the current slice, and both ways the forward pass's logits
  wait for the reverse pass in a :class:`~sam2_ext.pass_store.PassStore` (on disk beyond a memory budget), so
  memory does not grow with depth.

Results come per slice as :class:`SliceResult` (low-resolution logits on the decoder's mask grid, 4 x the image
embedding: ``image_size / 4`` squared with Hiera, ``image_size`` with TinyViT), each slice exactly
once, in the order they become final (forward-only slices during the forward pass, the rest during the reverse).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sam2.modeling.sam2_base import NO_OBJ_SCORE

from sam2_ext.pass_store import PassStore

DIRECTIONS = ("forward", "both")


@dataclass
class Tracked:
    """The heads' raw outputs on one slice in one pass, for the classes tracked there (what a training loss reads)."""

    columns: list[int]  # class columns, in the order of the rows below
    multimask_logits: torch.Tensor  # [K, M, h, w] every candidate mask (M = 3 with multimask output, else 1)
    multimask_ious: torch.Tensor  # [K, M] the IoU head's prediction for each candidate
    object_score_logits: torch.Tensor  # [K]
    raw_multimask_logits: torch.Tensor  # [K, M, h, w] the same masks before SAM2's object-score gate
    memory_features: torch.Tensor  # [K, D, h', w'] the memory-conditioned image features the decoder read


@dataclass
class SliceResult:
    """The final result on one slice: one row per class, in the order of the prompts' keys."""

    index: int
    logits: torch.Tensor  # [C, h, w] low-resolution mask logits
    object_score_logits: torch.Tensor  # [C]
    iou_pred: torch.Tensor  # [C]
    tracked: list[Tracked] = field(default_factory=list)  # grad mode only


@dataclass
class _Pass:
    logits: torch.Tensor
    object_score_logits: torch.Tensor
    iou_pred: torch.Tensor
    seen: torch.Tensor  # [C] bool: the pass has an output for the class here
    tracked: list[Tracked]


def to_size(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize mask logits [..., h, w] bilinearly (SAM2's own way of going back to the video's resolution)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    lead = logits.shape[:-2]
    out = F.interpolate(logits.reshape(-1, 1, *logits.shape[-2:]).float(), size=tuple(size), mode="bilinear",
                        align_corners=False)
    return out.reshape(*lead, *size)


def _prompt_frames(prompts: Mapping[Any, Mapping[int, Any]], num_frames: int):
    """``{slice: {class: mask}}`` of the non-empty masks, each prompted class's first and last slice, and the slices
    of each class's empty masks."""
    by_frame: dict[int, dict[Any, torch.Tensor]] = {}
    first: dict[Any, int] = {}
    last: dict[Any, int] = {}
    empty: dict[Any, list[int]] = {}
    for cid, per_slice in prompts.items():
        for z, mask in per_slice.items():
            z = int(z)
            if not 0 <= z < num_frames:
                raise ValueError(f"prompt slice {z} of class {cid} outside 0..{num_frames - 1}")
            mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
            if mask.dim() != 2:
                raise ValueError(f"prompt mask of class {cid} on slice {z} must be [H, W], got {tuple(mask.shape)}")
            mask = (mask.float() > 0.5).float()
            if not bool(mask.any()):
                empty.setdefault(cid, []).append(z)
                continue
            by_frame.setdefault(z, {})[cid] = mask
            first[cid] = min(first.get(cid, z), z)
            last[cid] = max(last.get(cid, z), z)
    return by_frame, first, last, empty


def _absent(index: int, num_classes: int, low: int, device) -> SliceResult:
    return SliceResult(index, torch.full((num_classes, low, low), NO_OBJ_SCORE, device=device),
                       torch.full((num_classes,), NO_OBJ_SCORE, device=device), torch.zeros(num_classes, device=device))


def _collect(outs: list[dict | None], prompted: set[int], columns: list[int], num_classes: int, low: int,
             device, grad: bool) -> _Pass:
    """One pass's per-object outputs on a slice -> rows per class column (absent where the pass has none)."""
    fill_logits = torch.full((low, low), NO_OBJ_SCORE, device=device)
    fill_score = torch.tensor(NO_OBJ_SCORE, device=device)
    zero = torch.tensor(0.0, device=device)
    logits, scores, ious = [fill_logits] * num_classes, [fill_score] * num_classes, [zero] * num_classes
    seen = torch.zeros(num_classes, dtype=torch.bool, device=device)
    heads = []
    for col, out in zip(columns, outs):
        if out is None:
            continue
        # to the mask grid: SAM2's mask-as-output (prompted slices) is at image_size / 4 whatever the encoder's stride
        logits[col] = to_size(out["pred_masks"][0, 0].to(device).float(), (low, low))
        scores[col] = out["object_score_logits"].reshape(()).to(device).float()
        ious[col] = out["iou_pred"].reshape(()).to(device).float()
        seen[col] = True
        if grad and col not in prompted and "multimask_logits" in out:
            heads.append((col, out))
    tracked = []
    if heads:
        cat = lambda key: torch.cat([o[key] for _, o in heads]).float()  # noqa: E731
        tracked.append(Tracked([c for c, _ in heads], cat("multimask_logits"), cat("multimask_ious"),
                               torch.cat([o["object_score_logits"].reshape(1) for _, o in heads]).float(),
                               cat("raw_multimask_logits"), cat("memory_features")))
    return _Pass(torch.stack(logits), torch.stack(scores), torch.stack(ious), seen, tracked)


def _final(index: int, passes: list[_Pass]) -> SliceResult:
    """Mean over the passes that saw each class; absent where none did."""
    if len(passes) == 1:
        p = passes[0]
        return SliceResult(index, p.logits, p.object_score_logits, p.iou_pred, p.tracked)
    seen = torch.stack([p.seen for p in passes]).float()  # [P, C]
    count = seen.sum(0)

    def mean(values: list[torch.Tensor], fill: float) -> torch.Tensor:
        stacked = torch.stack(values)  # [P, C, ...]
        weight = seen.reshape(*seen.shape, *([1] * (stacked.dim() - 2)))
        total = (stacked * weight).sum(0) / count.clamp(min=1).reshape(-1, *([1] * (stacked.dim() - 2)))
        has = (count > 0).reshape(-1, *([1] * (stacked.dim() - 2)))
        return torch.where(has, total, torch.full_like(total, fill))

    return SliceResult(index, mean([p.logits for p in passes], NO_OBJ_SCORE),
                       mean([p.object_score_logits for p in passes], NO_OBJ_SCORE),
                       mean([p.iou_pred for p in passes], 0.0), [t for p in passes for t in p.tracked])


def track(predictor: Any, frames: Any, prompts: Mapping[Any, Mapping[int, Any]], direction: str = "both", *,
          video_size: tuple[int, int] | None = None, grad: bool = False, features: Any = None,
          priors: Mapping[Any, Mapping[int, Any]] | None = None) -> Iterator[SliceResult]:
    """Apply the propagation rule (module docstring) to ``frames`` with ``prompts``; yields one result per slice.

    ``frames``: float [N, H, W] in [0, 1], or a lazy source of prepared frames (``sam2_ext.predictor.FrameSource``;
    ``video_size`` is then the (H, W) outputs refer to). ``prompts``: ``{class: {slice: mask [H, W]}}`` (tensors or
    arrays, any size; resized to the model like SAM2's ``add_new_mask``). ``grad=False`` runs under no_grad.
    ``features``: stored image-encoder outputs per slice (``sam2_ext.predictor.FeatureSource``), or None.
    ``priors``: ``{class: {slice: mask [H, W]}}`` dense mask prompts on tracked slices (``sam2_ext.priors``; e.g. a
    classic interpolation the model was trained to refine), or None. A prior on a prompted slice is ignored.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    # no_grad wrapped around the generator function sets the grad mode for each of its steps only, so the
    # caller's code between two slices keeps its own grad mode (a ``with`` inside a generator would leak into it)
    run = _track if grad else torch.no_grad()(_track)
    return run(predictor, frames, prompts, direction, video_size, grad, features, priors)


def _track(predictor, frames, prompts, direction, video_size, grad, features, priors) -> Iterator[SliceResult]:
    num_frames = len(frames)
    classes = list(prompts)
    by_frame, first, last, empty = _prompt_frames(prompts, num_frames)
    low, device = 4 * predictor.sam_image_embedding_size, predictor.device  # the decoder's mask grid
    if not first:
        for f in range(num_frames):
            yield _absent(f, len(classes), low, device)
        return
    height, width = video_size if video_size is not None else (None, None)
    state = predictor.init_state_from_frames(frames, height, width, features=features)
    state["keep_history"] = predictor.history_to_keep()
    objects = [c for c in classes if c in first]
    columns = [classes.index(c) for c in objects]
    predictor.register_objects(state, objects)
    if priors:
        predictor.set_priors(state, {i: priors[c] for i, c in enumerate(objects) if c in priors})
    for z in sorted(by_frame):
        predictor.train_add_new_masks(state, z, by_frame[z])

    def collect(f: int, outs: list) -> _Pass:
        prompted = {classes.index(c) for c in by_frame.get(f, {})}
        return _collect(outs, prompted, columns, len(classes), low, device, grad)

    # both ways, a class is not tracked across a slice annotated without it (its empty masks beyond its prompts)
    ends, starts = None, None
    if direction == "both":
        ends = [min((z for z in empty.get(c, ()) if z > last[c]), default=num_frames) for c in objects]
        starts = [max((z for z in empty.get(c, ()) if z < first[c]), default=-1) for c in objects]

    start = min(first.values())
    if direction == "forward":
        for f in range(start):
            yield _absent(f, len(classes), low, device)
    final_after = max(last.values()) if direction == "both" else -1
    stored: dict[int, _Pass] = {}  # forward passes awaiting the reverse pass; their logits in a PassStore
    logits_store = PassStore()
    try:
        for f, outs in predictor.propagate_frames(state, start, bounds=[first[c] for c in objects], stops=ends):
            if f > final_after:
                yield _final(f, [collect(f, outs)])
            else:
                stored[f] = collect(f, outs)
                logits_store.put(f, stored[f].logits)
                stored[f].logits = None  # type: ignore[assignment]
        if direction == "forward":
            return
        for bank in state["output_dict_per_obj"].values():
            bank["non_cond_frame_outputs"].clear()
        for f, outs in predictor.propagate_frames(state, final_after, reverse=True,
                                                  bounds=[last[c] for c in objects], stops=starts):
            forward = []
            if f in stored:
                forward = [stored.pop(f)]
                forward[0].logits = logits_store.pop(f)
            yield _final(f, forward + [collect(f, outs)])
    finally:
        logits_store.close()
