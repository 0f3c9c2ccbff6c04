"""End-to-end demo on a fresh machine: the default model fills a sparsely annotated scan, then the whole pipeline.

Every step runs the same command a user would type (printed before it runs), so the output doubles as a tutorial:

1. a phantom scan no model has seen, each structure drawn on every 4th slice of its own (as in 3D Slicer), is
   filled by ``python -m icl.segment --support-slices labelled`` (``--fill auto``: the self-check on the user's own
   annotation picks per structure between the default CPU model and the classic fills, one line per structure),
   then by the model alone, and scored beside registration on the drawing, interpolation, nearest-slice copy and
   ITK morphological contour interpolation (3D Slicer's "Fill between slices", when installed);
2. phantom data → preprocess → train a tiny model from random init (CPU, a few minutes) → evaluate → table.

    python -m icl.cli.demo                  # about 4 minutes on CPU (training capped at 3)
    python -m icl.cli.demo --quick          # seconds-long settings (smoke test; the training's Dice is not meaningful)
    python -m icl.cli.demo --minutes 15 --out runs/demo

A failing step stops the demo with one ``error:`` line (exit 1).
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import pandas as pd

from icl.data.frames import Scan
from icl.data.phantom import make_case
from icl.data.vocabulary import SHAPES
from icl.errors import InputError, report
from icl.sparse.annotation import Annotation
from icl.sparse.fill import fill_volume
from icl.sparse.slice_registration import scan_fields
from icl.sparse.itk_contour import ITK_PACKAGE, itk_interpolation
from icl.sparse.protocol import annotate_sparse, sparse_dice

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Settings:
    """Sizes of one demo run (full vs ``--quick``)."""

    cases: int
    shape: str  # phantom X,Y,Z voxels
    image_size: int
    epochs: int
    steps_per_epoch: int
    val_samples: int
    video_length: int
    num_support: int


FULL = Settings(cases=12, shape="64,64,32", image_size=64, epochs=10, steps_per_epoch=30, val_samples=12,
                video_length=8, num_support=3)
QUICK = Settings(cases=4, shape="40,40,12", image_size=32, epochs=1, steps_per_epoch=2, val_samples=2,
                 video_length=4, num_support=1)


class StepFailed(RuntimeError):
    """A demo step exited non-zero (its own output has already been shown)."""


def run_step(title: str, args: list[str], env: dict[str, str]) -> float:
    """Print ``title`` and the command, run it from the repository root; returns seconds taken."""
    shown = " ".join(["python", *(shlex.quote(a) for a in args)])
    print(f"\n== {title}\n$ {shown}", flush=True)
    t0 = time.time()
    code = subprocess.run([sys.executable, *args], cwd=ROOT, env=env).returncode
    if code:
        raise StepFailed(f"step '{title}' failed (exit {code}): {shown}")
    return time.time() - t0


def newest_run(runs: Path, exp_name: str) -> Path:
    """The run folder train_3d.py just made (``<exp_name>_<timestamp>``, holding last.pth)."""
    found = sorted((p for p in runs.glob(f"{exp_name}_*") if (p / "last.pth").is_file()),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        raise StepFailed(f"training wrote no last.pth under {runs}")
    return found[-1]


def summary_table(eval_dir: Path) -> str:
    """Per protocol × class Dice from eval_3d.py's per-case CSV, as markdown."""
    df = pd.read_csv(eval_dir / "eval.csv")
    g = df.groupby(["protocol", "class_name"]).dice
    table = pd.DataFrame({"dice_mean": g.mean(), "dice_std": g.std(), "cases": g.size()}).reset_index()
    lines = ["| protocol | class | Dice mean | Dice std | cases |", "|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.protocol} | {r.class_name} | {r.dice_mean:.3f} | {r.dice_std:.3f} | {r.cases} |")
    return "\n".join(lines)


SPARSE_EVERY = 4  # each structure of the demo scan is drawn on every 4th slice of its own extent (3-5 slices each)


