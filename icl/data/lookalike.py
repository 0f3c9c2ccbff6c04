"""On-the-fly in-context tasks that cannot be solved without reading the support: look-alike objects, one marked.

Why: on ordinary phantoms every object of a scan is "the" object to segment, so a model can lower its loss by
segmenting whatever object it sees and ignoring its support memory (the measured shortcut). Here every volume holds
K objects that share ONE intensity distribution (drawn per volume, so intensity never names the target), differ
only in position, shape and motion, and the support marks one of them. Only memory read at the right place (same
scan) or the right shape (another scan) tells which object to segment.

Everything is numpy, seeded and deterministic (same arguments -> same arrays), generated in milliseconds, no disk.
A task is a plain dict (see :func:`make_task`), so any engine API can consume it:

* ``volume`` float32 [Z, H, W] in [0, 1], ``masks`` uint8 [K, Z, H, W] of every object, ``target`` (index into K),
  ``classes`` (shape class per object), ``level`` (name);
* same-scan support: ``support_slices`` (slice indices of ``volume`` whose target mask is the support);
* other-scan support (level ``cross``): ``support_images`` float32 [S, H, W] and ``support_masks`` uint8 [S, H, W]
  from another generated case whose marked object has the target's shape class (``support_slices`` is empty).

:func:`as_video` turns a task into the forward-tracking video SAM2 trains on (support frames first).

Curriculum levels (name or number), from easiest:

0 ``discs_fixed``  two identical static discs at fixed left/right places (the issue's first probe);
1 ``discs_random`` two identical static discs at random places (needs location matching through memory);
2 ``adjacent``     K drifting look-alikes, support on the first slice, every following slice queried;
3 ``far``          support on one slice, queries start several slices away and skip slices (bigger changes);
4 ``sparse``       support on every k-th slice of the scan (sparse annotation), every slice queried;
5 ``cross``        support slices from ANOTHER case whose marked object has the target's shape class; the query
                   scan's other objects have other classes, so shape is the only cue.

Shape classes mirror the phantom's (``icl.data.vocabulary.SHAPES``) as 2D cross-sections evolving along z; ``shapes``
restricts the classes a task may use and ``held_out`` removes some by name (train without them, test on them).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from icl.data.vocabulary import LEVELS, SHAPES, level_name  # the phantom's shape classes, as 2D cross-sections


# ------------------------------------------------------------------------------------------------ rendering
def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """Gaussian-filtered white noise (FFT, numpy only) with unit std; ``scale`` = blur sigma in voxels."""
    noise = rng.normal(size=shape)
    freqs = np.meshgrid(*[np.fft.fftfreq(n) for n in shape], indexing="ij")
    kernel = np.exp(-2 * (np.pi * scale) ** 2 * sum(f ** 2 for f in freqs))
    field = np.real(np.fft.ifftn(np.fft.fftn(noise) * kernel))
    return (field - field.mean()) / (field.std() + 1e-8)


class _Object:
    """One object: a shape class whose 2D cross-section changes with the relative depth u in [0, 1] of its z-extent,
    placed at a centre that drifts (linear + sinusoidal) and an in-plane angle that turns from slice to slice."""

    def __init__(self, kind: str, rng: np.random.Generator, size: int, depth: int, z_range: tuple[int, int],
                 scale: float, moving: bool):
        self.kind, self.z0, self.z1 = kind, z_range[0], z_range[1]
        r = scale * size
        self.a, self.b = r * rng.uniform(0.7, 1.0), r * rng.uniform(0.45, 0.8)  # half-axes
        if kind == "disc":
            self.a = self.b = r  # the probe's discs are identical
        self.ring = rng.uniform(0.3, 0.45)  # torus ring half-width as a fraction of its radius
        self.split = rng.uniform(0.4, 0.6)  # twin_blobs: where along z the gap between the blobs is
        self.theta0, self.spin = rng.uniform(0, np.pi), rng.uniform(-0.08, 0.08) if moving else 0.0
        speed = (2.5 if kind == "tube" else 1.0) * size / 128 if moving else 0.0
        self.vel = rng.uniform(-1, 1, 2) * speed
        self.amp, self.freq = rng.uniform(0, 3, 2) * speed, rng.uniform(0.2, 0.6)
        self.phase = rng.uniform(0, 2 * np.pi, 2)
        self.centre0 = np.zeros(2)
        self.depth = depth

    def centre(self, z: float) -> np.ndarray:
        t = z - self.depth / 2
        return self.centre0 + self.vel * t + self.amp * np.sin(self.freq * t + self.phase)

    def reach(self) -> float:
        return max(self.a, self.b) * (1.0 + self.ring)

    def render(self, z: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        if not self.z0 <= z <= self.z1:
            return np.zeros(yy.shape, bool)
        u = (z - self.z0 + 0.5) / (self.z1 - self.z0 + 1)  # relative depth inside the object, (0, 1)
        cy, cx = self.centre(z)
        th = self.theta0 + self.spin * z
        dy, dx = yy - cy, xx - cx
        p = dx * np.cos(th) + dy * np.sin(th)
        q = -dx * np.sin(th) + dy * np.cos(th)
        bulge = np.sqrt(max(1 - (2 * u - 1) ** 2, 0.0)) ** 0.5  # wide in the middle, narrower at the ends
        if self.kind == "disc":
            return p ** 2 + q ** 2 <= self.a ** 2
        if self.kind == "ellipsoid":
            s = max(bulge, 0.35)
            return (p / (self.a * s)) ** 2 + (q / (self.b * s)) ** 2 <= 1
        if self.kind == "torus":
            rad = np.hypot(p, q * self.a / self.b)
            return np.abs(rad - self.a * 0.75) <= self.a * self.ring * max(bulge, 0.5)
        if self.kind == "tube":
            return p ** 2 + q ** 2 <= (0.65 * self.b) ** 2
        if self.kind == "box":
            return (np.abs(p) <= self.a * 0.85) & (np.abs(q) <= self.b * 0.85)
        if self.kind == "cone":
            rad = self.a * max(1.0 - 0.8 * u, 0.2)
            return p ** 2 + q ** 2 <= rad ** 2
        if self.kind == "twin_blobs":
            if abs(u - self.split) < 0.1:
                return np.zeros(yy.shape, bool)  # the gap between the two blobs
            lo, hi = (0.0, self.split - 0.1) if u < self.split else (self.split + 0.1, 1.0)
            w = (u - lo) / (hi - lo)
            s = max(np.sqrt(max(1 - (2 * w - 1) ** 2, 0.0)), 0.4)
            rad = self.b * s * (1.0 if u < self.split else 0.8)
            return p ** 2 + q ** 2 <= rad ** 2
        raise ValueError(f"unknown shape class {self.kind!r}")


def _place(objs: list[_Object], rng: np.random.Generator, size: int, fixed: bool) -> bool:
    """Choose start centres so every object stays inside the image and apart from the others on every slice."""
    zs = np.arange(objs[0].depth)
    for _ in range(200):
        for i, o in enumerate(objs):
            if fixed:  # the two-disc probe: left and right halves, vertically centred
                o.centre0 = np.array([size / 2, size * (0.28 + 0.44 * i)])
            else:
                m = o.reach() + 2
                o.centre0 = rng.uniform(m, size - m, 2)
        ok = True
        for z in zs:
            cs = [o.centre(z) for o in objs]
            for i, o in enumerate(objs):
                if np.any(cs[i] < o.reach() * 0.8) or np.any(cs[i] > size - o.reach() * 0.8):
                    ok = False
                for j in range(i):
                    if np.linalg.norm(cs[i] - cs[j]) < o.reach() + objs[j].reach() + 3:
                        ok = False
        if ok:
            return True
    return False


def render_case(rng: np.random.Generator, kinds: Sequence[str], size: int, depth: int, moving: bool = True,
                fixed: bool = False, full_extent: bool = False, scale: tuple[float, float] = (0.08, 0.13)
                ) -> tuple[np.ndarray, np.ndarray]:
    """A volume [Z, H, W] in [0, 1] and masks [K, Z, H, W] with one object per entry of ``kinds``.

    All objects share one intensity distribution drawn for this volume; the background is a smooth texture with
    a different, randomly darker or brighter mean, plus per-voxel noise. ``full_extent`` makes every object span
    all slices (else each covers a random 60-100 % of them).
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(50):
        objs = []
        s = rng.uniform(*scale)  # look-alikes: one size scale per volume, small jitter per object
        for kind in kinds:
            ext = depth if full_extent else int(rng.integers(int(np.ceil(0.6 * depth)), depth + 1))
            z0 = int(rng.integers(0, depth - ext + 1))
            jitter = 1.0 if kind == "disc" else rng.uniform(0.9, 1.1)
            objs.append(_Object(kind, rng, size, depth, (z0, z0 + ext - 1), s * jitter, moving))
        if _place(objs, rng, size, fixed):
            break
    else:
        raise RuntimeError(f"could not place {len(kinds)} objects in a {size}px image")
    masks = np.stack([np.stack([o.render(z, yy, xx) for z in range(depth)]) for o in objs]).astype(np.uint8)
    bg_mean = rng.uniform(0.15, 0.85)
    obj_mean = bg_mean + rng.choice([-1, 1]) * rng.uniform(0.2, 0.4)
    if not 0.05 <= obj_mean <= 0.95:
        obj_mean = bg_mean - (obj_mean - bg_mean)
    # background texture smoother and weaker than the objects' contrast: texture blobs must not look like objects
    vol = bg_mean + rng.uniform(0.02, 0.06) * _smooth_noise(rng, (depth, size, size), rng.uniform(4, 10) * size / 128)
    inside = masks.any(0)
    obj_tex = obj_mean + rng.uniform(0.01, 0.05) * _smooth_noise(rng, (depth, size, size), 1.5 * size / 128)
    vol = np.where(inside, obj_tex, vol) + rng.normal(scale=rng.uniform(0.01, 0.04), size=vol.shape)
    return np.clip(vol, 0, 1).astype(np.float32), masks


