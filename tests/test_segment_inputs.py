"""What users bring to python -m icl.segment: 4D channels, sparse annotations, NaN voxels, other orientations,
logs instead of terminals, no weights at all; and the frames it feeds the model are the training cache's frames."""
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
from icl.model import weights as ckpt_module
from icl.errors import InputError
from icl.cli.segment import main
from segment_fixtures import IMAGE_SIZE, SHAPE, make_segment_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return make_segment_data(tmp_path_factory.mktemp("inputs"), seed=3, msd=True)


def _seg(data, **kw) -> ICLSegmenter:
    """The model's road (``auto`` registers another scan since #25; these tests are about the model's frames)."""
    return ICLSegmenter(checkpoint=data["ckpt"], config="tiny_cpu", image_size=IMAGE_SIZE, **{"fill": "model", **kw})


def _args(data, *extra) -> list[str]:
    fill = [] if "--fill" in extra else ["--fill", "model"]
    return ["--checkpoint", str(data["ckpt"]), "--image-size", str(IMAGE_SIZE), "--quiet", *fill, *extra]


def _save(arr: np.ndarray, like: Path, path: Path) -> Path:
    ref = nib.load(str(like))
    nib.save(nib.Nifti1Image(arr, ref.affine, ref.header), str(path))
    return path


def _one_error_line(capsys, needle: str) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], lines
    return errors[0]


# ---------------------------------------------------------------------------------------------------- 4D channels
def test_4d_image_needs_a_channel(data, tmp_path, capsys):
    out = tmp_path / "pred.nii.gz"
    base = _args(data, "--support", str(data["msd"]), "--support-label", str(data["msd_lab"]),
                 "--query", str(data["msd"]), "--out", str(out))
    assert main(base) == 2
    _one_error_line(capsys, "phantom_001.nii.gz: 4D image")
    assert not out.exists()
    assert main(base + ["--channel", "5"]) == 2
    _one_error_line(capsys, "phantom_001.nii.gz")
    assert main(base + ["--channel", "1"]) == 0
    pred = nib.load(str(out))
    assert pred.shape == SHAPE and (np.asarray(pred.dataobj) > 0).any()


# ---------------------------------------------------------------------------------------------------- sparse labels
def test_complete_slices_with_the_model_fill_the_scan_both_ways(data, tmp_path):
    """--complete-slices --fill model: the rule before per-structure prompts (every labelled slice annotated for
    every structure, written back whole), the scan filled by the model's propagation."""
    label = np.asarray(nib.load(str(data["s_lab"])).dataobj)
    sparse = np.zeros_like(label)
    annotated = [z for z in range(0, SHAPE[2], 4) if label[..., z].any()]
    sparse[..., annotated] = label[..., annotated]
    sparse_path = _save(sparse, data["s_lab"], tmp_path / "sparse.nii.gz")
    out = tmp_path / "filled.nii.gz"
    assert main(_args(data, "--support", str(data["s"]), "--support-label", str(sparse_path), "--query",
                      str(data["s"]), "--out", str(out), "--support-slices", "labelled", "--complete-slices",
                      "--fill", "model")) == 0
    filled = np.asarray(nib.load(str(out)).dataobj)
    np.testing.assert_array_equal(filled[..., annotated], sparse[..., annotated])  # written back as given
    others = [z for z in range(SHAPE[2]) if z not in annotated]
    assert filled[..., others].any()  # the rest was filled by propagation
    result = _seg(data, support_slices="labelled", complete_slices=True, fill="model").segment(
        data["s"], data["s"], sparse_path)
    # the prompts are exactly the annotated slices (canonical axis 2 is the file's axis 2 here, flipped in-plane)
    assert result.support_slices == annotated and result.mode == "both_ways"


def test_labelled_bad_inputs(data, tmp_path, capsys):
    label = np.asarray(nib.load(str(data["s_lab"])).dataobj)
    empty = _save(np.zeros_like(label), data["s_lab"], tmp_path / "empty.nii.gz")
    cropped = _save(label[:, :-3], data["s_lab"], tmp_path / "cropped.nii.gz")
    for bad, needle in ((empty, "empty.nii.gz: support label is empty"), (cropped, "cropped.nii.gz: label shape")):
        out = tmp_path / "x.nii.gz"
        assert main(_args(data, "--support", str(data["s"]), "--support-label", str(bad), "--query",
                          str(data["s"]), "--out", str(out), "--support-slices", "labelled")) == 2
        _one_error_line(capsys, needle)
        assert not out.exists()


# ---------------------------------------------------------------------------------------------------- NaN voxels
def test_nan_voxels_are_replaced_and_said(data, tmp_path, capsys):
    img = nib.load(str(data["q"]))
    arr = np.asarray(img.dataobj).astype(np.float32)
    arr[3, 4, 5] = np.nan
    arr[10, 10, 2] = np.inf
    nan_query = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(arr, img.affine), str(nan_query))
    seg = _seg(data, window="ct_abdomen")
    clean = seg.segment(data["q"], data["s"], data["s_lab"]).labels
    capsys.readouterr()
    dirty = seg.segment(nan_query, data["s"], data["s_lab"]).labels
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "nan.nii.gz: 2 non-finite voxels replaced" in warning[0]
    assert dirty.any() and (dirty == clean).mean() > 0.99  # not an empty mask: two voxels changed, nothing else


