"""Issue #27, the numbered mistakes: each the exact user action, and the behaviour — refused with one line, or the
right result (never exit 0 with a wrong or lost result). Plus #25 item 5: an LPS copy is the same scan."""
from __future__ import annotations

import hashlib
import shutil

import nibabel as nib
import numpy as np
import pytest

import icl.model.settings
from icl.api import ICLSegmenter
from icl.cli.segment import main
from icl.errors import InputError
from icl.sparse.annotation import Annotation
from icl.sparse.fill import fill_volume
from icl.sparse.methods import MODEL
from safety_fixtures import SHAPE, dice, draw, make_volume, read, save, write_case
from segment_fixtures import IMAGE_SIZE, make_segment_data


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return write_case(tmp_path_factory.mktemp("case"))


@pytest.fixture(scope="module")
def model_data(tmp_path_factory):
    return make_segment_data(tmp_path_factory.mktemp("model"), seed=3)


def _run(scan, label, query, out, *extra) -> int:
    return main(["--support", str(scan), "--support-label", str(label), "--query", str(query), "--out", str(out),
                 "--quiet", *extra])


def _one_error(capsys, needle: str) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    return lines[0]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _on_drawn_slices_equals_drawing(out: np.ndarray, drawn: np.ndarray, axis: int) -> None:
    o, d = np.moveaxis(out, axis, 0), np.moveaxis(drawn, axis, 0)
    for c in np.unique(d[d > 0]):
        for z in np.flatnonzero((d == c).reshape(d.shape[0], -1).any(1)):
            assert np.array_equal(o[z] == c, d[z] == c), (c, z)


# ---------------------------------------------------------------------------------------------------- 1
def test_1_api_save_never_overwrites_an_input(model_data, tmp_path):
    scan = tmp_path / "scan.nii.gz"
    shutil.copyfile(model_data["s"], scan)
    before = {p: _sha(p) for p in (scan, model_data["s_lab"], model_data["ckpt"])}
    seg = ICLSegmenter(checkpoint=model_data["ckpt"], image_size=IMAGE_SIZE)
    result = seg.segment(query=scan, support=model_data["s"], support_label=model_data["s_lab"])
    for target, what in [(scan, "--query"), (tmp_path / "." / "scan.nii.gz", "--query"),
                         (model_data["s_lab"], "--support-label")]:
        with pytest.raises(InputError, match=f"save and {what} are the same file"):
            seg.save(result, target)
    with pytest.raises(InputError):  # the weights file: refused (its suffix first)
        seg.save(result, model_data["ckpt"])
    assert ("--checkpoint", model_data["ckpt"]) in seg.read  # and remembered as read
    with pytest.raises(InputError, match="is a folder"):
        seg.save(result, tmp_path)
    (tmp_path / "d.nii.gz").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        seg.save(result, tmp_path / "d.nii.gz")
    with pytest.raises(InputError, match="not a label-map file name"):
        seg.save(result, tmp_path / "out.png")
    assert {p: _sha(p) for p in before} == before
    assert seg.save(result, tmp_path / "pred").name == "pred.nii.gz"


# ---------------------------------------------------------------------------------------------------- 2
@pytest.mark.parametrize("dtype", [np.int16, np.float64])
def test_2_a_resaved_copy_is_the_same_scan(case, tmp_path, capsys, dtype):
    image = read(case["scan"])
    copy = save(image.astype(np.float64) if dtype == np.float64 else image, tmp_path / "copy.nii.gz",
                dtype=dtype)
    stored = nib.load(str(copy))
    if dtype == np.int16:  # int16 with scaling: the values moved, within half a scaling step
        assert stored.dataobj.slope != 1 and 0 < np.abs(stored.get_fdata() - image).max() <= stored.dataobj.slope
    out = tmp_path / "filled.nii.gz"
    assert _run(case["scan"], case["drawn"], copy, out, "--fill", "interpolation") == 0
    err = capsys.readouterr().err
    assert "both ways" in err and "read as --support-slices labelled" in err and "structure 1:" in err
    _on_drawn_slices_equals_drawing(read(out), read(case["drawn"]), 2)
    assert dice(read(out) == 2, read(case["label"]) == 2) > 0.8


def test_2_another_scan_on_the_same_grid_says_why_it_takes_the_other_road(case, tmp_path, capsys):
    other = save(read(case["scan"]) + 5.0, tmp_path / "other.nii.gz")
    seg = ICLSegmenter(checkpoint="none", config="tiny_cpu", image_size=64)
    result = seg.segment(query=other, support=case["scan"], support_label=case["drawn"])
    err = capsys.readouterr().err
    assert result.mode == "registered"  # another scan's support: registered (#25), said with why
    assert "not that scan: its voxel values differ by up to 5" in err and "--direction both" in err


