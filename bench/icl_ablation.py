"""Which levers make a model from random init read its support? The default recipe, and one lever changed per row.

Every row runs ``train_3d.py`` with the default model's recipe (``icl.cli.recipe``) for the same number of steps on one
thread, one lever changed (the recipe's task schedule is compressed to the row's steps, so every row sees the whole
curriculum), then scores its last checkpoint on fixed look-alike tasks training never draws
(``icl.engine.train.tasks.LookalikeSet``): ``adjacent`` (support on one slice, forward), ``sparse`` (the switch: support
on every k-th slice, both ways) and ``cross`` (support from another scan of the same shape class). Each figure is
Dice(marked) / Dice(others): a model that ignores its support has marked = others.

    .venv/bin/python bench/icl_ablation.py [--steps 600] [--rows recipe,no_qk_init,...] [--parallel 2] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from icl.cli.recipe import RECIPE, flags_with  # noqa: E402

# row -> (what changes, the flags that change it)
ROWS: dict[str, tuple[str, dict[str, str]]] = {
    "recipe": ("the default recipe", {}),
    "no_qk_init": ("no positional q/k init (-qk_init 0)", {"-qk_init": "0"}),
    "no_aux": ("no memory-probe loss (-aux 0)", {"-aux": "0"}),
    "no_qk_no_aux": ("neither", {"-qk_init": "0", "-aux": "0"}),
    "multimask": ("SAM2's 3-candidate tracking (-multimask_tracking on)", {"-multimask_tracking": "on"}),
    "sam2_loss": ("SAM2's loss and weights 20/1/1/1 (-loss sam2)", {"-loss": "sam2"}),
    "constant_lr": ("constant lr after the warm-up (-lr_schedule constant)", {"-lr_schedule": "constant"}),
    "no_curriculum": ("the last mix of the schedule from step 0", {"-tasks": "LAST"}),
    "target_only": ("look-alikes: only the target is an object (-lookalike_objects target)",
                    {"-lookalike_objects": "target"}),
    "px64": ("64 px (a 4x4 memory grid)", {"-image_size": "64", "-out_size": "64"}),
}
LEVELS = ("adjacent", "sparse", "cross")


def compressed(schedule: str, steps: int) -> str:
    """The recipe's ``-tasks`` schedule with its step marks scaled from the recipe's steps to ``steps``."""
    total = int(RECIPE["-epochs"]) * int(RECIPE["-steps_per_epoch"])
    parts = []
    for phase in schedule.split(";"):
        mark, mix = phase.split(":", 1)
        parts.append(f"{int(mark) * steps // total}:{mix}")
    return ";".join(parts)


def command(row: str, steps: int, out: Path) -> list[str]:
    changes = {"-tasks": compressed(RECIPE["-tasks"], steps), **ROWS[row][1]}
    if changes.get("-tasks") == "LAST":
        changes["-tasks"] = "0:" + RECIPE["-tasks"].split(";")[-1].split(":", 1)[1]
    flags = flags_with({**changes, "-epochs": str(max(1, steps // 100)), "-steps_per_epoch": "100",
                        "-time_limit_min": "0", "-checkpoint_path": str(out), "-exp_name": row, "-export": "none",
                        "-val_freq": "1000", "-val_samples": "8"})
    return [sys.executable, str(ROOT / "train_3d.py"), *flags]


def score(run_dir: Path, image_size: int) -> dict[str, tuple[float, float]]:
    """Dice(marked), Dice(others) per level of the run's last checkpoint on the fixed look-alike tasks."""
    from icl.model.weights import load_checkpoint
    from icl.engine.distributed import DistInfo
    from icl.engine.train.step import ICLStep, set_multimask_tracking
    from icl.engine.train.tasks import LookalikeSet, first
    from icl.engine.train.validation import validate_tasks
    from sam2_ext.build import build_icl_predictor

    ck = load_checkpoint(run_dir / "last.pth")
    model = build_icl_predictor(RECIPE["-config"], "cpu", image_size=image_size)
    model.load_state_dict(ck["model"])
    if ck["config"].get("multimask_tracking") in ("on", "off"):
        set_multimask_tracking(model, ck["config"]["multimask_tracking"] == "on")
    tasks = LookalikeSet(LEVELS, 8, image_size, int(RECIPE["-lookalike_depth"]) + 4, 3,
                         [s for s in RECIPE.get("-held_out_shapes", "").split(",") if s])
    loader = torch.utils.data.DataLoader(tasks, batch_size=1, collate_fn=first)
    metrics, _ = validate_tasks(ICLStep(model.eval()), loader, DistInfo(), "cpu", None, image_size)
    return {lv: (metrics.get(f"val/{lv}_marked", float("nan")), metrics.get(f"val/{lv}_others", float("nan")))
            for lv in LEVELS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--parallel", type=int, default=1, help="rows trained at once (one thread each)")
    p.add_argument("--out", default="runs/ablation")
    a = p.parse_args(argv)
    rows = [r for r in a.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    pending, running, minutes = list(rows), {}, {}
    while pending or running:
        while pending and len(running) < a.parallel:
            row = pending.pop(0)
            log = open(out / f"{row}.log", "w")
            running[row] = (subprocess.Popen(command(row, a.steps, out), cwd=ROOT, env=env, stdout=log, stderr=log),
                            time.time(), log)
        for row, (proc, t0, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                minutes[row] = (time.time() - t0) / 60
                if proc.returncode:
                    print(f"row {row} failed (exit {proc.returncode}), see {out / (row + '.log')}", file=sys.stderr)
                del running[row]
        time.sleep(2)
    torch.set_num_threads(1)
    print(f"## Ablation: {a.steps} steps per row from random init; Dice(marked) / Dice(others) on 8 held-out "
          f"look-alike tasks per level\n")
    print("| row | what changed | minutes | " + " | ".join(LEVELS) + " |")
    print("|---|---|---|" + "---|" * len(LEVELS))
    for row in rows:
        runs = sorted(out.glob(f"{row}_*/last.pth"), key=lambda q: q.stat().st_mtime)
        if not runs:
            continue
        image_size = int({**RECIPE, **ROWS[row][1]}["-image_size"])
        s = score(runs[-1].parent, image_size)
        cells = " | ".join(f"{m:.3f} / {o:.3f}" for m, o in s.values())
        print(f"| {row} | {ROWS[row][0]} | {minutes.get(row, float('nan')):.1f} | {cells} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
