"""What icl.segment must never do to a user's files (overwrite an input, fail after the work, segment a label map
as a scan), how it tells "the same scan" (by content, or --direction), and what the API takes as a scan."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import icl.api
from icl.api import ICLSegmenter
from icl.errors import InputError
from icl.cli.segment import main
from segment_fixtures import IMAGE_SIZE, make_segment_data


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return make_segment_data(tmp_path_factory.mktemp("safety"), seed=5)


@pytest.fixture
def no_model(monkeypatch):
    """Any model build fails the test: the checks under test come before any work."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the output was checked")
    monkeypatch.setattr(icl.api.ICLSegmenter, "__init__", refuse)


def _args(data, support, label, query, out, *extra) -> list[str]:
    return ["--support", str(support), "--support-label", str(label), "--query", str(query), "--out", str(out),
            "--checkpoint", str(data["ckpt"]), "--image-size", str(IMAGE_SIZE), "--quiet", *extra]


def _error(capsys, needle: str) -> None:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


def _copy_inputs(data, folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    scan, label = folder / "X.nii.gz", folder / "lab.nii.gz"
    shutil.copyfile(data["s"], scan)
    shutil.copyfile(data["s_lab"], label)
    return scan, label


# ---------------------------------------------------------------------------------------------------- item 1
def test_out_that_is_an_input_is_refused_before_any_work(data, tmp_path, capsys, no_model):
    scan, label = _copy_inputs(data, tmp_path / "a")
    before = {p: p.read_bytes() for p in (scan, label)}
    (tmp_path / "link.nii.gz").symlink_to(scan)
    os.link(label, tmp_path / "hard.nii.gz")
    cases = [
        (scan, "--out and --support are the same file"),  # --query X --out X
        (label, "--out and --support-label are the same file"),  # the hand-made annotation
        (tmp_path / "a" / ".." / "a" / "X.nii.gz", "are the same file"),  # another spelling
        (tmp_path / "link.nii.gz", "are the same file"),  # a symbolic link to the scan
        (tmp_path / "hard.nii.gz", "are the same file"),  # a hard link to the label
    ]
    for out, needle in cases:
        assert main(_args(data, scan, label, scan, out)) == 2
        _error(capsys, needle)
    # folder queries: --out the query folder itself would write each output over its query
    assert main(_args(data, scan, label, tmp_path / "a", tmp_path / "a")) == 2
    _error(capsys, "--out and --")
    assert {p: p.read_bytes() for p in (scan, label)} == before


def test_report_that_is_an_input_is_refused(data, tmp_path, capsys, no_model):
    scan, label = _copy_inputs(data, tmp_path)
    assert main(_args(data, scan, label, scan, tmp_path / "p.nii.gz", "--support-slices", "labelled",
                      "--report", str(label))) == 2
    _error(capsys, "--report and --support-label are the same file")


# ---------------------------------------------------------------------------------------------------- item 2
@pytest.mark.parametrize("out", ["/proc/nope/p.nii.gz", "/proc/nope/deeper/p.nii.gz"])
def test_out_that_cannot_be_created_fails_before_any_work(data, out, capsys, no_model):
    assert main(_args(data, data["s"], data["s_lab"], data["q"], out)) == 2
    _error(capsys, "/proc/nope")
    assert not Path("/proc/nope").exists()


def test_write_check_leaves_nothing_behind(data, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "p.nii.gz"
    assert main(_args(data, data["s"], data["s_lab"], data["q"], out)) == 0
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deeper", "new", "p.nii.gz"]


# ---------------------------------------------------------------------------------------------------- item 3
def test_a_copy_of_the_scan_is_the_same_scan(data, tmp_path, capsys):
    copy = tmp_path / "copy.nii.gz"
    shutil.copyfile(data["s"], copy)
    out = tmp_path / "p.nii.gz"
    for extra, road in (((), "both ways: the support slices are this scan's own"),
                        (("--direction", "forward"), "forward: support from another scan"),
                        (("--direction", "both"), "both ways")):
        assert main(_args(data, data["s"], data["s_lab"], copy, out, *extra)) == 0
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and road in lines[0], lines  # said even with --quiet
    assert main(_args(data, data["s"], data["s_lab"], data["q"], out)) == 0  # another scan
    assert "registered: support from another scan" in capsys.readouterr().err  # auto registers it (#25)


def test_direction_through_the_api(data, tmp_path):
    copy = tmp_path / "copy.nii.gz"
    shutil.copyfile(data["s"], copy)
    seg = ICLSegmenter(checkpoint=data["ckpt"], image_size=IMAGE_SIZE)
    both = seg.segment(copy, data["s"], data["s_lab"])
    assert both.mode == "both_ways"
    same_path = seg.segment(data["s"], data["s"], data["s_lab"])
    np.testing.assert_array_equal(both.labels, same_path.labels)  # a copy gives what the file gives
    forward = ICLSegmenter(checkpoint=data["ckpt"], image_size=IMAGE_SIZE, direction="forward", fill="model")
    assert forward.segment(copy, data["s"], data["s_lab"]).mode == "prepended"
    with pytest.raises(InputError, match="--direction: expected one of auto, both, forward"):
        ICLSegmenter(checkpoint=data["ckpt"], image_size=IMAGE_SIZE, direction="sideways")


def test_direction_both_needs_the_support_grid(data, tmp_path, capsys):
    img = nib.load(str(data["q"]))
    cropped = tmp_path / "cropped.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :-4], img.affine), str(cropped))
    assert main(_args(data, data["s"], data["s_lab"], cropped, tmp_path / "p.nii.gz", "--direction", "both")) == 2
    _error(capsys, "--direction: both keeps the support masks on the query's own slices")
    assert not (tmp_path / "p.nii.gz").exists()


def test_labelled_copy_takes_the_sparse_fill(data, tmp_path, capsys):
    """A sparse annotation of the scan with a copy of the scan as query: the sparse fill (self-check, annotated
    slices written back) as with the scan's own path; --direction forward takes the prepended road."""
    label = np.asarray(nib.load(str(data["s_lab"])).dataobj)
    sparse = np.zeros_like(label)
    annotated = [z for z in range(0, label.shape[2], 3) if label[..., z].any()]
    sparse[..., annotated] = label[..., annotated]
    ref = nib.load(str(data["s_lab"]))
    sparse_path = tmp_path / "sparse.nii.gz"
    nib.save(nib.Nifti1Image(sparse, ref.affine, ref.header), str(sparse_path))
    copy = tmp_path / "copy.nii.gz"
    shutil.copyfile(data["s"], copy)
    seg = ICLSegmenter(checkpoint=data["ckpt"], image_size=IMAGE_SIZE, support_slices="labelled")
    filled = seg.segment(copy, data["s"], sparse_path)
    assert filled.checks and filled.mode == "both_ways"
    np.testing.assert_array_equal(filled.labels[..., annotated], sparse[..., annotated])
    forward = ICLSegmenter(checkpoint=data["ckpt"], image_size=IMAGE_SIZE, support_slices="labelled",
                           direction="forward")
    result = forward.segment(copy, data["s"], sparse_path)
    assert result.mode == "prepended" and not result.checks


# ---------------------------------------------------------------------------------------------------- item 4
def _label_like(data, path: Path) -> Path:
    shutil.copyfile(data["s_lab"], path)
    return path


def test_query_folder_skips_what_is_not_a_scan(data, tmp_path, capsys):
    folder = tmp_path / "q"
    folder.mkdir()
    shutil.copyfile(data["q"], folder / "scan.nii.gz")
    label = _label_like(data, folder / "support_label.nii.gz")
    _label_like(data, folder / "scan_seg.nii.gz")  # a label map beside its scan
    out = tmp_path / "out"
    assert main(_args(data, data["s"], label, folder, out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["scan.nii.gz"]
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "skipped 2 file(s)" in notes[0], notes
    assert "support_label.nii.gz (the support label)" in notes[0] and "scan_seg.nii.gz (a label map" in notes[0]
    # --query-glob chooses by name: the label map, asked for, is segmented; the support label never
    out2 = tmp_path / "out2"
    assert main(_args(data, data["s"], label, folder, out2, "--query-glob", "*.nii.gz")) == 0
    assert sorted(p.name for p in out2.iterdir()) == ["scan.nii.gz", "scan_seg.nii.gz"]


def test_query_folder_in_nnunet_layout_takes_the_0000_files(data, tmp_path, capsys):
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    shutil.copyfile(data["q"], folder / "case_001_0000.nii.gz")
    shutil.copyfile(data["s"], folder / "case_001_0001.nii.gz")  # a second channel: not the query
    shutil.copyfile(data["s"], folder / "case_001.nii.gz")  # no channel suffix: nnU-Net's label name
    out = tmp_path / "out"
    assert main(_args(data, data["s"], data["s_lab"], folder, out)) == 0
    assert [p.name for p in out.iterdir()] == ["case_001_0000.nii.gz"]
    note = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert "case_001_0001.nii.gz (nnU-Net channel 0001, not 0000)" in note[0]
    assert "case_001.nii.gz (no nnU-Net channel suffix" in note[0]


def test_query_glob_errors(data, tmp_path, capsys, no_model):
    assert main(_args(data, data["s"], data["s_lab"], data["q"], tmp_path / "o", "--query-glob", "*.nii")) == 2
    _error(capsys, "--query-glob: chooses files in a query folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    _label_like(data, empty / "only_labels.nii.gz")
    assert main(_args(data, data["s"], data["s_lab"], empty, tmp_path / "o")) == 2
    assert "query folder holds no query scans" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- item 14
def test_api_takes_images_and_arrays(data, tmp_path):
    seg = ICLSegmenter(checkpoint=data["ckpt"], image_size=IMAGE_SIZE, fill="model")
    from_paths = seg.segment(data["q"], data["s"], data["s_lab"]).labels
    q, s, lab = (nib.load(str(data[k])) for k in ("q", "s", "s_lab"))
    from_images = seg.segment(q, s, lab)
    np.testing.assert_array_equal(from_images.labels, from_paths)
    from_arrays = seg.segment((np.asarray(q.dataobj), q.affine), (np.asarray(s.dataobj), s.affine),
                              (np.asarray(lab.dataobj), lab.affine))
    np.testing.assert_array_equal(from_arrays.labels, from_paths)
    with pytest.raises(InputError, match="query: expected a path .*, a nibabel image, an array"):
        seg.segment([1, 2, 3], data["s"], data["s_lab"])
    with pytest.raises(InputError, match="query: affine must be a finite 4x4 matrix"):
        seg.segment((np.asarray(q.dataobj), np.eye(3)), data["s"], data["s_lab"])
    saved = seg.save(from_images, tmp_path / "pred")
    assert saved == tmp_path / "pred.nii.gz"
    np.testing.assert_array_equal(np.asarray(nib.load(str(saved)).dataobj), from_paths)
    with pytest.raises(InputError, match="pred.png: not a label-map file name"):
        seg.save(from_images, tmp_path / "pred.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.nii.gz"]
