"""The model side of the engine: build the predictor from the options, and what training measures of it.

Why here: training, evaluation and the API each built the predictor (model config, weights, memory selector) and
each wrote the ``recency`` special case; :func:`build_predictor` and :func:`make_memory_selector` are the one
place now. :class:`ICLStep` is one in-context forward pass as an ``nn.Module`` (what DDP wraps).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from icl.errors import InputError
from sam2_ext.icl import segment_with_support


def make_memory_selector(value: str | None):
    """THE ``-memory_selector`` / ``--memory-selector`` rule: a MemorySelector, or None for SAM2's own attention.

    None, an empty value and ``recency`` (SAM2's official rule) install no selector; anything else is parsed by
    ``sam2_ext.selector`` (whose OptionError names the option, spelled by the caller's ``library_errors``).
    """
    from sam2_ext.selector import MemorySelector, parse_selector_config

    if value is None or not str(value).strip() or parse_selector_config(value).policy == "recency":
        return None
    return MemorySelector.from_name(value)


def build_predictor(config: str | Path, device: str | torch.device, weights: str | Path | None = None,
                    image_size: int | None = None, memory_selector: str | None = None,
                    freeze: Iterable[str] = ()) -> nn.Module:
    """The ICL predictor of ``config`` on ``device``: ``weights`` loaded (None = random init), the memory selector
    installed and the ``freeze`` parts frozen. Train/eval mode is left to the caller."""
    from sam2_ext.build import build_icl_predictor

    predictor = build_icl_predictor(config, device=device, checkpoint=weights, image_size=image_size)
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


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


class ICLStep(nn.Module):
    """One in-context forward pass as an ``nn.Module``, so DDP's hooks see the whole step in ``forward``.

    ``forward`` returns ``logits``/``target`` ``[T, 1, out, out]`` and ``object_score_logits``/``present`` ``[T, 1]``
    for one sample (one class).
    """

    def __init__(self, predictor: nn.Module, out_size: int):
        super().__init__()
        self.predictor = predictor
        self.out_size = out_size

    def forward(self, image: torch.Tensor, label: torch.Tensor, support_image: torch.Tensor,
                support_label: torch.Tensor, class_id: int | Sequence[int]) -> dict[str, torch.Tensor]:
        """One class (``label`` [T, H, W], ``support_label`` [S, H, W], ``class_id`` int) or K classes tracked in
        one pass (``label`` [K, T, H, W], ``support_label`` [K, S, H, W], ``class_id`` K ids); outputs have C = K."""
        ids = [int(class_id)] if isinstance(class_id, int) else [int(c) for c in class_id]
        labels = label if label.dim() == 4 else label[None]
        supports = support_label if support_label.dim() == 4 else support_label[None]
        out = segment_with_support(self.predictor, support_image, {c: supports[i] for i, c in enumerate(ids)}, image,
                                   grad=torch.is_grad_enabled())
        logits = out["logits"]
        target = labels.transpose(0, 1).to(logits.dtype)  # [T, K, H, W]
        if logits.shape[-1] != self.out_size or logits.shape[-2] != self.out_size:
            logits = F.interpolate(logits, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        if target.shape[-2:] != logits.shape[-2:]:
            target = F.interpolate(target, size=logits.shape[-2:], mode="nearest")
        present = (labels.transpose(0, 1).flatten(2) > 0.5).any(2).to(logits.dtype)  # [T, K]
        return {"logits": logits, "target": target, "object_score_logits": out["object_score_logits"],
                "present": present}


def flops_per_frame(step: ICLStep, image_size: int, device: str) -> int:
    """Forward FLOPs per slice, averaged over one support and one query slice (FlopCounterMode).

    Counted with grad mode on: torch's module tracker inside FlopCounterMode trips over parameter views under
    no_grad; the forward FLOPs are the same either way.
    """
    gen = torch.Generator().manual_seed(0)  # private generator: leaves the global RNG (and resume) untouched
    frames = torch.rand(2, image_size, image_size, generator=gen).to(device)
    mask = torch.zeros(1, image_size, image_size, device=device)
    q = image_size // 4
    mask[:, q:3 * q, q:3 * q] = 1.0
    was_training = step.training
    step.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.enable_grad(), counter:
            step(frames[1:], torch.zeros_like(frames[1:]), frames[:1], mask, 1)
    finally:
        step.train(was_training)
    return int(counter.get_total_flops() // 2)
