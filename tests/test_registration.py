"""Support from another scan (icl.sparse.registration, icl.sparse.cross_check): a known transform is recovered, the
geometry is physical (an LPS or oblique file is its RAS twin), supports fuse, the leave-one-out estimate is what it
says, and bad input is one InputError naming the file. Small phantoms (36 voxels a side): seconds, not minutes."""
from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import affine_transform, gaussian_filter

from icl.data.frames import Scan
from icl.errors import InputError
from icl.model.dice import binary_dice
from icl.sparse.cross_check import leave_one_out
from icl.sparse.fusion import fuse, register_labels
from icl.sparse.registration import canonical_affine, pyramid, to_sitk

SHAPE = (36, 40, 32)
SPACING = np.diag([1.5, 1.25, 2.0, 1.0])
CLASSES = [3, 7]


def phantom(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A textured body with two ellipsoidal structures (labels 3 and 7) of their own brightness."""
    rng = np.random.default_rng(seed)
    g = np.indices(SHAPE).astype(np.float32)
    c = (np.array(SHAPE) - 1) / 2

    def inside(centre, radii):
        return sum(((g[i] - c[i] - centre[i]) / radii[i]) ** 2 for i in range(3)) < 1

    label = np.zeros(SHAPE, np.int16)
    label[inside((-5, 0, 0), (7, 9, 6))] = 3
    label[inside((8, 6, -3), (4, 5, 5))] = 7
    body = inside((0, 0, 0), (0.4 * SHAPE[0], 0.42 * SHAPE[1], 0.4 * SHAPE[2]))
    texture = gaussian_filter(rng.normal(0, 1, SHAPE), 2.5)
    image = body * (50 + 8 * texture / texture.std()) + 40.0 * (label == 3) + 25.0 * (label == 7)
    return (gaussian_filter(image, 0.7) + rng.normal(0, 1, SHAPE)).astype(np.float32), label


def moved(image: np.ndarray, label: np.ndarray, degrees: float, scale: float, shift) -> tuple[np.ndarray, np.ndarray]:
    """The phantom under a known affine (voxel space, about the centre), with a contrast change (gamma 0.8)."""
    a = np.deg2rad(degrees)
    matrix = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) * scale
    centre = (np.array(SHAPE) - 1) / 2
    offset = centre - matrix @ (centre + np.asarray(shift, float))
    img = affine_transform(image, matrix, offset, order=1)
    return np.clip(img, 0, None) ** 0.8, affine_transform(label, matrix, offset, order=0)


def lps_copy(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same scan stored LPS: the first two voxel axes reversed, the affine compensating."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(arr.shape[:2]) - 1
    return np.ascontiguousarray(arr[::-1, ::-1]), affine @ flip


def save(tmp_path, name, arr, affine=SPACING):
    path = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def dices(pred, truth):
    return [binary_dice(pred == c, truth == c) for c in CLASSES]


@pytest.fixture(scope="module")
def case():
    image, label = phantom()
    q_image, q_label = moved(image, label, 8.0, 1.05, (2, -3, 1))
    return image, label, q_image, q_label


def test_a_known_affine_is_recovered_and_labels_come_back(case):
    image, label, q_image, q_label = case
    assert min(dices(label, q_label)) < 0.75  # the copy as it is would be poor
    out = register_labels((q_image, SPACING), (image, SPACING), (label, SPACING), CLASSES, deformable=False)
    assert out.shape == SHAPE and out.dtype == np.int32 and set(np.unique(out)) <= {0, *CLASSES}
    assert min(dices(out, q_label)) >= 0.95


def test_an_lps_copy_of_the_query_gives_the_ras_labels(case, tmp_path):
    image, label, q_image, _ = case
    support = (image, SPACING), (label, SPACING)
    ras = register_labels(Scan.open(save(tmp_path, "q_ras", q_image)), *support, CLASSES, deformable=True)
    lps_image, lps_affine = lps_copy(q_image, SPACING)
    lps = register_labels(Scan.open(save(tmp_path, "q_lps", lps_image, lps_affine)), *support, CLASSES,
                          deformable=True)
    assert lps.shape == SHAPE
    assert np.array_equal(lps[::-1, ::-1], ras)  # on the LPS file's own grid, the RAS labels


def test_geometry_is_physical_for_an_oblique_file(case):
    image, label, _, _ = case
    a = np.deg2rad(12.0)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    rotation[:3, 3] = (5.0, -7.0, 3.0)
    oblique = rotation @ SPACING  # the same voxels placed rotated and moved in the world
    sitk_image = to_sitk(image, oblique, "oblique")
    for index in [(0, 0, 0), (5, 9, 2), (35, 39, 31)]:
        world = oblique @ (*index, 1.0)
        lps = np.array(sitk_image.TransformIndexToPhysicalPoint(index))
        assert np.allclose(lps, world[:3] * (-1, -1, 1))
    # registration must undo the 12° rotation and the shift found only in the affines
    out = register_labels((image, oblique), (image, SPACING), (label, SPACING), CLASSES, deformable=False)
    assert min(dices(out, label)) >= 0.95


def test_canonical_affine_describes_the_canonical_voxels(case):
    image, _, _, _ = case
    lps_image, lps_affine = lps_copy(image, SPACING)
    scan = Scan.from_array(lps_image, lps_affine)
    assert np.allclose(canonical_affine(scan), SPACING)
    assert np.array_equal(scan.canonical, image)


def test_two_supports_fuse_by_summed_probabilities(case):
    image, label, q_image, q_label = case
    other_image, other_label = moved(*phantom(seed=1), -5.0, 0.97, (-2, 2, 0))
    supports = [((image, SPACING), (label, SPACING)), ((other_image, SPACING), (other_label, SPACING))]
    query = (q_image, SPACING)
    singles = [register_labels(query, *s, CLASSES, deformable=False, probabilities=True) for s in supports]
    fused = fuse(query, supports, CLASSES, deformable=False, probabilities=True)
    assert fused.shape == (1 + len(CLASSES), *SHAPE) and fused.dtype == np.float32
    assert np.allclose(fused, (singles[0] + singles[1]) / 2, atol=1e-5)
    assert np.allclose(fused.sum(0), 1.0, atol=1e-4)
    labels = fuse(query, supports, CLASSES, deformable=False)
    assert np.array_equal(labels, np.array([0, *CLASSES])[fused.argmax(0)])
    single_dice = [np.mean(dices(np.array([0, *CLASSES])[p.argmax(0)], q_label)) for p in singles]
    assert np.mean(dices(labels, q_label)) >= min(single_dice) and min(dices(labels, q_label)) >= 0.85


def test_leave_one_out_equals_a_direct_computation(case):
    image, label, q_image, q_label = case
    a, b = ((image, SPACING), (label, SPACING)), ((q_image, SPACING), (q_label, SPACING))
    estimate = leave_one_out([a, b], CLASSES, deformable=False)
    on_a = register_labels(a[0], *b, CLASSES, deformable=False)
    on_b = register_labels(b[0], *a, CLASSES, deformable=False)
    direct = [(x + y) / 2 for x, y in zip(dices(on_a, label), dices(on_b, q_label))]
    assert list(estimate) == CLASSES
    assert np.allclose(list(estimate.values()), direct)
    assert all(0.9 < d <= 1 for d in direct)
    with pytest.raises(InputError, match="at least 2"):
        leave_one_out([a], CLASSES)


def test_an_absent_structure_scores_nan_not_one():
    image, label = phantom()
    estimate = leave_one_out([((image, SPACING), (label, SPACING))] * 2, [3, 99], deformable=False)
    assert estimate[3] > 0.95 and math.isnan(estimate[99])


def test_small_images_get_fewer_pyramid_levels():
    assert pyramid((100, 50, 10), (168, 206, 128)) == "100x50x10"
    assert pyramid((100, 50, 10), (36, 40, 32)) == "100x50"
    assert pyramid((100, 50, 10), (20, 20, 20)) == "100"


def bad_input(tmp_path, which: str):
    image, label = phantom()
    paths = {"query": save(tmp_path, "query", image), "support": save(tmp_path, "support", image),
             "label": save(tmp_path, "label", label)}
    if which == "grid":
        paths["label"] = save(tmp_path, "label", label[:, :, :-2])
    elif which == "shifted":
        shifted = SPACING.copy()
        shifted[:3, 3] = 4.0
        paths["label"] = save(tmp_path, "label", label, shifted)
    elif which == "empty":
        paths["label"] = save(tmp_path, "label", np.zeros_like(label))
    elif which == "2d":
        paths["query"] = save(tmp_path, "query", image[:, :, :1])
    elif which == "4d":
        paths["query"] = save(tmp_path, "query", np.stack([image, image], -1))
    return paths, {"grid": "label", "shifted": "label", "empty": "label", "2d": "query", "4d": "query"}[which]


@pytest.mark.parametrize("which", ["grid", "shifted", "empty", "2d", "4d"])
def test_bad_input_is_one_input_error_naming_the_file(tmp_path, which):
    paths, culprit = bad_input(tmp_path, which)
    with pytest.raises(InputError) as err:
        register_labels(paths["query"], paths["support"], paths["label"], CLASSES)
    assert err.value.where == str(paths[culprit]) and "\n" not in str(err.value)


def test_bad_classes_and_arrays_are_named():
    image, label = phantom()
    with pytest.raises(InputError, match="classes"):
        register_labels((image, SPACING), (image, SPACING), (label, SPACING), [0, 3])
    with pytest.raises(InputError) as err:
        register_labels((image[:, :, 0], SPACING), (image, SPACING), (label, SPACING), CLASSES)
    assert err.value.where == "<query>"
    with pytest.raises(InputError) as err:
        fuse((image, SPACING), [((image, SPACING), (label, SPACING)), ((image, SPACING), (label[1:], SPACING))],
             CLASSES)
    assert err.value.where == "<support label 2>"
