"""ICLLoss: ~0 for perfect logits, larger for wrong ones, finite on all-empty targets, focal variant, gradients."""
from __future__ import annotations

import pytest
import torch

from icl.model.losses import ICLLoss


def _target(t=3, c=2, h=16, w=16) -> torch.Tensor:
    y = torch.zeros(t, c, h, w)
    y[0, 0, 4:10, 4:10] = 1
    y[1, 0, 5:11, 3:9] = 1
    y[1, 1, 0:4, 0:6] = 1  # class 1 present on one slice only; slice 2 empty for both
    return y


def test_loss_goes_to_zero_as_logits_become_perfect():
    y = _target()
    loss = ICLLoss()
    values = [loss(torch.where(y > 0, scale, -scale), y).item() for scale in (0.5, 2.0, 8.0, 20.0)]
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[-1] < 1e-3
    wrong = loss(torch.where(y > 0, -8.0, 8.0), y).item()
    assert wrong > 1.0


def test_all_empty_target_is_finite_and_small_for_empty_prediction():
    y = torch.zeros(4, 1, 8, 8)
    loss = ICLLoss()
    empty = loss.terms(torch.full_like(y, -15.0), y)
    assert all(torch.isfinite(v) for v in empty.values())
    assert empty["loss"].item() < 1e-3
    logits = torch.zeros_like(y, requires_grad=True)
    value = loss(logits, y)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    assert (logits.grad > 0).all()  # pushes every logit down, toward "no object"


def test_terms_are_weighted_sum_of_dice_and_bce():
    torch.manual_seed(0)
    y = _target()
    logits = torch.randn_like(y)
    t = ICLLoss(dice_weight=0.3, ce_weight=2.0).terms(logits, y)
    assert t["loss"].item() == pytest.approx(0.3 * t["dice"].item() + 2.0 * t["ce"].item(), rel=1e-6)
    ref_bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    assert t["ce"].item() == pytest.approx(ref_bce.item(), rel=1e-6)


def test_dice_is_over_the_whole_clip_per_class():
    # Class 0 predicted perfectly on slice 0, nothing elsewhere; per-clip Dice = 2*36/(36+36+36) for _target()'s
    # class 0 (36 + 36 truth voxels, 36 predicted). Class 1 perfect. Mean over classes.
    y = _target()
    pred = torch.full_like(y, -30.0)
    pred[0, 0][y[0, 0] > 0] = 30.0
    pred[:, 1][y[:, 1] > 0] = 30.0
    dice = ICLLoss(smooth=1e-6).terms(pred, y)["dice"].item()
    expected = ((1 - 2 * 36 / 108) + 0.0) / 2
    assert dice == pytest.approx(expected, abs=1e-4)


def test_three_dim_input_and_gradient_flow():
    y = _target()[:, 0]
    logits = torch.randn(y.shape, requires_grad=True)
    ICLLoss()(logits, y).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(TypeError):  # one loss kind (BCE): no focal option left to reach
        ICLLoss(kind="focal")
    with pytest.raises(ValueError, match="weights"):
        ICLLoss(dice_weight=0.0, ce_weight=0.0)
    with pytest.raises(ValueError, match="shape"):
        ICLLoss()(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match=r"\[T, C, H, W\]"):
        ICLLoss()(torch.zeros(2, 4), torch.zeros(2, 4))
