"""Training checkpoints that survive a kill at any moment and load with ``torch.load(weights_only=True)``.

Layout of a run folder (``<checkpoint_path>/<exp_name>_<timestamp>/``): ``epoch_N.pth`` after every epoch,
``last.pth`` (a copy of the newest) and ``best.pth`` (best validation Dice). Every file is written to a temp
name and renamed (``icl.io.atomic_path``), so a process killed mid-save leaves the previous files intact and only
a hidden ``.<name>.*.tmp.pth`` behind, which :func:`find_resume_point` never picks.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from icl.errors import InputError
from icl.io import atomic_path
from icl.model.weights import FORMAT, load_checkpoint, no_weights, weights_path
from icl.options.common import DEFAULT_CHECKPOINT_PATH

_EPOCH_RE = re.compile(r"^epoch_(\d+)\.pth$")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP / wrapper modules (so saved keys carry no ``module.`` prefix)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


# ----------------------------------------------------------------------------------------------------- RNG state
def capture_rng() -> dict[str, Any]:
    """All RNG states as tensors / lists / ints so that ``weights_only=True`` can read them back."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": int(py_version), "state": [int(x) for x in py_state], "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (CUDA states are restored only when the GPU count matches)."""
    torch.set_rng_state(state["torch"].cpu())
    npst = state["numpy"]
    keys = npst["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((npst["name"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


# ----------------------------------------------------------------------------------------------------- save / load
def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    epoch: int,
    step: int,
    config: Mapping[str, Any] | Any,
    best_metric: float | None,
    scaler: Any = None,
    extra: Mapping[str, Any] | None = None,
    model_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write everything needed to continue training exactly, atomically (temp file + rename).

    ``extra``: state dicts of training-only modules (e.g. the auxiliary probe), never part of the model's weights.
    ``model_state``: what to store as the model instead of its whole state dict (``-peft lora``: the adapters)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    payload = {
        "format": FORMAT,
        "model": dict(model_state) if model_state is not None else unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "epoch": int(epoch),
        "step": int(step),
        "best_metric": None if best_metric is None else float(best_metric),
        "config": _plain(dict(config)),
        "rng": capture_rng(),
        "extra": dict(extra or {}),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _plain(obj: Any) -> Any:
    """Recursively turn a config into builtins (Paths and other objects become strings)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


# ----------------------------------------------------------------------------------------------------- run folders
def epoch_path(run_dir: str | Path, epoch: int) -> Path:
    return Path(run_dir) / f"epoch_{int(epoch)}.pth"


def _epoch_of(path: Path) -> int | None:
    """N of an ``epoch_N.pth`` name, else None."""
    match = _EPOCH_RE.match(path.name)
    return int(match.group(1)) if match else None


def _epoch_files(run_dir: Path) -> list[tuple[int, Path]]:
    """``(N, epoch_N.pth)`` newest first; temp files (``.epoch_N.pth.*.tmp.pth``) never match."""
    found = [(n, p) for p in run_dir.iterdir() if (n := _epoch_of(p)) is not None and p.is_file()]
    return sorted(found, reverse=True)


def epoch_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(N, epoch_N.pth)`` of a run folder, oldest first (``eval_3d.py -all_checkpoints``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(run_dir, "run folder not found (-all_checkpoints)")
    found = _epoch_files(run_dir)[::-1]
    if not found:
        raise InputError(run_dir, "no epoch_N.pth checkpoints in this run folder")
    return found


def _loads(path: Path) -> dict[str, Any] | None:
    try:
        return load_checkpoint(path)
    except InputError:
        return None


def find_resume_point(run_dir: str | Path) -> Path | None:
    """Newest checkpoint in ``run_dir`` that actually loads, or None.

    ``last.pth`` is tried first; an ``epoch_N.pth`` newer than it (a kill between the two renames) wins, and
    unreadable files are skipped so the search falls back to the previous good epoch.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(run_dir, "run folder not found")
    last = run_dir / "last.pth"
    last_payload = _loads(last) if last.is_file() else None
    last_epoch = last_payload["epoch"] if last_payload is not None else -1
    for n, path in _epoch_files(run_dir):
        if n <= last_epoch:
            break
        if _loads(path) is not None:
            return path
    return last if last_payload is not None else None


def resolve_resume(resume: str | Path) -> Path:
    """``-resume`` accepts a checkpoint file or a run folder; return the checkpoint file to load."""
    resume = Path(resume)
    if resume.is_dir():
        found = find_resume_point(resume)
        if found is None:
            raise InputError(resume, "no loadable checkpoint (last.pth / epoch_N.pth) in this run folder")
        return found
    load_checkpoint(resume)  # raises a clear InputError if unreadable
    return resume


def remove_stale_temps(run_dir: str | Path) -> list[Path]:
    """Delete ``.*.tmp.*`` leftovers of saves that were killed; returns what was removed."""
    removed = []
    for p in Path(run_dir).glob(".*.tmp*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def export_weights(src: str | Path, dst: str | Path) -> Path:
    """Write the model weights of a training checkpoint alone (what ``-export`` ships; a fraction of the size).

    ``{"model": state_dict, "trained": {epoch, step, best_metric, config}}``: loads like an official SAM2 file
    (``weights_only=True``), and ``trained.config`` holds every flag of the run that made it.
    """
    ck = load_checkpoint(src)
    payload = {"model": ck["model"],
               "trained": {"epoch": ck["epoch"], "step": ck["step"], "best_metric": ck.get("best_metric"),
                           "config": ck.get("config") or {}, "from": Path(src).name}}
    with atomic_path(dst) as tmp:
        torch.save(payload, tmp)
    return Path(dst)


def resolve_weights(cfg: Any) -> list[tuple[int | None, Path | None]]:
    """``eval_3d.py``'s use of the weights rule (``icl.model.weights.weights_path``): ``[(epoch or None, file or
    None = random init)]`` to evaluate. ``-all_checkpoints RUN``: every epoch_N.pth of the run; else
    ``-checkpoint_path`` when it is not left at its default, else ``-pretrain``."""
    if cfg.all_checkpoints:
        return list(epoch_checkpoints(cfg.all_checkpoints))
    given = cfg.checkpoint_path != DEFAULT_CHECKPOINT_PATH
    flag, weights = ("-checkpoint_path", cfg.checkpoint_path) if given else ("-pretrain", cfg.pretrain)
    if not given and weights is not None and not no_weights(weights) and not Path(weights).is_file():
        raise InputError(flag, f"weights file {weights} not found; give -checkpoint_path FILE, -pretrain FILE or "
                               "-pretrain none (random init)")
    path = weights_path(weights, flag)
    return [(None if path is None else _epoch_of(path), path)]
