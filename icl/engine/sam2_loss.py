"""SAM2's own training loss for in-context tracking: best-token mask loss, IoU-head loss, object-score loss.

Why: with ``multimask_output_for_tracking: true`` SAM2 returns, on every tracked slice, the one of its 3 candidate
masks that its IoU head ranks highest. A loss on that returned mask alone never trains the IoU head, so the choice
stays arbitrary. SAM2's trainer (``training/loss_fns.py``, ``MultiStepMultiMasksAndIous``; re-implemented here from
its description) instead, per tracked frame and object:

* computes focal (alpha 0.25, gamma 2) + Dice on *every* candidate and back-propagates only the candidate with the
  lowest ``20 * focal + 1 * dice`` (the "best token"; with single-mask tracking there is one candidate);
* trains the IoU head with an L1 loss between each candidate's predicted IoU and the real IoU of that candidate's
  binarised mask (``supervise_all_iou``);
* trains the object-score head with BCE against "the object is present";
* counts mask, Dice and IoU losses only where the object is present;
* sums over frames, averages over objects; weights mask 20, dice 1, iou 1, class 1 (``configs/sam2.1_training``).

Which masks are scored is the caller's choice (``icl.engine.objective.TaskLoss``): SAM2's, or the decoder's masks
*before* SAM2 replaces an "absent" object's masks by a constant (which has no gradient), so the masks keep learning
while the object-score head is still wrong.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sam2_ext.track import to_size


@dataclass
class SAM2LossWeights:
    """SAM2.1 training defaults (configs/sam2.1_training: loss_mask 20, loss_dice 1, loss_iou 1, loss_class 1)."""

    mask: float = 20.0
    dice: float = 1.0
    iou: float = 1.0
    obj: float = 1.0


def focal_per_token(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25,
                    gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss averaged over pixels: logits [N, M, h, w], target [N, 1, h, w] -> [N, M]."""
    target = target.expand_as(logits)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(2).mean(-1)


def dice_per_token(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per candidate with +1 smoothing: [N, M, h, w] -> [N, M]."""
    prob = logits.sigmoid().flatten(2)
    target = target.expand_as(logits).flatten(2)
    return 1 - (2 * (prob * target).sum(-1) + smooth) / (prob.sum(-1) + target.sum(-1) + smooth)


def real_iou_per_token(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of each candidate's binarised mask (logit > 0) with the target, no gradient: [N, M]."""
    pred = logits.detach().flatten(2) > 0
    truth = target.expand_as(logits).flatten(2) > 0.5
    inter = (pred & truth).sum(-1).float()
    union = (pred | truth).sum(-1).float()
    return inter / union.clamp(min=1.0)


def iou_l1(logits: torch.Tensor, ious: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SAM2's IoU-head error per item: mean over candidates of |predicted - real IoU| ([N, M, h, w], [N, M],
    [N, 1, H, W] -> [N]); logits are resized (bilinear) to the target's size first."""
    logits = to_size(logits, target.shape[-2:])
    return (ious.float() - real_iou_per_token(logits, target)).abs().mean(-1)


def presence_bce(object_score_logits: torch.Tensor, present: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The object-score head's loss: BCE of its logit against "the object is present" (1) or absent (0)."""
    return F.binary_cross_entropy_with_logits(object_score_logits.float(), present.float(), reduction=reduction)


class SAM2Loss(torch.nn.Module):
    """The loss over N tracked (frame, object) items; :meth:`forward` returns ``{"loss", "mask", "dice", "iou",
    "obj"}`` (the parts detached, for logging)."""

    def __init__(self, weights: SAM2LossWeights | None = None, focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        self.w = weights or SAM2LossWeights()
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def forward(self, multimask_logits: torch.Tensor, ious: torch.Tensor, object_score_logits: torch.Tensor,
                targets: torch.Tensor, objects: torch.Tensor) -> dict[str, torch.Tensor]:
        """``multimask_logits`` [N, M, h, w], ``ious`` [N, M], ``object_score_logits`` [N], ``targets`` [N, H, W]
        binary, ``objects`` [N] (which object each item belongs to: sums run over an object's frames, then the
        mean over objects). Logits are resized (bilinear) to the targets' size, as SAM2 scores upsampled masks."""
        target = targets.float()[:, None]
        logits = to_size(multimask_logits.float(), target.shape[-2:])
        present = (target.flatten(1) > 0.5).any(1).float()
        focal = focal_per_token(logits, target, self.focal_alpha, self.focal_gamma)
        dice = dice_per_token(logits, target)
        pick = (self.w.mask * focal + self.w.dice * dice).argmin(-1)
        rows = torch.arange(len(pick), device=pick.device)
        iou_term = iou_l1(logits, ious, target)
        obj_term = presence_bce(object_score_logits, present, reduction="none")
        _, obj_index = torch.unique(objects, return_inverse=True)
        count = int(obj_index.max()) + 1 if len(obj_index) else 1

        def reduce(per_item: torch.Tensor) -> torch.Tensor:  # sum over each object's frames, mean over objects
            return torch.zeros(count, device=per_item.device).index_add(0, obj_index, per_item).mean()

        parts = {"mask": reduce(focal[rows, pick] * present), "dice": reduce(dice[rows, pick] * present),
                 "iou": reduce(iou_term * present), "obj": reduce(obj_term)}
        loss = sum(getattr(self.w, k) * v for k, v in parts.items())
        return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}
