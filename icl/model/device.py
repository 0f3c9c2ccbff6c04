"""THE device rule of every command (``-gpu_device N``, ``--device cpu|cuda|cuda:N``, the API's ``device=``)."""
from __future__ import annotations

import re
import sys

import torch

from icl.errors import InputError


def resolve_device(spec: int | str, flag: str = "--device") -> str:
    """THE device rule: ``-gpu_device N`` / ``--device cpu|cuda|cuda:N`` -> a torch device string.

    -1 or ``cpu`` = CPU; CUDA asked for on a machine without it falls back to the CPU with a note (so one command
    line works on both); a GPU index beyond the visible ones, or anything else, is an InputError naming ``flag``.
    """
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
