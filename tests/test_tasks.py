"""Training tasks: the schedule, look-alike and clip tasks in the propagation rule's terms, determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from icl.data.lookalike import make_task
from icl.engine.train.schedule import CLIPS, parse_schedule
from icl.engine.train.tasks import ClipTasks, LookalikeSet, TaskMix, task_from_clip, task_from_lookalike
from icl.errors import InputError


def test_schedule_parse_and_errors():
    assert parse_schedule("0:adjacent=1;300:sparse=0.5,clips=0.5") == [
        (0, {"adjacent": 1.0}), (300, {"sparse": 0.5, "clips": 0.5})]
    assert parse_schedule("100:cross=1;0:2=1")[0] == (0, {"adjacent": 1.0})  # levels by number, sorted by step
    for bad in ("adjacent=1", "0:nope=1", "0:sparse=-1", "5:sparse=1", "0:sparse=0"):
        with pytest.raises(InputError) as err:
            parse_schedule(bad)
        assert err.value.where == "-tasks"


def test_task_mix_follows_the_schedule_and_repeats():
    schedule = parse_schedule("0:adjacent=1;3:sparse=1")
    mix = TaskMix(schedule, length=4, image_size=64, depth=8, k=3, seed=1)
    kinds = [mix[i].kind for i in range(4)]
    assert kinds == ["adjacent", "adjacent", "adjacent", "sparse"]  # sample i of epoch 1 is step i
    again = TaskMix(schedule, length=4, image_size=64, depth=8, k=3, seed=1)
    assert torch.equal(mix[2].frames, again[2].frames) and torch.equal(mix[2].targets, again[2].targets)
    mix.set_epoch(2)
    assert all(mix[i].kind == "sparse" for i in range(4)) and not torch.equal(mix[2].frames, again[2].frames)
    two_ranks = TaskMix(schedule, length=4, image_size=64, depth=8, k=3, seed=1, world_size=2)
    assert len(two_ranks) == 8 and [two_ranks[i].kind for i in (5, 6, 7)] == ["adjacent", "sparse", "sparse"]
    with pytest.raises(InputError, match="clips"):
        TaskMix(parse_schedule("0:clips=1"), 4, 64, 8, 3)


def test_sparse_task_is_tracked_both_ways_with_every_marked_look_alike():
    raw = make_task(3, "sparse", size=64, depth=12, k=3, every=4)
    task = task_from_lookalike(raw)
    support = raw["support_slices"]
    assert task.direction == "both" and task.kind == "sparse"
    assert task.scored == [z for z in range(12) if z not in support]
    assert task.targets.shape == (len(task.prompts), 12, 64, 64)
    # object 0 is the target, marked on every support slice; every other prompted object is marked where it appears
    assert sorted(task.prompts[0]) == support
    np.testing.assert_array_equal(task.targets[0].numpy(), raw["masks"][raw["target"]])
    for k, prompts in task.prompts.items():
        for z, mask in prompts.items():
            assert torch.equal(mask, task.targets[k, z])
    assert len(task.prompts) + len(task.distractors) == 3
    target_only = task_from_lookalike(raw, objects="target")
    assert len(target_only.prompts) == 1 and len(target_only.distractors) == 2


def test_cross_and_adjacent_tasks_are_forward_videos():
    raw = make_task(5, "cross", size=64, depth=10, k=3, num_support=2)
    task = task_from_lookalike(raw)
    assert task.direction == "forward" and sorted(task.prompts[0]) == [0, 1] and task.scored == list(range(2, 12))
    np.testing.assert_array_equal(task.frames[2:].numpy(), raw["volume"])
    assert task.targets[0, :2].sum() == 0 and task.distractors.shape[0] == 2
    adj = task_from_lookalike(make_task(5, "adjacent", size=64, depth=10, k=3))
    assert adj.direction == "forward" and list(adj.prompts[0]) == [0] and adj.scored == list(range(1, len(adj.frames)))


def test_clip_sample_becomes_a_forward_task():
    g = torch.Generator().manual_seed(0)
    sample = {"image": torch.rand(5, 32, 32, generator=g), "label": (torch.rand(5, 32, 32, generator=g) > .5).float(),
              "support_image": torch.rand(2, 32, 32, generator=g),
              "support_label": (torch.rand(2, 32, 32, generator=g) > .5).float(), "class_id": 4, "name": "case_1"}
    task = task_from_clip(sample)
    assert task.kind == CLIPS and task.class_ids == [4] and task.name == "case_1" and task.direction == "forward"
    assert task.scored == [2, 3, 4, 5, 6] and sorted(task.prompts[0]) == [0, 1]
    assert torch.equal(task.frames[2:], sample["image"]) and torch.equal(task.targets[0, 2:], sample["label"])
    assert ClipTasks([sample])[0].class_ids == [4]


def test_validation_set_is_fixed_and_disjoint_from_training_seeds():
    val = LookalikeSet(["sparse", "cross"], per_level=2, image_size=64, depth=8, k=3)
    assert len(val) == 4 and [val[i].kind for i in range(4)] == ["sparse", "sparse", "cross", "cross"]
    assert torch.equal(val[1].frames, LookalikeSet(["sparse"], 2, 64, 8, 3)[1].frames)



def test_training_never_draws_a_validation_seed(monkeypatch):
    """The seeds make_task is called with: training's (over epochs, indices, run seeds) and validation's."""
    import icl.engine.train.tasks as tasks

    seen: list[int] = []

    class Drawn(Exception):
        pass

    def spy(seed, *args, **kwargs):
        seen.append(int(seed))
        raise Drawn  # the seed is all this test needs: no volume is generated

    monkeypatch.setattr(tasks, "make_task", spy)
    for run_seed in (0, 1, 2**31 - 1):
        mix = TaskMix(parse_schedule("0:sparse=1"), length=50, image_size=32, depth=6, k=3, seed=run_seed)
        for epoch in (1, 7):
            mix.set_epoch(epoch)
            for i in range(50):
                with pytest.raises(Drawn):
                    mix[i]
    training, seen[:] = set(seen), []
    val = LookalikeSet(["sparse", "cross"], per_level=25, image_size=32, depth=6, k=3)
    for i in range(len(val)):
        with pytest.raises(Drawn):
            val[i]
    assert len(training) == 300 and len(set(seen)) == 25  # each level uses the same 25 validation seeds
    assert not training & set(seen) and max(training) < min(seen)
