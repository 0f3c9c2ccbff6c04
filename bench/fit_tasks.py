"""Can a model base fit a few fixed tasks? The first check of a training setup (issue #32).

Trains the model on ``--tasks`` fixed generated tasks (look-alikes by default), one task a step in turn, with the
recipe's loss (Dice + BCE of the raw masks, object score, IoU head, the memory probe) and AdamW, and every
``--every`` steps evaluates it on the same tasks as the engine runs it (eval mode, no grad, the masks SAM2 returns):
mean Dice over the tasks' scored frames. A setup that cannot raise this in a few dozen steps will not learn from a
long run either. Also printed: each step's loss terms and the largest raw mask logit on the scored frames.

    OMP_NUM_THREADS=1 .venv/bin/python bench/fit_tasks.py --config medsam_lite_pool2 --weights litemedsam \\
        --freeze image_encoder --lr 1e-3 --steps 40 [--qk-init 4]
    OMP_NUM_THREADS=1 .venv/bin/python bench/fit_tasks.py --config tiny_cpu --weights checkpoint/icl_tiny_cpu.pth \\
        --lr 1e-3 --steps 20                     # the shipped model: the control
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from icl.engine.train.losses import TaskLoss, ungated  # noqa: E402
from icl.engine.train.step import ICLStep, positional_memory_init  # noqa: E402
from icl.engine.train.tasks import level_task  # noqa: E402
from icl.model.build import build_predictor  # noqa: E402
from icl.model.weights import PACKAGED_WEIGHTS, packaged_pretrain  # noqa: E402


def dice(logits: torch.Tensor, task) -> float:
    """Dice of logits [N, K, h, w] > 0 (resized to the targets) with the truth, over the task's scored frames."""
    pred = F.interpolate(logits[task.scored].float(), size=task.targets.shape[-2:], mode="bilinear") > 0
    truth = task.targets[:, task.scored].transpose(0, 1) > 0.5
    return 2 * float((pred & truth).sum()) / max(1.0, float(pred.sum() + truth.sum()))


def evaluate(step: ICLStep, tasks: list) -> float:
    step.eval()
    with torch.no_grad():
        return float(np.mean([dice(step(task)["logits"], task) for task in tasks]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny_cpu")
    p.add_argument("--weights", default="checkpoint/icl_tiny_cpu.pth", help="a file, or a packaged name (litemedsam)")
    p.add_argument("--freeze", default="", help="comma list of model parts to freeze (image_encoder)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--level", default="adjacent", help="the generated task kind")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--qk-init", type=float, default=0.0, help="-qk_init on the memory attention first (0 = off)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    weights = a.weights
    if weights.lower() in PACKAGED_WEIGHTS:
        weights = str(packaged_pretrain(weights, a.config, "--weights"))
    predictor = build_predictor(a.config, "cpu", weights, a.size, "recency", [x for x in a.freeze.split(",") if x])
    if a.qk_init > 0:
        positional_memory_init(predictor, a.qk_init)
    step = ICLStep(predictor, aux_probe=True)
    loss_fn = TaskLoss("dice_bce", a.size, "raw", 1.0, 1.0, 0.0)
    params = [q for q in step.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=a.lr)
    tasks = [level_task(a.level, seed, a.size, 8, 3) for seed in range(a.tasks)]
    print(f"step 0: Dice on the fitted tasks (eval) {evaluate(step, tasks):.3f}", flush=True)
    t0 = time.perf_counter()
    for i in range(1, a.steps + 1):
        task = tasks[(i - 1) % len(tasks)]
        step.train()
        out = step(task)
        terms = loss_fn(out, task)
        optimizer.zero_grad()
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        raw = ungated(out)["logits"].detach()[task.scored]
        parts = " ".join(f"{k} {float(v):.3f}" for k, v in terms.items())
        print(f"step {i}: {parts}, max raw logit {float(raw.max()):.2f}, {time.perf_counter() - t0:.0f} s", flush=True)
        if i % a.every == 0 or i == a.steps:
            print(f"step {i}: Dice on the fitted tasks (eval) {evaluate(step, tasks):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