def test_25_5_an_lps_copy_takes_the_same_road_and_gives_the_same_labels(case, tmp_path, capsys):
    image = read(case["scan"])
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [SHAPE[0] - 1, SHAPE[1] - 1]  # voxel i -> world (N-1-i): the same points in space
    lps = save(image[::-1, ::-1].copy(), tmp_path / "lps.nii.gz", affine=flip)
    ras_out, lps_out = tmp_path / "ras_out.nii.gz", tmp_path / "lps_out.nii.gz"
    assert _run(case["scan"], case["drawn"], case["scan"], ras_out, "--fill", "interpolation") == 0
    assert _run(case["scan"], case["drawn"], lps, lps_out, "--fill", "interpolation") == 0
    assert capsys.readouterr().err.count("both ways") == 2
    assert np.array_equal(read(lps_out)[::-1, ::-1], read(ras_out))


# ---------------------------------------------------------------------------------------------------- 3
def test_3_drawn_along_another_axis_is_read_along_it(tmp_path, capsys):
    paths = write_case(tmp_path, axis=0)
    truth, drawn = read(paths["label"]), read(paths["drawn"])
    out = tmp_path / "auto.nii.gz"
    assert _run(paths["scan"], paths["drawn"], paths["scan"], out, "--fill", "interpolation") == 0
    err = capsys.readouterr().err
    assert "drawn along axis 0" in err and "held out" in err
    filled = read(out)
    undrawn = ~np.moveaxis(drawn, 0, 0).reshape(SHAPE[0], -1).any(1)  # sagittal slices nobody drew
    for c in (1, 2, 3):
        assert dice(filled[undrawn] == c, truth[undrawn] == c) > 0.7, c
    # the old default, --slice-axis 2: a warning, and no structure scored as if slices had been held out
    report = tmp_path / "check.json"
    assert _run(paths["scan"], paths["drawn"], paths["scan"], tmp_path / "z.nii.gz", "--fill", "interpolation",
                "--slice-axis", "2", "--support-slices", "labelled", "--report", str(report)) == 0
    err = capsys.readouterr().err
    assert "drawn along axis 0" in err and "--slice-axis 2 reads it along axis 2" in err
    import json
    checks = json.loads(report.read_text())["structures"]
    assert all(c["held_out_slices"] == 0 and c["dense"] for c in checks)
    assert all("nothing between them to check" in line for line in err.splitlines() if line.startswith("structure"))


def test_3_a_label_dense_along_every_axis_is_not_a_drawing(case, tmp_path, capsys):
    assert _run(case["scan"], case["label"], case["scan"], tmp_path / "o.nii.gz", "--support-slices",
                "labelled", "--fill", "interpolation") == 2
    _one_error(capsys, "no axis along which the drawn slices leave gaps")
    assert not (tmp_path / "o.nii.gz").exists()


# ---------------------------------------------------------------------------------------------------- 4
def test_4_a_drawing_on_the_query_itself_is_read_as_labelled(case, tmp_path, capsys):
    out = tmp_path / "o.nii.gz"
    assert _run(case["scan"], case["drawn"], case["scan"], out, "--fill", "interpolation") == 0  # no --support-slices
    err = capsys.readouterr().err
    assert err.count("read as --support-slices labelled") == 1
    truth, filled = read(case["label"]), read(out)
    assert min(dice(filled == c, truth == c) for c in (1, 2, 3)) > 0.8
    # a dense label keeps today's rule: 3 slices per label value, no note
    assert _run(case["scan"], case["label"], case["scan"], tmp_path / "d.nii.gz", "--fill", "interpolation") == 2
    _one_error(capsys, "--fill")


# ---------------------------------------------------------------------------------------------------- 5
def test_5_drawn_voxels_are_the_answer_for_every_fill():
    """A model that says 'present' everywhere: on a structure's own drawn slices the output is still its drawing."""
    _, label = make_volume()
    drawn = draw(label, 2)
    annotation = Annotation.from_label(drawn, 2, [1, 2, 3])

    def everywhere(ann, classes, priors=None):
        for z in range(ann.depth):
            yield z, {c: ((0, SHAPE[0], 0, SHAPE[1]), np.ones(SHAPE[:2], np.float32)) for c in classes}

    out = np.zeros(SHAPE[::-1][:1] + SHAPE[:2], np.int16)
    fill_volume(annotation, {1: MODEL, 2: MODEL, 3: MODEL}, everywhere, out)
    _on_drawn_slices_equals_drawing(np.moveaxis(out, 0, 2), drawn, 2)


