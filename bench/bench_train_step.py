"""Training throughput of the recipe: optimizer steps per minute, per task source, through the real training loop.

Each row builds the recipe's run (``icl.cli.recipe.RECIPE``, one process, random init) with ``-tasks 0:<source>=1`` and
``-num_workers W``, takes ``--warmup`` steps, then times ``--steps`` steps of ``icl.engine.train.loop.train_step``. The
time of a step is split into waiting for the loader (task generation, unless a worker made it ahead) and the step
itself (forward, backward, optimizer). Also: generation alone, per task. Median over the steps (the CPU is shared).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_train_step.py --sources adjacent sparse anat_sparse --workers 0 1
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def time_source(source: str, workers: int, steps: int, warmup: int, changes: dict[str, str]) -> dict[str, float]:
    """Median wait / step / total seconds of ``steps`` training steps on ``source`` tasks (after ``warmup``)."""
    from icl.options.train import parse_train_args
    from icl.engine.train.loop import setup, train_step
    from icl.cli.recipe import flags_with

    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_train_args(flags_with({
            "-tasks": f"0:{source}=1", "-num_workers": str(workers), "-steps_per_epoch": str(steps + warmup),
            "-checkpoint_path": tmp, "-export": "none", "-wandb_enabled": "False", "-time_limit_min": "0",
            **changes}))
        run = setup(cfg)
        run.step_module.train()
        waits, work = [], []
        loader = iter(run.train_loader)
        for i in range(steps + warmup):
            t0 = time.perf_counter()
            task = next(loader)
            t1 = time.perf_counter()
            train_step(run, task.to(run.device))
            t2 = time.perf_counter()
            if i >= warmup:
                waits.append(t1 - t0)
                work.append(t2 - t1)
        run.logger.finish()
    wait, step = float(np.median(waits)), float(np.median(work))
    return {"wait": wait, "step": step, "total": float(np.median(np.add(waits, work)))}


def generation_ms(source: str, count: int, size: int, depth: int) -> float:
    """Median milliseconds to generate one task of ``source`` (in the training process, no model)."""
    from icl.engine.train.tasks import level_task

    times = []
    for seed in range(count):
        t0 = time.perf_counter()
        level_task(source, seed, size, depth, 3)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", nargs="+", default=["adjacent", "sparse", "anat_sparse", "anat_adjacent",
                                                     "anat_cross"])
    p.add_argument("--workers", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--set", nargs="*", default=[], metavar="FLAG=VALUE", help="recipe flags to change, e.g. "
                   "-anatomy_depth=8")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    changes = dict(item.split("=", 1) for item in a.set)
    print("| source | workers | generation ms | loader wait ms | step ms | steps/min |")
    print("|---|---|---|---|---|---|")
    for source in a.sources:
        depth = int(changes.get("-anatomy_depth", 12)) if source.startswith("anat_") else \
            int(changes.get("-lookalike_depth", 8))
        gen = generation_ms(source, 5, 128, depth)
        for workers in a.workers:
            r = time_source(source, workers, a.steps, a.warmup, changes)
            print(f"| {source} | {workers} | {gen:.0f} | {1e3 * r['wait']:.0f} | {1e3 * r['step']:.0f} | "
                  f"{60 / r['total']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
