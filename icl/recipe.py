"""The recipe of the default CPU model (``checkpoint/icl_tiny_cpu.pth``): ``train_3d.py`` flags, written once.

The ablation (``bench/icl_ablation.py``) changes one lever of it per row; ``checkpoint/README.md`` shows the command
this prints. Training from random init on 2 CPU processes (``torchrun``, gloo) within 60 minutes:

    python -m icl.recipe            # prints the command
    python -m icl.recipe --run      # runs it (resumable: add -resume runs/recipe/<run folder>)

What the levers are and why, with the figures: BENCHMARKS.md (ICL section).
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Mapping

ROOT = Path(__file__).resolve().parents[1]
PROCESSES = 2  # DDP ranks on the 2-core CPU, one thread each

RECIPE: dict[str, str] = {
    "-exp_name": "icl_tiny_cpu",
    "-config": "tiny_cpu", "-pretrain": "none", "-image_size": "128", "-out_size": "128", "-gpu_device": "-1",
    # what the model sees: look-alike tasks along a curriculum, and the phantom dataset's clips (4 shape classes;
    # torus and twin_blobs are held out everywhere, to measure generalisation to unseen shapes)
    "-tasks": "0:discs_random=1;200:discs_random=1,adjacent=2;500:adjacent=1,sparse=1,far=0.5;"
              "900:adjacent=0.5,sparse=1,cross=1,clips=1",
    "-held_out_shapes": "torus,twin_blobs", "-lookalike_depth": "8",
    "-dataset": "phantom", "-data_path": "datasets/phantom_recipe", "-support_instance": "none", "-folds": "4",
    "-video_length": "8", "-num_support": "3",
    # levers for training from scratch
    "-qk_init": "2", "-aux": "1", "-loss": "dice_bce",
    # optimisation: AdamW, warm-up then cosine over the whole run
    "-lr": "1e-3", "-warmup_epochs": "0.5", "-epochs": "30", "-steps_per_epoch": "100",
    "-val_freq": "5", "-val_samples": "40", "-count_flops": "False", "-time_limit_min": "60",
    "-checkpoint_path": "runs/recipe", "-export": "checkpoint/icl_tiny_cpu.pth",
}


def flags_with(changes: Mapping[str, str] | None = None) -> list[str]:
    """The recipe's flags with ``changes`` applied (new flags are appended), as an argv list."""
    merged = {**RECIPE, **(changes or {})}
    return [item for flag, value in merged.items() for item in (flag, value)]


def launch_command(changes: Mapping[str, str] | None = None, python: str = ".venv/bin/python") -> list[str]:
    """The default model's training command: torchrun (``torch.distributed.run``) with PROCESSES CPU ranks."""
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}", "train_3d.py",
            "-distributed", "True", *flags_with(changes)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m icl.recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="store_true", help="run the command (from the repository root)")
    a = p.parse_args(argv)
    print("OMP_NUM_THREADS=1 " + " ".join(shlex.quote(c) for c in launch_command()))
    if not a.run:
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(launch_command(python=sys.executable), cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
