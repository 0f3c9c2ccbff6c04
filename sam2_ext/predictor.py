"""ICLPredictor: SAM2's video predictor, fed from tensors, differentiable, with a memory-selector hook.

The official ``SAM2VideoPredictor`` reads JPEG folders and wraps its public methods in ``torch.inference_mode``,
so nothing it computes can be trained. This subclass reuses SAM2's own code paths (the undecorated originals via
``__wrapped__`` and its private helpers) so that, under ``torch.no_grad()``, its results equal the official
predictor's, and under grad mode the same computation builds an autograd graph through memory attention, memory
encoder, mask decoder and image encoder.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from sam2.sam2_video_predictor import SAM2VideoPredictor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FrameSource(Protocol):
    """Anything with ``len()`` and ``[i] -> Tensor[3, S, S]`` already resized and normalised (lazy frames)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> torch.Tensor: ...


def prepare_frames(frames: torch.Tensor, image_size: int) -> torch.Tensor:
    """SAM2's input transform for [N, H, W] grey or [N, 3, H, W] RGB frames in [0, 1].

    Resize to ``image_size`` squared (bilinear, antialiased), repeat grey to 3 channels, normalise with the
    ImageNet mean/std SAM2 was trained with. Returns float32 [N, 3, image_size, image_size].
    """
    if frames.dim() == 3:
        frames = frames[:, None]
    if frames.dim() != 4 or frames.shape[1] not in (1, 3):
        raise ValueError(f"frames must be [N, H, W] or [N, 3, H, W], got {tuple(frames.shape)}")
    frames = frames.float()
    if frames.shape[-2:] != (image_size, image_size):
        frames = F.interpolate(frames, size=(image_size, image_size), mode="bilinear",
                               align_corners=False, antialias=True)
    if frames.shape[1] == 1:
        frames = frames.expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, device=frames.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=frames.device).view(1, 3, 1, 1)
    return (frames - mean) / std


class TensorFrames:
    """Lazy frame source over an [N, H, W] / [N, 3, H, W] tensor: prepares one frame when the model asks for it.

    Holds only a reference to the caller's tensor, so no second full copy at ``image_size`` is made.
    """

    def __init__(self, frames: torch.Tensor, image_size: int):
        if frames.dim() not in (3, 4) or (frames.dim() == 4 and frames.shape[1] != 3):
            raise ValueError(f"frames must be [N, H, W] or [N, 3, H, W], got {tuple(frames.shape)}")
        if len(frames) == 0:
            raise ValueError("frames is empty")
        self.frames = frames
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> torch.Tensor:
        return prepare_frames(self.frames[i: i + 1], self.image_size)[0]


