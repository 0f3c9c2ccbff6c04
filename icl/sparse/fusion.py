"""Several labelled supports registered to one query and fused: each registration a job of its own, run in parallel
processes (:mod:`icl.sparse.jobs`), the structures' probabilities summed on the query's grid (a soft majority vote).

* Query-independent work is done once per set of supports (:class:`SupportSet`: images windowed, labels checked),
  so every query of a cohort reuses it.
* A job registers one support to the query and carries its structures (``icl.sparse.registration``); it hands back
  each structure's probabilities cropped to where they are not zero (:class:`Sparse`: a few MB instead of the whole
  grid per structure). The parent sums them in the supports' order — the same floats as one process adding full
  maps (outside a crop the map is exactly 0) — so parallel runs give the serial labels, bit for bit.
* The same registrations give the cheap leave-one-out check (``check=True``, used by ``icl.sparse.cross_check``):
  for each support, the other supports' fused probabilities on the query carried back onto it through the inverse of
  its own registration (support j -> query -> support i) and scored against its labels. No registration among the
  supports, so the work stays linear in their number.
"""
from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from icl.data.frames import Scan
from icl.errors import InputError
from icl.model.dice import binary_dice
from icl.sparse.jobs import plan, run_all
from icl.sparse.registration import (DEFORMABLE_ITERATIONS, Prepared, ScanLike, as_scan, carried_probabilities,
                                     carry_back, check_classes, most_probable, prepare, register, support_labels)

Say = Callable[[str], None]  # where a progress line goes (None: nowhere)


@dataclass
class CarriedSupport:
    """One support scan registered to the query: its image (its own intensities, so the frames' window rule applies
    as to the support itself) and its labels, both on the query's canonical grid — the support as the query's own
    slices would show it (the model's memory on this road)."""
    image: np.ndarray
    labels: np.ndarray


# ------------------------------------------------------------------------------------------------ one job
@dataclass
class Sparse:
    """A structure's probability map on a grid, kept only where it is not zero: ``box`` (slices) and its values."""
    box: tuple[slice, ...] | None
    values: np.ndarray | None

    @classmethod
    def of(cls, p: np.ndarray) -> "Sparse":
        nonzero = [np.flatnonzero(p.any(axis=tuple(a for a in range(p.ndim) if a != d))) for d in range(p.ndim)]
        if not all(len(n) for n in nonzero):
            return cls(None, None)
        box = tuple(slice(int(n[0]), int(n[-1]) + 1) for n in nonzero)
        return cls(box, np.ascontiguousarray(p[box]))

    def add_to(self, out: np.ndarray, sign: float = 1.0) -> np.ndarray:
        if self.box is not None:
            out[self.box] += self.values if sign > 0 else -self.values
        return out


@dataclass
class OnQuery:
    """What a job hands back: one support on the query's canonical grid (``maps``: per structure, in order), its
    image there when asked for (the model's memory), and what it cost."""
    maps: list[Sparse]
    image: np.ndarray | None
    seconds: float
    cpu_seconds: float
    inverse: tuple[str, str | None] | None = None  # files of the registration's inverse (the composed check)

    def dense(self, classes: list[int], shape: tuple[int, ...]) -> dict[int, np.ndarray]:
        return {c: m.add_to(np.zeros(shape, np.float32)) for c, m in zip(classes, self.maps)}


def carry_to(query: Prepared, support: Prepared, classes: list[int], deformable: bool, threads: int,
             iterations: Sequence[int], image: bool, inverse: str | None = None) -> OnQuery:
    """The job: ``support`` registered to ``query`` and its structures carried there (and its image, if asked;
    its inverse saved as files named from ``inverse``, if given)."""
    t0, c0 = time.perf_counter(), time.process_time()
    reg = register(query, support, deformable, threads, iterations)
    maps = [Sparse.of(p) for _, p in carried_probabilities(reg, support.labels, support.affine, classes)]
    carried = reg.carry([support.raw], support.affine)[0] if image else None
    files = reg.save_inverse(inverse) if inverse else None
    return OnQuery(maps, carried, time.perf_counter() - t0, time.process_time() - c0, files)


def fold_back(others: list[Sparse], query: Prepared, support: Prepared, classes: list[int], n_others: int,
              inverse: tuple[str, str | None], threads: int) -> list[float]:
    """The job of the composed check: the other supports' summed probabilities (on the query) carried back onto
    ``support`` through the inverse of its registration, fused, and scored against its labels (Dice per class)."""
    dense = [m.add_to(np.zeros(query.shape, np.float32)) for m in others]
    back = dict(zip(classes, carry_back(dense, query.affine, support, inverse, threads)))
    pred = most_probable(back, np.float32(n_others))
    return [binary_dice(pred == c, support.labels == c) for c in classes]


