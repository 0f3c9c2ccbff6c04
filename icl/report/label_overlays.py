"""Overlay PNGs of a multi-class label map (``icl.segment --overlays``): what a reader needs to trust a picture.

One colour per label value with a legend under the slice; the slices the user annotated (their masks were written
back, not predicted) framed in white and said in the legend; the slice shown the radiological way (the patient's
right on the image's left, anterior or superior up, as in 3D Slicer and PACS viewers); files named by the plane
they cut (``<scan>_axial_0012.png``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from icl.io import atomic_path
from icl.report.overlays import FILL_ALPHA, PLANES, _contour, pick_slices, radiological

PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))  # distinct colours, cycled
ANNOTATED_RGB = (255, 255, 255)
LEGEND_GAP, LEGEND_ROW = 6, 14  # pixels between legend entries, per legend row


def class_colours(classes: Sequence[int]) -> dict[int, tuple[int, int, int]]:
    """Each label value's colour: by its place among ``classes``, so one run's PNGs agree."""
    return {int(c): PALETTE[i % len(PALETTE)] for i, c in enumerate(classes)}


def label_overlay(image01: np.ndarray, labels: np.ndarray, colours: dict[int, tuple[int, int, int]],
                  annotated: bool) -> np.ndarray:
    """uint8 [H + legend, W, 3]: canonical slice and labels displayed radiologically, each value tinted and
    outlined in its colour, a white frame when ``annotated``, the legend below."""
    grey = np.clip(np.nan_to_num(radiological(image01).astype(np.float32)), 0, 1) * 255
    shown = radiological(labels)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for value, colour in colours.items():
        mask = shown == value
        rgb[mask] = (1 - FILL_ALPHA) * rgb[mask] + FILL_ALPHA * np.array(colour, np.float32)
        rgb[_contour(mask)] = colour
    if annotated:
        rgb[[0, -1], :] = ANNOTATED_RGB
        rgb[:, [0, -1]] = ANNOTATED_RGB
    return np.concatenate([np.round(rgb).astype(np.uint8), _legend(rgb.shape[1], colours, annotated)])


def _legend(width: int, colours: dict[int, tuple[int, int, int]], annotated: bool) -> np.ndarray:
    """The legend strip: a colour box and its label value per entry, flowed into rows of ``width`` pixels."""
    entries = [(str(v), c) for v, c in colours.items()] + ([("annotated", ANNOTATED_RGB)] if annotated else [])
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    places, x, y = [], 2, 2
    for text, colour in entries:
        span = 12 + int(math.ceil(measure.textlength(text))) + LEGEND_GAP
        if x > 2 and x + span > width:
            x, y = 2, y + LEGEND_ROW
        places.append((x, y, text, colour))
        x += span
    strip = Image.new("RGB", (width, y + LEGEND_ROW))
    draw = ImageDraw.Draw(strip)
    for x, y, text, colour in places:
        draw.rectangle([x, y, x + 9, y + 9], fill=colour)
        draw.text((x + 12, y - 1), text, fill=(255, 255, 255))
    return np.asarray(strip)


def save_label_overlays(image_slice01, labels_zhw: np.ndarray, classes: Sequence[int], annotated: Sequence[int],
                        slice_axis: int, out_dir: Path, name: str, max_slices: int = 8) -> list[Path]:
    """Up to ``max_slices`` PNGs of the slices holding a label (annotated slices among them marked):
    ``image_slice01(z)`` gives canonical slice ``z`` in [0, 1]; ``labels_zhw`` is canonical, slices first."""
    present = labels_zhw.reshape(labels_zhw.shape[0], -1).any(axis=1)
    colours, marked = class_colours(classes), set(int(z) for z in annotated)
    paths = []
    for z in pick_slices(None, present[:, None], len(present), max_slices):
        rgb = label_overlay(image_slice01(z), labels_zhw[z], colours, z in marked)
        path = out_dir / f"{name}_{PLANES[slice_axis]}_{z:04d}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(rgb).save(tmp, format="PNG")
        paths.append(path)
    return paths
