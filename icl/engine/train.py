"""The training loop of ``train_3d.py``: in-context fine-tuning of a SAM2 video model on 3D volumes.

One training sample = support slices with their GT mask (written into SAM2's memory as conditioning frames) plus
query slices that SAM2 tracks from that memory; the loss (Dice + BCE/focal) is taken on the query logits and
back-propagated through mask decoder, memory attention, memory encoder and (unless frozen) the image encoder.

Options that change what a sample asks of the model (defaults = the seed's recipe): ``-classes`` (train on some
classes only, e.g. hold one out), ``-query_mode context`` (query clips reach past the object: empty slices and other
classes), ``-same_case_support p`` (supports from the query scan itself), ``-classes_per_sample K`` (K classes on
the same query slices, each with its own support masks). ``-time_limit_min`` caps the wall clock.

Everything needed to continue a run exactly (weights, optimizer, scheduler, step counter, RNG states) goes into
the checkpoints; data order depends only on ``(seed, epoch)`` so a resumed run sees the same samples.
"""
from __future__ import annotations

import dataclasses
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torch.distributed as dist
from torch import nn
from torch.utils.data import Subset
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from icl.config import TrainConfig, parse_train_args
from icl.data.loaders import ICLDataset, make_loader, open_caches, set_epoch
from icl.data.phantom import make_phantom_dataset
from icl.data.preprocess import preprocess_dataset
from icl.data.sampling import make_splits, spread
from icl.engine import distributed as dd
from icl.engine.checkpoint import (
    epoch_path,
    load_checkpoint,
    remove_stale_temps,
    resolve_resume,
    restore_rng,
    save_checkpoint,
)
from icl.engine.logging import RunLogger, make_logger, overlay
from icl.engine.losses import ICLLoss
from icl.engine.precision import amp_setup, autocast
from icl.errors import InputError, library_errors, report
from icl.io import atomic_path, write_json
from sam2_ext.build import build_icl_predictor
from sam2_ext.icl import segment_with_support
from sam2_ext.selector import MemorySelector


# ----------------------------------------------------------------------------------------------------- pieces
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) so random init and sampling repeat."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                   min_ratio: float = 0.01) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to ``min_ratio * lr``; stepped once per optimizer step."""
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def unpack(batch: Mapping[str, Any], device: str) -> dict[str, Any]:
    """A collated batch of one sample (contract in docs/CONTRACTS.md) -> tensors on ``device`` without batch dim."""
    def one(x: torch.Tensor) -> torch.Tensor:
        return (x[0] if x.dim() == 4 else x).to(device, non_blocking=True).float()

    cid = batch["class_id"]
    cid = int(cid.reshape(-1)[0]) if isinstance(cid, torch.Tensor) else int(cid[0] if isinstance(cid, (list, tuple)) else cid)
    name = batch.get("name", "")
    name = name[0] if isinstance(name, (list, tuple)) else str(name)
    sample = {"image": one(batch["image"]), "label": one(batch["label"]), "support_image": one(batch["support_image"]),
              "support_label": one(batch["support_label"]), "class_id": cid, "name": name}
    if "class_ids" in batch:  # -classes_per_sample > 1: K classes tracked together (TrainClipDataset)
        sample.update(class_id=[int(c) for c in batch["class_ids"].reshape(-1)],
                      label=batch["labels"][0].to(device).float(),
                      support_label=batch["support_labels"][0].to(device).float())
    return sample


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


def build_model(cfg: TrainConfig, device: str) -> nn.Module:
    """Predictor from the model config, with -pretrain weights, -freeze and -memory_selector applied."""
    predictor = build_icl_predictor(cfg.config, device=device, checkpoint=cfg.pretrain, image_size=cfg.image_size)
    if cfg.memory_selector.strip().lower() != "recency":
        predictor.memory_selector = MemorySelector.from_name(cfg.memory_selector)
    freeze_parts(predictor, cfg.frozen_parts)
    return predictor


