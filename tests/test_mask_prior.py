"""Mask priors: the classic interpolation as SAM2's dense mask prompt on tracked slices — in the propagation rule
(sam2_ext.priors), in training tasks (icl.engine.train.loop.prior_tasks) and in the sparse fill (icl.sparse.prior)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_fixtures import tiny_predictor, toy_slices  # noqa: F401 (fixture)
from icl.engine.train.prior_tasks import CROSS, PriorTasks, misregistered, with_mask_prior
from icl.engine.train.tasks import Task, level_task
from icl.sparse.annotation import Annotation
from icl.sparse.classic import ClassicFill, place
from icl.sparse.prior import annotation_from_prompts, classic_priors
from sam2_ext.track import track


def _run(predictor, images, prompts, priors=None, direction="forward"):
    return {r.index: r.logits.clone() for r in track(predictor, images, prompts, direction, priors=priors)}


# ---------------------------------------------------------------------------------------------- propagation rule
def test_a_prior_changes_its_slice_and_later_ones_never_earlier_or_prompted(tiny_predictor):
    images, masks = toy_slices(6)
    prompts = {1: {1: masks[1]}}
    plain = _run(tiny_predictor, images, prompts)
    assert all(torch.equal(a, b) for a, b in zip(plain.values(), _run(tiny_predictor, images, prompts, {}).values()))
    prior = torch.zeros(64, 64)
    prior[40:60, 40:60] = 1  # a wrong hint on slice 3, and one on the prompted slice 1 (ignored there)
    got = _run(tiny_predictor, images, prompts, {1: {3: prior, 1: prior}})
    for z in (0, 1, 2):
        assert torch.equal(got[z], plain[z]), z
    assert float((got[3] - plain[3]).abs().max()) > 1e-3
    # the decoder ran (memory + prompt), SAM2's mask-as-output shortcut (constant +-10 logits) did not
    assert got[3].unique().numel() > 2
    assert tiny_predictor.use_mask_input_as_output_without_sam  # restored after the prior step


def test_with_a_gain_the_prior_is_also_a_residual_of_the_logits(tiny_predictor):
    from sam2_ext.priors import prior_input

    images, masks = toy_slices(4)
    prompts, priors = {1: {0: masks[0]}}, {1: {2: masks[2]}}
    plain = _run(tiny_predictor, images, prompts, priors)
    tiny_predictor.prior_gain = 10.0
    try:
        got = _run(tiny_predictor, images, prompts, priors)
    finally:
        tiny_predictor.prior_gain = 0.0
    low = got[2].shape[-1]
    residual = 10.0 * (2 * prior_input(masks[2], low, "cpu")[0, 0] - 1)
    torch.testing.assert_close(got[2][0] - plain[2][0], residual, atol=1e-4, rtol=0)
    assert torch.equal(got[1], plain[1])  # slices before the prior: untouched


def test_the_residual_can_be_read_at_the_outputs_resolution():
    """residual_at_output: the mask-grid residual out, the prior at the output's resolution in, gated stays gated."""
    from sam2.modeling.sam2_base import NO_OBJ_SCORE

    from sam2_ext.priors import prior_input, residual_at_output
    from sam2_ext.track import to_size

    gen = torch.Generator().manual_seed(0)
    decoder = torch.randn(2, 8, 8, generator=gen)
    fine = torch.zeros(2, 32, 32)
    fine[:, 5:19, 9:23] = 1  # edges off the 8 x 8 grid's cell borders
    coarse = prior_input(fine[0], 8, "cpu")[0, 0]
    logits = decoder + 10 * (2 * coarse - 1)
    logits[1] = NO_OBJ_SCORE  # SAM2 called the second object absent
    got = residual_at_output(logits, coarse, fine, 10.0)
    torch.testing.assert_close(got[0], to_size(decoder[0], (32, 32)) + 10 * (2 * fine[0] - 1), atol=1e-4, rtol=0)
    assert torch.equal(got[1], torch.full((32, 32), NO_OBJ_SCORE))
    # where the decoder is unsure the result is the prior itself, edges at its own resolution
    assert torch.equal(residual_at_output(10 * (2 * coarse - 1), coarse, fine[0], 10.0) > 0, fine[0] > 0)
    with pytest.raises(ValueError, match="not at the logits' size"):
        residual_at_output(logits, fine[0], fine, 10.0)  # the prior the decoder read is on its grid, not finer