def sparse_inputs(out: Path, quick: bool) -> dict[str, Path]:
    """A phantom scan of every shape class (a seed training never uses), each structure drawn on every 4th slice
    of its own extent (per structure, as in 3D Slicer)."""
    folder = out / "sparse"
    folder.mkdir(parents=True, exist_ok=True)
    images, label, affine = make_case(0, seed=424242, shape=(48, 48, 16) if quick else (96, 96, 64), classes=SHAPES)
    sparse, _ = annotate_sparse(label, [int(c) for c in np.unique(label) if c > 0], SPARSE_EVERY)
    paths = {"image": folder / "scan.nii.gz", "truth": folder / "truth.nii.gz", "sparse": folder / "annotated.nii.gz",
             "filled": folder / "filled.nii.gz", "model": folder / "filled_model.nii.gz",
             "report": folder / "self_check.json"}
    for key, arr in (("image", images[0]), ("truth", label), ("sparse", sparse)):
        nib.save(nib.Nifti1Image(arr, affine), str(paths[key]))
    return paths


def sparse_table(paths: dict[str, Path]) -> str:
    """Dice per method on each structure's unannotated slices, mean over the structures."""
    truth = np.asarray(nib.load(str(paths["truth"])).dataobj)
    sparse = np.asarray(nib.load(str(paths["sparse"])).dataobj)
    classes = [int(c) for c in np.unique(sparse) if c > 0]
    annotation = Annotation.from_label(sparse, 2, classes)
    methods = {"auto (icl.segment: self-check per structure)": np.asarray(nib.load(str(paths["filled"])).dataobj),
               "default model alone (--fill model)": np.asarray(nib.load(str(paths["model"])).dataobj)}
    fields = scan_fields(Scan.open(paths["image"]), 2)  # the image between the drawn slices
    for fill in ("registration", "interpolation", "nearest"):
        methods[f"{fill} (--fill {fill})"] = filled = np.zeros_like(sparse)
        fill_volume(annotation, {c: fill for c in classes}, None, np.moveaxis(filled, 2, 0), fields=fields)
    itk = itk_interpolation(sparse)
    if itk is not None:
        methods["ITK contour interpolation (3D Slicer)"] = itk
    lines = ["| method | Dice (mean over structures, their unannotated slices) |", "|---|---|"]
    for name, pred in methods.items():
        lines.append(f"| {name} | {np.nanmean(list(sparse_dice(pred, truth, classes, annotation.slices).values())):.3f} |")
    if itk is None:
        lines.append(f"| ITK contour interpolation | not installed (pip install {ITK_PACKAGE}) |")
    return "\n".join(lines)


