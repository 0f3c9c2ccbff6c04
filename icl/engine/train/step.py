"""What training adds to the model: :class:`ICLStep` (one in-context forward pass as an ``nn.Module``, what DDP
wraps), the levers for training from scratch and what training measures of it. Building the predictor is
``icl.model.build`` (shared with the CLI and the API)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from icl.engine.train.tasks import Task
from sam2_ext.track import track


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def frozen_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that have parameters and train none of them (``-freeze``; LoRA's frozen base layers).

    Why they stay in eval mode while the rest trains: LiteMedSAM's TinyViT normalises with BatchNorm. In train mode a
    frozen encoder would normalise every slice by the statistics of the slices in hand, not by its pretrained running
    statistics, and overwrite those statistics a little at every step. Training would then read other features than
    evaluation and inference do (logits off by up to 10 on a fresh model), and the exported weights would carry the
    statistics of the last training slices: a model that fits its training tasks and segments nothing at evaluation.
    """
    return [m for m in model.modules()
            if any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters())]


class ICLStep(nn.Module):
    """One in-context forward pass over a :class:`~icl.engine.train.tasks.Task`, as an ``nn.Module`` (what DDP wraps).

    Runs the engine's one propagation rule (``sam2_ext.track.track``, with grad in grad mode) and returns
    ``logits`` [N, K, h, w] (low resolution, every frame), ``object_score_logits`` [N, K] and ``tracked``:
    ``[(frame, Tracked)]``, the heads' raw outputs the SAM2 loss reads (grad mode only). With ``aux_probe`` a
    training-only 1x1 convolution reads the memory-conditioned features of every tracked frame (``probe``:
    ``[(frame, columns, logits [K, 1, h', w'])]``) for the auxiliary loss (``icl.engine.train.loop.losses``); it is part of
    this step, not of the model, so DDP keeps it in step on every rank and the exported weights never hold it.
    """

    def __init__(self, predictor: nn.Module, aux_probe: bool = False):
        super().__init__()
        self.predictor = predictor
        self.aux_probe = nn.Conv2d(predictor.hidden_dim, 1, kernel_size=1) if aux_probe else None
        self.feature_cache = None  # icl.engine.feature_cache.FeatureCache: stored encoder outputs of dataset slices

    def train(self, mode: bool = True) -> "ICLStep":
        """Train mode, except in frozen parts (see :func:`frozen_modules`): they stay in eval mode."""
        super().train(mode)
        if mode:
            for module in frozen_modules(self.predictor):
                module.eval()
        return self

    def forward(self, task: Task) -> dict:
        cache = self.feature_cache
        features = cache.source(task.sources, task.frames) if cache is not None else None
        results = sorted(track(self.predictor, task.frames, task.prompts, task.direction,
                               grad=torch.is_grad_enabled(), features=features, priors=task.priors),
                         key=lambda r: r.index)
        tracked = [(r.index, t) for r in results for t in r.tracked]
        out = {"logits": torch.stack([r.logits for r in results]),
               "object_score_logits": torch.stack([r.object_score_logits for r in results]), "tracked": tracked}
        if self.aux_probe is not None:
            out["probe"] = [(f, t.columns, self.aux_probe(t.memory_features.float())) for f, t in tracked]
        return out


def positional_memory_init(predictor: nn.Module, constant: float) -> None:
    """Start every memory cross-attention as a pure relative-position kernel (``-qk_init``).

    Why: from random init the q/k projections make memory attention nearly uniform, so a query location reads the
    average of the memory and the support mask's *where* is lost; the model then learns to ignore its memory. With
    the q/k weights zeroed and their biases set to ``constant``, q.k at the start is RoPE's relative-position kernel
    alone: each location reads the memory at its own place (on the tiny model's 8x8 grid, c = 4 puts ~80 % of the
    weight there). Training then moves q/k freely. Only for a model trained from scratch.
    """
    with torch.no_grad():
        for layer in predictor.memory_attention.layers:
            attn = layer.cross_attn_image
            for proj in (attn.q_proj, attn.k_proj):
                proj.weight.zero_()
                proj.bias.fill_(constant)


def set_multimask_tracking(predictor: nn.Module, on: bool) -> None:
    """Track with SAM2's 3 candidate masks (the IoU head picks one) or with its single mask token."""
    predictor.multimask_output_for_tracking = bool(on)
    if not on:  # SAM2's fallback to the multimask tokens on "unstable" masks would pick untrained candidates
        predictor.sam_mask_decoder.dynamic_multimask_via_stability = False


def flops_per_frame(step: ICLStep, image_size: int, device: str) -> int:
    """Forward FLOPs per slice, averaged over one support and one query slice (FlopCounterMode).

    Counted with grad mode on: torch's module tracker inside FlopCounterMode trips over parameter views under
    no_grad; the forward FLOPs are the same either way.
    """
    gen = torch.Generator().manual_seed(0)  # private generator: leaves the global RNG (and resume) untouched
    frames = torch.rand(2, image_size, image_size, generator=gen).to(device)
    mask = torch.zeros(image_size, image_size, device=device)
    q = image_size // 4
    mask[q:3 * q, q:3 * q] = 1.0
    task = Task(frames, {0: {0: mask}}, "forward", torch.zeros(1, 2, image_size, image_size, device=device), [1])
    was_training = step.training
    step.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.enable_grad(), counter:
            step(task)
    finally:
        step.train(was_training)
    return int(counter.get_total_flops() // 2)
