"""3D metrics on hand-computed cases: exact Dice/IoU, HD95 in mm with anisotropic spacing, NSD, empty cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from icl.engine.eval.metrics import METRIC_COLUMNS, MetricRows, case_class_metrics, logits_to_mask


def _vol(shape=(6, 8, 8)) -> np.ndarray:
    return np.zeros(shape, dtype=bool)


def test_two_boxes_exact_dice_iou_and_volumes():
    truth, pred = _vol(), _vol()
    truth[0:4, 0:4, 0:4] = True  # 64 voxels
    pred[0:4, 0:4, 2:6] = True  # 64 voxels, 32 shared
    m = case_class_metrics(pred, truth, spacing=(2.0, 0.5, 0.5))
    assert m["dice"] == pytest.approx(2 * 32 / 128)
    assert m["iou"] == pytest.approx(32 / 96)
    assert m["volume_truth_ml"] == pytest.approx(64 * 2.0 * 0.5 * 0.5 / 1000)
    assert m["volume_pred_ml"] == pytest.approx(64 * 2.0 * 0.5 * 0.5 / 1000)
    assert m["empty_truth"] is False and m["empty_pred"] is False
    assert math.isfinite(m["hd95"]) and 0.0 <= m["nsd"] <= 1.0


def test_dice_is_3d_over_the_whole_volume_not_a_mean_of_slices():
    truth, pred = _vol((2, 12, 12)), _vol((2, 12, 12))
    truth[0, 0:10, 0:10] = True  # 100 voxels, found perfectly
    pred[0, 0:10, 0:10] = True
    truth[1, 0:2, 0:2] = True  # 4 voxels, missed entirely
    m = case_class_metrics(pred, truth, spacing=(1.0, 1.0, 1.0))
    assert m["dice"] == pytest.approx(2 * 100 / (100 + 104))  # not (1 + 0) / 2
    assert m["iou"] == pytest.approx(100 / 104)


def test_hd95_shift_across_slices_is_in_mm():
    # One-voxel-thick squares two slices apart: every surface voxel is exactly 2 * 2.5 mm from the other.
    truth, pred = _vol(), _vol()
    truth[1, 2:6, 2:6] = True
    pred[3, 2:6, 2:6] = True
    m = case_class_metrics(pred, truth, spacing=(2.5, 0.7, 0.7))
    assert m["hd95"] == pytest.approx(5.0)
    assert m["dice"] == 0.0
    assert case_class_metrics(pred, truth, (2.5, 0.7, 0.7), nsd_tolerance_mm=5.5)["nsd"] == pytest.approx(1.0)
    assert case_class_metrics(pred, truth, (2.5, 0.7, 0.7), nsd_tolerance_mm=4.0)["nsd"] == pytest.approx(0.0)


def test_hd95_in_plane_shift_uses_in_plane_spacing():
    # Shift by 2 columns: distances per row are {0, 0, 1, 2} columns both ways -> 95th percentile = 2 columns.
    truth, pred = _vol(), _vol()
    truth[2, 2:6, 2:6] = True
    pred[2, 2:6, 4:8] = True
    m = case_class_metrics(pred, truth, spacing=(3.0, 0.7, 0.7))
    assert m["hd95"] == pytest.approx(1.4)
    m_iso = case_class_metrics(pred, truth, spacing=(1.0, 1.0, 1.0))
    assert m_iso["hd95"] == pytest.approx(2.0)


def test_identical_masks_score_perfectly():
    truth = _vol()
    truth[1:5, 2:7, 1:6] = True
    m = case_class_metrics(truth.copy(), truth, spacing=(1.5, 0.8, 0.8))
    assert m["dice"] == pytest.approx(1.0)
    assert m["iou"] == pytest.approx(1.0)
    assert m["hd95"] == pytest.approx(0.0)
    assert m["nsd"] == pytest.approx(1.0)


def test_empty_truth_and_empty_prediction_is_not_scored():
    m = case_class_metrics(_vol(), _vol(), spacing=(1.0, 1.0, 1.0))
    for key in METRIC_COLUMNS:
        assert math.isnan(m[key]), key
    assert m["empty_truth"] is True and m["empty_pred"] is True
    assert m["volume_truth_ml"] == 0.0 and m["volume_pred_ml"] == 0.0


def test_empty_truth_with_prediction_is_a_false_positive_scored_zero():
    pred = _vol()
    pred[2, 3:5, 3:5] = True  # 4 voxels
    m = case_class_metrics(pred, _vol(), spacing=(2.0, 1.0, 1.0))
    assert m["dice"] == 0.0 and m["iou"] == 0.0
    assert math.isnan(m["hd95"]) and math.isnan(m["nsd"])
    assert m["empty_truth"] is True and m["empty_pred"] is False
    assert m["volume_pred_ml"] == pytest.approx(4 * 2.0 / 1000)


def test_missed_object_scores_zero_with_undefined_distances():
    truth = _vol()
    truth[2, 3:5, 3:5] = True
    m = case_class_metrics(_vol(), truth, spacing=(1.0, 1.0, 1.0))
    assert m["dice"] == 0.0 and m["iou"] == 0.0
    assert math.isnan(m["hd95"]) and math.isnan(m["nsd"])
    assert m["empty_truth"] is False and m["empty_pred"] is True


def test_accepts_tensors_and_binary_floats():
    truth = torch.zeros(3, 5, 5)
    truth[1, 1:4, 1:4] = 1.0
    m = case_class_metrics(truth.clone(), truth, spacing=(1.0, 1.0, 1.0))
    assert m["dice"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "pred_shape, truth_fill, spacing, match",
    [
        ((6, 8, 7), 1.0, (1.0, 1.0, 1.0), "differ in shape"),
        ((6, 8, 8), 0.5, (1.0, 1.0, 1.0), "binary"),
        ((6, 8, 8), 1.0, (1.0, 0.0, 1.0), "spacing"),
        ((6, 8, 8), 1.0, (1.0, 1.0), "spacing"),
    ],
)
def test_bad_inputs_raise_clear_errors(pred_shape, truth_fill, spacing, match):
    truth = np.zeros((6, 8, 8), dtype=np.float32)
    truth[2, 2, 2] = truth_fill
    with pytest.raises(ValueError, match=match):
        case_class_metrics(np.zeros(pred_shape, bool), truth, spacing=spacing)
    with pytest.raises(ValueError, match="3D"):
        case_class_metrics(np.zeros((8, 8), bool), np.zeros((8, 8), bool), spacing=(1.0, 1.0, 1.0))


def test_logits_to_mask_is_sigmoid_above_half():
    logits = torch.randn(4, 2, 9, 9) * 3
    logits[0, 0, 0, 0] = 0.0  # sigmoid(0) = 0.5 exactly: not foreground
    mask = logits_to_mask(logits)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, torch.sigmoid(logits) > 0.5)
    assert not mask[0, 0, 0, 0]
    np_mask = logits_to_mask(logits.numpy())
    assert isinstance(np_mask, np.ndarray) and np_mask.dtype == np.bool_
    assert np.array_equal(np_mask, mask.numpy())


def test_metric_rows_accumulate_a_table():
    truth = _vol()
    truth[1:3, 1:3, 1:3] = True
    rows = MetricRows(nsd_tolerance_mm=1.0)
    rows.add(case="c1", class_name="kidney", class_id=1, protocol="gt_slices", pred=truth, truth=truth,
             spacing=(1.0, 1.0, 1.0), epoch=3)
    rows.add(case="c2", class_name="kidney", class_id=1, protocol="gt_slices", pred=_vol(), truth=_vol(),
             spacing=(1.0, 1.0, 1.0), epoch=3, support="c9")
    assert len(rows) == 2
    df = rows.frame()
    assert list(df.columns[:5]) == ["case", "class_id", "class_name", "protocol", "epoch"]
    assert df.loc[0, "dice"] == pytest.approx(1.0)
    assert math.isnan(df.loc[1, "dice"]) and bool(df.loc[1, "empty_truth"])
    assert df.loc[1, "support"] == "c9" and df.loc[0, "nsd_tolerance_mm"] == 1.0
