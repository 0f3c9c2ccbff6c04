"""The training loop of ``train_3d.py``: in-context training of a SAM2 video model on 3D volumes.

One training step = one task (``icl.engine.train.tasks``): frames, each object's support masks, the propagation direction
and the truth. The masks go into SAM2's memory as conditioning frames, the engine's one propagation rule tracks the
other frames (``sam2_ext.track``, with grad), and the loss (``-loss``: SAM2's own by default, or Dice + BCE) is
back-propagated through mask decoder, memory attention, memory encoder and (unless frozen) the image encoder.

What the tasks are (``-tasks``): clips of the preprocessed datasets (the seed's samples; ``-classes``, ``-query_mode
context``, ``-same_case_support``, ``-classes_per_sample`` change them) and/or look-alike tasks generated on the
fly, which cannot be solved without reading the support, mixed along a step schedule. Model levers for training from
scratch: ``-qk_init`` (memory attention starts as a relative-position kernel), ``-multimask_tracking``.
``-time_limit_min`` caps the wall clock.

This module is the loop; the model comes from :mod:`icl.engine.train.step`, the tasks from :mod:`icl.engine.clips` and
:mod:`icl.engine.train.tasks`, the loss from :mod:`icl.engine.train.loop.losses`, validation from :mod:`icl.engine.train.loop.validation`.
Everything needed to continue a run exactly (weights, optimizer, scheduler, step counter, RNG states) goes into the
checkpoints; data order depends only on ``(seed, epoch)`` so a resumed run sees the same samples.
"""
from __future__ import annotations

import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from icl.data.loaders import set_epoch
from icl.engine import distributed as dd
from icl.engine.checkpoint import (epoch_path, export_weights, remove_stale_temps, resolve_resume, restore_rng,
                                   save_checkpoint, unwrap)
from icl.engine.clips import build_loaders, frames_record
from icl.engine.feature_cache import make_feature_cache
from icl.engine.train.adapters import adapter_record, check_record, export_merged, lora_setup
from icl.engine.train.logging import RunLogger, make_logger
from icl.engine.train.losses import TaskLoss
from icl.engine.train.step import (ICLStep, count_parameters, flops_per_frame, positional_memory_init,
                                   set_multimask_tracking)
from icl.engine.train.validation import SELECTION, validate_tasks
from icl.errors import InputError
from icl.io import atomic_path, write_json
from icl.model.build import build_predictor
from icl.model.lora import load_trained_state, trained_state
from icl.model.precision import amp_setup, autocast
from icl.model.weights import load_checkpoint
from icl.options.spec import run_command
from icl.options.train import TrainConfig, parse_train_args
from icl.progress import progress
from sam2_ext.build import weights_have_memory


# ----------------------------------------------------------------------------------------------------- pieces
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) so random init and sampling repeat."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                   min_ratio: float = 0.01, kind: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to ``min_ratio * lr`` (or constant); stepped once per optimizer step."""
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        done = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    peft: dict[str, Any] | None = None  # -peft lora: the adapters' record (icl.engine.train.loop.adapters.lora_setup)
    frames: dict[str, Any] = field(default_factory=dict)  # how the frames were made (clips.frames_record)

    def saved_config(self) -> dict[str, Any]:
        """The flags, and how the frames were made: what checkpoints, exports and config.json record."""
        return {**self.cfg.to_dict(), "frames": self.frames}


