"""The anatomy generator: seeded determinism, structure counts, label/image agreement, pair correspondence, contrast
range, and its tasks in the propagation rule's terms (both sparse annotation styles, tracking, cross-case)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from icl.data.anatomy import MAX_STRUCTURES, MIN_STRUCTURES, make_template, patient
from icl.data.anatomy_image import render, structure_means
from icl.data.vocabulary import ANATOMY_LEVELS
from icl.data.anatomy_tasks import (WEAK_CONTRAST, contiguous_in_z, make_anatomy_task, mean_intensity, slice_areas, touching_pairs)
from icl.engine.train.tasks import TaskMix, task_from_anatomy
from icl.engine.train.schedule import parse_schedule

SIZE, DEPTH = 64, 8  # small slabs keep the suite fast; the generator works at any size


def _case(seed: int, size: int = SIZE, depth: int = DEPTH, **kw):
    rng = np.random.default_rng(seed)
    template = make_template(rng, size, depth, **kw)
    labels = patient(rng, template, depth)
    return rng, template, labels


def test_same_seed_same_volume_other_seed_other_volume():
    _, t1, l1 = _case(3)
    _, t2, l2 = _case(3)
    assert np.array_equal(t1.labels, t2.labels) and np.array_equal(l1, l2) and t1.kinds == t2.kinds
    assert not np.array_equal(l1, _case(4)[2])
    a, b = make_anatomy_task(7, "anat_sparse"), make_anatomy_task(7, "anat_sparse")
    assert np.array_equal(a["frames"], b["frames"]) and np.array_equal(a["targets"], b["targets"])
    assert {k: sorted(p) for k, p in a["prompts"].items()} == {k: sorted(p) for k, p in b["prompts"].items()}
    assert not np.array_equal(a["frames"], make_anatomy_task(8, "anat_sparse")["frames"])


@pytest.mark.parametrize("seed", range(6))
def test_structure_count_in_range_every_id_present_and_a_rim(seed):
    _, template, _ = _case(seed)
    assert MIN_STRUCTURES <= template.num <= MAX_STRUCTURES
    assert set(np.unique(template.labels)) == set(range(template.num + 1))  # 0 = outside, then every id
    assert "rim" in template.kinds and template.kinds[0] == "background"


def test_requested_structure_counts_are_met_at_both_ends():
    for want in (MIN_STRUCTURES, MAX_STRUCTURES):
        template = make_template(np.random.default_rng(want), 128, 12, structures=want)
        assert abs(template.num - want) <= 1 and MIN_STRUCTURES <= template.num <= MAX_STRUCTURES


def test_the_kinds_real_anatomy_has_all_occur():
    kinds = set()
    for seed in range(4):
        kinds |= set(_case(seed, 128, 12)[1].kinds)
    assert {"rim", "region", "shell", "tube", "curve", "tiny", "blob"} <= kinds
    tiny = [_case(s, 128, 12) for s in range(3)]
    sizes = [np.sum(t.labels == i) / t.labels.shape[0]
             for _, t, _ in tiny for i, k in enumerate(t.kinds) if k == "tiny"]
    assert sizes and min(sizes) < 10  # a few voxels per slice


def test_image_agrees_with_labels():
    rng, template, labels = _case(11)
    clean, means = render(rng, labels, template.kinds, artefacts=False)
    measured = mean_intensity(clean, labels, template.num)
    big = np.flatnonzero(np.bincount(labels.ravel(), minlength=template.num + 1) >= 50)
    np.testing.assert_allclose(measured[big], means[big], atol=0.02)  # texture averages out inside a structure
    image, drawn = render(np.random.default_rng(1), labels, template.kinds)
    assert image.dtype == np.float32 and image.shape == labels.shape and 0 <= image.min() and image.max() <= 1
    rho = stats.spearmanr(drawn[big], mean_intensity(image, labels, template.num)[big]).statistic
    assert rho > 0.8  # bias field, noise, blur and gamma keep the order of the structures' intensities


def test_two_patients_of_a_template_are_the_same_anatomy():
    rng = np.random.default_rng(5)
    template = make_template(rng, 128, 12)
    identity = patient(np.random.default_rng(0), template, 12, strength=0.0)
    assert any(np.array_equal(identity, template.labels[o:o + 12]) for o in range(template.labels.shape[0] - 11))
    a, b = patient(rng, template, 12), patient(rng, template, 12)
    assert not np.array_equal(a, b)
    big = [i for i in range(1, template.num + 1) if (a == i).sum() > 300 and (b == i).sum() > 300]
    dice = lambda x, y: 2 * np.logical_and(x, y).sum() / (x.sum() + y.sum())  # noqa: E731
    same = np.mean([dice(a == i, b == i) for i in big])
    other = np.mean([dice(a == i, b == j) for i in big for j in big if j != i])
    assert same > 0.3 and other < 0.05 and same > 10 * other  # each id is the same structure in both
    mirrored = patient(np.random.default_rng(9), template, 12, mirror=True)
    assert np.array_equal(mirrored, patient(np.random.default_rng(9), template, 12)[:, :, ::-1])


def test_contrast_between_touching_structures_spans_none_to_strong():
    lowest, highest = [], []
    for seed in range(12):
        rng, template, labels = _case(seed)
        means = structure_means(rng, template.kinds)
        pairs = touching_pairs(labels)
        pairs = pairs[pairs.min(1) > 0]
        diff = np.abs(means[pairs[:, 0]] - means[pairs[:, 1]])
        lowest.append(diff.min())
        highest.append(diff.max())
    assert min(lowest) < 0.01 and np.median(lowest) < WEAK_CONTRAST  # neighbours of almost the same intensity
    assert max(highest) > 0.6  # and neighbours of strong contrast


def test_sparse_per_structure_prompts_each_structure_on_its_own_slices():
    task = make_anatomy_task(2, "anat_sparse", size=SIZE, depth=12, style="per_structure", every=3, k=3)
    assert task["direction"] == "both" and task["style"] == "per_structure" and task["every"] == 3
    for j, prompts in task["prompts"].items():
        zs = sorted(prompts)
        extent = np.flatnonzero(task["targets"][j].reshape(12, -1).any(1))
        assert extent[0] <= zs[0] < extent[0] + 3 and zs[-1] <= extent[-1] and np.all(np.diff(zs) == 3)
        for z, mask in prompts.items():
            assert np.array_equal(mask, task["targets"][j, z])
    annotated = {z for p in task["prompts"].values() for z in p}
    assert task["scored"] and not annotated & set(task["scored"])


def test_sparse_complete_slices_annotate_every_target_on_every_annotated_slice():
    for seed in range(6):
        task = make_anatomy_task(seed, "anat_sparse", size=SIZE, depth=12, style="complete", every=4)
        slices = [sorted(p) for p in task["prompts"].values()]
        assert all(s == slices[0] for s in slices) and np.all(np.diff(slices[0]) == 4)
        assert set(task["scored"]) == set(range(12)) - set(slices[0])
        empties = [(j, z) for j, p in task["prompts"].items() for z, m in p.items() if not m.any()]
        for j, z in empties:  # annotated without the structure: an empty mask, and the truth agrees
            assert not task["targets"][j, z].any()
        assert all(any(m.any() for m in p.values()) for p in task["prompts"].values())


@pytest.mark.parametrize("level", ["anat_adjacent", "anat_far"])
def test_tracking_tasks_go_forward_from_one_support_slice(level):
    task = task_from_anatomy(make_anatomy_task(4, level, size=SIZE, depth=12))
    assert task.kind == level and task.direction == "forward" and task.scored == list(range(1, len(task.frames)))
    assert all(list(p) == [0] and p[0].any() for p in task.prompts.values())
    assert task.targets.shape[:2] == (len(task.prompts), len(task.frames)) and task.targets.dtype == torch.float32


def test_cross_case_support_comes_from_the_other_patient():
    task = make_anatomy_task(6, "anat_cross", size=SIZE, depth=DEPTH, num_support=2)
    s = len(task["frames"]) - DEPTH
    assert s == 2 and task["scored"] == list(range(2, 2 + DEPTH)) and task["direction"] == "forward"
    assert not task["targets"][:, :s].any() and not task["distractors"][:, :s].any()
    assert all(sorted(p) == [0, 1] for p in task["prompts"].values())
    assert all(task["targets"][j, s:].any() for j in task["prompts"])  # each marked structure is in the query scan
    support_frames, query_frames = task["frames"][:s], task["frames"][s:]
    assert not any(np.array_equal(f, q) for f in support_frames for q in query_frames)


def test_first_target_often_has_a_look_alike_neighbour():
    hits = 0
    for seed in range(10):
        task = make_anatomy_task(seed, "anat_adjacent", size=SIZE, depth=DEPTH)
        assert len(task["distractors"]) >= 1  # its neighbours are what 'others' is scored against
        frames, target, near = task["frames"], task["targets"][0].astype(bool), task["distractors"][0].astype(bool)
        hits += abs(frames[target].mean() - frames[near].mean()) < 2 * WEAK_CONTRAST
    assert hits >= 4


def test_schedule_mixes_anatomy_with_look_alike_levels():
    schedule = parse_schedule("0:anat_sparse=1;2:anat_cross=1,adjacent=1")
    assert schedule[1] == (2, {"anat_cross": 1.0, "adjacent": 1.0})
    mix = TaskMix(schedule, length=4, image_size=SIZE, depth=6, k=3, seed=0, depths={"anat_cross": DEPTH})
    kinds = [mix[i].kind for i in range(4)]
    assert kinds[:2] == ["anat_sparse", "anat_sparse"] and set(kinds[2:]) <= {"anat_cross", "adjacent"}
    assert all(level in parse_schedule(f"0:{level}=1")[0][1] for level in ANATOMY_LEVELS)
    assert slice_areas(np.array([[[0, 1], [1, 2]]]), 2).tolist() == [[1, 2, 1]]


def test_sparse_targets_are_never_present_where_the_rule_stops_them():
    """Both ways, the rule ends a structure at an annotated slice without it; a sparse task's truth agrees: every
    slice showing a target lies between its bounding empty annotations (else those slices could not be learnt)."""
    for seed in range(12):
        task = make_anatomy_task(seed, "anat_sparse", size=SIZE, depth=12)
        for j, prompts in task["prompts"].items():
            drawn = [z for z, m in prompts.items() if m.any()]
            empty = [z for z, m in prompts.items() if not m.any()]
            start = max((z for z in empty if z < min(drawn)), default=-1)
            stop = min((z for z in empty if z > max(drawn)), default=12)
            shown = np.flatnonzero(task["targets"][j].reshape(12, -1).any(1))
            assert start < shown.min() and shown.max() < stop, (seed, j)
    assert contiguous_in_z(np.array([[0, 1, 1], [0, 0, 1], [0, 1, 1]])).tolist() == [False, False, True]


# ------------------------------------------------------------------------------------------------ the ablation's parts
def test_a_render_without_any_of_its_parts_is_the_label_map_in_grey_levels():
    from icl.data.vocabulary import RENDER_PARTS

    rng, template, labels = _case(12)
    image, means = render(rng, labels, template.kinds, drop=frozenset(RENDER_PARTS))
    for i in np.unique(labels):  # no texture, blur, bias, noise: one grey level per structure
        assert np.ptp(image[labels == i]) < 1e-5, i
    assert len(np.unique(means[1:].round(6))) == len(means) - 1  # no shared tissue classes: every mean its own
    full, _ = render(np.random.default_rng(12), labels, template.kinds)
    assert max(np.ptp(full[labels == i]) for i in np.unique(labels)) > 0.05


def test_generator_parts_are_left_out_by_name_and_seeded():
    from icl.data.vocabulary import GENERATOR_PARTS

    plain = make_template(np.random.default_rng(2), SIZE, DEPTH, extras=False)
    assert set(plain.kinds) <= {"background", "skin", "rim", "layer", "region"}  # no blobs, tubes, curves, tiny ones
    a = make_anatomy_task(4, "anat_sparse", size=SIZE, depth=DEPTH, drop={"texture", "extras"})
    b = make_anatomy_task(4, "anat_sparse", size=SIZE, depth=DEPTH, drop={"texture", "extras"})
    assert np.array_equal(a["frames"], b["frames"])
    assert not np.array_equal(a["frames"], make_anatomy_task(4, "anat_sparse", size=SIZE, depth=DEPTH)["frames"])
    assert "deformation" in GENERATOR_PARTS
    with pytest.raises(ValueError, match="unknown generator parts"):
        make_anatomy_task(4, "anat_sparse", drop={"colour"})
