"""Support from another scan on a real labelled scan: registration (icl.sparse.registration) row by row.

The cross-case protocol of ``../shared/data/inia19/README.md`` and two harder rows (issue #25):

* **A, moved**: the query is the scan mirrored left-right and moved (6° about the slice axis, scale 1/1.06, shift
  (5, -4, 3) voxels; ``bench.real_anatomy.moved_query``), left/right homologues swapped in its truth; the support is
  the scan with its labels.
* **B, another patient**: A further warped by a smooth random displacement (Gaussian-smoothed noise, sigma 10
  voxels, at most 3.5 voxels), times a smooth bias field (exp(+-0.2), sigma 30 voxels), gamma 0.8; seeded.
* **B, three supports**: query B; three supports, each the scan under its own smooth warp, bias and gamma.

Per row: the support's labels copied as they are (``atlas``), registered ``affine`` only, ``deformable`` (affine then
deformable), and with several supports each one alone and ``fused`` (summed probabilities); Dice per structure
over the whole query (mean over structures), wall and CPU seconds of each. The model's rows are added through
``HOOKS``. The files are read only.

    .venv/bin/python bench/cross_scan.py --image T1.nii.gz --label LABELS.nii.gz \\
        [--classes 1,1001,147,1147,45,1045,37,1037,7,1007] [--rows A,B,B3] [--threads 1] [--json out.json]
        [--checkpoint WEIGHTS] [--engine-only]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.real_anatomy import moved_query  # noqa: E402
from icl.api import ICLSegmenter  # noqa: E402
from icl.sparse.protocol import sparse_dice  # noqa: E402
from icl.sparse.registration import register_labels  # noqa: E402

INIA19_CLASSES = "1,1001,147,1147,45,1045,37,1037,7,1007"
QUERY_B = {"warp_seed": 1234, "intensity_seed": 99, "gamma": 0.8, "bias": 0.2}
SUPPORTS_B3 = [{"warp_seed": 11, "intensity_seed": 12, "gamma": 1.0, "bias": 0.15},
               {"warp_seed": 22, "intensity_seed": 23, "gamma": 0.9, "bias": 0.15},
               {"warp_seed": 33, "intensity_seed": 34, "gamma": 1.1, "bias": 0.15}]
WARP_SIGMA, WARP_MAX, BIAS_SIGMA = 10.0, 3.5, 30.0  # voxels


# ------------------------------------------------------------------------------------------------ the cases
def smooth_field(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A smooth random displacement [3, *shape] (voxels): Gaussian-smoothed noise scaled to at most WARP_MAX."""
    rng = np.random.default_rng(seed)
    u = np.stack([gaussian_filter(rng.standard_normal(shape), WARP_SIGMA) for _ in range(3)])
    return (u * (WARP_MAX / np.sqrt((u ** 2).sum(0)).max())).astype(np.float32)


def warped(arr: np.ndarray, u: np.ndarray, order: int) -> np.ndarray:
    grid = np.indices(arr.shape, dtype=np.float32)
    return map_coordinates(arr, grid + u, order=order, mode="constant", cval=0)


def intensity_change(image: np.ndarray, seed: int, gamma: float, bias: float) -> np.ndarray:
    """Another scanner's contrast: gamma on the [0, max] range, times a smooth bias field exp(+-bias)."""
    rng = np.random.default_rng(seed)
    f = gaussian_filter(rng.standard_normal(image.shape), BIAS_SIGMA)
    top = float(image.max())
    out = top * np.clip(image / top, 0, None) ** gamma
    return (out * np.exp(f / np.abs(f).max() * bias)).astype(np.float32)


def another_patient(image: np.ndarray, label: np.ndarray, p: dict) -> tuple[np.ndarray, np.ndarray]:
    u = smooth_field(image.shape, p["warp_seed"])
    return (intensity_change(warped(image, u, 1), p["intensity_seed"], p["gamma"], p["bias"]),
            warped(label, u, 0).astype(label.dtype))


@dataclass
class Case:
    """One row: the query (image, its truth), its labelled supports, all on the scan's grid and affine."""
    name: str
    query: np.ndarray
    truth: np.ndarray
    supports: list[tuple[np.ndarray, np.ndarray]]
    affine: np.ndarray
    classes: list[int]
    results: dict = field(default_factory=dict)  # method -> {"dice": {class: d}, "mean", "seconds", "cpu_seconds"}


def cases(image: np.ndarray, label: np.ndarray, affine: np.ndarray, classes: list[int], rows: list[str],
          offset: int) -> list[Case]:
    qa_image, qa_truth = moved_query(image, label, offset)
    qb_image, qb_truth = another_patient(qa_image, qa_truth, QUERY_B)
    make = {
        "A": lambda: Case("A: mirrored + moved", qa_image, qa_truth, [(image, label)], affine, classes),
        "B": lambda: Case("B: another patient", qb_image, qb_truth, [(image, label)], affine, classes),
        "B3": lambda: Case("B: three supports", qb_image, qb_truth,
                           [another_patient(image, label, p) for p in SUPPORTS_B3], affine, classes),
    }
    return [make[r]() for r in rows]


