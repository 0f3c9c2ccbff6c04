"""Build the predictor from the options: config, weights, memory selector, frozen parts — one place for training,
evaluation, the CLI and the API.

Why here (not in ``icl.engine``): inference needs it too, and inference must not stand on the training engine;
training, evaluation and the API each used to build the predictor and each wrote the ``recency`` special case.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from icl.errors import InputError
from icl.model.weights import load_any_weights
from sam2_ext.build import build_icl_predictor
from sam2_ext.selector import MemorySelector, parse_selector_config


def make_memory_selector(value: str | None):
    """THE ``-memory_selector`` / ``--memory-selector`` rule: a MemorySelector, or None for SAM2's own attention.

    None, an empty value and ``recency`` (SAM2's official rule) install no selector; anything else is parsed by
    ``sam2_ext.selector`` (whose OptionError names the option, spelled by the caller's ``library_errors``).
    """
    if value is None or not str(value).strip() or parse_selector_config(value).policy == "recency":
        return None
    return MemorySelector.from_name(value)


def build_predictor(config: str | Path, device: str | torch.device, weights: str | Path | None = None,
                    image_size: int | None = None, memory_selector: str | None = None,
                    freeze: Iterable[str] = ()) -> nn.Module:
    """The ICL predictor of ``config`` on ``device``: ``weights`` loaded (None = random init), the memory selector
    installed and the ``freeze`` parts frozen. Train/eval mode is left to the caller."""
    predictor = build_icl_predictor(config, device="cpu", checkpoint=None, image_size=image_size)
    if weights is not None:  # official, MedSAM2, ours, or a -peft lora adapter checkpoint (merged on load)
        load_any_weights(predictor, weights)
    predictor = predictor.to(torch.device(device))
    selector = make_memory_selector(memory_selector)
    if selector is not None:
        predictor.memory_selector = selector
    freeze_parts(predictor, freeze)
    return predictor


def freeze_parts(model: nn.Module, parts: Iterable[str]) -> list[str]:
    """Turn off gradients of the named top-level parts (e.g. ``image_encoder``); returns what was frozen."""
    frozen = []
    for name in parts:
        module = getattr(model, name, None)
        if not isinstance(module, nn.Module):
            raise InputError("-freeze", f"the model has no part named {name!r}")
        module.requires_grad_(False)
        frozen.append(name)
    return frozen
