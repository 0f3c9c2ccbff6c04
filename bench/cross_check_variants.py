"""Which leave-one-out check of several supports, by measurement (issue #34): the full check against three cheaper
ones, on INIA19's three-support row (bench/cross_scan.py's B3), one process, one thread, CPU seconds of each.

* **full**: every support registered to every other one (k (k - 1) registrations), fused, scored against its labels.
* **coarse**: the same among the supports at greedy's coarse levels only (affine and deformable 100x50x0: no
  iteration at full resolution), which a cohort could cache per set of supports.
* **query grid**: from the k registrations to the query: support i's carried labels against the others' fused
  labels, both on the query's grid (no resampling).
* **composed** (what ``--cross-check composed`` runs): the others' fused probabilities on the query carried back onto
  support i through the inverse of its registration (one resampling per support).

Per variant: CPU seconds beyond the k registrations to the query, and how far it is from the full check — the
largest per-structure |difference| of the estimates, Spearman's rho over structures, and the order it puts the
supports in (each support's fold, mean over structures).

    .venv/bin/python bench/cross_check_variants.py --image T1.nii.gz --label LABELS.nii.gz [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import icl.sparse.registration as registration  # noqa: E402
from bench.cross_scan import INIA19_CLASSES, cases  # noqa: E402
from icl.data.frames import Scan  # noqa: E402
from icl.model.dice import binary_dice  # noqa: E402
from icl.sparse.cross_check import full_folds  # noqa: E402
from icl.sparse.fusion import SupportSet, composed_folds, register_set  # noqa: E402
from icl.sparse.registration import most_probable, prepare  # noqa: E402

COARSE = (100, 50, 0)  # greedy's -n: the 4x and 2x levels, nothing at full resolution


def query_grid_folds(fused, shape) -> np.ndarray:
    """Support i's carried labels against the others' fused labels, both on the query's grid."""
    n, classes = len(fused.supports), fused.classes
    folds = np.full((n, len(classes)), np.nan)
    for i, one in enumerate(fused.supports):
        own = most_probable(one.dense(classes, shape), np.float32(1))
        others = {c: m.add_to(fused.summed[c].copy(), -1.0) for c, m in zip(classes, one.maps)}
        pred = most_probable(others, np.float32(n - 1))
        folds[i] = [binary_dice(pred == c, own == c) for c in classes]
    return folds


def agreement(folds: np.ndarray, full: np.ndarray) -> dict:
    est, ref = np.nanmean(folds, 0), np.nanmean(full, 0)
    by_support = [np.nanmean(f, 1) for f in (folds, full)]
    return {"max_abs_difference": round(float(np.nanmax(np.abs(est - ref))), 4),
            "mean_abs_difference": round(float(np.nanmean(np.abs(est - ref))), 4),
            "structures_spearman": round(float(spearmanr(est, ref)[0]), 3),
            "supports_order": [list(map(int, np.argsort(-m) + 1)) for m in by_support],
            "supports_mean": [[round(float(v), 4) for v in m] for m in by_support],
            "estimate": [round(float(v), 4) for v in est]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--classes", default=INIA19_CLASSES)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    classes = [int(c) for c in a.classes.split(",")]
    img = nib.load(a.image)
    image = np.asarray(img.dataobj, dtype=np.float32)
    label = np.asarray(nib.load(a.label).dataobj).astype(np.int32)
    label = np.where(np.isin(label, classes), label, 0)
    case = cases(image, label, img.affine, classes, ["B3"], 1000)[0]
    supports = SupportSet([(Scan.from_array(i, img.affine), Scan.from_array(lab.astype(np.int16), img.affine))
                           for i, lab in case.supports], classes)
    query = prepare(Scan.from_array(case.query, img.affine))
    out: dict = {"load_before": round(os.getloadavg()[0], 2)}
    c0 = time.process_time()
    fused = register_set(query, supports, threads=1, check=True)
    out["registrations_to_the_query_cpu"] = round(time.process_time() - c0, 1)
    c0 = time.process_time()
    composed = composed_folds(fused, query, supports.prepared, threads=1)
    composed_cpu = time.process_time() - c0  # the inverses were saved inside register_set: count them apart
    c0 = time.process_time()
    grid = query_grid_folds(fused, query.shape)
    grid_cpu = time.process_time() - c0
    c0 = time.process_time()
    full = full_folds(supports, threads=1)
    full_cpu = time.process_time() - c0
    saved = registration.AFFINE_ITERATIONS
    registration.AFFINE_ITERATIONS = COARSE  # read at call time, in this process (threads=1: no other process)
    try:
        c0 = time.process_time()
        coarse = full_folds(supports, threads=1, iterations=COARSE)
        coarse_cpu = time.process_time() - c0
    finally:
        registration.AFFINE_ITERATIONS = saved
    out["variants"] = {
        "full": {"cpu_seconds": round(full_cpu, 1), **agreement(full, full)},
        "coarse": {"cpu_seconds": round(coarse_cpu, 1), **agreement(coarse, full)},
        "query grid": {"cpu_seconds": round(grid_cpu, 1), **agreement(grid, full)},
        "composed": {"cpu_seconds (resampling back; + saving the inverses, inside the registrations)":
                     round(composed_cpu, 1), **agreement(composed, full)}}
    out["composed_equals_register_set_folds"] = bool(np.allclose(composed, fused.folds, equal_nan=True))
    out["load_after"] = round(os.getloadavg()[0], 2)
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
