"""Which slices of the support scan prompt the model, and the support pair itself, checked: the one reading of the
support options for the CLI and the API (``--classes``, ``--support-slices``, ``--fill``, ``--crop``).

Support slices: N slices spread across the extent of *every* label value present in the support label (so the
prompts a class gets do not depend on which other classes are asked for), or ``"labelled"``: exactly the slices
that carry any label value (a scan annotated on a few slices, as in 3D Slicer or ITK-SNAP), or ``"auto"``: a sparse
drawing on the query's own scan is read as ``labelled`` (one line says so), anything else as 3 per label value.

Slice axis: 0, 1, 2, or ``"auto"``: the axis along which the drawn slices leave gaps (``icl.sparse.drawing``); a
label dense along every axis is a full segmentation, read along the axial axis — except with ``labelled``, which
needs a sparse drawing and stops.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from icl.data.frames import DEFAULT_SLICE_AXIS, Scan
from icl.data.sampling import labelled_slices, pick_support_slices
from icl.data.validate import check_integer_labels
from icl.errors import InputError
from icl.infer.scan_source import open_scan, same_grid
from icl.sparse.annotation import COMPLETE, Annotation
from icl.sparse.drawing import drawing_axis
from icl.sparse.methods import AUTO, FILLS, MODEL, REGISTRATION

AUTO_SUPPORT_PER_CLASS = 3  # support slices per label value for --support-slices auto (not a drawing on the query)
AUTO_SLICES = "auto"  # --support-slices auto: labelled for a sparse drawing on the query's own scan, else 3
AUTO_AXIS = "auto"  # --slice-axis auto: the axis the drawing was made along
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
    """``"auto"`` and ``"labelled"`` as they are; ``"N"`` → N (>= 1) slices per label value."""
    text = str(value).strip().lower()
    if text == AUTO_SLICES:
        return AUTO_SLICES
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
    if per_class == AUTO_SLICES:
        per_class = AUTO_SUPPORT_PER_CLASS
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
    if per_class not in (LABELLED, AUTO_SLICES) and (complete_slices or fill not in (AUTO, MODEL, REGISTRATION)):
        what = "--complete-slices" if complete_slices else f"--fill {fill}"
        raise InputError(what.split()[0], f"{what} reads a scan's own annotated slices: it needs "
                                          f"--support-slices {LABELLED}")
    return fill


def parse_slice_axis(value: str | int) -> int | str:
    """``"auto"`` as is; 0, 1 or 2 (of the closest canonical orientation) as an int; else an InputError."""
    text = str(value).strip().lower()
    if text == AUTO_AXIS:
        return AUTO_AXIS
    if text in ("0", "1", "2"):
        return int(text)
    raise InputError("--slice-axis", f"expected auto, 0, 1 or 2, got {value!r}")


@dataclass(frozen=True)
class SupportReading:
    """How the support label is read: along which axis, which slices prompt, and whether it is a sparse drawing."""

    axis: int
    per_class: int | str  # N, or LABELLED
    drawn_along: int | None  # the axis the label was drawn along (None: dense along every axis)


def read_support(label: np.ndarray, classes: Sequence[int], slice_axis: int | str, per_class: int | str,
                 same_scan: bool, where: str | Path) -> SupportReading:
    """THE reading of ``--slice-axis`` and ``--support-slices`` from the label itself (module docstring); the lines
    that say what ``auto`` chose, and what looks wrong, go to stderr."""
    drawn_along = drawing_axis(label, classes)
    if slice_axis == AUTO_AXIS:
        if drawn_along is not None:
            axis = drawn_along
        elif per_class == LABELLED:
            raise InputError(where, "no axis along which the drawn slices leave gaps (the label is dense along "
                                    f"all three): --support-slices {LABELLED} needs a drawing on a few slices; give "
                                    "--slice-axis 0, 1 or 2 to read it along one axis anyway")
        else:
            axis = DEFAULT_SLICE_AXIS
        if drawn_along is not None and drawn_along != DEFAULT_SLICE_AXIS:
            print(f"note: {where}: drawn along axis {drawn_along} of the canonical orientation (the drawn slices "
                  f"leave gaps along it): sliced along axis {drawn_along}", file=sys.stderr)
    else:
        axis = int(slice_axis)
        if drawn_along is not None and drawn_along != axis:
            print(f"warning: {where}: drawn along axis {drawn_along} (its drawn slices leave gaps there), but "
                  f"--slice-axis {axis} reads it along axis {axis}, where it is drawn on every slice of its extent: "
                  "nothing between the drawn slices gets filled", file=sys.stderr)
    if per_class == AUTO_SLICES:
        if same_scan and drawn_along == axis:
            print(f"note: {where}: a drawing on a few slices of the query's own scan: read as --support-slices "
                  f"{LABELLED} (every drawn slice prompts; give --support-slices N to take N per label value)",
                  file=sys.stderr)
            per_class = LABELLED
        else:
            per_class = AUTO_SUPPORT_PER_CLASS
    return SupportReading(axis, per_class, drawn_along)


def warn_annotation(annotation: Annotation, where: str | Path) -> None:
    """The warnings a drawing earns before it is filled, one line each: a structure on one slice only, and
    complete slices asked of a drawing whose structures each sit on slices of their own."""
    for c in annotation.classes:
        if len(annotation.slices[c]) == 1:
            reach = annotation.reach(c)
            print(f"warning: {where}: structure {c} is annotated on one slice only: no self-check for it; "
                  + ("nothing to fill between: classic fills keep that slice, the model is not bounded"
                     if reach is None else f"filled within {reach} slice(s) of it"), file=sys.stderr)
    if annotation.style == COMPLETE and len(annotation.classes) >= 2:
        drawn = [set(annotation.slices[c]) for c in annotation.classes]
        if sum(map(len, drawn)) == len(set().union(*drawn)):
            print(f"warning: {where}: --complete-slices reads every labelled slice as annotated for every "
                  "structure, but no slice holds two structures (each is drawn on slices of its own): each "
                  "structure is then cut off at the others' slices; leave --complete-slices out for a drawing "
                  "made one structure at a time", file=sys.stderr)


def check_crop(crop: bool | str, mask_prior: bool) -> bool:
    """``crop``: True/"on", False/"off", or "auto" (on for weights trained with a mask prior, on such boxes)."""
    if crop in ("auto", None):
        return bool(mask_prior)
    if crop in (True, False, "on", "off"):
        return crop in (True, "on")
    raise InputError("--crop", f"expected auto, on or off, got {crop!r}")


def support_pairs(support: Any, support_label: Any) -> list[tuple[Any, Any]]:
    """One support scan or several (lists, paired in order with their labels: the CLI's ``--support`` and
    ``--support-label`` given once per support scan); mismatched counts are one InputError."""
    supports = list(support) if isinstance(support, list) else [support]
    labels = list(support_label) if isinstance(support_label, list) else [support_label]
    if not supports:
        raise InputError("--support", "no support scan given")
    if len(supports) != len(labels):
        raise InputError("--support-label", f"{len(supports)} support scan(s) but {len(labels)} support label(s): "
                                            "give --support and --support-label once per support scan, in pairs")
    return list(zip(supports, labels))


def load_support(support: Any, support_label: Any, classes: Sequence[int] | None = None,
                 channel: int | None = None) -> tuple[Scan, Scan, np.ndarray, list[int]]:
    """Open and check the support pair: (support scan, label scan, canonical label array, classes to segment)."""
    scan = open_scan(support, channel, "support")
    label_scan = open_scan(support_label, None, "support_label")
    support_label = label_scan.path
    if label_scan.canonical_shape != scan.canonical_shape:
        raise InputError(support_label, f"label shape {label_scan.shape} does not match image shape {scan.shape} "
                                        "(read canonically): the label is on another grid")
    if not same_grid(scan, label_scan):  # the same grid in space; its voxel order may differ (another tool's file)
        raise InputError(support_label, "label affine does not match the image affine: the label is on another "
                                        "grid (another place, spacing or orientation in space)")
    values = np.asarray(label_scan.canonical)
    check_integer_labels(values, support_label)
    if values.dtype.kind == "f":
        values = values.astype(np.int64)
    if values.dtype.kind == "i" and values.min() < 0:
        negative = sorted(int(v) for v in np.unique(values[values < 0]))
        raise InputError(support_label, f"negative label value(s) {_listed(negative)}: label values are 0 "
                                        "(background) and positive integers")
    present = sorted(int(v) for v in np.unique(values) if v > 0)
    if not present:
        raise InputError(support_label, "support label is empty (no foreground voxels)")
    classes = present if classes is None else [int(c) for c in classes]
    missing = [c for c in classes if c not in present]
    if missing:
        raise InputError(support_label, f"requested class(es) {missing} not in the support label "
                                        f"(values present: {present})")
    return scan, label_scan, values, classes


def _listed(values: list[int], most: int = 8) -> str:
    return ", ".join(map(str, values[:most])) + (f" (and {len(values) - most} more)" if len(values) > most else "")
