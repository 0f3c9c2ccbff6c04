"""In-context tasks on generated anatomy (``icl.data.anatomy``): 1-3 marked structures among 10-60 that touch.

Why: with dozens of structures in a scan, nothing in the image says which one to segment; only the support does.
The first target is often one with a look-alike neighbour (a touching structure of nearly the same intensity), so
following edges alone leaks. Levels (names in the ``-tasks`` vocabulary):

* ``anat_sparse``   the scan annotated every ``every`` (2-10) slices, tracked both ways, in one of two styles:
  ``per_structure``: each structure prompted only on its own annotated slices, every ``every`` slices within its
  own extent (other slices say nothing about it); ``complete``: every annotated slice annotated for all targets
  (a target absent there gets an empty mask: "annotated, not here", which ends it);
* ``anat_adjacent`` support on one slice, the following slices tracked forward;
* ``anat_far``      support on one slice, queries from 2-5 slices away, every 1-2 slices;
* ``anat_cross``    support slices from the other patient of a cross-case pair (same anatomy, its own deformation
  and contrast, optionally mirrored), then the whole query scan, forward.

A task is a plain dict in the propagation rule's terms (``icl.engine.train.tasks.task_from_anatomy`` makes it a Task):
``frames`` float32 [N, H, W], ``prompts`` {object: {frame: uint8 mask}}, ``direction``, ``targets`` uint8
[K, N, H, W], ``scored`` frames, ``distractors`` uint8 [J, N, H, W] (the targets' most similar touching neighbours,
what "others" is scored against), ``structures`` (the targets' ids), ``style``, ``every``, ``level``, ``slices``
((scan, slice) of every frame: scan 0 the query, 1 the cross-case support).
"""
from __future__ import annotations

import numpy as np

from icl.data.anatomy import make_template, patient
from icl.data.anatomy_image import render
from icl.data.vocabulary import ANATOMY_LEVELS, GENERATOR_PARTS

STYLES = ("per_structure", "complete")
MIN_VOXELS = 4  # a target has at least this many voxels on a slice where it counts as present
LOOKALIKE_PROB = 0.6  # chance that the first target is drawn among structures with a weak-contrast neighbour
WEAK_CONTRAST = 0.08  # |mean difference| (image units) below which two touching structures count as look-alikes


# ------------------------------------------------------------------------------------------------ scan statistics
def slice_areas(labels: np.ndarray, num: int) -> np.ndarray:
    """Voxels of every id on every slice: [Z, num + 1]."""
    depth = labels.shape[0]
    flat = labels.reshape(depth, -1).astype(np.int64) + (num + 1) * np.arange(depth)[:, None]
    return np.bincount(flat.ravel(), minlength=depth * (num + 1)).reshape(depth, num + 1)


def contiguous_in_z(areas: np.ndarray) -> np.ndarray:
    """[num + 1] bool: the slices showing the id (any voxel) form one run. Why: a sparse annotation says a structure
    ended where an annotated slice lacks it, and the propagation rule stops it there; a structure that comes back
    later would be present where nothing can track it."""
    shown = areas > 0
    count = shown.sum(0)
    first = shown.argmax(0)
    last = len(shown) - 1 - shown[::-1].argmax(0)
    return (count > 0) & (last - first + 1 == count)


def touching_pairs(labels: np.ndarray) -> np.ndarray:
    """Pairs (a, b), a < b, of ids that touch in-plane somewhere: [P, 2]."""
    pairs = []
    for a, b in ((labels[:, 1:], labels[:, :-1]), (labels[:, :, 1:], labels[:, :, :-1])):
        differ = a != b
        pairs.append(np.stack([np.minimum(a[differ], b[differ]), np.maximum(a[differ], b[differ])], 1))
    return np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), int)


