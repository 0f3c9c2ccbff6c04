"""ICLPredictor: SAM2's video predictor, fed from tensors, differentiable, batched over objects, with a selector hook.

The official ``SAM2VideoPredictor`` reads JPEG folders, wraps its public methods in ``torch.inference_mode`` (so
nothing it computes can be trained) and runs every object with batch size 1. This subclass reuses SAM2's own steps
(``_run_single_frame_inference``, ``_run_memory_encoder``, ``_prepare_memory_conditioned_features``, the memory
gathering inside it) but

* adds the prompts of all objects on a frame in one batch and encodes their memory at once (what the official
  ``add_new_mask`` + ``propagate_in_video_preflight`` do one object at a time);
* tracks all active objects of a frame as one batch through memory attention, mask decoder and memory encoder,
  each object attending only to its own memory bank (``sam2_ext.batching``);
* takes per-object bounds (an object is not tracked before its first prompt in the pass direction);
* keeps ``iou_pred`` in every output, and under grad mode the multimask logits and IoU predictions the loss needs.

Under ``torch.no_grad()`` a single object's results equal the official predictor's; batched objects equal them up
to float rounding (tests: max |d logits| <= 1e-4). Under grad mode the same computation builds an autograd graph.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from sam2.sam2_video_predictor import SAM2VideoPredictor

from sam2_ext.batching import capture_memory_inputs, enable_key_masks, key_mask_on, pad_memories
from sam2_ext.features import FeatureSource, StoredFeatures
# prepare_frames and the ImageNet constants lived here: re-exported for their callers
from sam2_ext.frames import (IMAGENET_MEAN, IMAGENET_STD, SAM2_INPUT, InputRule, TensorFrames,  # noqa: F401
                             prepare_frames)
from sam2_ext.priors import MaskPriors


class FrameSource(Protocol):
    """Anything with ``len()`` and ``[i] -> Tensor[3, S, S]`` already resized and normalised (lazy frames)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> torch.Tensor: ...


# keys of a stored frame output that carry one row per object (split after a batched step)
_PER_OBJECT_KEYS = ("maskmem_features", "pred_masks", "obj_ptr", "object_score_logits", "iou_pred",
                    "multimask_logits", "raw_multimask_logits", "multimask_ious", "memory_features")


def _split_outputs(batched: dict, count: int) -> list[dict]:
    """One batched frame output -> ``count`` per-object outputs (views, graphs kept)."""
    outs = []
    for i in range(count):
        out = {k: (v[i:i + 1] if k in _PER_OBJECT_KEYS and v is not None else v) for k, v in batched.items()}
        if batched.get("maskmem_pos_enc") is not None:
            out["maskmem_pos_enc"] = [x[i:i + 1] for x in batched["maskmem_pos_enc"]]
        outs.append(out)
    return outs


