"""Several atlases and whole cohorts (#34): registrations in parallel processes give the serial labels bit for bit;
the composed leave-one-out check is what it says; work that does not depend on the query is done once; a query
folder is split into shards exactly, resumes by skipping finished outputs, and gives the serial labels with
--workers. Small synthetic scans (48 x 48 x 24): seconds per registration."""
from __future__ import annotations

import math
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

import icl.infer.support_cache as support_cache
import icl.sparse.cross_check as cross_check
import icl.sparse.jobs as jobs
from icl.api import ICLSegmenter
from icl.cli.segment import main
from icl.data.frames import Scan
from icl.errors import InputError
from icl.infer.query_folder import parse_shard, shard_of
from icl.model.dice import binary_dice
from icl.sparse.cross_check import check_rows, full_folds
from icl.sparse.fusion import SupportSet, fuse, register_set
from icl.sparse.registration import carry_back, check_classes, inverse_warp, prepare, register

AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])
SHAPE = (48, 48, 24)


def _scan(shift: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two ellipsoids in a noisy body, moved by ``shift`` voxels along x: (image, labels)."""
    yy, xx, zz = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    label = np.zeros(SHAPE, np.int16)
    label[((yy - 20 - shift) ** 2 + (xx - 24) ** 2 + 2 * (zz - 12) ** 2) < 100] = 1
    label[((yy - 32 - shift) ** 2 + (xx - 28) ** 2 + 2 * (zz - 10) ** 2) < 40] = 2
    body = ((yy - 24 - shift) ** 2 + (xx - 24) ** 2) < 22 ** 2
    image = 20 + 80 * body + 50 * (label == 1) + 90 * (label == 2)
    return (image + np.random.default_rng(seed).normal(0, 4, image.shape)).astype(np.float32), label


def _save(arr: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(arr, AFFINE), str(path))
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """Two labelled supports and a folder of five queries (a label map beside them, skipped by content)."""
    root = tmp_path_factory.mktemp("cohort")
    (root / "queries").mkdir()
    out: dict = {"root": root, "supports": [], "labels": []}
    for name, shift, seed in (("a", 0, 1), ("b", 2, 2)):
        image, label = _scan(shift, seed)
        out["supports"].append(_save(image, root / f"{name}.nii.gz"))
        out["labels"].append(_save(label, root / f"{name}_lab.nii.gz"))
    for k, shift in enumerate((1, -1, 3, 0, -2)):
        _save(_scan(shift, 10 + k)[0], root / "queries" / f"q{k}.nii.gz")
    _save(_scan(1, 10)[1], root / "queries" / "q0_truth.nii.gz")  # a label map: not a query
    return out


def _args(cohort: dict, out: Path, *extra: str, supports: int = 2) -> list[str]:
    args = []
    for s, lab in list(zip(cohort["supports"], cohort["labels"]))[:supports]:
        args += ["--support", str(s), "--support-label", str(lab)]
    return args + ["--query", str(cohort["root"] / "queries"), "--out", str(out), "--fill", "registration",
                   *extra]


def _outputs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(folder.glob("*.nii.gz"))}


# ------------------------------------------------------------------------------------------------ processes
def test_the_plan_uses_the_cores_one_thread_each():
    assert jobs.plan(3, cores=2) == jobs.Plan(2, 1)
    assert jobs.plan(1, cores=8) == jobs.Plan(1, 1)
    assert jobs.plan(20, cores=8) == jobs.Plan(8, 1)
    jobs.set_cores(3)
    try:
        assert jobs.available_cores() == 3 and jobs.plan(5) == jobs.Plan(3, 1)
    finally:
        jobs.set_cores(None)
    with pytest.raises(ValueError):
        jobs.set_cores(0)


def test_an_error_in_a_worker_process_reaches_the_caller_whole():
    with pytest.raises(InputError) as err:  # check_classes: a light module for the process to import
        jobs.run_all(check_classes, [([0, 3],), ([2, 2],)], processes=2)
    assert err.value.where == "classes" and err.value.problem.startswith("expected distinct positive integer")


def test_a_worker_process_with_a_pool_of_its_own_exits():
    """A query worker of a cohort may run its registrations in a pool of its own (a share of more than one core);
    closing the workers' pool must not wait forever on it (its pool is closed before the worker's queues are)."""
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    assert pool.submit(jobs.run_all, check_classes, [([1, 2],), ([3],)], 2).result(timeout=300) == [[1, 2], [3]]
    closing = threading.Thread(target=pool.shutdown, daemon=True)
    closing.start()
    closing.join(timeout=120)
    assert not closing.is_alive()


def test_parallel_registrations_give_the_serial_labels_bit_for_bit(cohort, capsys):
    pairs = list(zip(cohort["supports"], cohort["labels"]))
    query = cohort["root"] / "queries" / "q0.nii.gz"
    serial = fuse(query, pairs, [1, 2], threads=1, probabilities=True)  # here, one after the other
    support_set = SupportSet([(Scan.open(s), Scan.open(lab)) for s, lab in pairs], [1, 2])
    lines = []
    parallel = register_set(Scan.open(query), support_set, say=lines.append)  # two processes (two cores here)
    assert np.array_equal(serial, parallel.labels(probabilities=True))
    assert len(lines) == 2 and all(line.startswith(("registered 1/2: support", "registered 2/2: support"))
                                   for line in lines)


# ------------------------------------------------------------------------------------------------ the check
def test_labels_go_back_through_the_inverse_of_a_registration(cohort, tmp_path):
    """The composed check's road back: the query's truth carried onto the support through the saved inverse
    (affine matrix, warp inverted by a fixed-point step) lands on the support's own labels."""
    support, label = Scan.open(cohort["supports"][0]), Scan.open(cohort["labels"][0])
    query = Scan.open(cohort["root"] / "queries" / "q2.nii.gz")
    prepared = prepare(support, np.asarray(label.canonical))
    reg = register(query, prepared)
    inverse = reg.save_inverse(str(tmp_path / "s"))
    assert inverse[1] is not None and Path(inverse[1]).exists()
    truth = _scan(3, 12)[1]
    back = carry_back([(truth == c).astype(np.float32) for c in (1, 2)], AFFINE, prepared, inverse)
    assert all(binary_dice(b > 0.5, prepared.labels == c) > 0.9 for b, c in zip(back, (1, 2)))
    warp = reg.greedy["warp"]
    u, v = sitk.GetArrayFromImage(warp), sitk.GetArrayFromImage(inverse_warp(warp))
    assert np.abs(u).max() > 0.1 and np.abs(u + v).max() < np.abs(u).max()  # an inverse, not the identity


