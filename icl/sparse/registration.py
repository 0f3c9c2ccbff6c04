"""Support from another scan: each support scan registered to the query, its labels carried onto the query's grid.

Why registration: a labelled scan of another patient is useless to copy as it is (INIA19 cross-case: 0.34) and the
model alone does not read it (0.04); registering it gives 0.87-0.91. The library was chosen by measurement
(``bench/cross_scan.py``): ITK-SNAP's greedy (``picsl-greedy``, Apache-2.0) — affine (12 dof), then deformable,
both with normalised mutual information, so support and query may differ in contrast.

* Geometry is physical: each scan's canonical (RAS) voxels and affine become a SimpleITK image (LPS world), so an
  LPS, oblique or differently spaced file registers as its RAS twin; working in the closest-canonical voxel order
  makes an LPS copy of a scan *exactly* the RAS one to greedy.
* Intensities are windowed to the scan's 0.5-99.5 percentiles (icl.data.frames), so outliers do not squeeze the
  mutual information's histogram.
* Labels are carried per structure: each one-hot map resampled linearly, then the most probable label wins
  (measured better than nearest neighbour: +0.002 ... +0.014). Background is what the structures leave,
  ``1 - sum``, so several supports fuse by summing (a soft majority vote).
"""
from __future__ import annotations

import ctypes
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, TextIO, Union

import numpy as np
import SimpleITK as sitk
from nibabel.orientations import inv_ornt_aff
from picsl_greedy import Greedy3D
from scipy.ndimage import map_coordinates

from icl.data.frames import Scan, mr_percentiles, window01
from icl.data.validate import check_grid, check_integer_labels
from icl.errors import InputError

ScanLike = Union[Scan, str, Path, tuple]  # a Scan, a NIfTI path, or (array, 4x4 affine)
AFFINE_ITERATIONS = (100, 50, 10)  # greedy's -n per level, coarse to fine (4x, 2x, 1x)
DEFORMABLE_ITERATIONS = (100, 50, 10)
SEED = 1  # greedy's random generator (its default, 0, is stochastic: the same inputs gave other labels)
CARRY_VOXELS = 2**26  # voxels of one-hot maps resliced per greedy call (each call composes the warp anew, ~0.8 s
# at 168x206x128: all ten INIA19 maps in one call 3.4 s, three one by one 2.7 s), bounding the memory of a call
MIN_COARSE_VOXELS = 16  # the coarsest pyramid level keeps this many voxels a side (fewer: the affine was seen to fail)
ORTHONORMAL_TOL = 1e-4  # an affine's axes may deviate this much from orthogonal (rounding in headers)
LPS = np.diag([-1.0, -1.0, 1.0])  # NIfTI world (RAS) -> ITK world (LPS)


# ------------------------------------------------------------------------------------------------ inputs
def as_scan(x: ScanLike, what: str) -> Scan:
    """A scan from a Scan, a NIfTI path, or an (array, affine) pair; ``what`` names an array in errors."""
    if isinstance(x, Scan):
        return x
    if isinstance(x, (str, Path)):
        return Scan.open(x)
    if isinstance(x, tuple) and len(x) == 2:
        arr, affine = x
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise InputError(f"<{what}>", f"affine of shape {affine.shape}, expected 4x4")
        return Scan.from_array(np.asarray(arr), affine, path=f"<{what}>")
    raise InputError(f"<{what}>", f"expected a Scan, a NIfTI path or (array, affine), got {type(x).__name__}")


def check_classes(classes: Sequence[int]) -> list[int]:
    """Structure label values: distinct positive integers (0 is the background)."""
    out = [int(c) for c in classes]
    if not out or min(out) <= 0 or len(set(out)) != len(out) or any(c != o for c, o in zip(out, classes)):
        raise InputError("classes", f"expected distinct positive integer label values, got {list(classes)}")
    return out


def support_labels(support: Scan, label: Scan, classes: list[int]) -> np.ndarray:
    """The support's label voxels in canonical order, checked: on the support's grid, integers, some class present."""
    check_grid(support.canonical_shape, canonical_affine(support), label.canonical_shape, canonical_affine(label),
               label.path)  # the same grid in space, whatever each file's voxel order
    arr = np.asarray(label.canonical)
    check_integer_labels(arr, label.path)
    if not np.isin(arr, classes).any():
        raise InputError(label.path, f"holds none of the structures {classes}: nothing to carry over")
    return arr


def image01(scan: Scan) -> np.ndarray:
    """The scan's canonical voxels, float32, windowed to its 0.5-99.5 percentiles (non-finite voxels replaced)."""
    lo, hi = scan.finite_range
    if lo == hi:
        raise InputError(scan.path, f"the image is constant ({lo:g}): nothing to register")
    p_lo, p_hi = mr_percentiles(scan)
    return window01(scan.fix_nonfinite(np.array(scan.canonical, dtype=np.float32)), p_lo, p_hi)


# ------------------------------------------------------------------------------------------------ geometry
def canonical_affine(scan: Scan) -> np.ndarray:
    """The affine of the scan's canonical voxel order (the same world, the axes permuted/flipped)."""
    return scan.affine @ inv_ornt_aff(scan.ornt, scan.shape)


