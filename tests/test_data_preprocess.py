"""Preprocessing cache: contents, reuse without rewriting, invalidation, label-mode changes, to_original_grid."""
from __future__ import annotations

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from data_fixtures import PHANTOM_IMAGE_SIZE, PHANTOM_SHAPE, phantom_caches, phantom_datasets  # noqa: F401
from icl.data.phantom import make_phantom_dataset
from icl.data.frames import Scan, intensity_range, window01
from icl.data.preprocess import CT_WINDOWS, CachedCase, open_cache, preprocess_dataset, to_original_grid
from icl.cli.preprocess import main
from icl.errors import InputError


def test_cache_contents(phantom_caches, phantom_datasets):
    cases, label_map = open_cache(phantom_caches["kits"])
    assert label_map == {1: "kidney", 2: "tumor", 3: "cyst"} and len(cases) == 3
    c = cases[0]
    z = PHANTOM_SHAPE[2]
    assert isinstance(c.image, np.memmap) and c.image.shape == (z, PHANTOM_IMAGE_SIZE, PHANTOM_IMAGE_SIZE)
    assert c.image.dtype == np.float32 and c.label.dtype == np.uint8
    assert 0.0 <= c.image.min() and c.image.max() <= 1.0 and c.image.min() == 0.0  # air clipped to 0
    m = c.meta
    assert m["original_shape"] == [z, PHANTOM_SHAPE[0], PHANTOM_SHAPE[1]] and m["slice_axis"] == 2
    assert m["canonical_shape"] == [PHANTOM_SHAPE[0], PHANTOM_SHAPE[1], z] and m["axcodes"] == ["S", "L", "P"]
    assert m["window"] == list(CT_WINDOWS["kidney"]) and m["source"]["image"]["size"] > 0
    nii = nib.load(phantom_datasets["kits"] / "case_00000" / "imaging.nii.gz")
    assert np.allclose(m["affine"], nii.affine, atol=1e-5)
    for value, slices in m["class_slices"].items():  # meta's slice index agrees with the label array
        assert slices == np.nonzero((np.asarray(c.label) == int(value)).any(axis=(1, 2)))[0].tolist()
    assert set(m["class_slices"]) == {"1", "2", "3"}
    msd = open_cache(phantom_caches["msd"])[0][0]
    assert msd.meta["modality"] == "MR" and msd.meta["window"] is None and msd.meta["channel"] == 0
    assert msd.meta["cached_shape"] == [PHANTOM_SHAPE[2], PHANTOM_IMAGE_SIZE, PHANTOM_IMAGE_SIZE]


def test_ct_window_and_mr_percentiles():
    hu = np.array([[[-1000.0, -175.0, 37.5, 250.0, 900.0]]])
    assert np.allclose(window01(hu, *CT_WINDOWS["abdomen"]), [[[0, 0, 0.5, 1, 1]]])
    mr = np.linspace(0, 1000, 1001).reshape(7, 11, 13)
    out = window01(mr, *intensity_range(Scan.from_array(mr), "mr"))
    assert out.min() == 0 and out.max() == 1 and abs(float(np.median(out)) - 0.5) < 0.01


def test_rerun_skips_and_changed_source_invalidates(tmp_path):
    src = make_phantom_dataset(tmp_path / "src", "btcv", 2, seed=1, shape=(32, 32, 16))
    cache = tmp_path / "cache"
    preprocess_dataset("btcv", src, cache, image_size=24, progress=False)
    files = {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy")}
    assert len(files) == 4
    metas = {p: p.stat().st_mtime_ns for p in cache.rglob("meta.json")}
    preprocess_dataset("btcv", src, cache, image_size=24, progress=False)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy")} == files
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("meta.json")} == metas
    # change one source: only that entry is rebuilt
    lab = src / "label" / "label0002.nii.gz"
    img = nib.load(lab)
    arr = np.asarray(img.dataobj).copy()
    arr[arr == 1] = 0
    nib.save(nib.Nifti1Image(arr, img.affine), lab)
    os.utime(lab, ns=(lab.stat().st_atime_ns, lab.stat().st_mtime_ns + 10**9))
    preprocess_dataset("btcv", src, cache, image_size=24, progress=False)
    assert (cache / "0001" / "label.npy").stat().st_mtime_ns == files[cache / "0001" / "label.npy"]
    assert (cache / "0002" / "label.npy").stat().st_mtime_ns != files[cache / "0002" / "label.npy"]
    assert 1 not in np.load(cache / "0002" / "label.npy")
    # a different image size invalidates everything
    preprocess_dataset("btcv", src, cache, image_size=16, progress=False)
    assert np.load(cache / "0001" / "image.npy").shape == (16, 16, 16)
    assert not list(cache.rglob("*.tmp*"))


def test_label_mode_change_rewrites_meta_only(phantom_datasets, tmp_path):
    cache = tmp_path / "cache"
    preprocess_dataset("kits", phantom_datasets["kits"], cache, image_size=16, progress=False)
    npy = cache / "case_00000" / "label.npy"
    before = npy.stat().st_mtime_ns
    preprocess_dataset("kits", phantom_datasets["kits"], cache, image_size=16, progress=False, label_mode="seed")
    assert npy.stat().st_mtime_ns == before
    case = CachedCase(cache / "case_00000")
    assert case.remap == {1: 1, 2: 1, 3: 0} and case.class_ids() == [1]
    kidney_or_tumor = np.isin(np.asarray(case.label), [1, 2])
    assert np.array_equal(case.mask(1), kidney_or_tumor.astype(np.float32))
    assert json.loads((cache / "index.json").read_text())["label_map"] == {"1": "kidney_and_tumor"}