def run_carries(pairs: Sequence[tuple[Prepared, Prepared]], classes: list[int], deformable: bool = True,
                threads: int | None = None, iterations: Sequence[int] = DEFORMABLE_ITERATIONS, image: bool = False,
                say: Say | None = None, what: Callable[[int], str] | None = None,
                inverse: str | None = None) -> list[OnQuery]:
    """``carry_to`` for every (query, support) pair, in parallel processes as the cores allow (``threads`` given:
    here, one after the other, with that many greedy threads). ``say`` gets one line per finished registration,
    ``what(i)`` naming it; ``inverse``: a folder for the registrations' inverses."""
    if threads is None:
        budget = plan(len(pairs))
        processes, threads = budget.processes, budget.threads
    else:
        processes = 1
    calls = [(q, s, classes, deformable, threads, tuple(iterations), image,
              None if inverse is None else f"{inverse}/{i}") for i, (q, s) in enumerate(pairs)]
    count = [0]

    def finished(i: int, r: OnQuery) -> None:
        count[0] += 1
        if say is not None:
            name = what(i) if what else f"{pairs[i][1].where} -> {pairs[i][0].where}"
            say(f"registered {count[0]}/{len(pairs)}: {name} in {r.seconds:.0f} s (CPU {r.cpu_seconds:.0f} s, "
                f"{processes} process(es) x {threads} thread(s))")
    return run_all(carry_to, calls, processes, finished)


# ------------------------------------------------------------------------------------------------ a support set
class SupportSet:
    """Labelled supports prepared once (windowed images, checked labels), for every query they are registered to;
    ``cache`` holds what depends on the set alone (the full leave-one-out check, ``icl.sparse.cross_check``)."""

    def __init__(self, pairs: Sequence[tuple[Scan, Scan]], classes: Sequence[int]):
        if not pairs:
            raise InputError("support", "no support scan given")
        self.classes = check_classes(classes)
        self.scans = list(pairs)
        labels = [support_labels(s, lab, self.classes) for s, lab in pairs]  # every input checked before any work
        self.prepared = [prepare(s, lab) for (s, _), lab in zip(pairs, labels)]
        self.cache: dict = {}

    def __len__(self) -> int:
        return len(self.prepared)

    def __iter__(self):
        return iter(self.scans)

    def with_images(self) -> list[Prepared]:
        """The prepared supports with their own intensities too (to carry the images: the model's memory)."""
        for p, (s, _) in zip(self.prepared, self.scans):
            if p.raw is None:
                p.raw = s.fix_nonfinite(np.array(s.canonical, dtype=np.float32))
        return self.prepared


@dataclass
class Fused:
    """Every support registered to one query: per structure, the probabilities summed over supports (query's
    canonical grid), each support as it was carried, and the composed check's ``[supports, structures]`` Dice."""
    summed: dict[int, np.ndarray]
    supports: list[OnQuery] = field(repr=False)
    classes: list[int]
    folds: np.ndarray | None = None

    def labels(self, probabilities: bool = False) -> np.ndarray:
        """The most probable label (or ``[1 + C, ...]`` probabilities, background first), canonical order."""
        return most_probable(self.summed, np.float32(len(self.supports)), probabilities)


def register_set(query: Scan | Prepared, supports: SupportSet, deformable: bool = True, threads: int | None = None,
                 iterations: Sequence[int] = DEFORMABLE_ITERATIONS, images: bool = False, check: bool = False,
                 say: Say | None = None) -> Fused:
    """Every support of the set registered to ``query`` (once each), summed in the supports' order; ``check`` (two
    supports or more): the composed leave-one-out check from the same registrations (``Fused.folds``)."""
    query = query if isinstance(query, Prepared) else prepare(query)
    prepared = supports.with_images() if images else supports.prepared
    names = [s.where for s in prepared]
    check = check and len(prepared) > 1
    with tempfile.TemporaryDirectory(prefix="icl_inverse_") as folder:  # the inverses, for the check's jobs
        done = run_carries([(query, s) for s in prepared], supports.classes, deformable, threads, iterations, images,
                           say, lambda i: f"support {i + 1} ({names[i]}) to {query.where}",
                           folder if check else None)
        summed = {c: np.zeros(query.shape, np.float32) for c in supports.classes}
        for one in done:
            for c, m in zip(supports.classes, one.maps):
                m.add_to(summed[c])
        fused = Fused(summed, done, supports.classes)
        if check:
            fused.folds = composed_folds(fused, query, prepared, threads)
    return fused