class ICLPredictor(StoredFeatures, MaskPriors, SAM2VideoPredictor):
    """SAM2 video predictor for in-context segmentation (support slices as prompts, query slices tracked)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Object with ``select(model, inference_state, output_dict, frame_idx, num_frames, track_in_reverse)``
        # returning the output_dict view to attend to; None keeps SAM2's own memory choice.
        self.memory_selector = None
        self.input_rule: InputRule = SAM2_INPUT  # how frames are prepared (sam2_ext.frames); the config's, by build
        self.can_mask_memory = enable_key_masks(self.memory_attention)
        self._current_state: dict | None = None
        self._batch_banks: list[dict] | None = None  # the memory banks of the objects in the current batched step
        self._last_heads: tuple | None = None  # (ious, multimask logits, memory-conditioned features) of a step
        self._raw_multimasks: torch.Tensor | None = None  # the decoder's masks before SAM2's object-score gate
        self.sam_mask_decoder.register_forward_hook(self._keep_raw_multimasks)

    # ------------------------------------------------------------------ state
    def init_state_from_frames(self, frames: torch.Tensor | FrameSource, video_height: int | None = None,
                               video_width: int | None = None, offload_state_to_cpu: bool = False,
                               features: FeatureSource | None = None) -> dict:
        """Build an inference state like ``init_state`` does, from tensors instead of a JPEG folder.

        ``frames``: float [N, H, W] grey slices or [N, 3, H, W] in [0, 1] (outputs come back at H x W), or a lazy
        ``FrameSource`` of prepared [3, S, S] frames (outputs at ``video_height`` x ``video_width``, default S).
        Frames are prepared one at a time when their features are computed; no features are computed here.
        ``features``: a source of stored image-encoder outputs per frame (see :meth:`encode_levels`), read instead
        of running the image encoder wherever it has them.
        """
        if isinstance(frames, torch.Tensor):
            height, width = frames.shape[-2:]
            source: Any = TensorFrames(frames, self.image_size, self.input_rule)
        else:
            if len(frames) == 0:
                raise ValueError("frame source is empty")
            height = width = self.image_size
            source = frames
        return {
            "images": source, "num_frames": len(source), "offload_video_to_cpu": False,
            "offload_state_to_cpu": offload_state_to_cpu,
            "video_height": int(video_height or height), "video_width": int(video_width or width),
            "device": self.device,
            "storage_device": torch.device("cpu") if offload_state_to_cpu else self.device,
            "point_inputs_per_obj": {}, "mask_inputs_per_obj": {}, "cached_features": {}, "constants": {},
            "obj_id_to_idx": OrderedDict(), "obj_idx_to_id": OrderedDict(), "obj_ids": [],
            "output_dict_per_obj": {}, "temp_output_dict_per_obj": {}, "frames_tracked_per_obj": {},
            # ours: tracked outputs to keep behind the current frame (None = all), see history_to_keep()
            "keep_history": None, "image_features": features,
        }

    def register_objects(self, state: dict, obj_ids: Sequence[int]) -> None:
        """Fix the object order (object index = position in ``obj_ids``) before any prompt is added."""
        for obj_id in obj_ids:
            self._obj_id_to_idx(state, obj_id)

    # ------------------------------------------------------------------ prompts
    def train_add_new_masks(self, state: dict, frame_idx: int, masks: Mapping[int, torch.Tensor]) -> None:
        """Make ``frame_idx`` a conditioning frame of every object in ``masks`` ({obj_id: [H, W]}), in one batch.

        Does what the official ``add_new_mask`` (mask resized to image_size the same way, output of SAM2's
        mask-as-output path) and ``propagate_in_video_preflight`` (memory encoded from that output) do per object,
        without inference_mode: under grad mode the conditioning memories keep their graph.
        """
        if not 0 <= frame_idx < state["num_frames"]:
            raise IndexError(f"frame_idx {frame_idx} outside 0..{state['num_frames'] - 1}")
        if not masks:
            return
        size = (self.image_size, self.image_size)
        inputs = []
        for obj_id, mask in masks.items():
            if mask.dim() != 2:
                raise ValueError(f"mask of object {obj_id} must be [H, W], got {tuple(mask.shape)}")
            m = mask[None, None].float().to(state["device"])
            if m.shape[-2:] != size:
                m = (F.interpolate(m, size=size, mode="bilinear", align_corners=False, antialias=True) >= 0.5).float()
            inputs.append(m)
        obj_indices = [self._obj_id_to_idx(state, obj_id) for obj_id in masks]
        mask_inputs = torch.cat(inputs)
        out, _ = self._run_single_frame_inference(
            state, output_dict=None, frame_idx=frame_idx, batch_size=len(inputs), is_init_cond_frame=True,
            point_inputs=None, mask_inputs=mask_inputs, reverse=False, run_mem_encoder=False)
        high_res = F.interpolate(out["pred_masks"].to(state["device"]), size=size, mode="bilinear",
                                 align_corners=False)
        out["maskmem_features"], out["maskmem_pos_enc"] = self._run_memory_encoder(
            state, frame_idx, len(inputs), high_res, out["object_score_logits"], is_mask_from_pts=True)
        for i, (obj_idx, obj_out) in enumerate(zip(obj_indices, _split_outputs(out, len(inputs)))):
            state["mask_inputs_per_obj"][obj_idx][frame_idx] = mask_inputs[i:i + 1]
            state["point_inputs_per_obj"][obj_idx].pop(frame_idx, None)
            bank = state["output_dict_per_obj"][obj_idx]
            bank["cond_frame_outputs"][frame_idx] = obj_out
            bank["non_cond_frame_outputs"].pop(frame_idx, None)

    def train_add_new_mask(self, state: dict, frame_idx: int, obj_id: int, mask: torch.Tensor) -> None:
        """One object's conditioning mask on ``frame_idx`` (see :meth:`train_add_new_masks`)."""
        self.train_add_new_masks(state, frame_idx, {obj_id: mask})

    # ------------------------------------------------------------------ propagation
    def propagate_frames(self, state: dict, start_frame_idx: int | None = None, reverse: bool = False,
                         bounds: Sequence[int] | None = None,
                         max_frame_num_to_track: int | None = None,
                         stops: Sequence[int] | None = None) -> Iterator[tuple[int, list[dict | None]]]:
        """Track through the video in SAM2's frame order; yields ``(frame_idx, [output or None per object])``.

        An object's output is its conditioning output on its prompted frames, else its tracked output. With
        ``bounds`` (one frame index per object) an object is tracked only from its bound on (forward) or up to it
        (reverse) and is None elsewhere; without, every object is tracked from the start, as SAM2 does. With
        ``stops`` (one frame index per object) an object is no longer tracked from its stop on (forward) or down
        from it (reverse). All objects tracked on a frame form one batch. Differentiable unless run under no_grad.
        """
        num_obj = self._get_obj_num(state)
        if num_obj == 0:
            raise RuntimeError("no prompts: add masks before propagating")
        banks = [state["output_dict_per_obj"][i] for i in range(num_obj)]
        if start_frame_idx is None:
            start_frame_idx = min(t for bank in banks for t in bank["cond_frame_outputs"])
        n = state["num_frames"] if max_frame_num_to_track is None else max_frame_num_to_track
        if reverse:
            order: Sequence[int] = range(start_frame_idx, max(start_frame_idx - n, 0) - 1, -1)
        else:
            order = range(start_frame_idx, min(start_frame_idx + n, state["num_frames"] - 1) + 1)
        for frame_idx in order:
            outs: list[dict | None] = [bank["cond_frame_outputs"].get(frame_idx) for bank in banks]
            active = [i for i in range(num_obj) if outs[i] is None and
                      (bounds is None or (frame_idx <= bounds[i] if reverse else frame_idx >= bounds[i])) and
                      (stops is None or (frame_idx > stops[i] if reverse else frame_idx < stops[i]))]
            if active:
                for i, out in zip(active, self._track_objects(state, active, frame_idx, reverse)):
                    banks[i]["non_cond_frame_outputs"][frame_idx] = outs[i] = out
            for i, out in enumerate(outs):
                if out is not None:
                    state["frames_tracked_per_obj"][i][frame_idx] = {"reverse": reverse}
            self._prune_history(state, frame_idx, reverse)
            yield frame_idx, outs
        if not torch.is_grad_enabled():  # under grad the graph holds every frame's features anyway (see below)
            state["cached_features"].clear()

    def train_propagate_in_video(self, state: dict, start_frame_idx: int | None = None,
                                 max_frame_num_to_track: int | None = None,
                                 reverse: bool = False) -> Iterator[tuple[int, list, torch.Tensor]]:
        """The official ``propagate_in_video`` contract: yields (frame_idx, obj_ids, mask logits [O, 1, H, W])."""
        for frame_idx, outs in self.propagate_frames(state, start_frame_idx, reverse,
                                                     max_frame_num_to_track=max_frame_num_to_track):
            low = torch.cat([out["pred_masks"].to(state["device"]) for out in outs])
            yield frame_idx, state["obj_ids"], self.to_video_res(state, low)

    def to_video_res(self, state: dict, low_res: torch.Tensor) -> torch.Tensor:
        """Low-res mask logits [O, 1, h, w] -> the video's resolution (SAM2's own bilinear resize)."""
        return self._get_orig_video_res_output(state, low_res)[1]

    def _track_objects(self, state: dict, obj_indices: list[int], frame_idx: int, reverse: bool) -> list[dict]:
        """One tracked frame for several objects as one batch (two: with a mask prior there or without; see
        ``sam2_ext.priors``); returns their outputs (not yet stored)."""
        outs: dict[int, dict] = {}
        for group, mask_inputs in self.prior_groups(state, obj_indices, frame_idx):  # with a mask prior or not
            self._batch_banks = [state["output_dict_per_obj"][i] for i in group]
            self._prior_step = mask_inputs is not None
            try:
                out, _ = self._run_single_frame_inference(
                    state, self._batch_banks[0], frame_idx, len(group), is_init_cond_frame=False, point_inputs=None,
                    mask_inputs=mask_inputs, reverse=reverse, run_mem_encoder=True)
            finally:
                self._batch_banks, self._prior_step = None, False
            outs.update(zip(group, _split_outputs(out, len(group))))
        return [outs[i] for i in obj_indices]

    # ------------------------------------------------------------------ history
    def min_exact_history(self) -> int:
        """Smallest ``keep_history`` that never drops a memory SAM2 would read (mask memories and object pointers)."""
        mask_window = self.num_maskmem * max(1, self.memory_temporal_stride_for_eval)
        ptr_window = self.max_obj_ptrs_in_encoder if self.use_obj_ptrs_in_encoder else 0
        return max(mask_window, ptr_window)

    def history_to_keep(self) -> int | None:
        """THE history rule: tracked outputs kept behind the current frame = max(what SAM2 reads, what the memory
        selector may pick from); None (keep all) when the selector may pick from every stored frame."""
        keep = self.min_exact_history()
        if self.memory_selector is None:
            return keep
        needed = getattr(self.memory_selector, "history_needed", lambda: None)()
        return None if needed is None else max(keep, needed)

    def _prune_history(self, state: dict, frame_idx: int, reverse: bool) -> None:
        """Drop non-conditioning outputs more than ``keep_history`` frames behind ``frame_idx`` (bounded memory)."""
        keep = state.get("keep_history")
        if keep is None:
            return
        for obj_out in state["output_dict_per_obj"].values():
            stale = [t for t in obj_out["non_cond_frame_outputs"]
                     if (t > frame_idx + keep if reverse else t < frame_idx - keep)]
            for t in stale:
                del obj_out["non_cond_frame_outputs"][t]

    # ------------------------------------------------------------------ hooks into SAM2's internals
    def _get_image_feature(self, inference_state, frame_idx, batch_size):
        """SAM2's, but under grad mode every frame's backbone output is kept for the whole state, not only the
        last frame's. Why: training holds each encoded frame in the autograd graph until backward anyway, and a
        ``both``-ways task (or a conditioning frame tracked for other objects) would encode a frame again, forward
        and backward. No-grad inference keeps SAM2's one-frame cache (bounded memory on long scans). Stored encoder
        outputs (a feature source) stand in for the encoder either way."""
        cache = inference_state["cached_features"]
        if torch.is_grad_enabled() and frame_idx not in cache:
            entry = self.stored_entry(inference_state, frame_idx)
            if entry is None:
                image = inference_state["images"][frame_idx].to(inference_state["device"]).float().unsqueeze(0)
                entry = (image, self.forward_image(image))
            cache[frame_idx] = entry  # SAM2's lookup below then hits, keeping all
        return super()._get_image_feature(inference_state, frame_idx, batch_size)

    def _run_single_frame_inference(self, inference_state, output_dict, frame_idx, batch_size,
                                    is_init_cond_frame, point_inputs, mask_inputs, reverse, run_mem_encoder,
                                    prev_sam_mask_logits=None):
        """SAM2's per-frame step, with the state visible to the selector and the heads' outputs kept."""
        self._current_state = inference_state
        self._last_heads = None
        try:
            compact_out, pred_masks = super()._run_single_frame_inference(
                inference_state, output_dict, frame_idx, batch_size, is_init_cond_frame, point_inputs,
                mask_inputs, reverse, run_mem_encoder, prev_sam_mask_logits,
            )
        finally:
            self._current_state = None
        ious, multimasks, memory_features = self._last_heads
        # SAM2 picks the mask with the highest predicted IoU when it outputs several
        compact_out["iou_pred"] = ious.max(dim=-1, keepdim=True).values.detach().float()
        if torch.is_grad_enabled():  # training: the loss needs every candidate mask and its predicted IoU
            compact_out["multimask_logits"], compact_out["multimask_ious"] = multimasks, ious
            raw = self._raw_multimasks
            compact_out["raw_multimask_logits"] = raw.float() if raw is not None else multimasks
            compact_out["memory_features"] = memory_features  # the decoder's input: image features + memory
        self._raw_multimasks = None
        return compact_out, pred_masks

    def _keep_raw_multimasks(self, module, args, output) -> None:
        """Forward hook of the mask decoder: its candidate masks before SAM2 replaces an "absent" object's masks
        by a constant (which carries no gradient), for losses that train the masks whatever the object score."""
        self._raw_multimasks = output[0]

    def _track_step(self, *args, **kwargs):
        """Record the heads' outputs, and keep object scores in train mode too.

        (SAM2's ``track_step`` stores ``object_score_logits`` only in eval mode, but the video predictor's
        bookkeeping reads it always, so training through the predictor needs it set here.)
        """
        current_out, sam_outputs, high_res_features, pix_feat = super()._track_step(*args, **kwargs)
        self._last_heads = (sam_outputs[2], sam_outputs[0], pix_feat)
        current_out["object_score_logits"] = sam_outputs[6]
        return current_out, sam_outputs, high_res_features, pix_feat

    def _prepare_memory_conditioned_features(self, frame_idx, is_init_cond_frame, current_vision_feats,
                                             current_vision_pos_embeds, feat_sizes, output_dict, num_frames,
                                             track_in_reverse=False):
        """Each object's memory (narrowed by ``memory_selector``), then one memory-attention call for the batch."""
        if is_init_cond_frame or self.num_maskmem == 0:
            return super()._prepare_memory_conditioned_features(
                frame_idx, is_init_cond_frame, current_vision_feats, current_vision_pos_embeds, feat_sizes,
                output_dict, num_frames, track_in_reverse)
        banks = self._batch_banks if self._batch_banks is not None else [output_dict]
        dtype = current_vision_feats[-1].dtype
        views = [self._memory_view(bank, frame_idx, num_frames, track_in_reverse, dtype) for bank in banks]
        if len(views) == 1:
            return super()._prepare_memory_conditioned_features(
                frame_idx, False, current_vision_feats, current_vision_pos_embeds, feat_sizes, views[0],
                num_frames, track_in_reverse)
        feats, pos = current_vision_feats[-1], current_vision_pos_embeds[-1]
        with capture_memory_inputs(self.memory_attention) as captured:
            for b, view in enumerate(views):  # SAM2's own gathering of each object's memory
                super()._prepare_memory_conditioned_features(
                    frame_idx, False, [feats[:, b:b + 1]], [pos[:, b:b + 1]], feat_sizes, view, num_frames,
                    track_in_reverse)
        memory, memory_pos, num_ptr, mask = pad_memories(captured)
        if mask is not None and not self.can_mask_memory:
            fused = torch.cat([self.memory_attention(curr=[feats[:, b:b + 1]], curr_pos=[pos[:, b:b + 1]],
                                                     memory=m, memory_pos=p, num_obj_ptr_tokens=n)
                               for b, (m, p, n) in enumerate(captured)], dim=1)
        else:
            with key_mask_on(self.memory_attention, mask):
                fused = self.memory_attention(curr=[feats], curr_pos=[pos], memory=memory, memory_pos=memory_pos,
                                              num_obj_ptr_tokens=num_ptr)
        height, width = feat_sizes[-1]
        return fused.permute(1, 2, 0).reshape(len(views), self.hidden_dim, height, width)

    def _memory_view(self, bank: dict, frame_idx: int, num_frames: int, reverse: bool, dtype: torch.dtype) -> dict:
        """The memories one object attends to: the selector's choice (or all), in the features' dtype."""
        if self.memory_selector is not None:
            bank = self.memory_selector.select(model=self, inference_state=self._current_state, output_dict=bank,
                                               frame_idx=frame_idx, num_frames=num_frames, track_in_reverse=reverse)
        return _memories_as(bank, dtype)


def _memories_as(output_dict: dict, dtype: torch.dtype) -> dict:
    """A view of ``output_dict`` whose mask memories have the features' dtype.

    Why: SAM2 stores mask memories in bfloat16 and relies on CUDA autocast to mix them with float32 layers. When no
    object pointer is concatenated (a class whose first support slice is empty) the bf16 memory reaches a float32
    linear layer on CPU and crashes. When pointers are concatenated torch.cat already promotes to float32, so
    casting up front gives bit-identical results to the official predictor.
    """
    def cast(outputs: dict) -> dict:
        view = {}
        for t, out in outputs.items():
            feats = out.get("maskmem_features")
            if feats is not None and feats.dtype != dtype:
                out = {**out, "maskmem_features": feats.to(dtype)}
            view[t] = out
        return view

    return {**output_dict, "cond_frame_outputs": cast(output_dict["cond_frame_outputs"]),
            "non_cond_frame_outputs": cast(output_dict["non_cond_frame_outputs"])}
