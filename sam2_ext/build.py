"""Build a SAM2 video model from a hydra config in cfg/ and load official / MedSAM2 / own weights.

Why not sam2.build_sam: it composes configs through hydra's global search path (only the package's own files),
forces ``model.eval()`` and fails on a checkpoint mismatch with a bare ``RuntimeError``. Here a config may be a
small file in ``cfg/`` that *references* a package config (key ``base``) plus overrides, image_size is validated
and every key depending on it is kept in step, and weight problems become one-line ``CheckpointError``s.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sam2
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sam2_ext.errors import CheckpointError, ConfigError, OptionError
from sam2_ext.fit import fit_problems
from sam2_ext.frames import InputRule
from sam2_ext.litemedsam import is_litemedsam, load_litemedsam

CFG_DIR = Path(__file__).resolve().parents[1] / "cfg"
DEFAULT_CONFIG = "tiny_cpu"
# Hiera downsamples 4x in the patch embed and 2x in each of 3 pooling stages: total stride 32.
IMAGE_SIZE_MULTIPLE = 32
# SAM2's image embeddings (memory attention RoPE grid, prompt encoder) live at stride 16 (Hiera), unless a config
# says otherwise with ``model.backbone_stride`` (TinyViT: 4).
BACKBONE_STRIDE = 16
_PREFIXES = ("module.", "_orig_mod.")


def _sam2_package_dir() -> Path:
    return Path(sam2.__path__[0])


def resolve_config_path(config: str | Path) -> Path:
    """Find a config: an existing path, a name in cfg/ (with or without .yaml), or a path inside the sam2 package."""
    given = Path(str(config))
    names = [given] if given.suffix in (".yaml", ".yml") else [given, given.with_name(given.name + ".yaml")]
    candidates = names + [CFG_DIR / n for n in names] + [_sam2_package_dir() / n for n in names]
    for cand in candidates:
        if cand.is_file():
            return cand
    names = sorted(p.stem for p in CFG_DIR.glob("*.yaml"))
    raise ConfigError(config, f"model config not found (a yaml path, or one of: {', '.join(names)})")


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Load a yaml; when it has ``base:``, load that first (recursively) and merge this file over it."""
    if path in seen:
        raise ConfigError(path, "config `base` chain loops back to itself")
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # yaml syntax errors and friends
        raise ConfigError(path, f"cannot parse model config: {exc}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(path, "model config must be a mapping")
    base = cfg.pop("base", None)
    if base is not None:
        base_path = None
        for cand in (path.parent / str(base), _sam2_package_dir() / str(base), CFG_DIR / str(base)):
            if cand.is_file():
                base_path = cand
                break
        if base_path is None:
            raise ConfigError(path, f"base config {base!r} not found next to it, in cfg/ or in the sam2 package")
        cfg = OmegaConf.merge(_load_yaml(base_path, seen + (path,)), cfg)
    return cfg


def config_lineage(config: str | Path) -> list[str]:
    """The names (file stems) of ``config`` and of the configs its ``base`` chain stands on, nearest first: a
    config that only overrides another (e.g. ``medsam_lite_pool2`` on ``medsam_lite``) fits that one's weights."""
    path, names = resolve_config_path(config), []
    while path is not None and path.stem not in names:
        names.append(path.stem)
        try:
            base = OmegaConf.load(path).get("base")
        except Exception:  # a broken file is load_model_config's error to name
            break
        path = next((c for c in (path.parent / str(base), _sam2_package_dir() / str(base), CFG_DIR / str(base))
                     if base is not None and c.is_file()), None)
    return names


def _sync_image_size(node: Any, image_size: int, stride: int = BACKBONE_STRIDE) -> None:
    """Set every image-size-dependent key: the RoPE attentions' feat_sizes grid (image_size / backbone stride)."""
    grid = image_size // stride
    if isinstance(node, DictConfig):
        target = str(node.get("_target_", ""))
        if target.endswith("RoPEAttention"):
            node.feat_sizes = [grid, grid]
        for key in node.keys():
            _sync_image_size(node[key], image_size, stride)
    elif OmegaConf.is_list(node):
        for item in node:
            _sync_image_size(item, image_size, stride)


def load_model_config(config: str | Path, image_size: int | None = None) -> DictConfig:
    """Resolve ``config`` to a full model config with a validated, consistently applied image_size."""
    path = resolve_config_path(config)
    cfg = _load_yaml(path)
    if "model" not in cfg or "_target_" not in cfg.model:
        raise ConfigError(path, "model config has no `model._target_`")
    given = image_size is not None
    if image_size is None:
        image_size = cfg.model.get("image_size", 1024)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0 \
            or image_size % IMAGE_SIZE_MULTIPLE:
        problem = f"image_size must be a positive multiple of {IMAGE_SIZE_MULTIPLE} (Hiera's total stride), " \
                  f"got {image_size!r}"
        raise OptionError("image_size", problem) if given else ConfigError(path, problem)
    cfg.model.image_size = image_size
    _sync_image_size(cfg.model, image_size, int(cfg.model.get("backbone_stride", BACKBONE_STRIDE)))
    input_rule(cfg, path)  # a bad input rule is the config's error, found before anything is built
    return cfg


def input_rule(cfg: DictConfig, where: str | Path) -> InputRule:
    """The config's input rule (top-level key ``input``; none: SAM2's ImageNet mean/std), see sam2_ext.frames."""
    node = cfg.get("input")
    if node is not None and not isinstance(node, DictConfig):
        raise ConfigError(where, "`input` must be a mapping (mean, std, slice_minmax)")
    try:
        return InputRule.from_config(None if node is None else OmegaConf.to_container(node), str(where))
    except ValueError as exc:
        raise ConfigError(where, str(exc).removeprefix(f"{where}: ")) from None


def build_icl_predictor(
    config: str | Path = DEFAULT_CONFIG,
    device: str | torch.device = "cpu",
    checkpoint: str | Path | None = None,
    image_size: int | None = None,
    predictor_cls: type | None = None,
):
    """Instantiate the video model of ``config`` as ``predictor_cls`` (default ICLPredictor) on ``device``.

    The train/eval mode is left to the caller (a fresh module is in train mode, as torch makes it).
    ``predictor_cls=sam2.sam2_video_predictor.SAM2VideoPredictor`` builds the official predictor (tests).
    """
    if predictor_cls is None:
        from sam2_ext.predictor import ICLPredictor

        predictor_cls = ICLPredictor
    cfg = load_model_config(config, image_size)
    rule = input_rule(cfg, config)
    cfg.model._target_ = f"{predictor_cls.__module__}.{predictor_cls.__qualname__}"
    OmegaConf.resolve(cfg)
    model = instantiate(cfg.model, _recursive_=True)
    model.input_rule = rule  # how its frames are prepared: the weights' convention travels with the config
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model.to(torch.device(device))


def _extract_state_dict(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """Find the state dict in official ``{"model": sd}``, MedSAM2, own training checkpoints or a bare sd."""
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(path, "no model state dict found (expected {'model': state_dict} or a state dict)")
    sd = {}
    for key, value in obj.items():
        key = str(key)
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        sd[key] = value
    return sd


def _load_problem(exc: Exception) -> str:
    """One line on why torch.load failed (torch's weights-only messages are long and mostly advice)."""
    text = str(exc)
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", text)
    if match:
        return f"not a plain tensor checkpoint or corrupt ({match.group(1).strip()})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else f"{type(exc).__name__} (file truncated or empty?)"


def weights_have_memory(path: str | Path) -> bool:
    """Whether a weights file holds a memory attention (SAM2's, a trained model's) or leaves it at its init
    (LiteMedSAM's: image encoder, prompt encoder and mask decoder only)."""
    try:
        obj = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(path, f"cannot read checkpoint: {_load_problem(exc)}") from None
    sd = _extract_state_dict(obj, path)
    return not is_litemedsam(sd) and any(str(k).startswith("memory_attention.") for k in sd)


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load weights strictly; any unreadable file or key/shape mismatch raises CheckpointError naming ``path``.

    A LiteMedSAM state dict loads its three parts (every mapped key strictly); the rest keeps its init."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle with disallowed globals, not a torch file...
        raise CheckpointError(path, f"cannot read checkpoint: {_load_problem(exc)}") from None
    sd = _extract_state_dict(obj, path)
    if is_litemedsam(sd):  # the medical-pretrained start: its own names, mapped (sam2_ext.litemedsam)
        load_litemedsam(model, sd, path)
        return
    own = model.state_dict()
    problems = fit_problems(own, sd, own)
    if problems:
        raise CheckpointError(path, "weights do not fit the model config; " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)