def to_sitk(arr: np.ndarray, affine: np.ndarray, where: str | Path) -> sitk.Image:
    """A voxel array ``[i, j, k]`` with its NIfTI (RAS) affine as a SimpleITK image in ITK's LPS world."""
    m = LPS @ np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    if (spacing <= 0).any():
        raise InputError(where, "the affine has a zero-length voxel axis")
    direction = m / spacing
    u, _, vt = np.linalg.svd(direction)
    if np.abs(direction.T @ direction - np.eye(3)).max() > ORTHONORMAL_TOL:
        raise InputError(where, "the affine is sheared: registration needs orthogonal voxel axes")
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(arr, dtype=np.float32).transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(d) for d in (u @ vt).ravel()])  # the nearest rotation: ITK wants it exact
    image.SetOrigin([float(o) for o in LPS @ np.asarray(affine, dtype=np.float64)[:3, 3]])
    return image


def from_sitk(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


# ------------------------------------------------------------------------------------------------ greedy
@contextmanager
def greedy_log() -> Iterator[TextIO]:
    """A temp text file for greedy's chatter (its optimiser prints progress): given to ``execute`` as ``out`` and
    ``err`` (whose defaults are the sys.stdout of import time), and file descriptor 1 sent there too for what its
    C++ prints directly. Process-wide: do not print from other threads meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile("w+") as log:
        os.dup2(log.fileno(), 1)
        try:
            yield log
        finally:
            log.flush()
            ctypes.CDLL(None).fflush(None)  # C stdio's buffer goes to the log, not to the restored stdout
            os.dup2(saved, 1)
            os.close(saved)


def last_line(log: TextIO) -> str:
    log.seek(0)
    lines = [line.strip() for line in log.read().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def pyramid(iterations: Sequence[int], shape: Sequence[int]) -> str:
    """Greedy's ``-n`` (iterations per level, coarse to fine, each level half the previous' voxel size): a small
    image gets fewer levels, so that its coarsest grid keeps MIN_COARSE_VOXELS a side; they keep the counts of the
    coarse end (at 32 voxels, 4x-2x-1x lost the affine where 2x-1x with 100x50 found it)."""
    n = len(iterations)
    while n > 1 and min(shape) / 2 ** (n - 1) < MIN_COARSE_VOXELS:
        n -= 1
    return "x".join(str(int(i)) for i in iterations[:n])


@dataclass
class Registration:
    """One support registered to the query: greedy's transforms (warp, then affine), ready to carry maps."""
    greedy: Greedy3D
    chain: str  # greedy's -r argument: "warp aff" or "aff"
    fixed_shape: tuple[int, int, int]
    threads: int
    where: str

    def run(self, command: str, **images) -> None:
        with greedy_log() as log:
            try:
                self.greedy.execute(f"-threads {self.threads} -seed {SEED} -d 3 {command}", out=log, err=log, **images)
            except RuntimeError as e:
                raise InputError(self.where, f"registration failed: {e} ({last_line(log)})") from None

    def carry(self, maps: list[np.ndarray], affine: np.ndarray) -> list[np.ndarray]:
        """Maps on the support's canonical grid (``affine``) → float32 maps on the query's canonical grid (linear)."""
        names = {f"map{i}": to_sitk(m, affine, self.where) for i, m in enumerate(maps)}
        outs = {f"out{i}": None for i in range(len(maps))}
        pairs = " ".join(f"-rm map{i} out{i}" for i in range(len(maps)))
        self.run(f"-rf fixed -ri LINEAR {pairs} -r {self.chain}", **names, **outs)
        return [from_sitk(self.greedy[f"out{i}"]) for i in range(len(maps))]

    def save_inverse(self, prefix: str) -> tuple[str, str | None]:
        """This registration's inverse as files greedy reads (``-r MATRIX,-1 WARP``): its affine matrix and, if
        deformable, the warp's inverse (:func:`inverse_warp`); to carry maps from the query back onto the support."""
        matrix = f"{prefix}_affine.mat"
        np.savetxt(matrix, np.asarray(self.greedy["aff"], dtype=np.float64))
        if self.chain == "aff":
            return matrix, None
        warp = f"{prefix}_inverse_warp.nii"
        sitk.WriteImage(inverse_warp(self.greedy["warp"]), warp)
        return matrix, warp


def inverse_warp(warp: sitk.Image) -> sitk.Image:
    """The inverse of a greedy warp (a displacement field on the fixed grid, in physical units) by one fixed-point
    step, v(x) = -u(x - u(x)). Measured on INIA19 (a 3.5-voxel warp): labels carried back through it score 0.835,
    through greedy's own inversion (``-iw``) 0.833, through -u alone 0.819; it costs a tenth of ``-iw``'s time."""
    u = sitk.GetArrayFromImage(warp).astype(np.float32)  # [z, y, x, 3]: ITK's array order, components x, y, z
    to_index = np.linalg.inv(np.array(warp.GetDirection()).reshape(3, 3) * np.array(warp.GetSpacing()))
    step = (u @ to_index.T.astype(np.float32))[..., ::-1]  # -u in voxels, components z, y, x
    at = np.indices(u.shape[:3], dtype=np.float32) - np.moveaxis(step, -1, 0)
    v = -np.stack([map_coordinates(u[..., k], at, order=1, mode="nearest") for k in range(3)], axis=-1)
    out = sitk.GetImageFromArray(v, isVector=True)
    out.CopyInformation(warp)
    return out


