"""What a weights file says it was trained with, and the settings a command runs it with.

Why: a checkpoint trained as ``tiny_cpu`` at 128 px is meaningless as ``sam2.1_hiera_t`` (hundreds of missing keys)
and much worse at another image size, so — as nnU-Net reads its plans from the model folder — the model config and
the image size come from the checkpoint unless the user says otherwise: a different config is one clear error
naming both, a different image size one warning. Our training checkpoints record every flag (``config``), exported
weights ``trained.config``, a run folder its ``config.json``; a LiteMedSAM file fits ``medsam_lite`` alone; official
SAM2 / MedSAM2 files record nothing, and then the command's default applies.

The CT window of the training frames is recorded too: inference with ``--window auto`` windows a CT scan the way
the checkpoint was trained (a KiTS model sees ``ct_kidney`` frames, not the generic ``ct_abdomen``).

An image size whose activations cannot fit in memory is refused before the model is built, with the estimate;
once the query is known, the whole run's memory (activations, the scans, the label maps, the logits kept for the
reverse pass) is checked the same way, and a run estimated above a few minutes says so before it starts
(:func:`check_run`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from icl.errors import InputError
from sam2_ext.build import load_model_config
from sam2_ext.litemedsam import is_litemedsam

#: Peak activation bytes per input pixel and unit of the image encoder's width, measured on one slice's tracking
#: (tiny_cpu, width 24: 278 B/px at 1024 px; sam2.1_hiera_t, width 96: 760 B/px), rounded up.
BYTES_PER_PIXEL_AND_WIDTH = 12
#: Seconds per tracked slice on a CPU at 128 px with width 24 (the shipped model: about 3 s for a 128-slice scan),
#: growing as (size / 128) ** SIZE_EXPONENT (374 s measured at 1024 px) and with the square of the width.
SECONDS_PER_SLICE_128 = 0.023
SIZE_EXPONENT = 2.33
CUDA_SPEEDUP = 50  # a rough factor: the warning is meant for CPU runs of minutes, not for exact figures
WARN_SECONDS = 180  # a run estimated above this many seconds says so before it starts
LOGITS_IN_MEMORY = 64 * 2**20  # both ways, the forward pass's logits wait in memory up to this, then on disk


def trained_settings(weights: str | Path | None) -> dict[str, Any]:
    """``{"config": name, "image_size": int, "mask_prior": float, "mask_prior_gain": float, "mask_prior_res": str,
    "ct_window": (lo, hi)}`` as recorded in ``weights`` (any may be missing; {} for files that record nothing or
    cannot be read — the loader reports those)."""
    if weights is None:
        return {}
    try:
        payload = torch.load(Path(weights), map_location="cpu", weights_only=True)
    except Exception:  # unreadable: the weights loader says why, in one line
        payload = None
    if isinstance(payload, dict) and is_litemedsam(payload):  # a LiteMedSAM file fits one config only
        return {"config": "medsam_lite"}
    flags = payload.get("config") if isinstance(payload, dict) else None
    if not isinstance(flags, dict) and isinstance(payload, dict) and isinstance(payload.get("trained"), dict):
        flags = payload["trained"].get("config")
    beside = Path(weights).parent / "config.json"  # a run folder's flags, written by train_3d.py
    if not isinstance(flags, dict) and beside.is_file():
        try:
            flags = json.loads(beside.read_text())
        except (OSError, json.JSONDecodeError):
            flags = None
    if not isinstance(flags, dict):
        return {}
    keys = ("config", "image_size", "mask_prior", "mask_prior_gain", "mask_prior_res")
    out = {k: flags[k] for k in keys if flags.get(k) is not None}
    frames = flags.get("frames")
    if isinstance(frames, dict) and frames.get("ct_window") is not None:
        out["ct_window"] = tuple(float(v) for v in frames["ct_window"])
    return out


def _name(config: Any) -> str:
    return Path(str(config)).name.removesuffix(".yaml")


def settle_model(config: str | None, image_size: int | None, weights: str | Path | None, fallback_config: str,
                 flag: Any, before_warning: Any = None) -> tuple[str, int | None, dict[str, Any]]:
    """The (config, image size) to run ``weights`` with: the given ones, else the recorded ones, else
    ``fallback_config`` and the config's own size; and the record itself (:func:`trained_settings`, read once).
    ``flag(name)`` spells an option as the command does; ``before_warning(config, size)`` runs the checks that may
    refuse the settings before any warning about them is printed (an error is then the only line)."""
    record = trained_settings(weights)
    trained = record.get("config")
    if config is None:
        config = trained or fallback_config
    elif trained is not None and _name(config) != _name(trained):
        raise InputError(flag("config"), f"{weights} was trained with config {trained}, not {config}: leave "
                                         f"{flag('config')} out to use {trained}")
    if image_size is None:
        image_size = record.get("image_size")
    if before_warning is not None:
        before_warning(str(config), image_size)
    if record.get("image_size") not in (None, image_size):
        print(f"warning: {weights} was trained at {flag('image_size')} {record['image_size']}; at {image_size} "
              "its masks are usually worse", file=sys.stderr)
    return str(config), image_size, record


def _encoder_width(encoder: Any) -> int:
    """The width the activation estimate scales with: Hiera's embedding width; TinyViT's widest full-resolution map
    (its MBConv stage's expanded width, defaults of sam2_ext.tinyvit: 64 x 4)."""
    if "trunk" in encoder:
        return int(encoder.trunk.embed_dim)
    return int(list(encoder.get("embed_dims", [64]))[0] * float(encoder.get("mbconv_expand_ratio", 4.0)))


def check_image_memory(config: str, image_size: int | None, flag: str, available: int | None = None) -> None:
    """Refuse an image size whose activations for one slice would not fit in the free memory (an estimate)."""
    cfg = load_model_config(config, image_size)
    size, width = int(cfg.model.image_size), _encoder_width(cfg.model.image_encoder)
    need = BYTES_PER_PIXEL_AND_WIDTH * width * size * size
    free = psutil.virtual_memory().available if available is None else available
    if need > free:
        raise InputError(flag, f"image size {size} needs about {need / 2**30:.1f} GiB for one slice with {_name(config)}"
                               f" (estimate), {free / 2**30:.1f} GiB is free: choose a smaller size")


def _slice_activations(config: str, image_size: int | None) -> tuple[int, int, int]:
    """(image size, encoder width, peak activation bytes of one slice) of a config at a size."""
    cfg = load_model_config(config, image_size)
    size, width = int(cfg.model.image_size), _encoder_width(cfg.model.image_encoder)
    return size, width, BYTES_PER_PIXEL_AND_WIDTH * width * size * size


def run_estimate(config: str, image_size: int | None, shape: tuple[int, ...], itemsize: int, slices: int,
                 device: Any = "cpu") -> tuple[int, float]:
    """(bytes, seconds) of a whole run on a scan of ``shape`` tracking ``slices`` slices: one slice's
    activations, the scan's voxels as stored and as float32, the label maps (output and support), the logits kept
    for the reverse pass; seconds from the measured per-slice time (module constants)."""
    size, width, activations = _slice_activations(config, image_size)
    voxels = int(np.prod(shape))
    need = activations + voxels * (itemsize + 4 + 2) + LOGITS_IN_MEMORY
    seconds = slices * SECONDS_PER_SLICE_128 * (size / 128) ** SIZE_EXPONENT * (width / 24) ** 2
    if str(device).startswith("cuda"):
        seconds /= CUDA_SPEEDUP
    return need, seconds


def check_run(config: str, image_size: int | None, scan: Any, slices: int, device: Any, flag: str,
              available: int | None = None) -> None:
    """The whole run on ``scan``: refused when its memory estimate is above what is free (with both figures), one
    warning when its time estimate is above ``WARN_SECONDS``."""
    itemsize = int(np.dtype(scan.header.get_data_dtype()).itemsize) if hasattr(scan.header, "get_data_dtype") else 4
    need, seconds = run_estimate(config, image_size, scan.shape, itemsize, slices, device)
    free = psutil.virtual_memory().available if available is None else available
    size = _slice_activations(config, image_size)[0]
    if need > free:
        raise InputError(flag, f"image size {size} on {scan.path.name} ({' x '.join(map(str, scan.shape))}) needs "
                               f"about {need / 2**30:.1f} GiB for the run with {_name(config)} (estimate), "
                               f"{free / 2**30:.1f} GiB is free: choose a smaller size")
    if seconds > WARN_SECONDS:
        print(f"warning: {flag} {size}: about {seconds / 60:.0f} min for {slices} slice(s) of {scan.path.name} on "
              f"{device} (estimate); a smaller size is much faster", file=sys.stderr)
