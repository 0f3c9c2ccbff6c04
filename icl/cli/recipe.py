"""The recipe of the default CPU model (``checkpoint/icl_tiny_cpu.pth``): ``train_3d.py`` flags, written once.

Two stages from random init: ``RECIPE`` (look-alikes + phantom clips, -> ``checkpoint/icl_tiny_cpu_stage1.pth``)
then ``PRIOR`` (``--variant prior``: anatomy-like volumes with the interpolation as a mask prior, from stage 1).

The ablations change one lever per row: ``bench/icl_ablation.py`` of stage 1, ``bench/anatomy_ablation.py`` of
stage 2 (generator parts, where the prior's residual is read); ``checkpoint/README.md`` shows the commands this
prints. Stage 1 on 2 CPU processes (``torchrun``, gloo) in about 38 minutes, stage 2 on one in about 21:

    python -m icl.cli.recipe            # prints the command
    python -m icl.cli.recipe --run      # runs it (resumable: add -resume runs/recipe/<run folder>)
    python -m icl.cli.recipe --variant anatomy --processes 1    # the anatomy candidate (issue #17), one process
    python -m icl.cli.recipe --variant prior --processes 1 --run    # stage 2 of the default model, from stage 1
    python -m icl.cli.recipe --variant lite --processes 1 --run     # the candidate on LiteMedSAM (issue #24)
    python -m icl.cli.recipe --variant real --run   # learns from real anatomy (issue #32; --real-volumes IMG:LAB)
    python -m icl.cli.recipe --variant real_tiny --run   # the same on the shipped model (the CPU candidate of #32)

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

ROOT = Path(__file__).resolve().parents[2]
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
    "-checkpoint_path": "runs/recipe", "-export": "checkpoint/icl_tiny_cpu_stage1.pth",  # stage 1 (PRIOR: stage 2)
}


# The anatomy candidate (issue #17): the same levers; the look-alike curriculum first (it is what teaches reading
# the support, and keeps the phantom switch), then synthetic anatomy (icl/data/anatomy_tasks.py) mixed with
# look-alikes. Sized for one process in 50 minutes. No phantom clips: they were not measured to help here.
ANATOMY: dict[str, str] = {
    "-exp_name": "icl_anat_cpu",
    "-tasks": "0:discs_random=1;150:discs_random=1,adjacent=2;"
              "400:adjacent=1,sparse=1,anat_adjacent=1,anat_sparse=1;"
              "900:adjacent=0.3,sparse=0.7,anat_sparse=2,anat_adjacent=0.7,anat_far=0.5,anat_cross=0.7",
    "-anatomy_depth": "12", "-epochs": "25", "-val_samples": "0", "-num_workers": "1", "-time_limit_min": "50",
    "-checkpoint_path": "runs/anat", "-export": "runs/anat/candidate.pth",
}

# Stage 2 of the default model (issue #17): from the stage-1 weights (the look-alike/phantom recipe above, kept as
# checkpoint/icl_tiny_cpu_stage1.pth), synthetic anatomy with look-alikes kept in the mix (the switch must hold), and
# both-ways tasks cropped like the sparse fill with the classic interpolation as a dense mask prompt to refine
# (-mask_prior; icl/engine/prior_tasks.py), also a residual of the logits read at the output's resolution
# (-mask_prior_gain, -mask_prior_res output; sam2_ext/priors.py). One process, 1,200 steps.
PRIOR: dict[str, str] = {
    "-exp_name": "icl_tiny_cpu_prior", "-pretrain": "checkpoint/icl_tiny_cpu_stage1.pth", "-qk_init": "0",
    "-tasks": "0:adjacent=0.3,sparse=0.6,anat_sparse=2,anat_adjacent=0.5,anat_far=0.3,anat_cross=0.5",
    "-mask_prior": "0.8", "-mask_prior_gain": "10", "-mask_prior_res": "output", "-anatomy_depth": "16",
    "-lr": "5e-4", "-warmup_epochs": "0.2", "-epochs": "12", "-val_samples": "0", "-num_workers": "1",
    "-time_limit_min": "45", "-checkpoint_path": "runs/prior", "-export": "runs/prior/candidate.pth",
}
# The candidate on medical-pretrained weights (issue #24): LiteMedSAM's TinyViT encoder (frozen), prompt encoder and
# mask decoder (-pretrain litemedsam, cfg/medsam_lite.yaml), SAM2's memory modules new. Stage 2's task mix, cross-scan
# tasks also with a misregistered prior (icl/engine/train/prior_tasks.py), 40 % of tasks without any prior (the
# learned part alone). At 64 px (16 x 16 tokens): 128 px costs 37 s a step here (64 x 64 -> 32 x 32 memory
# attention), 64 px 7 s; the sparse fill runs the model in a box around the structures, where 64 px is about the
# structures' own size. One process, time-limited.
LITE: dict[str, str] = {
    "-exp_name": "icl_lite_cpu", "-config": "medsam_lite", "-pretrain": "litemedsam", "-freeze": "image_encoder",
    "-image_size": "64", "-out_size": "64", "-qk_init": "0",
    "-tasks": "0:adjacent=0.3,sparse=0.6,anat_sparse=2,anat_adjacent=0.5,anat_far=0.3,anat_cross=0.7",
    "-mask_prior": "0.6", "-mask_prior_gain": "10", "-mask_prior_res": "output", "-anatomy_depth": "12",
    "-lr": "1e-3", "-warmup_epochs": "0.5", "-epochs": "10", "-steps_per_epoch": "50", "-val_samples": "0",
    "-num_workers": "1", "-time_limit_min": "65", "-checkpoint_path": "runs/lite", "-export": "runs/lite/candidate.pth",
}
# The candidate that learns from real anatomy (issue #32): LiteMedSAM's frozen encoder with its outputs of real-volume
# crops stored once (-feature_cache auto) and the memory pooled 2 x 2 (cfg/medsam_lite_pool2.yaml), at 64 px (the
# structures' own size in the fill's box). Real labelled volumes (-real_volumes, given to the recipe as a path: never
# copied here) with the ten INIA19 benchmark structures and their homologues held out, along all three axes, in
# contrast / acquisition / warp variants; look-alikes kept so the phantom switch holds. One process, time-limited.
REAL_HELD_OUT = "1,1001,147,1147,45,1045,37,1037,7,1007"  # bench/real_anatomy.py's ten structures (INIA19 README)
REAL_VOLUMES = "../shared/data/inia19/inia19-t1-brain.nii.gz:../shared/data/inia19/inia19-NeuroMaps.nii.gz"
REAL: dict[str, str] = {
    "-exp_name": "icl_real_cpu", "-config": "medsam_lite_pool2", "-pretrain": "litemedsam",
    "-freeze": "image_encoder", "-feature_cache": "auto", "-image_size": "64", "-out_size": "64", "-qk_init": "0",
    "-tasks": "0:adjacent=0.3,sparse=0.5,real_sparse=2,real_adjacent=0.5,real_far=0.3,real_cross=0.8",
    "-real_volumes": REAL_VOLUMES, "-real_held_out": REAL_HELD_OUT, "-real_depth": "10", "-real_variants": "8",
    "-mask_prior": "0.6", "-mask_prior_gain": "10", "-mask_prior_res": "output",
    # lr 3e-4: at 1e-3 (LITE's) the first run collapsed after ~300 steps (object score constant, every mask empty);
    # both runs had the frozen encoder's BatchNorm in train mode (fixed since: icl.engine.train.step.frozen_modules)
    "-lr": "3e-4", "-warmup_epochs": "1", "-epochs": "14", "-steps_per_epoch": "50", "-val_freq": "7",
    "-val_samples": "0", "-keep_epochs": "2", "-num_workers": "1", "-time_limit_min": "115",
    "-checkpoint_path": "runs/real", "-export": "runs/real/candidate.pth",
}
# The same real-anatomy mix on the shipped default model (``--variant real_tiny``): the best base measured on CPU.
# On 4 fixed look-alike tasks (fit, then evaluated) the shipped model goes from Dice 0.600 to 0.832 in 20 steps at
# 64 px (~1 s a step); LiteMedSAM's base stays at 0.000 after 40 (~6 s a step): with no box its box-trained decoder
# returns no mask, and 40 steps do not teach it to read the memory (BENCHMARKS.md, issue #32). Everything trained
# (its encoder is not pretrained: no feature cache), at its own 128 px, stage 2's prior rule.
REAL_TINY: dict[str, str] = {
    **REAL, "-exp_name": "icl_real_tiny_cpu", "-config": "tiny_cpu", "-pretrain": "checkpoint/icl_tiny_cpu.pth",
    "-freeze": "none", "-feature_cache": "off", "-image_size": "128", "-out_size": "128",
    "-lr": "3e-4", "-warmup_epochs": "0.2", "-epochs": "12", "-steps_per_epoch": "100", "-val_freq": "12",
    "-time_limit_min": "70", "-checkpoint_path": "runs/real_tiny", "-export": "runs/real_tiny/candidate.pth",
}
VARIANTS: dict[str, dict[str, str]] = {"default": {}, "anatomy": ANATOMY, "prior": PRIOR, "lite": LITE, "real": REAL,
                                       "real_tiny": REAL_TINY}


def flags_with(changes: Mapping[str, str] | None = None) -> list[str]:
    """The recipe's flags with ``changes`` applied (new flags are appended), as an argv list."""
    merged = {**RECIPE, **(changes or {})}
    return [item for flag, value in merged.items() for item in (flag, value)]


