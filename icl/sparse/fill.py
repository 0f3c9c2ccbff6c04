"""Sparse → dense: fill a scan annotated on a few slices, per structure, with the method its own annotation favours.

Why a self-check: the engine cannot know whether its model fits the user's scan — but the user's annotation can
tell. Per structure, every other annotated slice is held out (:meth:`Annotation.holdout`), each method fills the
held-out slices from the remaining ones, and its Dice against the held-out annotation is measured. That table is
the user's quality estimate (printed, ``--report``, returned by the API), and ``fill="auto"`` takes per structure
the method with the best held-out Dice, so a model that does not fit a scan loses to the classic fills there
instead of silently producing a worse result.

Rules: a structure's held-out Dice rests on a few slices (half of its annotated ones), so the choice reads it
shrunk toward the method's mean over every checked structure: ``(h·own + K·mean) / (h + K)`` with ``h`` its
held-out slices and ``K = SHRINK_SLICES`` — a structure leaves the scan-wide best method only on clear evidence of
its own (the table prints the raw held-out Dice). Ties go to the first of ``PREFERENCE`` (the cheaper, more
predictable fill). A structure with too few annotated slices for a hold-out (fewer than three per structure; with
complete slices, not drawn on both a kept and a held-out slice) takes the method with the best mean held-out Dice
over the structures that could be checked; when none could, ``interpolation``.

The classic fills are ``interpolation`` and ``nearest`` (the drawn shapes) and ``registration`` (the image between
them: :mod:`icl.sparse.slice_registration`; checked when the caller hands the scan's image). The best classic fill
of a structure, by the same shrunk rule, is also the model's prior there (weights trained with a mask prior refine
it: :mod:`icl.sparse.prior`), in the self-check and in the fill.

The model must also *clearly* beat each structure's best classic fill to be chosen at all: over every held-out
slice of the scan, the mean paired difference of their per-slice Dice must exceed ``EVIDENCE`` standard errors (a
one-sided test at about 97.7 %). Why: the check runs at twice the user's spacing, and a model trained to refine
its prior can tie with it there and still lose at the real spacing (measured in ``BENCHMARKS.md``); a tie within
the check's noise goes to the cheaper, predictable fill.

The model is reached through a *runner* (``run_model(annotation, classes, priors)`` yields ``(slice, {class:
score})`` for every slice, each once, in any order; ``priors``: ``{class: the fill that is its prior}``), so this
module knows nothing of SAM2: ``icl.api`` supplies the runner, which applies the engine's one propagation rule.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Union

import numpy as np

from icl.model.dice import dice_from_counts
from icl.sparse.annotation import Annotation
from icl.sparse.classic import ClassicFill, Score, place
from icl.sparse.methods import (AUTO, CLASSIC_FILLS, INTERPOLATION, MODEL, NEAREST, REGISTRATION, SAME_SCAN_FILLS,
                                SHAPE_FILLS)
from icl.sparse.slice_registration import RegistrationFill, SliceFields, registration_box

PREFERENCE = (INTERPOLATION, NEAREST, REGISTRATION, MODEL)  # ties: the cheaper, more predictable fill first
SHRINK_SLICES = 8  # weight of the scan-wide mean, in held-out slices, when a structure's own estimate is read
EVIDENCE = 2.0  # standard errors by which the model's per-slice Dice must beat the best classic fill's
Fill = Union[ClassicFill, RegistrationFill]  # a classic fill: score(c, z), mask(c, z)
ModelRunner = Callable[[Annotation, list[int], "Mapping[int, Fill] | None"], Iterator[tuple[int, dict[int, Score]]]]


@dataclass
class StructureCheck:
    """One structure's line of the self-check table."""

    structure: int
    annotated_slices: int  # slices annotated for it: drawn, or (complete slices) annotated without it
    held_out_slices: int  # 0: too few annotated slices for a hold-out, or drawn on every slice of its extent
    dice: dict[str, float | None] = field(default_factory=dict)  # held-out Dice per method (None: nothing to score)
    chosen: str = INTERPOLATION
    rule: str = ""
    drawn_slices: int | None = None  # slices it is drawn on (None: as annotated_slices)
    dense: bool = False  # drawn on every slice of its extent: nothing between them to check
    prior: str = INTERPOLATION  # its best classic fill: the model's prior there

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """The stderr line: held-out Dice of each method, the method chosen and what the estimate rests on, always
        as "drawn on N, held out K, scored on K" (complete slices: "annotated on A (drawn on N), ...")."""
        scores = ", ".join(f"{m} {'-' if v is None else f'{v:.3f}'}" for m, v in self.dice.items())
        drawn = self.annotated_slices if self.drawn_slices is None else self.drawn_slices
        where = (f"drawn on {drawn}" if drawn == self.annotated_slices
                 else f"annotated on {self.annotated_slices} (drawn on {drawn})")
        if self.held_out_slices:
            rests = f"{where}, held out {self.held_out_slices}, scored on {self.held_out_slices}"
        elif self.dense:
            rests = f"{where}, held out 0: drawn on every slice of its extent, nothing between them to check"
        else:
            rests = f"{where}, held out 0: too few slices for a hold-out"
        return f"structure {self.structure}: held-out Dice {scores or '-'} -> {self.chosen} ({self.rule}; {rests})"


