"""LoRA adapters on a SAM2 predictor with the peft library (``-peft lora``), and going back to plain SAM2 weights.

Why peft and not our own LoRA: ``peft.inject_adapter_in_model`` with explicit ``target_modules`` wraps any
``nn.Linear`` of a non-Hugging-Face model, its B matrices start at zero (a fresh adapter leaves the model's output
unchanged), and its layers know how to merge themselves into the base weights. What is ours: which linears are
"the attention projections of a part", which parameters train, the adapter-only checkpoint payload, and the merge
back to the official ``{"model": state_dict}`` layout that SAM2's own loader reads.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Mapping

import torch
from torch import nn

from icl.errors import InputError

ADAPTER = "default"
#: Model parts ``-lora_targets`` may name: the ones that hold attention.
LORA_PARTS = ("image_encoder", "memory_attention", "sam_mask_decoder")


def attention_projections(model: nn.Module, part: str, flag: str = "-lora_targets") -> list[str]:
    """Full names of the ``nn.Linear`` layers directly inside an attention module of ``part`` (q/k/v/out, qkv/proj)."""
    module = getattr(model, part, None)
    if not isinstance(module, nn.Module):
        raise InputError(flag, f"the model has no part named {part!r} (parts with attention: {', '.join(LORA_PARTS)})")
    names = []
    for name, parent in module.named_modules():
        if not type(parent).__name__.endswith("Attention"):  # Attention, RoPEAttention, MultiScaleAttention
            continue
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                names.append(f"{part}.{name}.{child_name}" if name else f"{part}.{child_name}")
    if not names:
        raise InputError(flag, f"part {part!r} has no attention projections to adapt (parts with attention: "
                               f"{', '.join(LORA_PARTS)})")
    return names


def inject_lora(model: nn.Module, parts: Iterable[str], rank: int, alpha: float) -> list[str]:
    """Wrap the attention projections of ``parts`` with rank-``rank`` LoRA adapters (B = 0: output unchanged).

    Returns the adapted layer names. Freezing is left to :func:`set_trainable`."""
    if rank <= 0:
        raise InputError("-lora_rank", f"must be a positive integer, got {rank}")
    from peft import LoraConfig, inject_adapter_in_model  # peft pulls in transformers: import it only when used

    targets = [name for part in parts for name in attention_projections(model, part)]
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=targets, lora_dropout=0.0, bias="none")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    return targets


def set_trainable(model: nn.Module, frozen_parts: Iterable[str] | None) -> None:
    """Adapters train; base weights are frozen in every part (``frozen_parts`` None), or only in ``frozen_parts``
    (``-freeze`` given: the other parts then train in full beside their adapters)."""
    frozen = None if frozen_parts is None else set(frozen_parts)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
        else:
            param.requires_grad_(frozen is not None and name.split(".")[0] not in frozen)


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter checkpoint stores: the adapters (peft's own state dict) plus any fully trained base weight."""
    from peft import get_peft_model_state_dict  # peft pulls in transformers: only with -peft lora

    state = {f"lora::{k}": v for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER).items()}
    for name, param in model.named_parameters():
        if param.requires_grad and "lora_" not in name:
            state[name] = param.detach()
    return state


def load_trained_state(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Inverse of :func:`trained_state` on a model built with the same base weights and adapters (exact)."""
    from peft import set_peft_model_state_dict  # peft pulls in transformers: only with -peft lora

    adapters = {k[len("lora::"):]: v for k, v in state.items() if k.startswith("lora::")}
    base = {k: v for k, v in state.items() if not k.startswith("lora::")}
    result = set_peft_model_state_dict(model, adapters, adapter_name=ADAPTER)
    if getattr(result, "unexpected_keys", None):
        raise InputError(where, f"adapter keys the model does not have: {', '.join(result.unexpected_keys[:3])}")
    own = dict(model.named_parameters())
    unknown = [k for k in base if k not in own]
    if unknown:
        raise InputError(where, f"weights the model does not have: {', '.join(unknown[:3])}")
    with torch.no_grad():
        for k, v in base.items():
            own[k].copy_(v)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and put the plain layer back: the model is plain SAM2 again."""
    from peft.tuners.lora import LoraLayer  # peft pulls in transformers: only with -peft lora

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(adapter_names=[ADAPTER])
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    return model


def weights_hash(module: nn.Module) -> str:
    """sha256 over a module's parameters and buffers (names, shapes, dtypes, bytes): which weights these are."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:24]


def check_parts(value: str) -> str:
    """The ``-lora_targets`` check (parse time): known part names, at least one."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    unknown = [p for p in parts if p not in LORA_PARTS]
    if unknown or not parts:
        raise ValueError(f"no part named {','.join(unknown) or repr(value)} has attention projections; use a comma "
                         f"list of {', '.join(LORA_PARTS)}")
    return ",".join(parts)
