"""Reports: results/summary tables (NaN-aware maths, counts), atomic CSV/markdown, overlay PNGs, NIfTI masks."""
from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from icl.errors import InputError
from icl.report import tables
from icl.report.nifti import write_mask_nifti
from icl.report.overlays import PRED_RGB, TRUTH_RGB, pick_slices, save_case_overlays, save_overlay_png
from icl.report.tables import results_frame, summary_frame, summary_markdown, write_tables

NAN = float("nan")


def _rows() -> list[dict]:
    def row(case, cls, proto, dice, hd95, empty_truth=False, epoch=None):
        return {"case": case, "class_name": cls, "protocol": proto, "dice": dice, "iou": dice, "hd95": hd95,
                "nsd": dice, "empty_truth": empty_truth, "empty_pred": math.isnan(dice), "epoch": epoch}

    return [
        row("a", "kidney", "full", 0.8, 2.0),
        row("b", "kidney", "full", 0.6, 4.0),
        row("c", "kidney", "full", NAN, NAN, empty_truth=True),  # empty / empty: not scored
        row("d", "kidney", "full", 0.0, NAN, empty_truth=True),  # false-positive volume: scored 0
        row("a", "tumor", "full", 0.5, 10.0),
        row("a", "kidney", "gt_slices", 0.9, 1.0),
    ]


def test_results_frame_orders_and_types_columns():
    df = results_frame([{"extra": 1, **r} for r in _rows()])
    assert list(df.columns[:5]) == ["case", "class_id", "class_name", "protocol", "epoch"]
    assert df.columns[-1] == "extra"
    assert df["dice"].dtype == float and df["empty_truth"].dtype == bool
    assert len(df) == 6
    assert list(results_frame([]).columns[:3]) == ["case", "class_id", "class_name"]
    with pytest.raises(ValueError, match="protocol"):
        results_frame([{"case": "a", "class_name": "k", "dice": 1.0}])


def test_summary_is_nan_aware_with_counts():
    s = summary_frame(results_frame(_rows())).set_index(["protocol", "class_name"])
    kid = s.loc[("full", "kidney")]
    scored = [0.8, 0.6, 0.0]
    assert kid["dice_mean"] == pytest.approx(np.mean(scored))
    assert kid["dice_std"] == pytest.approx(np.std(scored, ddof=1))
    assert kid["hd95_mean"] == pytest.approx(3.0)  # NaN distances skipped
    assert kid["hd95_std"] == pytest.approx(np.std([2.0, 4.0], ddof=1))
    assert (kid["n_rows"], kid["n_scored"], kid["n_empty_truth"]) == (4, 3, 2)
    tum = s.loc[("full", "tumor")]
    assert tum["dice_mean"] == pytest.approx(0.5) and math.isnan(tum["dice_std"])
    assert s.loc[("gt_slices", "kidney"), "n_rows"] == 1


def test_summary_never_mixes_epochs():
    rows = [dict(r, epoch=1) for r in _rows()] + [dict(r, epoch=2, dice=1.0) for r in _rows()]
    s = summary_frame(results_frame(rows))
    assert list(s.columns[:3]) == ["epoch", "protocol", "class_name"]
    e2 = s[(s.epoch == 2) & (s.protocol == "full") & (s.class_name == "kidney")].iloc[0]
    assert e2["dice_mean"] == pytest.approx(1.0) and e2["n_scored"] == 4


def test_summary_markdown_shows_mean_std_and_counts():
    md = summary_markdown(results_frame(_rows()))
    lines = md.splitlines()
    assert lines[0].startswith("| protocol | class_name | Dice | IoU | HD95 (mm) | NSD |")
    kidney = next(line for line in lines if "| full | kidney |" in line)
    assert f"{np.mean([0.8, 0.6, 0.0]):.3f} ± {np.std([0.8, 0.6, 0.0], ddof=1):.3f}" in kidney
    assert "3.00 ± 1.41" in kidney and "3 / 4" in kidney and kidney.rstrip().endswith("| 2 |")
    tumor = next(line for line in lines if "| full | tumor |" in line)
    assert "| 0.500 |" in tumor  # single case: no ± std


