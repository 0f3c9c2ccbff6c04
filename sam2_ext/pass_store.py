"""Where the forward pass's logits wait for the reverse pass (tracking both ways).

Why: a slice between a class's first and last prompt gets the mean of both passes, so the forward pass's logits of
every such slice must be kept until the reverse pass reaches it: depth x classes x (image_size / 4)^2 floats, which
grows with the scan (512 slices, 10 classes at 512 px: 320 MiB). Up to ``budget`` bytes they stay where they are;
beyond it they go, exactly as computed, to an anonymous temporary file that the operating system frees on close, so
memory stays flat in the depth. Tensors that carry a graph (training) always stay: their gradient needs them.
"""
from __future__ import annotations

import tempfile
from typing import Any

import numpy as np
import torch

DEFAULT_BUDGET = 64 << 20  # bytes of logits kept in memory before the rest goes to disk


class PassStore:
    """``put(key, tensor)`` / ``pop(key) -> tensor``, the same values back (dtype and device kept)."""

    def __init__(self, budget: int | None = None):
        self.budget, self.in_memory = DEFAULT_BUDGET if budget is None else int(budget), 0
        self._kept: dict[Any, torch.Tensor] = {}
        self._spilled: dict[Any, tuple[int, tuple[int, ...], torch.dtype, torch.device]] = {}
        self._file = None
        self.spilled = 0  # tensors written to disk so far

    def put(self, key: Any, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if tensor.requires_grad or self.in_memory + size <= self.budget:
            self._kept[key] = tensor
            self.in_memory += size
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="icl_forward_pass_")
        self._file.seek(0, 2)
        offset = self._file.tell()
        self._file.write(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        self._spilled[key] = (offset, tuple(tensor.shape), tensor.dtype, tensor.device)
        self.spilled += 1

    def pop(self, key: Any) -> torch.Tensor:
        if key in self._kept:
            tensor = self._kept.pop(key)
            self.in_memory -= tensor.numel() * tensor.element_size()
            return tensor
        offset, shape, dtype, device = self._spilled.pop(key)
        self._file.seek(offset)
        count = int(np.prod(shape))
        values = np.frombuffer(self._file.read(4 * count), dtype=np.float32, count=count).reshape(shape)
        return torch.from_numpy(values.copy()).to(device=device, dtype=dtype)

    def __contains__(self, key: Any) -> bool:
        return key in self._kept or key in self._spilled

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
