"""Test-time adaptation of the model on the user's own annotation, before it fills a sparse annotation.

Why: the model was trained on synthetic volumes; the user's scan is the one real sample at hand. Between any three
consecutive annotated slices ``a < h < b`` of a structure, tracking from ``a`` and ``b`` (both ways, the fill's own
rule, with its mask prior) must give the annotation on ``h``: a supervised task on the user's own image, with
nothing the user did not draw. A few optimizer steps on such tasks (Adam, all weights) adapt the model to the
scan's contrast and the structure's look; the weights are restored after the fill.

Honest by construction: the self-check (:mod:`icl.sparse.fill`) runs the model on the annotation with every other
slice held out, and the adaptation sees only the annotation it is given, so the held-out slices the self-check
scores are never trained on.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from icl.model.losses import ICLLoss
from icl.sparse.annotation import PER_STRUCTURE, Annotation
from icl.sparse.prior import classic_priors
from sam2_ext.track import track

ADAPT_LR = 1e-4


@functools.cache
def dice_bce() -> ICLLoss:
    """THE Dice + BCE (smooth 1), as training's -loss dice_bce; built on first use (it imports MONAI, ~10 s)."""
    return ICLLoss()


class Window:
    """Slices ``lo..hi - 1`` of a lazy frame source."""

    def __init__(self, source: Any, lo: int, hi: int):
        self.source, self.lo, self.hi = source, lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.source[self.lo + i]


def adaptation_triples(annotation: Annotation, classes: list[int]) -> list[tuple[int, int, int, int]]:
    """``(structure, a, h, b)`` for every three consecutive annotated slices of a structure."""
    out = []
    for c in classes:
        zs = annotation.slices[c]
        out += [(c, zs[i], zs[i + 1], zs[i + 2]) for i in range(len(zs) - 2)]
    return out


def adapt(predictor: Any, source: Any, annotation: Annotation, prompts: Mapping[int, Mapping[int, torch.Tensor]],
          box: tuple[int, int, int, int], steps: int, priors: bool, lr: float = ADAPT_LR, seed: int = 0) -> int:
    """``steps`` Adam steps on ``(a, h, b)`` tasks of ``annotation`` (module docstring); ``prompts``: the fill's
    masks at the model's size. Returns the steps taken (0 when no structure has three annotated slices)."""
    triples = adaptation_triples(annotation, sorted(prompts))
    if not triples or steps <= 0:
        return 0
    rng = np.random.default_rng(seed)
    low = predictor.sam_prompt_encoder.mask_input_size[0]
    params = [p for p in predictor.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    predictor.train()  # as training runs it (dropout in memory attention): seeded, the caller's RNG untouched
    try:
        with torch.enable_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _ in range(steps):
                c, a, h, b = triples[int(rng.integers(len(triples)))]
                window = Window(source, a, b + 1)
                task_prompts = {c: {0: prompts[c][a], b - a: prompts[c][b]}}
                prior = None
                if priors:  # the interpolation of a and b alone, as the fill would give it with h unannotated
                    pair = Annotation(annotation.label_zhw, [c], PER_STRUCTURE, {c: [a, b]})
                    per = classic_priors(pair, [c], box, low).get(c, {})
                    prior = {c: {z - a: m for z, m in per.items() if a < z < b}}
                results = list(track(predictor, window, task_prompts, "both", grad=True, priors=prior))
                target = F.interpolate(prompts[c][h][None, None].float(), size=(low, low), mode="bilinear",
                                       align_corners=False, antialias=True)[0, 0]
                # the decoder's masks before SAM2's object-score gate (a gated mask is a constant: no gradient),
                # averaged over the two passes as the rule averages its logits
                raw = torch.stack([t.raw_multimask_logits[0, 0] for t in results[h - a].tracked]).mean(0)
                loss = dice_bce()(raw.float()[None], target[None])  # [1, h, w]: one slice, one object
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        predictor.eval()
        predictor.zero_grad(set_to_none=True)
    return steps