# ------------------------------------------------------------------------------------------------ the methods
# The model's rows (with and without the registered prior, auto): a hook takes a case and returns
# {method: (label map on the query's grid, wall seconds, cpu seconds)}; its rows join the table.
Hook = Callable[[Case], dict[str, tuple[np.ndarray, float, float]]]
HOOKS: list[Hook] = []


def score(case: Case, method: str, labels: np.ndarray, seconds: float, cpu: float) -> None:
    dice = sparse_dice(labels, case.truth, case.classes)
    case.results[method] = {"dice": dice, "mean": float(np.nanmean(list(dice.values()))),
                            "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1)}
    print(f"  {case.name}: {method} {case.results[method]['mean']:.3f} ({seconds:.1f} s, cpu {cpu:.1f} s)",
          file=sys.stderr, flush=True)


def registration_rows(case: Case, threads: int) -> None:
    """Atlas copy, affine and deformable per support; with several supports each alone and fused (the fused
    seconds are the sum of the supports')."""
    values = np.array([0, *case.classes])
    several = len(case.supports) > 1
    copies = [sparse_dice(lab, case.truth, case.classes) for _, lab in case.supports]
    best = int(np.argmax([np.nanmean(list(d.values())) for d in copies]))
    score(case, "atlas" + (f" (best: support {best + 1})" if several else ""), case.supports[best][1], 0.0, 0.0)
    for mode, deformable in (("affine", False), ("deformable", True)):
        summed, wall, cpu = None, 0.0, 0.0
        for k, (image, label) in enumerate(case.supports, start=1):
            t0, c0 = time.perf_counter(), time.process_time()
            p = register_labels((case.query, case.affine), (image, case.affine), (label, case.affine), case.classes,
                                deformable=deformable, threads=threads, probabilities=True)
            w, c = time.perf_counter() - t0, time.process_time() - c0
            wall, cpu = wall + w, cpu + c
            summed = p if summed is None else summed + p
            score(case, f"{mode} support {k}" if several else mode, values[p.argmax(0)], w, c)
        if several:
            score(case, f"{mode} fused", values[summed.argmax(0)], wall, cpu)


def engine_rows(case: Case, checkpoint: str | None = None) -> dict[str, tuple[np.ndarray, float, float]]:
    """What a user gets through the API (``icl.api``, what ``python -m icl.segment`` runs): ``auto`` (registration
    on this road, fused, with the leave-one-out check when several supports are given: its seconds included), the
    model with registration's labels as its prior and the registered supports as its memory (``fill="model"``,
    weights trained with a prior; its seconds include the registration), and the model alone (``prior="none"``:
    every support's own slices in its memory, tracked forward). ``checkpoint``: the model's weights (None: the
    default model)."""
    query = (case.query, case.affine)
    supports = [(image, case.affine) for image, _ in case.supports]
    labels = [(label.astype(np.int16), case.affine) for _, label in case.supports]
    several = len(supports) > 1
    out = {}
    for method, fill, prior in (("engine auto", "auto", "auto"), ("model + registered prior", "model", "auto"),
                                ("model (no prior)", "model", "none")):
        seg = ICLSegmenter(checkpoint=checkpoint, fill=fill, prior=prior)
        t0, c0 = time.perf_counter(), time.process_time()
        result = seg.segment(query, supports if several else supports[0], labels if several else labels[0],
                             classes=case.classes)
        out[method] = (result.labels, time.perf_counter() - t0, time.process_time() - c0)
    return out


def run(case: Case, threads: int, registration: bool = True) -> Case:
    if registration:
        registration_rows(case, threads)
    for hook in HOOKS:
        for method, (labels, wall, cpu) in hook(case).items():
            score(case, method, labels, wall, cpu)
    return case


# ------------------------------------------------------------------------------------------------ the table
def markdown(done: list[Case]) -> str:
    lines = ["| row | method | Dice (mean of structures) | seconds (wall) | CPU seconds |", "|---|---|---|---|---|"]
    for case in done:
        for method, r in case.results.items():
            lines.append(f"| {case.name} | {method} | {r['mean']:.3f} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--classes", default=INIA19_CLASSES, help="comma-separated label values (default: INIA19's ten)")
    p.add_argument("--rows", default="A,B,B3", help="comma-separated: A, B, B3")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--homologue-offset", type=int, default=1000, help="left/right homologues v and v + offset")
    p.add_argument("--json", default=None)
    p.add_argument("--no-engine", action="store_true", help="registration rows only (no API rows: auto, model)")
    p.add_argument("--checkpoint", default=None, help="the model's weights (default: the default model)")
    p.add_argument("--engine-only", action="store_true", help="the API rows only (no registration rows)")
    a = p.parse_args(argv)
    if not a.no_engine:
        HOOKS.append(partial(engine_rows, checkpoint=a.checkpoint))
    classes = [int(c) for c in a.classes.split(",")]
    img = nib.load(a.image)
    image = np.asarray(img.dataobj, dtype=np.float32)
    label = np.asarray(nib.load(a.label).dataobj).astype(np.int32)
    label = np.where(np.isin(label, classes), label, 0)
    done = [run(case, a.threads, not a.engine_only)
            for case in cases(image, label, img.affine, classes, a.rows.split(","), a.homologue_offset)]
    print(markdown(done))
    if a.json:
        out = [{"row": c.name, "results": c.results} for c in done]
        Path(a.json).write_text(json.dumps({"threads": a.threads, "rows": out}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