def test_the_loss_and_the_fill_read_the_prior_at_their_own_resolution(tiny_predictor):
    """-mask_prior_res output: the training loss swaps the residual at the target's size, the sparse fill at the
    scan's, both through residual_at_output: one rule."""
    from icl.engine.train.losses import TaskLoss
    from icl.sparse.model_fill import ModelFill
    from icl.sparse.prior import classic_prior
    from sam2_ext.priors import prior_input, residual_at_output
    from sam2_ext.track import SliceResult

    task = _sparse_task_with_priors()[1]
    k, per = next((k, per) for k, per in task.priors.items() if per)
    z = next(iter(per))
    low = torch.randn(4, 3, 16, 16)
    loss = TaskLoss("dice_bce", 64, prior_gain=10.0)
    want = residual_at_output(low[0], prior_input(per[z], 16, "cpu")[0, 0], per[z], 10.0)
    torch.testing.assert_close(loss._sized(low[0], task, z, k, (64, 64)), want)
    assert loss._sized(low[0], task, z, k + 5, (64, 64)).shape == (3, 64, 64)  # no prior there: resized only
    assert not torch.equal(TaskLoss("dice_bce", 64)._sized(low[0], task, z, k, (64, 64)), want)  # gain 0: off

    annotation, _ = _tube_annotation(step=4)
    box = (0, 40, 0, 40)
    priors = classic_priors(annotation, [3], box, 16)
    z = next(iter(priors[3]))
    result = SliceResult(z, 10 * (2 * priors[3][z][None] - 1), torch.ones(1), torch.ones(1))
    runner = ModelFill(tiny_predictor, None, None, 0, priors=True)
    tiny_predictor.prior_gain = 10.0
    try:
        fill = ClassicFill(annotation, "interpolation")
        got = runner.sized(result, [3], priors, lambda c, z: classic_prior(fill, c, z, box), box, (40, 40))
        coarse = runner.sized(result, [3], priors, None, box, (40, 40))  # the mask-grid residual, resized
    finally:
        tiny_predictor.prior_gain = 0.0
    exact = classic_prior(fill, 3, z, box)
    np.testing.assert_array_equal(got[3] > 0, exact)  # the decoder added nothing: the prior at the scan's detail
    assert not np.array_equal(coarse[3] > 0, exact)


def test_objects_with_and_without_a_prior_on_one_slice(tiny_predictor):
    """Two classes on one slice, only one with a prior there: the other gets exactly its plain result."""
    images, masks = toy_slices(5)
    other = torch.zeros_like(masks)
    other[:, 2:14, 2:14] = 1
    prompts = {1: {0: masks[0]}, 2: {0: other[0]}}
    plain = _run(tiny_predictor, images, prompts)
    got = _run(tiny_predictor, images, prompts, {1: {2: masks[2] * 0}})
    assert torch.allclose(got[2][1], plain[2][1], atol=1e-6)  # class 2: batched alone instead of with class 1
    assert float((got[2][0] - plain[2][0]).abs().max()) > 1e-3


def test_the_tracked_logits_depend_differentiably_on_the_prior(tiny_predictor):
    """In grad mode the decoder reads the prior (what training learns from), and the tracked slice's loss reaches
    it through the prompt encoder."""
    images, masks = toy_slices(4)
    prior = masks[2].clone().requires_grad_(True)
    results = list(track(tiny_predictor.train(), images, {1: {0: masks[0]}}, "forward", grad=True,
                         priors={1: {2: prior}}))
    results[2].logits.float().sigmoid().mean().backward()
    assert prior.grad is not None and float(prior.grad.abs().sum()) > 0


