"""eval_3d.py / icl.engine.eval.evaluate: tables, hand-checked values, the full-volume protocol, epochs, NIfTI, errors.

The data is a tiny KiTS-layout set whose CT intensity *encodes* the label (class c at 100·c HU), so a fake
segmenter can return "the ground truth shifted by one pixel" from the query images alone, and every expected
number is computed here by hand from the original label arrays. The cache grid equals the source in-plane grid
(32 px), so resampling is the identity and the hand computation is exact.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from conftest_train import override
from icl.options.evaluate import parse_eval_args
from icl.engine.eval import evaluate as ev

ROOT = Path(__file__).resolve().parents[1]
SIZE, DEPTH, CASES = 32, 10, 3
SPACING = (2.5, 0.8, 0.75)  # array-axis order of the KiTS-style arrays [Z, X, Y]
KITS_WINDOW = (-79.0, 304.0)


def level(cid: int) -> float:
    """Cached intensity of class ``cid`` (100·c HU through the KiTS window)."""
    return (100.0 * cid - KITS_WINDOW[0]) / (KITS_WINDOW[1] - KITS_WINDOW[0])


def case_label(i: int) -> np.ndarray:
    label = np.zeros((DEPTH, SIZE, SIZE), np.uint8)
    label[2:7, 4 + i:14 + i, 5:15] = 1
    label[4:9, 18:26, 16 + i:27] = 2
    if i > 0:  # the support case (case_00000) lacks class 3
        label[1:4, 20:28, 3:10] = 3
    return label


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("enc_kits")
    for i in range(CASES):
        label = case_label(i)
        # KiTS-style: file axis 0 is z (the affine maps it there), so canonical axial slices are along it
        affine = np.diag([SPACING[1], SPACING[2], SPACING[0], 1.0]) @ np.eye(4)[:, [2, 0, 1, 3]]
        affine[:3, 3] = (10.0 + i, -20.0, 5.0)
        d = root / f"case_{i:05d}"
        d.mkdir()
        for arr, name in ((label.astype(np.int16) * 100, "imaging"), (label, "segmentation")):
            img = nib.Nifti1Image(arr, affine)
            img.header.set_qform(affine, code=1)
            img.header.set_sform(affine, code=1)
            nib.save(img, d / f"{name}.nii.gz")
    return root


def args(data: Path, tmp: Path, *more: str) -> list[str]:
    return override(["-dataset", "kits", "-data_path", str(data), "-cache_dir", str(tmp / "cache"), "-config",
                     "tiny_cpu", "-image_size", str(SIZE), "-gpu_device", "-1", "-pretrain", "none", "-num_support",
                     "2", "-split", "all", "-support_instance", "case_00000", "-out_dir", str(tmp / "out")], list(more))


def shift(mask: np.ndarray) -> np.ndarray:
    """Move a [.., H, W] mask one pixel along the last axis (nothing wraps around)."""
    out = np.zeros_like(mask)
    out[..., 1:] = mask[..., :-1]
    return out


def fake_segment(false_positive: bool = False):
    """A stand-in for segment_with_support: logits ±10 of the class decoded from the query, shifted one pixel;
    with ``false_positive`` it also 'sees' a 2x2 object on every query slice without the class."""
    calls = []

    def segment(predictor, support_images, support_masks, query_images, grad=False):
        calls.append((len(support_images), list(support_masks), len(query_images)))
        cols = []
        for cid, masks in support_masks.items():
            assert masks.shape == support_images.shape and bool(masks.any())
            m = ((query_images - level(cid)).abs() < 0.05).cpu().numpy()
            p = shift(m)
            if false_positive:
                empty = ~m.any(axis=(1, 2))
                p[empty, 0:2, 0:2] = True
            cols.append(torch.from_numpy(np.where(p, 10.0, -10.0).astype(np.float32)))
        return {"logits": torch.stack(cols, 1)}

    segment.calls = calls
    return segment


def hand_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return 2.0 * (pred & truth).sum() / (pred.sum() + truth.sum())


def run_eval(argv: list[str]):
    return ev.evaluate(parse_eval_args(argv), progress=False)


def test_table_rows_columns_and_hand_checked_values(data, tmp_path, monkeypatch):
    fake = fake_segment()
    monkeypatch.setattr(ev, "segment_with_support", fake)
    df, written = run_eval(args(data, tmp_path))
    # 2 scored cases (the support case is left out) x 3 classes x 2 protocols
    assert len(df) == 12
    assert set(df["case"]) == {"case_00001", "case_00002"} and set(df["protocol"]) == set(ev.PROTOCOLS)
    for col in ("case", "class_id", "class_name", "protocol", "epoch", "dice", "iou", "hd95", "nsd",
                "volume_truth_ml", "empty_truth", "empty_pred", "support_case", "note"):
        assert col in df.columns
    # class 3 is absent from the support case: warning rows, not scored
    c3 = df[df["class_id"] == 3]
    assert len(c3) == 4 and c3["dice"].isna().all() and c3["note"].str.contains("absent from support").all()
    for _, row in df[df["class_id"] != 3].iterrows():
        truth = case_label(int(row["case"][-1])) == row["class_id"]
        pred = shift(truth)
        assert row["dice"] == pytest.approx(hand_dice(pred, truth), abs=1e-6)
        assert row["iou"] == pytest.approx((pred & truth).sum() / (pred | truth).sum(), abs=1e-6)
        assert row["volume_truth_ml"] == pytest.approx(truth.sum() * np.prod(SPACING) / 1000)
        assert 0 < row["hd95"] <= SPACING[2] + 1e-6  # one voxel along the last axis (0.75 mm), not 2.5 mm
    # gt_slices queries only the slices holding the class; full_volume all DEPTH slices in one pass per case
    gt_calls = [c for c in fake.calls if c[2] != DEPTH]
    full_calls = [c for c in fake.calls if c[2] == DEPTH]
    assert len(full_calls) == 2 and all(c[1] == [1, 2] for c in full_calls)
    assert sorted(c[2] for c in gt_calls) == [5, 5, 5, 5]
    out = tmp_path / "out"
    table = pd.read_csv(out / "eval.csv")
    assert len(table) == 12 and (out / "eval.md").read_text().count("| gt_slices |") == 3
    assert {out / "eval.csv", out / "eval.md", out / "eval_summary.csv"} <= set(written)


def test_full_volume_scores_predictions_on_empty_slices(data, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "segment_with_support", fake_segment(false_positive=True))
    df, _ = run_eval(args(data, tmp_path, "-protocol", "both"))
    for case in ("case_00001", "case_00002"):
        truth = case_label(int(case[-1])) == 1
        pred = shift(truth)
        gt = df[(df["case"] == case) & (df["class_id"] == 1) & (df["protocol"] == "gt_slices")].iloc[0]
        full = df[(df["case"] == case) & (df["class_id"] == 1) & (df["protocol"] == "full_volume")].iloc[0]
        assert gt["dice"] == pytest.approx(hand_dice(pred, truth), abs=1e-6)  # no query slice without the class
        fp = pred.copy()
        fp[~truth.any(axis=(1, 2)), 0:2, 0:2] = True  # 5 empty slices x 4 voxels
        assert full["dice"] == pytest.approx(hand_dice(fp, truth), abs=1e-6)
        assert full["dice"] < gt["dice"] - 0.01


def test_real_model_both_protocols_nifti_and_pictures(data, tmp_path):
    torch.manual_seed(0)
    nifti, pics = tmp_path / "nii", tmp_path / "pic"
    df, _ = run_eval(args(data, tmp_path, "-save_nifti", str(nifti), "-save_pic", str(pics), "-max_cases", "1"))
    assert len(df) == 6 and set(df["protocol"]) == set(ev.PROTOCOLS)
    scored = df[df["class_id"] != 3]
    assert scored["dice"].between(0, 1).all() and not scored["empty_truth"].any()
    out = nifti / "full_volume" / "case_00001.nii.gz"
    ref = nib.load(data / "case_00001" / "segmentation.nii.gz")
    img = nib.load(out)
    assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)
    assert set(np.unique(np.asarray(img.dataobj))) <= {0, 1, 2}  # class 3 was never predicted (not in support)
    assert len(list((pics / "full_volume").glob("case_00001_*.png"))) > 0
    assert (nifti / "gt_slices" / "case_00001.nii.gz").is_file()


def test_defaults_and_support_from_training_split(data, tmp_path, monkeypatch):
    from icl.data.sampling import make_splits

    cfg = parse_eval_args(["-exp_name", "abc", "-pretrain", "none"])
    assert cfg.protocol == "both" and Path(cfg.out_dir) == Path("runs/eval/abc") and cfg.support_instance is None
    assert cfg.split == "val" and cfg.all_checkpoints is None
    monkeypatch.setattr(ev, "segment_with_support", fake_segment())
    argv = args(data, tmp_path, "-split", "val", "-folds", "3", "-fold", "0", "-protocol", "gt_slices")
    i = argv.index("-support_instance")
    del argv[i:i + 2]
    df, _ = run_eval(argv)
    split = make_splits([f"case_{i:05d}" for i in range(CASES)], 3, 0)[0]
    support = sorted(c for c in split["train"] if c != "case_00000")[0]  # case_00000 lacks class 3
    assert set(df["case"]) == set(split["val"]) and set(df["support_case"]) == {support}
    assert df["dice"].notna().all()  # the chosen support case holds every class


def _save_weights(path: Path, seed: int) -> None:
    from sam2_ext.build import build_icl_predictor

    torch.manual_seed(seed)
    model = build_icl_predictor("tiny_cpu", "cpu", image_size=SIZE)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "epoch": seed}, path)


def test_all_checkpoints_gives_epoch_rows(data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _save_weights(run / "epoch_2.pth", 2)
    _save_weights(run / "epoch_10.pth", 10)
    (run / ".epoch_11.pth.abc.tmp.pth").write_bytes(b"half-written")  # a killed save: ignored
    (run / "config.json").write_text('{"config": "tiny_cpu", "image_size": 64}')
    import icl.model.weights as build  # where the loader looks load_weights up

    loaded, original = [], build.load_weights

    def spy(model, path):
        loaded.append(Path(path).name)
        return original(model, path)

    monkeypatch.setattr(build, "load_weights", spy)
    monkeypatch.setattr(ev, "segment_with_support", fake_segment())
    df, _ = run_eval(args(data, tmp_path, "-all_checkpoints", str(run), "-protocol", "gt_slices"))
    assert loaded == ["epoch_2.pth", "epoch_10.pth"]
    assert sorted(df["epoch"].unique().tolist()) == [2, 10] and len(df) == 2 * 2 * 3
    assert "was trained at -image_size 64; at 32" in capsys.readouterr().err  # the run folder's config.json
    summary = pd.read_csv(tmp_path / "out" / "eval_summary.csv")
    assert "epoch" in summary.columns and sorted(summary["epoch"].unique()) == [2, 10]


@pytest.mark.parametrize("case", ["unknown_dataset", "missing_data", "missing_support", "corrupt_ckpt",
                                  "missing_ckpt", "bad_splits_fold"])
def test_bad_input_is_one_line_and_exit_2(data, tmp_path, capsys, case):
    extra: list[str] = []
    base = args(data, tmp_path)
    if case == "unknown_dataset":
        base[base.index("kits")] = "nosuch"
    elif case == "missing_data":
        base[base.index(str(data))] = str(tmp_path / "nowhere")
    elif case == "missing_support":
        base[base.index("case_00000")] = "case_00099.nii.gz"
    elif case == "corrupt_ckpt":
        bad = tmp_path / "bad.pth"
        bad.write_bytes(b"not a checkpoint at all")
        extra = ["-checkpoint_path", str(bad)]
    elif case == "missing_ckpt":
        extra = ["-checkpoint_path", str(tmp_path / "gone.pth")]
    else:
        base[base.index("all")] = "val"
        extra = ["-folds", "2", "-fold", "1", "-splits", str(tmp_path / "nosplits.json")]
    assert ev.main(base + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    expected = {"unknown_dataset": "-dataset", "missing_data": "-data_path", "missing_support": "case_00099",
                "corrupt_ckpt": "bad.pth", "missing_ckpt": "gone.pth", "bad_splits_fold": "-splits"}[case]
    assert expected in err[-1]
    assert not (tmp_path / "out").exists()  # nothing half-written
    if case.endswith("ckpt"):
        assert not (tmp_path / "cache").exists()  # weights are checked before any data is read


def test_cli_subprocess_reports_missing_checkpoint(data, tmp_path):
    cmd = [sys.executable, str(ROOT / "eval_3d.py"), *args(data, tmp_path),
           "-checkpoint_path", str(tmp_path / "missing.pth")]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines == [f"error: {tmp_path / 'missing.pth'}: checkpoint not found (-checkpoint_path)"]
    assert not (tmp_path / "out").exists()


def test_config_and_image_size_come_from_the_weights(data, tmp_path, monkeypatch):
    """``eval_3d.py -checkpoint_path W`` without -config / -image_size: W's own (here tiny_cpu at SIZE); an
    explicit other -config is one line naming both."""
    from icl.errors import InputError
    from sam2_ext.build import build_icl_predictor

    weights = tmp_path / "w.pth"
    model = build_icl_predictor("tiny_cpu", "cpu", image_size=SIZE)
    torch.save({"model": model.state_dict(), "trained": {"config": {"config": "tiny_cpu", "image_size": SIZE}}},
               weights)
    monkeypatch.setattr(ev, "segment_with_support", fake_segment())
    base = [a for a in args(data, tmp_path, "-checkpoint_path", str(weights), "-protocol", "gt_slices")]
    for flag in ("-config", "-image_size"):
        i = base.index(flag)
        del base[i:i + 2]
    df, _ = run_eval(base)
    assert len(df) > 0
    with pytest.raises(InputError) as err:
        run_eval(base + ["-config", "sam2.1_hiera_t"])
    assert err.value.where == "-config" and "trained with config tiny_cpu, not sam2.1_hiera_t" in err.value.problem


def test_eval_reads_the_feature_cache(data, tmp_path):
    """-feature_cache auto: the encoder's outputs of the cached slices are stored on the first evaluation and read
    on the next; the scores match the uncached run (fp16 rounding of the features only)."""
    from icl.engine import feature_cache as fc

    weights = tmp_path / "w" / "fixed.pth"  # fixed weights: the cache is keyed by the encoder's weights
    _save_weights(weights, 3)
    base = args(data, tmp_path, "-protocol", "gt_slices", "-checkpoint_path", str(weights))
    plain, _ = run_eval(base)
    counts = []
    real = fc.FeatureCache

    class Counting(real):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            counts.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ev, "FeatureCache", Counting)  # where the evaluation looks it up
        first, _ = run_eval(base + ["-feature_cache", "auto"])
        second, _ = run_eval(base + ["-feature_cache", "auto"])
    assert counts[0].computed > 0 and counts[1].computed == 0 and counts[1].read > 0
    assert np.allclose(first["dice"].to_numpy(), second["dice"].to_numpy(), equal_nan=True)
    assert np.allclose(first["dice"].to_numpy(), plain["dice"].to_numpy(), atol=0.02, equal_nan=True)