class ICLPredictor(SAM2VideoPredictor):
    """SAM2 video predictor for in-context segmentation (support slices as prompts, query slices tracked)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Object with ``select(model, inference_state, output_dict, frame_idx, num_frames, track_in_reverse)``
        # returning the output_dict view to attend to; None keeps SAM2's own memory choice.
        self.memory_selector = None
        self._current_state: dict | None = None
        self._last_iou_pred: torch.Tensor | None = None

    # ------------------------------------------------------------------ state
    def init_state_from_frames(
        self,
        frames: torch.Tensor | FrameSource,
        video_height: int | None = None,
        video_width: int | None = None,
        offload_state_to_cpu: bool = False,
    ) -> dict:
        """Build an inference state like ``init_state`` does, from tensors instead of a JPEG folder.

        ``frames``: float [N, H, W] grey slices or [N, 3, H, W] in [0, 1] (outputs come back at H x W), or a lazy
        ``FrameSource`` of prepared [3, S, S] frames (outputs at ``video_height`` x ``video_width``, default S).
        Frames are prepared one at a time when their features are computed, never all at once.
        Unlike ``init_state`` no features are computed here (so no frame-0 warm-up outside the caller's grad mode).
        """
        if isinstance(frames, torch.Tensor):
            height, width = frames.shape[-2:]
            source: Any = TensorFrames(frames, self.image_size)
        else:
            if len(frames) == 0:
                raise ValueError("frame source is empty")
            height = width = self.image_size
            source = frames
        device = self.device
        state: dict[str, Any] = {
            "images": source,
            "num_frames": len(source),
            "offload_video_to_cpu": False,
            "offload_state_to_cpu": offload_state_to_cpu,
            "video_height": int(video_height or height),
            "video_width": int(video_width or width),
            "device": device,
            "storage_device": torch.device("cpu") if offload_state_to_cpu else device,
            "point_inputs_per_obj": {},
            "mask_inputs_per_obj": {},
            "cached_features": {},
            "constants": {},
            "obj_id_to_idx": OrderedDict(),
            "obj_idx_to_id": OrderedDict(),
            "obj_ids": [],
            "output_dict_per_obj": {},
            "temp_output_dict_per_obj": {},
            "frames_tracked_per_obj": {},
            # ours: frames whose image features stay cached until propagation starts (the prompted slices),
            # and how many already-tracked non-conditioning outputs to keep behind the current frame (None = all)
            "pinned_feature_frames": set(),
            "keep_history": None,
        }
        return state

    # ------------------------------------------------------------------ prompts and propagation
    def train_add_new_mask(self, state: dict, frame_idx: int, obj_id: int, mask: torch.Tensor):
        """Add a GT mask on ``frame_idx`` for ``obj_id`` (SAM2's add_new_mask without inference_mode).

        Under grad mode the conditioning memory built from it at propagation start keeps its graph.
        Returns (frame_idx, obj_ids, video_res_masks) as the official method does.
        """
        if not 0 <= frame_idx < state["num_frames"]:
            raise IndexError(f"frame_idx {frame_idx} outside 0..{state['num_frames'] - 1}")
        if mask.dim() != 2:
            raise ValueError(f"mask must be [H, W], got {tuple(mask.shape)}")
        # keep this slice's image features: the memory encoder needs them again when propagation starts
        state.setdefault("pinned_feature_frames", set()).add(frame_idx)
        return SAM2VideoPredictor.add_new_mask.__wrapped__(self, state, frame_idx, obj_id, mask)

    def train_propagate_in_video(
        self,
        state: dict,
        start_frame_idx: int | None = None,
        max_frame_num_to_track: int | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[int, list, torch.Tensor]]:
        """Track all objects through the video; yields (frame_idx, obj_ids, mask logits [num_obj, 1, H, W]).

        Same frame order, skipping of prompted frames and bookkeeping as the official ``propagate_in_video``
        (without its progress bar); differentiable unless run under no_grad. For each frame the image features
        are computed once and reused by every object. With ``state["keep_history"] = k`` the non-conditioning
        outputs more than k frames behind the current one are dropped; ``k >= self.min_exact_history()`` keeps
        results identical to keeping everything, a smaller k bounds memory further but changes them.
        """
        SAM2VideoPredictor.propagate_in_video_preflight.__wrapped__(self, state)
        state.get("pinned_feature_frames", set()).clear()
        obj_ids = state["obj_ids"]
        num_frames = state["num_frames"]
        num_obj = self._get_obj_num(state)
        if start_frame_idx is None:
            start_frame_idx = min(t for out in state["output_dict_per_obj"].values() for t in out["cond_frame_outputs"])
        if max_frame_num_to_track is None:
            max_frame_num_to_track = num_frames
        if reverse:
            end = max(start_frame_idx - max_frame_num_to_track, 0)
            order: Sequence[int] = range(start_frame_idx, end - 1, -1) if start_frame_idx > 0 else []
        else:
            end = min(start_frame_idx + max_frame_num_to_track, num_frames - 1)
            order = range(start_frame_idx, end + 1)

        for frame_idx in order:
            masks = []
            for obj_idx in range(num_obj):
                obj_out = state["output_dict_per_obj"][obj_idx]
                if frame_idx in obj_out["cond_frame_outputs"]:
                    pred = obj_out["cond_frame_outputs"][frame_idx]["pred_masks"].to(state["device"])
                else:
                    current_out, pred = self._run_single_frame_inference(
                        inference_state=state, output_dict=obj_out, frame_idx=frame_idx, batch_size=1,
                        is_init_cond_frame=False, point_inputs=None, mask_inputs=None, reverse=reverse,
                        run_mem_encoder=True,
                    )
                    obj_out["non_cond_frame_outputs"][frame_idx] = current_out
                state["frames_tracked_per_obj"][obj_idx][frame_idx] = {"reverse": reverse}
                masks.append(pred)
            self._prune_history(state, frame_idx, reverse)
            all_masks = torch.cat(masks, dim=0) if len(masks) > 1 else masks[0]
            _, video_res_masks = self._get_orig_video_res_output(state, all_masks)
            yield frame_idx, obj_ids, video_res_masks
        state["cached_features"].clear()

    def min_exact_history(self) -> int:
        """Smallest ``keep_history`` that never drops a memory SAM2 would read (mask memories and object pointers)."""
        mask_window = self.num_maskmem * max(1, self.memory_temporal_stride_for_eval)
        ptr_window = self.max_obj_ptrs_in_encoder if self.use_obj_ptrs_in_encoder else 0
        return max(mask_window, ptr_window)

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
        """Keep features of prompted frames (pinned) plus the newest frame; SAM2 keeps only the newest.

        The official method then finds the frame in the cache and expands it to the batch size.
        """
        cache = inference_state["cached_features"]
        if frame_idx not in cache:
            image = inference_state["images"][frame_idx].to(inference_state["device"]).float().unsqueeze(0)
            backbone_out = self.forward_image(image)
            pinned = inference_state.get("pinned_feature_frames", ())
            for t in [t for t in cache if t not in pinned]:
                del cache[t]
            cache[frame_idx] = (image, backbone_out)
        return super()._get_image_feature(inference_state, frame_idx, batch_size)

    def _run_single_frame_inference(self, inference_state, output_dict, frame_idx, batch_size,
                                    is_init_cond_frame, point_inputs, mask_inputs, reverse, run_mem_encoder,
                                    prev_sam_mask_logits=None):
        """SAM2's per-frame step, with the state visible to the selector and ``iou_pred`` kept in the output."""
        self._current_state = inference_state
        self._last_iou_pred = None
        try:
            compact_out, pred_masks = super()._run_single_frame_inference(
                inference_state, output_dict, frame_idx, batch_size, is_init_cond_frame, point_inputs,
                mask_inputs, reverse, run_mem_encoder, prev_sam_mask_logits,
            )
        finally:
            self._current_state = None
        compact_out["iou_pred"] = self._last_iou_pred
        return compact_out, pred_masks

    def _track_step(self, *args, **kwargs):
        """Record the chosen mask's predicted IoU, and keep object scores in train mode too.

        (SAM2's ``track_step`` stores ``object_score_logits`` only in eval mode, but the video predictor's
        bookkeeping reads it always, so training through the predictor needs it set here.)
        """
        current_out, sam_outputs, high_res_features, pix_feat = super()._track_step(*args, **kwargs)
        ious, object_score_logits = sam_outputs[2], sam_outputs[6]
        # SAM2 picks the mask with the highest predicted IoU when it outputs several
        self._last_iou_pred = ious.max(dim=-1, keepdim=True).values.detach().float()
        current_out["object_score_logits"] = object_score_logits
        return current_out, sam_outputs, high_res_features, pix_feat

    def _prepare_memory_conditioned_features(self, frame_idx, is_init_cond_frame, current_vision_feats,
                                             current_vision_pos_embeds, feat_sizes, output_dict, num_frames,
                                             track_in_reverse=False):
        """Let ``memory_selector`` narrow the memory bank before SAM2 attends to it (non-initial frames only)."""
        if self.memory_selector is not None and not is_init_cond_frame:
            output_dict = self.memory_selector.select(
                model=self, inference_state=self._current_state, output_dict=output_dict, frame_idx=frame_idx,
                num_frames=num_frames, track_in_reverse=track_in_reverse,
            )
        if not is_init_cond_frame:
            output_dict = _memories_as(output_dict, current_vision_feats[-1].dtype)
        return super()._prepare_memory_conditioned_features(
            frame_idx, is_init_cond_frame, current_vision_feats, current_vision_pos_embeds, feat_sizes,
            output_dict, num_frames, track_in_reverse,
        )


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