# ---------------------------------------------------------------------------------------------- the sparse fill
def _tube_annotation(step: int = 4) -> tuple[Annotation, np.ndarray]:
    depth = 20
    yy, xx = np.mgrid[:40, :40]
    label = np.zeros((depth, 40, 40), np.int32)
    for z in range(depth):
        label[z][(yy - 20) ** 2 + (xx - 12 - z // 2) ** 2 <= (4 + z // 4) ** 2] = 3
    sparse = np.zeros_like(label)
    for z in range(2, depth, step):
        sparse[z][label[z] == 3] = 3
    return Annotation.from_label(sparse, 0, [3]), label


def test_classic_priors_are_the_classic_fill_on_the_slices_to_track():
    annotation, _ = _tube_annotation()
    priors = classic_priors(annotation, [3])
    lo, hi = annotation.extent(3)
    assert sorted(priors[3]) == [z for z in range(lo, hi + 1) if z not in annotation.slices[3]]
    fill = ClassicFill(annotation, "interpolation")
    for z, mask in priors[3].items():
        np.testing.assert_array_equal(mask, place(fill.score(3, z), annotation.in_plane_shape))
    box = (5, 37, 2, 34)
    cut = classic_priors(annotation, [3], box)
    z = next(iter(cut[3]))
    np.testing.assert_array_equal(cut[3][z], priors[3][z][5:37, 2:34])
    low = classic_priors(annotation, [3], box, size=16)[3][z]  # as the model's mask input
    assert low.shape == (16, 16) and low.dtype == torch.float32 and 0 <= float(low.min()) <= float(low.max()) <= 1
    assert abs(float(low.mean()) - cut[3][z].mean()) < 0.05


def test_annotation_from_prompts_reads_both_styles():
    drawn = np.zeros((8, 8), np.uint8)
    drawn[2:5, 2:5] = 1
    per_structure = annotation_from_prompts({0: {1: drawn, 5: drawn}}, (7, 8, 8), complete=False)
    assert per_structure.slices == {1: [1, 5]} and per_structure.style == "per_structure"
    complete = annotation_from_prompts({0: {1: drawn, 5: drawn, 6: drawn * 0}, 1: {3: drawn}}, (7, 8, 8), True)
    assert complete.slices == {1: [1, 5], 2: [3]} and complete.absent[1] == [6]
    assert complete.extent(1)[1] == 5  # ends where annotated without it
    np.testing.assert_array_equal(complete.mask(2, 3), drawn.astype(bool))


# ---------------------------------------------------------------------------------------------- training tasks
def _sparse_task_with_priors() -> tuple[Task, Task]:
    for seed in range(40):
        task = level_task("anat_sparse", seed, 64, 12, 2)
        prior = with_mask_prior(task, 64)
        if prior.priors and any(prior.priors.values()):
            return task, prior
    raise AssertionError("no anat_sparse task with two annotated slices of a target in 40 seeds")


def test_a_prior_task_is_the_task_cut_like_the_fill_with_its_interpolation():
    task, prior = _sparse_task_with_priors()
    assert prior.frames.shape == task.frames.shape and prior.scored == task.scored
    assert float(prior.frames.min()) >= 0 and float(prior.frames.max()) <= 1
    for k, per in prior.prompts.items():
        assert sorted(per) == sorted(task.prompts[k])
        for z, mask in per.items():  # prompts and truth were cut the same way
            assert torch.equal(mask, prior.targets[k, z]) or not task.prompts[k][z].any()
    annotation = annotation_from_prompts({k: {z: m.numpy() for z, m in p.items()} for k, p in prior.prompts.items()},
                                         tuple(prior.frames.shape), complete=task.prompts != {} and any(
                                             not bool(m.any()) for p in task.prompts.values() for m in p.values()))
    expected = classic_priors(annotation, annotation.classes)
    assert {c - 1 for c in expected} == set(prior.priors)
    for c, per in expected.items():
        assert sorted(per) == sorted(prior.priors[c - 1])
        for z, mask in per.items():
            assert z not in prior.prompts[c - 1] or not prior.prompts[c - 1][z].any()
            np.testing.assert_array_equal(prior.priors[c - 1][z].numpy(), mask)


def test_prior_tasks_touch_both_ways_tasks_only_seeded():
    class Fixed(torch.utils.data.Dataset):
        def __init__(self):
            self.tasks = [_sparse_task_with_priors()[0], level_task("anat_adjacent", 1, 64, 12, 2)]

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return self.tasks[i]

    none, every = PriorTasks(Fixed(), 0.0, 64), PriorTasks(Fixed(), 1.0, 64)
    assert none[0].priors is None and every[0].priors and every[1].priors is None
    assert every[1] is every.tasks[1]  # a forward task is left as it is
    half = PriorTasks(Fixed(), 0.5, 64, seed=3)
    picks = []
    for epoch in range(1, 13):
        half.set_epoch(epoch)
        picks.append(half[0].priors is not None)
        assert (half[0].priors is not None) == picks[-1]  # the same epoch and index: the same choice
    assert 0 < sum(picks) < len(picks)


def test_a_misregistered_prior_is_near_the_truth_but_not_it_and_keeps_each_slice():
    """The cross-scan road's prior in training: the truth moved by a few pixels in plane, never across slices."""
    masks = torch.zeros(2, 5, 64, 64)
    masks[0, 1:4, 20:40, 20:40] = 1
    masks[1, 2, 45:60, 10:30] = 1
    moved = misregistered(masks, np.random.default_rng(0))
    assert moved.shape == masks.shape and set(moved.unique().tolist()) <= {0.0, 1.0}
    for k in range(2):
        inter = float((moved[k] * masks[k]).sum())
        dice = 2 * inter / float(moved[k].sum() + masks[k].sum())
        assert 0.5 < dice < 0.99, (k, dice)
    assert not moved[:, [0, 4]].any() and not moved[1, [1, 3]].any()  # a slice without the structure stays empty
    assert torch.equal(moved, misregistered(masks, np.random.default_rng(0)))


def test_cross_scan_tasks_get_the_misregistered_truth_on_query_slices_only():
    task = level_task(CROSS, 4, 64, 8, 2)
    with_prior = PriorTasks([task], 1.0, 64)[0]
    assert PriorTasks([task], 0.0, 64)[0].priors is None
    support = set(range(min(task.scored)))
    assert support and set(next(iter(task.prompts.values()))) == support
    for k, per in with_prior.priors.items():
        assert sorted(per) == task.scored  # every query slice, no support slice
        truth = task.targets[k, task.scored]
        prior = torch.stack([per[z] for z in task.scored])
        assert not torch.equal(prior, truth) and float((prior * truth).sum()) > 0


# ---------------------------------------------------------------------------------------------- through the API
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from segment_fixtures import make_segment_data

    return make_segment_data(tmp_path_factory.mktemp("prior"), seed=5)


@pytest.fixture()
def prior_weights(data, tmp_path):
    payload = torch.load(data["ckpt"], map_location="cpu", weights_only=True)
    payload["config"] = {"config": "tiny_cpu", "mask_prior": 0.8}
    path = tmp_path / "prior.pt"
    torch.save(payload, path)
    return path


@pytest.fixture
def priors_seen(monkeypatch) -> list:
    """The priors the sparse fill hands the model, one entry per run of the propagation rule."""
    import icl.sparse.model_fill

    seen, real = [], icl.sparse.model_fill.track

    def spy(*args, **kwargs):
        seen.append(kwargs.get("priors"))
        return real(*args, **kwargs)

    monkeypatch.setattr(icl.sparse.model_fill, "track", spy)  # where the fill looks it up
    return seen


def test_weights_trained_with_a_prior_fill_with_it_in_a_crop(data, prior_weights, priors_seen):
    from icl.api import ICLSegmenter
    from segment_fixtures import IMAGE_SIZE
    from test_sparse import _sparse_file

    seen = priors_seen
    sparse = data["root"] / "prior_sparse.nii.gz"
    _sparse_file(data, sparse, step=3)
    seg = ICLSegmenter(checkpoint=prior_weights, image_size=IMAGE_SIZE, support_slices="labelled", fill="model")
    assert seg.mask_prior and seg.crop
    result = seg.segment(data["s"], data["s"], sparse)
    assert seen and all(p for p in seen)  # the self-check's runs and the fill: every one with its priors
    structure = result.classes[0]
    assert any(len(p.get(structure, {})) > 0 for p in seen)
    low = seg.predictor.sam_prompt_encoder.mask_input_size
    assert all(tuple(m.shape) == tuple(low) for p in seen for per in p.values() for m in per.values())
    assert not ICLSegmenter(checkpoint=prior_weights, image_size=IMAGE_SIZE, support_slices="labelled",
                            crop="off").crop
    plain = ICLSegmenter(checkpoint=data["ckpt"], config="tiny_cpu", image_size=IMAGE_SIZE, support_slices="labelled")
    assert not plain.mask_prior and not plain.crop  # weights without the prior: whole slices, no prior


def test_prior_none_runs_the_learned_part_alone(data, prior_weights, priors_seen):
    """``--prior none`` (API ``prior="none"``): the same weights, in the boxes they were trained in, with no classic
    prior handed to the model — what the learned part does alone (#24 item 6)."""
    from icl.api import ICLSegmenter
    from icl.errors import InputError
    from segment_fixtures import IMAGE_SIZE
    from test_sparse import _sparse_file

    seen = priors_seen
    sparse = data["root"] / "prior_none_sparse.nii.gz"
    _sparse_file(data, sparse, step=3)
    seg = ICLSegmenter(checkpoint=prior_weights, image_size=IMAGE_SIZE, support_slices="labelled", fill="model",
                       prior="none")
    assert not seg.mask_prior and seg.crop  # no prior, the trained boxes kept
    seg.segment(data["s"], data["s"], sparse)
    assert seen and not any(seen)  # every run of the model: no priors
    with pytest.raises(InputError, match="--prior: expected one of auto, none"):
        ICLSegmenter(checkpoint=prior_weights, image_size=IMAGE_SIZE, prior="sometimes")


def test_the_api_reads_where_the_weights_read_their_residual(data, tmp_path):
    from icl.api import ICLSegmenter
    from segment_fixtures import IMAGE_SIZE

    payload = torch.load(data["ckpt"], map_location="cpu", weights_only=True)
    payload["config"] = {"config": "tiny_cpu", "mask_prior": 0.8, "mask_prior_gain": 10.0, "mask_prior_res": "output"}
    torch.save(payload, tmp_path / "output.pt")
    seg = ICLSegmenter(checkpoint=tmp_path / "output.pt", image_size=IMAGE_SIZE, support_slices="labelled")
    assert (seg.predictor.prior_gain, seg.predictor.prior_resolution) == (10.0, "output")
    plain = ICLSegmenter(checkpoint=data["ckpt"], config="tiny_cpu", image_size=IMAGE_SIZE, support_slices="labelled")
    assert (plain.predictor.prior_gain, plain.predictor.prior_resolution) == (0.0, "grid")


# ---------------------------------------------------------------------------------------------- test-time adaptation
def test_adaptation_trains_between_annotated_slices_and_restores_the_weights(tiny_predictor):
    from icl.sparse.adapt import adapt, adaptation_triples
    from icl.sparse.model_fill import ModelFill

    annotation, _ = _tube_annotation(step=3)
    assert adaptation_triples(annotation, [3])[0] == (3, 2, 5, 8)
    images = torch.from_numpy(np.stack([np.where(annotation.label_zhw[z] > 0, 0.8, 0.2) for z in range(20)]))
    images = images.float()
    from sam2_ext.predictor import prepare_frames

    source = [prepare_frames(images[z][None], tiny_predictor.image_size)[0] for z in range(len(images))]
    runner = ModelFill(tiny_predictor, None, None, 0, priors=True, adapt_steps=2)
    prompts = runner.prompts(annotation, [3], (0, 40, 0, 40))
    before = {k: v.clone() for k, v in tiny_predictor.state_dict().items()}
    assert adapt(tiny_predictor, source, annotation, prompts, (0, 40, 0, 40), 2, priors=True) == 2
    changed = [k for k, v in tiny_predictor.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and not tiny_predictor.training  # it trained, and is back in eval mode
    tiny_predictor.load_state_dict(before)
    one_slice = Annotation(annotation.label_zhw, [3], "per_structure", {3: [2]})
    assert adapt(tiny_predictor, source, one_slice, prompts, (0, 40, 0, 40), 2, priors=True) == 0  # nothing to learn


def test_the_fill_restores_the_weights_after_adapting(data, prior_weights):
    from icl.api import ICLSegmenter
    from segment_fixtures import IMAGE_SIZE
    from test_sparse import _sparse_file

    sparse = data["root"] / "adapt_sparse.nii.gz"
    _sparse_file(data, sparse, step=2)
    seg = ICLSegmenter(checkpoint=prior_weights, image_size=IMAGE_SIZE, support_slices="labelled", fill="model",
                       adapt_steps=1)
    before = {k: v.clone() for k, v in seg.predictor.state_dict().items()}
    first = seg.segment(data["s"], data["s"], sparse).labels
    assert all(torch.equal(v, before[k]) for k, v in seg.predictor.state_dict().items())
    np.testing.assert_array_equal(first, seg.segment(data["s"], data["s"], sparse).labels)  # seeded: the same
