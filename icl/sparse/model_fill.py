"""The model's fill of a sparse annotation: the engine's one propagation rule, run in a crop around the structures.

Why a crop: a structure 15 voxels across is 2–3 cells of the model's 32 × 32 mask grid at 128 px on a whole
slice; tracked in a square box around the annotated structures (their in-plane bounding box over the annotated
slices plus a margin) it is several times larger. The box is square so the frames are not stretched; the model's
logits go back into the full slice at the box's place (outside it the structures are absent). ``--crop auto`` (the
default) uses it for weights trained with ``-mask_prior`` (trained on such boxes) and not for others: the previous
default model, trained on whole slices, followed its support worse in a crop (phantom switch, marked Dice 0.48 with
it vs 0.97 without) and gained nothing on real MR (INIA19 every 6th slice: 0.186 vs 0.184).

Weights trained with ``-mask_prior`` also get a classic fill as a dense mask prompt on every slice they track
(``priors=True``; :mod:`icl.sparse.prior`): how they were trained. Which fill is each structure's prior is the
caller's (the self-check's best classic fill, ``icl.sparse.fill``); the interpolation when none is handed.

Prompts follow the annotation's convention (:mod:`icl.sparse.annotation`): each structure on its own annotated
slices, and an empty mask on every slice that ends it (:meth:`Annotation.stops`) — which the propagation rule
(``sam2_ext.track``, ``direction="both"``) reads as "annotated without it".
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from icl.data.frames import VolumeFrames, resize_slices
from icl.sparse.adapt import adapt
from icl.sparse.annotation import Annotation
from icl.sparse.classic import ClassicFill, Score
from icl.sparse.methods import INTERPOLATION
from icl.sparse.prior import Fill, classic_prior, classic_priors
from sam2_ext.priors import residual_at_output
from sam2_ext.track import track

CROP_MARGIN = 0.25  # of the box's larger side, on every side
MIN_CROP_MARGIN = 8  # voxels


def square_box(boxes: list[tuple[int, int, int, int]], shape: tuple[int, int], margin: float = CROP_MARGIN,
               min_margin: int = MIN_CROP_MARGIN) -> tuple[int, int, int, int]:
    """The square box (y0, y1, x0, x1; end exclusive) around ``boxes`` widened by ``margin`` of its larger side
    (at least ``min_margin`` voxels), kept inside ``shape``; never larger than the slice."""
    y0, y1 = min(b[0] for b in boxes), max(b[1] for b in boxes)
    x0, x1 = min(b[2] for b in boxes), max(b[3] for b in boxes)
    side = max(y1 - y0, x1 - x0)
    side = min(side + 2 * max(int(round(margin * side)), min_margin), max(shape))

    def span(lo: int, hi: int, size: int) -> tuple[int, int]:
        length = min(side, size)
        start = min(max((lo + hi - length) // 2, 0), size - length)
        return start, start + length

    return (*span(y0, y1, shape[0]), *span(x0, x1, shape[1]))


class ModelFill:
    """A runner for :func:`icl.sparse.fill.fill_volume` / ``self_check``: ``run(annotation, classes, priors)``
    yields ``(slice, {class: (box, logits)})`` for every slice of the scan, each once; ``priors``: ``{class: the
    classic fill that is its prior}`` (weights trained with a prior; default: the interpolation)."""

    def __init__(self, predictor: Any, scan: Any, window: Any, slice_axis: int, crop: bool = False,
                 autocast: Any = None, prepare: Any = None, priors: bool = False, adapt_steps: int = 0):
        """``priors``: give the model a classic fill as its mask prior on every tracked slice
        (:mod:`icl.sparse.prior`; for weights trained with ``-mask_prior``). ``adapt_steps``: test-time adaptation
        on the annotation first (:mod:`icl.sparse.adapt`; the weights are restored afterwards)."""
        self.predictor, self.scan, self.window, self.axis = predictor, scan, window, slice_axis
        self.crop, self.autocast, self.prepare, self.priors = crop, autocast, prepare, priors
        self.adapt_steps = int(adapt_steps)

    def box(self, annotation: Annotation, classes: list[int]) -> tuple[int, int, int, int]:
        h, w = annotation.in_plane_shape
        if not self.crop:
            return 0, h, 0, w
        boxes = [b for c in classes if (b := annotation.box(c, 0)) is not None]
        return square_box(boxes, (h, w)) if boxes else (0, h, 0, w)

    def prompts(self, annotation: Annotation, classes: list[int], box: tuple[int, int, int, int]) -> dict:
        """``{class: {slice: mask at the model's size}}``: drawn masks, and empty masks where the class ends."""
        size = (self.predictor.image_size,) * 2
        y0, y1, x0, x1 = box
        empty = torch.zeros(size)
        out: dict[int, dict[int, torch.Tensor]] = {}
        for c in classes:
            zs = annotation.slices[c]
            if not zs:  # drawn nowhere: no prompt, absent everywhere
                out[c] = {}
                continue
            drawn = np.stack([annotation.mask(c, z)[y0:y1, x0:x1] for z in zs]).astype(np.uint8)
            masks = torch.from_numpy(resize_slices(drawn, size, "label").astype(np.float32))
            out[c] = {z: masks[i] for i, z in enumerate(zs)}
            out[c].update({z: empty for z in annotation.stops(c)})
        return out

    def run(self, annotation: Annotation, classes: list[int], priors: Mapping[int, Fill] | None = None
            ) -> Iterator[tuple[int, dict[int, Score]]]:
        box = self.box(annotation, classes)
        frames = VolumeFrames(self.scan, self.window, self.predictor.image_size, self.axis, crop=box)
        shape = frames.in_plane_shape
        prompts = self.prompts(annotation, classes, box)
        source = self.prepare(frames)
        low = self.predictor.sam_prompt_encoder.mask_input_size[0]
        fills: dict[int, Fill] = {}
        if self.priors:  # each class's prior fill (kept: its distance maps serve the grid and the output resolution)
            interpolation = ClassicFill(annotation, INTERPOLATION)
            fills = {c: (priors or {}).get(c) or interpolation for c in classes}
        low_priors = classic_priors(annotation, classes, box, low, fills) if self.priors else None
        backup = None
        if self.adapt_steps > 0:
            backup = {k: v.detach().clone() for k, v in self.predictor.state_dict().items()}
            adapt(self.predictor, source, annotation, prompts, box, self.adapt_steps, self.priors)
        # the prior at the scan's resolution, slice by slice, for weights that read their residual there
        output_res = low_priors and self.predictor.prior_gain and self.predictor.prior_resolution == "output"
        fine = (lambda c, z: classic_prior(fills[c], c, z, box)) if output_res else None
        try:
            with self.autocast():
                for result in track(self.predictor, source, prompts, "both", priors=low_priors):
                    logits = self.sized(result, classes, low_priors, fine, box, shape)
                    if not logits:
                        yield result.index, {}
                        continue
                    yield result.index, {c: (box, m) for c, m in logits.items()}
        finally:
            if backup is not None:
                self.predictor.load_state_dict(backup)

    def sized(self, result: Any, classes: list[int], priors: dict | None,
              fine: Callable[[int, int], np.ndarray] | None, box: tuple[int, int, int, int],
              shape: tuple[int, int]) -> dict[int, np.ndarray]:
        """``{class: logits [h, w] in the box}`` of one slice's result, the classes found there (some logit > 0);
        with ``fine`` (``(class, frame) -> the prior in the box at the scan's resolution``), the mask-grid residual
        swapped for that prior (``sam2_ext.priors.residual_at_output``), as the weights were trained."""
        z = result.index
        with_prior = {i for i, c in enumerate(classes) if fine is not None and z in priors.get(c, {})}
        rows = [i for i in range(len(classes)) if i in with_prior or float(result.logits[i].max()) > 0]
        if not rows:
            return {}
        plain = [i for i in rows if i not in with_prior]
        out: dict[int, np.ndarray] = {}
        if plain:
            sized = resize_slices(result.logits[plain].float(), shape, "logits").cpu().numpy()
            out.update({classes[i]: sized[n] for n, i in enumerate(plain)})
        for i in sorted(with_prior):
            c = classes[i]
            m = residual_at_output(result.logits[i], priors[c][z], fine(c, z), self.predictor.prior_gain)
            out[c] = m.cpu().numpy()
        return {c: out[c] for c in classes if c in out and float(out[c].max()) > 0}

    __call__ = run
