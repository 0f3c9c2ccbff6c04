"""The model's input rule: how frames in [0, 1] become the image encoder's input.

Why a rule that travels with the model config: weights are trained on one input convention. SAM2's checkpoints
expect ImageNet mean/std on RGB in [0, 1]; LiteMedSAM's expect each slice min–max scaled to [0, 1], three equal
channels and no mean/std. A model config names its rule (key ``input``, read by ``sam2_ext.build``), the built
predictor carries it (``input_rule``) and every frame is prepared with it. Resizing is the engine's own (square,
bilinear, antialiased) for every rule.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputRule:
    """Per-channel ``(x - mean) / std`` after an optional per-slice min–max stretch to [0, 1]."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    slice_minmax: bool = False

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None, where: str) -> "InputRule":
        """The rule of a config's ``input`` mapping (None: SAM2's); a bad value raises ValueError naming it."""
        if node is None:
            return cls()
        unknown = sorted(set(node) - {"mean", "std", "slice_minmax"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} (known: mean, std, slice_minmax)")
        mean, std = _triple(node.get("mean", IMAGENET_MEAN), "mean"), _triple(node.get("std", IMAGENET_STD), "std")
        if min(std) <= 0:
            raise ValueError(f"{where}: input.std must be positive, got {list(std)}")
        minmax = node.get("slice_minmax", False)
        if not isinstance(minmax, bool):
            raise ValueError(f"{where}: input.slice_minmax must be true or false, got {minmax!r}")
        return cls(mean, std, minmax)


SAM2_INPUT = InputRule()


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 3:
        raise ValueError(f"input.{name} must be three numbers, got {value!r}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def prepare_frames(frames: torch.Tensor, image_size: int, rule: InputRule = SAM2_INPUT) -> torch.Tensor:
    """[N, H, W] grey or [N, 3, H, W] RGB frames in [0, 1] -> float32 [N, 3, image_size, image_size] per ``rule``.

    Resize to ``image_size`` squared (bilinear, antialiased) when needed, stretch each slice to [0, 1] when the
    rule says so (a constant slice stays as it is), repeat grey to 3 channels, then ``(x - mean) / std``.
    """
    if frames.dim() == 3:
        frames = frames[:, None]
    if frames.dim() != 4 or frames.shape[1] not in (1, 3):
        raise ValueError(f"frames must be [N, H, W] or [N, 3, H, W], got {tuple(frames.shape)}")
    frames = frames.float()
    if frames.shape[-2:] != (image_size, image_size):
        frames = F.interpolate(frames, size=(image_size, image_size), mode="bilinear",
                               align_corners=False, antialias=True)
    if rule.slice_minmax:
        flat = frames.flatten(1)
        low, high = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
        span = high - low
        frames = torch.where(span > 0, (frames - low) / span.clamp_min(1e-12), frames)
    if frames.shape[1] == 1:
        frames = frames.expand(-1, 3, -1, -1)
    mean = torch.tensor(rule.mean, device=frames.device).view(1, 3, 1, 1)
    std = torch.tensor(rule.std, device=frames.device).view(1, 3, 1, 1)
    return (frames - mean) / std


class TensorFrames:
    """Lazy frame source over an [N, H, W] / [N, 3, H, W] tensor: prepares one frame when the model asks for it."""

    def __init__(self, frames: torch.Tensor, image_size: int, rule: InputRule = SAM2_INPUT):
        if frames.dim() not in (3, 4) or (frames.dim() == 4 and frames.shape[1] != 3):
            raise ValueError(f"frames must be [N, H, W] or [N, 3, H, W], got {tuple(frames.shape)}")
        if len(frames) == 0:
            raise ValueError("frames is empty")
        self.frames = frames
        self.image_size = image_size
        self.rule = rule

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> torch.Tensor:
        return prepare_frames(self.frames[i: i + 1], self.image_size, self.rule)[0]
