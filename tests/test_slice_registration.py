"""The image-guided fill of a drawing (``--fill registration`` on the scan itself): drawn masks carried onto the
slices between by registering the drawn slices' images to theirs; the self-check scores it beside the shape fills
and hands each structure's best classic fill to the model as its prior."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.ndimage import shift as nd_shift

from icl.api import ICLSegmenter
from icl.cli.segment import main
from icl.sparse.annotation import Annotation
from icl.sparse.classic import ClassicFill
from icl.sparse.fill import choose, fill_volume, model_clearly_better, self_check
from icl.sparse.slice_registration import (ITERATIONS, RegistrationFill, SliceFields, pyramid_iterations,
                                           register_slices, warp)

DEPTH, SIDE, RADIUS = 25, 48, 7
DRAWN = [0, 6, 12, 18, 24]
EVERY_3RD = list(range(0, DEPTH, 3))


def _centre_x(z: int) -> float:
    """The structure swings 6 voxels sideways between slices drawn at the same place: a shape fill cannot see it."""
    return 20 + 6 * abs(np.sin(np.pi * z / 6))


def _swinging() -> tuple[np.ndarray, np.ndarray]:
    """An image with a bright disc on a textured background, and its label ([X, Y, Z], axial slices)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    image = np.zeros((SIDE, SIDE, DEPTH), np.float32)
    label = np.zeros((SIDE, SIDE, DEPTH), np.uint8)
    texture = gaussian_filter(rng.normal(size=(SIDE, SIDE)), 2).astype(np.float32)
    for z in range(DEPTH):
        disc = (yy - 24) ** 2 + (xx - _centre_x(z)) ** 2 <= RADIUS ** 2
        label[..., z][disc] = 1
        image[..., z] = 100 + 40 * texture + 120 * gaussian_filter(disc.astype(np.float32), 1)
    return image, label


def _drawn(label: np.ndarray, slices: list[int]) -> np.ndarray:
    sparse = np.zeros_like(label)
    sparse[..., slices] = label[..., slices]
    return sparse


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_a_known_shift_is_recovered_and_carries_a_mask():
    rng = np.random.default_rng(1)
    fixed = gaussian_filter(rng.normal(size=(40, 40)), 3).astype(np.float32)
    moving = nd_shift(fixed, (2, -3), order=1, mode="nearest")  # the match of fixed's (y, x) is at (y + 2, x - 3)
    field = register_slices(fixed, moving)
    inner = field[:, 10:30, 10:30].reshape(2, -1)
    np.testing.assert_allclose(np.median(inner, axis=1), [2, -3], atol=0.5)
    mask = np.zeros((40, 40), np.float32)
    mask[14:24, 12:22] = 1
    carried = warp(nd_shift(mask, (2, -3), order=0), field) > 0.5  # the moving slice's mask, brought back
    assert _dice(carried, mask > 0) > 0.9


def test_a_flat_box_gives_the_identity():
    flat = np.full((20, 20), 7.0, np.float32)
    assert not register_slices(flat, flat).any()


def test_small_boxes_keep_fewer_levels_with_the_coarse_count():
    assert pyramid_iterations((80, 64)) == ITERATIONS and len(ITERATIONS) == 2
    assert pyramid_iterations((24, 64)) == ITERATIONS[:1]  # half of 24 is under 16 a side: its own resolution only


def test_the_fill_follows_the_image_where_the_shapes_cannot():
    image, label = _swinging()
    annotation = Annotation.from_label(_drawn(label, DRAWN), 2, [1])
    fields = SliceFields(np.moveaxis(image, 2, 0), workers=2)
    registration, interpolation = RegistrationFill(annotation, fields), ClassicFill(annotation, "interpolation")
    between = [z for z in range(DEPTH) if z not in DRAWN]
    truth = np.stack([label[..., z] == 1 for z in between])
    carried = np.stack([registration.mask(1, z) for z in between])
    shaped = np.stack([interpolation.mask(1, z) for z in between])
    assert _dice(carried, truth) > 0.9 > 0.75 > _dice(shaped, truth)
    assert len(fields.fields) == 2 * len(between)  # each slice onto its two neighbours between drawn ones, once
    assert all(abs(k - j) == 1 for k, j, _ in fields.fields)


def test_drawn_voxels_stay_and_one_slice_structures_follow_the_reach_rule():
    image, label = _swinging()
    sparse = _drawn(label, DRAWN)
    sparse[30:36, 5:11, 9] = 2  # a second structure, drawn on one slice only
    sparse[..., 12][sparse[..., 12] == 1] = 0  # structure 1 not drawn on 12: slices 6 and 18 around it
    annotation = Annotation.from_label(sparse, 2, [1, 2])
    fields = SliceFields(np.moveaxis(image, 2, 0))
    out = np.zeros_like(label)
    fill_volume(annotation, {1: "registration", 2: "registration"}, None, np.moveaxis(out, 2, 0), fields=fields)
    for z in annotation.slices[1]:  # drawn: exactly as drawn
        np.testing.assert_array_equal(out[..., z] == 1, sparse[..., z] == 1)
    interpolation = ClassicFill(annotation, "interpolation")
    for c in (1, 2):  # the same slices as every other fill: the reach rule
        by_registration = [z for z in range(DEPTH) if (out[..., z] == c).any()]
        by_interpolation = [z for z in range(DEPTH) if interpolation.mask(c, z).any() or z in annotation.slices[c]]
        assert by_registration == by_interpolation, c
    assert annotation.reach(2) == 3 and [z for z in range(DEPTH) if (out[..., z] == 2).any()] == list(range(6, 13))