def test_write_tables_roundtrip_and_no_temp_files(tmp_path):
    df = results_frame(_rows())
    csv_path, md_path = write_tables(df, tmp_path / "out", "eval_epoch3")
    assert csv_path == tmp_path / "out" / "eval_epoch3.csv" and md_path.suffix == ".md"
    back = pd.read_csv(csv_path)
    assert len(back) == 6 and back["dice"].isna().sum() == 1
    assert back["epoch"].isna().all()
    epoch_df = results_frame([dict(r, epoch=3, class_id=2) for r in _rows()])
    assert str(epoch_df["epoch"].dtype) == "Int64" and epoch_df["class_id"].tolist() == [2] * 6
    assert back["empty_truth"].tolist() == df["empty_truth"].tolist()
    assert md_path.read_text().startswith("# eval_epoch3")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval_epoch3.csv", "eval_epoch3.md"]


def test_write_tables_failure_leaves_no_target(tmp_path, monkeypatch):
    def boom(df, by=("protocol", "class_name")):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tables, "summary_markdown", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_tables(results_frame(_rows()), tmp_path, "t")
    assert not (tmp_path / "t.md").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]  # no temp files left behind

    def half_write(self, path, **kw):
        Path(path).write_text("case,dice\n")
        raise OSError("interrupted")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_write)
    with pytest.raises(OSError):
        write_tables(results_frame(_rows()), tmp_path / "new", "u")
    assert list((tmp_path / "new").iterdir()) == []


def test_overlay_png_size_and_colours(tmp_path):
    image = np.full((20, 30), 0.5, dtype=np.float32)
    truth = np.zeros((20, 30), bool)
    truth[2:8, 2:10] = True
    pred = np.zeros((20, 30), bool)
    pred[10:18, 15:25] = True
    path = save_overlay_png(image, truth, pred, tmp_path / "o.png")
    im = Image.open(path)
    assert im.size == (30, 20) and im.mode == "RGB"
    rgb = np.asarray(im)
    assert tuple(rgb[2, 5]) == TRUTH_RGB  # truth contour
    assert tuple(rgb[10, 20]) == PRED_RGB  # prediction contour
    inside_truth, inside_pred = rgb[5, 5].astype(int), rgb[14, 20].astype(int)
    assert inside_truth[1] > inside_truth[0] and inside_truth[1] > inside_truth[2]  # green tint
    assert inside_pred[0] > inside_pred[1] and inside_pred[0] > inside_pred[2]  # red tint
    assert tuple(rgb[0, 29]) == (128, 128, 128)  # untouched grey
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]


def test_overlay_without_truth_and_shape_check(tmp_path):
    pred = np.zeros((8, 8), bool)
    pred[2:5, 2:5] = True
    rgb = np.asarray(Image.open(save_overlay_png(np.zeros((8, 8)), None, pred, tmp_path / "p.png")))
    assert tuple(rgb[2, 2]) == PRED_RGB and tuple(rgb[7, 7]) == (0, 0, 0)
    with pytest.raises(ValueError, match="truth_hw"):
        save_overlay_png(np.zeros((8, 8)), np.zeros((8, 9)), pred, tmp_path / "bad.png")


def test_case_overlays_pick_slices_with_objects(tmp_path):
    image = np.random.rand(30, 16, 16).astype(np.float32)
    truth = np.zeros((30, 16, 16), bool)
    truth[10:20, 4:8, 4:8] = True
    pred = np.zeros_like(truth)
    pred[12:22, 5:9, 5:9] = True
    paths = save_case_overlays(image, truth, pred, tmp_path, "case_01", max_slices=4)
    assert len(paths) == 4
    zs = [int(p.stem.split("_axial_")[1]) for p in paths]  # named by plane: the cache's slices are axial
    assert zs == [10, 14, 17, 21] and all(p.exists() for p in paths)
    corner = np.zeros((30, 16, 16), bool)
    corner[10, 15, 0] = True  # the patient's rightmost, most posterior voxel of slice 10
    rgb = np.asarray(Image.open(save_case_overlays(image, corner, None, tmp_path, "corner")[0]))
    assert tuple(rgb[15, 0]) == TRUTH_RGB  # displayed radiologically: right on the left, posterior down
    assert pick_slices(None, None, 5, 8) == [0, 1, 2, 3, 4]
    assert pick_slices(truth, None, 30, 20) == list(range(10, 20))


