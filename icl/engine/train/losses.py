"""All of training's loss code: the objective of one task (:class:`TaskLoss`) and SAM2's own loss inside it.

The training objective of one task: SAM2's own loss (default) or the Dice + BCE of the returned masks.

``sam2`` (:class:`SAM2Loss`, below): best-candidate focal + Dice, the IoU head and the object-score head, on every
(scored frame, object) the rule tracked — conditioning frames have no decoder output and are not scored.
``dice_bce`` (``icl.model.losses.ICLLoss``): 3D Dice + BCE of the returned masks over the scored frames at
``out_size``, plus BCE of SAM2's object score against "the object is present" (SAM2 replaces an absent object's
masks by a constant without gradient, so the presence head must learn too), plus SAM2's L1 loss of the IoU head
against each candidate's real IoU where the object is present (the scored memory selector reads predicted IoU, and
multimask tracking picks with it: an untrained head would make both pick at random).

``prior_gain`` > 0 (weights trained with ``-mask_prior_res output``): on (frame, object) items with a mask prior the
scored logits have the decoder's mask-grid residual swapped for the prior at the target's resolution
(``sam2_ext.priors.residual_at_output``), as the sparse fill does at the scan's.

``aux`` > 0 adds an auxiliary loss: a 1x1 probe on the memory-conditioned features (``ICLStep(aux_probe=True)``)
must predict how much of each feature cell the target covers (BCE). Why: from random init the decoder can lower
the loss by segmenting every look-alike from the image alone, and the memory path is then trained *away*; asking
the features that come out of memory attention to locate the target gives memory encoder and attention a direct
gradient to write and read "where the object is". The probe is dropped after training.

**SAM2's loss.** SAM2's own training loss for in-context tracking: best-token mask loss, IoU-head loss, object-score loss.

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

Which masks are scored is the caller's choice (:class:`TaskLoss`): SAM2's, or the decoder's masks
*before* SAM2 replaces an "absent" object's masks by a constant (which has no gradient), so the masks keep learning
while the object-score head is still wrong.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from icl.engine.train.tasks import Task
from icl.model.losses import ICLLoss
from sam2_ext.priors import prior_input, residual_at_output
from sam2_ext.track import to_size


# ----------------------------------------------------------------------------------------------------- SAM2's loss
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


# ----------------------------------------------------------------------------------------------------- the task's loss
LOSSES = ("sam2", "dice_bce")
MASK_LOGITS = ("raw", "gated")
# what each loss term is, as logged (console, wandb): losses are named losses, never mistaken for scores
LOSS_NAMES = {"mask": "loss/mask_focal", "dice": "loss/dice", "ce": "loss/bce", "iou": "loss/iou_head",
              "obj": "loss/object", "aux": "loss/aux"}


class TaskLoss(nn.Module):
    """``forward(out, task) -> {"loss", "loss/<term>"...}`` for the outputs of ``icl.engine.train.step.ICLStep``.

    ``mask_logits``: the masks both losses score, ``raw`` (the decoder's, before SAM2 gates an object called absent
    to a constant -1024 with no gradient) or ``gated`` (the returned masks). ``obj_weight``: the object-score BCE's
    weight in both losses."""

    def __init__(self, kind: str = "sam2", out_size: int = 128, mask_logits: str = "raw", obj_weight: float = 1.0,
                 aux: float = 0.0, prior_gain: float = 0.0):
        super().__init__()
        if kind not in LOSSES or mask_logits not in MASK_LOGITS:
            raise ValueError(f"loss {kind!r} / mask logits {mask_logits!r} not in {LOSSES} / {MASK_LOGITS}")
        self.kind, self.out_size, self.mask_logits, self.obj_weight = kind, out_size, mask_logits, obj_weight
        self.aux, self.prior_gain = aux, float(prior_gain)
        self.sam2 = SAM2Loss(SAM2LossWeights(obj=obj_weight))
        self.dice_bce = ICLLoss()

    def forward(self, out: dict, task: Task) -> dict[str, torch.Tensor]:
        terms = self._sam2(out, task) if self.kind == "sam2" else self._dice_bce(out, task)
        if self.aux > 0 and out.get("probe"):
            aux = probe_loss(out["probe"], task)
            terms = {**terms, "loss": terms["loss"] + self.aux * aux, "aux": aux.detach()}
        return {("loss" if k == "loss" else LOSS_NAMES[k]): v for k, v in terms.items()}

    def _sam2(self, out: dict, task: Task) -> dict[str, torch.Tensor]:
        scored = set(task.scored)
        items = [(f, row, col, t) for f, t in out["tracked"] if f in scored for row, col in enumerate(t.columns)]
        if not items:  # nothing tracked on a scored frame: a zero that keeps the graph
            return {"loss": out["logits"].sum() * 0.0}
        masks = "raw_multimask_logits" if self.mask_logits == "raw" else "multimask_logits"
        size = tuple(task.targets.shape[-2:])
        return self.sam2(torch.stack([self._sized(getattr(t, masks)[row], task, f, col, size)
                                      for f, row, col, t in items]),
                         torch.stack([t.multimask_ious[row] for _, row, _, t in items]),
                         torch.stack([t.object_score_logits[row] for _, row, _, t in items]),
                         torch.stack([task.targets[col, f] for f, _, col, _ in items]),
                         torch.tensor([col for _, _, col, _ in items], device=task.targets.device))

    def _dice_bce(self, out: dict, task: Task) -> dict[str, torch.Tensor]:
        source = ungated(out) if self.mask_logits == "raw" else out
        if self.prior_gain and task.priors:  # each item sized once, with its prior where it has one
            low, size = source["logits"][task.scored], (self.out_size, self.out_size)
            logits = torch.stack([torch.stack([self._sized(low[t, k], task, f, k, size) for k in range(low.shape[1])])
                                  for t, f in enumerate(task.scored)])
            target = scored_targets(task, self.out_size)
        else:
            logits, target = scored_logits(source, task, self.out_size)
        terms = self.dice_bce.terms(logits, target)
        present = target.flatten(2).amax(2)
        obj = presence_bce(out["object_score_logits"][task.scored], present)
        iou = iou_head_loss(out, task)
        return {"loss": terms["loss"] + self.obj_weight * obj + iou, "dice": terms["dice"].detach(),
                "ce": terms["ce"].detach(), "obj": obj.detach(), "iou": iou.detach()}

    def _sized(self, logits: torch.Tensor, task: Task, frame: int, column: int, size) -> torch.Tensor:
        """One item's mask logits [..., h, w] at ``size``: with the prior at that size where it has one (above)."""
        fine = (task.priors or {}).get(column, {}).get(frame) if self.prior_gain else None
        if fine is None:
            return to_size(logits.float(), tuple(size))
        read = prior_input(fine, logits.shape[-1], logits.device)[0, 0]  # what the decoder read (set_priors)
        fine = fine.float().to(logits.device)
        if tuple(fine.shape[-2:]) != tuple(size):
            fine = F.interpolate(fine[None, None], size=tuple(size), mode="nearest")[0, 0]
        return residual_at_output(logits, read, fine, self.prior_gain)


