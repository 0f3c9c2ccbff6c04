"""The training loop of ``train_3d.py``: in-context fine-tuning of a SAM2 video model on 3D volumes.

One training sample = support slices with their GT mask (written into SAM2's memory as conditioning frames) plus
query slices that SAM2 tracks from that memory; the loss (Dice + BCE/focal) is taken on the query logits and
back-propagated through mask decoder, memory attention, memory encoder and (unless frozen) the image encoder.

Options that change what a sample asks of the model (defaults = the seed's recipe): ``-classes`` (train on some
classes only, e.g. hold one out), ``-query_mode context`` (query clips reach past the object: empty slices and other
classes), ``-same_case_support p`` (supports from the query scan itself), ``-classes_per_sample K`` (K classes on
the same query slices, each with its own support masks). ``-time_limit_min`` caps the wall clock.

This module is the loop; the model comes from :mod:`icl.engine.model`, the clips from :mod:`icl.engine.clips` and
mixed precision from :mod:`icl.engine.precision`. Everything needed to continue a run exactly (weights, optimizer,
scheduler, step counter, RNG states) goes into the checkpoints; data order depends only on ``(seed, epoch)`` so a
resumed run sees the same samples.
"""
from __future__ import annotations

import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
import torch.distributed as dist
from torch import nn

from icl.config import TrainConfig, parse_train_args
from icl.data.loaders import set_epoch
from icl.engine import distributed as dd
from icl.engine.checkpoint import (
    epoch_path,
    load_checkpoint,
    remove_stale_temps,
    resolve_resume,
    restore_rng,
    save_checkpoint,
    unwrap,
)
from icl.engine.clips import build_loaders, unpack
from icl.engine.logging import RunLogger, make_logger, overlay
from icl.engine.losses import ICLLoss
from icl.engine.model import ICLStep, build_predictor, count_parameters, flops_per_frame
from icl.engine.precision import amp_setup, autocast
from icl.errors import InputError
from icl.io import atomic_path, write_json
from icl.options import run_command
from icl.progress import progress


# ----------------------------------------------------------------------------------------------------- pieces
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) so random init and sampling repeat."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                   min_ratio: float = 0.01) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to ``min_ratio * lr``; stepped once per optimizer step."""
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_dice(logits: torch.Tensor, target: torch.Tensor) -> float:
    """3D Dice over all query slices of one sample at ``logit > 0``; NaN when both are empty (not scored)."""
    pred = logits.detach() > 0
    truth = target > 0.5
    denom = int(pred.sum()) + int(truth.sum())
    if denom == 0:
        return math.nan
    return 2.0 * int((pred & truth).sum()) / denom


