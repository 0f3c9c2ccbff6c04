"""Stored image-encoder outputs in place of the encoder: the feature-source hook of ``ICLPredictor``.

Why: with a frozen image encoder its outputs for a slice never change, so a caller may store them once (e.g. on
disk) and hand them back per frame; everything after the encoder (the mask decoder's high-res convolutions, memory
attention, heads) still runs, with grad. This module knows nothing about where the features are stored.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


class FeatureSource(Protocol):
    """``source(frame_idx)`` -> the image encoder's FPN levels of that frame ([1, C, h, w] each), or None."""

    def __call__(self, frame_idx: int) -> Sequence[torch.Tensor] | None: ...


class StoredFeatures:
    """Mixin for a SAM2 video predictor: reads a state's ``image_features`` source before running the encoder."""

    def encode_levels(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The image encoder's (trunk + neck) FPN levels of prepared [B, 3, S, S] frames: what a feature source
        stores. Everything after it (the mask decoder's high-res convolutions) still runs on every use."""
        return list(self.image_encoder(images)["backbone_fpn"])

    def backbone_from_levels(self, levels: Sequence[torch.Tensor]) -> dict:
        """``forward_image``'s output from stored levels: their position encodings recomputed (they depend on the
        shape alone, as the neck makes them) and the mask decoder's high-res convolutions applied, with grad."""
        fpn = [x.to(self.device, torch.float32) for x in levels]
        pos = [self.image_encoder.neck.position_encoding(x).to(x.dtype) for x in fpn]
        out = {"vision_features": fpn[-1], "vision_pos_enc": pos, "backbone_fpn": list(fpn)}
        if self.use_high_res_features_in_sam:
            out["backbone_fpn"][0] = self.sam_mask_decoder.conv_s0(fpn[0])
            out["backbone_fpn"][1] = self.sam_mask_decoder.conv_s1(fpn[1])
        return out

    def stored_entry(self, inference_state: dict, frame_idx: int) -> tuple[torch.Tensor, dict] | None:
        """``(image, backbone output)`` of a frame from the state's feature source, as SAM2's feature cache holds
        them (the image is unused downstream: a 1-pixel stand-in takes its place), or None where it has none."""
        source = inference_state.get("image_features")
        levels = source(frame_idx) if source is not None else None
        if levels is None:
            return None
        return torch.zeros(1, 3, 1, 1, device=self.device), self.backbone_from_levels(levels)

    def _get_image_feature(self, inference_state, frame_idx, batch_size):
        """SAM2's features of a frame; where the state's feature source has the frame's stored encoder outputs,
        they go into SAM2's own one-frame feature cache, so the encoder does not run."""
        if frame_idx not in inference_state["cached_features"]:
            entry = self.stored_entry(inference_state, frame_idx)
            if entry is not None:
                inference_state["cached_features"] = {frame_idx: entry}
        return super()._get_image_feature(inference_state, frame_idx, batch_size)
