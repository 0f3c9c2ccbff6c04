"""The one mixed-precision rule of the engine (training, evaluation, the CLI and the API).

Autocast runs on CUDA only: bf16 where the GPU supports it (``auto``), fp16 (with a gradient scaler when
training), or off. On CPU everything stays float32: CPU autocast is slower than float32 for these models and
SAM2's bf16 memories already need a cast there (``sam2_ext.predictor._memories_as``).
"""
from __future__ import annotations

import contextlib

import torch

from icl.errors import InputError

AMP_MODES = ("auto", "bf16", "fp16", "none")


def check_amp(mode: str, flag: str = "-amp") -> str:
    """``mode`` if it is one of AMP_MODES, else an InputError naming ``flag``."""
    if mode not in AMP_MODES:
        raise InputError(flag, f"choose from {', '.join(AMP_MODES)}, got {mode!r}")
    return mode


def amp_dtype(mode: str, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype for ``mode`` on ``device``: None (off) on CPU and for ``none``."""
    if not str(device).startswith("cuda") or mode == "none":
        return None
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def amp_setup(mode: str, device: str) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """Training: the autocast dtype and a GradScaler that is active for fp16 only."""
    dtype = amp_dtype(mode, device)
    scaler = torch.amp.GradScaler("cuda" if str(device).startswith("cuda") else "cpu",
                                  enabled=dtype == torch.float16)
    return dtype, scaler


def autocast(device: str | torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` on CUDA with ``dtype``; a no-op when ``dtype`` is None."""
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()
