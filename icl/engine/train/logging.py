"""Experiment logging through wandb, offline by default so it never needs an account or a network.

``WANDB_MODE`` decides when the user sets it; otherwise runs go online only if credentials are already on this
machine (``WANDB_API_KEY`` or a netrc entry for api.wandb.ai), else offline (sync later with ``wandb sync``).
``-wandb_enabled False`` and non-zero ranks get a :class:`NullLogger` that does nothing.
"""
from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

PROJECT = "icl-sam2"


class RunLogger(Protocol):
    def log(self, values: Mapping[str, float], step: int) -> None: ...
    def log_overlays(self, key: str, overlays: Sequence[tuple[np.ndarray, str]], step: int) -> None: ...
    def finish(self) -> None: ...


class NullLogger:
    """Logger used when logging is off (or on ranks other than 0)."""

    def log(self, values: Mapping[str, float], step: int) -> None:
        pass

    def log_overlays(self, key: str, overlays: Sequence[tuple[np.ndarray, str]], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


def has_wandb_credentials() -> bool:
    """True when a wandb key is already configured locally (checked without any network access)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode() -> str:
    """``WANDB_MODE`` if set, else online with local credentials, else offline."""
    return os.environ.get("WANDB_MODE") or ("online" if has_wandb_credentials() else "offline")


class WandbLogger:
    """Thin wrapper around one wandb run whose files live in ``<run_dir>/wandb``."""

    def __init__(self, run_dir: str | Path, name: str, config: Mapping[str, Any], project: str = PROJECT):
        import wandb  # heavy (hundreds of modules): loaded only when a run logs

        self._wandb = wandb
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.mode = wandb_mode()
        self.run = wandb.init(project=project, name=name, dir=str(run_dir), config=dict(config), mode=self.mode,
                              reinit="finish_previous", settings=wandb.Settings(console="off", silent=True))

    def log(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def log_overlays(self, key: str, overlays: Sequence[tuple[np.ndarray, str]], step: int) -> None:
        if overlays:
            self.run.log({key: [self._wandb.Image(img, caption=cap) for img, cap in overlays]}, step=step)

    def finish(self) -> None:
        self.run.finish()


def make_logger(enabled: bool, run_dir: str | Path, name: str, config: Mapping[str, Any], is_main: bool = True) -> RunLogger:
    """The logger for this process: wandb on rank 0 when enabled, a no-op otherwise."""
    if not enabled or not is_main:
        return NullLogger()
    return WandbLogger(run_dir, name, config)


def overlay(image: np.ndarray, pred: np.ndarray, gt: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 picture of one slice: grey image, prediction in red, ground truth in green (overlap yellow)."""
    img = np.asarray(image, dtype=np.float32)
    lo, hi = float(img.min()), float(img.max())
    grey = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for mask, channel in ((np.asarray(pred) > 0.5, 0), (np.asarray(gt) > 0.5, 1)):
        rgb[..., channel] = np.where(mask, (1 - alpha) * rgb[..., channel] + alpha, rgb[..., channel])
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
