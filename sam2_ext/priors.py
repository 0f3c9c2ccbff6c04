"""Mask priors: a dense mask prompt on tracked frames, which the mask decoder reads beside the memory.

Why: between two annotated slices a classic fill (shape-based interpolation) is already a good guess; given to the
model as SAM2's dense mask prompt (the prompt encoder's mask input, the way SAM2 refines a mask with clicks), the
model learns to correct it from the image and the memory instead of re-deriving the shape from scratch.

SAM2 treats a mask input on a conditioning frame as the answer (``use_mask_input_as_output_without_sam``); on a
*tracked* frame with a prior this mixin runs the full step instead — memory-conditioned features, prompt encoder with
the prior as its mask input, mask decoder — so the prior is a hint, never copied through. Priors live in the
inference state as ``state["priors"] = {object index: {frame: [1, 1, h, w] float in [0, 1]}}``.

With ``prior_gain`` g > 0 the prior is also a *residual*: the decoder's mask logits get ``g * (2 * prior - 1)``
added (g = 10 is SAM2's own scale for a mask used as output: +-10 logits), so the step starts from the prior and
the decoder learns corrections; the object score still gates the result. 0 (the default) is the prompt alone.

The residual is added on the decoder's mask grid (image_size / 4: 32 x 32 at 128 px), which blurs a prior that is
finer than that. With ``prior_resolution = "output"`` whoever sizes the logits for use (the sparse fill at the
slice's own resolution, the training loss at the target's) swaps that coarse residual for the prior at its own
resolution (:func:`residual_at_output`): the decoder's correction stays on its grid, the prior keeps its detail.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from sam2.modeling.sam2_base import NO_OBJ_SCORE


def prior_input(mask: Any, size: int, device: Any) -> torch.Tensor:
    """A prior mask [H, W] (any size, bool or float) as the decoder's mask input: [1, 1, size, size] float in [0, 1],
    downsampled the way SAM2 downsamples a mask prompt (bilinear, antialiased)."""
    m = torch.as_tensor(mask).float()[None, None].to(device)
    if tuple(m.shape[-2:]) != (size, size):
        m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return m.clamp(0, 1)


def residual_at_output(logits: torch.Tensor, prior: torch.Tensor, fine: Any, gain: float) -> torch.Tensor:
    """A prior step's mask logits [..., h, w] at the output's resolution [..., H, W]: the mask-grid residual
    ``gain * (2 * prior - 1)`` taken out (``prior``: the mask input the step read, at the logits' size), the rest
    resized bilinearly (SAM2's way, ``sam2_ext.track.to_size``), and ``gain * (2 * fine - 1)`` added (``fine``: the
    prior at the output's resolution, [H, W] or [..., H, W]). Masks SAM2 gated as absent stay gated."""
    from sam2_ext.track import to_size  # track imports the predictor, which imports this module

    fine = torch.as_tensor(fine).to(logits.device, torch.float32)
    size = tuple(fine.shape[-2:])
    logits = logits.float()
    if prior.shape[-2:] != logits.shape[-2:]:
        raise ValueError(f"prior {tuple(prior.shape)} is not at the logits' size {tuple(logits.shape[-2:])}")
    present = (logits.flatten(-2).amax(-1) > NO_OBJ_SCORE / 2)[..., None, None]
    swapped = to_size(logits - gain * (2 * prior.to(logits) - 1), size) + gain * (2 * fine - 1)
    return torch.where(present, swapped, to_size(logits, size))


class MaskPriors:
    """Mixin of :class:`sam2_ext.predictor.ICLPredictor`: tracked frames with a mask prior (module docstring)."""

    _prior_step = False
    prior_gain = 0.0  # the residual's scale (module docstring); what the weights were trained with
    prior_resolution = "grid"  # where the residual is read: "grid" (as returned) or "output" (residual_at_output)

    def set_priors(self, state: dict, priors: Mapping[int, Mapping[int, Any]]) -> None:
        """``priors``: ``{object index: {frame: mask [H, W]}}``; stored at the prompt encoder's mask-input size."""
        size = self.sam_prompt_encoder.mask_input_size[0]
        state["priors"] = {int(i): {int(f): prior_input(m, size, state["device"]) for f, m in per.items()}
                           for i, per in priors.items()}

    @staticmethod
    def prior_groups(state: dict, obj_indices: Sequence[int], frame_idx: int
                     ) -> list[tuple[list[int], torch.Tensor | None]]:
        """The objects of one tracked frame split into those without a prior there and those with one (with their
        stacked mask inputs): each group is one batch."""
        priors = state.get("priors") or {}
        with_prior = [i for i in obj_indices if frame_idx in priors.get(i, {})]
        plain = [i for i in obj_indices if i not in with_prior]
        groups: list[tuple[list[int], torch.Tensor | None]] = [(plain, None)] if plain else []
        if with_prior:
            groups.append((with_prior, torch.cat([priors[i][frame_idx] for i in with_prior])))
        return groups

    def _forward_sam_heads(self, backbone_features, point_inputs=None, mask_inputs=None, high_res_features=None,
                           multimask_output=False):
        out = super()._forward_sam_heads(backbone_features, point_inputs, mask_inputs, high_res_features,
                                         multimask_output)
        if not (self._prior_step and self.prior_gain and mask_inputs is not None):
            return out
        low_multi, _, ious, low, _, obj_ptr, scores = out
        prior = mask_inputs.float()
        if prior.shape[-2:] != low.shape[-2:]:
            prior = F.interpolate(prior, size=low.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
        residual = self.prior_gain * (2 * prior - 1)
        add = lambda x: torch.where(x > NO_OBJ_SCORE / 2, x + residual, x)  # noqa: E731 (gated masks stay gated)
        low_multi, low = add(low_multi), add(low)
        size = (self.image_size, self.image_size)
        up = lambda x: F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # noqa: E731 (SAM2's)
        if getattr(self, "_raw_multimasks", None) is not None:  # what the ungated training loss reads
            self._raw_multimasks = self._raw_multimasks + residual
        return low_multi, up(low_multi), ious, low, up(low), obj_ptr, scores

    def _track_step(self, *args, **kwargs):
        if not self._prior_step:
            return super()._track_step(*args, **kwargs)
        as_output = self.use_mask_input_as_output_without_sam
        self.use_mask_input_as_output_without_sam = False  # a prior is a hint for the decoder, not the answer
        try:
            return super()._track_step(*args, **kwargs)
        finally:
            self.use_mask_input_as_output_without_sam = as_output
