"""Data pipeline: NIfTI readers → frames (icl.data.frames) → slices-first cache → ICL samples. No SAM2 here.

Names are imported lazily (``from icl.data import ICLDataset`` works) so ``python -m icl.data.<module>`` runs
cleanly and the phantom generator does not pull in torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ICLDataset": "loaders", "collate": "loaders", "make_loader": "loaders", "open_caches": "loaders",
    "set_epoch": "loaders",
    "CachedCase": "preprocess", "open_cache": "preprocess", "preprocess_dataset": "preprocess",
    "prepare_image": "preprocess", "prepare_label": "preprocess", "to_original_grid": "preprocess",
    "Scan": "frames", "VolumeFrames": "frames", "intensity_range": "frames", "label_slices": "frames",
    "resize_slices": "frames",
    "Case": "readers", "read_combined": "readers", "read_dataset": "readers",
    "extract_object": "sampling", "make_splits": "sampling", "pick_support_slices": "sampling",
    "check_pair": "validate", "load_nifti_volume": "validate",
    "make_phantom_dataset": "phantom",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'icl.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"icl.data.{_EXPORTS[name]}"), name)