def _dice(inter: float, pred: float, truth: float) -> float | None:
    """3D Dice from sums (:func:`icl.model.dice.dice_from_counts`); both empty is undefined: None in the table."""
    value = dice_from_counts(inter, pred, truth)
    return None if math.isnan(value) else value


def classic_fill(annotation: Annotation, method: str, fields: SliceFields | None, drawing: Annotation | None = None
                 ) -> Fill:
    """The classic fill ``method`` of ``annotation`` (``registration`` reads the image through ``fields``, in the
    boxes of ``drawing``, the whole drawing ``annotation`` is part of: default ``annotation`` itself)."""
    if method == REGISTRATION:
        if fields is None:
            raise ValueError("the registration fill needs the scan's image (fields)")
        drawing = drawing or annotation
        return RegistrationFill(annotation, fields, {c: registration_box(drawing, c) for c in annotation.classes})
    return ClassicFill(annotation, method)


def classic_methods(fields: SliceFields | None) -> tuple[str, ...]:
    """The classic fills a caller can run: registration only where the image is given."""
    return CLASSIC_FILLS if fields is not None else SHAPE_FILLS


def self_check(annotation: Annotation, run_model: ModelRunner | None,
               fields: SliceFields | None = None) -> dict[int, tuple]:
    """Held-out Dice of every method per structure that can be checked: ``{c: (held-out slices, {method: dice},
    {method: {slice: that slice's Dice or None}})}``. ``fields``: the scan's image for the registration fill
    (None: the shape fills only). The model runs last, with each structure's best classic fill as its prior."""
    kept, scored = annotation.holdout()
    sums: dict[int, dict[str, np.ndarray]] = {c: {} for c in scored}
    per_slice: dict[int, dict[str, dict[int, float | None]]] = {c: {} for c in scored}

    def add(method: str, c: int, z: int, pred: np.ndarray) -> None:
        truth = annotation.mask(c, z)
        counts = np.array([np.count_nonzero(pred & truth), np.count_nonzero(pred), np.count_nonzero(truth)])
        sums[c].setdefault(method, np.zeros(3))
        sums[c][method] += counts
        per_slice[c].setdefault(method, {})[z] = _dice(*counts)

    def table() -> dict[int, tuple]:
        return {c: (len(scored[c]), {m: _dice(*sums[c][m]) for m in (*CLASSIC_FILLS, MODEL) if m in sums[c]},
                    per_slice[c]) for c in scored}

    fills = {m: classic_fill(kept, m, fields, annotation) for m in classic_methods(fields)}  # the drawing's boxes
    if REGISTRATION in fills:
        fills[REGISTRATION].prepare(scored)
    for method, fill in fills.items():
        for c, zs in scored.items():
            for z in zs:
                add(method, c, z, fill.mask(c, z))
    if run_model is not None and scored:
        best = best_classic(annotation, table())
        priors = prior_fills(kept, {c: best[c] for c in scored}, fields, fills)
        wanted = {c: set(zs) for c, zs in scored.items()}
        for z, scores in run_model(kept, sorted(scored), priors):
            for c in scored:
                if z in wanted[c]:
                    add(MODEL, c, z, place(scores.get(c), annotation.in_plane_shape))
    return table()


