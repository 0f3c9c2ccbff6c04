"""The resolution ceiling of the model's fill: a *perfect* copy of the interpolation through the model's mask grid.

The model's masks live on a grid of ``image_size / 4`` cells (32 x 32 at 128 px). Even a model that reproduced
its mask prior exactly would lose what that grid cannot hold. This bench measures it on a labelled scan: per
structure, the engine's interpolation of a per-structure annotation every ``--step`` slices, downsampled to the
grid (as the prior is given) and upsampled back (as the logits are), on the whole slice and in the fill's crop
(``icl.sparse.model_fill.square_box``); 3D Dice against the truth on the slices that were not drawn.

    .venv/bin/python bench/prior_ceiling.py --image T1.nii.gz --label labels.nii.gz --classes 1,1001 [--step 6]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from icl.sparse.protocol import annotate_sparse  # noqa: E402
from icl.sparse.annotation import Annotation  # noqa: E402
from icl.sparse.classic import ClassicFill, place  # noqa: E402
from icl.sparse.model_fill import square_box  # noqa: E402


def through_grid(mask: np.ndarray, cells: int) -> np.ndarray:
    """``mask`` downsampled to ``cells`` x ``cells`` (bilinear, antialiased) and back (bilinear), > 0.5."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    low = F.interpolate(m, size=(cells, cells), mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(low, size=mask.shape, mode="bilinear", align_corners=False)[0, 0].numpy() > 0.5


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", required=True, help="unused but for the record: the scan the labels belong to")
    p.add_argument("--label", required=True)
    p.add_argument("--classes", required=True)
    p.add_argument("--step", type=int, default=6)
    p.add_argument("--cells", type=int, default=32, help="the model's mask grid (image_size / 4)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    classes = [int(c) for c in a.classes.split(",")]
    label = np.asarray(nib.load(a.label).dataobj).astype(np.int32)
    label = np.where(np.isin(label, classes), label, 0)
    sparse, _ = annotate_sparse(label, classes, a.step, "per_structure")
    annotation = Annotation.from_label(sparse, 2, classes)
    truth_zhw = np.moveaxis(label, 2, 0)
    fill = ClassicFill(annotation, "interpolation")
    rows = []
    for c in classes:
        full_box = (0, *annotation.in_plane_shape[:1], 0, annotation.in_plane_shape[1])
        crop = square_box([annotation.box(c, 0)], annotation.in_plane_shape)
        pred = {name: np.zeros(truth_zhw.shape, bool) for name in ("interpolation", "whole slice", "crop")}
        for z in range(annotation.depth):
            score = fill.score(c, z)
            if score is None:
                continue
            mask = place(score, annotation.in_plane_shape)
            pred["interpolation"][z] = mask
            for name, (y0, y1, x0, x1) in (("whole slice", full_box), ("crop", crop)):
                pred[name][z, y0:y1, x0:x1] = through_grid(mask[y0:y1, x0:x1], a.cells)
        scored = np.ones(annotation.depth, bool)
        scored[annotation.slices[c]] = False  # as bench/real_anatomy.py: the slices that were not drawn
        truth = (truth_zhw == c)[scored]
        rows.append((c, {name: dice(m[scored], truth) for name, m in pred.items()}))
        print(f"structure {c}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1][1].items()), flush=True)
    means = {k: np.mean([r[k] for _, r in rows]) for k in rows[0][1]}
    print(f"mean over {len(rows)} structures (every {a.step}th slice, {a.cells}x{a.cells} grid): "
          + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
