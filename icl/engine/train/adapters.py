"""Adapter checkpoints of ``-peft lora`` on the training side: the record a run writes, the resume check, and
``-export`` of the merged weights in the official ``{"model": state_dict}`` layout (:func:`export_merged`), which
SAM2's own loader reads. Loading any weights file (adapters included) is ``icl.model.weights.load_any_weights``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from icl.errors import InputError
from icl.io import atomic_path
from icl.model import lora
from icl.model.build import build_predictor
from icl.model.weights import adapter_record, load_checkpoint, rebuild_adapted


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


def check_record(record: Mapping[str, Any], cfg: Any, where: str | Path) -> None:
    """Resume: the run's flags must build the same adapters on the same base weights."""
    now = {"rank": cfg.lora_rank, "alpha": float(cfg.lora_alpha), "targets": [p for p in cfg.lora_targets.split(",") if p]}
    for key, value in now.items():
        if record.get(key) != value:
            raise InputError("-resume", f"{where} was trained with -lora_{key} {record.get(key)}, not {value}")


def export_merged(src: str | Path, dst: str | Path, config: str, image_size: int) -> Path:
    """``-export`` of an adapter checkpoint: the merged weights, ``{"model": ..., "trained": ...}`` like
    :func:`icl.engine.checkpoint.export_weights` (official layout; ``trained.peft`` says where they came from)."""
    ck = load_checkpoint(src)
    predictor = build_predictor(config, "cpu", None, image_size)
    lora.merge_lora(rebuild_adapted(predictor, ck, src))
    payload = {"model": predictor.state_dict(),
               "trained": {"epoch": ck["epoch"], "step": ck["step"], "best_metric": ck.get("best_metric"),
                           "config": ck.get("config") or {}, "from": Path(src).name, "peft": adapter_record(ck)}}
    with atomic_path(dst) as tmp:
        torch.save(payload, tmp)
    return Path(dst)
