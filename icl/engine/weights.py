"""Adapter checkpoints of ``-peft lora``: what they record, how they load anywhere, how they become SAM2 weights.

Why: an adapter checkpoint keeps the adapters (and any part trained in full) only, a few percent of the model;
its base weights are the ``-pretrain`` file it names, checked by a hash of the weights. Everything that loads
weights (training's resume, ``eval_3d.py``, ``icl.segment``, the API) goes through :func:`load_any_weights`, so an
adapter checkpoint is rebuilt the same way everywhere: base weights, the same adapters, their trained values, then
merged, so that evaluation runs a plain SAM2 model. ``-export`` writes those merged weights in the official
``{"model": state_dict}`` layout (:func:`export_merged`), which SAM2's own loader reads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from icl.engine import lora
from icl.engine.checkpoint import load_checkpoint
from icl.errors import InputError
from icl.io import atomic_path


def lora_setup(predictor: nn.Module, cfg: Any) -> dict[str, Any]:
    """``-peft lora`` on a freshly built predictor (base weights loaded): adapters in, freezing set; returns the
    record every adapter checkpoint carries."""
    if cfg.pretrain is None:
        raise InputError("-peft", "lora fine-tunes pretrained weights; give -pretrain FILE (random weights "
                                  "would have to be stored in full)")
    parts = [p for p in cfg.lora_targets.split(",") if p]
    base_hash = lora.weights_hash(predictor)
    lora.inject_lora(predictor, parts, cfg.lora_rank, cfg.lora_alpha)
    lora.set_trainable(predictor, cfg.frozen_parts if cfg.freeze != "none" else None)
    return {"rank": int(cfg.lora_rank), "alpha": float(cfg.lora_alpha), "targets": parts,
            "frozen": cfg.frozen_parts if cfg.freeze != "none" else None,
            "base": str(Path(cfg.pretrain).resolve()), "base_hash": base_hash}


def adapter_record(payload: Any) -> dict[str, Any] | None:
    """The ``-peft lora`` record of a loaded checkpoint payload, or None for a plain one."""
    if isinstance(payload, Mapping) and isinstance(payload.get("extra"), Mapping):
        record = payload["extra"].get("peft")
        return dict(record) if isinstance(record, Mapping) else None
    return None


def check_record(record: Mapping[str, Any], cfg: Any, where: str | Path) -> None:
    """Resume: the run's flags must build the same adapters on the same base weights."""
    now = {"rank": cfg.lora_rank, "alpha": float(cfg.lora_alpha), "targets": [p for p in cfg.lora_targets.split(",") if p]}
    for key, value in now.items():
        if record.get(key) != value:
            raise InputError("-resume", f"{where} was trained with -lora_{key} {record.get(key)}, not {value}")


def rebuild_adapted(predictor: nn.Module, payload: Mapping[str, Any], where: str | Path) -> nn.Module:
    """Base weights of ``record['base']`` (hash-checked), the recorded adapters, their trained values: the model
    as trained, adapters still separate."""
    from sam2_ext.build import load_weights

    record = adapter_record(payload)
    base = Path(record["base"])
    if not base.is_file():
        raise InputError(where, f"its base weights {base} are missing (an adapter checkpoint needs the -pretrain "
                                "file it was trained from)")
    load_weights(predictor, base)
    if lora.weights_hash(predictor) != record["base_hash"]:
        raise InputError(where, f"its base weights {base} changed since it was trained (weights hash differs)")
    lora.inject_lora(predictor, record["targets"], record["rank"], record["alpha"])
    lora.load_trained_state(predictor, payload["model"], str(where))
    return predictor


def load_any_weights(predictor: nn.Module, path: str | Path) -> nn.Module:
    """THE loader of a weights file into a plain predictor: official / MedSAM2 / exported / training checkpoints
    as they are (``sam2_ext.build.load_weights``), adapter checkpoints rebuilt and merged."""
    from sam2_ext.build import load_weights

    path = Path(path)
    payload = _peek(path)
    if adapter_record(payload) is None:
        load_weights(predictor, path)
        return predictor
    return lora.merge_lora(rebuild_adapted(predictor, load_checkpoint(path), path))


def _peek(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable: sam2_ext's loader says why in one line
        return None


def export_merged(src: str | Path, dst: str | Path, config: str, image_size: int) -> Path:
    """``-export`` of an adapter checkpoint: the merged weights, ``{"model": ..., "trained": ...}`` like
    :func:`icl.engine.checkpoint.export_weights` (official layout; ``trained.peft`` says where they came from)."""
    from icl.engine.model import build_predictor

    ck = load_checkpoint(src)
    predictor = build_predictor(config, "cpu", None, image_size)
    lora.merge_lora(rebuild_adapted(predictor, ck, src))
    payload = {"model": predictor.state_dict(),
               "trained": {"epoch": ck["epoch"], "step": ck["step"], "best_metric": ck.get("best_metric"),
                           "config": ck.get("config") or {}, "from": Path(src).name, "peft": adapter_record(ck)}}
    with atomic_path(dst) as tmp:
        torch.save(payload, tmp)
    return Path(dst)