# ---------------------------------------------------------------------------------------------------- orientation
def test_a_flipped_copy_gives_the_flipped_output(data, tmp_path):
    """The same scan stored with its first axis reversed (and the affine saying so) is the same anatomy: the
    output is the original output, reversed the same way, in the copy's own voxel order and affine."""
    img = nib.load(str(data["q"]))
    arr = np.asarray(img.dataobj)
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, SHAPE[0] - 1
    flipped = tmp_path / "flipped.nii.gz"
    nib.save(nib.Nifti1Image(arr[::-1].copy(), img.affine @ flip), str(flipped))
    seg = _seg(data)
    plain = seg.segment(data["q"], data["s"], data["s_lab"])
    mirrored = seg.segment(flipped, data["s"], data["s_lab"])
    assert plain.labels.any()
    np.testing.assert_array_equal(mirrored.labels, plain.labels[::-1])
    np.testing.assert_allclose(mirrored.affine, img.affine @ flip)


# ---------------------------------------------------------------------------------------------------- weights
def test_default_weights_rule(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ckpt_module, "DEFAULT_WEIGHTS", {"tiny_cpu": tmp_path / "missing.pth"})
    with pytest.raises(InputError, match="missing.pth: the default model for tiny_cpu is missing"):
        ICLSegmenter(image_size=IMAGE_SIZE)
    shipped = tmp_path / "icl_tiny_cpu.pth"
    shipped.write_bytes(data["ckpt"].read_bytes())
    monkeypatch.setattr(ckpt_module, "DEFAULT_WEIGHTS", {"tiny_cpu": shipped})
    monkeypatch.setattr(ckpt_module, "CHECKPOINT_DIR", tmp_path / "checkpoint")
    default = ICLSegmenter(image_size=IMAGE_SIZE)
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith("note: using the default model") and "tiny_cpu" in notes[0]
    explicit = _seg(data)
    for a, b in zip(default.predictor.state_dict().values(), explicit.predictor.state_dict().values()):
        assert torch.equal(a, b)
    ICLSegmenter(checkpoint="none", image_size=IMAGE_SIZE)
    assert "warning: --checkpoint none: random weights" in capsys.readouterr().err
    with pytest.raises(InputError, match="sam2.1_hiera_t has no default weights"):
        ICLSegmenter(config="sam2.1_hiera_t")
    out = tmp_path / "pred.nii.gz"
    assert main(["--support", str(data["s"]), "--support-label", str(data["s_lab"]), "--query", str(data["q"]),
                 "--out", str(out), "--config", "sam2.1_hiera_t", "--quiet"]) == 2
    _one_error_line(capsys, "--checkpoint: config sam2.1_hiera_t has no default weights")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------- logs
def test_progress_bar_stays_out_of_log_files(data, tmp_path):
    out, log = tmp_path / "pred.nii.gz", tmp_path / "run.log"
    args = [a for a in _args(data) if a != "--quiet"]
    with open(log, "w") as handle:
        proc = subprocess.run([sys.executable, "-m", "icl.segment", *args, "--support", str(data["s"]),
                               "--support-label", str(data["s_lab"]), "--query", str(data["q"]), "--out", str(out)],
                              cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=handle, timeout=120)
    assert proc.returncode == 0
    text = log.read_text()
    assert "\r" not in text and "slice/s" not in text and "it/s" not in text
    assert len(text.strip().splitlines()) == 1 and "pred.nii.gz" in text  # just the one summary line


# ---------------------------------------------------------------------------------------------------- one road
def test_cli_frames_are_the_cached_frames(data, tmp_path, monkeypatch):
    """The frames the CLI feeds the model for a query equal the training cache's frames of the same scan."""
    import icl.infer.segmenter
    import sam2_ext.track
    from icl.data.preprocess import preprocess_dataset
    from sam2_ext.predictor import prepare_frames

    # a cache windowed like KiTS (ct_kidney), not like --window auto's generic CT choice (ct_abdomen)
    cached = {c.id: c for c in preprocess_dataset("btcv", data["root"] / "btcv", tmp_path / "cache",
                                                  image_size=IMAGE_SIZE, window="ct_kidney", progress=False)}["0002"]
    seen = {}
    real = sam2_ext.track.track

    def spy(predictor, frames, prompts, direction="both", **kw):
        seen["frames"], seen["offset"] = frames, len(frames) - cached.num_slices
        return real(predictor, frames, prompts, direction, **kw)

    monkeypatch.setattr(icl.infer.segmenter, "track", spy)  # where the segmenter looks it up
    # weights that record the training window (as train_3d.py's checkpoints and exports do), the CLI's defaults
    weights = tmp_path / "trained.pth"
    state = torch.load(data["ckpt"], weights_only=True)["model"]
    torch.save({"model": state, "trained": {"config": {"config": "tiny_cpu", "image_size": IMAGE_SIZE,
                                                       "frames": {"ct_window": cached.meta["window"]}}}}, weights)
    assert tuple(cached.meta["window"]) == (-79.0, 304.0)
    ICLSegmenter(checkpoint=weights, fill="model").segment(data["q"], data["s"], data["s_lab"])
    frames, offset = seen["frames"], seen["offset"]
    expected = prepare_frames(torch.from_numpy(np.array(cached.image)), IMAGE_SIZE)
    fed = torch.stack([frames[offset + z] for z in range(cached.num_slices)])
    assert torch.equal(fed, expected)
