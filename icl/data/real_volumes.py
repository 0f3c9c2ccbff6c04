"""Real labelled volumes for training (``train_3d.py -real_volumes IMG:LAB[,IMG:LAB...]``): read, held out, varied.

Why: every model of this engine learnt from generated images only, and on real scans its learned part adds nothing.
A labelled scan holds hundreds of real structures, each seen along three axes; held-out label values are never
anything but background here, so a benchmark on them keeps measuring structures the model never saw.

Each pair is read with the engine's own preprocessing (``icl.data.frames``: closest-canonical orientation, the
non-finite rule, the window a scan gets at inference), its label values are kept as structures when they are at
least ``min_voxels`` large and not held out (the rest becomes background), and a finite, seeded bank of variants
is made once (``icl.data.real_augment``): contrast groups, each seen twice, the second time warped (another
subject of the same anatomy, the cross-scan support). Variant 0 is the scan as it is.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from icl.data.frames import Scan, intensity_range, window01
from icl.data.real_augment import CONTRASTS, make_variant
from icl.data.validate import check_integer_labels
from icl.errors import InputError

MIN_VOXELS = 500  # default smallest structure kept (voxels): INIA19 NeuroMaps keeps 172 of its 724 values


@dataclass
class Variant:
    """One version of a volume: image [X, Y, Z] in [0, 1], compact structure ids (0 = background), their boxes."""

    image: np.ndarray
    labels: np.ndarray
    contrast: int  # contrast group: variants 2g and 2g + 1 share one
    warped: bool
    boxes: list = field(default_factory=list)  # boxes[i - 1]: ndimage.find_objects slices of id i (None if gone)


@dataclass
class RealVolume:
    """A labelled scan for training: its name, a content key, the original label value of each compact id."""

    name: str
    key: str  # hash of the image and label files' bytes (what stored features of its crops depend on)
    values: np.ndarray  # values[i] = original label value of compact id i (values[0] = 0)
    variants: list[Variant]

    @property
    def structures(self) -> int:
        return len(self.values) - 1


# ------------------------------------------------------------------------------------------------ flags
def parse_pairs(text: str, flag: str = "-real_volumes") -> list[tuple[Path, Path]]:
    """``"IMG:LAB,IMG:LAB"`` -> [(image path, label path)]; each file must exist."""
    pairs = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        image, sep, label = item.partition(":")
        if not sep or not image or not label:
            raise InputError(flag, f"expected IMAGE:LABEL pairs separated by commas, got {item!r}")
        for path in (image, label):
            if not Path(path).is_file():
                raise InputError(flag, f"file {path} does not exist")
        pairs.append((Path(image), Path(label)))
    if not pairs:
        raise InputError(flag, "no IMAGE:LABEL pair given")
    return pairs


def parse_values(text: str, flag: str = "-real_held_out") -> tuple[int, ...]:
    """``"1,1001,147"`` -> label values (integers > 0)."""
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise InputError(flag, f"expected comma-separated label values (integers), got {text!r}") from None
    if any(v <= 0 for v in values):
        raise InputError(flag, f"label values are > 0 (0 is background), got {text!r}")
    return values


# ------------------------------------------------------------------------------------------------ reading
def file_key(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def read_pair(image_path: Path, label_path: Path, held_out: Sequence[int], min_voxels: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image [0, 1], compact ids, original values) of one pair in canonical order, windowed as at inference."""
    image, label = Scan.open(image_path), Scan.open(label_path)
    if image.canonical_shape != label.canonical_shape or not np.allclose(image.affine, label.affine, atol=1e-3):
        raise InputError(label_path, f"label grid {label.shape} does not match the image {image_path} "
                                     f"({image.shape}, or their affines differ)")
    values = image.fix_nonfinite(image.values(image.canonical))
    windowed = window01(values, *intensity_range(image, "auto"))
    raw = label.values(label.canonical)
    check_integer_labels(raw, label_path)
    raw = raw.astype(np.int64)
    found, inverse, counts = np.unique(raw, return_inverse=True, return_counts=True)
    keep = (found > 0) & (counts >= min_voxels) & ~np.isin(found, list(held_out))
    if not keep.any():
        raise InputError(label_path, f"no structure of at least {min_voxels} voxels outside the held-out values")
    compact = np.zeros(len(found), np.int32)
    compact[keep] = np.arange(1, int(keep.sum()) + 1)
    ids = compact[inverse.reshape(raw.shape)].astype(np.int16 if keep.sum() < 2**15 else np.int32)
    return windowed, ids, np.concatenate([[0], found[keep]])


def load_real_volume(image_path: Path, label_path: Path, held_out: Sequence[int] = (), min_voxels: int = MIN_VOXELS,
                     variants: int = 8, seed: int = 0) -> RealVolume:
    """A :class:`RealVolume` with ``variants`` versions (an even count: contrast groups of two, the second warped;
    group 0 is the scan's own contrast, variant 0 the scan as it is)."""
    if variants < 2 or variants % 2:
        raise InputError("-real_variants", f"expected an even count >= 2, got {variants}")
    image, ids, values = read_pair(image_path, label_path, held_out, min_voxels)
    key = file_key(image_path, label_path)
    bank = []
    for v in range(variants):
        group, warped = v // 2, bool(v % 2)
        contrast = CONTRASTS[group % len(CONTRASTS)]
        rng = np.random.default_rng([seed, int(key[:8], 16), v, 37])
        vi, vl = (image, ids) if v == 0 else make_variant(rng, image, ids, contrast, warped)
        bank.append(Variant(vi, vl, group, warped, ndimage.find_objects(vl, max_label=len(values) - 1)))
    return RealVolume(image_path.name.split(".")[0], key, values, bank)


def load_real_volumes(text: str, held_out_text: str = "", min_voxels: int = MIN_VOXELS, variants: int = 8,
                      seed: int = 0) -> list[RealVolume]:
    """Every pair of ``-real_volumes`` (``-real_held_out`` never anything but background)."""
    held_out = parse_values(held_out_text) if held_out_text else ()
    return [load_real_volume(image, label, held_out, min_voxels, variants, seed) for image, label in parse_pairs(text)]