def shown_value(value: float) -> str:
    """A logged value on the epoch line: four decimals, or four significant digits below 0.01 (an lr of 5e-5
    printed as 0.0000 looks like training stopped)."""
    return f"{value:.4g}" if value != 0 and abs(value) < 0.01 else f"{value:.4f}"


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
    # a resumed run's weights come from its checkpoint; with -peft lora its base weights are -pretrain's
    weights = None if resume_file is not None and cfg.peft == "none" else cfg.pretrain
    predictor = build_predictor(cfg.config, device, weights, cfg.image_size, cfg.memory_selector, cfg.frozen_parts)
    peft = lora_setup(predictor, cfg) if cfg.peft == "lora" else None
    if cfg.multimask_tracking != "config":
        set_multimask_tracking(predictor, cfg.multimask_tracking == "on")
    # the kernel start only where memory attention is new: from scratch, or on LiteMedSAM's weights (which have none)
    if cfg.qk_init > 0 and resume_file is None and (weights is None or not weights_have_memory(weights)):
        positional_memory_init(predictor, cfg.qk_init)
    predictor.prior_gain = cfg.mask_prior_gain  # the mask prior as a residual too (sam2_ext.priors)
    predictor.prior_resolution = cfg.mask_prior_res
    step = ICLStep(predictor, aux_probe=cfg.aux > 0).to(device)
    step.feature_cache = make_feature_cache(cfg, info, predictor)
    step_module = dd.wrap_ddp(step, info, device)
    params = [p for p in step.parameters() if p.requires_grad]  # the model's, and the auxiliary probe's
    if not params:
        raise InputError("-freeze", "every parameter is frozen; nothing to train")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_loader, val_loader = build_loaders(cfg, info, run_dir)
    steps_per_epoch = len(train_loader) if not cfg.steps_per_epoch else min(cfg.steps_per_epoch, len(train_loader))
    if steps_per_epoch == 0:
        raise InputError("-data_path", "the training split has no samples")
    scheduler = make_scheduler(optimizer, cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch),
                               kind=cfg.lr_schedule)
    amp_dtype, scaler = amp_setup(cfg.amp, device)
    frames = frames_record(cfg, info)
    if info.is_main:
        write_json(run_dir / "config.json", {**cfg.to_dict(), "frames": frames})
    logger = make_logger(cfg.wandb_enabled, run_dir, run_dir.name, cfg.to_dict(), info.is_main)
    output_prior = cfg.mask_prior_gain if cfg.mask_prior_res == "output" else 0.0  # sam2_ext.priors
    loss_fn = TaskLoss(cfg.loss, cfg.out_size, cfg.mask_logits, cfg.obj_loss_weight, cfg.aux, output_prior).to(device)
    run = Run(cfg, device, info, run_dir, predictor, step_module, loss_fn, optimizer, scheduler, scaler,
              amp_dtype, train_loader, val_loader, steps_per_epoch, logger, peft=peft, frames=frames)
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
    record = adapter_record(ck)
    if (record is None) != (run.peft is None):
        raise InputError("-resume", f"{path} was trained with -peft {'none' if record is None else 'lora'}, "
                                    f"not {run.cfg.peft}")
    if record is not None:  # base weights came from -pretrain (hash-checked); the adapters from the checkpoint
        check_record(record, run.cfg, path)
        if record["base_hash"] != run.peft["base_hash"]:
            raise InputError("-resume", f"{path} adapts other base weights than -pretrain {run.cfg.pretrain}")
        load_trained_state(run.predictor, ck["model"], str(path))
    else:
        run.predictor.load_state_dict(ck["model"])
    probe = unwrap(run.step_module).aux_probe
    if probe is not None and "aux_probe" in (ck.get("extra") or {}):
        probe.load_state_dict(ck["extra"]["aux_probe"])
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
    """One pass over (at most ``steps_per_epoch``) training tasks; returns the mean loss terms over ranks."""
    run.step_module.train()
    set_epoch(run.train_loader, epoch)
    sums: dict[str, float] = {}
    bar = progress(run.train_loader, enabled=run.info.is_main, total=run.steps_per_epoch, desc=f"epoch {epoch}")
    n = 0
    for task in bar:
        if n >= run.steps_per_epoch or (n > 0 and out_of_time(run)):  # at least one step per epoch
            break
        terms = train_step(run, task.to(run.device))
        n += 1
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.set_postfix(loss=f"{terms['loss']:.4f}")
        run.logger.log({f"train/{k}": v for k, v in terms.items()}, step=run.progress.step)
    bar.close()
    return dd.all_reduce_mean(dd.with_all_keys({k: v / max(1, n) for k, v in sums.items()}, run.info), run.info)