# ----------------------------------------------------------------------------------------------------- the run
@dataclass
class Progress:
    """Counters saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best_metric: float | None = None


@dataclass
class Run:
    """Everything the loop functions share (built once by :func:`setup`)."""

    cfg: TrainConfig
    device: str
    info: dd.DistInfo
    run_dir: Path
    predictor: nn.Module
    step_module: nn.Module  # ICLStep, DDP-wrapped in a distributed job
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    train_loader: Any
    val_loader: Any
    steps_per_epoch: int
    logger: RunLogger
    progress: Progress = field(default_factory=Progress)
    summary: dict[str, Any] = field(default_factory=dict)
    deadline: float | None = None  # time.time() at which -time_limit_min runs out


def _new_run_dir(cfg: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d_%H%M%S")
    base = Path(cfg.checkpoint_path) / f"{cfg.exp_name}_{stamp}"
    run_dir, n = base, 1
    while run_dir.exists():
        run_dir, n = base.with_name(f"{base.name}_{n}"), n + 1
    return run_dir


def setup(cfg: TrainConfig) -> Run:
    """Process group, run folder, model, optimizer, data, logger; resume state if asked."""
    info, device = dd.init_distributed(cfg.distributed, cfg.device)
    seed_everything(cfg.seed)
    resume_file = resolve_resume(cfg.resume) if cfg.resume else None
    run_dir = resume_file.parent if resume_file else dd.broadcast_object(_new_run_dir(cfg) if info.is_main else None, info)
    weights = None if resume_file is not None else cfg.pretrain  # a resumed run's weights come from its checkpoint
    predictor = build_predictor(cfg.config, device, weights, cfg.image_size, cfg.memory_selector, cfg.frozen_parts)
    step_module = dd.wrap_ddp(ICLStep(predictor, cfg.out_size), info, device)
    params = [p for p in predictor.parameters() if p.requires_grad]
    if not params:
        raise InputError("-freeze", "every parameter is frozen; nothing to train")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_loader, val_loader = build_loaders(cfg, info, run_dir)
    steps_per_epoch = len(train_loader) if not cfg.steps_per_epoch else min(cfg.steps_per_epoch, len(train_loader))
    if steps_per_epoch == 0:
        raise InputError("-data_path", "the training split has no samples")
    scheduler = make_scheduler(optimizer, cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch))
    amp_dtype, scaler = amp_setup(cfg.amp, device)
    if info.is_main:
        write_json(run_dir / "config.json", cfg.to_dict())
    logger = make_logger(cfg.wandb_enabled, run_dir, run_dir.name, cfg.to_dict(), info.is_main)
    run = Run(cfg, device, info, run_dir, predictor, step_module, ICLLoss().to(device), optimizer, scheduler, scaler,
              amp_dtype, train_loader, val_loader, steps_per_epoch, logger)
    _report_model(run)
    if resume_file is not None:
        _resume(run, resume_file)
    return run


def _report_model(run: Run) -> None:
    trainable, total = count_parameters(run.predictor)
    count = run.cfg.count_flops and run.info.is_main
    flops = flops_per_frame(unwrap(run.step_module), run.cfg.image_size, run.device) if count else None
    run.summary.update(trainable_params=trainable, total_params=total, flops_per_frame=flops)
    if run.info.is_main:
        shown = f"{flops / 1e9:.3f} GFLOPs per frame (forward, {run.cfg.image_size}px)" if flops else "FLOPs not counted"
        print(f"model: {trainable:,} trainable / {total:,} parameters; {shown}; run folder {run.run_dir}",
              file=sys.stderr)


def _resume(run: Run, path: Path) -> None:
    """Load weights, optimizer, scheduler, scaler, counters and RNG states saved at the end of an epoch."""
    ck = load_checkpoint(path, map_location="cpu")
    saved = ck.get("config") or {}
    for key in ("config", "image_size", "dataset"):
        if key in saved and saved[key] != getattr(run.cfg, key):
            raise InputError("-resume", f"{path} was trained with -{key} {saved[key]}, not {getattr(run.cfg, key)}")
    run.predictor.load_state_dict(ck["model"])
    run.optimizer.load_state_dict(ck["optimizer"])
    if ck.get("scheduler") is not None:
        run.scheduler.load_state_dict(ck["scheduler"])
    if ck.get("scaler") is not None:
        run.scaler.load_state_dict(ck["scaler"])
    run.progress = Progress(epoch=int(ck["epoch"]), step=int(ck["step"]), best_metric=ck.get("best_metric"))
    restore_rng(ck["rng"])
    if run.info.is_main:
        remove_stale_temps(run.run_dir)
        print(f"resumed from {path} (epoch {run.progress.epoch}, step {run.progress.step})", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------- epochs
def train_one_epoch(run: Run, epoch: int) -> dict[str, float]:
    """One pass over (at most ``steps_per_epoch``) training samples; returns the mean loss terms over ranks."""
    run.step_module.train()
    set_epoch(run.train_loader, epoch)
    sums = {"loss": 0.0, "dice_loss": 0.0, "ce_loss": 0.0, "obj_loss": 0.0}
    bar = progress(run.train_loader, enabled=run.info.is_main, total=run.steps_per_epoch, desc=f"epoch {epoch}")
    n = 0
    for batch in bar:
        if n >= run.steps_per_epoch or (n > 0 and out_of_time(run)):  # at least one step per epoch
            break
        terms = train_step(run, unpack(batch, run.device))
        n += 1
        for k in sums:
            sums[k] += terms[k]
        bar.set_postfix(loss=f"{terms['loss']:.4f}")
        run.logger.log({f"train/{k}": v for k, v in terms.items()}, step=run.progress.step)
    bar.close()
    means = dd.all_reduce_mean({k: v / max(1, n) for k, v in sums.items()}, run.info)
    return means


def train_step(run: Run, sample: Mapping[str, Any]) -> dict[str, float]:
    """Forward one sample, back-propagate, clip, step optimizer and scheduler."""
    with autocast(run.device, run.amp_dtype):
        out = run.step_module(sample["image"], sample["label"], sample["support_image"], sample["support_label"],
                              sample["class_id"])
    terms = run.loss_fn.terms(out["logits"], out["target"])
    # SAM2 replaces the masks of slices it calls "object absent" by a constant, which carries no gradient; so the
    # presence head is trained too (BCE against "the slice holds the class"), as in SAM2's own training.
    obj = F.binary_cross_entropy_with_logits(out["object_score_logits"].float(), out["present"].float())
    loss = terms["loss"] + run.cfg.obj_loss_weight * obj
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if run.cfg.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in run.predictor.parameters() if p.requires_grad], run.cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.progress.step += 1
    return {"loss": float(loss.detach()), "dice_loss": float(terms["dice"].detach()),
            "ce_loss": float(terms["ce"].detach()), "obj_loss": float(obj.detach()),
            "lr": float(run.optimizer.param_groups[0]["lr"])}


@torch.no_grad()
def validate(run: Run) -> tuple[dict[str, float], list[tuple[np.ndarray, str]]]:
    """Mean per-class 3D Dice over this rank's validation samples, reduced over ranks (each sample once)."""
    model = unwrap(run.step_module)
    model.eval()
    sums: dict[str, float] = {}
    overlays: list[tuple[np.ndarray, str]] = []
    limit = run.cfg.val_samples or None
    bar = progress(run.val_loader, enabled=run.info.is_main, desc="validate")
    for i, batch in enumerate(bar):
        if limit is not None and i >= limit:
            break
        s = unpack(batch, run.device)
        with autocast(run.device, run.amp_dtype):
            out = model(s["image"], s["label"], s["support_image"], s["support_label"], s["class_id"])
        logits, target = out["logits"], out["target"]
        dice = clip_dice(logits, target)
        if not math.isnan(dice):
            key = f"c{s['class_id']}"
            sums[f"{key}_sum"] = sums.get(f"{key}_sum", 0.0) + dice
            sums[f"{key}_n"] = sums.get(f"{key}_n", 0.0) + 1
        if len(overlays) < run.cfg.log_images:
            overlays.append(_overlay_of(s, logits, target, dice))
    bar.close()
    model.train()
    return _per_class(_reduce_keyed_sums(sums, run.info)), overlays