def mean_intensity(image: np.ndarray, labels: np.ndarray, num: int) -> np.ndarray:
    """The image's mean inside every id: [num + 1] (NaN for an id not in the scan)."""
    counts = np.bincount(labels.ravel(), minlength=num + 1)
    sums = np.bincount(labels.ravel(), weights=image.ravel(), minlength=num + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


def _neighbours(pairs: np.ndarray, means: np.ndarray, target: int) -> list[tuple[float, int]]:
    """(contrast, id) of the structures touching ``target``, most similar first (background excluded)."""
    rows = pairs[(pairs == target).any(1)]
    other = np.where(rows[:, 0] == target, rows[:, 1], rows[:, 0])
    return sorted((float(abs(means[o] - means[target])), int(o)) for o in other if o > 0)


def _choose_targets(rng: np.random.Generator, candidates: np.ndarray, pairs: np.ndarray, means: np.ndarray,
                    k: int) -> list[int]:
    """1-``k`` targets among ``candidates``; the first is a look-alike's neighbour with probability LOOKALIKE_PROB."""
    pool = [int(c) for c in candidates]
    similar = [c for c in pool if any(d < WEAK_CONTRAST for d, _ in _neighbours(pairs, means, c))]
    first = similar if similar and rng.random() < LOOKALIKE_PROB else pool
    targets = [int(rng.choice(first))]
    rest = [c for c in pool if c != targets[0]]
    extra = min(k - 1, len(rest))
    if extra > 0:
        targets += [int(c) for c in rng.choice(rest, size=extra, replace=False)]
    return targets


def _distractors(pairs: np.ndarray, means: np.ndarray, targets: list[int], per_target: int = 2) -> list[int]:
    out: list[int] = []
    for t in targets:
        out += [o for _, o in _neighbours(pairs, means, t) if o not in targets and o not in out][:per_target]
    return out


# ------------------------------------------------------------------------------------------------ tasks
def _scan(rng: np.random.Generator, size: int, depth: int, structures: int | None, pair: bool,
          drop: frozenset = frozenset()):
    template = make_template(rng, size, depth, structures, extras="extras" not in drop)
    scans = []
    for i in range(2 if pair else 1):
        labels = patient(rng, template, depth, mirror=bool(i == 1 and rng.random() < 0.5),
                         strength=0.0 if "deformation" in drop else 1.0)
        if rng.random() < 0.5:  # tracked up or down the scan alike
            labels = np.ascontiguousarray(labels[::-1])
        scans.append((labels, render(rng, labels, template.kinds, drop=drop)[0]))
    return template, scans


def _masks(labels: np.ndarray, ids: list[int]) -> np.ndarray:
    return np.stack([labels == i for i in ids]).astype(np.uint8) if ids else \
        np.zeros((0, *labels.shape), np.uint8)


def make_anatomy_task(seed: int, level: str = "anat_sparse", size: int = 128, depth: int = 12, k: int | None = None,
                      style: str | None = None, every: int | None = None, num_support: int | None = None,
                      structures: int | None = None, drop: frozenset | set = frozenset()) -> dict:
    """One seeded anatomy task of ``level`` (module docstring); same arguments -> same arrays.

    ``k``: targets (default random 1-3); ``style``/``every``: the sparse annotation (defaults random);
    ``num_support``: cross-case support slices (default random 1-3); ``structures``: ids in the template;
    ``drop``: parts of :data:`GENERATOR_PARTS` left out (an ablation)."""
    if level not in ANATOMY_LEVELS:
        raise ValueError(f"unknown anatomy level {level!r}; choose from {', '.join(ANATOMY_LEVELS)}")
    drop = frozenset(drop)
    if drop - set(GENERATOR_PARTS):
        raise ValueError(f"unknown generator parts {sorted(drop - set(GENERATOR_PARTS))}; "
                         f"choose from {', '.join(GENERATOR_PARTS)}")
    rng = np.random.default_rng([int(seed), ANATOMY_LEVELS.index(level), size, depth, 29])
    for _ in range(20):  # a draw without a usable target (rare: tiny slabs) is drawn again
        task = _attempt(rng, level, size, depth, int(k or rng.integers(1, 4)), style, every, num_support, structures,
                        drop)
        if task is not None:
            return task
    raise RuntimeError(f"no usable {level} task for seed {seed} at {size}px x {depth} slices")


def _attempt(rng, level, size, depth, k, style, every, num_support, structures, drop) -> dict | None:
    template, scans = _scan(rng, size, depth, structures, level == "anat_cross", drop)
    return task_from_scans(rng, level, scans, template.num, k, style, every, num_support)


def task_from_scans(rng: np.random.Generator, level: str, scans: list[tuple[np.ndarray, np.ndarray]], num: int,
                    k: int, style: str | None = None, every: int | None = None,
                    num_support: int | None = None) -> dict | None:
    """One task of ``level`` (an ``anat_*`` name) on given slabs: ``scans`` = [(labels [Z, H, W] ids 0..``num``,
    image [Z, H, W])], a second (support) slab for ``anat_cross``. None when the slab has no usable target.

    Why public: real labelled volumes (``icl.data.real_tasks``) cut slabs of their own and make their tasks here,
    so generated and real anatomy are the same kinds of task."""
    labels, image = scans[0]
    depth = labels.shape[0]
    areas = slice_areas(labels, num)
    present = areas >= MIN_VOXELS  # [Z, num + 1]
    pairs = touching_pairs(labels)
    means = mean_intensity(image, labels, num)
    base = {"level": level, "style": None, "every": None}
    if level == "anat_cross":
        return _cross(rng, scans, num, present, pairs, means, k, num_support, base)
    if level == "anat_sparse":
        return _sparse(rng, labels, image, present, contiguous_in_z(areas), pairs, means, k, style, every, base)
    return _forward(rng, level, labels, image, depth, present, pairs, means, k, base)


def _forward(rng, level, labels, image, depth, present, pairs, means, k, base) -> dict | None:
    """``anat_adjacent`` / ``anat_far``: support on one slice, later slices tracked forward."""
    candidates = np.flatnonzero(present.sum(0) >= 3)
    candidates = candidates[candidates > 0]
    if not len(candidates):
        return None
    targets = _choose_targets(rng, candidates, pairs, means, k)
    together = np.flatnonzero(present[:, targets].all(1))
    if not len(together) or together[0] > depth - 3:  # one support slice must show every target
        targets = targets[:1]
        together = np.flatnonzero(present[:, targets[0]])
    z0 = int(together[0]) if level == "anat_adjacent" else int(together[rng.integers(min(len(together), 3))])
    if level == "anat_adjacent":
        order = list(range(z0, depth))
    else:
        gap, stride = int(rng.integers(2, 6)), int(rng.integers(1, 3))
        order = [z0] + list(range(z0 + gap, depth, stride))
    if len(order) < 2:
        return None
    masks = _masks(labels[order], targets)
    prompts = {j: {0: masks[j, 0]} for j in range(len(targets))}
    return {**base, "frames": image[order], "prompts": prompts, "direction": "forward", "targets": masks,
            "scored": list(range(1, len(order))), "distractors": _masks(labels[order],
                                                                        _distractors(pairs, means, targets)),
            "structures": targets, "slices": [(0, z) for z in order]}


def _sparse(rng, labels, image, present, one_run, pairs, means, k, style, every, base) -> dict | None:
    depth = labels.shape[0]
    style = style or str(rng.choice(STYLES))
    step = int(every or rng.integers(2, min(10, depth - 2) + 1))
    if style == "complete":
        annotated = list(range(int(rng.integers(0, step)), depth, step))
        free = [z for z in range(depth) if z not in annotated]
        # a target must show on an annotated slice (else nothing marks it) and on a slice to fill
        ok = present[annotated].any(0) & present[free].any(0) & one_run
        candidates = np.flatnonzero(ok[1:]) + 1
        if not len(candidates) or not free:
            return None
        targets = _choose_targets(rng, candidates, pairs, means, k)
        masks = _masks(labels, targets)
        prompts = {j: {z: masks[j, z] for z in annotated} for j in range(len(targets))}
        scored = free
    else:
        candidates = np.flatnonzero((present.sum(0) >= 2)[1:] & one_run[1:]) + 1
        if not len(candidates):
            return None
        targets = _choose_targets(rng, candidates, pairs, means, k)
        masks = _masks(labels, targets)
        prompts = {}
        for j in range(len(targets)):
            zs = np.flatnonzero(masks[j].reshape(depth, -1).any(1))  # its extent: every slice showing it
            first = int(zs[0] + rng.integers(0, min(step, len(zs))))
            prompts[j] = {z: masks[j, z] for z in range(first, int(zs[-1]) + 1, step)}
        scored = [z for z in range(depth) if not any(z in p for p in prompts.values())]
        if len(scored) < max(2, depth // 3):  # the targets' own slices cover the scan: keep the first target only
            targets, masks, prompts = targets[:1], masks[:1], {0: prompts[0]}
            scored = [z for z in range(depth) if z not in prompts[0]]
    if not any(m.any() for m in prompts[0].values()) or not scored:
        return None
    return {**base, "style": style, "every": step, "frames": image, "prompts": prompts, "direction": "both",
            "targets": masks, "scored": scored, "distractors": _masks(labels, _distractors(pairs, means, targets)),
            "structures": targets, "slices": [(0, z) for z in range(depth)]}


def _cross(rng, scans, num, present, pairs, means, k, num_support, base) -> dict | None:
    (labels, image), (s_labels, s_image) = scans
    s_present = slice_areas(s_labels, num) >= MIN_VOXELS
    both = np.flatnonzero(present.any(0) & (s_present.sum(0) >= 1))
    both = both[both > 0]
    if not len(both):
        return None
    targets = _choose_targets(rng, both, pairs, means, k)
    zs = np.flatnonzero(s_present[:, targets[0]])
    n = int(num_support or rng.integers(1, 4))
    pick = zs[np.linspace(0, len(zs) - 1, n + 2).round().astype(int)[1:-1]] if len(zs) > n else zs[:n]
    s_masks = _masks(s_labels[pick], targets)
    keep = [j for j in range(len(targets)) if s_masks[j].any()]  # a target its support slices never show is dropped
    targets, s_masks = [targets[j] for j in keep], s_masks[keep]
    s = len(pick)
    masks = _masks(labels, targets)
    targets_all = np.concatenate([np.zeros((len(targets), s, *labels.shape[1:]), np.uint8), masks], axis=1)
    others = _masks(labels, _distractors(pairs, means, targets))
    distractors = np.concatenate([np.zeros((len(others), s, *labels.shape[1:]), np.uint8), others], axis=1)
    prompts = {j: {i: s_masks[j, i] for i in range(s)} for j in range(len(targets))}
    return {**base, "frames": np.concatenate([s_image[pick], image]), "prompts": prompts, "direction": "forward",
            "targets": targets_all, "scored": list(range(s, s + len(image))), "distractors": distractors,
            "structures": targets, "slices": [(1, int(z)) for z in pick] + [(0, z) for z in range(len(image))]}
