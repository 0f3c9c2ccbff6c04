"""icl.data.frames, THE preprocessing: the CLI/API frames equal the cached ones, orientation, channels, scaling,
the non-finite rule, the way back to the source grid, and bounded-memory MR percentiles."""
from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from data_fixtures import PHANTOM_IMAGE_SIZE, PHANTOM_SHAPE, phantom_caches, phantom_datasets  # noqa: F401
from icl.data import frames
from icl.data.frames import (DEFAULT_SLICE_AXIS, WINDOW_CHOICES, WINDOWS, Scan, VolumeFrames, intensity_range,
                             label_slices, resize_slices, window01)
from icl.data.phantom import make_phantom_dataset
from icl.data.preprocess import CachedCase, open_cache, preprocess_dataset, to_original_grid
from icl.errors import InputError

RULE = "non-finite voxels replaced (NaN/-inf -> min, +inf -> max)"


def _save(arr: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    img = nib.Nifti1Image(arr, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def _volume(shape=(20, 18, 12), seed=0) -> np.ndarray:
    """An asymmetric HU-like volume (a flip or transpose changes it)."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(0, 80, size=shape).astype(np.float32)
    vol[:3] = -1000.0  # air on one side only
    vol[:, :, -2:] += 300.0
    return vol


def _flip_affine(affine: np.ndarray, shape, axes) -> np.ndarray:
    """The affine of the data flipped along ``axes`` that keeps every voxel at the same world position."""
    f = np.eye(4)
    for ax in axes:
        f[ax, ax], f[ax, 3] = -1.0, shape[ax] - 1
    return affine @ f


def _rotation_z(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    r = np.eye(4)
    r[:2, :2] = [[c, -s], [s, c]]
    return r


# ---- one road: the CLI's frames are the cached frames ------------------------------------------------------
@pytest.mark.parametrize("layout", ["kits", "btcv", "msd"])
def test_cli_frames_equal_cached_frames(phantom_caches, layout):
    for case in open_cache(phantom_caches[layout])[0]:
        m = case.meta
        scan = Scan.open(m["source"]["image"]["path"], channel=m["channel"])
        window = m["window_name"]
        assert window == {"kits": "ct_kidney", "btcv": "ct_abdomen", "msd": "mr"}[layout]
        vf = VolumeFrames(scan, window, PHANTOM_IMAGE_SIZE)
        cli = np.stack([vf[i] for i in range(len(vf))])
        assert cli.dtype == np.float32 and cli.shape == tuple(m["cached_shape"])
        assert float(np.abs(cli - np.asarray(case.image)).max()) == 0.0
        assert list(vf.value_range) == m["value_range"]
        lab = label_slices(Scan.open(m["source"]["label"]["path"]), DEFAULT_SLICE_AXIS, None, PHANTOM_IMAGE_SIZE)
        assert np.array_equal(lab, np.asarray(case.label))


def test_kits_slices_first_is_axial_after_canonicalisation(phantom_datasets):
    """KiTS stores slices first; the phantom's affine maps that axis to z, so canonical axis 2 is the file's 0."""
    scan = Scan.open(phantom_datasets["kits"] / "case_00000" / "imaging.nii.gz")
    z, x, y = scan.shape
    assert (z, x, y) == (PHANTOM_SHAPE[2], PHANTOM_SHAPE[0], PHANTOM_SHAPE[1])
    assert scan.canonical_shape == (x, y, z) and int(scan.ornt[0, 0]) == 2
    btcv = Scan.open(phantom_datasets["btcv"] / "img" / "img0001.nii.gz")
    assert btcv.canonical_shape == PHANTOM_SHAPE


def test_auto_window_and_errors(phantom_datasets):
    ct = Scan.open(phantom_datasets["btcv"] / "img" / "img0001.nii.gz")
    mr = Scan.open(phantom_datasets["msd"] / "imagesTr" / "phantom_001.nii.gz", channel=0)
    assert VolumeFrames(ct, "auto", 16).window == "ct_abdomen" and intensity_range(ct, "auto") == WINDOWS["ct_abdomen"]
    assert VolumeFrames(mr, "auto", 16).window == "mr" and intensity_range(mr, "auto") == intensity_range(mr, "mr")
    assert WINDOW_CHOICES == ("ct_abdomen", "ct_kidney", "mr", "auto")
    with pytest.raises(InputError, match="unknown window") as e:
        intensity_range(ct, "bone")
    assert e.value.where == "--window"
    with pytest.raises(InputError, match="--slice-axis"):
        VolumeFrames(ct, "auto", 16, slice_axis=3)
    assert frames.parse_window("-100,200") == (-100.0, 200.0) and frames.parse_window("mr") == "mr"
    with pytest.raises(InputError, match="lo < hi"):
        frames.parse_window("200,-100")


# ---- orientation -------------------------------------------------------------------------------------------
def test_ras_and_lps_copies_give_identical_frames(tmp_path):
    vol = _volume()
    ras = np.diag([0.8, 0.8, 2.5, 1.0])
    ras[:3, 3] = (-10.0, 5.0, 30.0)
    lps = _flip_affine(ras, vol.shape, (0, 1))
    a = Scan.open(_save(vol, ras, tmp_path / "ras.nii.gz"))
    b = Scan.open(_save(np.ascontiguousarray(vol[::-1, ::-1]), lps, tmp_path / "lps.nii.gz"))
    assert nib.aff2axcodes(b.affine) == ("L", "P", "S")
    assert np.array_equal(a.canonical, b.canonical) and np.array_equal(a.canonical, vol)
    for window in ("ct_abdomen", "mr"):
        fa, fb = VolumeFrames(a, window, 24), VolumeFrames(b, window, 24)
        assert np.array_equal(fa.stack(), fb.stack()) and fa.value_range == fb.value_range


@pytest.mark.parametrize("perm,flips,deg", [((0, 1, 2), (0, 1), 0.0), ((2, 0, 1), (1,), 0.0),
                                            ((1, 2, 0), (0, 2), 0.0), ((0, 1, 2), (), 12.0)])
def test_canonical_is_nibabel_closest_canonical(tmp_path, perm, flips, deg):
    """Permuted, flipped and oblique (residual rotation kept) affines: the same voxel order as nibabel's own."""
    vol = _volume()
    base = _rotation_z(deg) @ np.diag([0.8, 0.9, 2.5, 1.0])
    aff = _flip_affine(base, vol.shape, flips)
    data = np.ascontiguousarray(np.flip(vol, flips) if flips else vol).transpose(perm)
    aff = aff @ np.eye(4)[:, [*perm, 3]]  # column k of the affine follows file axis k
    path = _save(np.ascontiguousarray(data), aff, tmp_path / "scan.nii.gz")
    scan = Scan.open(path)
    ref = np.asanyarray(nib.as_closest_canonical(nib.load(path)).dataobj)
    assert scan.canonical_shape == ref.shape and np.array_equal(scan.canonical, ref)
    if deg == 0.0:
        assert np.array_equal(scan.canonical, vol)
    vf = VolumeFrames(scan, "auto", 16)
    assert len(vf) == vol.shape[2] and vf.in_plane_shape == vol.shape[:2]
    assert vf[0].shape == (16, 16) and vf.slice01(len(vf) - 1).shape == vol.shape[:2]


def test_writes_through_to_canonical_land_in_file_order(tmp_path):
    """The API's output: each finished canonical slice written through the view ends up in the file's order."""
    vol = _volume()
    perm = (2, 0, 1)
    aff = _flip_affine(np.diag([0.8, 0.9, 2.5, 1.0]), vol.shape, (0,)) @ np.eye(4)[:, [*perm, 3]]
    truth = (np.flip(vol, 0).transpose(perm) > 50).astype(np.uint8)
    path = _save(np.ascontiguousarray(np.flip(vol, 0).transpose(perm)), aff, tmp_path / "q.nii")  # uncompressed
    scan = Scan.open(path)
    assert isinstance(scan.raw, np.memmap) and np.shares_memory(scan.canonical, scan.raw)  # views, no copy
    out = np.zeros(scan.shape, np.uint8)
    view = scan.to_canonical(out)
    assert view.shape == scan.canonical_shape and np.shares_memory(view, out)
    for z in range(scan.canonical_shape[2]):
        view[:, :, z] = scan.canonical[:, :, z] > 50
    assert np.array_equal(out, truth)
    assert np.array_equal(scan.from_canonical(scan.to_canonical(truth)), truth)


# ---- channels, dimensions, scaling -------------------------------------------------------------------------
def test_4d_channels(tmp_path):
    vol = _volume()
    four = np.stack([vol, vol * 2, vol + 7], -1)
    path = _save(four, np.eye(4), tmp_path / "mc.nii.gz")
    assert np.array_equal(Scan.open(path, channel=1).canonical, vol * 2)
    with pytest.raises(InputError, match=r"\(20, 18, 12, 3\) has 3 channels: choose one \(--channel 0..2\)") as e:
        Scan.open(path)
    assert e.value.where == str(path)
    for bad in (3, -1):
        with pytest.raises(InputError, match="out of range") as e:
            Scan.open(path, channel=bad)
        assert e.value.where == str(path)
    one = Scan.open(_save(vol[..., None], np.eye(4), tmp_path / "one.nii.gz"))
    assert one.shape == vol.shape and np.array_equal(one.canonical, vol)
    for name, arr, msg in (("flat", vol[:, :, :1], "2D"), ("five", four[..., None], "5D")):
        with pytest.raises(InputError, match=msg):
            Scan.open(_save(arr, np.eye(4), tmp_path / f"{name}.nii.gz"))
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(InputError, match="unreadable") as e:
        VolumeFrames(Scan.open(broken, channel=0), "auto", 16)
    assert e.value.where == str(broken)


def test_int16_scaled_values_are_windowed(tmp_path):
    raw = np.round(_volume() / 2.0 + 512.0).astype(np.int16)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(img, path)
    scan = Scan.open(path)
    values = raw.astype(np.float32) * 2.0 - 1024.0
    assert scan.raw.dtype == np.int16 and np.array_equal(scan.canonical, values)
    vf = VolumeFrames(scan, "ct_abdomen", 16)
    for z in (0, 5, 11):
        assert np.array_equal(vf.slice01(z), window01(values[:, :, z], -175.0, 250.0))
    assert VolumeFrames(scan, "auto", 16).window == "ct_abdomen"  # air seen through the scaling


# ---- the non-finite rule -----------------------------------------------------------------------------------
def test_nonfinite_rule_and_one_warning(tmp_path, capsys):
    vol = _volume()
    vol[5, 5, 5], vol[6, 6, 6], vol[7, 7, 7] = np.nan, np.inf, -np.inf
    finite = vol[np.isfinite(vol)]
    path = _save(vol, np.eye(4), tmp_path / "nan.nii.gz")
    scan = Scan.open(path)
    vf = VolumeFrames(scan, "mr", 16)
    got = np.stack([scan.read_slice(z) for z in range(vol.shape[2])], -1)
    assert got[5, 5, 5] == finite.min() and got[6, 6, 6] == finite.max() and got[7, 7, 7] == finite.min()
    assert np.isfinite(vf.stack()).all() and all(np.isfinite(vf.slice01(z)).all() for z in range(len(vf)))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {path}: 3 {RULE}"] and scan.nonfinite == 3
    assert np.isnan(scan.canonical[5, 5, 5])  # the stored data is untouched; frames apply the rule
    allnan = _save(np.full((8, 8, 8), np.nan, np.float32), np.eye(4), tmp_path / "allnan.nii.gz")
    with pytest.raises(InputError, match="no finite voxels") as e:
        VolumeFrames(Scan.open(allnan), "ct_abdomen", 16)[0]
    assert e.value.where == str(allnan)
    lab = _save(np.where(vol > 0, 1.0, np.nan).astype(np.float32), np.eye(4), tmp_path / "lab.nii.gz")
    with pytest.raises(InputError, match="NaN/inf voxels in label"):
        label_slices(Scan.open(lab), 2, None, 16)


def test_cache_follows_the_nonfinite_rule(phantom_datasets, tmp_path, capsys):
    root = shutil.copytree(phantom_datasets["btcv"], tmp_path / "btcv")
    target = root / "img" / "img0002.nii.gz"
    img = nib.load(target)
    arr = np.asarray(img.dataobj).astype(np.float32)
    bad = int((arr > 500).sum())
    arr[arr > 500] = np.nan
    arr[0, 0, 0] = -np.inf
    _save(arr, img.affine, target)
    capsys.readouterr()
    case = preprocess_dataset("btcv", root, tmp_path / "cache", image_size=16, progress=False)[1]
    assert capsys.readouterr().err.strip().splitlines() == [f"warning: {target}: {bad + 1} {RULE}"]
    assert case.meta["nonfinite_replaced"] == bad + 1 and np.isfinite(np.asarray(case.image)).all()
    vf = VolumeFrames(Scan.open(target), case.meta["window_name"], 16)
    assert np.array_equal(vf.stack(), np.asarray(case.image))


# ---- back to the source grid -------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["kits", "lps", "oblique"])
def test_to_original_grid_undoes_orientation(tmp_path, layout):
    if layout == "kits":
        src = make_phantom_dataset(tmp_path / "src", "kits", 1, seed=3, shape=(24, 24, 10))
        image, label = src / "case_00000" / "imaging.nii.gz", src / "case_00000" / "segmentation.nii.gz"
        reader = "kits"
    else:
        src = make_phantom_dataset(tmp_path / "src", "btcv", 1, seed=3, shape=(24, 24, 10))
        image, label = src / "img" / "img0001.nii.gz", src / "label" / "label0001.nii.gz"
        reader = "btcv"
        for path in (image, label):  # LPS (phantom default) transposed in-plane, or rotated by 10 degrees
            img = nib.load(path)
            arr, aff = np.asarray(img.dataobj), img.affine
            if layout == "lps":
                arr, aff = arr.transpose(1, 0, 2), aff @ np.eye(4)[:, [1, 0, 2, 3]]
            else:
                aff = _rotation_z(10.0) @ aff
            _save(np.ascontiguousarray(arr), aff, path)
    case = preprocess_dataset(reader, src, tmp_path / "cache", image_size=48, progress=False)[0]
    orig = np.asarray(nib.load(label).dataobj)
    assert case.meta["original_shape"] == list(orig.shape) and case.meta["slice_axis"] == 2
    back = to_original_grid(np.asarray(case.label), case.meta, order=0)
    assert back.shape == orig.shape and np.array_equal(back, orig)
    logits = to_original_grid(torch.from_numpy(np.asarray(case.image).copy()), case.meta, order=1)
    assert logits.shape == orig.shape and logits.dtype == np.float32
    reread = CachedCase(case.path)
    assert reread.meta["orientation"] == Scan.open(image).ornt.tolist()


# ---- MR percentiles ----------------------------------------------------------------------------------------
def test_mr_percentiles_equal_on_both_paths_and_bounded(phantom_datasets, tmp_path, monkeypatch):
    src = phantom_datasets["msd"]
    exact = preprocess_dataset("msd", src, tmp_path / "exact", image_size=16, progress=False)[0]
    path = exact.meta["source"]["image"]["path"]
    assert list(VolumeFrames(Scan.open(path, channel=0), "mr", 16).value_range) == exact.meta["value_range"]
    monkeypatch.setattr(frames, "PERCENTILE_VOXEL_BUDGET", 1000)
    step = frames.percentile_step(PHANTOM_SHAPE, 1000)
    assert step > 1 and np.prod([-(-s // step) for s in PHANTOM_SHAPE]) <= 1000
    small = preprocess_dataset("msd", src, tmp_path / "small", image_size=16, progress=False)[0]
    again = [VolumeFrames(Scan.open(path, channel=0), "mr", 16) for _ in range(2)]
    assert list(again[0].value_range) == small.meta["value_range"] == list(again[1].value_range)
    assert small.meta["value_range"] != exact.meta["value_range"]
    assert np.array_equal(again[0].stack(), np.asarray(small.image))
    sample = np.asarray(Scan.open(path, channel=0).canonical, np.float32)[::step, ::step, ::step]
    assert small.meta["value_range"] == [float(p) for p in np.percentile(sample, frames.MR_PERCENTILES)]


# ---- resize ------------------------------------------------------------------------------------------------
def test_resize_slices_modes():
    x = np.random.default_rng(0).random((3, 10, 14)).astype(np.float32)
    img = resize_slices(x, (20, 28), "image")
    assert isinstance(img, np.ndarray) and img.shape == (3, 20, 28) and img.dtype == np.float32
    t = resize_slices(torch.from_numpy(x), (5, 7), "image")
    assert isinstance(t, torch.Tensor) and t.shape == (3, 5, 7)
    expected = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None], size=(5, 7), mode="bilinear",
                                               align_corners=False, antialias=True)[:, 0]
    assert torch.equal(t, expected)
    lab = (x > 0.5).astype(np.uint8) * 3
    up = resize_slices(lab, (20, 28), "label")
    assert up.dtype == np.uint8 and set(np.unique(up)) <= {0, 3}
    assert np.array_equal(resize_slices(up, (10, 14), "label"), lab)
    logits = resize_slices(torch.from_numpy(x).to(torch.bfloat16), (20, 28), "logits")
    assert logits.dtype == torch.float32
    same = resize_slices(x, (10, 14), "image")
    assert np.array_equal(same, x) and not np.shares_memory(same, x)
    with pytest.raises(ValueError):
        resize_slices(x, (4, 4), "cubic")


def test_channel_applies_to_4d_files_only(tmp_path):
    """One --channel for a 3D support and a 4D query: the 3D file ignores it, the 4D one uses it."""
    vol = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    three, four = tmp_path / "s.nii.gz", tmp_path / "q.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(three))
    nib.save(nib.Nifti1Image(np.stack([vol, 2 * vol], -1), np.eye(4)), str(four))
    np.testing.assert_array_equal(Scan.open(three, 1).canonical, vol)
    np.testing.assert_allclose(Scan.open(four, 1).canonical, 2 * vol)
    with pytest.raises(InputError, match="q.nii.gz: channel 2 out of range"):
        Scan.open(four, 2)