def ungated(out: dict) -> dict:
    """``out`` with the returned logits of every tracked (frame, object) replaced by the decoder's mask before
    SAM2's object-score gate: the candidate SAM2 returned (the IoU head's best), averaged over the passes that
    tracked it. Prompted and untracked frames keep their logits. Needs the training outputs (``tracked``)."""
    logits = out["logits"].clone()
    sums: dict[tuple[int, int], list[torch.Tensor]] = {}
    for f, t in out["tracked"]:
        best = t.multimask_ious.argmax(-1)
        raw = t.raw_multimask_logits[torch.arange(len(best), device=best.device), best]
        for row, col in enumerate(t.columns):
            sums.setdefault((f, col), []).append(raw[row])
    for (f, col), passes in sums.items():
        logits[f, col] = torch.stack(passes).mean(0).to(logits.dtype)
    return {**out, "logits": logits}


def iou_head_loss(out: dict, task: Task) -> torch.Tensor:
    """Mean L1 between the IoU head's predictions and each candidate's real IoU (logit > 0), over the scored
    (frame, object) items whose object is present (as SAM2's loss: absent objects have no IoU to predict)."""
    scored = set(task.scored)
    losses = []
    for f, t in out["tracked"]:
        if f not in scored:
            continue
        target = task.targets[t.columns, f].float()[:, None]
        present = target.flatten(1).amax(1) > 0.5
        if not present.any():
            continue
        losses.append(iou_l1(t.multimask_logits.float(), t.multimask_ious, target)[present])
    return torch.cat(losses).mean() if losses else out["logits"].sum() * 0.0


def probe_loss(probe: list, task: Task) -> torch.Tensor:
    """BCE of the probe's logits with the target's coverage of each feature cell, over scored tracked frames."""
    scored = set(task.scored)
    losses = []
    for f, columns, logits in probe:
        if f in scored:
            cover = F.interpolate(task.targets[columns, f][:, None].float(), size=logits.shape[-2:], mode="area")
            losses.append(F.binary_cross_entropy_with_logits(logits.float(), cover))
    return torch.stack(losses).mean() if losses else probe[0][2].sum() * 0.0


def scored_logits(out: dict, task: Task, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of the scored frames at ``size`` x ``size``: ([T, K, S, S], [T, K, S, S])."""
    return to_size(out["logits"][task.scored].float(), (size, size)), scored_targets(task, size)


def scored_targets(task: Task, size: int) -> torch.Tensor:
    """The targets of the scored frames at ``size`` x ``size``: [T, K, S, S]."""
    target = task.targets[:, task.scored].transpose(0, 1).float()
    if target.shape[-2:] != (size, size):
        target = F.interpolate(target, size=(size, size), mode="nearest")
    return target
