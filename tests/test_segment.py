"""The inference CLI and its Python API on tiny phantom NIfTI pairs (tiny config, seeded random weights)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from icl.api import ICLSegmenter
from icl.infer.support import choose_support_slices
from icl.cli.segment import main
from segment_fixtures import IMAGE_SIZE, SHAPE, make_segment_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    return make_segment_data(tmp_path_factory.mktemp("seg"), seed=0)


@pytest.fixture(scope="module")
def segmenter(pair) -> ICLSegmenter:
    """The model's road (``auto`` registers another scan since #25; these tests are about the model's tracking)."""
    return ICLSegmenter(checkpoint=pair["ckpt"], config="tiny_cpu", device="cpu", image_size=IMAGE_SIZE,
                        fill="model")


def _args(pair, query, out, *extra) -> list[str]:
    """The model's road: support from another scan is tracked by the model (``--fill model``; ``auto`` registers
    another scan since #25)."""
    base = ["--support", str(pair["s"]), "--support-label", str(pair["s_lab"]), "--query", str(query),
            "--out", str(out), "--checkpoint", str(pair["ckpt"]), "--image-size", str(IMAGE_SIZE), "--quiet"]
    if Path(query) != Path(pair["s"]):
        base += ["--fill", "model"]
    return _override(base, list(extra))


def _override(base: list[str], extra: list[str]) -> list[str]:
    """``base`` with the flags ``extra`` gives replaced by them (a flag given twice is an error, #27)."""
    given = {t for t in extra if t.startswith("--")}
    out, i = [], 0
    while i < len(base):
        if base[i] in given:
            i += 1 if base[i] == "--quiet" else 2
        else:
            out.append(base[i])
            i += 1
    return out + extra


def test_cli_end_to_end(pair, tmp_path):
    out, png = tmp_path / "pred.nii.gz", tmp_path / "png"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "icl.segment", *_args(pair, pair["q"], out, "--classes", "1,2",
                                                                      "--overlays", str(png))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pred, query = nib.load(str(out)), nib.load(str(pair["q"]))
    assert pred.shape == query.shape
    np.testing.assert_allclose(pred.affine, query.affine, atol=1e-5)
    labels = np.asarray(pred.dataobj)
    assert labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) <= {0, 1, 2}
    assert (labels > 0).any()
    pngs = sorted(png.glob("img0002_axial_*.png"))  # named by the plane they cut
    assert 1 <= len(pngs) <= 8
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_api_five_lines(pair, tmp_path):
    seg = ICLSegmenter(checkpoint=pair["ckpt"], config="tiny_cpu", device="cpu", image_size=IMAGE_SIZE)
    labels = seg.segment(query=pair["q"], support=pair["s"], support_label=pair["s_lab"])
    seg.save(labels, tmp_path / "pred.nii.gz")
    saved = np.asarray(nib.load(str(tmp_path / "pred.nii.gz")).dataobj)
    np.testing.assert_array_equal(saved, labels.labels)
    assert labels.mode == "registered" and labels.classes == [1, 2]  # another scan: registered (#25)
    assert set(np.unique(saved).tolist()) <= {0, 1, 2}


def test_same_file_tracks_both_ways_with_the_engine_rule(pair, segmenter):
    """Support == query: the label map is exactly the one propagation rule (both ways) on the scan's own frames."""
    from icl.data.frames import Scan, label_slices, resize_slices
    from sam2_ext.track import track

    result = segmenter.segment(query=pair["s"], support=pair["s"], support_label=pair["s_lab"], classes=[1])
    assert result.mode == "both_ways"
    frames = result.frames
    volume = torch.from_numpy(np.stack([frames[z] for z in range(len(frames))]))
    masks = label_slices(Scan.open(pair["s_lab"]), 2, result.support_slices, IMAGE_SIZE)
    prompts = {1: {z: torch.from_numpy(masks[i] == 1) for i, z in enumerate(result.support_slices)}}
    ref = np.zeros(result.canonical_labels().shape, bool)
    for r in track(segmenter.predictor, volume, prompts, "both"):
        ref[..., r.index] = resize_slices(r.logits.float(), frames.in_plane_shape, "logits")[0].numpy() > 0
    ours = result.canonical_labels() == 1
    assert ref.any() and ours.any()
    np.testing.assert_array_equal(ours, ref)
    # slices before the first support slice got a prediction: the reverse pass ran (forward never reaches them)
    first = min(result.support_slices)
    assert first > 0 and ours[..., :first].any()

