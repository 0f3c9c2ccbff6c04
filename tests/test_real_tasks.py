"""Real labelled volumes as a task source (issue #32 item 1): held-out values never sampled, all three axes, crops
by the fill's rule, cross-scan support from the warped variant, contrast variants, the flags."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from icl.data.real_augment import contrast_remap
from icl.data.real_tasks import make_real_task
from icl.data.real_volumes import load_real_volume, load_real_volumes
from icl.data.vocabulary import REAL_LEVELS
from icl.engine.train.loop import train
from icl.engine.train.prior_tasks import with_mask_prior, with_registered_prior
from icl.engine.train.real_tasks import GRID, fill_box, snapped, task_from_real
from icl.errors import InputError
from icl.options.train import parse_train_args
from icl.sparse.model_fill import ModelFill
from icl.sparse.prior import annotation_from_prompts
from real_fixtures import HELD_OUT, PAIRS, labelled_volume, real_pair  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def volumes(real_pair):  # noqa: F811
    image, label = real_pair
    return [load_real_volume(image, label, HELD_OUT, min_voxels=50, variants=4, seed=0)]


def test_reading_keeps_the_canonical_view_and_holds_out_values(volumes):
    vol = volumes[0]
    image, labels = labelled_volume()
    kept = sorted((set(PAIRS) | {v + 1000 for v in PAIRS}) - set(HELD_OUT))
    assert vol.values.tolist() == [0] + kept, "every kept structure, held-out values dropped"
    plain = vol.variants[0]
    assert plain.labels.shape == labels.shape
    original = vol.values[plain.labels]  # compact ids back to label values, in canonical order
    assert np.array_equal(original, np.where(np.isin(labels, HELD_OUT), 0, labels)), \
        "variant 0 is the scan itself (the file is LAS; canonical order undoes it), held-out voxels background"
    assert 0 <= plain.image.min() and plain.image.max() <= 1
    assert np.corrcoef(plain.image.ravel(), image.ravel())[0, 1] > 0.999


def test_held_out_values_are_never_sampled_and_all_axes_are(volumes):
    _, labels = labelled_volume()
    axes, levels_seen, compared = set(), set(), 0
    for level in REAL_LEVELS:
        for seed in range(25):
            task = make_real_task(volumes, seed, level, depth=8)
            assert not set(task["values"]) & set(HELD_OUT), "a held-out structure was a target"
            axes.add(task["axis"])
            levels_seen.add(task["level"])
            for f, (variant, z) in enumerate(task["sources"]):  # the scan itself: every target is its structure
                if variant == 0 and level != "real_cross":
                    plane = np.take(labels, z, axis=task["axis"])
                    for k, value in enumerate(task["values"]):
                        assert np.array_equal(task["targets"][k, f].astype(bool), plane == value)
                    compared += 1
    assert axes == {0, 1, 2}, "tasks run along all three canonical axes"
    assert levels_seen == set(REAL_LEVELS) and compared > 20


def test_the_same_seed_gives_the_same_task(volumes):
    a, b = (make_real_task(volumes, 7, "real_sparse", depth=8) for _ in range(2))
    assert np.array_equal(a["frames"], b["frames"]) and a["sources"] == b["sources"] and a["values"] == b["values"]


def test_crops_follow_the_sparse_fill_box_rule(volumes):
    checked = 0
    for seed in range(30):
        raw = make_real_task(volumes, seed, "real_sparse", depth=8)
        shape = raw["frames"].shape[1:]
        complete = raw["style"] == "complete"
        annotation = annotation_from_prompts(raw["prompts"], raw["frames"].shape, complete)
        fill = ModelFill(None, None, None, 0, crop=True).box(annotation, annotation.classes)
        assert fill_box(raw) == fill, "the fill's own box of this annotation"
        box = snapped(fill, shape)
        y0, y1, x0, x1 = box
        assert (y1 - y0) == (x1 - x0) or (y1 - y0) == shape[0] or (x1 - x0) == shape[1]
        assert abs((y0 + y1) - (fill[0] + fill[1])) <= GRID + 1 or y0 == 0 or y1 == shape[0]
        drawn = np.stack([m for per in raw["prompts"].values() for m in per.values()]).any(0)
        assert not drawn[:y0].any() and not drawn[y1:].any() and not drawn[:, :x0].any() and not drawn[:, x1:].any(), \
            "every drawn voxel is inside the crop"
        task = task_from_real(raw, volumes, 64)
        assert task.frames.shape == (len(raw["frames"]), 64, 64) and task.cropped
        assert task.targets.shape[-2:] == (64, 64) and set(task.targets.unique().tolist()) <= {0.0, 1.0}
        assert all(src.startswith(f"real:{volumes[0].key}:") and f":{y0}-{y1}-{x0}-{x1}" in src
                   for src, _ in task.sources)
        checked += 1
    assert checked == 30


def test_cross_support_comes_from_the_warped_twin_and_gets_a_misregistered_prior(volumes):
    for seed in range(10):
        raw = make_real_task(volumes, seed, "real_cross", depth=8)
        query, support = raw["variants"]
        assert query // 2 == support // 2 and query != support, "the same contrast group, the other view"
        assert {v.warped for v in (volumes[0].variants[query], volumes[0].variants[support])} == {True, False}
        n_support = len(raw["sources"]) - len(raw["scored"])
        assert all(v == support for v, _ in raw["sources"][:n_support])
        assert all(v == query for v, _ in raw["sources"][n_support:])
        task = task_from_real(raw, volumes, 48)
        moved = with_registered_prior(task, np.random.default_rng(seed))
        assert set(moved.priors) == set(range(len(task.targets))) and moved.cropped
        assert sorted(moved.priors[0]) == list(task.scored)


def test_a_cropped_task_gets_the_interpolation_prior_without_a_second_cut(volumes):
    for seed in range(40):
        raw = make_real_task(volumes, seed, "real_sparse", depth=8)
        task = task_from_real(raw, volumes, 48)
        with_prior = with_mask_prior(task, 48)
        assert with_prior.frames is task.frames, "frames left as cut"
        if with_prior.priors and any(with_prior.priors.values()):
            return
    pytest.fail("no sparse task got a prior")


def test_contrast_variants_change_tissue_contrast_and_keep_air_dark():
    image, _ = labelled_volume()
    x = image / image.max()
    body = x > 0.05
    rng = np.random.default_rng(0)
    inverted = contrast_remap(rng, x, "inverted")
    assert np.corrcoef(inverted[body], x[body])[0, 1] < -0.5, "T2-like: the order of tissues reversed"
    assert (inverted[~body] == x[~body]).all(), "air stays as it was"
    ct = contrast_remap(rng, x, "ct_window")
    assert ct[body].std() < x[body].std() * 3 and (0 <= ct).all() and (ct <= 1).all()


def test_flags_real_volumes_and_held_out(real_pair, tmp_path):  # noqa: F811
    image, label = real_pair
    base = ["-tasks", "0:real_sparse=1", "-checkpoint_path", str(tmp_path), "-pretrain", "none",
            "-config", "tiny_cpu", "-image_size", "64", "-dataset", "phantom", "-data_path", str(tmp_path / "p")]
    with pytest.raises(InputError) as err:
        parse_train_args(base)
    assert err.value.where == "-tasks" and "-real_volumes" in err.value.problem
    with pytest.raises(InputError) as err:
        parse_train_args(base + ["-real_volumes", f"{image}:{tmp_path}/missing.nii.gz"])
    assert err.value.where == "-real_volumes" and "missing.nii.gz" in err.value.problem
    with pytest.raises(InputError) as err:
        parse_train_args(base + ["-real_volumes", str(image)])
    assert err.value.where == "-real_volumes" and "IMAGE:LABEL" in err.value.problem
    for flag, value in (("-real_held_out", "1,x"), ("-real_held_out", "0"), ("-real_variants", "3")):
        with pytest.raises(InputError) as err:
            parse_train_args(base + ["-real_volumes", f"{image}:{label}", flag, value])
        assert err.value.where == flag
    cfg = parse_train_args(base + ["-real_volumes", f"{image}:{label}", "-real_held_out", "3, 1003"])
    assert cfg.real_held_out == "3,1003"
    with pytest.raises(InputError) as err:
        load_real_volumes(f"{image}:{label}", "3,1003", min_voxels=10**6, variants=2)
    assert str(label) in err.value.where and "no structure" in err.value.problem


def test_training_on_real_volumes_runs_and_reads_stored_crops(real_pair, tmp_path, capsys):  # noqa: F811
    """train_3d.py end to end on real levels with a frozen encoder: the validation tasks' crops, encoded at the
    first validation, are read at the second (the epoch line counts them)."""
    image, label = real_pair
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train(parse_train_args([
            "-exp_name", "real", "-config", "tiny_cpu", "-pretrain", "none", "-image_size", "64", "-out_size", "64",
            "-gpu_device", "-1", "-tasks", "0:real_sparse=1,real_cross=1,real_far=1", "-real_volumes",
            f"{image}:{label}", "-real_held_out", "3,1003", "-real_min_voxels", "50", "-real_variants", "2",
            "-real_depth", "6", "-freeze", "image_encoder", "-feature_cache", "auto", "-cache_dir", str(tmp_path / "c"),
            "-mask_prior", "0.5", "-mask_prior_gain", "10", "-mask_prior_res", "output", "-loss", "dice_bce",
            "-epochs", "3", "-steps_per_epoch", "2", "-val_freq", "1", "-val_samples", "2", "-count_flops", "False",
            "-checkpoint_path", str(tmp_path / "runs"), "-wandb_enabled", "False", "-dataset", "phantom",
            "-data_path", str(tmp_path / "unused")]))
    finally:
        torch.set_num_threads(threads)
    assert summary["step"] == 6 and (Path(summary["run_dir"]) / "last.pth").is_file()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("epoch 3/3")]
    read = float(lines[0].split("cache/crops_read ")[1].split(",")[0])
    assert read > 0, "the second validation read what the first stored"
    assert list((tmp_path / "c" / "real_features").rglob("inputs.npy"))
