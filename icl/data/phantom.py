"""Deterministic synthetic CT/MR phantoms written as real NIfTI datasets in the KiTS, BTCV, MSD or nnU-Net layout.

Why: the whole pipeline (readers, cache, sampling, training, evaluation) must be testable and demonstrable without
downloading patient data. Each phantom has geometric objects of distinct shape classes with random pose, size and
intensity over a textured HU-like background (air, soft tissue, bone), so CT windowing and in-plane resampling matter.

    python -m icl.cli.phantom --out datasets/phantom --layout kits --cases 4 --seed 0 --shape 96,96,40
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from icl.data.vocabulary import SHAPES
from icl.errors import InputError
from icl.io import atomic_path, write_json

LAYOUTS: tuple[str, ...] = ("kits", "btcv", "msd", "nnunet")
DEFAULT_SHAPE: tuple[int, int, int] = (96, 96, 40)
# Shapes used by default per layout; KiTS has exactly three label values (kidney, tumor, cyst).
DEFAULT_CLASSES: dict[str, tuple[str, ...]] = {
    "kits": ("ellipsoid", "twin_blobs", "box"),
    "btcv": SHAPES,
    "msd": SHAPES,
    "nnunet": SHAPES,
}
MIN_SLICES = 3  # every class must cover at least this many consecutive slices


@dataclass
class _Obj:
    """One placed object: a signed 'inside' test in local (rotated, centred) coordinates plus its bounding radius."""

    inside: Callable[[np.ndarray], np.ndarray]  # q [..., 3] in mm → bool
    radius: float


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _make_object(kind: str, e: float, rng: np.random.Generator) -> _Obj:
    """Sizes are fractions of the in-plane extent ``e`` (mm) so any volume size works."""
    if kind == "ellipsoid":
        a = rng.uniform(0.08, 0.15, size=3) * e
        return _Obj(lambda q: ((q / a) ** 2).sum(-1) <= 1.0, float(a.max()))
    if kind == "torus":
        big, small = rng.uniform(0.09, 0.13) * e, rng.uniform(0.035, 0.05) * e
        return _Obj(lambda q: (np.hypot(q[..., 0], q[..., 1]) - big) ** 2 + q[..., 2] ** 2 <= small**2, big + small)
    if kind == "tube":
        half, amp, r = rng.uniform(0.12, 0.17) * e, rng.uniform(0.03, 0.07) * e, rng.uniform(0.03, 0.045) * e
        t = np.linspace(-1.0, 1.0, 33)
        curve = np.stack([amp * np.sin(np.pi * t), amp * 0.5 * np.cos(np.pi * t), half * t], -1)

        def tube(q: np.ndarray) -> np.ndarray:
            d2 = np.full(q.shape[:-1], np.inf)
            for p in curve:
                d2 = np.minimum(d2, ((q - p) ** 2).sum(-1))
            return d2 <= r**2

        return _Obj(tube, float(np.hypot(half, amp) + r))
    if kind == "box":
        h = rng.uniform(0.06, 0.12, size=3) * e
        return _Obj(lambda q: (np.abs(q) <= h).all(-1), float(np.linalg.norm(h)))
    if kind == "cone":
        height, base = rng.uniform(0.2, 0.3) * e, rng.uniform(0.07, 0.11) * e

        def cone(q: np.ndarray) -> np.ndarray:
            z = q[..., 2] + height / 2  # apex at +height/2, base at -height/2
            return (z >= 0) & (z <= height) & (np.hypot(q[..., 0], q[..., 1]) <= base * (1 - z / height))

        return _Obj(cone, float(np.hypot(height / 2, base)))
    if kind == "twin_blobs":
        r1, r2 = rng.uniform(0.05, 0.08, size=2) * e
        gap = rng.uniform(0.03, 0.06) * e
        c1, c2 = np.array([0, 0, -(r1 + gap / 2)]), np.array([0, 0, r2 + gap / 2])
        return _Obj(
            lambda q: (((q - c1) ** 2).sum(-1) <= r1**2) | (((q - c2) ** 2).sum(-1) <= r2**2),
            float(max(r1, r2) + gap / 2 + max(r1, r2)),
        )
    raise InputError("--classes", f"unknown phantom shape {kind!r}; choose from {', '.join(SHAPES)}")


def _longest_run(present: np.ndarray) -> int:
    best = run = 0
    for p in present:
        run = run + 1 if p else 0
        best = max(best, run)
    return best


def _label_volume(
    shape: tuple[int, int, int], spacing: np.ndarray, classes: Sequence[str], rng: np.random.Generator
) -> np.ndarray:
    """Place one object per class (value = index + 1) without heavy overlap; retry until each spans MIN_SLICES."""
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"), -1)
    extent = np.array(shape) * spacing
    e = 1.2 * float(min(extent[0], extent[1]))  # objects sized relative to the in-plane field of view
    for _attempt in range(50):
        label = np.zeros(shape, np.uint8)
        centres: list[tuple[np.ndarray, float]] = []
        ok = True
        for value, kind in enumerate(classes, start=1):
            obj = _make_object(kind, e, rng)
            rot = _rotation(rng)
            margin = np.minimum(obj.radius, extent / 2 - 1e-3)
            for _ in range(100):
                c = rng.uniform(margin, extent - margin)
                if all(np.linalg.norm(c - c2) >= 0.8 * (obj.radius + r2) for c2, r2 in centres):
                    break
            centres.append((c, obj.radius))
            lo = np.maximum(((c - obj.radius) / spacing).astype(int) - 1, 0)
            hi = np.minimum(((c + obj.radius) / spacing).astype(int) + 2, shape)
            sub = grid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            mask = obj.inside((sub - c) @ rot)
            label[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]][mask] = value
        for value in range(1, len(classes) + 1):
            if _longest_run((label == value).any(axis=(0, 1))) < MIN_SLICES:
                ok = False
        if ok:
            return label
    raise InputError("--shape", f"could not place {len(classes)} objects in a {shape} volume; use a larger shape")


def _texture(shape: tuple[int, int, int], rng: np.random.Generator, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=sigma)
    return field / (field.std() + 1e-8)


def _image_volume(
    label: np.ndarray, n_classes: int, rng: np.random.Generator, mr: bool = False
) -> np.ndarray:
    """HU-like image: air outside an elliptic body, textured fat/soft tissue, a bony rod, objects with own intensity."""
    shape = label.shape
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body2d = (x / rng.uniform(0.85, 0.97)) ** 2 + (y / rng.uniform(0.75, 0.9)) ** 2 <= 1.0
    body = np.broadcast_to(body2d[..., None], shape)
    img = np.where(body, rng.uniform(-110, -60) + 45.0 * _texture(shape, rng, 3.0), -1000.0)
    spine = ((x - rng.uniform(-0.1, 0.1)) ** 2 + (y - 0.7) ** 2 <= 0.08**2)[..., None] & body
    img = np.where(np.broadcast_to(spine, shape), rng.uniform(600, 1100), img)
    for value in range(1, n_classes + 1):
        hu = rng.uniform(-40, 260)
        inside = label == value
        img[inside] = hu + 12.0 * _texture(shape, rng, 1.5)[inside]
    img = img + rng.normal(scale=15.0, size=shape)
    if mr:  # positive arbitrary units with a different contrast than CT
        return np.clip((img + 1000.0) * 0.4, 0, None).astype(np.float32)
    return np.clip(np.round(img), -1024, 3071).astype(np.int16)


def _affine(spacing: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """LPS-like flipped in-plane axes with a random origin: nothing downstream may assume an identity affine."""
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    aff[:3, 3] = rng.uniform(-200, 200, size=3).round(2)
    return aff


def _save(arr: np.ndarray, affine: np.ndarray, target: Path) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    with atomic_path(target) as tmp:
        nib.save(img, tmp)


def make_case(
    index: int, seed: int, shape: Sequence[int] = DEFAULT_SHAPE, classes: Sequence[str] = SHAPES, channels: int = 1,
    stream: int = 0,
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Arrays of one phantom case in (X, Y, Z) order: ([image per channel], label, affine). Pure and deterministic;
    ``stream`` decorrelates datasets made with the same seed (the layout's index): a combined set is not redundant."""
    rng = np.random.default_rng([seed, index, stream])
    shape = tuple(int(s) for s in shape)
    inplane = rng.uniform(0.7, 0.9)
    spacing = np.array([inplane, inplane, round(min(shape[0], shape[1]) * inplane / shape[2], 2)])
    label = _label_volume(shape, spacing, classes, rng)
    images = [_image_volume(label, len(classes), rng, mr=channels > 1) for _ in range(channels)]
    return images, label, _affine(spacing, rng)