# ----------------------------------------------------------------------------------------------------- data
PHANTOM_CASES = 8  # cases generated when -dataset phantom points at a folder that does not exist yet
COMBINED_PARTS = ("kits", "btcv", "msd")


def _layout_of(folder: Path) -> str:
    """Which reader a folder needs (used for phantom folders, which may be in any layout)."""
    if any(folder.glob("case_*/imaging.nii.gz")):
        return "kits"
    if (folder / "img").is_dir():
        return "btcv"
    if (folder / "imagesTr").is_dir():
        return "msd"
    raise InputError("-data_path", f"{folder}: no KiTS, BTCV or MSD layout found")


def _sources(cfg: TrainConfig) -> list[tuple[str, Path]]:
    """(layout, folder) pairs to cache; a missing phantom folder is generated first."""
    root = Path(cfg.data_path)
    if cfg.dataset == "phantom":
        if not root.exists():
            print(f"note: generating {PHANTOM_CASES} phantom cases in {root}", file=sys.stderr)
            make_phantom_dataset(root, "kits", PHANTOM_CASES, seed=cfg.seed)
        return [(_layout_of(root), root)]
    if cfg.dataset == "combined":
        parts = [(name, root / name) for name in COMBINED_PARTS if (root / name).is_dir()]
        if not parts:
            raise InputError("-data_path", f"combined: expected sub-folders {', '.join(COMBINED_PARTS)} in {root}")
        return parts
    return [(cfg.dataset, root)]


def prepare_caches(cfg: TrainConfig, info: dd.DistInfo) -> list[Path]:
    """Preprocess (once, on rank 0; valid entries are skipped) and return the cache folders."""
    base = Path(cfg.cache_dir) if cfg.cache_dir else Path("cache")
    sources: list[tuple[str, Path]] = []
    problem = None
    if info.is_main:
        try:
            sources = _sources(cfg)
            for layout, folder in sources:
                preprocess_dataset(layout, folder, base / f"{cfg.dataset}_{folder.name}_{cfg.image_size}",
                                   image_size=cfg.image_size, progress=True)
        except InputError as err:
            problem = (err.where, err.problem)
    # rank 0's outcome goes to every rank, so a bad file stops the whole job instead of hanging the others
    sources, problem = dd.broadcast_object((sources, problem), info)
    if problem is not None:
        raise InputError(*problem)
    return [base / f"{cfg.dataset}_{folder.name}_{cfg.image_size}" for _, folder in sources]