def test_5_fill_model_through_the_cli_keeps_the_drawing(model_data, tmp_path):
    label = read(model_data["s_lab"])
    drawn = np.zeros_like(label)
    drawn[..., 3::4] = label[..., 3::4]
    sparse = save(drawn, tmp_path / "sparse.nii.gz", affine=nib.load(str(model_data["s_lab"])).affine)
    out = tmp_path / "o.nii.gz"
    assert _run(model_data["s"], sparse, model_data["s"], out, "--fill", "model", "--checkpoint",
                str(model_data["ckpt"]), "--image-size", str(IMAGE_SIZE), "--slice-axis", "2",
                "--support-slices", "labelled") == 0
    _on_drawn_slices_equals_drawing(read(out), drawn, 2)


# ---------------------------------------------------------------------------------------------------- 6
@pytest.mark.parametrize("value,needle", [(-3, "negative label value(s) -3"), (1.5, "non-integer values: 1.5")])
def test_6_negative_or_fractional_label_values_are_refused(case, tmp_path, capsys, value, needle):
    label = read(case["drawn"]).astype(np.float32)
    label[0, 0, 0] = value
    bad = save(label, tmp_path / "bad.nii.gz")
    assert _run(case["scan"], bad, case["scan"], tmp_path / "o.nii.gz", "--fill", "interpolation") == 2
    _one_error(capsys, needle)
    assert not (tmp_path / "o.nii.gz").exists()


# ---------------------------------------------------------------------------------------------------- 7
def test_7_a_run_that_cannot_fit_is_refused_with_the_figures(model_data, tmp_path, capsys, monkeypatch):
    free = type("Mem", (), {"available": 4 * 2**30})()
    monkeypatch.setattr(icl.model.settings.psutil, "virtual_memory", lambda: free)
    assert _run(model_data["s"], model_data["s_lab"], model_data["q"], tmp_path / "o.nii.gz", "--checkpoint",
                str(model_data["ckpt"]), "--image-size", "8192") == 2
    _one_error(capsys, "GiB is free")  # the only line: no 'trained at 64' warning before the error
    assert not (tmp_path / "o.nii.gz").exists()


def test_7_long_runs_are_announced_and_show_progress_in_a_log(capsys, monkeypatch):
    scan = type("S", (), {"shape": (168, 206, 128), "header": nib.Nifti1Header(), "path": __import__("pathlib")
                          .Path("t1.nii.gz")})()
    icl.model.settings.check_run("tiny_cpu", 1024, scan, 256, "cpu", "--image-size", available=2**40)
    assert "warning: --image-size 1024: about" in capsys.readouterr().err
    icl.model.settings.check_run("tiny_cpu", 128, scan, 256, "cpu", "--image-size", available=2**40)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr("icl.progress.LINE_EVERY_S", 0.0)
    from icl.progress import progress
    bar = progress(total=4, desc="segment t1", unit="slice")  # stderr is not a terminal here
    for _ in range(4):
        bar.update()
    lines = capsys.readouterr().err.splitlines()
    assert lines and lines[-1].startswith("segment t1: 4/4 slice (100%)")


# ---------------------------------------------------------------------------------------------------- 8
def test_8_wrong_output_kinds_and_repeated_flags_are_refused_before_any_work(case, tmp_path, capsys):
    folder = tmp_path / "reports"
    folder.mkdir()
    runs = [(["--report", str(folder)], "--report is a folder", tmp_path / "o.nii.gz"),
            ([], "--out is not a label-map file name", tmp_path / "out.png"),
            (["--out", str(tmp_path / "b.nii.gz")], "given more than once", tmp_path / "a.nii.gz")]
    for extra, needle, out in runs:
        assert _run(case["scan"], case["drawn"], case["scan"], out, "--fill", "interpolation", *extra) == 2
        _one_error(capsys, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reports"]  # nothing written, no out.png/ folder


# ---------------------------------------------------------------------------------------------------- 9
def test_9_complete_slices_on_a_per_structure_drawing_warns_and_lines_agree(case, tmp_path, capsys):
    assert _run(case["scan"], case["drawn"], case["scan"], tmp_path / "o.nii.gz", "--fill", "interpolation",
                "--complete-slices") == 0
    err = capsys.readouterr().err.splitlines()
    assert sum("--complete-slices reads every labelled slice" in line for line in err) == 1
    for line in (line for line in err if line.startswith("structure ")):
        held = line.split("held out ")[1].split(",")[0].split(":")[0]
        assert f"held out {held}" in line and (held == "0" or f"scored on {held})" in line), line
        assert "annotated on" in line and "drawn on" in line
