"""SAM2 extensions for in-context 3D segmentation: model building, a differentiable video predictor, ICL helpers.

Imports are lazy so ``import sam2_ext`` stays cheap and does not pull in sam2/hydra until needed.
"""
from __future__ import annotations

from typing import Any

__all__ = [
    "CheckpointError",
    "ConfigError",
    "OptionError",
    "Sam2ExtError",
    "SliceResult",
    "track",
    "ICLPredictor",
    "TensorFrames",
    "build_icl_predictor",
    "load_model_config",
    "load_weights",
    "prepare_frames",
    "segment_volume_with_support",
    "segment_with_support",
]

_WHERE = {
    "CheckpointError": "sam2_ext.errors",
    "ConfigError": "sam2_ext.errors",
    "OptionError": "sam2_ext.errors",
    "Sam2ExtError": "sam2_ext.errors",
    "SliceResult": "sam2_ext.track",
    "track": "sam2_ext.track",
    "build_icl_predictor": "sam2_ext.build",
    "load_model_config": "sam2_ext.build",
    "load_weights": "sam2_ext.build",
    "ICLPredictor": "sam2_ext.predictor",
    "TensorFrames": "sam2_ext.predictor",
    "prepare_frames": "sam2_ext.predictor",
    "segment_with_support": "sam2_ext.icl",
    "segment_volume_with_support": "sam2_ext.icl",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'sam2_ext' has no attribute {name!r}")
