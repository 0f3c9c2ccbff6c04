"""Anatomy-like label maps generated on the fly: many structures that touch, nest, bend and shrink to a few voxels.

Why: a model trained on a few bright, well-separated blobs learns that generator, not anatomy. Real scans hold
dozens of structures pressed against each other, shells (skull, body wall, cortex), thin curved tubes, C-shapes
and tiny nuclei. Following SynthMorph (Hoffmann et al. 2022: label maps from the argmax of smoothed noise) and
SynthSeg (Billot et al. 2023: train only on images synthesised from label maps), a *template* is built from

* a body: a tapering superellipse slab wrapped in 1-3 nested shells (an optional skin, a rim, an inner layer);
* inside it, the argmax of J smoothed random noise fields (neighbouring regions that touch, SynthMorph-style);
* painted over them: blobs, nested blobs (a core in its own shell), tubes crossing the slices, in-plane curves
  (thin and thick arcs, C-shapes: non-convex) and tiny structures of a few voxels;

and each *patient* is the template under its own random affine + smooth deformation, a random slab offset and
optionally a mirror (:func:`patient`). Two patients of one template are a cross-case pair: the same anatomy, the
same label ids. Images come from :mod:`icl.data.anatomy_image`. Everything is seeded numpy/torch, no disk.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

MIN_STRUCTURES, MAX_STRUCTURES = 10, 60
SLAB_MARGIN = 1  # extra template slices, so two patients of one template can sit at different slab offsets
PARTITION_SIZE = 64  # the noise-argmax partition is computed at this in-plane size (cost), then upsampled
EXTRA_KINDS = ("blob", "nested", "tube", "curve", "tiny")
EXTRA_WEIGHTS = (0.25, 0.15, 0.2, 0.25, 0.15)


@dataclass
class Template:
    """A label map [Z + SLAB_MARGIN, H, W] (0 = outside the body; 1..num every structure, each present) and the
    kind of every structure id (``kinds[i]`` for id ``i``; ``kinds[0] = "background"``)."""

    labels: np.ndarray
    kinds: list[str] = field(default_factory=list)
    spacing: int = 1  # template slices per patient slice: 2 = thicker slices, structures change faster along z

    @property
    def num(self) -> int:
        return len(self.kinds) - 1


# ------------------------------------------------------------------------------------------------ noise
def smooth_fields(rng: np.random.Generator, count: int, coarse: tuple[int, int, int],
                  shape: tuple[int, int, int]) -> torch.Tensor:
    """``count`` smooth random fields [count, *shape]: white noise on a ``coarse`` grid, trilinearly upsampled
    (cheap low-resolution noise, as SynthMorph's smoothed fields)."""
    noise = torch.from_numpy(rng.standard_normal((1, count, *coarse)).astype(np.float32))
    return F.interpolate(noise, size=shape, mode="trilinear", align_corners=False)[0]


# ------------------------------------------------------------------------------------------------ the body
def _body_radius(rng: np.random.Generator, size: int, depth: int) -> np.ndarray:
    """Normalised superellipse radius [Z, H, W] of the body (< 1 inside), tapering along z, with a wavy outline."""
    cy, cx = size / 2 + rng.normal(0, 0.03 * size, 2)
    ry, rx = rng.uniform(0.30, 0.44, 2) * size
    power = rng.uniform(1.7, 3.0)
    taper = 1 + rng.uniform(-0.15, 0.15) * (np.arange(depth) / max(1, depth - 1) - 0.5)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = np.abs(yy - cy) / ry, np.abs(xx - cx) / rx
    radius = (dy ** power + dx ** power) ** (1 / power)
    wave = 1 + 0.05 * smooth_fields(rng, 1, (2, 4, 4), (depth, size, size))[0].numpy()
    return (radius[None] / taper[:, None, None]) * wave


def _shells(rng: np.random.Generator, radius: np.ndarray, size: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Nested shells of the body from outside in -> (labels with shell ids, their kinds, the interior mask)."""
    px = 1.0 / (0.37 * size)  # one pixel in normalised radius units, roughly
    labels = np.zeros(radius.shape, np.int16)
    kinds = ["background"]
    outer = 1.0
    layers = []
    if rng.random() < 0.5:
        layers.append(("skin", rng.uniform(1.0, 2.5)))
    layers.append(("rim", rng.uniform(2.0, 6.0)))
    if rng.random() < 0.6:
        layers.append(("layer", rng.uniform(1.0, 3.5)))
    for kind, thickness in layers:
        inner = outer - thickness * px
        labels[(radius < outer) & (radius >= inner)] = len(kinds)
        kinds.append(kind)
        outer = inner
    return labels, kinds, radius < outer


def _partition(rng: np.random.Generator, regions: int, size: int, depth: int) -> np.ndarray:
    """Argmax of ``regions`` smoothed noise fields (SynthMorph) -> region index [Z, H, W], computed at
    PARTITION_SIZE in-plane and upsampled (nearest).

    Along z each field is the linear part of a field as smooth as in-plane (cells of ``size / grid`` voxels): a
    base and a slope that changes it by ``depth / cell`` of its scale over the slab. Why: independent noise on a
    few z cells made regions change several times faster across slices than within one, unlike anatomy at
    near-isotropic voxels (thick slices come from the template's spacing)."""
    grid = int(rng.integers(3, 9))
    ratio = min(1.5, depth / (size / grid))
    base, slope = rng.standard_normal((2, regions, 1, grid, grid)).astype(np.float32)
    coarse = torch.from_numpy(np.concatenate([base - ratio * slope / 2, base + ratio * slope / 2], axis=1))
    small = min(size, PARTITION_SIZE)
    fields = F.interpolate(coarse[None], size=(depth, small, small), mode="trilinear", align_corners=True)[0]
    fields += torch.from_numpy(rng.normal(0, 0.3, regions).astype(np.float32))[:, None, None, None]  # sizes vary
    index = fields.argmax(0).to(torch.float32)[None, None]
    return F.interpolate(index, size=(depth, size, size), mode="nearest")[0, 0].numpy().astype(np.int16)


# ------------------------------------------------------------------------------------------------ painted structures
def _paint(labels: np.ndarray, allowed: np.ndarray, z: int, centre: np.ndarray, reach: float, inside, value: int
           ) -> None:
    """Set ``labels[z]`` to ``value`` where ``inside(dy, dx)`` holds, in the crop of radius ``reach`` around
    ``centre`` (cheap for small structures), only where ``allowed``."""
    size = labels.shape[1]
    y0, x0 = (max(0, int(np.floor(c - reach - 1))) for c in centre)
    y1, x1 = (min(size, int(np.ceil(c + reach + 2))) for c in centre)
    if y0 >= y1 or x0 >= x1:
        return
    dy, dx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    hit = inside(dy - centre[0], dx - centre[1]) & allowed[z, y0:y1, x0:x1]
    labels[z, y0:y1, x0:x1][hit] = value


def _rotated(dy: np.ndarray, dx: np.ndarray, theta: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(theta), np.sin(theta)
    return dx * c + dy * s, -dx * s + dy * c


def _extra(rng: np.random.Generator, kind: str, labels: np.ndarray, allowed: np.ndarray, kinds: list[str]) -> None:
    """Paint one structure of ``kind`` (two ids for ``nested``: shell then core) at a random interior place."""
    depth = labels.shape[0]
    zmid = int(rng.integers(depth))
    spots = np.argwhere(allowed[zmid])
    if not len(spots):
        return
    start = spots[int(rng.integers(len(spots)))].astype(np.float32)
    if kind == "tiny":
        extent = int(rng.integers(1, 4))
    elif kind == "tube":
        extent = int(rng.integers(depth // 2, depth + 1))
    else:
        extent = int(rng.integers(2, depth + 1))
    z0 = int(np.clip(zmid - rng.integers(extent), 0, depth - extent))
    speed = {"tube": 2.0, "tiny": 0.0}.get(kind, 0.4)  # px per slice: oblique tubes, slowly drifting others
    vel, amp = rng.uniform(-1, 1, 2) * speed, rng.uniform(0, 2, 2) * speed
    freq, phase, theta0, spin = rng.uniform(0.2, 0.7), rng.uniform(0, 2 * np.pi, 2), rng.uniform(0, np.pi), \
        rng.uniform(-0.05, 0.05)
    a, b = rng.uniform(3, 12), rng.uniform(2, 8)
    arc_r, span, width = rng.uniform(6, 25), rng.uniform(0.5, 1.7) * np.pi, rng.uniform(1.5, 6.0)
    radius = {"tube": rng.uniform(1.0, 2.5), "tiny": rng.uniform(0.7, 1.8)}.get(kind, 0.0)
    shell = rng.uniform(1.0, 3.0)
    ids = [len(kinds)] if kind != "nested" else [len(kinds), len(kinds) + 1]
    kinds.extend(["shell", "blob"] if kind == "nested" else [kind])
    for z in range(z0, z0 + extent):
        t = z - zmid
        centre = start + vel * t + amp * np.sin(freq * t + phase)
        u = (z - z0 + 0.5) / extent
        bulge = max(np.sqrt(max(1 - (2 * u - 1) ** 2, 0.0)), 0.4) if extent > 2 else 1.0
        theta = theta0 + spin * t
        if kind in ("tube", "tiny"):
            _paint(labels, allowed, z, centre, radius, lambda dy, dx: dy ** 2 + dx ** 2 <= radius ** 2, ids[0])
        elif kind == "curve":
            def arc(dy, dx, theta=theta, bulge=bulge):
                p, q = _rotated(dy, dx, theta)
                ring = np.abs(np.hypot(p, q) - arc_r) <= width * bulge / 2
                return ring & (np.abs(np.arctan2(q, p)) <= span / 2)
            _paint(labels, allowed, z, centre, arc_r + width, arc, ids[0])
        else:
            sa, sb = a * bulge, b * bulge
            for value, grow in ((ids[0], shell), (ids[-1], 0.0)) if kind == "nested" else ((ids[0], 0.0),):
                def ellipse(dy, dx, theta=theta, ea=sa + grow, eb=sb + grow):
                    p, q = _rotated(dy, dx, theta)
                    return (p / ea) ** 2 + (q / eb) ** 2 <= 1
                _paint(labels, allowed, z, centre, max(sa, sb) + grow, ellipse, value)


def _compact(labels: np.ndarray, kinds: list[str]) -> tuple[np.ndarray, list[str]]:
    """Renumber the ids still present (painting can hide some) to 1..n, keeping their kinds."""
    present = np.flatnonzero(np.bincount(labels.ravel(), minlength=len(kinds)))
    present = present[present > 0]
    lut = np.zeros(len(kinds), np.int16)
    lut[present] = np.arange(1, len(present) + 1)
    return lut[labels], ["background"] + [kinds[i] for i in present]


def make_template(rng: np.random.Generator, size: int = 128, depth: int = 12,
                  structures: int | None = None, spacing: int | None = None, extras: bool = True) -> Template:
    """A seeded anatomy template with ``structures`` (default: random MIN..MAX_STRUCTURES) structure ids for
    patients of ``depth`` slices taken every ``spacing`` template slices (default 1, or 2 with probability 0.3).
    ``extras=False`` (an ablation): no blobs, nested pairs, tubes, curves or tiny structures, only the partition."""
    want = int(structures or rng.integers(MIN_STRUCTURES, MAX_STRUCTURES + 1))
    want = int(np.clip(want, MIN_STRUCTURES, MAX_STRUCTURES))
    spacing = int(spacing or (2 if rng.random() < 0.3 else 1))
    slab = (depth - 1) * spacing + 1 + SLAB_MARGIN
    labels, kinds, interior = _shells(rng, _body_radius(rng, size, slab), size)
    rest = want - (len(kinds) - 1)
    painted = int(rng.integers(int(0.2 * rest), int(0.6 * rest) + 1)) if extras else 0
    regions = max(3, rest - painted)
    part = _partition(rng, regions, size, slab)
    labels[interior] = (part[interior] + len(kinds)).astype(np.int16)
    kinds += ["region"] * regions
    labels, kinds = _compact(labels, kinds)
    for _ in range(4 if extras else 0):  # painting over regions hides some ids: paint again until the count
        missing = want - (len(kinds) - 1)
        if missing <= 0:
            break
        goal = len(kinds) + missing  # a nested pair adds two ids: only while two are still missing
        while len(kinds) < goal:
            kind = str(rng.choice(EXTRA_KINDS, p=EXTRA_WEIGHTS)) if goal - len(kinds) > 1 else \
                str(rng.choice(["blob", "tiny"]))
            before = len(kinds)
            _extra(rng, kind, labels, interior, kinds)
            if len(kinds) == before:  # no room to paint it: give up this round
                break
        labels, kinds = _compact(labels, kinds)
    while len(kinds) - 1 > MAX_STRUCTURES:  # a nested pair can overshoot by one: merge the last id into background
        labels[labels == len(kinds) - 1] = 0
        kinds.pop()
    return Template(labels, kinds, spacing)


# ------------------------------------------------------------------------------------------------ patients
def deformation_grid(rng: np.random.Generator, size: int, depth: int, strength: float = 1.0) -> torch.Tensor:
    """A sampling grid [Z, H, W, 2] (grid_sample's normalised x, y): a random in-plane affine (rotation, anisotropic
    scale, shift) and a smooth random displacement of up to ~4 px that varies along z. Mild on purpose: two
    patients of a template should overlap about as two real scans do after a rigid alignment."""
    angle = rng.uniform(-0.12, 0.12) * strength
    scale = 1 + rng.uniform(-0.07, 0.07, 2) * strength
    shift = rng.uniform(-0.03, 0.03, 2) * strength
    lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    c, s = float(np.cos(angle)), float(np.sin(angle))
    x = (c * gx - s * gy) / float(scale[1]) + float(shift[1])
    y = (s * gx + c * gy) / float(scale[0]) + float(shift[0])
    grid = int(rng.integers(3, 7))
    amp = rng.uniform(0.0, 4.0) * strength * 2 / size  # pixels -> normalised units
    # smooth along z too (2 cells over the slab): a deformation that changed every few slices would tear thin
    # structures apart between neighbouring slices, which real anatomy does not do
    disp = smooth_fields(rng, 2, (2, grid, grid), (depth, size, size)) * amp
    return torch.stack([x[None] + disp[0], y[None] + disp[1]], dim=-1)


def patient(rng: np.random.Generator, template: Template, depth: int, mirror: bool = False,
            strength: float = 1.0) -> np.ndarray:
    """One 'patient' of ``template``: its label map [depth, H, W] under a random deformation, at a random slab
    offset, mirrored left-right if asked. Ids keep their meaning (the same structure in every patient)."""
    reach = (depth - 1) * template.spacing + 1
    offset = int(rng.integers(0, template.labels.shape[0] - reach + 1))
    slices = template.labels[offset:offset + reach:template.spacing]
    labels = torch.from_numpy(slices.astype(np.float32))[:, None]
    grid = deformation_grid(rng, labels.shape[-1], depth, strength)
    warped = F.grid_sample(labels, grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0]
    out = warped.numpy().astype(np.int16)
    return np.ascontiguousarray(out[:, :, ::-1]) if mirror else out