def carry_back(maps: Sequence[np.ndarray], affine: np.ndarray, onto: "Prepared", inverse: tuple[str, str | None],
               threads: int = 1) -> list[np.ndarray]:
    """Maps on the query's canonical grid (``affine``) carried onto a support's grid (``onto``) through the inverse
    of that support's registration to the query (:meth:`Registration.save_inverse`), linearly."""
    matrix, warp = inverse
    back = Registration(Greedy3D(), f"{matrix},-1" + (f" {warp}" if warp else ""), onto.shape, threads, onto.where)
    names = {f"map{i}": to_sitk(m, affine, onto.where) for i, m in enumerate(maps)}
    outs = {f"out{i}": None for i in range(len(maps))}
    pairs = " ".join(f"-rm map{i} out{i}" for i in range(len(maps)))
    back.run(f"-rf ref -ri LINEAR {pairs} -r {back.chain}", ref=to_sitk(onto.image, onto.affine, onto.where),
             **names, **outs)
    return [from_sitk(back.greedy[f"out{i}"]) for i in range(len(maps))]


@dataclass
class Prepared:
    """What registration needs of a scan, computed once (a cohort prepares its supports once for all its queries):
    its canonical voxels windowed (:func:`image01`), the affine of that voxel order, for a support its canonical
    label voxels and, to carry its image (the model's memory), its own intensities."""
    where: str
    image: np.ndarray
    affine: np.ndarray
    labels: np.ndarray | None = None
    raw: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.image.shape)


def prepare(scan: Scan, labels: np.ndarray | None = None, raw: bool = False) -> Prepared:
    """``scan`` ready to register (``labels``: its checked canonical label voxels, :func:`support_labels`;
    ``raw``: keep its intensities, non-finite voxels replaced, to carry the image itself)."""
    image = scan.fix_nonfinite(np.array(scan.canonical, dtype=np.float32)) if raw else None
    return Prepared(str(scan.path), image01(scan), canonical_affine(scan), labels, image)


def register(query: Scan | Prepared, support: Scan | Prepared, deformable: bool = True, threads: int = 1,
             deformable_iterations: Sequence[int] = DEFORMABLE_ITERATIONS) -> Registration:
    """The support (moving) registered to the query (fixed): affine by NMI from the images' centres, then (if
    ``deformable``) greedy's deformable registration by NMI with its default smoothing."""
    if threads < 1:
        raise InputError("threads", f"must be >= 1, got {threads}")
    if not deformable_iterations or min(deformable_iterations) < 0:
        raise InputError("deformable_iterations", f"expected iterations per level, got {deformable_iterations}")
    query = query if isinstance(query, Prepared) else prepare(query)
    support = support if isinstance(support, Prepared) else prepare(support)
    fixed = to_sitk(query.image, query.affine, query.where)
    moving = to_sitk(support.image, support.affine, support.where)
    reg = Registration(Greedy3D(), "aff", query.shape, int(threads), support.where)
    levels = pyramid(AFFINE_ITERATIONS, query.shape)
    reg.run(f"-i fixed moving -a -dof 12 -ia-image-centers -m NMI -n {levels} -o aff",
            fixed=fixed, moving=moving, aff=None)
    if deformable:
        levels = pyramid(deformable_iterations, query.shape)
        reg.run(f"-i fixed moving -it aff -m NMI -n {levels} -o warp", warp=None)
        reg.chain = "warp aff"
    return reg


# ------------------------------------------------------------------------------------------------ labels
def carried_probabilities(reg: Registration, label: np.ndarray, affine: np.ndarray,
                          classes: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    """(class, probability on the query's canonical grid) for each class, as many maps per greedy call as fit."""
    per_call = max(1, CARRY_VOXELS // max(label.size, int(np.prod(reg.fixed_shape))))
    for start in range(0, len(classes), per_call):
        chunk = classes[start:start + per_call]
        yield from zip(chunk, reg.carry([(label == c).astype(np.float32) for c in chunk], affine))


def most_probable(summed: dict[int, np.ndarray], n: float, probabilities: bool = False) -> np.ndarray:
    """Per-structure probabilities summed over ``n`` supports -> the label map (background what they leave; ties
    keep the earlier label), or ``[1 + C, ...]`` probabilities, background first."""
    background = np.float32(n) - sum(summed.values())
    if probabilities:
        return np.stack([background, *summed.values()]) / np.float32(n)
    classes = list(summed)
    best = np.zeros(background.shape, np.int64)  # index into (0, *classes)
    top = background  # the background first, as argmax would
    for i, c in enumerate(classes, start=1):
        win = summed[c] > top
        best[win], top = i, np.where(win, summed[c], top)
    return np.array([0, *classes], dtype=np.int32)[best]
