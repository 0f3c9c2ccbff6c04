"""3D per-case, per-class segmentation metrics (MONAI), with the empty cases defined once and for all.

Why this module is strict about definitions: earlier SAM2 medical tools averaged Dice per slice, swept thresholds or
scored empty-vs-empty as 1, which inflates results. Here every number is

* computed on the **whole 3D volume** of one case and one class (every labelled slice, not only those with truth),
* on the binary mask ``logit > 0`` (identical to ``sigmoid > 0.5``),
* with distances in **millimetres** using the voxel spacing.

Empty cases (reported, never silently scored):

============================  ======  ======  ======  ======  ==============================
truth / prediction            dice    iou     hd95    nsd     flags
============================  ======  ======  ======  ======  ==============================
non-empty / non-empty         value   value   value   value   --
non-empty / empty             0       0       NaN     NaN     ``empty_pred``
empty / non-empty             0       0       NaN     NaN     ``empty_truth`` (false-positive volume)
empty / empty                 NaN     NaN     NaN     NaN     ``empty_truth`` and ``empty_pred``
============================  ======  ======  ======  ======  ==============================

HD95 and NSD are NaN whenever either side is empty because a surface distance to nothing is undefined (MONAI would
return inf/NaN with a warning); the Dice of 0 already records the failure, and summaries count such rows apart.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou, compute_surface_dice

from icl.report.tables import results_frame

#: Metric columns every row carries, in report order.
METRIC_COLUMNS: tuple[str, ...] = ("dice", "iou", "hd95", "nsd")
#: Bookkeeping columns every row carries after the metrics.
VOLUME_COLUMNS: tuple[str, ...] = ("volume_truth_ml", "volume_pred_ml", "empty_truth", "empty_pred")


def logits_to_mask(logits: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Binarise logits at 0, which is exactly ``sigmoid(logit) > 0.5`` without computing the sigmoid.

    Returns the same kind it was given: a bool ``torch.Tensor`` (same device) for a tensor, a bool ``np.ndarray``
    otherwise. One fixed threshold, on purpose — no threshold sweeps on the test set.
    """
    if isinstance(logits, torch.Tensor):
        return logits.detach() > 0
    return np.asarray(logits) > 0


def _as_bool_volume(name: str, mask: Any) -> np.ndarray:
    """Accept a bool/0-1 array or tensor [Z, H, W]; anything else is a caller bug, so say which argument."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected a 3D mask [Z, H, W], got shape {arr.shape}")
    if arr.dtype != np.bool_:
        bad = (arr != 0) & (arr != 1)  # a linear scan: np.unique would sort a whole CT volume
        if bad.any():
            raise ValueError(f"{name}: expected a binary mask, found value {arr[bad].flat[0]!r}")
        arr = arr.astype(bool)
    return arr


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing: expected three positive finite numbers in mm, got {spacing!r}")
    return sp  # type: ignore[return-value]


def case_class_metrics(
    pred: np.ndarray | torch.Tensor,
    truth: np.ndarray | torch.Tensor,
    spacing: tuple[float, float, float],
    nsd_tolerance_mm: float = 2.0,
) -> dict[str, float | bool]:
    """Dice, IoU, HD95 (mm), NSD and volumes of one class in one case, on the whole 3D volume.

    ``pred`` and ``truth`` are binary masks ``[Z, H, W]`` of the same shape (use :func:`logits_to_mask` first).
    ``spacing`` is the voxel size in mm **in the same axis order as the arrays** (slice spacing first for our
    slices-first volumes). See the module docstring for the empty-case table.
    """
    p = _as_bool_volume("pred", pred)
    t = _as_bool_volume("truth", truth)
    if p.shape != t.shape:
        raise ValueError(f"pred and truth differ in shape: {p.shape} vs {t.shape}")
    sp = _check_spacing(spacing)
    if not (math.isfinite(nsd_tolerance_mm) and nsd_tolerance_mm >= 0):
        raise ValueError(f"nsd_tolerance_mm: expected a non-negative number, got {nsd_tolerance_mm!r}")

    voxel_ml = sp[0] * sp[1] * sp[2] / 1000.0
    empty_truth = not t.any()
    empty_pred = not p.any()
    row: dict[str, float | bool] = {
        "dice": math.nan,
        "iou": math.nan,
        "hd95": math.nan,
        "nsd": math.nan,
        "volume_truth_ml": float(t.sum()) * voxel_ml,
        "volume_pred_ml": float(p.sum()) * voxel_ml,
        "empty_truth": bool(empty_truth),
        "empty_pred": bool(empty_pred),
    }
    if empty_truth and empty_pred:
        return row  # nothing to score: reported apart, never counted as a perfect 1

    # MONAI wants one-hot, batch-first [B, C, Z, H, W]; one channel, which is foreground, hence include_background.
    yp = torch.from_numpy(p)[None, None].float()
    yt = torch.from_numpy(t)[None, None].float()
    # ignore_empty=False gives 0 for empty truth + non-empty prediction (a false-positive volume).
    row["dice"] = float(compute_dice(yp, yt, include_background=True, ignore_empty=False).item())
    row["iou"] = float(compute_iou(yp, yt, include_background=True, ignore_empty=False).item())
    if empty_truth or empty_pred:
        return row

    with warnings.catch_warnings():
        # MONAI 1.5+ warns about its own deprecated internal argument on every call; not actionable here.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        row["hd95"] = float(
            compute_hausdorff_distance(yp, yt, include_background=True, percentile=95, spacing=list(sp)).item()
        )
        row["nsd"] = float(
            compute_surface_dice(
                yp, yt, class_thresholds=[float(nsd_tolerance_mm)], include_background=True, spacing=list(sp)
            ).item()
        )
    return row


class MetricRows:
    """Collects one row per case × class × protocol (× epoch) so evaluation code never hand-builds dicts.

    Rows are plain dicts: ``case, class_id, class_name, protocol, epoch`` followed by :data:`METRIC_COLUMNS`,
    :data:`VOLUME_COLUMNS`, the spacing and any extra keyword columns. ``frame()`` turns them into the report table.
    """

    def __init__(self, nsd_tolerance_mm: float = 2.0) -> None:
        self.nsd_tolerance_mm = float(nsd_tolerance_mm)
        self.rows: list[dict[str, Any]] = []

    def add(
        self,
        *,
        case: str,
        class_name: str,
        protocol: str,
        pred: np.ndarray | torch.Tensor,
        truth: np.ndarray | torch.Tensor,
        spacing: tuple[float, float, float],
        class_id: int | None = None,
        epoch: int | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Score one (case, class) pair and keep the row; returns the row for logging."""
        metrics = case_class_metrics(pred, truth, spacing, self.nsd_tolerance_mm)
        sp = _check_spacing(spacing)
        row: dict[str, Any] = {
            "case": str(case),
            "class_id": class_id,
            "class_name": str(class_name),
            "protocol": str(protocol),
            "epoch": epoch,
            **metrics,
            "spacing_mm": "x".join(f"{s:g}" for s in sp),
            "nsd_tolerance_mm": self.nsd_tolerance_mm,
            **extra,
        }
        self.rows.append(row)
        return row

    def __len__(self) -> int:
        return len(self.rows)

    def frame(self):  # -> pd.DataFrame (pandas imported lazily: the engine does not need it to train)
        """The rows as the standard results table (see :func:`icl.report.tables.results_frame`)."""
        return results_frame(self.rows)
