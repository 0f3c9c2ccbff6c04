"""Phantom generator: determinism, shape classes, layouts, NIfTI geometry."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from data_fixtures import PHANTOM_CASES, PHANTOM_SHAPE, phantom_datasets  # noqa: F401
from icl.data.vocabulary import SHAPES
from icl.cli.phantom import main
from icl.data.phantom import make_case, make_phantom_dataset
from icl.errors import InputError

SMALL = (36, 32, 18)


def _longest_run(present: np.ndarray) -> int:
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, present.astype(int), 0])))[::2]
    return int(runs.max()) if runs.size else 0


def test_same_seed_identical_arrays_other_seed_differs():
    a_imgs, a_lab, a_aff = make_case(0, seed=5, shape=SMALL)
    b_imgs, b_lab, b_aff = make_case(0, seed=5, shape=SMALL)
    assert a_imgs[0].tobytes() == b_imgs[0].tobytes() and a_lab.tobytes() == b_lab.tobytes()
    assert np.array_equal(a_aff, b_aff)
    c_imgs, c_lab, _ = make_case(0, seed=6, shape=SMALL)
    assert not np.array_equal(a_lab, c_lab) and not np.array_equal(a_imgs[0], c_imgs[0])


def test_every_shape_class_present_over_consecutive_slices():
    assert len(SHAPES) >= 6
    imgs, lab, aff = make_case(3, seed=1, shape=SMALL, classes=SHAPES)
    assert lab.dtype == np.uint8 and set(np.unique(lab)) == set(range(len(SHAPES) + 1))
    for v in range(1, len(SHAPES) + 1):
        assert _longest_run((lab == v).any(axis=(0, 1))) >= 3, SHAPES[v - 1]
    img = imgs[0]
    assert img.dtype == np.int16 and img.min() <= -1000 and img.max() > 300  # air and bone: CT windows matter
    for v in range(1, len(SHAPES) + 1):  # objects are HU-like, distinct from air
        assert -200 < np.median(img[lab == v]) < 400
    assert not np.allclose(np.abs(np.diag(aff)[:3]), 1.0) and np.abs(aff[:3, 3]).sum() > 0


def test_dataset_files_are_byte_identical_arrays(tmp_path):
    a = make_phantom_dataset(tmp_path / "a", "btcv", 2, seed=3, shape=SMALL)
    b = make_phantom_dataset(tmp_path / "b", "btcv", 2, seed=3, shape=SMALL)
    for rel in ["img/img0001.nii.gz", "label/label0002.nii.gz"]:
        x, y = nib.load(a / rel), nib.load(b / rel)
        assert np.asarray(x.dataobj).tobytes() == np.asarray(y.dataobj).tobytes()
        assert np.array_equal(x.affine, y.affine)


def test_layouts(phantom_datasets):
    kits = phantom_datasets["kits"]
    img = nib.load(kits / "case_00000" / "imaging.nii.gz")
    seg = nib.load(kits / "case_00000" / "segmentation.nii.gz")
    z = PHANTOM_SHAPE[2]
    assert img.shape == (z, PHANTOM_SHAPE[0], PHANTOM_SHAPE[1]) == seg.shape  # slice axis first, like KiTS19
    assert img.header.get_zooms()[0] > img.header.get_zooms()[1]  # the slice axis has the coarse spacing
    assert set(np.unique(np.asarray(seg.dataobj))) == {0, 1, 2, 3}
    btcv = phantom_datasets["btcv"]
    assert sorted(p.name for p in (btcv / "img").iterdir()) == [f"img{i:04d}.nii.gz" for i in range(1, 4)]
    msd = phantom_datasets["msd"]
    meta = json.loads((msd / "dataset.json").read_text())
    assert meta["labels"]["1"] == SHAPES[0] and len(meta["modality"]) == 2 and meta["numTraining"] == PHANTOM_CASES
    four_d = nib.load(msd / "imagesTr" / "phantom_001.nii.gz")
    assert four_d.shape == (*PHANTOM_SHAPE, 2)
    ch = np.asarray(four_d.dataobj)
    assert not np.allclose(ch[..., 0], ch[..., 1]) and ch.min() >= 0  # two MR-like contrasts
    nn = phantom_datasets["nnunet"]
    assert (nn / "imagesTr" / "phantom_001_0001.nii.gz").is_file()
    assert json.loads((nn / "dataset.json").read_text())["labels"]["torus"] == 2


def test_cli(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "p"), "--layout", "kits", "--cases", "1", "--shape", "32,32,16"]) == 0
    assert (tmp_path / "p" / "case_00000" / "segmentation.nii.gz").is_file()
    assert main(["--out", str(tmp_path / "q"), "--layout", "kits", "--classes", ",".join(SHAPES)]) == 2
    assert "KiTS layout has at most 3 classes" in capsys.readouterr().err
    with pytest.raises(InputError, match="--shape"):
        make_phantom_dataset(tmp_path / "r", "btcv", 1, shape=(4, 4))