def test_the_composed_check_agrees_with_the_full_one(cohort):
    pairs = [(Scan.open(s), Scan.open(lab)) for s, lab in zip(cohort["supports"], cohort["labels"])]
    support_set = SupportSet(pairs, [1, 2])
    fused = register_set(Scan.open(cohort["root"] / "queries" / "q2.nii.gz"), support_set, check=True)
    full = full_folds(support_set)
    assert fused.folds.shape == full.shape == (2, 2) and (fused.folds > 0.8).all()
    assert np.abs(fused.folds.mean(0) - full.mean(0)).max() < 0.05, (fused.folds, full)


def test_the_full_check_is_done_once_for_every_query(cohort, monkeypatch):
    registered = []
    real = cross_check.run_carries

    def counting(pairs, *args, **kwargs):
        registered.append(len(pairs))
        return real(pairs, *args, **kwargs)

    monkeypatch.setattr(cross_check, "run_carries", counting)
    seg = ICLSegmenter(fill="registration", cross_check="full")
    loads = []
    real_load = support_cache.load_support
    monkeypatch.setattr(support_cache, "load_support", lambda *a: loads.append(a[0]) or real_load(*a))
    folder = cohort["root"] / "queries"
    first = seg.segment(folder / "q0.nii.gz", cohort["supports"], cohort["labels"])
    second = seg.segment(folder / "q1.nii.gz", cohort["supports"], cohort["labels"])
    assert registered == [2]  # the check's k (k - 1) = 2 registrations, once; each query's own are in fusion
    assert len(loads) == 2  # each support read once, for both queries
    assert [c.check for c in first.checks] == ["full", "full"]
    assert [c.dice for c in first.checks] == [c.dice for c in second.checks]  # it depends on the supports alone
    composed = ICLSegmenter(fill="registration").segment(folder / "q0.nii.gz", cohort["supports"], cohort["labels"])
    assert [c.check for c in composed.checks] == ["composed", "composed"]
    assert all(len(c.per_support) == 2 and not math.isnan(c.dice["registration"]) for c in composed.checks)
    assert np.array_equal(composed.labels, first.labels)  # the check never changes the labels
    none = check_rows(None, [1, 2], 2, "auto", "none")  # --cross-check none
    assert [c.dice["registration"] for c in none] == [None, None] and "--cross-check none" in none[0].rule


