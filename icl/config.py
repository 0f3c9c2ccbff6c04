"""Options for training and evaluation: one dataclass per command, built from argparse.

The flags are single-dash and keep MedSAM2-ICL's names (``-exp_name``, ``-val_freq``, ``-gpu_device`` ...) so
existing command lines keep working. Every validation problem raises :class:`icl.errors.InputError` naming the
flag, which the thin scripts turn into one ``error: ...`` line and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from icl.errors import InputError, library_errors

DATASETS = ("kits", "btcv", "msd", "combined", "phantom")
#: Top-level parts of a SAM2 model that ``-freeze`` may name (comma-separated), or ``none``.
FREEZABLE = ("image_encoder", "memory_attention", "memory_encoder", "sam_prompt_encoder", "sam_mask_decoder")
AMP_MODES = ("auto", "bf16", "fp16", "none")
QUERY_MODES = ("gt_slices", "context")
DEFAULT_PRETRAIN = "./checkpoint/MedSAM2_pretrain.pth"

_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


def str2bool(text: str | bool) -> bool:
    """Parse ``True/False/true/false/1/0`` (MedSAM2-ICL passes booleans as words)."""
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected True/False/1/0, got {text!r}")


@dataclass
class CommonConfig:
    """Fields shared by training and evaluation (model, data, device, logging)."""

    exp_name: str = "icl"
    dataset: str = "kits"
    data_path: str = "./datasets/kits"
    cache_dir: str | None = None
    pretrain: str | None = DEFAULT_PRETRAIN
    config: str = "sam2.1_hiera_t"
    gpu_device: int = 0
    image_size: int = 512
    out_size: int = 512
    video_length: int = 12
    num_support: int = 8
    support_instance: str = "case_00028.nii.gz"
    memory_selector: str = "recency"
    fold: int = 0
    folds: int = 5
    num_workers: int = 0
    seed: int = 0
    checkpoint_path: str = "./checkpoint"
    distributed: bool = False
    wandb_enabled: bool = True

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda:N"`` from ``-gpu_device`` (-1 = CPU; CPU when CUDA is missing)."""
        return resolve_device(self.gpu_device, "-gpu_device")

    @property
    def support_case(self) -> str:
        """Case id of ``-support_instance`` without the NIfTI suffix (``case_00028.nii.gz`` -> ``case_00028``)."""
        return re.sub(r"\.nii(\.gz)?$", "", Path(self.support_instance).name)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins (for checkpoints and wandb)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class TrainConfig(CommonConfig):
    """Everything ``train_3d.py`` needs; one source of truth for the training loop."""

    epochs: int = 100
    val_freq: int = 5
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    grad_clip: float = 1.0
    amp: str = "auto"
    freeze: str = "none"
    resume: str | None = None
    steps_per_epoch: int = 0
    val_samples: int = 0
    log_images: int = 4
    count_flops: bool = True
    obj_loss_weight: float = 1.0
    keep_epochs: int = 0
    classes: str = "all"
    query_mode: str = "gt_slices"
    time_limit_min: float = 0.0
    same_case_support: float = 0.0
    classes_per_sample: int = 1

    @property
    def frozen_parts(self) -> list[str]:
        """Model parts named by ``-freeze`` (empty for ``none``)."""
        return [] if self.freeze == "none" else [p for p in self.freeze.split(",") if p]

    @property
    def class_ids(self) -> list[int] | None:
        """Class ids named by ``-classes`` (None for ``all``)."""
        return None if self.classes == "all" else [int(c) for c in self.classes.split(",") if c.strip()]


@dataclass
class EvalConfig(CommonConfig):
    """Options of an evaluation run (shares model/data/device fields with training)."""

    protocol: str = "gt_slices"
    out_dir: str = "./runs/eval"