def _reduce_keyed_sums(sums: dict[str, float], info: dd.DistInfo) -> dict[str, float]:
    """Sum ``{key: value}`` over ranks whose key sets may differ (classes seen on each rank)."""
    keys = sorted(set().union(*dd.all_gather_objects(sorted(sums), info)))
    return dd.all_reduce_sum({k: sums.get(k, 0.0) for k in keys}, info)


def _per_class(sums: Mapping[str, float]) -> dict[str, float]:
    out = {}
    for key in sorted(k[:-4] for k in sums if k.endswith("_sum")):
        n = sums[f"{key}_n"]
        if n:
            out[f"val/dice_class_{key[1:]}"] = sums[f"{key}_sum"] / n
    out["val/dice_mean"] = float(np.mean(list(out.values()))) if out else math.nan
    return out


def _overlay_of(s: Mapping[str, Any], logits: torch.Tensor, target: torch.Tensor, dice: float) -> tuple[np.ndarray, str]:
    """Overlay of the query slice with the most ground truth (prediction red, truth green)."""
    area = target[:, 0].flatten(1).sum(1)
    t = int(area.argmax())
    image = F.interpolate(s["image"][t][None, None], size=target.shape[-2:], mode="bilinear")[0, 0]
    pic = overlay(image.float().cpu().numpy(), (logits[t, 0] > 0).float().cpu().numpy(), target[t, 0].float().cpu().numpy())
    return pic, f"{s['name']} class {s['class_id']} slice {t} dice {dice:.3f}"


