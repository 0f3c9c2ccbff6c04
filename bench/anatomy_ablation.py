"""Which parts of the anatomy generator, and which stage-2 levers, does the default model need? One change per row.

Every row runs stage 2 of the default model's recipe (``icl.cli.recipe``, variant ``prior``: from the stage-1 weights,
anatomy-like volumes with the interpolation as a mask prior) for the same number of steps, one change made — a
generator part left out (``-anatomy_drop``, ``icl.data.anatomy_tasks.GENERATOR_PARTS``) or a lever changed — then
scores the exported weights with the model fill alone:

* on generated anatomy it never trained on (per-structure sparse annotation every 4th slice, 6 volumes,
  ``bench.switch_check.anatomy_scores``), beside interpolation and nearest copy in the same run;
* with ``--image/--label/--classes``, on a real labelled scan (per structure, every ``--every``-th slice; the
  protocol of ``bench/real_anatomy.py``), beside the same two classic fills, and the same weights without their
  prior (what the image alone teaches them: the prior hides the generator's effect where the model copies it).

    .venv/bin/python bench/anatomy_ablation.py [--steps 500] [--rows full,no_texture,...] [--out runs/anat_ablation] \\
        [--image T1.nii.gz --label LABELS.nii.gz --classes 1,2,3 --every 6]

One process per row, rows one after the other (each training uses the recipe's data-loader worker).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from icl.cli.recipe import PRIOR, launch_command  # noqa: E402

ACQUISITION = "blur,lowres,bias,noise,gamma"
# row -> (what changes, the flags that change it)
ROWS: dict[str, tuple[str, dict[str, str]]] = {
    "full": ("the stage-2 recipe (every generator part)", {}),
    "no_weak_contrast": ("every structure its own intensity (no shared tissue classes)",
                         {"-anatomy_drop": "weak_contrast"}),
    "no_texture": ("no texture inside structures", {"-anatomy_drop": "texture"}),
    "no_acquisition": (f"no acquisition artefacts ({ACQUISITION})", {"-anatomy_drop": ACQUISITION}),
    "no_background": ("no clutter outside the body, no bright rim", {"-anatomy_drop": "clutter,rim"}),
    "no_extras": ("partition only (no blobs, nested pairs, tubes, curves, tiny structures)",
                  {"-anatomy_drop": "extras"}),
    "no_deformation": ("the two patients of a pair undeformed", {"-anatomy_drop": "deformation"}),
    "grid_residual": ("the prior's residual on the decoder's 32 x 32 grid (-mask_prior_res grid)",
                      {"-mask_prior_res": "grid"}),
    "gain4": ("residual gain 4 instead of 10", {"-mask_prior_gain": "4"}),
    "px160": ("160 px instead of 128 (a 40 x 40 mask grid; stage 1 was trained at 128)",
              {"-image_size": "160", "-out_size": "160"}),
}


def command(row: str, steps: int, out: Path) -> list[str]:
    changes = {**PRIOR, **ROWS[row][1], "-epochs": str(max(1, steps // 100)), "-steps_per_epoch": "100",
               "-time_limit_min": "0", "-checkpoint_path": str(out), "-exp_name": row,
               "-export": str(out / f"{row}.pth"), "-wandb_enabled": "False"}
    return launch_command(changes, python=sys.executable, processes=1)


def scores(weights: Path, real: dict | None, work: Path) -> dict[str, float]:
    """Model / interpolation / nearest on generated anatomy, and on the real scan when given."""
    from icl.api import ICLSegmenter
    from bench.switch_check import anatomy_scores

    seg = ICLSegmenter(checkpoint=weights, support_slices="labelled")
    out = {f"anat_{k}": v for k, v in anatomy_scores(seg, work, range(900, 906)).items() if k != "auto"}
    if real is not None:
        sys.path.insert(0, str(ROOT / "bench"))
        from real_anatomy import mean, sparse_rows

        row = sparse_rows(seg, real["image"], real["label"], real["affine"], real["classes"], ["per_structure"],
                          [real["every"]], work, ("model", "interpolation", "nearest"), classic=False)[0]
        out.update({f"real_{k}": mean(v) for k, v in row["dice"].items()})  # model_without_prior too
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--out", default="runs/anat_ablation")
    p.add_argument("--image")
    p.add_argument("--label")
    p.add_argument("--classes")
    p.add_argument("--every", type=int, default=6)
    a = p.parse_args(argv)
    rows = [r for r in a.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if (a.image is None) != (a.label is None) or (a.image is not None and not a.classes):
        p.error("--image, --label and --classes go together")
    torch.set_num_threads(1)
    real = None
    if a.image:
        import nibabel as nib

        img, lab = nib.load(a.image), nib.load(a.label)
        classes = [int(c) for c in a.classes.split(",")]
        label = np.asarray(lab.dataobj).astype(np.int32)
        real = {"image": np.asarray(img.dataobj, dtype=np.float32), "label": np.where(np.isin(label, classes), label, 0),
                "affine": img.affine, "classes": classes, "every": a.every}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    header = None
    for row in rows:
        weights = out / f"{row}.pth"
        t0 = time.time()
        if not weights.is_file():
            with open(out / f"{row}.log", "w") as log:
                code = subprocess.run(command(row, a.steps, out), cwd=ROOT, env=env, stdout=log, stderr=log).returncode
            if code or not weights.is_file():
                print(f"row {row} failed (exit {code}), see {out / (row + '.log')}", file=sys.stderr)
                continue
        minutes = (time.time() - t0) / 60
        with tempfile.TemporaryDirectory() as tmp:
            s = scores(weights, real, Path(tmp))
        if header is None:
            header = list(s)
            print(f"## Stage-2 ablation: {a.steps} steps per row from the stage-1 weights; Dice of the model fill "
                  f"(per structure), interpolation and nearest beside it\n")
            print("| row | what changed | train min | " + " | ".join(header) + " |")
            print("|---|---|---|" + "---|" * len(header))
        print(f"| {row} | {ROWS[row][0]} | {minutes:.1f} | " + " | ".join(f"{s.get(k, float('nan')):.3f}"
                                                                        for k in header) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
