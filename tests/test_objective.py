"""The training objectives: SAM2's loss trains the chosen candidate, the IoU head and the object score."""
from __future__ import annotations

import torch

from engine_fixtures import tiny_predictor, toy_slices  # noqa: F401 (fixture)
from icl.engine.train.step import ICLStep
from icl.engine.train.losses import TaskLoss
from icl.engine.train.losses import SAM2Loss
from icl.engine.train.tasks import Task
from icl.engine.train.validation import task_dice, summarise


def test_sam2_loss_backpropagates_the_best_candidate_and_every_iou():
    g = torch.Generator().manual_seed(0)
    target = torch.zeros(2, 16, 16)
    target[0, 4:12, 4:12] = 1  # item 1: object absent on its frame
    good = target[0] * 20 - 10
    logits = torch.stack([torch.stack([torch.randn(16, 16, generator=g), good, -good]),
                          torch.randn(3, 16, 16, generator=g)]).requires_grad_()
    ious = torch.rand(2, 3, generator=g).requires_grad_()
    scores = torch.zeros(2, requires_grad=True)
    out = SAM2Loss()(logits, ious, scores, target, torch.tensor([0, 1]))
    out["loss"].backward()
    grad = logits.grad.flatten(2).abs().sum(-1)
    assert grad[0, 1] > 0 and grad[0, 0] == 0 and grad[0, 2] == 0  # only the best candidate of a present object
    assert (grad[1] == 0).all()  # an absent object trains no mask
    assert (ious.grad[0] != 0).all() and (ious.grad[1] == 0).all()  # IoU head: every candidate, where present
    assert (scores.grad != 0).all()  # object score: always
    assert set(out) == {"loss", "mask", "dice", "iou", "obj"}


def _disc_task(images, masks) -> Task:
    return Task(images, {0: {0: masks[0]}, 1: {0: 1 - masks[0]}}, "forward", torch.stack([masks, 1 - masks]),
                list(range(1, len(images))), "adjacent")


def test_task_loss_reaches_the_heads_through_the_model(tiny_predictor):
    images, masks = toy_slices(5)
    tiny_predictor.train()
    step = ICLStep(tiny_predictor)
    for kind in ("sam2", "dice_bce"):
        tiny_predictor.zero_grad(set_to_none=True)
        task = _disc_task(images, masks)
        terms = TaskLoss(kind, out_size=64)(step(task), task)
        terms["loss"].backward()
        decoder = tiny_predictor.sam_mask_decoder
        got = {name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
               for name, module in (("iou", decoder.iou_prediction_head), ("obj", decoder.pred_obj_score_head),
                                    ("memory", tiny_predictor.memory_attention))}
        # both train the IoU head: the selector reads it, and DDP stops on a returned head without gradient
        assert got["obj"] and got["memory"] and got["iou"], (kind, got)
        assert float(terms["loss/iou_head"]) > 0, kind
        assert all(k == "loss" or k.startswith("loss/") for k in terms), terms  # losses named as losses


def test_validation_dice_marked_and_others():
    images, masks = toy_slices(4, size=32)
    task = _disc_task(images, masks)
    perfect = {"logits": torch.stack([masks, 1 - masks], dim=1) * 20 - 10,
               "object_score_logits": torch.zeros(4, 2)}
    scores = task_dice(perfect, task, 32)
    assert scores["adjacent_marked"] == [1.0, 1.0] and max(scores["adjacent_others"]) == 0.0
    blind = {"logits": torch.ones(4, 2, 32, 32), "object_score_logits": torch.zeros(4, 2)}  # everything, always
    blind_scores = task_dice(blind, task, 32)
    assert 0 < min(blind_scores["adjacent_marked"]) < 1 and min(blind_scores["adjacent_others"]) > 0
    sums = {"adjacent_marked|sum": 1.8, "adjacent_marked|n": 2, "adjacent_others|sum": 0.2, "adjacent_others|n": 2,
            "c3|sum": 0.5, "c3|n": 1}
    out = summarise(sums)
    assert out["val/adjacent_marked"] == 0.9 and out["val/dice_class_3"] == 0.5
    # best.pth's score, named as what it is: class Dice and the marked-minus-others margin
    assert abs(out["val/selection_score"] - (0.5 + 0.8) / 2) < 1e-9
    assert out["val/dice_class_mean"] == 0.5 and "val/dice_mean" not in out
    following = summarise({"far_marked|sum": 0.3, "far_marked|n": 1, "far_others|sum": 0.9, "far_others|n": 1})
    assert abs(following["val/selection_score"] + 0.6) < 1e-9  # negative: it follows the look-alikes


