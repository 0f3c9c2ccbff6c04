"""Training options added for in-context learning: -classes, -query_mode context, -time_limit_min."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from conftest_train import one_thread, train_argv, train_data  # noqa: F401  (fixtures)
from icl.options.train import parse_train_args
from icl.engine import distributed as dd
from icl.engine.clips import TrainClipDataset, build_loaders, context_window
from icl.engine.train.step import ICLStep
from icl.engine.train.loop import train
from icl.errors import InputError


def test_context_window_is_consecutive_covers_object_and_stays_inside():
    rng = np.random.default_rng(0)
    obj = np.arange(10, 14)
    starts = set()
    for _ in range(200):
        w = context_window(obj, 30, 8, rng)
        assert len(w) == 8 and np.all(np.diff(w) == 1) and w[0] >= 0 and w[-1] <= 29
        assert np.intersect1d(w, obj).size > 0, "every window holds part of the object"
        starts.add(int(w[0]))
    assert min(starts) <= 4 and max(starts) >= 12, "windows reach past both ends of the object"
    assert context_window(obj, 5, 8, rng).tolist() == [0, 1, 2, 3, 4], "short volumes give all slices"


def test_option_validation_names_the_flag(train_data, tmp_path):  # noqa: F811
    base = train_argv(train_data, tmp_path, "x")
    cfg = parse_train_args(base + ["-classes", " 1, 3 ", "-query_mode", "context", "-time_limit_min", "0.5"],
                           check_files=False)
    assert cfg.class_ids == [1, 3] and cfg.query_mode == "context" and cfg.time_limit_min == 0.5
    assert parse_train_args(base, check_files=False).class_ids is None
    bad = (("-classes", "a,b"), ("-classes", "0,1"), ("-query_mode", "full"), ("-time_limit_min", "-1"),
           ("-same_case_support", "1.5"), ("-classes_per_sample", "0"))
    for flag, value in bad:
        with pytest.raises(InputError) as err:
            parse_train_args(base + [flag, value], check_files=False)
        assert err.value.where == flag


def test_classes_and_context_mode_shape_the_training_samples(train_data, tmp_path):  # noqa: F811
    cfg = parse_train_args(train_argv(train_data, tmp_path, "x", "-classes", "2", "-query_mode", "context",
                                      "-video_length", "6"))
    train_loader, val_loader = build_loaders(cfg, dd.DistInfo())
    clips = train_loader.dataset.clips  # served to the loop as tasks (icl.engine.train.tasks.ClipTasks)
    assert isinstance(clips, TrainClipDataset)
    empty = 0
    for i in range(len(clips)):
        sample = clips[i]
        assert sample["class_id"] == 2
        idx = sample["slice_index"].numpy()
        assert len(idx) == 6 and np.all(np.diff(idx) == 1)
        assert sample["image"].shape[0] == 6 and sample["label"].shape == sample["image"].shape
        empty += int((sample["label"].flatten(1).amax(1) == 0).sum())
    assert all(task.class_ids == [2] for task in train_loader)
    assert all(task.class_ids == [2] for task in val_loader)
    assert empty > 0, "context clips of 6 slices reach slices without the class"


def test_time_limit_stops_after_the_crossing_step_and_still_saves(train_data, tmp_path, one_thread):  # noqa: F811
    cfg = parse_train_args(train_argv(train_data, tmp_path / "ck", "tl", "-epochs", "50", "-val_freq", "50",
                                      "-time_limit_min", "0.0001"))
    t0 = time.time()
    summary = train(cfg)
    assert summary["stopped_by_time_limit"] is True
    assert summary["epoch"] == 1 and summary["step"] == 1, "one step, then the cap is noticed"
    run = Path(summary["run_dir"])
    assert (run / "last.pth").is_file() and "last_val" in summary, "validated and saved before stopping"
    assert time.time() - t0 < 120


def test_same_case_support_and_several_classes_per_sample(train_data, tmp_path, one_thread):  # noqa: F811
    cfg = parse_train_args(train_argv(train_data, tmp_path, "x", "-support_instance", "none", "-query_mode", "context",
                                      "-video_length", "5", "-same_case_support", "1", "-classes_per_sample", "2"))
    train_loader, _ = build_loaders(cfg, dd.DistInfo())
    ds = train_loader.dataset.clips  # the clips, served as tasks
    s = ds[0]
    case = next(c for c in ds.cases if c.id == s["name"])
    ids = s["class_ids"].tolist()
    assert len(ids) == 2 and ids[0] == s["class_id"] and len(set(ids)) == 2
    sup = np.concatenate([np.asarray(case.slices_with(c))[[len(case.slices_with(c)) // 4, 3 * len(case.slices_with(c)) // 4]]
                          for c in ids])
    assert s["support_image"].shape[0] == 4 == s["support_labels"].shape[1]
    np.testing.assert_array_equal(s["support_image"].numpy(), case.image[sup]), "support from the query scan itself"
    for k, c in enumerate(ids):
        np.testing.assert_array_equal(s["labels"][k].numpy(), case.mask(c, s["slice_index"].numpy()))
        np.testing.assert_array_equal(s["support_labels"][k].numpy(), case.mask(c, sup))
    task = next(iter(train_loader))
    assert task.kind == "clips" and len(task.class_ids) == 2 and task.direction == "forward"
    assert task.targets.shape[:2] == (2, 4 + 5) and task.scored == list(range(4, 9))  # 4 support + 5 query frames
    assert all(sorted(p) == [0, 1, 2, 3] for p in task.prompts.values())
    from sam2_ext.build import build_icl_predictor

    out = ICLStep(build_icl_predictor("tiny_cpu", "cpu", image_size=64))(task)
    assert out["logits"].shape == (9, 2, 16, 16) and out["object_score_logits"].shape == (9, 2)
