"""Training throughput of the recipe: optimizer steps per minute, per task source, through the real training loop.

Each row builds the recipe's run (``icl.cli.recipe.RECIPE``, one process, random init) with ``-tasks 0:<source>=1`` and
``-num_workers W``, takes ``--warmup`` steps, then times ``--steps`` steps of ``icl.engine.train.loop.train_step``. The
time of a step is split into waiting for the loader (task generation, unless a worker made it ahead) and the step
itself (forward, backward, optimizer). Also: generation alone, per task. Median over the steps (the CPU is shared).
``--recipe real`` starts from another variant's flags (the real-anatomy candidate: LiteMedSAM frozen, 64 px, memory
pooled); ``--parts`` splits the step into the forward of each model part and the rest (backward + optimizer);
``--warm-cache`` runs the timed tasks once first, so their crops' encoder outputs are stored (``-feature_cache auto``).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_train_step.py --sources adjacent sparse anat_sparse --workers 0 1
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_train_step.py --recipe real --sources real_sparse --workers 0 \
        --parts --set image_size=128 out_size=128 feature_cache=off config=medsam_lite
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


PARTS = ("image_encoder", "memory_attention", "sam_mask_decoder", "memory_encoder")  # the forward pass's parts


class Stopwatch:
    """Forward seconds of the step and of each part of the model (hooks), summed until :meth:`take`."""

    def __init__(self, step_module, predictor):
        self.seconds: dict[str, float] = {}
        self._start: dict[int, float] = {}
        for name, module in [("forward", step_module)] + [(n, getattr(predictor, n)) for n in PARTS]:
            module.register_forward_pre_hook(lambda m, a: self._start.__setitem__(id(m), time.perf_counter()))
            module.register_forward_hook(lambda m, a, o, name=name: self._add(name, m))

    def _add(self, name, module):
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self._start.pop(id(module))

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


def time_source(source: str, workers: int, steps: int, warmup: int, changes: dict[str, str], base: str = "default",
                warm_cache: bool = False) -> dict[str, float]:
    """Median seconds of ``steps`` training steps on ``source`` tasks (after ``warmup``): loader wait, the step, and
    the step's parts (forward of each model part, the rest = backward + optimizer). ``base``: the recipe variant the
    flags start from; ``warm_cache``: the same tasks are run once first, so every crop's features are stored."""
    from icl.options.train import parse_train_args
    from icl.engine.train.loop import setup, train_step
    from icl.cli.recipe import VARIANTS, flags_with

    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_train_args(flags_with({
            **VARIANTS[base], "-tasks": f"0:{source}=1", "-num_workers": str(workers),
            "-steps_per_epoch": str(steps + warmup), "-checkpoint_path": tmp, "-export": "none",
            "-wandb_enabled": "False", "-time_limit_min": "0", "-cache_dir": tmp, **changes}))
        run = setup(cfg)
        run.step_module.train()
        if warm_cache:
            for task in run.train_loader:
                with torch.no_grad():
                    run.step_module(task.to(run.device))
        watch = Stopwatch(run.step_module, run.predictor)
        rows = []
        loader = iter(run.train_loader)
        for i in range(steps + warmup):
            t0 = time.perf_counter()
            task = next(loader)
            t1 = time.perf_counter()
            watch.take()
            train_step(run, task.to(run.device))
            t2 = time.perf_counter()
            parts = watch.take()
            if i >= warmup:
                rows.append({"wait": t1 - t0, "step": t2 - t1, "total": t2 - t0, **parts,
                             "backward": t2 - t1 - parts.get("forward", 0.0)})
        run.logger.finish()
    return {k: float(np.median([r.get(k, 0.0) for r in rows])) for k in rows[0]}


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
    p.add_argument("--set", nargs="*", default=[], metavar="FLAG=VALUE", help="recipe flags to change, without "
                   "the dash, e.g. anatomy_depth=8")
    p.add_argument("--recipe", default="default", help="the recipe variant the flags start from (icl.cli.recipe: "
                   "default, lite, real, ...)")
    p.add_argument("--warm-cache", action="store_true", help="run the timed tasks once first (-feature_cache auto: "
                   "every crop stored), so the steps read stored features")
    p.add_argument("--parts", action="store_true", help="also the forward seconds of each model part and the rest "
                   "(backward + optimizer)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    changes = {"-" + k.lstrip("-"): v for k, v in (item.split("=", 1) for item in a.set)}
    head = "| source | workers | generation ms | loader wait ms | step ms | steps/min |"
    parts = ("forward", *PARTS, "backward")
    if a.parts:
        head += " " + " | ".join(f"{n} ms" for n in parts) + " |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for source in a.sources:
        depth = int(changes.get("-anatomy_depth", 12)) if source.startswith("anat_") else \
            int(changes.get("-lookalike_depth", 8))
        gen = float("nan") if source.startswith("real_") else generation_ms(source, 5, 128, depth)
        for workers in a.workers:
            r = time_source(source, workers, a.steps, a.warmup, changes, a.recipe, a.warm_cache)
            row = f"| {source} | {workers} | {gen:.0f} | {1e3 * r['wait']:.0f} | {1e3 * r['step']:.0f} | " \
                  f"{60 / r['total']:.1f} |"
            if a.parts:
                row += " " + " | ".join(f"{1e3 * r.get(n, 0.0):.0f}" for n in parts) + " |"
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