def make_phantom_dataset(
    out: str | Path,
    layout: str,
    cases: int,
    seed: int = 0,
    shape: Sequence[int] = DEFAULT_SHAPE,
    classes: Sequence[str] | None = None,
) -> Path:
    """Write ``cases`` phantom cases into ``out`` in the given layout; returns ``out``.

    Label value ``k`` is the k-th entry of ``classes`` (default per layout). For KiTS they stand for 1 kidney,
    2 tumor, 3 cyst; for BTCV for the first BTCV organ ids; MSD/nnU-Net carry the shape names in dataset.json.
    """
    if layout not in LAYOUTS:
        raise InputError("--layout", f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    classes = tuple(classes or DEFAULT_CLASSES[layout])
    if layout == "kits" and len(classes) > 3:
        raise InputError("--classes", "the KiTS layout has at most 3 classes (kidney, tumor, cyst)")
    if layout == "btcv" and len(classes) > 13:
        raise InputError("--classes", "the BTCV layout has at most 13 classes")
    if len(shape) != 3 or min(shape) < 8:
        raise InputError("--shape", f"expected three sizes >= 8, got {shape}")
    out = Path(out)
    channels = 2 if layout in ("msd", "nnunet") else 1
    names = []
    for i in range(cases):
        images, label, aff = make_case(i, seed, shape, classes, channels, LAYOUTS.index(layout))
        if layout == "kits":
            # KiTS19 stores volumes slice-axis first: array[k, i, j] = arr[i, j, k], affine columns permuted to match.
            perm = np.eye(4)[:, [2, 0, 1, 3]]
            case = out / f"case_{i:05d}"
            _save(np.ascontiguousarray(images[0].transpose(2, 0, 1)), aff @ perm, case / "imaging.nii.gz")
            _save(np.ascontiguousarray(label.transpose(2, 0, 1)), aff @ perm, case / "segmentation.nii.gz")
        elif layout == "btcv":
            _save(images[0], aff, out / "img" / f"img{i + 1:04d}.nii.gz")
            _save(label, aff, out / "label" / f"label{i + 1:04d}.nii.gz")
        else:
            name = f"phantom_{i + 1:03d}"
            names.append(name)
            if layout == "msd":
                _save(np.stack(images, -1), aff, out / "imagesTr" / f"{name}.nii.gz")
            else:
                for c, im in enumerate(images):
                    _save(im, aff, out / "imagesTr" / f"{name}_{c:04d}.nii.gz")
            _save(label, aff, out / "labelsTr" / f"{name}.nii.gz")
    if layout == "msd":
        write_json(out / "dataset.json", {
            "name": "Phantom", "tensorImageSize": "4D",
            "modality": {"0": "T2", "1": "ADC"},
            "labels": {"0": "background", **{str(k): n for k, n in enumerate(classes, start=1)}},
            "numTraining": cases,
            "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in names],
        })
    elif layout == "nnunet":
        write_json(out / "dataset.json", {
            "channel_names": {"0": "T2", "1": "ADC"},
            "labels": {"background": 0, **{n: k for k, n in enumerate(classes, start=1)}},
            "numTraining": cases, "file_ending": ".nii.gz",
        })
    return out
