"""Support from another scan on a real labelled scan: registration (icl.sparse.registration) row by row.

The cross-case protocol of ``../shared/data/inia19/README.md`` and two harder rows (issue #25):

* **A, moved**: the query is the scan mirrored left-right and moved (6° about the slice axis, scale 1/1.06, shift
  (5, -4, 3) voxels; ``bench.real_anatomy.moved_query``), left/right homologues swapped in its truth; the support is
  the scan with its labels.
* **B, another patient**: A further warped by a smooth random displacement (Gaussian-smoothed noise, sigma 10
  voxels, at most 3.5 voxels), times a smooth bias field (exp(+-0.2), sigma 30 voxels), gamma 0.8; seeded.
* **B, three supports**: query B; three supports, each the scan under its own smooth warp, bias and gamma.
* **B, five supports** (issue #34): query B; the three supports and two more, warped, biased and gamma-changed alike.
* **C, a cohort** (issue #34, ``bench.cohort_row``): a folder of six queries (A under six other warps, biases and
  gammas) with the three supports of B3, through ``python -m icl.segment``: serial vs ``--workers 2``.

Per row: the support's labels copied as they are (``atlas``), registered ``affine`` only, ``deformable`` (affine then
deformable), and with several supports each one alone and ``fused`` (summed probabilities); Dice per structure
over the whole query (mean over structures), wall and CPU seconds of each (the engine's: this process and the
registration processes it starts). The engine's rows are added through ``HOOKS``: with several supports, ``auto``
with the composed leave-one-out check and with the full one, and how far the two checks are apart (per structure,
and the order they put the supports and the structures in). The files are read only.

    .venv/bin/python bench/cross_scan.py --image T1.nii.gz --label LABELS.nii.gz \\
        [--classes 1,1001,147,1147,45,1045,37,1037,7,1007] [--rows A,B,B3,B5,C6] [--threads 1] [--json out.json]
        [--checkpoint WEIGHTS] [--engine-only] [--engine-methods auto,model,alone]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.cohort_row import cohort_rows, cpu_seconds  # noqa: E402
from bench.real_anatomy import moved_query  # noqa: E402
from icl.api import ICLSegmenter  # noqa: E402
from icl.sparse.fusion import register_labels  # noqa: E402
from icl.sparse.jobs import shutdown  # noqa: E402
from icl.sparse.protocol import sparse_dice  # noqa: E402

INIA19_CLASSES = "1,1001,147,1147,45,1045,37,1037,7,1007"
QUERY_B = {"warp_seed": 1234, "intensity_seed": 99, "gamma": 0.8, "bias": 0.2}
SUPPORTS_B3 = [{"warp_seed": 11, "intensity_seed": 12, "gamma": 1.0, "bias": 0.15},
               {"warp_seed": 22, "intensity_seed": 23, "gamma": 0.9, "bias": 0.15},
               {"warp_seed": 33, "intensity_seed": 34, "gamma": 1.1, "bias": 0.15}]
SUPPORTS_B5 = SUPPORTS_B3 + [{"warp_seed": 44, "intensity_seed": 45, "gamma": 0.95, "bias": 0.15},
                             {"warp_seed": 55, "intensity_seed": 56, "gamma": 1.05, "bias": 0.15}]
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
    checks: dict = field(default_factory=dict)  # method -> the engine's leave-one-out rows (icl.sparse.cross_check)


def cases(image: np.ndarray, label: np.ndarray, affine: np.ndarray, classes: list[int], rows: list[str],
          offset: int) -> list[Case]:
    qa_image, qa_truth = moved_query(image, label, offset)
    qb_image, qb_truth = another_patient(qa_image, qa_truth, QUERY_B)
    make = {
        "A": lambda: Case("A: mirrored + moved", qa_image, qa_truth, [(image, label)], affine, classes),
        "B": lambda: Case("B: another patient", qb_image, qb_truth, [(image, label)], affine, classes),
        "B3": lambda: Case("B: three supports", qb_image, qb_truth,
                           [another_patient(image, label, p) for p in SUPPORTS_B3], affine, classes),
        "B5": lambda: Case("B: five supports", qb_image, qb_truth,
                           [another_patient(image, label, p) for p in SUPPORTS_B5], affine, classes),
    }
    return [make[r]() for r in rows if r in make]


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


ENGINE_METHODS = {"auto": ("engine auto", "auto", "auto"), "model": ("model + registered prior", "model", "auto"),
                  "alone": ("model (no prior)", "model", "none")}


def engine_rows(case: Case, checkpoint: str | None = None,
                methods: tuple[str, ...] = tuple(ENGINE_METHODS)) -> dict[str, tuple[np.ndarray, float, float]]:
    """What a user gets through the API (``icl.api``, what ``python -m icl.segment`` runs): ``auto`` (registration
    on this road, fused; with several supports, the composed leave-one-out check — and again with the full one,
    ``auto, full check``: their seconds included), the model with registration's labels as its prior and the
    registered supports as its memory (``fill="model"``, weights trained with a prior; its seconds include the
    registration), and the model alone (``prior="none"``: every support's own slices in its memory, tracked
    forward). ``checkpoint``: the model's weights (None: the default model). Seconds: wall, and CPU of this process
    and its registration processes (their pool is closed after each method, so each pays its start)."""
    query = (case.query, case.affine)
    supports = [(image, case.affine) for image, _ in case.supports]
    labels = [(label.astype(np.int16), case.affine) for _, label in case.supports]
    several = len(supports) > 1
    runs = []
    for name in methods:
        method, fill, prior = ENGINE_METHODS[name]
        if name == "auto" and several:
            runs += [(f"{method}, composed check", fill, prior, "composed"), (f"{method}, full check", fill, prior,
                                                                               "full")]
        else:
            runs.append((method, fill, prior, "composed"))
    out = {}
    for method, fill, prior, check in runs:
        seg = ICLSegmenter(checkpoint=checkpoint, fill=fill, prior=prior, cross_check=check)
        t0, c0 = time.perf_counter(), cpu_seconds()
        result = seg.segment(query, supports if several else supports[0], labels if several else labels[0],
                             classes=case.classes)
        shutdown()
        out[method] = (result.labels, time.perf_counter() - t0, cpu_seconds() - c0)
        if result.checks and result.checks[0].check != "none":
            case.checks[check] = result.checks
    return out


def check_agreement(case: Case) -> dict | None:
    """How far the composed check is from the full one: per structure |difference| of the estimates, the
    largest, and whether both order the structures and the supports (mean over structures of each support's
    fold) the same way (Spearman's rho, and the orders themselves)."""
    if not {"composed", "full"} <= set(case.checks):
        return None
    cheap, full = ({r.structure: r for r in case.checks[k]} for k in ("composed", "full"))
    diff = {c: abs(cheap[c].dice["registration"] - full[c].dice["registration"]) for c in case.classes}
    def folds(rows):  # [supports, structures]
        return np.array([[np.nan if v is None else v for v in rows[c].per_support] for c in case.classes]).T
    by_support = [np.nanmean(folds(rows), axis=1) for rows in (cheap, full)]
    by_structure = [[rows[c].dice["registration"] for c in case.classes] for rows in (cheap, full)]
    out = {"abs_difference": {c: round(d, 4) for c, d in diff.items()}, "max_abs_difference": round(max(diff.values()), 4),
           "structures_spearman": round(float(spearmanr(*by_structure)[0]), 3),
           "supports_order": [list(map(int, np.argsort(-m) + 1)) for m in by_support],
           "supports_mean": [[round(float(v), 4) for v in m] for m in by_support],
           "supports_spearman": round(float(spearmanr(*by_support)[0]), 3)}
    print(f"  {case.name}: composed vs full check: max |diff| {out['max_abs_difference']:.3f}, structures rho "
          f"{out['structures_spearman']:.2f}, supports {out['supports_order'][0]} vs {out['supports_order'][1]}",
          file=sys.stderr, flush=True)
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


def ratios(done: list[Case]) -> list[str]:
    """k supports with the check against k x one support's time (issue #34's target: <= 1.3), CPU and wall."""
    one = next((c.results.get("engine auto") for c in done if len(c.supports) == 1 and "engine auto" in c.results),
               None)
    lines = []
    for case in done:
        k = len(case.supports)
        for method, r in case.results.items():
            if one is not None and k > 1 and method.startswith("engine auto"):
                lines.append(f"{case.name}, {method}: {r['cpu_seconds'] / (k * one['cpu_seconds']):.2f} x k x one "
                             f"support's CPU, {r['seconds'] / (k * one['seconds']):.2f} x k x its wall")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--classes", default=INIA19_CLASSES, help="comma-separated label values (default: INIA19's ten)")
    p.add_argument("--rows", default="A,B,B3", help="comma-separated: A, B, B3, B5, C6 (the cohort)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--homologue-offset", type=int, default=1000, help="left/right homologues v and v + offset")
    p.add_argument("--json", default=None)
    p.add_argument("--no-engine", action="store_true", help="registration rows only (no API rows: auto, model)")
    p.add_argument("--checkpoint", default=None, help="the model's weights (default: the default model)")
    p.add_argument("--engine-only", action="store_true", help="the API rows only (no registration rows)")
    p.add_argument("--engine-methods", default=",".join(ENGINE_METHODS),
                   help=f"the API rows: comma-separated {', '.join(ENGINE_METHODS)}")
    a = p.parse_args(argv)
    if not a.no_engine:
        HOOKS.append(partial(engine_rows, checkpoint=a.checkpoint, methods=tuple(a.engine_methods.split(","))))
    classes = [int(c) for c in a.classes.split(",")]
    img = nib.load(a.image)
    image = np.asarray(img.dataobj, dtype=np.float32)
    label = np.asarray(nib.load(a.label).dataobj).astype(np.int32)
    label = np.where(np.isin(label, classes), label, 0)
    rows = a.rows.split(",")
    done, out = [], []
    for case in cases(image, label, img.affine, classes, rows, a.homologue_offset):
        load = os.getloadavg()[0]
        done.append(run(case, a.threads, not a.engine_only))
        out.append({"row": case.name, "results": case.results, "check_agreement": check_agreement(case),
                    "load_before_after": [round(load, 2), round(os.getloadavg()[0], 2)]})
        if a.json:  # after every row: a long run that stops keeps what it measured
            Path(a.json).write_text(json.dumps({"threads": a.threads, "rows": out}, indent=1, default=str))
    if "C6" in rows:  # the cohort: query A under six warps, B3's supports, through python -m icl.segment
        qa_image, qa_truth = moved_query(image, label, a.homologue_offset)
        supports = [another_patient(image, label, p) for p in SUPPORTS_B3]
        with tempfile.TemporaryDirectory(prefix="icl_cohort_") as tmp:
            load = os.getloadavg()[0]
            results = cohort_rows(qa_image, qa_truth, supports, img.affine, classes, another_patient, Path(tmp))
            same = results.pop("same_labels")
            done.append(Case("C: six queries, three supports", qa_image, qa_truth, supports, img.affine, classes,
                             results))
            out.append({"row": done[-1].name, "results": results, "same_labels": same,
                        "load_before_after": [round(load, 2), round(os.getloadavg()[0], 2)]})
            wall = {mode: r["seconds"] for mode, r in results.items()}
            print(f"  cohort: --workers 2 / serial wall {wall['--workers 2'] / wall['serial']:.2f}, / serial on one "
                  f"core {wall['--workers 2'] / wall['serial, one core']:.2f}; same labels: {same}", file=sys.stderr,
                  flush=True)
    print(markdown(done))
    print("\n".join(ratios(done)))
    if a.json:
        Path(a.json).write_text(json.dumps({"threads": a.threads, "rows": out}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
