"""Readers on phantom data in each layout, and every bad-input case raising InputError naming the file."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_fixtures import PHANTOM_CASES, PHANTOM_SHAPE, phantom_datasets  # noqa: F401
from icl.data.vocabulary import SHAPES
from icl.data.preprocess import preprocess_dataset
from icl.data.readers import BTCV_NAMES, read_combined, read_dataset, unify_label_maps
from icl.data.validate import check_pair, load_nifti_volume
from icl.errors import InputError


def test_kits_reader_modes(phantom_datasets):
    cases = read_dataset("kits", phantom_datasets["kits"])
    assert [c.id for c in cases] == [f"case_{i:05d}" for i in range(PHANTOM_CASES)]
    c = cases[0]
    assert c.slice_axis == 2 and c.modality == "CT" and c.window == "kidney" and c.channel is None
    assert c.label_map == {1: "kidney", 2: "tumor", 3: "cyst"} and c.remap == {1: 1, 2: 2, 3: 3}
    assert c.spacing[0] > c.spacing[1] and c.affine.shape == (4, 4)
    seed = read_dataset("kits", phantom_datasets["kits"], label_mode="seed")[0]
    assert seed.label_map == {1: "kidney_and_tumor"} and seed.remap == {1: 1, 2: 1, 3: 0}
    with pytest.raises(InputError, match="label_mode"):
        read_dataset("kits", phantom_datasets["kits"], label_mode="bogus")


def test_btcv_reader(phantom_datasets):
    cases = read_dataset("btcv", phantom_datasets["btcv"])
    assert [c.id for c in cases] == ["0001", "0002", "0003"]
    assert cases[0].label_map == BTCV_NAMES and len(BTCV_NAMES) == 13 and BTCV_NAMES[6] == "liver"
    assert cases[0].slice_axis == 2 and cases[0].window == "abdomen"
    assert cases[1].label.name == "label0002.nii.gz"


@pytest.mark.parametrize("layout", ["msd", "nnunet"])
def test_msd_and_nnunet_readers(phantom_datasets, layout):
    cases = read_dataset(layout, phantom_datasets[layout], modality=1)
    assert len(cases) == PHANTOM_CASES and cases[0].label_map == dict(enumerate(SHAPES, start=1))
    assert cases[0].modality == "MR"
    if layout == "msd":
        assert cases[0].channel == 1 and cases[0].image.name == "phantom_001.nii.gz"
    else:
        assert cases[0].channel is None and cases[0].image.name == "phantom_001_0001.nii.gz"
    with pytest.raises(InputError, match="--modality"):
        read_dataset(layout, phantom_datasets[layout], modality=5)
    with pytest.raises(InputError, match="--label_mode"):
        read_dataset(layout, phantom_datasets[layout], label_mode="seed")


def test_combined_maps_names_onto_one_list(phantom_datasets):
    cases, unified = read_combined([("kits", phantom_datasets["kits"], {"label_mode": "seed"}),
                                    ("msd", phantom_datasets["msd"], {})])
    assert unified[1] == "kidney_and_tumor" and unified[2] == "ellipsoid" and len(unified) == 1 + len(SHAPES)
    assert cases[0].remap == {1: 1, 2: 1, 3: 0} and cases[-1].remap[1] == 2
    unified, maps = unify_label_maps([{1: "Left Kidney", 2: "liver"}, {5: "left_kidney", 6: "spleen"}],
                                     classes=["left-kidney", "spleen"])
    assert unified == {1: "left_kidney", 2: "spleen"} and maps == [{1: 1, 2: 0}, {5: 1, 6: 2}]


# ---- bad inputs ---------------------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(path: Path, fn) -> None:
    img = nib.load(path)
    arr, aff = fn(np.asarray(img.dataobj).copy(), img.affine.copy())
    nib.save(nib.Nifti1Image(arr, aff), path)


def _assert_no_cache_written(cache: Path, bad_case: str) -> None:
    assert not (cache / bad_case / "meta.json").exists()
    assert not list(cache.rglob("*.tmp*"))


BTCV_BAD = {
    "truncated": ("img/img0002.nii.gz", None, "unreadable"),
    "not_gzip": ("label/label0002.nii.gz", None, "unreadable"),
    "shape": ("label/label0002.nii.gz", lambda a, f: (a[:-1], f), "does not match image shape"),
    "affine": ("label/label0002.nii.gz", lambda a, f: (a, f + np.diag([0, 0, 1.0, 0])), "affine"),
    "all_nan": ("img/img0002.nii.gz", lambda a, f: (np.full(a.shape, np.nan, np.float32), f), "no finite voxels"),
    "label_nan": ("label/label0002.nii.gz", lambda a, f: (np.where(a == 1, np.nan, a.astype(np.float32)), f),
                  "NaN/inf voxels in label"),
    "2d": ("img/img0002.nii.gz", lambda a, f: (a[:, :, 0], f), "2D"),
    "flat": ("img/img0002.nii.gz", lambda a, f: (a[:, :, :1], f), "2D"),
    "5d": ("img/img0002.nii.gz", lambda a, f: (a[..., None, None].repeat(2, 3).repeat(2, 4), f), "5D"),
    "empty_label": ("label/label0002.nii.gz", lambda a, f: (np.zeros_like(a), f), "empty"),
    "unknown_values": ("label/label0002.nii.gz", lambda a, f: (np.where(a == 1, 42, a).astype(np.uint8), f),
                       r"unknown label values \[42\]"),
    "missing_label": ("label/label0002.nii.gz", "delete", "label file not found"),
}


@pytest.mark.parametrize("kind", sorted(BTCV_BAD))
def test_bad_inputs_raise_naming_the_file(phantom_datasets, tmp_path, kind):
    root = _copy(phantom_datasets["btcv"], tmp_path / "btcv")
    rel, fn, msg = BTCV_BAD[kind]
    target = root / rel
    if kind == "truncated":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif kind == "not_gzip":
        target.write_bytes(b"\x1f\x8b garbage" * 10)
    elif fn == "delete":
        target.unlink()
    else:
        _rewrite(target, fn)
    cache = tmp_path / "cache"
    with pytest.raises(InputError, match=msg) as err:
        preprocess_dataset("btcv", root, cache, image_size=16, progress=False)
    assert err.value.where == str(target)
    _assert_no_cache_written(cache, "0002")


def test_missing_and_empty_dataset_folders(tmp_path):
    with pytest.raises(InputError, match="not found") as e:
        read_dataset("kits", tmp_path / "nope")
    assert e.value.where == str(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    for layout in ["kits", "btcv", "msd"]:
        with pytest.raises(InputError, match="empty"):
            read_dataset(layout, tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="case_XXXXX"):
        read_dataset("kits", tmp_path / "other")
    with pytest.raises(InputError, match="dataset.json"):
        read_dataset("msd", tmp_path / "other")
    with pytest.raises(InputError, match="--dataset"):
        read_dataset("lits", tmp_path / "other")


def test_msd_bad_dataset_json_and_missing_channel(phantom_datasets, tmp_path):
    root = _copy(phantom_datasets["nnunet"], tmp_path / "nn")
    (root / "imagesTr" / "phantom_002_0001.nii.gz").unlink()
    with pytest.raises(InputError, match="image for label") as e:
        read_dataset("nnunet", root, modality=1)
    assert e.value.where.endswith("phantom_002_0001.nii.gz")
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(InputError, match="invalid JSON"):
        read_dataset("nnunet", root)


def test_load_nifti_volume_and_check_pair(phantom_datasets):
    msd = phantom_datasets["msd"]
    arr, aff, hdr = load_nifti_volume(msd / "imagesTr" / "phantom_001.nii.gz", channel=1)
    assert arr.shape == PHANTOM_SHAPE and aff.shape == (4, 4) and hdr.get_data_shape()[-1] == 2
    with pytest.raises(InputError, match=r"\(40, 36, 20, 2\) has 2 channels: choose one \(--channel 0..1\)"):
        load_nifti_volume(msd / "imagesTr" / "phantom_001.nii.gz")
    with pytest.raises(InputError, match="out of range"):
        load_nifti_volume(msd / "imagesTr" / "phantom_001.nii.gz", channel=2)
    image, label, affine = check_pair(msd / "imagesTr" / "phantom_001.nii.gz", msd / "labelsTr" / "phantom_001.nii.gz",
                                      channel=0, allowed=range(1, 7))
    assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape == label.shape
    with pytest.raises(InputError, match="file not found"):
        load_nifti_volume(msd / "missing.nii.gz")
    assert json.loads((msd / "dataset.json").read_text())  # fixture untouched
    assert gzip.open(msd / "labelsTr" / "phantom_001.nii.gz").read(4)
