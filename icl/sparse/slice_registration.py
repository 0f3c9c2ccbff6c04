"""The image-guided fill of a drawing: each drawn mask carried onto the slices between by registering the scan's
*images*, slice by slice (registration-based interpolation: Penney et al., IEEE TMI 2004; Frakes et al. 2008; the
slice-to-slice chaining of greedy's propagation tool, ``greedy_propagation``).

Why: nearest copy, the shape-based interpolation and ITK's contour interpolation read only the drawn shapes; the
image between two drawn slices says where the structure's edges moved. On INIA19 (``bench/real_anatomy.py``) this
fill beats the engine's interpolation by 0.04-0.14 Dice per structure at every 4th to 12th slice.

The rule, per structure ``c`` and undrawn slice ``z`` of its extent (:meth:`Annotation.extent`, the reach rule of
every fill):

* each slice's image is registered to its neighbour's (2D, inside ``c``'s in-plane box), and a drawn mask's signed
  distance map is carried from its slice to ``z`` through the fields of the slices between, one warp per slice
  (registering a drawn slice straight onto a slice 6-12 away was measured worse: 0.871 / 0.837 / 0.731 vs
  0.877 / 0.859 / 0.798 at every 6th / 8th / 12th slice, the same number of registrations);
* between two drawn slices ``a < z < b`` the maps carried up from ``a`` and down from ``b`` are blended by
  distance, ``(1 - t) a + t b`` with ``t = (z - a) / (b - a)`` — the interpolation's own blend;
* beyond the outermost drawn slices (within reach): the nearest drawn mask is carried the same way, and shrinks as
  the interpolation's does there (``TAPER`` of its inscribed radius lost at the end of the reach: measured to help
  at every 6th and 8th slice on INIA19, +0.001 … +0.006).

The fields between neighbours do not depend on which slices are drawn, so the self-check's half of a drawing
(registered in the whole drawing's boxes) reuses the fill's registrations, and the model's prior costs nothing more.

The registration is SimpleITK's fast symmetric forces demons (Vercauteren et al. 2008), chosen by measurement
beside the diffeomorphic demons of the issue, plain demons and greedy 2D (``BENCHMARKS.md``): the same Dice as
diffeomorphic demons at half its time. It runs on a two-level pyramid (``ITERATIONS``, coarse to fine; a small box
keeps fewer levels), on the box's intensities windowed to their own 1-99th percentiles in both slices — a rule
that holds for MR of any contrast and for CT alike, whatever the scan's global range. Independent registrations
run in threads (ITK releases Python's lock), one ITK thread each, on every core this process may use.

Scores are signed distances (positive inside, in voxels) in the structure's box, as the classic fills give, so the
self-check scores this fill as it scores the others (:mod:`icl.sparse.fill`) and ``auto`` chooses per structure.
"""
from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
from scipy.ndimage import map_coordinates

from icl.data.frames import Scan
from icl.progress import progress as progress_bar
from icl.sparse.annotation import Annotation
from icl.sparse.classic import TAPER, Box, BoxedFill, Score
from icl.sparse.jobs import available_cores

ITERATIONS = (15, 3)  # demons iterations per pyramid level, coarse (half resolution) to fine (neighbours differ
# little: (30, 5) gave the same Dice on INIA19 at 1.5 x the time, (20, 0) lost 0.006-0.010)
DEMONS = "FastSymmetricForcesDemonsRegistrationFilter"  # SimpleITK's filter
SMOOTHING = 1.5  # the demons field's Gaussian standard deviation, in pixels of each level
MIN_LEVEL_PIXELS = 16  # a level is kept only while the box keeps this many pixels a side there
PERCENTILES = (1.0, 99.0)  # the box's intensity window, in both slices
BOX_MARGIN = 0.2  # of the structure's larger in-plane side, around its drawn masks (at least MIN_BOX_MARGIN voxels)
MIN_BOX_MARGIN = 8

Job = tuple[int, int, Box]  # (slice, its neighbour, box): one registration, the first's image onto the second's


def pyramid_iterations(shape: tuple[int, int], iterations: tuple[int, ...] = ITERATIONS) -> tuple[int, ...]:
    """The iterations per level for a box of ``shape``: coarse levels whose grid would keep fewer than
    ``MIN_LEVEL_PIXELS`` a side are dropped, keeping the counts of the coarse end (a small box is registered at its
    own resolution with the coarse level's count)."""
    n = len(iterations)
    while n > 1 and min(shape) / 2 ** (n - 1) < MIN_LEVEL_PIXELS:
        n -= 1
    return tuple(iterations[:n])


def _halve(image: np.ndarray) -> np.ndarray:
    """2 x 2 mean (an odd side padded by its edge): the next level of the pyramid."""
    h, w = image.shape
    hh, ww = (h + 1) // 2, (w + 1) // 2
    padded = np.pad(image, ((0, 2 * hh - h), (0, 2 * ww - w)), mode="edge")
    return padded.reshape(hh, 2, ww, 2).mean((1, 3), dtype=np.float32)