def resolve_device(spec: int | str, flag: str = "--device") -> str:
    """THE device rule: ``-gpu_device N`` / ``--device cpu|cuda|cuda:N`` -> a torch device string.

    -1 or ``cpu`` = CPU; CUDA asked for on a machine without it falls back to the CPU with a note (so one command
    line works on both); a GPU index beyond the visible ones, or anything else, is an InputError naming ``flag``.
    """
    import torch

    text = str(spec).strip().lower()
    if text.lstrip("-").isdigit():
        index = int(text)
        text = "cpu" if index < 0 else f"cuda:{index}"
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if text != "cpu" and match is None:
        raise InputError(flag, f"expected cpu, cuda or cuda:N (or a GPU index), got {spec!r}")
    if text == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        print(f"note: CUDA is not available, running on CPU ({flag} {spec} ignored)", file=sys.stderr)
        return "cpu"
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise InputError(flag, f"GPU {index} requested but only {count} visible")
    return f"cuda:{index}"


class _Parser(argparse.ArgumentParser):
    """ArgumentParser that raises InputError instead of printing usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        match = re.match(r"argument (\S+?)(?:/\S+)?: (.*)", message)
        if match:
            raise InputError(match.group(1), match.group(2))
        raise InputError("arguments", message)


def _common_parser(description: str) -> argparse.ArgumentParser:
    p = _Parser(description=description, exit_on_error=False)
    d = CommonConfig()
    p.add_argument("-exp_name", type=str, default=d.exp_name, help="run name; run folder is <checkpoint_path>/<exp_name>_<timestamp>")
    p.add_argument("-dataset", type=str, default=d.dataset, choices=DATASETS)
    p.add_argument("-data_path", type=str, default=None, help="dataset root (default ./datasets/<dataset>)")
    p.add_argument("-cache_dir", type=str, default=None, help="preprocess cache (default: the data helper's)")
    p.add_argument("-pretrain", type=str, default=d.pretrain, help="weights to start from; 'none' = random init")
    p.add_argument("-config", type=str, default=d.config, help="model config name (sam2.1_hiera_t) or yaml path")
    p.add_argument("-gpu_device", type=int, default=d.gpu_device, help="CUDA index; -1 = CPU")
    p.add_argument("-image_size", type=int, default=d.image_size)
    p.add_argument("-out_size", type=int, default=d.out_size)
    p.add_argument("-video_length", type=int, default=d.video_length, help="query slices per sample")
    p.add_argument("-num_support", type=int, default=d.num_support, help="support slices per sample")
    p.add_argument("-support_instance", type=str, default=d.support_instance, help="case the support slices come from")
    p.add_argument("-memory_selector", type=str, default=d.memory_selector)
    p.add_argument("-fold", type=int, default=d.fold)
    p.add_argument("-folds", type=int, default=d.folds)
    p.add_argument("-num_workers", type=int, default=d.num_workers)
    p.add_argument("-seed", type=int, default=d.seed)
    p.add_argument("-checkpoint_path", type=str, default=d.checkpoint_path)
    p.add_argument("-distributed", type=str2bool, default=d.distributed, help="True when launched by torchrun")
    p.add_argument("-wandb_enabled", type=str2bool, default=d.wandb_enabled)
    return p


def build_train_parser() -> argparse.ArgumentParser:
    """The ``train_3d.py`` command line (MedSAM2-ICL compatible flags plus our own)."""
    p = _common_parser("Train SAM2 for in-context 3D medical segmentation.")
    d = TrainConfig()
    p.add_argument("-epochs", type=int, default=d.epochs)
    p.add_argument("-val_freq", type=int, default=d.val_freq, help="validate every N epochs (and after the last)")
    p.add_argument("-lr", type=float, default=d.lr)
    p.add_argument("-weight_decay", type=float, default=d.weight_decay)
    p.add_argument("-warmup_epochs", type=float, default=d.warmup_epochs, help="linear warm-up before cosine decay")
    p.add_argument("-grad_clip", type=float, default=d.grad_clip, help="max grad norm; 0 = off")
    p.add_argument("-amp", type=str, default=d.amp, choices=AMP_MODES, help="mixed precision on CUDA (auto = bf16 if supported)")
    p.add_argument("-freeze", type=str, default=d.freeze, help=f"none or comma list of {','.join(FREEZABLE)}")
    p.add_argument("-resume", type=str, default=None, help="checkpoint file or run folder to continue")
    p.add_argument("-steps_per_epoch", type=int, default=d.steps_per_epoch, help="cap on samples per epoch; 0 = all")
    p.add_argument("-val_samples", type=int, default=d.val_samples, help="cap on validation samples; 0 = all")
    p.add_argument("-log_images", type=int, default=d.log_images, help="overlay images logged per validation")
    p.add_argument("-obj_loss_weight", type=float, default=d.obj_loss_weight,
                   help="weight of the object-presence BCE added to Dice + BCE/focal")
    p.add_argument("-keep_epochs", type=int, default=d.keep_epochs,
                   help="keep only the newest N epoch_N.pth (last/best always kept); 0 = keep all")
    p.add_argument("-classes", type=str, default=d.classes,
                   help="comma list of class ids to train and validate on (e.g. 1,2,3,4,5 holds out class 6); all = every class")
    p.add_argument("-query_mode", type=str, default=d.query_mode, choices=QUERY_MODES,
                   help="gt_slices: query clips only hold slices with the class; context: -video_length consecutive "
                        "slices around the object, so clips also hold empty slices and other classes")
    p.add_argument("-same_case_support", type=float, default=d.same_case_support,
                   help="probability that a training sample's support slices come from its own query scan (0..1)")
    p.add_argument("-classes_per_sample", type=int, default=d.classes_per_sample,
                   help="classes tracked together per training sample on the same query slices (1 = seed)")
    p.add_argument("-time_limit_min", type=float, default=d.time_limit_min,
                   help="wall-clock cap in minutes: stop after the step that crosses it (validate + save); 0 = off")
    p.add_argument("-count_flops", type=str2bool, default=d.count_flops, help="print FLOPs per frame at start")
    return p


def build_eval_parser() -> argparse.ArgumentParser:
    """Command line of an evaluation run (common flags plus protocol and output folder)."""
    p = _common_parser("Evaluate an in-context SAM2 model on 3D volumes.")
    p.add_argument("-protocol", type=str, default="gt_slices", choices=("gt_slices", "full_volume"))
    p.add_argument("-out_dir", type=str, default="./runs/eval")
    return p


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> dict[str, Any]:
    try:
        ns = parser.parse_args(list(argv) if argv is not None else None)
    except argparse.ArgumentError as err:
        raise InputError(err.argument_name or "arguments", err.message) from None
    values = vars(ns)
    if values.get("data_path") is None:
        values["data_path"] = f"./datasets/{values['dataset']}"
    return values


def parse_train_args(argv: Sequence[str] | None = None, check_files: bool = True) -> TrainConfig:
    """Command line -> validated TrainConfig (``check_files=False`` skips the file-system checks)."""
    cfg = TrainConfig(**_parse(build_train_parser(), argv))
    validate(cfg, check_files=check_files)
    return cfg


def parse_eval_args(argv: Sequence[str] | None = None, check_files: bool = True) -> EvalConfig:
    """Command line -> validated EvalConfig."""
    cfg = EvalConfig(**_parse(build_eval_parser(), argv))
    validate(cfg, check_files=check_files)
    return cfg


def _positive(flag: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise InputError(flag, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: CommonConfig, check_files: bool = True) -> None:
    """Check values and (optionally) that the named files exist; normalise ``-pretrain none`` to None."""
    if cfg.dataset not in DATASETS:
        raise InputError("-dataset", f"unknown dataset {cfg.dataset!r}; choose from {', '.join(DATASETS)}")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", cfg.exp_name):
        raise InputError("-exp_name", f"use letters, digits, '.', '_' or '-' only, got {cfg.exp_name!r}")
    for flag in ("image_size", "out_size", "video_length", "num_support", "folds"):
        _positive(f"-{flag}", getattr(cfg, flag))
    if cfg.image_size % 32:
        raise InputError("-image_size", f"must be a multiple of 32 (Hiera's total stride), got {cfg.image_size}")
    _positive("-num_workers", cfg.num_workers, allow_zero=True)
    if not 0 <= cfg.fold < cfg.folds:
        raise InputError("-fold", f"must be in [0, {cfg.folds}), got {cfg.fold}")
    if isinstance(cfg.pretrain, str) and cfg.pretrain.strip().lower() in ("", "none", "null"):
        cfg.pretrain = None
    if isinstance(cfg, TrainConfig):
        _validate_train(cfg)
    if check_files:
        _check_files(cfg)


def _validate_train(cfg: TrainConfig) -> None:
    _positive("-epochs", cfg.epochs)
    _positive("-val_freq", cfg.val_freq)
    _positive("-lr", cfg.lr)
    _positive("-weight_decay", cfg.weight_decay, allow_zero=True)
    _positive("-warmup_epochs", cfg.warmup_epochs, allow_zero=True)
    _positive("-grad_clip", cfg.grad_clip, allow_zero=True)
    _positive("-steps_per_epoch", cfg.steps_per_epoch, allow_zero=True)
    _positive("-val_samples", cfg.val_samples, allow_zero=True)
    _positive("-log_images", cfg.log_images, allow_zero=True)
    _positive("-obj_loss_weight", cfg.obj_loss_weight, allow_zero=True)
    _positive("-keep_epochs", cfg.keep_epochs, allow_zero=True)
    _positive("-time_limit_min", cfg.time_limit_min, allow_zero=True)
    _positive("-classes_per_sample", cfg.classes_per_sample)
    if not 0.0 <= cfg.same_case_support <= 1.0:
        raise InputError("-same_case_support", f"must be a probability in [0, 1], got {cfg.same_case_support}")
    if cfg.query_mode not in QUERY_MODES:
        raise InputError("-query_mode", f"choose from {', '.join(QUERY_MODES)}, got {cfg.query_mode!r}")
    cfg.classes = cfg.classes.strip().lower().replace(" ", "") or "all"
    if cfg.classes != "all":
        try:
            ids = cfg.class_ids
        except ValueError:
            raise InputError("-classes", f"expected all or comma-separated integers, got {cfg.classes!r}") from None
        if not ids or min(ids) < 1:
            raise InputError("-classes", f"class ids are >= 1 (0 is background), got {cfg.classes!r}")
    if cfg.amp not in AMP_MODES:
        raise InputError("-amp", f"choose from {', '.join(AMP_MODES)}, got {cfg.amp!r}")
    unknown = [p for p in cfg.frozen_parts if p not in FREEZABLE]
    if unknown or (cfg.freeze != "none" and not cfg.frozen_parts):
        raise InputError("-freeze", f"unknown part {','.join(unknown) or cfg.freeze!r}; use none or {','.join(FREEZABLE)}")
    if cfg.resume is not None and cfg.resume.strip().lower() in ("", "none"):
        cfg.resume = None


def _check_files(cfg: CommonConfig) -> None:
    """Fail early, before any model is built, on paths that do not exist."""
    if cfg.pretrain is not None and not Path(cfg.pretrain).is_file():
        raise InputError(
            "-pretrain",
            f"weights file {cfg.pretrain} not found; download MedSAM2 or SAM2.1 weights "
            "(e.g. sam2.1_hiera_tiny.pt) into ./checkpoint/ (see checkpoint/README.md), "
            "or pass -pretrain none to train from random init",
        )
    if cfg.dataset != "phantom" and not Path(cfg.data_path).is_dir():
        raise InputError("-data_path", f"dataset folder {cfg.data_path} does not exist (see datasets/README.md)")
    if isinstance(cfg, TrainConfig) and cfg.resume is not None and not Path(cfg.resume).exists():
        raise InputError("-resume", f"{cfg.resume} does not exist (give a checkpoint .pth or a run folder)")
    from sam2_ext.build import resolve_config_path
    from sam2_ext.selector import parse_selector_config

    from sam2_ext.errors import ConfigError

    try:
        resolve_config_path(cfg.config)
    except ConfigError as err:
        raise InputError("-config", err.problem) from None
    with library_errors("-"):
        parse_selector_config(cfg.memory_selector)
