"""The real-anatomy recipe (``icl.cli.recipe`` ``REAL``) on one CUDA GPU: 256 px, bf16, a few minutes of training.

Why: on the 2-core CPU the recipe affords a few hundred steps at 64 px; a GPU gives thousands at LiteMedSAM's own
size in minutes. The same flags as ``python -m icl.cli.recipe --variant real`` except what a GPU changes: the device,
256 px (``-image_size``/``-out_size``), bf16 autocast, ``-time_limit_min`` (default 8), DataLoader workers, a longer
planned schedule (the time limit ends it), and the image-feature cache off (the frozen encoder is cheap on a GPU, and
256 px features of every crop would fill its disk). Writes into ``OUT``: the run folder (checkpoints, config.json,
wandb offline logs), ``candidate.pth`` (the exported weights), ``train.log`` (everything training printed) and
``step_rate.json``; prints the step rate (optimizer steps per minute and seconds per step, loader waits apart).

    bench/gpu_train.sh OUT [IMG:LAB[,IMG:LAB]]                        # on the GPU machine (see that script)
    .venv/bin/python bench/gpu_train.py --out OUT --real-volumes IMG:LAB [--minutes 8] [--gpu 0]
    .venv/bin/python bench/gpu_train.py --out OUT --real-volumes IMG:LAB --cpu --steps 3    # the CPU check (tests)
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from icl.cli.recipe import REAL, REAL_VOLUMES, flags_with  # noqa: E402  (after the path set-up)
from icl.engine.train import loop  # noqa: E402
from icl.io import write_json  # noqa: E402
from icl.options.spec import run_command  # noqa: E402
from icl.options.train import parse_train_args  # noqa: E402

GPU = {"-image_size": "256", "-out_size": "256", "-amp": "bf16", "-feature_cache": "off", "-num_workers": "6",
       "-epochs": "40", "-steps_per_epoch": "50", "-val_freq": "40", "-val_samples": "24"}
CPU_CHECK = {"-gpu_device": "-1", "-image_size": "64", "-out_size": "64", "-amp": "none", "-num_workers": "0",
             "-real_variants": "2", "-val_samples": "1", "-val_freq": "1", "-epochs": "1", "-time_limit_min": "0"}


def recipe_flags(out: Path, volumes: str, minutes: float, gpu: int, cpu_steps: int | None,
                 extra: dict[str, str] | None = None) -> list[str]:
    """The recipe's flags with the GPU run's changes (or the CPU check's: 64 px, ``cpu_steps`` steps), then
    ``extra`` ({"-flag": value})."""
    changes = {**REAL, **GPU, "-gpu_device": str(gpu), "-time_limit_min": f"{minutes:g}", "-real_volumes": volumes,
               "-checkpoint_path": str(out), "-export": str(out / "candidate.pth")}
    if cpu_steps is not None:
        changes.update(CPU_CHECK, **{"-steps_per_epoch": str(cpu_steps)})
    return flags_with({**changes, **(extra or {})})


class StepClock:
    """Wraps the loop's ``train_step``: seconds of every optimizer step (forward, backward, update), synchronised
    on CUDA so a step's time is its own."""

    def __init__(self, step):
        self.step, self.seconds = step, []

    def __call__(self, run, task):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        terms = self.step(run, task)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - t0)
        return terms


@contextlib.contextmanager
def tee(path: Path):
    """stdout and stderr also into ``path`` (what training prints: the run's log)."""
    class Both:
        def __init__(self, *streams):
            self.streams = streams

        def write(self, text):
            for s in self.streams:
                s.write(text)
            return len(text)

        def flush(self):
            for s in self.streams:
                s.flush()

    with open(path, "a", buffering=1) as log:
        old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Both(old[0], log), Both(old[1], log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = old


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the run, the weights and the log")
    p.add_argument("--real-volumes", default=REAL_VOLUMES, metavar="IMG:LAB[,IMG:LAB]")
    p.add_argument("--minutes", type=float, default=8.0, help="training time limit (-time_limit_min)")
    p.add_argument("--gpu", type=int, default=0, help="CUDA index")
    p.add_argument("--cpu", action="store_true", help="the CPU check: 64 px, no GPU, --steps steps")
    p.add_argument("--steps", type=int, default=3, help="steps of the CPU check")
    p.add_argument("--set", nargs="*", default=[], metavar="FLAG=VALUE", help="other train_3d.py flags, no dash")
    a = p.parse_args(argv)
    extra = {}
    for item in a.set:
        flag, sep, value = item.partition("=")
        if not sep or not flag or flag.startswith("-"):
            p.error(f"--set takes FLAG=VALUE items (no dash), got {item!r}")
        extra["-" + flag] = value
    if not a.cpu and not torch.cuda.is_available():
        print("error: no CUDA device here; run on a GPU machine, or --cpu --steps N for the CPU check",
              file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1 if a.cpu else torch.get_num_threads())
    flags = recipe_flags(a.out, a.real_volumes, a.minutes, a.gpu, a.steps if a.cpu else None, extra)
    clock = StepClock(loop.train_step)
    loop.train_step = clock  # the loop looks it up at every step
    t0 = time.perf_counter()
    with tee(a.out / "train.log"):
        print("train_3d.py " + " ".join(flags), file=sys.stderr)
        code = run_command(lambda argv: parse_train_args(argv), loop.train, flags)
    wall = time.perf_counter() - t0
    steps, busy = len(clock.seconds), sum(clock.seconds)
    device = "cpu" if a.cpu else torch.cuda.get_device_name(a.gpu)
    rate = {"device": device, "steps": steps, "step_seconds_total": busy, "wall_seconds": wall,
            "seconds_per_step": busy / steps if steps else None,
            "steps_per_minute": 60 * steps / busy if busy else None, "exit_code": code}
    write_json(a.out / "step_rate.json", rate)
    if steps:
        print(f"step rate on {device}: {rate['steps_per_minute']:.1f} steps/min ({rate['seconds_per_step']:.3f} s "
              f"per step, {steps} steps; {wall / 60:.1f} min in all with loading and validation)")
    return code


if __name__ == "__main__":
    sys.exit(main())