def launch_command(changes: Mapping[str, str] | None = None, python: str = ".venv/bin/python",
                   processes: int = PROCESSES) -> list[str]:
    """The training command: torchrun (``torch.distributed.run``) with ``processes`` CPU ranks, or plain
    ``train_3d.py`` for one process."""
    if processes == 1:
        return [python, "train_3d.py", *flags_with(changes)]
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "train_3d.py",
            "-distributed", "True", *flags_with(changes)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m icl.cli.recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="store_true", help="run the command (from the repository root)")
    p.add_argument("--variant", choices=sorted(VARIANTS), default="default", help="the recipe, or a candidate")
    p.add_argument("--processes", type=int, default=None,
                   help=f"CPU ranks (1 = no torchrun); default {PROCESSES} for the default recipe, 1 for a variant")
    p.add_argument("--real-volumes", default=None, metavar="IMG:LAB[,IMG:LAB]",
                   help=f"--variant real: the labelled scans to learn from (default {REAL_VOLUMES}, relative to the "
                        "repository root)")
    p.add_argument("--resume", default=None, metavar="RUN_FOLDER", help="continue an interrupted run (-resume)")
    p.add_argument("--set", nargs="*", default=[], metavar="FLAG=VALUE",
                   help="change flags of the recipe (train_3d.py's names without the dash), e.g. time_limit_min=8 "
                        "image_size=256 (bench/gpu_train.sh)")
    a = p.parse_args(argv)
    processes = a.processes or (PROCESSES if a.variant == "default" else 1)
    changes = dict(VARIANTS[a.variant])
    if a.real_volumes:
        changes["-real_volumes"] = a.real_volumes
    if a.resume:
        changes["-resume"] = a.resume
    for item in a.set:
        flag, sep, value = item.partition("=")
        if not sep or not flag or flag.startswith("-"):
            p.error(f"--set takes FLAG=VALUE items (no dash), got {item!r}")
        changes["-" + flag] = value
    print("OMP_NUM_THREADS=1 " + " ".join(shlex.quote(c) for c in launch_command(changes, processes=processes)))
    if not a.run:
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = launch_command(changes, python=sys.executable, processes=processes)
    return subprocess.run(command, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