def prior_fills(annotation: Annotation, methods: Mapping[int, str], fields: SliceFields | None,
                fills: Mapping[str, Fill] | None = None) -> dict[int, Fill]:
    """``{class: its prior's fill}`` on ``annotation`` (``fills``: those already made for it, reused); the
    registration fill prepared on every slice of those classes' extents at once (in parallel)."""
    made = dict(fills or {})
    out = {}
    for c, method in methods.items():
        if method not in made:
            made[method] = classic_fill(annotation, method, fields)
        out[c] = made[method]
    on_registration = {c: None for c, m in methods.items() if m == REGISTRATION}
    if on_registration:
        made[REGISTRATION].prepare(on_registration)
    return out


def _shrunk(held: int, dice: Mapping[str, float | None], means: Mapping[str, float],
            methods: tuple[str, ...]) -> dict[str, float]:
    """A structure's held-out Dice per method read shrunk toward the method's scan-wide mean (module docstring)."""
    return {m: (held * v + SHRINK_SLICES * means.get(m, v)) / (held + SHRINK_SLICES)
            for m, v in dice.items() if v is not None and m in methods}


def _means(checks: dict[int, tuple], methods: tuple[str, ...]) -> dict[str, float]:
    """Each method's mean held-out Dice over the checked structures."""
    return {m: float(np.mean(v)) for m in PREFERENCE if m in methods
            if (v := [ch[1][m] for ch in checks.values() if ch[1].get(m) is not None])}


def best_classic(annotation: Annotation, checks: dict[int, tuple]) -> dict[int, str]:
    """Each structure's best classic fill by the shrunk rule (unchecked ones: the best mean, else the
    interpolation): what ``auto`` would choose without the model, and the model's prior."""
    means = _means(checks, CLASSIC_FILLS)
    fallback = _best(means) if means else INTERPOLATION
    out = {}
    for c in annotation.classes:
        held, dice = checks.get(c, (0, {}))[:2]
        shrunk = _shrunk(held, dice, means, CLASSIC_FILLS) if held else {}
        out[c] = _best(shrunk) if shrunk else fallback
    return out


def model_clearly_better(checks: dict[int, tuple], classic: Mapping[int, str] | None = None) -> bool:
    """The module docstring's evidence rule, against each structure's best classic fill (``classic``; default:
    the interpolation); True when no per-slice evidence was recorded (nothing to test)."""
    per_slice = {c: check[2] for c, check in checks.items() if len(check) > 2}
    if not per_slice:
        return True
    base = classic or {}
    diffs = np.asarray([m - i for c, slices in per_slice.items() for z, m in slices.get(MODEL, {}).items()
                        if m is not None and (i := slices.get(base.get(c, INTERPOLATION), {}).get(z)) is not None])
    return len(diffs) >= 2 and float(diffs.mean()) > EVIDENCE * float(diffs.std(ddof=1)) / np.sqrt(len(diffs))


def _best(dice: dict[str, float | None]) -> str:
    """The method with the highest Dice (ties: ``PREFERENCE`` order); interpolation when nothing scored."""
    ranked = [(v, -PREFERENCE.index(m), m) for m, v in dice.items() if v is not None]
    return max(ranked)[2] if ranked else INTERPOLATION


