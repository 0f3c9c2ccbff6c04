"""The cohort row of ``bench/cross_scan.py`` (issue #34): a folder of six queries and three labelled supports, run
through the command a user types (``python -m icl.segment``, ``--fill auto``: registration with the composed
leave-one-out check): serial on one core (one registration at a time, as before issue #34), serial (the supports'
registrations in parallel processes) and ``--workers 2``; wall and CPU seconds (this process and every process it
started), Dice per query against its truth, and whether all runs wrote the same labels.

The queries are the README's cross-case query (mirrored + moved) under six other smooth warps, bias fields and
gammas; the supports those of row B3. Everything is written to a temp folder; the scan is read only.
"""
from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from icl.cli.segment import main as segment
from icl.sparse.jobs import set_cores, shutdown
from icl.sparse.protocol import sparse_dice

QUERIES_C6 = [{"warp_seed": 100 + k, "intensity_seed": 200 + k, "gamma": 0.8 + 0.05 * k, "bias": 0.2}
              for k in range(6)]
MODES = {"serial, one core": [], "serial": [], "--workers 2": ["--workers", "2"]}

Patient = Callable[[np.ndarray, np.ndarray, dict], tuple[np.ndarray, np.ndarray]]


def cpu_seconds() -> float:
    """CPU seconds of this process and of the children it has waited for (worker and registration processes,
    once their pools are closed: ``icl.sparse.jobs.shutdown``, and ``--workers``' own pool at the run's end)."""
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def _save(arr: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def cohort_rows(query: np.ndarray, truth: np.ndarray, supports: list[tuple[np.ndarray, np.ndarray]],
                affine: np.ndarray, classes: list[int], patient: Patient, tmp: Path) -> dict:
    """{mode: {"dice": {query: mean Dice}, "mean", "seconds", "cpu_seconds"}} and "same_labels": the six queries
    made from ``query`` / ``truth`` by ``patient`` (another_patient of bench/cross_scan.py)."""
    folder, truths = tmp / "queries", {}
    folder.mkdir()
    for k, p in enumerate(QUERIES_C6):
        image, label = patient(query, truth, p)
        _save(image, affine, folder / f"query{k}.nii.gz")
        truths[f"query{k}.nii.gz"] = label
    args = []
    for k, (image, label) in enumerate(supports):
        args += ["--support", str(_save(image, affine, tmp / f"support{k}.nii.gz")),
                 "--support-label", str(_save(label.astype(np.int16), affine, tmp / f"support{k}_label.nii.gz"))]
    args += ["--query", str(folder), "--classes", ",".join(map(str, classes)), "--quiet"]
    out, labels = {}, {}
    for k, (mode, extra) in enumerate(MODES.items()):
        set_cores(1 if mode == "serial, one core" else None)
        t0, c0 = time.perf_counter(), cpu_seconds()
        try:
            if segment([*args, "--out", str(tmp / f"out{k}"), *extra]) != 0:
                raise RuntimeError(f"the cohort run ({mode}) failed")
            shutdown()  # the registration processes of a serial run: waited for, so their CPU seconds count
        finally:
            set_cores(None)
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        written = {name: np.asarray(nib.load(str(tmp / f"out{k}" / name)).dataobj) for name in truths}
        labels[mode] = written
        dice = {name: float(np.nanmean(list(sparse_dice(written[name], truths[name], classes).values())))
                for name in truths}
        out[mode] = {"dice": dice, "mean": float(np.mean(list(dice.values()))), "seconds": round(wall, 1),
                     "cpu_seconds": round(cpu, 1)}
    out["same_labels"] = all(np.array_equal(labels["serial"][n], labels[m][n]) for n in truths for m in labels)
    return out