def test_one_class_matches_two_class_run(pair, segmenter):
    """Class 1 of a 2-class run equals the 1-class run wherever class 2 did not win the pixel."""
    for query in (pair["q"], pair["s"]):  # prepended and both-ways modes
        one = segmenter.segment(query=query, support=pair["s"], support_label=pair["s_lab"], classes=[1]).labels
        two = segmenter.segment(query=query, support=pair["s"], support_label=pair["s_lab"], classes=[1, 2]).labels
        free = two != 2
        assert (one == 1).any()
        np.testing.assert_array_equal((two == 1)[free], (one == 1)[free])
        assert set(np.unique(one).tolist()) <= {0, 1}


def test_query_folder(pair, tmp_path):
    queries = tmp_path / "queries"
    queries.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        (queries / name).write_bytes(pair["q"].read_bytes())
    (queries / "notes.txt").write_text("not a scan")
    assert main(_args(pair, queries, tmp_path / "out", "--classes", "2")) == 0
    outs = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert outs == ["a.nii.gz", "b.nii.gz"]
    a = np.asarray(nib.load(str(tmp_path / "out/a.nii.gz")).dataobj)
    b = np.asarray(nib.load(str(tmp_path / "out/b.nii.gz")).dataobj)
    np.testing.assert_array_equal(a, b)  # same scan, same answer
    assert set(np.unique(a).tolist()) <= {0, 2}


def _save(arr: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


@pytest.fixture
def bad(pair, tmp_path) -> dict[str, Path]:
    img = nib.load(str(pair["s"]))
    lab = np.asarray(nib.load(str(pair["s_lab"])).dataobj)
    shifted = img.affine.copy()
    shifted[0, 3] += 5.0
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(pair["ckpt"].read_bytes()[:2000])
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    return {
        "lab_shape": _save(lab[:-2], img.affine, tmp_path / "lab_shape.nii.gz"),
        "lab_affine": _save(lab, shifted, tmp_path / "lab_affine.nii.gz"),
        "flat": _save(np.zeros((20, 20, 1), np.int16), img.affine, tmp_path / "flat.nii.gz"),
        "corrupt": corrupt, "blocker": blocker,
    }


CASES = {
    "label shape": (lambda p, b, o: ["--support-label", str(b["lab_shape"])], "lab_shape.nii.gz"),
    "label affine": (lambda p, b, o: ["--support-label", str(b["lab_affine"])], "lab_affine.nii.gz"),
    "class missing": (lambda p, b, o: ["--classes", "1,7"], "label0001.nii.gz"),
    "unwritable out": (lambda p, b, o: ["--out", str(b["blocker"] / "pred.nii.gz")], "blocker"),
    "2D query": (lambda p, b, o: ["--query", str(b["flat"])], "flat.nii.gz"),
    "missing support": (lambda p, b, o: ["--support", str(o.parent / "nope.nii.gz")], "nope.nii.gz"),
    "corrupt checkpoint": (lambda p, b, o: ["--checkpoint", str(b["corrupt"])], "corrupt.pt"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_one_line_exit_2(case, pair, bad, tmp_path, capsys):
    make, where = CASES[case]
    out = tmp_path / "out" / "pred.nii.gz"
    rc = main(_args(pair, pair["q"], out, *make(pair, bad, out)))  # the bad value replaces the good one
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and where in err[0], err
    assert not out.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value", [("--image-size", "100"), ("--memory-selector", "telepathy")])
def test_option_errors_name_the_double_dash_flag(flag, value, pair, tmp_path, capsys):
    """sam2_ext's option errors reach the user spelled as this command's flags, not as -image_size or image_size."""
    out = tmp_path / "pred.nii.gz"
    assert main(_args(pair, pair["q"], out, flag, value)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flag}: "), err
    assert not out.exists()


def test_bad_input_subprocess_no_traceback(pair, bad, tmp_path):
    out = tmp_path / "pred.nii.gz"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "icl.segment",
                           *_args(pair, pair["q"], out, "--checkpoint", str(bad["corrupt"]))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "corrupt.pt" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_support_slices_spread_over_every_label_value():
    label = np.zeros((4, 4, 20), np.uint8)
    label[..., 2:6] = 1
    label[..., 12:18] = 2
    picks = choose_support_slices(label, 2, 2)
    assert picks == sorted(set(picks))
    assert any(2 <= z < 6 for z in picks) and any(12 <= z < 18 for z in picks)
    assert len(picks) == 4


def test_memory_selector_run(pair):
    """The scored selector picks among the kept history (bounded) and still yields a label map of the classes."""
    seg = ICLSegmenter(checkpoint=pair["ckpt"], config="tiny_cpu", device="cpu", image_size=IMAGE_SIZE,
                       memory_selector="scored:budget=2", fill="model")
    assert seg.predictor.memory_selector.config.budget == 2
    labels = seg.segment(query=pair["q"], support=pair["s"], support_label=pair["s_lab"], classes=[2]).labels
    assert labels.shape == SHAPE and set(np.unique(labels).tolist()) <= {0, 2}
