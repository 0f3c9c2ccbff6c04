"""Does the model read its support? Switch, sparse -> dense and cross-case figures, through the CLI's own code path.

Every volume is written as a NIfTI file and segmented by ``icl.api.ICLSegmenter`` (what ``python -m icl.segment``
runs), on fixed seeds that training never draws:

* **switch**: three look-alike objects (one shape class, one intensity distribution; ``icl.data.lookalike``); each in
  turn is marked on every 4th slice of the same scan (``support_slices="labelled"``, tracked both ways) -> Dice of
  the prediction with the marked object and with the other two, on the unannotated slices.
* **sparse -> dense**: phantom scans (``icl.data.phantom``, every shape class) annotated on every 4th / 8th slice ->
  Dice per class on the unannotated slices, beside nearest-annotated-slice copy and ITK morphological contour
  interpolation (3D Slicer's "Fill between slices"; optional: ``pip install -r bench/requirements-bench.txt``).
* **cross-case**: support slices from another phantom scan -> Dice per class on the query; classes split into those
  the model trained on and the held-out ones (``--held-out``); and the switch across cases: the support of class A,
  then of class B, on the same query, scored against both truths.

    .venv/bin/python bench/icl_switch.py [--checkpoint FILE] [--config tiny_cpu] [--cases 6] [--held-out torus,twin_blobs]
        [--prior auto|none]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.baselines import classic_fills
from icl.sparse.protocol import sparse_dice, sparse_label  # noqa: E402
from icl.data.vocabulary import SHAPES
from icl.data.phantom import make_case  # noqa: E402
from icl.model.dice import binary_dice as dice  # noqa: E402
from bench.switch_check import switch_scores  # noqa: E402

SEED0 = 2**31 + 7_000  # far from every seed training draws
PHANTOM_SHAPE = (96, 96, 40)


def save(arr: np.ndarray, path: Path, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))
    return path


# ---------------------------------------------------------------------------------------------------- parts
def phantom(i: int, work: Path) -> tuple[Path, np.ndarray, Path]:
    images, label, affine = make_case(i, seed=SEED0 % 10_000, shape=PHANTOM_SHAPE, classes=SHAPES)
    image = save(images[0], work / f"ph{i}.nii.gz", affine)
    return image, label, save(label, work / f"ph{i}_label.nii.gz", affine)


def sparse_dense(seg, work: Path, cases: int, spacings=(4, 8)) -> dict:
    rows: dict[tuple[int, str], list[float]] = {}
    for i in range(cases):
        image, label, _ = phantom(i, work)
        for every in spacings:
            sparse, kept = sparse_label(label, every)
            sparse_path = save(sparse, work / f"ph{i}_every{every}.nii.gz", nib.load(str(image)).affine)
            preds = {"ours": seg.segment(image, image, sparse_path).labels, **classic_fills(sparse)}
            classes = list(range(1, len(SHAPES) + 1))
            for name, pred in preds.items():  # Dice on the slices not given as support
                rows.setdefault((every, name), []).extend(
                    sparse_dice(pred, label, classes, {c: kept for c in classes}).values())
    return {key: float(np.nanmean(v)) for key, v in rows.items()}


def cross_case(seg, work: Path, cases: int, held_out: list[str]) -> dict:
    per_class: dict[str, list[float]] = {}
    switch_rows = []
    for i in range(cases):
        s_image, _, s_label = phantom(1000 + i, work)
        q_image, q_label, _ = phantom(i, work)
        pred = seg.segment(q_image, s_image, s_label).labels
        for c, name in enumerate(SHAPES, start=1):
            per_class.setdefault(name, []).append(dice(pred == c, q_label == c))
        a, b = 1, 4  # ellipsoid and box: the support of one class, then of the other, on the same query
        for shown in (a, b):
            only = seg.segment(q_image, s_image, s_label, classes=[shown]).labels > 0
            switch_rows.append((shown, dice(only, q_label == a), dice(only, q_label == b)))
    trained = [n for n in SHAPES if n not in held_out]
    rows = {f"class {n}": float(np.nanmean(v)) for n, v in per_class.items()}
    rows["trained classes"] = float(np.nanmean([rows[f"class {n}"] for n in trained]))
    if held_out:
        rows["held-out classes"] = float(np.nanmean([rows[f"class {n}"] for n in held_out]))
    for shown, name in ((1, "ellipsoid"), (4, "box")):
        sel = [r for r in switch_rows if r[0] == shown]
        rows[f"switch: support {name} -> Dice vs ellipsoid / box"] = (
            float(np.nanmean([r[1] for r in sel])), float(np.nanmean([r[2] for r in sel])))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="weights (default: the model shipped for --config)")
    p.add_argument("--config", default="tiny_cpu")
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--size", type=int, default=128, help="look-alike volumes' in-plane size")
    p.add_argument("--depth", type=int, default=16, help="look-alike volumes' slices")
    p.add_argument("--held-out", default="torus,twin_blobs", help="shape classes the model never trained on")
    p.add_argument("--parts", default="switch,sparse,cross")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--crop", default="auto", choices=("auto", "on", "off"),
                   help="labelled mode: track in a box (icl.segment --crop; auto: as the weights were trained)")
    p.add_argument("--prior", default="auto", choices=("auto", "none"),
                   help="cross-case: the model with registration as its prior and memory, or alone (icl.segment --prior)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from icl.api import ICLSegmenter

    held_out = [n for n in a.held_out.split(",") if n]
    parts = a.parts.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "switch" in parts:
            seg = ICLSegmenter(checkpoint=a.checkpoint, config=a.config, window=(0.0, 1.0), support_slices="labelled",
                               fill="model", complete_slices=True, crop=a.crop)  # the model alone
            r = switch_scores(seg, work, range(SEED0, SEED0 + a.cases), a.size, a.depth)
            n = next(iter(r.values()))["n"]
            print(f"## Switch ({n} marked objects, 3 look-alikes, support on every 4th slice)\n")
            print("| method | Dice(marked) | Dice(others) |\n|---|---|---|")
            for method, v in r.items():
                print(f"| {method} | {v['marked']:.3f} | {v['others']:.3f} |")
            print()
        seg = ICLSegmenter(checkpoint=a.checkpoint, config=a.config, support_slices="labelled",
                           fill="model", complete_slices=True, crop=a.crop)
        if "sparse" in parts:
            r = sparse_dense(seg, work, a.cases)
            print(f"## Sparse -> dense ({a.cases} phantom scans, {len(SHAPES)} classes, Dice on unannotated slices)\n")
            print("| annotated | method | Dice |\n|---|---|---|")
            for (every, name), v in sorted(r.items()):
                print(f"| every {every}th slice | {name} | {v:.3f} |")
            print()
        if "cross" in parts:
            # the model (auto registers another scan: registration's figure, not the model's); weights trained with
            # a prior get registration's labels and resampled supports (--prior none: the model alone)
            seg = ICLSegmenter(checkpoint=a.checkpoint, config=a.config, support_slices="auto", fill="model",
                               prior=a.prior)
            r = cross_case(seg, work, a.cases, held_out)
            print(f"## Cross-case (support: 3 slices per class of another scan; held out: {', '.join(held_out)})\n")
            print("| what | Dice |\n|---|---|")
            for k, v in r.items():
                shown = " / ".join(f"{x:.3f}" for x in v) if isinstance(v, tuple) else f"{v:.3f}"
                print(f"| {k} | {shown} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