# ------------------------------------------------------------------------------------------------ cohorts
def test_shards_partition_a_folder_exactly():
    names = [Path(f"q{i:02d}.nii.gz") for i in range(11)]
    for n in (1, 2, 3, 4, 11, 15):
        parts = [shard_of(names, (i, n)) for i in range(n)]
        assert sorted(p for part in parts for p in part) == names  # every query once, in no two shards
        assert all(part == names[i::n] for i, part in enumerate(parts))
    assert parse_shard("3/10") == (3, 10) and parse_shard(" 0 / 1 ") == (0, 1) and parse_shard((2, 4)) == (2, 4)
    for bad in ("10/10", "1", "-1/3", "a/b", "2/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)


def test_shards_of_a_cohort_never_collide_and_a_rerun_skips_finished_outputs(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    for i in range(3):
        assert main(_args(cohort, out, "--shard", f"{i}/3", "--quiet", supports=1)) == 0
    err = capsys.readouterr().err
    assert sorted(_outputs(out)) == [f"q{k}.nii.gz" for k in range(5)]  # q0_truth.nii.gz is a label map
    assert err.count("(registered: ") == 5  # each query segmented by exactly one shard
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "q3.nii.gz").unlink()  # as if the run had been stopped before q3
    assert main(_args(cohort, out, "--quiet", supports=1)) == 0
    err = capsys.readouterr().err
    assert "4 of 5 output(s) exist" in err and err.count("(registered: ") == 1 and "q3.nii.gz ->" in err
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in out.iterdir() if p.name != "q3.nii.gz")
    assert main(_args(cohort, out, "--quiet", "--overwrite", "--shard", "1/3", supports=1)) == 0
    assert capsys.readouterr().err.count("(registered: ") == 2  # q1 and q4, written again


def test_workers_give_the_serial_labels(cohort, tmp_path, capsys):
    """Serial: the two supports registered in two processes; two workers: each registers them one after the other
    (its share of two cores is one)."""
    jobs.set_cores(2)
    try:
        assert main(_args(cohort, tmp_path / "serial", "--quiet", "--shard", "0/3")) == 0
        serial_err = capsys.readouterr().err
        assert main(_args(cohort, tmp_path / "workers", "--quiet", "--shard", "0/3", "--workers", "2")) == 0
    finally:
        jobs.set_cores(None)
    workers_err = capsys.readouterr().err
    serial, parallel = _outputs(tmp_path / "serial"), _outputs(tmp_path / "workers")
    assert sorted(serial) == ["q0.nii.gz", "q3.nii.gz"] and sorted(parallel) == sorted(serial)
    assert all(np.array_equal(serial[k], parallel[k]) for k in serial)
    truth = _scan(1, 10)[1]
    assert all(binary_dice(serial["q0.nii.gz"] == c, truth == c) > 0.9 for c in (1, 2))
    checks = sorted(line for line in serial_err.splitlines() if line.startswith("structure "))
    assert len(checks) == 4 and checks == sorted(line for line in workers_err.splitlines()
                                                 if line.startswith("structure "))


@pytest.mark.parametrize("flag, value, message", [
    ("--shard", "3/3", "--shard: expected 0 <= I < N, got 3/3"),
    ("--workers", "0", "--workers: must be > 0"),
    ("--cross-check", "some", "--cross-check"),
])
def test_bad_cohort_flags_are_one_line(cohort, tmp_path, capsys, flag, value, message):
    assert main(_args(cohort, tmp_path / "out", flag, value)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}") and not (tmp_path / "out").exists()


def test_a_shard_needs_a_folder_and_an_empty_shard_does_nothing(cohort, tmp_path, capsys):
    args = _args(cohort, tmp_path / "out", "--shard", "0/2")
    args[args.index("--query") + 1] = str(cohort["root"] / "queries" / "q0.nii.gz")
    assert main(args) == 2 and "error: --shard: splits a query folder" in capsys.readouterr().err
    assert main(_args(cohort, tmp_path / "out", "--shard", "7/9")) == 0
    assert "holds none of the folder's query scans" in capsys.readouterr().err and not (tmp_path / "out").exists()