def train_step(run: Run, task: Any) -> dict[str, float]:
    """Forward one task, back-propagate, clip, step optimizer and scheduler (loss: ``-loss``, see objective.py)."""
    with autocast(run.device, run.amp_dtype):
        out = run.step_module(task)
    terms = run.loss_fn(out, task)
    loss = terms["loss"]
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if run.cfg.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in run.predictor.parameters() if p.requires_grad], run.cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.progress.step += 1
    return {**{k: float(v.detach()) for k, v in terms.items()}, "lr": float(run.optimizer.param_groups[0]["lr"])}


def validate(run: Run) -> tuple[dict[str, float], list[tuple[np.ndarray, str]]]:
    """Validation metrics (``icl.engine.train.loop.validation``), reduced over ranks, and overlays for the logger."""
    model = unwrap(run.step_module)
    model.eval()
    try:
        return validate_tasks(model, run.val_loader, run.info, run.device, run.amp_dtype, run.cfg.out_size,
                              run.cfg.val_samples, run.cfg.log_images)
    finally:
        model.train()


# ----------------------------------------------------------------------------------------------------- checkpoints
def write_checkpoints(run: Run, improved: bool) -> None:
    """epoch_N.pth, then last.pth (and best.pth) as atomic copies of it; rank 0 only."""
    if not run.info.is_main:
        return
    p = run.progress
    probe = unwrap(run.step_module).aux_probe
    extra = {"aux_probe": probe.state_dict()} if probe is not None else {}
    if run.peft is not None:
        extra["peft"] = run.peft
    state = trained_state(run.predictor) if run.peft is not None else None  # -peft lora: the adapters alone
    path = save_checkpoint(epoch_path(run.run_dir, p.epoch), run.predictor, run.optimizer, run.scheduler, p.epoch,
                           p.step, run.saved_config(), p.best_metric, scaler=run.scaler, extra=extra,
                           model_state=state)
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


def cache_counts(cache: Any) -> dict[str, float]:
    """Slices the feature cache encoded and read so far (``-feature_cache auto``; real crops apart): its hit rate."""
    if cache is None:
        return {}
    out = {"cache/encoded": float(cache.computed), "cache/read": float(cache.read)}
    if cache.crops is not None:
        out |= {"cache/crops_encoded": float(cache.crops.computed), "cache/crops_read": float(cache.crops.read)}
    return out


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
        record |= cache_counts(unwrap(run.step_module).feature_cache)
        improved = False
        if should_validate(cfg, epoch) or stop:
            metrics, overlays = validate(run)
            record |= metrics
            score = metrics[SELECTION]
            improved = not math.isnan(score) and (p.best_metric is None or score > p.best_metric)
            if improved:
                p.best_metric = score
            run.logger.log_overlays("val/overlays", overlays, step=p.step)
            run.summary["last_val"] = metrics
        run.logger.log(record, step=p.step)
        write_checkpoints(run, improved)
        dd.barrier(run.info)
        if run.info.is_main:
            shown = ", ".join(f"{k.removeprefix('epoch/')} {shown_value(v)}" for k, v in record.items()
                              if isinstance(v, float) and k != "epoch/seconds")  # loss/* are losses, val/* scores
            print(f"epoch {epoch}/{cfg.epochs} step {p.step}: {shown}", file=sys.stderr)
        if stop:
            if run.info.is_main:
                print(f"note: -time_limit_min {cfg.time_limit_min:g} reached after epoch {epoch}; stopping",
                      file=sys.stderr)
            run.summary["stopped_by_time_limit"] = True
            break
    run.summary.update(run_dir=str(run.run_dir), epoch=p.epoch, step=p.step, best_metric=p.best_metric)
    if cfg.export and run.info.is_main:
        best = run.run_dir / "best.pth"
        source = best if best.is_file() else run.run_dir / "last.pth"
        exported = export_weights(source, cfg.export) if run.peft is None else \
            export_merged(source, cfg.export, cfg.config, cfg.image_size)  # adapters merged: official layout
        run.summary["exported"] = str(exported)
        print(f"exported the weights of {source} to {cfg.export}", file=sys.stderr)
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