# ------------------------------------------------------------------------------------------------ tasks
def _pick_kinds(rng: np.random.Generator, pool: Sequence[str], k: int, same_prob: float) -> list[str]:
    """K shape classes: all the same with probability ``same_prob`` (pure look-alikes), else drawn freely."""
    if rng.random() < same_prob:
        return [str(rng.choice(pool))] * k
    return [str(c) for c in rng.choice(pool, size=k)]


def _present(masks: np.ndarray) -> np.ndarray:
    return masks.reshape(masks.shape[0], -1).any(1)


def make_task(seed: int, level: int | str = "adjacent", size: int = 128, depth: int = 8, k: int = 3,
              shapes: Sequence[str] = SHAPES, held_out: Sequence[str] = (), same_prob: float = 0.5,
              every: int | None = None, num_support: int | None = None,
              target_shapes: Sequence[str] | None = None, plain: bool = False) -> dict:
    """One seeded task of the given curriculum ``level`` (see the module docstring).

    ``depth``: slices of the query volume; ``k``: look-alike objects (discs levels always 2); ``shapes`` minus
    ``held_out``: classes to draw from; ``same_prob``: chance that all K objects share one class (same-scan levels);
    ``every``: support spacing of ``sparse`` (default random 3-8); ``num_support``: support slices of ``cross``
    (default random 1-3); ``target_shapes``: draw the target's class from these (e.g. the held-out classes at
    evaluation; the other objects then come from the pool minus that class). The target is present on every
    support slice. ``plain`` (discs levels): flat background 0.2, discs 0.8, no texture or noise (the issue's probe).
    """
    name = level_name(level)
    pool = [s for s in shapes if s not in set(held_out)]
    if not pool:
        raise ValueError("no shape class left after held_out")
    rng = np.random.default_rng([int(seed), LEVELS.index(name), size, depth, k])
    task: dict = {"level": name, "support_slices": [], "support_images": None, "support_masks": None}
    if name.startswith("discs"):
        kinds = ["disc", "disc"]
        vol, masks = render_case(rng, kinds, size, depth, moving=False, fixed=name == "discs_fixed",
                                 full_extent=True, scale=(0.1, 0.1))
        if plain:
            vol = np.where(masks.any(0), 0.8, 0.2).astype(np.float32)
        task.update(volume=vol, masks=masks, classes=kinds, target=int(rng.integers(2)), support_slices=[0])
        return task
    first_cls = str(rng.choice(list(target_shapes))) if target_shapes else None
    if name == "cross":
        first_cls = first_cls or str(rng.choice(pool))
        rest = [s for s in pool if s != first_cls]
        if not rest:
            raise ValueError("cross needs at least 2 shape classes")
        kinds = [first_cls] + [str(c) for c in rng.choice(rest, size=min(k - 1, len(rest)), replace=False)]
        return _cross_task(rng, task, kinds, size, depth, num_support, rest)
    kinds = _pick_kinds(rng, pool, k, same_prob)
    if first_cls is not None:
        kinds[0] = first_cls
    full = name in ("adjacent", "far")
    vol, masks = render_case(rng, kinds, size, depth, full_extent=full)
    present = np.stack([_present(m) for m in masks])  # [K, Z]
    target = 0 if first_cls is not None else int(rng.integers(len(kinds)))
    zs = np.flatnonzero(present[target])
    if name == "adjacent":
        support = [int(zs[0])]
    elif name == "far":
        early = zs[zs < max(1, depth // 3)]
        support = [int(early[rng.integers(len(early))]) if len(early) else int(zs[0])]
    else:
        step = int(every or rng.integers(3, 9))
        first = int(zs[0] + rng.integers(0, min(step, len(zs))))
        support = [int(z) for z in range(first, int(zs[-1]) + 1, step) if present[target, z]] or [int(zs[0])]
    task.update(volume=vol, masks=masks, classes=kinds, target=target, support_slices=support)
    return task


def _cross_task(rng: np.random.Generator, task: dict, kinds: list[str], size: int, depth: int,
                num_support: int | None, others: Sequence[str]) -> dict:
    """Query scan with objects of distinct classes, the target first (``kinds[0]``); support from another scan
    whose marked object has the target's class, with 0-2 companions of other classes as clutter."""
    vol, masks = render_case(rng, kinds, size, depth)
    target = 0
    companions = [str(c) for c in rng.choice(others, size=min(len(others), int(rng.integers(0, 3))),
                                             replace=False)]
    s_kinds = [kinds[target]] + companions
    s_vol, s_masks = render_case(rng, s_kinds, size, depth)
    zs = np.flatnonzero(_present(s_masks[0]))
    n = int(num_support or rng.integers(1, 4))
    pick = zs[np.linspace(0, len(zs) - 1, n + 2).round().astype(int)[1:-1]] if len(zs) > n else zs[:n]
    task.update(volume=vol, masks=masks, classes=kinds, target=target,
                support_images=s_vol[pick], support_masks=s_masks[0][pick])
    return task


def as_video(task: dict, gap: int | None = None, stride: int | None = None, seed: int = 0) -> dict:
    """The forward-tracking video of a task: ``frames`` [N, H, W], ``targets`` [K, N, H, W] (every object's masks;
    zeros on other-scan support frames), ``support`` {frame: target mask [H, W]}, ``query`` frame indices to score,
    ``order`` the scan slice of every frame (None for ``cross``, whose first frames come from another scan).

    Same-scan levels: from the first support slice to the end (``far``: the support slice, then slices from
    ``gap`` on with ``stride``, defaults drawn from ``seed``). ``cross``: the support slices, then the whole scan.
    """
    vol, masks, tgt = task["volume"], task["masks"], task["target"]
    if task["support_images"] is not None:
        s = len(task["support_images"])
        frames = np.concatenate([task["support_images"], vol])
        targets = np.concatenate([np.zeros((len(masks), s) + vol.shape[1:], np.uint8), masks], axis=1)
        support = {i: task["support_masks"][i] for i in range(s)}
        return {"frames": frames, "targets": targets, "support": support, "query": list(range(s, len(frames))),
                "order": None}
    if task["level"] == "far":
        rng = np.random.default_rng([seed, 7])
        z0 = task["support_slices"][0]
        g, st = gap or int(rng.integers(2, 6)), stride or int(rng.integers(1, 3))
        order = [z0] + list(range(z0 + g, vol.shape[0], st))
    else:
        order = list(range(task["support_slices"][0], vol.shape[0]))
    support = {i: masks[tgt, z] for i, z in enumerate(order) if z in task["support_slices"]}
    query = [i for i, z in enumerate(order) if z not in task["support_slices"]]
    return {"frames": vol[order], "targets": masks[:, order], "support": support, "query": query, "order": order}
