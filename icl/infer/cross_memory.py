"""The model on the cross-scan road with what registration knows (``--fill model``, support from other scans,
weights trained with a mask prior; issue #25 item 3).

Why: a support slice of another scan shows the structure where *that* scan has it, and the model alone does not
read it (INIA19 cross-case: 0.05); registered, the support tells where the structure is on the query (0.87-0.91).
So the model gets registration's two products, as the same-scan road gives it the interpolation: every support
scan's slices resampled onto the query's grid (its memory: a registered support slice shows the query's anatomy
where the query has it) and the fused registered labels as the prior of every query slice (the residual it was
trained to correct, ``icl.engine.train.prior_tasks.with_registered_prior``).
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icl.data.frames import Scan, VolumeFrames, resize_slices
from icl.infer.support import choose_support_slices
from icl.sparse.classic import Score
from icl.sparse.model_fill import ModelFill, square_box
from icl.sparse.fusion import SupportSet, carry_supports
from sam2_ext.priors import prior_input
from sam2_ext.track import track


@dataclass
class RegisteredMemory:
    """The model's inputs on this road: ``supports`` as ``(image scan, label scan, slices)`` on the query's
    canonical grid (memory), and ``labels`` the fused registered label map in the query's canonical order (prior)."""
    supports: list[tuple[Scan, Scan, list[int]]]
    labels: np.ndarray

    def box(self, classes: Sequence[int], axis: int, crop: bool) -> tuple[int, int, int, int]:
        """The square box around the registered structures on all slices (``icl.sparse.model_fill.square_box``,
        the sparse fill's rule), or the whole slice without ``crop``."""
        zhw = np.moveaxis(self.labels, axis, 0)
        h, w = zhw.shape[1:]
        present = np.isin(zhw, classes).any(0)
        if not crop or not present.any():
            return 0, h, 0, w
        ys, xs = np.nonzero(present)
        return square_box([(int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)], (h, w))


class ConcatFrames:
    """Frame sources one after the other (every support scan's slices, then the query's), still lazy."""

    def __init__(self, *parts: Any):
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, i: int) -> torch.Tensor:
        for part in self.parts:
            if i < len(part):
                return part[i]
            i -= len(part)
        raise IndexError(i)


def registered_fill(runner: ModelFill, memory: RegisteredMemory, classes: list[int],
                    window_of: Callable[[Scan], Any]) -> Iterator[tuple[int, dict[int, Score]]]:
    """``(query slice, {class: (box, logits)})`` for every query slice: the registered supports' slices in front
    of the query, in the sparse fill's box (``runner.crop``), tracked forward with the registered labels as the
    prior of every query slice — at the mask grid, and at the output's resolution for weights trained so (the
    sparse fill's own rule, ``ModelFill.sized``). ``window_of``: the window of a support's frames (as for the
    support scan itself: its intensities are carried as they are)."""
    if not memory.supports:  # registration carried no structure: absent on every slice, as on its own road
        yield from ((z, {}) for z in range(memory.labels.shape[runner.axis]))
        return
    predictor, axis = runner.predictor, runner.axis
    size, low = predictor.image_size, predictor.sam_prompt_encoder.mask_input_size[0]
    box = memory.box(classes, axis, runner.crop)
    y0, y1, x0, x1 = box
    query = VolumeFrames(runner.scan, runner.window, size, axis, crop=box)
    parts, prompts = [], {c: {} for c in classes}
    for image, label, zs in memory.supports:
        offset = sum(len(p) for p in parts)
        parts.append(runner.prepare(VolumeFrames(image, window_of(image), size, axis, indices=zs, crop=box)))
        cut = np.moveaxis(label.canonical, axis, 0)[zs][:, y0:y1, x0:x1]
        masks = resize_slices(cut.astype(np.int32), (size, size), "label")
        for c in classes:
            prompts[c].update({offset + i: torch.from_numpy(masks[i] == c) for i in range(len(zs))})
    offset = sum(len(p) for p in parts)
    registered = np.moveaxis(memory.labels, axis, 0)[:, y0:y1, x0:x1]
    priors = {c: {offset + z: prior_input(registered[z] == c, low, "cpu")[0, 0] for z in range(len(registered))}
              for c in classes}
    output_res = predictor.prior_gain and predictor.prior_resolution == "output"
    fine = (lambda c, f: registered[f - offset] == c) if output_res else None
    source = ConcatFrames(*parts, runner.prepare(query))
    with runner.autocast():
        for result in track(predictor, source, prompts, "forward", priors=priors):
            if result.index >= offset:
                logits = runner.sized(result, classes, priors, fine, box, query.in_plane_shape)
                yield result.index - offset, {c: (box, m) for c, m in logits.items()}


def warn_carried_nowhere(query: Path, labels: np.ndarray, classes: Sequence[int]) -> None:
    """Never silently: a structure registration carried nowhere on the query is said, with what it means (the
    registration road's result and the model's prior on this road alike)."""
    lost = [c for c in classes if not (labels == c).any()]
    if lost:
        print(f"warning: {query}: registration carried structure(s) {', '.join(map(str, lost))} nowhere on the "
              "query: the support scan does not match it there (another body part or field of view?)",
              file=sys.stderr)


def registered_memory(query: Scan, supports: Sequence[tuple[Scan, Scan]] | SupportSet, classes: Sequence[int],
                      axis: int, per_class: int | str) -> RegisteredMemory:
    """Register every support to ``query`` (``icl.sparse.fusion``: a :class:`SupportSet` is prepared once for every
    query), and choose each registered support's
    slices as the support slices of its own labels are chosen (``per_class`` per structure, across its extent)."""
    fused, carried = carry_supports(query, supports, classes)
    warn_carried_nowhere(query.path, fused, classes)
    memory = []
    for one, (_, label) in zip(carried, supports):
        if not np.isin(one.labels, classes).any():  # this support carried nothing: it has no slice to remember
            continue
        where = Path(f"<{label.path} registered to {query.path.name}>")
        zs = choose_support_slices(one.labels, axis, per_class, where)
        memory.append((Scan.from_array(one.image.astype(np.float32), path=where),
                       Scan.from_array(one.labels, path=where), zs))
    return RegisteredMemory(memory, fused)  # no support carried anything: nothing to track (the warning said so)