def commands(s: Settings, out: Path, minutes: float) -> dict[str, list[str]]:
    """The demo's command lines, in order (``run`` is filled in for eval once training has made it)."""
    data, cache, runs = out / "data", out / "cache", out / "runs"
    model = ["-config", "tiny_cpu", "-gpu_device", "-1", "-image_size", str(s.image_size), "-out_size",
             str(s.image_size), "-num_support", str(s.num_support)]
    data_flags = ["-dataset", "phantom", "-data_path", str(data), "-cache_dir", str(cache)]
    sparse = out / "sparse"
    return {
        "segment": ["-m", "icl.segment", "--support", str(sparse / "scan.nii.gz"), "--support-label",
                    str(sparse / "annotated.nii.gz"), "--query", str(sparse / "scan.nii.gz"), "--out",
                    str(sparse / "filled.nii.gz"), "--support-slices", "labelled", "--quiet",
                    "--report", str(sparse / "self_check.json")],
        "segment_model": ["-m", "icl.segment", "--support", str(sparse / "scan.nii.gz"), "--support-label",
                          str(sparse / "annotated.nii.gz"), "--query", str(sparse / "scan.nii.gz"), "--out",
                          str(sparse / "filled_model.nii.gz"), "--support-slices", "labelled", "--quiet",
                          "--fill", "model"],
        "phantom": ["-m", "icl.cli.phantom", "--out", str(data), "--layout", "kits", "--cases", str(s.cases),
                    "--shape", s.shape, "--seed", "0"],
        "preprocess": ["-m", "icl.cli.preprocess", "--dataset", "kits", "--data_path", str(data), "--cache",
                       str(cache / f"phantom_{data.name}_{s.image_size}"), "--image_size", str(s.image_size)],
        "train": ["train_3d.py", "-exp_name", "demo", *data_flags, *model, "-pretrain", "none",
                  "-video_length", str(s.video_length), "-support_instance", "none", "-folds", "4",
                  "-query_mode", "context", "-lr", "1e-3", "-warmup_epochs", "0.2", "-epochs", str(s.epochs),
                  "-steps_per_epoch", str(s.steps_per_epoch), "-val_freq", str(s.epochs),
                  "-val_samples", str(s.val_samples), "-time_limit_min", f"{minutes:g}", "-keep_epochs", "1",
                  "-log_images", "1", "-wandb_enabled", "False", "-count_flops", "False",
                  "-checkpoint_path", str(runs)],
        "eval": ["eval_3d.py", "-exp_name", "demo", *data_flags, *model, "-pretrain", "none", "-protocol", "both",
                 "-out_dir", str(out / "eval"), "-checkpoint_path"],
    }


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m icl.cli.demo", description=__doc__.split("\n\n")[0],
                                epilog="Files: <out>/data (NIfTI), <out>/cache, <out>/runs (checkpoints), <out>/eval "
                                       "(eval.csv, eval.md, eval_summary.csv).")
    p.add_argument("--out", default="runs/demo", help="folder for data, cache, checkpoints and results")
    p.add_argument("--quick", action="store_true", help="seconds-long settings for tests (Dice not meaningful)")
    p.add_argument("--minutes", type=float, default=None,
                   help="training wall-clock cap in minutes (default 3; 0.5 with --quick)")
    a = p.parse_args(argv)
    if a.minutes is not None and a.minutes <= 0:
        p.error(f"--minutes must be > 0, got {a.minutes}")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    a = parse(argv)
    s = QUICK if a.quick else FULL
    minutes = a.minutes if a.minutes is not None else (0.5 if a.quick else 3.0)
    out = Path(a.out).resolve()
    if out.exists() and not out.is_dir():
        return report(InputError("--out", f"{out} exists and is not a folder"))
    if out.exists() and any(out.iterdir()):
        print(f"note: {out} exists; data and cache are reused, a new run folder is added", file=sys.stderr)
    # one thread per process: on a shared few-core machine more threads make tiny models slower, not faster
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = commands(s, out, minutes)
    times: dict[str, float] = {}
    t0 = time.time()
    try:
        paths = sparse_inputs(out, a.quick)
        times["segment"] = run_step(f"1/6 fill a phantom scan whose structures are drawn on every {SPARSE_EVERY}th "
                                    f"slice ({paths['sparse']}): the self-check on the annotation picks the method "
                                    "per structure", cmd["segment"], env)
        times["segment"] += run_step("2/6 the same with the default model alone", cmd["segment_model"], env)
        print(f"\n{sparse_table(paths)}\n(filled scan: {paths['filled']}; self-check: {paths['report']})")
        if not (out / "data").exists():
            times["phantom"] = run_step("3/6 generate a phantom dataset (KiTS layout, 3 shape classes)",
                                        cmd["phantom"], env)
        times["preprocess"] = run_step("4/6 preprocess once into a slices-first cache", cmd["preprocess"], env)
        times["train"] = run_step(f"5/6 train a tiny model from random init (CPU, <= {minutes:g} min)",
                                  cmd["train"], env)
        run = newest_run(out / "runs", "demo")
        times["eval"] = run_step("6/6 evaluate it on the validation fold (both protocols)", [*cmd["eval"], str(run)],
                                 env)
        table = summary_table(out / "eval")
    except StepFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (OSError, KeyError, ValueError) as err:
        print(f"error: reading the results failed: {err}", file=sys.stderr)
        return 1
    total = time.time() - t0
    print("\n== summary of the freshly trained model: 3D Dice per protocol and class (validation cases, original "
          "resolution)\n")
    print(table)
    print(f"\ntime: {total:.0f} s in all (" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ")")
    print(f"files:\n  data        {out / 'data'}\n  cache       {out / 'cache'}\n  checkpoints {run}"
          f"\n  results     {out / 'eval' / 'eval.csv'} (per case), {out / 'eval' / 'eval.md'}, "
          f"{out / 'eval' / 'eval_summary.csv'}")
    print("next: python -m icl.segment -h | python train_3d.py -h | python eval_3d.py -h | python bench/icl_switch.py -h")
    return 0


if __name__ == "__main__":
    sys.exit(main())
