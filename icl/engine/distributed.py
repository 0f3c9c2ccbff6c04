"""Multi-process training helpers (torchrun): process group, DDP wrap, samplers, rank-0 guards, metric reduction.

Launch: ``torchrun --nproc_per_node N train_3d.py -distributed True ...``. NCCL is used on GPUs, gloo on CPU.
Without torchrun's environment everything degrades to a single process (rank 0 of 1), so the same training
code runs unchanged on one device.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Dataset, DistributedSampler, Sampler


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(requested: bool, device: str) -> tuple[DistInfo, str]:
    """Join the torchrun process group when asked; returns the info and this rank's device string.

    On CUDA each rank takes ``cuda:LOCAL_RANK``. Asking for ``-distributed True`` without torchrun prints a
    note and runs as one process.
    """
    if not requested:
        return DistInfo(), device
    if not launched_by_torchrun():
        print("note: -distributed True but not launched by torchrun; running a single process "
              "(use: torchrun --nproc_per_node N train_3d.py ...)", file=sys.stderr)
        return DistInfo(), device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, backend=backend), device


def cleanup(info: DistInfo) -> None:
    """Leave the process group (safe to call twice or when never joined)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def wrap_ddp(module: torch.nn.Module, info: DistInfo, device: str) -> torch.nn.Module:
    """DistributedDataParallel around ``module`` (its forward must run the whole step so hooks fire)."""
    if not info.enabled:
        return module
    device_ids = [torch.device(device).index] if device.startswith("cuda") else None
    # SAM2 leaves some heads unused on a given step (e.g. no-object pointer), hence find_unused_parameters.
    return DDP(module, device_ids=device_ids, find_unused_parameters=True)


def make_sampler(dataset: Dataset, info: DistInfo, shuffle: bool, seed: int) -> Sampler | None:
    """DistributedSampler in a DDP job (call ``set_epoch`` every epoch), else None (the loader decides)."""
    if not info.enabled:
        return None
    return DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=shuffle, seed=seed,
                              drop_last=shuffle)


def shard_indices(n: int, info: DistInfo) -> list[int]:
    """Disjoint, exhaustive split of ``range(n)`` across ranks (validation: every sample counted once)."""
    return list(range(info.rank, n, info.world_size))


def all_reduce_sum(values: Mapping[str, float], info: DistInfo) -> dict[str, float]:
    """Sum a dict of scalars over ranks (same keys on every rank)."""
    keys = sorted(values)
    if not info.enabled or not dist.is_initialized() or not keys:
        return {k: float(values[k]) for k in keys}
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device(info))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def all_reduce_mean(values: Mapping[str, float], info: DistInfo) -> dict[str, float]:
    """Mean of a dict of scalars over ranks."""
    summed = all_reduce_sum(values, info)
    return {k: v / info.world_size for k, v in summed.items()}


def with_all_keys(values: Mapping[str, float], info: DistInfo) -> dict[str, float]:
    """``values`` with every key any rank holds (0.0 where this one has none), so ranks whose key sets differ
    (e.g. the classes or task levels each one saw) can all-reduce them."""
    keys = sorted(set().union(*all_gather_objects(sorted(values), info)))
    return {k: float(values.get(k, 0.0)) for k in keys}


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` when not distributed."""
    if not info.enabled or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the run folder name with its timestamp)."""
    if not info.enabled or not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def merge_counts(parts: Iterable[Mapping[str, tuple[float, int]]]) -> dict[str, tuple[float, int]]:
    """Merge per-rank ``{key: (sum, count)}`` dicts."""
    merged: dict[str, tuple[float, int]] = {}
    for part in parts:
        for k, (s, c) in part.items():
            s0, c0 = merged.get(k, (0.0, 0))
            merged[k] = (s0 + float(s), c0 + int(c))
    return merged


def _comm_device(info: DistInfo) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if info.backend == "nccl" else torch.device("cpu")
