"""Which slices of the support scan prompt the model, and the support pair itself, checked: the one reading of the
support options for the CLI and the API (``--classes``, ``--support-slices``, ``--fill``, ``--crop``).

Support slices: ``"auto"`` (3) or N slices spread across the extent of *every* label value present in the support
label (so the prompts a class gets do not depend on which other classes are asked for), or ``"labelled"``:
exactly the slices that carry any label value (a scan annotated on a few slices, as in 3D Slicer or ITK-SNAP).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from icl.data.frames import Scan
from icl.data.sampling import labelled_slices, pick_support_slices
from icl.data.validate import AFFINE_TOL, check_integer_labels
from icl.errors import InputError
from icl.infer.scan_source import open_scan
from icl.sparse.methods import AUTO, FILLS, MODEL

AUTO_SUPPORT_PER_CLASS = 3  # support slices per label value for --support-slices auto
LABELLED = "labelled"  # --support-slices labelled: exactly the slices that carry a label value


def parse_classes(text: str | Sequence[int] | None) -> list[int] | None:
    """``"1,2"`` (or [1, 2]) → [1, 2]; None/"" → None (every label value of the support)."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    try:
        classes = [int(c) for c in (str(text).split(",") if isinstance(text, str) else text) if str(c).strip()]
    except ValueError:
        raise InputError("--classes", f"expected comma-separated integers, got {text!r}") from None
    if not classes or min(classes) <= 0 or len(set(classes)) != len(classes):
        raise InputError("--classes", f"expected distinct positive label values, got {text!r}")
    return classes


def parse_support_slices(value: str | int) -> int | str:
    """``"auto"`` → AUTO_SUPPORT_PER_CLASS; ``"N"`` → N (>= 1) slices per label value; ``"labelled"`` as is."""
    text = str(value).strip().lower()
    if text == "auto":
        return AUTO_SUPPORT_PER_CLASS
    if text in (LABELLED, "labeled"):
        return LABELLED
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise InputError("--support-slices", f"expected 'auto', '{LABELLED}' or a positive integer, got {value!r}")
    return n


def choose_support_slices(label: np.ndarray, slice_axis: int, per_class: int | str,
                          where: str | Path = "support label") -> list[int]:
    """The support slices of a (canonical) label volume: ``per_class`` slices spread across each label value's
    extent, or with ``"labelled"`` every slice holding any label value (sorted, unique)."""
    if per_class == LABELLED:
        picks = labelled_slices(label, slice_axis)
        if not picks:
            raise InputError(where, "no annotated slice: the label holds no label value on any slice")
        return picks
    zhw = np.moveaxis(label, slice_axis, 0)
    chosen: set[int] = set()
    for value in np.unique(zhw):
        if value > 0:
            chosen.update(int(z) for z in pick_support_slices(zhw, int(value), int(per_class)))
    return sorted(chosen)


def check_sparse_options(per_class: int | str, fill: str, complete_slices: bool) -> str:
    """``fill`` checked against the support-slice mode: the classic fills and ``complete_slices`` read a scan's own
    annotated slices, so they need ``labelled``."""
    if fill not in FILLS:
        raise InputError("--fill", f"expected one of {', '.join(FILLS)}, got {fill!r}")
    if per_class != LABELLED and (complete_slices or fill not in (AUTO, MODEL)):
        what = "--complete-slices" if complete_slices else f"--fill {fill}"
        raise InputError(what.split()[0], f"{what} reads a scan's own annotated slices: it needs "
                                          f"--support-slices {LABELLED}")
    return fill


def check_crop(crop: bool | str, mask_prior: bool) -> bool:
    """``crop``: True/"on", False/"off", or "auto" (on for weights trained with a mask prior, on such boxes)."""
    if crop in ("auto", None):
        return bool(mask_prior)
    if crop in (True, False, "on", "off"):
        return crop in (True, "on")
    raise InputError("--crop", f"expected auto, on or off, got {crop!r}")


def load_support(support: Any, support_label: Any, classes: Sequence[int] | None = None,
                 channel: int | None = None) -> tuple[Scan, Scan, np.ndarray, list[int]]:
    """Open and check the support pair: (support scan, label scan, canonical label array, classes to segment)."""
    scan = open_scan(support, channel, "support")
    label_scan = open_scan(support_label, None, "support_label")
    support_label = label_scan.path
    if label_scan.shape != scan.shape:
        raise InputError(support_label, f"label shape {label_scan.shape} does not match image shape {scan.shape}")
    if not np.allclose(label_scan.affine, scan.affine, atol=AFFINE_TOL):
        raise InputError(support_label, "label affine does not match the image affine")
    values = np.asarray(label_scan.canonical)
    check_integer_labels(values, support_label)
    if values.dtype.kind == "f":
        values = values.astype(np.int64)
    present = sorted(int(v) for v in np.unique(values) if v > 0)
    if not present:
        raise InputError(support_label, "support label is empty (no foreground voxels)")
    classes = present if classes is None else [int(c) for c in classes]
    missing = [c for c in classes if c not in present]
    if missing:
        raise InputError(support_label, f"requested class(es) {missing} not in the support label "
                                        f"(values present: {present})")
    return scan, label_scan, values, classes