@pytest.mark.parametrize("layout", ["kits", "btcv"])
def test_to_original_grid_round_trip(phantom_datasets, tmp_path, layout):
    """Nearest up-sampling by an integer factor and back is exact: the cached label maps onto the NIfTI label."""
    src = make_phantom_dataset(tmp_path / "src", layout, 1, seed=2, shape=(24, 24, 16))
    cache = tmp_path / "cache"
    case = preprocess_dataset(layout, src, cache, image_size=48, progress=False)[0]
    orig = np.asarray(nib.load(case.meta["source"]["label"]["path"]).dataobj)
    back = to_original_grid(np.asarray(case.label), case.meta, order=0)
    assert back.shape == orig.shape and back.dtype == np.uint8
    assert np.array_equal(back, orig)
    probs = to_original_grid(np.asarray(case.image), case.meta, order=1)
    assert probs.shape == orig.shape and probs.dtype == np.float32
    with pytest.raises(InputError, match="expected"):
        to_original_grid(np.asarray(case.label)[:-1], case.meta)


def test_cli_and_errors(tmp_path, phantom_datasets, capsys):
    src = shutil.copytree(phantom_datasets["btcv"], tmp_path / "btcv")
    rc = main(["--dataset", "btcv", "--data_path", str(src), "--cache", str(tmp_path / "c"), "--image_size", "16",
               "--window=-100,200"])
    assert rc == 0 and CachedCase(tmp_path / "c" / "0001").meta["window"] == [-100.0, 200.0]
    capsys.readouterr()
    rc = main(["--dataset", "btcv", "--data_path", str(tmp_path / "missing"), "--cache", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "missing" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()
    with pytest.raises(InputError, match="index.json"):
        open_cache(tmp_path / "nothing")


def test_prepare_single_volume_matches_cache(phantom_caches):
    """The inference CLI path (one volume, no cache) gives exactly the cached arrays."""
    from icl.data.preprocess import grid_meta, prepare_image, prepare_label
    from icl.data.validate import check_pair

    case = open_cache(phantom_caches["kits"])[0][1]
    m = case.meta
    image, label, affine = check_pair(m["source"]["image"]["path"], m["source"]["label"]["path"])
    img = prepare_image(image, 2, "CT", tuple(m["window"]), PHANTOM_IMAGE_SIZE, affine)
    assert np.array_equal(img, np.asarray(case.image))
    lab = prepare_label(label, 2, PHANTOM_IMAGE_SIZE, affine)
    assert np.array_equal(lab, np.asarray(case.label))
    assert to_original_grid(lab, grid_meta(label.shape, 2, affine)).shape == label.shape


def test_module_entry_point_prints_one_line_error(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "icl.cli.preprocess", "--dataset", "kits", "--data_path",
                        str(tmp_path / "absent"), "--cache", str(tmp_path / "c")], capture_output=True, text=True)
    expected = f"error: {tmp_path / 'absent'}: dataset folder not found"
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [expected]


def test_one_dataset_vocabulary_and_one_error_style(tmp_path, phantom_datasets, capsys):
    """preprocess takes the words train_3d / eval_3d take (phantom: the layout the folder holds) and they take its
    (nnunet); its flag errors are the one line every command prints, not argparse's usage block."""
    from icl.options.common import DATASETS
    from icl.options.train import parse_train_args
    from icl.data.readers import LAYOUTS

    assert set(LAYOUTS) <= set(DATASETS) and {"phantom", "nnunet"} <= set(LAYOUTS)
    assert parse_train_args(["-dataset", "nnunet", "-pretrain", "none"], check_files=False).dataset == "nnunet"
    src = shutil.copytree(phantom_datasets["btcv"], tmp_path / "btcv")
    assert main(["--dataset", "phantom", "--data_path", str(src), "--cache", str(tmp_path / "c"),
                 "--image_size", "16"]) == 0
    assert (tmp_path / "c" / "0001").is_dir()  # read as the BTCV layout it is
    capsys.readouterr()
    for argv, line in ((["--dataset", "nope", "--data_path", "x", "--cache", "y"], "error: --dataset: invalid choice"),
                       (["--data_path", "x"], "error: --dataset, --cache: required, not given"),
                       (["--dataset", "kits", "--data_path", "x", "--cache", "y", "--image_size", "big"],
                        "error: --image_size: invalid int value")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(line) and "usage" not in err[0], err


def test_segment_window_takes_what_preprocess_takes():
    from icl.cli.segment import parse_segment_args

    base = ["--support", "a", "--support-label", "b", "--query", "c", "--out", "d"]
    assert parse_segment_args(base + ["--window", "0,300"]).window == (0.0, 300.0)
    assert parse_segment_args(base + ["--window", "mr"]).window == "mr"
    with pytest.raises(InputError, match="expected finite lo < hi"):
        parse_segment_args(base + ["--window", "300,0"])
