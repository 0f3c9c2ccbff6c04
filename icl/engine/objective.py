"""The training objective of one task: SAM2's own loss (default) or the Dice + BCE of the returned masks.

``sam2`` (``icl.engine.sam2_loss``): best-candidate focal + Dice, the IoU head and the object-score head, on every
(scored frame, object) the rule tracked — conditioning frames have no decoder output and are not scored.
``dice_bce`` (``icl.engine.losses.ICLLoss``): 3D Dice + BCE of the returned masks over the scored frames at
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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from icl.engine.losses import ICLLoss
from icl.engine.sam2_loss import SAM2Loss, SAM2LossWeights, iou_l1, presence_bce
from icl.engine.tasks import Task
from sam2_ext.priors import prior_input, residual_at_output
from sam2_ext.track import to_size

LOSSES = ("sam2", "dice_bce")
MASK_LOGITS = ("raw", "gated")
# what each loss term is, as logged (console, wandb): losses are named losses, never mistaken for scores
LOSS_NAMES = {"mask": "loss/mask_focal", "dice": "loss/dice", "ce": "loss/bce", "iou": "loss/iou_head",
              "obj": "loss/object", "aux": "loss/aux"}


class TaskLoss(nn.Module):
    """``forward(out, task) -> {"loss", "loss/<term>"...}`` for the outputs of ``icl.engine.model.ICLStep``.

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