def test_the_self_check_scores_it_and_hands_the_model_the_best_classic_prior():
    image, label = _swinging()
    annotation = Annotation.from_label(_drawn(label, EVERY_3RD), 2, [1])
    fields = SliceFields(np.moveaxis(image, 2, 0))
    handed = []

    def model(ann, classes, priors=None):  # a model that records its priors and says nothing
        handed.append(priors)
        yield from ((z, {}) for z in range(ann.depth))

    checks = self_check(annotation, model, fields)
    dice = checks[1][1]
    assert set(dice) == {"interpolation", "nearest", "registration", "model"}
    assert dice["registration"] > dice["interpolation"] + 0.1
    assert isinstance(handed[0][1], RegistrationFill)  # the best classic fill is the model's prior
    shared = RegistrationFill(annotation, fields).jobs() & set(fields.fields)
    assert len(shared) >= len(RegistrationFill(annotation, fields).jobs()) // 3  # its registrations serve the fill
    table = choose(annotation, checks, "auto")
    assert table[0].chosen == "registration" and table[0].prior == "registration"
    assert "registration" in table[0].line()
    assert not model_clearly_better(checks, {1: "registration"})
    without_image = self_check(annotation, None)  # no image handed: the shape fills alone
    assert set(without_image[1][1]) == {"interpolation", "nearest"}


def test_the_model_must_clearly_beat_the_best_classic_fill_not_the_interpolation():
    per_slice = {"interpolation": {2: 0.5, 4: 0.52, 6: 0.48}, "registration": {2: 0.9, 4: 0.92, 6: 0.91},
                 "model": {2: 0.7, 4: 0.71, 6: 0.7}}
    checks = {1: (3, {"interpolation": 0.5, "registration": 0.91, "model": 0.7}, per_slice)}
    assert model_clearly_better(checks)  # against the interpolation it would pass
    assert not model_clearly_better(checks, {1: "registration"})


def _files(tmp_path, image, sparse):
    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    paths = tmp_path / "image.nii.gz", tmp_path / "drawn.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), str(paths[0]))
    nib.save(nib.Nifti1Image(sparse.astype(np.int16), affine), str(paths[1]))
    return paths


@pytest.mark.parametrize("axis", [2, 0])
def test_the_api_fills_a_drawing_along_any_axis(tmp_path, axis):
    image, label = _swinging()
    if axis == 0:  # the same scan drawn on sagittal slices: the structure swings along x
        image, label = np.ascontiguousarray(np.moveaxis(image, 2, 0)), np.ascontiguousarray(np.moveaxis(label, 2, 0))
    sparse = np.zeros_like(label)
    index = [slice(None)] * 3
    index[axis] = DRAWN
    sparse[tuple(index)] = label[tuple(index)]
    img_path, drawn_path = _files(tmp_path, image, sparse)
    result = ICLSegmenter(fill="registration", support_slices="labelled").segment(img_path, img_path, drawn_path)
    assert result.slice_axis == axis and [c.chosen for c in result.checks] == ["registration"]
    np.testing.assert_array_equal(np.take(result.labels, DRAWN, axis), np.take(label, DRAWN, axis))
    between = [z for z in range(DEPTH) if z not in DRAWN]
    assert _dice(np.take(result.labels, between, axis) == 1, np.take(label, between, axis) == 1) > 0.9
    shaped = ICLSegmenter(fill="interpolation", support_slices="labelled").segment(img_path, img_path, drawn_path)
    assert set(shaped.checks[0].dice) == {"interpolation", "nearest"}  # an explicit shape fill registers nothing


def test_cli_complete_slices_and_auto_choose_it(tmp_path, capsys):
    image, label = _swinging()
    label[8:14, 36:42, 2:23] = 2  # a still block: complete slices carry both structures
    img_path, drawn_path = _files(tmp_path, image, _drawn(label, EVERY_3RD))
    out, report = tmp_path / "filled.nii.gz", tmp_path / "check.json"
    assert main(["--query", str(img_path), "--support", str(img_path), "--support-label", str(drawn_path),
                 "--out", str(out), "--fill", "registration", "--complete-slices", "--report", str(report)]) == 0
    filled = np.asarray(nib.load(str(out)).dataobj)
    assert _dice(filled == 1, label == 1) > 0.9 and _dice(filled == 2, label == 2) > 0.9
    assert all("registration" in s["dice"] for s in json.loads(report.read_text())["structures"])
    assert "registration" in capsys.readouterr().err  # the self-check's table, printed
    annotation = Annotation.from_label(_drawn(label, EVERY_3RD), 2, [1, 2])  # auto's choice (no model here)
    checks = self_check(annotation, None, SliceFields(np.moveaxis(image, 2, 0)))
    assert choose(annotation, checks, "auto")[0].chosen == "registration"
