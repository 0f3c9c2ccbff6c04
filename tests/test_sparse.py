"""Sparse annotation the way annotators draw: per-structure prompts, classic fills, the reach rule, the self-check,
the crop — on small arrays, and through ``python -m icl.segment`` on NIfTI files."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from icl.api import ICLSegmenter
from icl.cli.segment import main
from icl.sparse.annotation import Annotation
from icl.sparse.classic import ClassicFill, place
from icl.sparse.methods import MODEL
from icl.sparse.fill import choose, fill_volume, self_check
from icl.sparse.model_fill import ModelFill, square_box
from segment_fixtures import IMAGE_SIZE, make_segment_data


def _disc(shape, centre, radius) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def _two_tubes(depth: int = 30) -> np.ndarray:
    """Two structures side by side through every slice: 1 on the left, 2 on the right ([X, Y, Z])."""
    label = np.zeros((40, 40, depth), np.uint8)
    for z in range(depth):
        label[..., z][_disc((40, 40), (12, 12), 6)] = 1
        label[..., z][_disc((40, 40), (26, 28), 7)] = 2
    return label


def _per_structure(label: np.ndarray, drawn: dict[int, list[int]]) -> np.ndarray:
    sparse = np.zeros_like(label)
    for c, zs in drawn.items():
        for z in zs:
            sparse[..., z][label[..., z] == c] = c
    return sparse


# ---------------------------------------------------------------------------------------------------- annotation
def test_structures_drawn_on_disjoint_slices_neither_erases_the_other():
    label = _two_tubes()
    drawn = {1: [4, 10, 16, 22], 2: [7, 13, 19, 25]}
    sparse = _per_structure(label, drawn)
    annotation = Annotation.from_label(sparse, 2, [1, 2])
    assert annotation.slices == drawn and annotation.absent == {}
    out = np.zeros_like(label)
    fill_volume(annotation, {1: "interpolation", 2: "interpolation"}, None, np.moveaxis(out, 2, 0))
    for z in drawn[1]:  # a slice drawn for structure 1 only: 1 as drawn, 2 filled (tapered before its first)
        np.testing.assert_array_equal(out[..., z] == 1, label[..., z] == 1)
        assert np.mean((out[..., z] == 2) == (label[..., z] == 2)) > (0.98 if z > drawn[2][0] else 0.9)
    for z in drawn[2]:  # beyond structure 1's last slice (22) it tapers: 25 keeps a smaller disc
        np.testing.assert_array_equal(out[..., z] == 2, label[..., z] == 2)
        assert (out[..., z] == 1).sum() > (0.9 if z < drawn[1][-1] else 0.3) * (label[..., z] == 1).sum()


def test_complete_slices_keep_the_strict_reading():
    label = _two_tubes()
    drawn = {1: [4, 10, 16, 22], 2: [7, 13, 19, 25]}
    annotation = Annotation.from_label(_per_structure(label, drawn), 2, [1, 2], complete=True)
    assert annotation.absent[1] == drawn[2] and annotation.absent[2] == drawn[1]
    out = np.zeros_like(label)
    fill_volume(annotation, {1: "interpolation", 2: "interpolation"}, None, np.moveaxis(out, 2, 0))
    for z in drawn[1]:  # written back whole: structure 2 is absent where only 1 was drawn
        np.testing.assert_array_equal(out[..., z], np.where(label[..., z] == 1, 1, 0))
    # beyond the outermost drawn slices, the other structure's slices bound it (within the reach of 3)
    assert annotation.extent(1) == (1, 24) and annotation.extent(2) == (5, 28)


def test_reach_rule_beyond_the_outermost_annotated_slices():
    label = _two_tubes(40)
    annotation = Annotation.from_label(_per_structure(label, {1: [10, 16, 22], 2: [10, 16, 22]}), 2, [1, 2])
    assert annotation.spacing(1) == 6 and annotation.reach(1) == 3 and annotation.extent(1) == (7, 25)
    assert annotation.stops(1) == [6, 26]  # the model's tracking ends where the reach does
    for method in ("nearest", "interpolation"):
        fill = ClassicFill(annotation, method)
        present = [z for z in range(40) if fill.mask(1, z).any()]
        assert present == list(range(7, 26)), method


def test_one_slice_takes_the_others_spacing_and_none_is_unbounded():
    label = _two_tubes()
    annotation = Annotation.from_label(_per_structure(label, {1: [10, 18, 26], 2: [15]}), 2, [1, 2])
    assert annotation.spacing(2) == 8 and annotation.extent(2) == (11, 19)
    lonely = Annotation.from_label(_per_structure(label, {1: [10], 2: [15]}), 2, [1, 2])
    assert lonely.reach(1) is None and lonely.stops(1) == [] and lonely.extent(1) == (10, 10)


# ---------------------------------------------------------------------------------------------------- classic fills
def test_interpolation_of_radius_4_and_8_gives_radius_6_halfway():
    label = np.zeros((40, 40, 9), np.uint8)
    label[..., 2][_disc((40, 40), (20, 20), 4)] = 1
    label[..., 6][_disc((40, 40), (20, 20), 8)] = 1
    fill = ClassicFill(Annotation.from_label(label, 2, [1]), "interpolation")
    radius = np.sqrt(fill.mask(1, 4).sum() / np.pi)
    assert abs(radius - 6) < 0.35, radius
    nearest = ClassicFill(Annotation.from_label(label, 2, [1]), "nearest")
    np.testing.assert_array_equal(nearest.mask(1, 4), label[..., 2] > 0)  # ties go to the lower slice


def test_interpolation_follows_a_drifting_structure():
    """Aligned by centroid, a disc moving 10 voxels between annotated slices keeps its size halfway (a plain
    blend of the two distance maps would shrink it to their overlap)."""
    label = np.zeros((40, 60, 9), np.uint8)
    label[..., 2][_disc((40, 60), (20, 20), 6)] = 1
    label[..., 6][_disc((40, 60), (20, 30), 6)] = 1
    annotation = Annotation.from_label(label, 2, [1])
    halfway = ClassicFill(annotation, "interpolation").mask(1, 4)
    plain = ClassicFill(annotation, "interpolation", align=False, taper=0.0).mask(1, 4)
    expected = _disc((40, 60), (20, 25), 6)
    dice = 2 * (halfway & expected).sum() / (halfway.sum() + expected.sum())
    assert dice > 0.95 and plain.sum() < 0.6 * expected.sum()


# ---------------------------------------------------------------------------------------------------- self-check
def test_self_check_scores_match_a_direct_computation():
    label = _two_tubes()
    label[..., 14:][label[..., 14:] == 2] = 0  # structure 2 ends halfway: the methods differ there
    annotation = Annotation.from_label(_per_structure(label, {1: [2, 8, 14, 20, 26], 2: [1, 6, 11]}), 2, [1, 2])
    checks = self_check(annotation, None)
    kept, scored = annotation.holdout()
    assert scored == {1: [8, 20], 2: [6]} and kept.slices[1] == [2, 14, 26]
    for method in ("interpolation", "nearest"):
        fill = ClassicFill(kept, method)
        for c, zs in scored.items():
            pred = np.stack([fill.mask(c, z) for z in zs])
            truth = np.stack([label[..., z] == c for z in zs])
            direct = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
            assert checks[c][1][method] == pytest.approx(direct), (c, method)


def test_auto_keeps_the_best_method_and_falls_back_for_unchecked_structures():
    label = _two_tubes()
    annotation = Annotation.from_label(_per_structure(label, {1: [2, 8, 14, 20, 26], 2: [5, 15]}), 2, [1, 2])
    checks = {1: (2, {"interpolation": 0.7, "nearest": 0.6, "model": 0.9})}
    table = choose(annotation, checks, "auto")
    assert [t.chosen for t in table] == ["model", "model"]
    assert table[1].rule.startswith("best mean") and table[1].held_out_slices == 0
    assert [t.chosen for t in choose(annotation, checks, "nearest")] == ["nearest", "nearest"]
    tie = choose(annotation, {1: (2, {"interpolation": 0.5, "nearest": 0.5, "model": 0.5})}, "auto")
    assert tie[0].chosen == "interpolation"  # ties: the cheaper, predictable fill


# ---------------------------------------------------------------------------------------------------- the model
def test_square_box_is_square_inside_and_covers():
    box = square_box([(10, 20, 30, 34)], (64, 48), margin=0.25, min_margin=2)
    y0, y1, x0, x1 = box
    assert y1 - y0 == x1 - x0 and y0 <= 10 and y1 >= 20 and x0 <= 30 and x1 >= 34 and x1 <= 48
    assert square_box([(0, 60, 0, 40)], (64, 48)) == (0, 48, 0, 48) or square_box([(0, 60, 0, 40)], (64, 48))[1] <= 64


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_segment_data(tmp_path_factory.mktemp("sparse"), seed=5)


def _sparse_file(data, path, step: int = 3):
    ref = nib.load(str(data["s_lab"]))
    label = np.asarray(ref.dataobj).astype(np.uint8)
    drawn = {int(c): list(np.flatnonzero((label == c).any((0, 1))))[1::step] for c in np.unique(label) if c}
    nib.save(nib.Nifti1Image(_per_structure(label, drawn), ref.affine, ref.header), str(path))
    return label, drawn


def test_crop_round_trips_into_the_full_grid(data):
    """On an annotated slice the model returns the drawn mask (its conditioning output): tracked in a crop, it
    comes back at the same place of the full slice."""
    from icl.infer.segmenter import PreparedFrames
    from icl.data.frames import Scan, VolumeFrames

    seg = ICLSegmenter(checkpoint=data["ckpt"], config="tiny_cpu", image_size=IMAGE_SIZE, support_slices="labelled")
    scan = Scan.open(data["s"])
    label = np.asarray(Scan.open(data["s_lab"]).canonical).astype(np.int64)
    annotation = Annotation.from_label(label, 2, [1])
    z = annotation.slices[1][len(annotation.slices[1]) // 2]
    for crop in (True, False):
        runner = ModelFill(seg.predictor, scan, "auto", 2, crop, torch.no_grad, PreparedFrames)
        box = runner.box(annotation, [1])
        y0, y1, x0, x1 = box  # the frames of a crop are the whole slice's, cut
        np.testing.assert_array_equal(VolumeFrames(scan, "auto", IMAGE_SIZE, 2, crop=box).slice01(z),
                                      VolumeFrames(scan, "auto", IMAGE_SIZE, 2).slice01(z)[y0:y1, x0:x1])
        assert (box != (0, *annotation.in_plane_shape[:1], 0, annotation.in_plane_shape[1])) == crop
        scores = dict(runner.run(annotation, [1]))
        got = place(scores[z].get(1), annotation.in_plane_shape)
        truth = annotation.mask(1, z)
        assert 2 * (got & truth).sum() / (got.sum() + truth.sum()) > 0.9, crop


def test_self_check_prefers_interpolation_over_a_random_model(data, tmp_path):
    """Random weights are wrong on purpose: the self-check sees it on the held-out slices and auto does not use
    them; the held-out Dice it reports is the one computed directly."""
    sparse = tmp_path / "sparse.nii.gz"
    _sparse_file(data, sparse, step=2)
    seg = ICLSegmenter(checkpoint="none", config="tiny_cpu", image_size=IMAGE_SIZE, support_slices="labelled")
    result = seg.segment(data["s"], data["s"], sparse)
    checked = [c for c in result.checks if c.held_out_slices]
    assert checked and all(c.chosen != MODEL for c in result.checks)
    for c in checked:
        assert c.dice["model"] is not None and c.dice["interpolation"] > c.dice["model"]
    # the model's held-out Dice is the one of its own fill of the held-out slices, computed here directly
    from icl.infer.segmenter import PreparedFrames
    from icl.data.frames import Scan

    label = np.asarray(Scan.open(sparse).canonical).astype(np.int64)
    annotation = Annotation.from_label(label, 2, result.classes)
    kept, scored = annotation.holdout()
    runner = ModelFill(seg.predictor, Scan.open(data["s"]), "auto", 2, False, torch.no_grad, PreparedFrames)
    outputs = dict(runner.run(kept, sorted(scored)))
    for check in checked:
        c, zs = check.structure, scored[check.structure]
        pred = np.stack([place(outputs[z].get(c), annotation.in_plane_shape) for z in zs])
        truth = np.stack([annotation.mask(c, z) for z in zs])
        total = pred.sum() + truth.sum()
        assert check.dice["model"] == pytest.approx(2 * (pred & truth).sum() / total if total else None)


def test_cli_fill_report_and_the_table_on_stderr(data, tmp_path, capsys):
    sparse, out, report = tmp_path / "sparse.nii.gz", tmp_path / "filled.nii.gz", tmp_path / "check.json"
    label, drawn = _sparse_file(data, sparse, step=2)
    base = ["--checkpoint", str(data["ckpt"]), "--image-size", str(IMAGE_SIZE), "--quiet", "--support", str(data["s"]),
            "--support-label", str(sparse), "--query", str(data["s"]), "--out", str(out), "--support-slices", "labelled"]
    assert main(base + ["--fill", "interpolation", "--report", str(report)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("structure ")]
    table = json.loads(report.read_text())["structures"]
    assert len(lines) == len(table) == len(drawn) and all(t["chosen"] == "interpolation" for t in table)
    filled = np.asarray(nib.load(str(out)).dataobj)
    for c, zs in drawn.items():  # drawn voxels stay as drawn; the structure is filled between its slices
        for z in zs:
            assert (filled[..., z][label[..., z] == c] == c).all()
        between = [z for z in range(zs[0], zs[-1]) if z not in zs]
        assert all((filled[..., z] == c).any() for z in between)
    assert main(base + ["--fill", "model", "--crop", "off"]) == 0


@pytest.mark.parametrize("extra, needle", [
    (["--fill", "bogus"], "--fill"),
    (["--support-slices", "auto", "--complete-slices"], "--complete-slices"),
    (["--support-slices", "auto", "--report", "r.json"], "--report"),
    (["--support-slices", "auto", "--fill", "nearest"], "--fill"),
])
def test_bad_sparse_flags_are_one_line(data, tmp_path, capsys, extra, needle):
    out = tmp_path / "x.nii.gz"
    args = ["--checkpoint", str(data["ckpt"]), "--image-size", str(IMAGE_SIZE), "--quiet", "--support", str(data["s"]),
            "--support-label", str(data["s_lab"]), "--query", str(data["s"]), "--out", str(out)]
    if "--support-slices" not in extra:
        args += ["--support-slices", "labelled"]
    assert main(args + extra) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], errors
    assert not out.exists() and not (tmp_path / "r.json").exists()


def test_a_structure_on_one_slice_is_a_warning_not_a_crash(data, tmp_path, capsys):
    ref = nib.load(str(data["s_lab"]))
    label = np.asarray(ref.dataobj).astype(np.uint8)
    z = int(np.flatnonzero((label == 1).any((0, 1)))[2])
    sparse = np.zeros_like(label)
    sparse[..., z][label[..., z] == 1] = 1
    path = tmp_path / "one.nii.gz"
    nib.save(nib.Nifti1Image(sparse, ref.affine, ref.header), str(path))
    out = tmp_path / "filled.nii.gz"
    assert main(["--checkpoint", str(data["ckpt"]), "--image-size", str(IMAGE_SIZE), "--quiet", "--support",
                 str(data["s"]), "--support-label", str(path), "--query", str(data["s"]), "--out", str(out),
                 "--support-slices", "labelled"]) == 0
    err = capsys.readouterr().err
    assert "structure 1 is annotated on one slice only" in err and "error" not in err
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), sparse)  # nothing to fill between


def test_auto_takes_the_model_only_on_clear_per_slice_evidence():
    """A model that ties with interpolation within the check's noise is not chosen; one that beats it on every
    held-out slice is."""
    from icl.sparse.fill import model_clearly_better

    label = _two_tubes()
    annotation = Annotation.from_label(_per_structure(label, {1: [2, 8, 14, 20, 26]}), 2, [1])

    def check(model_slices):
        interp = {8: 0.70, 20: 0.60, 14: 0.65, 26: 0.75}
        model = dict(zip(interp, model_slices))
        return {1: (4, {"interpolation": float(np.mean(list(interp.values()))), "nearest": 0.5,
                        "model": float(np.mean(model_slices))}, {"interpolation": interp, "model": model})}

    noisy = check([0.80, 0.52, 0.70, 0.72])  # mean +0.01, differences +0.10, -0.08, +0.05, -0.03
    assert not model_clearly_better(noisy)
    table = choose(annotation, noisy, "auto")
    assert table[0].chosen == "interpolation" and "did not clearly beat" in table[0].rule
    assert table[0].dice["model"] == pytest.approx(0.685)  # the table still reports the model's held-out Dice
    clear = check([0.80, 0.71, 0.74, 0.86])  # +0.09 to +0.11 on every slice
    assert model_clearly_better(clear) and choose(annotation, clear, "auto")[0].chosen == "model"
    assert choose(annotation, noisy, "model")[0].chosen == "model"  # an explicit --fill model is obeyed