def _reference(tmp_path) -> Path:
    affine = np.array([[-0.8, 0, 0, 10.0], [0, 0.8, 0, -20.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(np.random.rand(6, 7, 5).astype(np.float32), affine)
    qform = affine.copy()
    qform[0, 3] = 10.25  # scanners often store a slightly different qform: it must survive verbatim
    img.set_qform(qform, code=1)
    img.set_sform(affine, code=4)
    img.header["descrip"] = b"reference scan"
    img.header.set_xyzt_units("mm", "sec")
    path = tmp_path / "ref.nii.gz"
    nib.save(img, path)
    return path


def test_nifti_writer_keeps_affine_and_header(tmp_path):
    ref_path = _reference(tmp_path)
    ref = nib.load(ref_path)
    mask = np.zeros((6, 7, 5), bool)
    mask[1:4, 2:5, 1:3] = True
    out = write_mask_nifti(mask, ref_path, tmp_path / "pred.nii.gz")
    img = nib.load(out)
    assert img.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(img.dataobj), mask.astype(np.uint8))
    assert np.allclose(img.affine, ref.affine)
    assert np.allclose(img.header.get_qform(), ref.header.get_qform())
    assert (int(img.header["qform_code"]), int(img.header["sform_code"])) == (1, 4)
    assert img.header["descrip"].item() == b"reference scan"
    assert img.header.get_xyzt_units() == ("mm", "sec")
    assert np.allclose(img.header.get_zooms(), ref.header.get_zooms())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.nii.gz", "ref.nii.gz"]


def test_nifti_writer_labels_int16_and_affine_header_pair(tmp_path):
    ref = nib.load(_reference(tmp_path))
    labels = np.zeros((6, 7, 5), np.int64)
    labels[0, 0, 0], labels[1, 1, 1] = 2, 300
    img = nib.load(write_mask_nifti(labels, (ref.affine, ref.header), tmp_path / "l.nii", dtype=np.int16))
    assert img.get_data_dtype() == np.int16
    assert np.asarray(img.dataobj)[1, 1, 1] == 300 and np.allclose(img.affine, ref.affine)


def test_nifti_writer_errors(tmp_path):
    ref_path = _reference(tmp_path)
    with pytest.raises(InputError, match="missing.nii.gz"):
        write_mask_nifti(np.zeros((6, 7, 5)), tmp_path / "missing.nii.gz", tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match="shape"):
        write_mask_nifti(np.zeros((5, 7, 6)), ref_path, tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match="fit"):
        write_mask_nifti(np.full((6, 7, 5), 300), ref_path, tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match="dtype"):
        write_mask_nifti(np.zeros((6, 7, 5)), ref_path, tmp_path / "x.nii.gz", dtype=np.float32)
    assert not (tmp_path / "x.nii.gz").exists()


def test_label_overlays_colour_each_class_mark_annotated_slices_and_show_radiologically(tmp_path):
    from icl.report.label_overlays import ANNOTATED_RGB, class_colours, label_overlay, save_label_overlays

    image = np.zeros((6, 5), np.float32)  # a canonical axial slice [R, A]: 6 voxels left->right, 5 post.->ant.
    labels = np.zeros((6, 5), np.uint8)
    labels[5, 4] = 3  # the patient's rightmost, most anterior voxel
    labels[0, 0] = 7  # the leftmost, most posterior voxel
    colours = class_colours([3, 7])
    assert colours[3] != colours[7]
    rgb = label_overlay(image, labels, colours, annotated=False)
    slice_rgb = rgb[:5]  # displayed [A, R] (5 rows, 6 columns), the legend below
    assert rgb.shape[1] == 6 and rgb.shape[0] > 5
    assert tuple(slice_rgb[0, 0]) == colours[3]  # right on the image's left, anterior up
    assert tuple(slice_rgb[4, 5]) == colours[7]
    wide_img, wide_lab = np.zeros((120, 40), np.float32), np.zeros((120, 40), np.uint8)
    wide_lab[10:20, 10:20], wide_lab[60:70, 10:20] = 3, 7
    wide = label_overlay(wide_img, wide_lab, colours, annotated=True)
    legend = wide[40:].reshape(-1, 3)
    assert all((legend == c).all(1).any() for c in (*colours.values(), ANNOTATED_RGB))  # every entry
    frame = np.concatenate([wide[0], wide[39], wide[:40, 0], wide[:40, -1]])
    assert (frame == ANNOTATED_RGB).all()  # an annotated slice is framed
    assert not (label_overlay(wide_img, wide_lab, colours, annotated=False)[0] == ANNOTATED_RGB).all()
    volume = np.stack([wide_lab, wide_lab * 0, wide_lab])
    paths = save_label_overlays(lambda z: wide_img, volume, [3, 7], [2], 2, tmp_path, "scan")
    assert [p.name for p in paths] == ["scan_axial_0000.png", "scan_axial_0002.png"]  # by plane, labelled slices
    assert (np.asarray(Image.open(paths[1]))[0] == ANNOTATED_RGB).all()
    assert save_label_overlays(lambda z: wide_img, volume, [3], [], 0, tmp_path, "s")[0].name == "s_sagittal_0000.png"