def test_auxiliary_probe_trains_memory_attention_directly(tiny_predictor):
    images, masks = toy_slices(5)
    tiny_predictor.train()
    step = ICLStep(tiny_predictor, aux_probe=True)
    task = _disc_task(images, masks)
    out = step(task)
    assert len(out["probe"]) == len(out["tracked"]) and out["probe"][0][2].shape[1:] == (1, 8, 8)  # the 128 px model's 8x8 grid
    aux_only = TaskLoss("sam2", out_size=64, aux=1.0)(out, task)
    plain = TaskLoss("sam2", out_size=64)(out, task)
    assert "loss/aux" in aux_only and "loss/aux" not in plain
    (aux_only["loss"] - plain["loss"]).backward()  # the auxiliary term alone
    assert step.aux_probe.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_predictor.memory_attention.parameters())
    assert "aux_probe" not in "".join(tiny_predictor.state_dict())  # never part of the model's weights


def _absent_object_model(predictor):
    """The object head says 'absent' everywhere: SAM2 gates every tracked mask to -1024 (no gradient)."""
    with torch.no_grad():
        last = predictor.sam_mask_decoder.pred_obj_score_head.layers[-1]
        last.weight.zero_()
        last.bias.fill_(-20.0)
    return predictor


def test_dice_bce_scores_the_raw_masks_and_obj_weight_acts_in_both(tiny_predictor):
    images, masks = toy_slices(5)
    tiny_predictor.train()
    step = ICLStep(_absent_object_model(tiny_predictor))
    task = _disc_task(images, masks)
    out = step(task)
    assert (out["logits"][task.scored] == -1024).all()
    gated = TaskLoss("dice_bce", out_size=64, mask_logits="gated")(out, task)
    raw = TaskLoss("dice_bce", out_size=64, mask_logits="raw")(out, task)
    assert gated["loss/bce"] > 100  # BCE on constant -1024 logits: a spike that trains nothing
    assert raw["loss/bce"] < 5
    tiny_predictor.zero_grad(set_to_none=True)
    raw["loss"].backward()
    decoder_grads = [p.grad for p in tiny_predictor.sam_mask_decoder.output_hypernetworks_mlps.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in decoder_grads)  # the masks learn while gated
    for kind in ("sam2", "dice_bce"):  # -obj_loss_weight weighs the object-score BCE in either loss
        out = step(task)
        one, three = (TaskLoss(kind, out_size=64, obj_weight=w)(out, task) for w in (1.0, 3.0))
        assert float(one["loss/object"]) > 1
        assert abs(float((three["loss"] - one["loss"]).detach()) - 2 * float(one["loss/object"])) < 1e-3 * float(three["loss"].detach())


def test_ungated_masks_are_the_returned_candidate_before_the_gate(tiny_predictor):
    from icl.engine.train.losses import ungated

    images, masks = toy_slices(5)
    tiny_predictor.train()
    task = _disc_task(images, masks)
    out = ICLStep(tiny_predictor)(task)
    raw = ungated(out)["logits"]
    present = out["object_score_logits"] > 0
    assert present[task.scored].any()
    torch.testing.assert_close(raw[present], out["logits"][present])  # where SAM2 did not gate: the same masks
