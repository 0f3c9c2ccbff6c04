"""THE soft Dice + BCE loss on logits: training's ``-loss dice_bce`` and test-time adaptation (``icl.sparse.adapt``).

Why in the model layer: training (``icl.engine``) and inference (``icl.sparse``) both use it, and inference must
not stand on the training engine.

Shapes: ``logits`` and ``target`` are ``[T, C, H, W]`` (T query slices, C classes = SAM2 objects); a ``[T, H, W]``
pair is treated as one class. Targets are binary ``{0, 1}``.

Reduction (why it is done this way):

* **Dice** is MONAI ``DiceLoss(sigmoid=True, batch=True)``: for each class the overlap is summed over *all* T query
  slices and pixels, i.e. a 3D Dice over the clip, then averaged over classes. A per-slice Dice would be undefined on
  the many query slices that hold no object. ``smooth_nr = smooth_dr = smooth`` (default 1.0) makes an all-empty
  target with an empty prediction cost ~0 instead of ~1, and keeps everything finite.
* **BCE** (``torch.nn.functional.binary_cross_entropy_with_logits``) is the mean over every element.
* ``loss = dice_weight * dice + ce_weight * ce``. Computed in float32 even under autocast (AMP) for stability.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ICLLoss(nn.Module):
    """Dice + BCE on logits; ``forward`` returns the scalar loss, :meth:`terms` also the parts for logging."""

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0, smooth: float = 1.0) -> None:
        super().__init__()
        if dice_weight < 0 or ce_weight < 0 or dice_weight + ce_weight == 0:
            raise ValueError(f"loss weights must be >= 0 and not both 0, got dice={dice_weight}, ce={ce_weight}")
        self.dice_weight = float(dice_weight)
        self.ce_weight = float(ce_weight)
        from monai.losses import DiceLoss  # here, not at import: importing monai costs ~10 s, which every
        # fill would pay (test-time adaptation is the only use on the inference road)
        self.dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=smooth, smooth_dr=smooth, reduction="mean")

    @staticmethod
    def _prepare(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if logits.shape != target.shape:
            raise ValueError(f"logits and target differ in shape: {tuple(logits.shape)} vs {tuple(target.shape)}")
        if logits.dim() == 3:
            logits, target = logits.unsqueeze(1), target.unsqueeze(1)
        if logits.dim() != 4:
            raise ValueError(f"expected logits [T, C, H, W] or [T, H, W], got shape {tuple(logits.shape)}")
        return logits.float(), target.to(device=logits.device, dtype=torch.float32)

    def terms(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"loss", "dice", "ce"}``: the weighted total and its two unweighted parts (scalars, on logits' device)."""
        logits, target = self._prepare(logits, target)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            dice = self.dice(logits, target)
            ce = F.binary_cross_entropy_with_logits(logits, target, reduction="mean")
        return {"loss": self.dice_weight * dice + self.ce_weight * ce, "dice": dice, "ce": ce}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.terms(logits, target)["loss"]