def composed_folds(fused: Fused, query: Prepared, supports: Sequence[Prepared], threads: int | None = None
                   ) -> np.ndarray:
    """``[supports, structures]``: Dice of "the other supports fused on the query, carried back onto support i"
    against support i's labels (support j -> query -> support i; NaN where neither has the structure). One
    resampling per support, in parallel processes as the cores allow."""
    n, classes = len(fused.supports), fused.classes
    calls = [([Sparse.of(m.add_to(fused.summed[c].copy(), -1.0)) for c, m in zip(classes, one.maps)], query,
              support, classes, n - 1, one.inverse, 1) for one, support in zip(fused.supports, supports)]
    processes = 1 if threads is not None else plan(n).processes
    return np.array(run_all(fold_back, calls, processes), dtype=np.float64)


# ------------------------------------------------------------------------------------------------ the API
def support_scans(supports: Sequence[tuple[ScanLike, ScanLike]]) -> list[tuple[Scan, Scan]]:
    """``[(image, label), ...]`` as scans, named by their place; none at all is an InputError."""
    if not supports:
        raise InputError("support", "no support scan given")
    return [(as_scan(s, f"support {i + 1}"), as_scan(lab, f"support label {i + 1}"))
            for i, (s, lab) in enumerate(supports)]


def on_query_grid(query: Scan, canonical: np.ndarray) -> np.ndarray:
    """Canonical-order result (label map or ``[K, ...]`` maps) back in the query file's own voxel order."""
    if canonical.ndim == 4:
        return np.stack([np.ascontiguousarray(query.from_canonical(m)) for m in canonical])
    return np.ascontiguousarray(query.from_canonical(canonical))


def fuse(query: ScanLike, supports: Sequence[tuple[ScanLike, ScanLike]], classes: Sequence[int],
         deformable: bool = True, threads: int | None = None, probabilities: bool = False,
         deformable_iterations: Sequence[int] = DEFORMABLE_ITERATIONS) -> np.ndarray:
    """Several labelled supports ``[(image, label), ...]``, each registered to the query independently, their
    per-structure probabilities summed (a soft majority vote) and the most probable label taken: an int32 label
    map on the query's own voxel grid (``probabilities=True``: float32 ``[1 + C, ...]``, background first).
    ``threads``: None runs the registrations in parallel processes over the cores; a number runs them here, one
    after the other, with that many greedy threads."""
    classes = check_classes(classes)
    query = as_scan(query, "query")
    fused = register_set(query, SupportSet(support_scans(supports), classes), deformable, threads,
                         deformable_iterations)
    return on_query_grid(query, fused.labels(probabilities))


def carry_supports(query: Scan, supports: Sequence[tuple[ScanLike, ScanLike]] | SupportSet, classes: Sequence[int],
                   deformable: bool = True, threads: int | None = None, say: Say | None = None
                   ) -> tuple[np.ndarray, list[CarriedSupport]]:
    """:func:`fuse`'s label map in the query's canonical voxel order and, from the same registrations, every
    support's image and labels on that grid: the model's prior and memory on the cross-scan road."""
    support_set = supports if isinstance(supports, SupportSet) else SupportSet(support_scans(supports), classes)
    fused = register_set(query, support_set, deformable, threads, images=True, say=say)
    shape = query.canonical_shape
    carried = [CarriedSupport(one.image, most_probable(one.dense(fused.classes, shape), np.float32(1.0)))
               for one in fused.supports]
    return fused.labels(), carried


def register_labels(query: ScanLike, support: ScanLike, support_label: ScanLike, classes: Sequence[int],
                    deformable: bool = True, threads: int | None = 1, probabilities: bool = False,
                    deformable_iterations: Sequence[int] = DEFORMABLE_ITERATIONS) -> np.ndarray:
    """One support registered to the query (affine, then deformable; mutual information) and its structures
    carried over: an int32 label map on the query's own voxel grid (``probabilities=True``: float32
    ``[1 + C, ...]``, background first, then ``classes`` in order). ``deformable_iterations``: greedy's
    iterations per level of the deformable stage, coarse to fine (fewer: faster, see bench/cross_scan.py)."""
    return fuse(query, [(support, support_label)], classes, deformable, threads, probabilities,
                deformable_iterations)


def stderr_line(line: str) -> None:
    print(f"note: {line}", file=sys.stderr, flush=True)