# ----------------------------------------------------------------------------------------------------- checkpoints
def write_checkpoints(run: Run, improved: bool) -> None:
    """epoch_N.pth, then last.pth (and best.pth) as atomic copies of it; rank 0 only."""
    if not run.info.is_main:
        return
    p = run.progress
    path = save_checkpoint(epoch_path(run.run_dir, p.epoch), run.predictor, run.optimizer, run.scheduler, p.epoch,
                           p.step, run.cfg, p.best_metric, scaler=run.scaler)
    _atomic_copy(path, run.run_dir / "last.pth")
    if improved:
        _atomic_copy(path, run.run_dir / "best.pth")
    if run.cfg.keep_epochs:
        for old in sorted(run.run_dir.glob("epoch_*.pth"), key=lambda q: int(q.stem.split("_")[1]))[:-run.cfg.keep_epochs]:
            old.unlink(missing_ok=True)


def _atomic_copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def should_validate(cfg: TrainConfig, epoch: int) -> bool:
    return epoch % cfg.val_freq == 0 or epoch == cfg.epochs


def out_of_time(run: Run) -> bool:
    """True once ``-time_limit_min`` of wall clock has passed since :func:`fit` started (never when 0).

    Rank 0's clock decides for every rank, so no rank waits in a collective the others have left."""
    if run.deadline is None:
        return False
    late = time.time() >= run.deadline
    return bool(dd.broadcast_object(late, run.info)) if run.info.world_size > 1 else late


def fit(run: Run) -> dict[str, Any]:
    """Epoch loop from the resumed (or zero) epoch to ``cfg.epochs``."""
    cfg, p = run.cfg, run.progress
    run.deadline = time.time() + 60.0 * cfg.time_limit_min if cfg.time_limit_min > 0 else None
    for epoch in range(p.epoch + 1, cfg.epochs + 1):
        t0 = time.time()
        means = train_one_epoch(run, epoch)
        p.epoch = epoch
        stop = out_of_time(run) and epoch < cfg.epochs
        record = {f"epoch/{k}": v for k, v in means.items()} | {"epoch": epoch, "epoch/seconds": time.time() - t0}
        improved = False
        if should_validate(cfg, epoch) or stop:
            metrics, overlays = validate(run)
            record |= metrics
            score = metrics["val/dice_mean"]
            improved = not math.isnan(score) and (p.best_metric is None or score > p.best_metric)
            if improved:
                p.best_metric = score
            run.logger.log_overlays("val/overlays", overlays, step=p.step)
            run.summary["last_val"] = metrics
        run.logger.log(record, step=p.step)
        write_checkpoints(run, improved)
        dd.barrier(run.info)
        if run.info.is_main:
            shown = ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in record.items()
                              if isinstance(v, float) and k != "epoch/seconds")
            print(f"epoch {epoch}/{cfg.epochs} step {p.step}: {shown}", file=sys.stderr)
        if stop:
            if run.info.is_main:
                print(f"note: -time_limit_min {cfg.time_limit_min:g} reached after epoch {epoch}; stopping",
                      file=sys.stderr)
            run.summary["stopped_by_time_limit"] = True
            break
    run.summary.update(run_dir=str(run.run_dir), epoch=p.epoch, step=p.step, best_metric=p.best_metric)
    return run.summary


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train as configured; returns a summary (run folder, epochs, steps, best Dice, model size, FLOPs)."""
    run = None
    info = dd.DistInfo()
    try:
        run = setup(cfg)
        info = run.info
        return fit(run)
    finally:
        if run is not None:
            run.logger.finish()
        dd.cleanup(info if run is not None else _current_info())


def _current_info() -> dd.DistInfo:
    return dd.DistInfo(backend=dist.get_backend()) if dist.is_available() and dist.is_initialized() else dd.DistInfo()


def main(argv: list[str] | None = None) -> int:
    """``train_3d.py`` entry: flags -> TrainConfig -> train; bad input prints one line and exits 2."""
    return run_command(parse_train_args, train, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