def _double(field: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A level's displacement field [2, h, w] on the next finer level's grid (pixel centres: fine ``y`` is coarse
    ``(y - 0.5) / 2``), its displacements doubled."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    where = [(yy - 0.5) / 2, (xx - 0.5) / 2]
    return np.stack([2 * map_coordinates(f, where, order=1, mode="nearest") for f in field]).astype(np.float32)


def _window(fixed: np.ndarray, moving: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Both slices windowed to the pair's own 1-99th percentiles ([0, 1]); None when the box is flat."""
    lo, hi = np.percentile(np.concatenate([fixed.ravel(), moving.ravel()]), PERCENTILES)
    if not hi > lo:
        return None
    scale = np.float32(1.0 / (hi - lo))
    return (np.clip((fixed - lo) * scale, 0, 1).astype(np.float32),
            np.clip((moving - lo) * scale, 0, 1).astype(np.float32))


def register_slices(fixed: np.ndarray, moving: np.ndarray, iterations: tuple[int, ...] = ITERATIONS,
                    demons: str = DEMONS) -> np.ndarray:
    """The displacement field [2, h, w] (dy, dx, in pixels) that takes each pixel of ``fixed`` to its match in
    ``moving``: ``moving`` warped by it looks like ``fixed``. Identity where the box is flat. ``demons``: the
    SimpleITK filter (the benchmark compares the others)."""
    import SimpleITK as sitk  # the registration library: imported where it is used (heavy, like ITK elsewhere)

    field = np.zeros((2, *fixed.shape), np.float32)
    windowed = _window(np.asarray(fixed, np.float32), np.asarray(moving, np.float32))
    if windowed is None:
        return field
    levels = pyramid_iterations(fixed.shape, iterations)
    pyramid = [windowed]
    for _ in levels[1:]:
        pyramid.append((_halve(pyramid[-1][0]), _halve(pyramid[-1][1])))
    current = None
    for count, (f, m) in zip(levels, reversed(pyramid)):  # coarse to fine
        if current is not None:
            current = _double(current, f.shape)
        if count <= 0:
            continue
        level = getattr(sitk, demons)()
        level.SetNumberOfIterations(int(count))
        level.SetStandardDeviations(SMOOTHING)
        level.SetNumberOfThreads(1)  # parallel across registrations instead (small images: threads would wait)
        args = [sitk.GetImageFromArray(f), sitk.GetImageFromArray(m)]
        if current is not None:  # ITK's vector components are (x, y)
            args.append(sitk.GetImageFromArray(np.stack([current[1], current[0]], -1).astype(np.float64),
                                               isVector=True))
        xy = sitk.GetArrayFromImage(level.Execute(*args))
        current = np.stack([xy[..., 1], xy[..., 0]]).astype(np.float32)
    return field if current is None else current


def warp(values: np.ndarray, field: np.ndarray) -> np.ndarray:
    """``values`` (on the moving slice's box) carried onto the fixed slice's box by ``field`` (linear)."""
    h, w = values.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return map_coordinates(values, [yy + field[0], xx + field[1]], order=1, mode="nearest").astype(np.float32)


class SliceFields:
    """The registrations between slices of one scan, each computed once: ``fields[(k, j, box)]`` registers slice
    ``k``'s image to slice ``j``'s inside ``box``. ``image_zhw``: the scan's voxels, slice axis first."""

    def __init__(self, image_zhw: np.ndarray, workers: int | None = None, progress: bool = False,
                 register: Callable[[np.ndarray, np.ndarray], np.ndarray] = register_slices):
        """``progress``: a bar over each batch of registrations (a terminal bar, or lines in a log). ``register``:
        ``(fixed, moving) -> field`` (``bench/slice_registration.py`` compares other libraries and settings)."""
        self.image, self.progress, self.register = image_zhw, progress, register
        self.workers = max(1, int(workers or available_cores()))
        self.fields: dict[Job, np.ndarray] = {}

    def _register(self, job: Job) -> np.ndarray:
        k, j, (y0, y1, x0, x1) = job
        return self.register(self.image[j, y0:y1, x0:x1], self.image[k, y0:y1, x0:x1])

    def compute(self, jobs: Iterable[Job], desc: str = "register slices") -> None:
        """Register every job not done yet, in ``workers`` threads, with a progress bar over them."""
        todo = sorted(set(jobs) - set(self.fields))
        if not todo:
            return
        bar = progress_bar(total=len(todo), desc=desc, unit="pair", enabled=self.progress)
        pool = ThreadPoolExecutor(min(self.workers, len(todo)))
        try:
            running = {pool.submit(self._register, job): job for job in todo}
            for future in as_completed(running):
                self.fields[running[future]] = future.result()
                bar.update()  # may raise (a viewer's Cancel): the pool drops what has not started
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()

    def __getitem__(self, job: Job) -> np.ndarray:
        if job not in self.fields:
            self.compute([job])
        return self.fields[job]


def scan_fields(scan: Scan, slice_axis: int, progress: bool = False) -> SliceFields:
    """The registrations between ``scan``'s slices along ``slice_axis`` (canonical order, as the annotation reads
    it): its voxels as stored, non-finite ones replaced by the engine's NaN rule (each box is windowed on its own)."""
    image = scan.fix_nonfinite(np.array(scan.canonical, dtype=np.float32))
    return SliceFields(np.moveaxis(image, slice_axis, 0), progress=progress)


class RegistrationFill(BoxedFill):
    """The image-guided fill of one annotation (module docstring): :meth:`score` gives structure ``c``'s signed
    score on slice ``z``, as :class:`~icl.sparse.classic.ClassicFill` does. :meth:`prepare` registers what a set of
    slices needs at once (in parallel, with a progress bar); :meth:`score` registers what is still missing."""

    def __init__(self, annotation: Annotation, fields: SliceFields, boxes: Mapping[int, Box | None] | None = None):
        """``boxes``: each structure's registration box (default: :func:`registration_box` of ``annotation``); the
        self-check hands those of the whole drawing to its half of it, so that its registrations serve the fill."""
        super().__init__(annotation, boxes if boxes is not None else {c: registration_box(annotation, c)
                                                                      for c in annotation.classes})
        self.fields = fields
        self._chain: dict[tuple[int, int, int], np.ndarray] = {}  # (c, drawn slice, slice) -> the map carried there

    def sources(self, c: int, z: int) -> list[int]:
        """The drawn slices carried onto ``z`` for ``c``: the two around it, or the nearest beyond the outermost;
        none where ``z`` is drawn or outside ``c``'s extent."""
        extent, drawn = self._extents.get(c), self.annotation.slices.get(c, [])
        if extent is None or not extent[0] <= z <= extent[1]:
            return []
        i = bisect.bisect_left(drawn, z)
        if i < len(drawn) and drawn[i] == z:
            return []
        return [drawn[j] for j in (i - 1, i) if 0 <= j < len(drawn)]

    def jobs(self, wanted: Mapping[int, Iterable[int] | None] | None = None) -> set[Job]:
        """The registrations :meth:`score` needs for ``wanted`` (``{c: slices}``, ``{c: None}`` for every slice of
        ``c``'s extent; None: every structure, every slice): each neighbour pair from a source to the slice."""
        out: set[Job] = set()
        for c in self.annotation.classes if wanted is None else wanted:
            extent = self._extents.get(c)
            if extent is None:
                continue
            zs = wanted.get(c) if wanted is not None else None
            zs = range(extent[0], extent[1] + 1) if zs is None else zs
            box = self._boxes[c]
            for z in zs:
                for a in self.sources(c, z):
                    step = 1 if a < z else -1
                    out.update((k - step, k, box) for k in range(a + step, z + step, step))
        return out

    def prepare(self, wanted: Mapping[int, Iterable[int] | None] | None = None) -> None:
        self.fields.compute(self.jobs(wanted))

    def _carried(self, c: int, a: int, z: int) -> np.ndarray:
        """Drawn slice ``a``'s signed distance map carried to ``z`` through the fields of every slice between (each
        step kept: the next slice of the fill starts from it)."""
        step, box = (1 if a < z else -1), self._boxes[c]
        k, values = z, None
        while k != a and (values := self._chain.get((c, a, k))) is None:
            k -= step
        if values is None:
            values = self._distance(c, a)
        while k != z:
            k += step
            values = warp(values, self.fields[(k - step, k, box)])
            self._chain[(c, a, k)] = values
        return values

    def score(self, c: int, z: int) -> Score | None:
        """Structure ``c`` on slice ``z`` (None where this fill says it is absent)."""
        extent = self._extents.get(c)
        if extent is None or not extent[0] <= z <= extent[1]:
            return None
        box = self._boxes[c]
        if z in self.annotation.slices[c]:
            return box, self._distance(c, z)
        sources = self.sources(c, z)
        carried = [self._carried(c, a, z) for a in sources]
        if len(carried) == 2:
            t = (z - sources[0]) / (sources[1] - sources[0])
            return box, (1 - t) * carried[0] + t * carried[1]
        sdf = carried[0]
        reach = self.annotation.reach(c) or 0
        return box, sdf - TAPER * abs(z - sources[0]) / (reach + 1) * max(float(sdf.max()), 0.0)


def registration_box(annotation: Annotation, c: int) -> Box | None:
    """``c``'s in-plane box over its drawn masks, widened by ``BOX_MARGIN`` of its larger side (at least
    ``MIN_BOX_MARGIN`` voxels): room for the edges to move, and image context around them to register."""
    tight = annotation.box(c, 0)
    if tight is None:
        return None
    side = max(tight[1] - tight[0], tight[3] - tight[2])
    return annotation.box(c, max(MIN_BOX_MARGIN, int(round(BOX_MARGIN * side))))