def context_window(object_slices: np.ndarray, num_slices: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``length`` consecutive slice indices holding at least one slice of the object, at a random offset.

    Unlike the seed's clips (only slices with the class) such a window also reaches past the object's ends, so a
    model that segments "whatever object is there" without reading its support memory is penalised on slices
    where the class is absent or where only other classes are.
    """
    length = min(length, num_slices)
    centre = int(object_slices[int(rng.integers(len(object_slices)))])
    start = centre - int(rng.integers(length))
    start = min(max(start, 0), num_slices - length)
    return np.arange(start, start + length, dtype=np.int64)


class TrainClipDataset(ICLDataset):
    """The seed's training samples, optionally changed so that ignoring the support costs loss.

    * ``query_mode="context"``: the query clip becomes a :func:`context_window` (the label is the class's mask on
      every slice of the window, often empty);
    * ``same_case_support=p``: with probability ``p`` the support slices come from the query scan itself (spread
      over the class's slices, as ``segment_volume_with_support`` gets them at inference). Object intensities are
      random per scan, so a same-scan support also gives an intensity cue, not only shape;
    * ``classes_per_sample=K``: K classes on the same query slices, each with its own support masks
      (:meth:`_with_more_classes`).

    The last two replace the supports ``ICLDataset`` chose (also a fixed ``-support_instance``) when they apply.
    """

    def __init__(self, *args: Any, query_mode: str = "gt_slices", same_case_support: float = 0.0,
                 classes_per_sample: int = 1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.query_mode, self.same_case_support = query_mode, same_case_support
        self.classes_per_sample = classes_per_sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = super().__getitem__(index)
        if self.query_mode == "gt_slices" and self.same_case_support <= 0 and self.classes_per_sample <= 1:
            return sample
        case = next(c for c in self.cases if c.id == sample["name"])
        cid = sample["class_id"]
        rng = np.random.default_rng([self.seed, self.epoch, index, 1])
        if self.query_mode == "context":
            idx = context_window(case.slices_with(cid), case.num_slices, self.video_length, rng)
            sample["image"] = torch.from_numpy(np.ascontiguousarray(case.image[idx], dtype=np.float32))
            sample["label"] = torch.from_numpy(case.mask(cid, idx))
            sample["slice_index"] = torch.from_numpy(idx)
        same = rng.random() < self.same_case_support
        if self.classes_per_sample > 1:
            return self._with_more_classes(sample, case, case if same else None, rng)
        if same:
            sup = spread(case.slices_with(cid), self.num_support)
            sample["support_image"] = torch.from_numpy(np.ascontiguousarray(case.image[sup], dtype=np.float32))
            sample["support_label"] = torch.from_numpy(case.mask(cid, sup))
        return sample

    def _with_more_classes(self, sample: dict[str, Any], case: Any, support: Any, rng: np.random.Generator) -> dict:
        """Add ``class_ids`` [K], ``labels`` [K, T, H, W] and ``support_labels`` [K, S', H, W]: the sampled class plus
        K-1 others of the query scan, all on the same query slices. The support slices (S' = K * num_support) are
        each class's ``num_support`` slices of one support scan, every class's mask on all of them. Same query,
        different support, different target: a model that ignores its memory cannot fit this."""
        cid = sample["class_id"]
        if support is None:
            pool = [c for c in self.support_pool if c is not case and cid in c.class_ids()]
            support = pool[int(rng.integers(len(pool)))] if pool else case
        shared = [c for c in self.class_ids if c != cid and c in case.class_ids() and c in support.class_ids()]
        others = rng.permutation(shared)[:self.classes_per_sample - 1].tolist() if shared else []
        ids = [cid, *[int(c) for c in others]]
        sup = np.concatenate([spread(support.slices_with(c), self.num_support) for c in ids])
        idx = sample["slice_index"].numpy()
        sample["support_image"] = torch.from_numpy(np.ascontiguousarray(support.image[sup], dtype=np.float32))
        sample["support_label"] = torch.from_numpy(support.mask(cid, sup))
        sample["class_ids"] = torch.tensor(ids, dtype=torch.int64)
        sample["labels"] = torch.from_numpy(np.stack([case.mask(c, idx) for c in ids]))
        sample["support_labels"] = torch.from_numpy(np.stack([support.mask(c, sup) for c in ids]))
        return sample


def _single_dash(err: InputError) -> InputError:
    """The data modules name their own ``--flags``; train_3d.py spells the same options with one dash."""
    where = err.where[1:] if err.where.startswith("--") else err.where
    return InputError(where, err.problem)


def build_loaders(cfg: TrainConfig, info: dd.DistInfo, run_dir: Path | None = None) -> tuple[Any, Any]:
    """Train loader (order depends only on (seed, epoch); sharded over ranks) and this rank's val shard.

    Cases are split by ``-fold``/``-folds`` (deterministic k-fold on case ids, written to ``splits.json``); support
    slices come from ``-support_instance`` (``none``: another training case holding the class).
    """
    try:
        cases, _ = open_caches(prepare_caches(cfg, info))
        ids = [c.id for c in cases]
        splits = make_splits(ids, cfg.folds, cfg.seed)
        split = splits[cfg.fold]
        support = None if cfg.support_instance.strip().lower() in ("none", "") else cfg.support_case
        if support is not None and support not in ids:
            raise InputError("-support_instance", f"case {support!r} is not in {cfg.data_path} "
                                                  f"({len(ids)} cases, e.g. {', '.join(ids[:3])}); or pass none")
        train_cases = [c for c in cases if c.id in set(split["train"])]
        # the fixed support case is given to the model, so it is never scored as a validation query
        val_cases = [c for c in cases if c.id in set(split["val"]) and c.id != support]
        support_pool = train_cases + [c for c in cases if c.id == support and c not in train_cases]
        if not train_cases or not val_cases:
            raise InputError("-folds", f"fold {cfg.fold} of {cfg.folds} leaves {len(train_cases)} training and "
                                       f"{len(val_cases)} validation cases; use fewer folds or more cases")
        common = dict(video_length=cfg.video_length, num_support=cfg.num_support, support_instance=support,
                      support_cases=support_pool, seed=cfg.seed, class_ids=cfg.class_ids)
        train_set = TrainClipDataset(train_cases, "gt_slices", query_mode=cfg.query_mode,
                                     same_case_support=cfg.same_case_support,
                                     classes_per_sample=cfg.classes_per_sample, **common)
        val_set = ICLDataset(val_cases, "gt_slices", **common)
    except InputError as err:
        raise _single_dash(err) from None
    if run_dir is not None and info.is_main:  # same format as icl.data.sampling.make_splits(path=...)
        write_json(run_dir / "splits.json", {"seed": cfg.seed, "folds": cfg.folds, "splits": splits})
    # DistributedSampler even on one process: its order is a function of (seed, epoch), which makes resume exact.
    train_loader = make_loader(train_set, shuffle=True, num_workers=cfg.num_workers, distributed=True,
                               seed=cfg.seed, num_replicas=info.world_size, rank=info.rank)
    val_loader = make_loader(Subset(val_set, dd.shard_indices(len(val_set), info)), shuffle=False,
                             num_workers=cfg.num_workers)
    return train_loader, val_loader


def setup(cfg: TrainConfig) -> Run:
    """Process group, run folder, model, optimizer, data, logger; resume state if asked."""
    info, device = dd.init_distributed(cfg.distributed, cfg.device)
    seed_everything(cfg.seed)
    resume_file = resolve_resume(cfg.resume) if cfg.resume else None
    run_dir = resume_file.parent if resume_file else dd.broadcast_object(_new_run_dir(cfg) if info.is_main else None, info)
    predictor = build_model(cfg if resume_file is None else _without_pretrain(cfg), device)
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


def _without_pretrain(cfg: TrainConfig) -> TrainConfig:
    return dataclasses.replace(cfg, pretrain=None)  # weights come from the resumed checkpoint


def _report_model(run: Run) -> None:
    trainable, total = count_parameters(run.predictor)
    count = run.cfg.count_flops and run.info.is_main
    flops = flops_per_frame(_bare(run.step_module), run.cfg.image_size, run.device) if count else None
    run.summary.update(trainable_params=trainable, total_params=total, flops_per_frame=flops)
    if run.info.is_main:
        shown = f"{flops / 1e9:.3f} GFLOPs per frame (forward, {run.cfg.image_size}px)" if flops else "FLOPs not counted"
        print(f"model: {trainable:,} trainable / {total:,} parameters; {shown}; run folder {run.run_dir}",
              file=sys.stderr)


def _bare(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


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
    bar = tqdm(run.train_loader, total=run.steps_per_epoch, desc=f"epoch {epoch}", disable=not run.info.is_main,
               leave=False, dynamic_ncols=True)
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
    model = _bare(run.step_module)
    model.eval()
    sums: dict[str, float] = {}
    overlays: list[tuple[np.ndarray, str]] = []
    limit = run.cfg.val_samples or None
    bar = tqdm(run.val_loader, desc="validate", disable=not run.info.is_main, leave=False, dynamic_ncols=True)
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
    try:
        with library_errors("-"):
            train(parse_train_args(argv))
    except InputError as err:
        return report(err)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
