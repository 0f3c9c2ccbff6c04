"""Whether a state dict fits a model, said in one line: the keys it lacks, the keys the model lacks, the shapes that
differ (a few of each named). Why its own module: SAM2's own files and LiteMedSAM's mapped ones are checked alike
before anything is loaded (``build.load_weights``, ``litemedsam.load_litemedsam``)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


def first(keys: list[str], n: int = 5) -> str:
    """The first ``n`` keys, and how many more."""
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def fit_problems(own: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], wanted: Iterable[str],
                 lacks: str = "missing keys", extra: str = "unexpected keys") -> list[str]:
    """What keeps ``given`` from loading into a model whose state dict is ``own``: the ``wanted`` keys it lacks
    (``lacks``), its keys the model has not (``extra``), the shapes that differ; empty when it fits."""
    missing = [k for k in wanted if k not in given]
    unexpected = [k for k in given if k not in own]
    shapes = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in given.items() if k in own and v.shape != own[k].shape]
    return [text for keys, text in ((missing, f"{len(missing)} {lacks}: {first(missing)}"),
                                    (unexpected, f"{len(unexpected)} {extra}: {first(unexpected)}"),
                                    (shapes, f"{len(shapes)} shape mismatches: {first(shapes, 3)}")) if keys]