def choose(annotation: Annotation, checks: dict[int, tuple], fill: str) -> list[StructureCheck]:
    """The method per structure: ``fill`` itself, or for ``auto`` the self-check's best (module docstring rules)."""
    if fill not in SAME_SCAN_FILLS:
        raise ValueError(f"fill must be one of {SAME_SCAN_FILLS}, got {fill!r}")
    classic = best_classic(annotation, checks)
    excluded = () if fill != AUTO or model_clearly_better(checks, classic) else (MODEL,)  # the evidence rule
    allowed = tuple(m for m in PREFERENCE if m not in excluded)
    means = _means(checks, allowed)
    fallback = _best(means) if means else INTERPOLATION
    fallback_rule = "best mean over the checked structures" if means else "nothing could be checked: default"
    table = []
    for c in annotation.classes:
        held, dice = checks.get(c, (0, {}))[:2]
        if fill != AUTO:
            chosen, rule = fill, f"fill {fill}"
        elif held and any(v is not None for v in dice.values()):
            chosen, rule = _best(_shrunk(held, dice, means, allowed)), "best held-out Dice" + (
                "; the model did not clearly beat the best classic fill over the scan"
                if excluded and MODEL in dice else "")
        else:
            chosen, rule = fallback, fallback_rule
        table.append(StructureCheck(c, annotation.annotated_for(c), held, dice, chosen, rule,
                                    len(annotation.slices[c]), annotation.dense(c), classic[c]))
    return table


def compose(shape: tuple[int, int], scores: list[tuple[int, Score]], dtype) -> np.ndarray:
    """One slice's label map: where structures' scores meet the highest wins, background where none is > 0."""
    best = np.zeros(shape, np.float32)
    labels = np.zeros(shape, dtype)
    for c, ((y0, y1, x0, x1), values) in scores:
        region, lab = best[y0:y1, x0:x1], labels[y0:y1, x0:x1]
        win = values > region
        region[win], lab[win] = values[win], c
    return labels


def fill_volume(annotation: Annotation, chosen: dict[int, str], run_model: ModelRunner | None,
                out_zhw: np.ndarray, on_slice: Callable[[], None] | None = None, fields: SliceFields | None = None,
                priors: Mapping[int, str] | None = None) -> None:
    """Fill ``out_zhw`` (slice axis first, e.g. a view of the output) slice by slice: each structure by its chosen
    method, then what the annotation says stays as given (:meth:`Annotation.written_back`). ``fields``: the scan's
    image, for the registration fill; ``priors``: ``{class: method}``, the model's prior per structure (default:
    the interpolation).

    On a structure's own drawn slices its drawing is the answer, whatever the fill (the model's masks included):
    there it takes no fill at all, only its drawn voxels, so it never gains voxels beyond what was drawn."""
    by_model = [c for c in annotation.classes if chosen[c] == MODEL]
    if by_model and run_model is None:
        raise ValueError("structures chosen for the model fill, but no model runner given")
    by_classic = {c: m for c, m in chosen.items() if m != MODEL}
    fills = prior_fills(annotation, by_classic, fields)
    model_priors = prior_fills(annotation, {c: (priors or {}).get(c, INTERPOLATION) for c in by_model}, fields,
                               {m: fills[c] for c, m in by_classic.items()})
    slices: Iterator[tuple[int, dict[int, Score]]] = (
        run_model(annotation, by_model, model_priors) if by_model else ((z, {}) for z in range(annotation.depth)))
    drawn_on = {c: set(annotation.slices[c]) for c in annotation.classes}
    for z, model_scores in slices:
        scores = []
        for c in annotation.classes:
            if z in drawn_on[c]:
                continue  # its drawing, written back below, is its whole answer on this slice
            s = model_scores.get(c) if chosen[c] == MODEL else fills[c].score(c, z)
            if s is not None:
                scores.append((c, s))
        out_zhw[z] = compose(annotation.in_plane_shape, scores, out_zhw.dtype)
        given = annotation.written_back(z)
        if given is not None:
            where, values = given
            out_zhw[z][where] = values[where]
        if on_slice is not None:
            on_slice()
