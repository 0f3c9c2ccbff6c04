"""The one propagation rule (sam2_ext.track): per-class bounds, both directions, classes batched, official equality."""
from __future__ import annotations

import functools

import pytest
import sam2.sam2_video_predictor as svp
import sam2_ext.track
import torch
from sam2.modeling.sam2_base import NO_OBJ_SCORE

from engine_fixtures import make_tiny_predictor, tiny_predictor, toy_slices  # noqa: F401 (fixture)
from sam2_ext.predictor import prepare_frames
from sam2_ext.selector import MemorySelector
from sam2_ext.track import to_size, track

DEPTH = 9
BATCHED_TOLERANCE = 2e-7  # README: batched classes vs the official predictor one class at a time


def _three_classes():
    """Images [9, 64, 64] and prompts of three classes with different first/last slices (and prompt counts)."""
    images, disc = toy_slices(DEPTH)
    box = torch.zeros_like(disc)
    box[:, 5:20, 35:60] = 1
    ring = torch.zeros_like(disc)
    ring[:, 40:60, 5:25] = 1
    prompts = {4: {1: disc[1], 5: disc[5]}, 7: {3: box[3]}, 2: {0: ring[0], 6: ring[6], 8: ring[8] * 0}}
    return images, prompts


def _official_one_class(monkeypatch, weights, images, per_slice, direction):
    """The official SAM2VideoPredictor prompted with one class alone: {slice: video-res logits [H, W]}."""
    official = make_tiny_predictor(predictor_cls=svp.SAM2VideoPredictor)
    official.load_state_dict(weights)
    h, w = images.shape[-2:]
    monkeypatch.setattr(svp, "load_video_frames", lambda **kw: (prepare_frames(images, official.image_size), h, w))
    state = official.init_state("unused-video-path")
    slices = sorted(z for z, m in per_slice.items() if m.any())
    for z in slices:
        official.add_new_mask(state, z, 1, per_slice[z] > 0.5)
    forward = {f: m[0, 0] for f, _, m in official.propagate_in_video(state, start_frame_idx=slices[0])}
    if direction == "forward":
        return forward
    state["output_dict_per_obj"][0]["non_cond_frame_outputs"].clear()
    reverse = {f: m[0, 0] for f, _, m in official.propagate_in_video(state, start_frame_idx=slices[-1], reverse=True)}
    return {f: torch.stack([p[f] for p in (forward, reverse) if f in p]).mean(0) for f in range(len(images))}


@pytest.mark.parametrize("direction", ["forward", "both"])
def test_three_classes_batched_equal_official_per_class(tiny_predictor, monkeypatch, direction):
    images, prompts = _three_classes()
    results = {r.index: r for r in track(tiny_predictor, images, prompts, direction)}
    assert sorted(results) == list(range(DEPTH))
    weights = tiny_predictor.state_dict()
    worst = 0.0
    for col, (cid, per_slice) in enumerate(prompts.items()):
        ref = _official_one_class(monkeypatch, weights, images, per_slice, direction)
        first = min(z for z, m in per_slice.items() if m.any())
        last = max(z for z, m in per_slice.items() if m.any())
        annotated_absent = [z for z, m in per_slice.items() if not m.any() and z > last]
        for f in range(DEPTH):
            ours = to_size(results[f].logits[col], images.shape[-2:])
            if direction == "both" and annotated_absent and f >= min(annotated_absent):
                # both ways, a slice annotated without the class ends it (forward: empty masks are ignored)
                assert (results[f].logits[col] == NO_OBJ_SCORE).all() and results[f].iou_pred[col] == 0
            elif f in ref:
                worst = max(worst, (ours - ref[f]).abs().max().item())
                assert (ref[f] > NO_OBJ_SCORE).all()
            else:  # forward only: before the class's first prompt it is absent, as SAM2 never visits it alone
                assert direction == "forward" and f < first and (results[f].logits[col] == NO_OBJ_SCORE).all()
                assert results[f].object_score_logits[col] == NO_OBJ_SCORE and results[f].iou_pred[col] == 0
    print(f"max |logit difference| batched vs official per class ({direction}): {worst:.3g}")
    assert worst <= BATCHED_TOLERANCE  # the README's claim (8.2e-8 measured on CPU)


@pytest.mark.parametrize("direction", ["forward", "both"])
def test_one_class_alone_equals_official(tiny_predictor, monkeypatch, direction):
    """One class alone is the official predictor's computation: exactly equal forward; both ways the mean of the
    two passes is taken at low resolution (the official example at video resolution), a float rounding apart."""
    images, prompts = _three_classes()
    weights = tiny_predictor.state_dict()
    for cid in (4, 7):  # the classes without a slice annotated absent
        ours = {r.index: to_size(r.logits[0], images.shape[-2:])
                for r in track(tiny_predictor, images, {cid: prompts[cid]}, direction)}
        ref = _official_one_class(monkeypatch, weights, images, prompts[cid], direction)
        worst = max((ours[f] - ref[f]).abs().max().item() for f in ref)
        assert worst == 0.0 if direction == "forward" else worst <= BATCHED_TOLERANCE, (cid, worst)


def test_a_slice_annotated_without_the_class_bounds_it_both_ways(tiny_predictor, monkeypatch):
    """Both ways, empty masks outside a class's prompts end it there (and beyond); inside, nothing changes."""
    images, disc = toy_slices(DEPTH)
    plain = {r.index: r.logits[0] for r in track(tiny_predictor, images, {1: {3: disc[3], 5: disc[5]}}, "both")}
    empty = torch.zeros_like(disc[0])
    tracked_frames = []
    real_track_objects = tiny_predictor._track_objects

    def spy(state, active, frame_idx, reverse):
        tracked_frames.append(frame_idx)
        return real_track_objects(state, active, frame_idx, reverse)

    monkeypatch.setattr(tiny_predictor, "_track_objects", spy)
    bounded = {r.index: r.logits[0] for r in track(tiny_predictor, images,
                                                  {1: {1: empty, 3: disc[3], 4: empty, 5: disc[5], 7: empty}}, "both")}
    assert not {0, 1, 7, 8} & set(tracked_frames), tracked_frames  # not tracked there at all, not just hidden
    assert all((plain[f] > NO_OBJ_SCORE).all() for f in range(DEPTH))
    for f in (0, 1, 7, 8):
        assert (bounded[f] == NO_OBJ_SCORE).all(), f
    for f in (2, 3, 4, 5, 6):  # an empty mask between two prompts is not a bound
        assert torch.allclose(bounded[f], plain[f], atol=1e-5), f
    forward = {r.index: r.logits[0] for r in track(tiny_predictor, images, {1: {3: disc[3], 7: empty}}, "forward")}
    assert (forward[8] > NO_OBJ_SCORE).all()  # support of another scan: empty masks say nothing


def test_rule_keeps_classes_independent(tiny_predictor):
    """A class's logits do not depend on which other classes share the batch."""
    images, prompts = _three_classes()
    together = {r.index: r.logits for r in track(tiny_predictor, images, prompts, "both")}
    for col, cid in enumerate(prompts):
        alone = {r.index: r.logits[0] for r in track(tiny_predictor, images, {cid: prompts[cid]}, "both")}
        assert max((together[f][col] - alone[f]).abs().max().item() for f in alone) <= BATCHED_TOLERANCE


def test_unprompted_class_is_absent_and_no_prompt_runs_nothing(tiny_predictor, monkeypatch):
    images, prompts = _three_classes()
    results = list(track(tiny_predictor, images, {**prompts, 9: {2: torch.zeros(64, 64)}}, "both"))
    assert all((r.logits[3] == NO_OBJ_SCORE).all() and r.iou_pred[3] == 0 for r in results)
    monkeypatch.setattr(tiny_predictor, "forward_image", lambda x: pytest.fail("no prompt: the model must not run"))
    empty = list(track(tiny_predictor, images, {1: {}, 2: {0: torch.zeros(64, 64)}}, "forward"))
    assert len(empty) == DEPTH and all((r.logits == NO_OBJ_SCORE).all() for r in empty)


def test_prompted_slices_give_the_mask(tiny_predictor):
    images, prompts = _three_classes()
    results = {r.index: r for r in track(tiny_predictor, images, prompts, "both")}
    mask = prompts[4][5]
    logits = to_size(results[5].logits[0], (64, 64))
    assert ((logits > 0) == (mask > 0.5)).float().mean() > 0.97
    assert results[5].iou_pred[0] == 1


def test_bad_prompts(tiny_predictor):
    images, _ = toy_slices(4)
    with pytest.raises(ValueError, match="outside"):
        list(track(tiny_predictor, images, {1: {7: torch.ones(64, 64)}}))
    with pytest.raises(ValueError, match="direction"):
        track(tiny_predictor, images, {}, "sideways")
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        list(track(tiny_predictor, images, {1: {0: torch.ones(2, 64, 64)}}))


def test_grad_mode_keeps_heads_for_the_loss(tiny_predictor):
    images, prompts = _three_classes()
    tiny_predictor.train()
    for multimask, candidates in ((False, 1), (True, 3)):  # tiny_cpu tracks with one mask; SAM2.1 with three
        tiny_predictor.multimask_output_for_tracking = multimask
        tiny_predictor.zero_grad(set_to_none=True)
        results = list(track(tiny_predictor, images, prompts, "forward", grad=True))
        heads = [t for r in results for t in r.tracked]
        assert heads and all(t.multimask_logits.shape[1] == t.multimask_ious.shape[1] == candidates for t in heads)
        assert all(t.raw_multimask_logits.shape == t.multimask_logits.shape for t in heads)
        loss = sum(t.multimask_ious.sum() + t.raw_multimask_logits.mean() + t.memory_features.mean() for t in heads)
        loss.backward()
        iou_head = tiny_predictor.sam_mask_decoder.iou_prediction_head
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in iou_head.parameters())
    # a prompted slice is a conditioning frame of its class: no head outputs to train there for that class
    by_slice = {r.index: [c for t in r.tracked for c in t.columns] for r in results}
    assert 1 not in by_slice[3] and 0 not in by_slice[5] and 2 not in by_slice[6]
    assert 0 in by_slice[3] and 2 in by_slice[3]  # the other classes are tracked on slice 3
    with torch.no_grad():
        assert all(not r.tracked and not r.logits.requires_grad for r in track(tiny_predictor, images, prompts))


def test_grad_mode_is_not_leaked_by_a_no_grad_run(tiny_predictor):
    images, prompts = _three_classes()
    steps = track(tiny_predictor, images, prompts, "forward")
    next(steps)
    assert torch.is_grad_enabled()  # the caller's own grad mode between two slices
    steps.close()


def test_history_rule(tiny_predictor):
    keep = tiny_predictor.min_exact_history()
    assert tiny_predictor.history_to_keep() == keep
    tiny_predictor.memory_selector = MemorySelector.from_name("scored:window=40")
    assert tiny_predictor.history_to_keep() == 40
    tiny_predictor.memory_selector = MemorySelector.from_name("scored:window=3")
    assert tiny_predictor.history_to_keep() == keep
    tiny_predictor.memory_selector = MemorySelector.from_name("scored")  # may pick any stored frame
    assert tiny_predictor.history_to_keep() is None
    tiny_predictor.memory_selector = MemorySelector.from_name("recency")
    assert tiny_predictor.history_to_keep() == keep


def test_bank_stays_bounded(tiny_predictor, monkeypatch):
    """The rule prunes tracked outputs beyond history_to_keep() in both passes."""
    depth = tiny_predictor.min_exact_history() + 8
    images, disc = toy_slices(depth, size=32)
    longest = []
    original = tiny_predictor._prune_history

    def spy(state, frame_idx, reverse):
        original(state, frame_idx, reverse)
        longest.append(max(len(b["non_cond_frame_outputs"]) for b in state["output_dict_per_obj"].values()))

    monkeypatch.setattr(tiny_predictor, "_prune_history", spy)
    list(track(tiny_predictor, images, {1: {1: disc[1]}}, "both"))  # forward pass: 22 slices
    assert max(longest) == tiny_predictor.min_exact_history() + 1


def test_forward_logits_wait_for_the_reverse_pass_on_disk_beyond_the_budget(tiny_predictor, monkeypatch):
    """Both ways, the forward pass's logits of the slices the reverse pass will revisit leave memory beyond the
    store's budget (so memory stays flat in the depth) and come back exactly."""
    import sam2_ext.pass_store as pass_store

    images, prompts = _three_classes()
    in_memory = {r.index: r.logits for r in track(tiny_predictor, images, prompts, "both")}
    stores = []
    real = pass_store.PassStore

    def recording(budget=None):
        stores.append(real(budget))
        return stores[-1]

    monkeypatch.setattr(pass_store, "DEFAULT_BUDGET", 0)
    monkeypatch.setattr(sam2_ext.track, "PassStore", recording)
    on_disk = {r.index: r.logits for r in track(tiny_predictor, images, prompts, "both")}
    assert stores[0].spilled >= 5 and stores[0].in_memory == 0  # slices 1..8 wait for the reverse pass
    assert sorted(on_disk) == sorted(in_memory)
    assert all(torch.equal(on_disk[f], in_memory[f]) for f in in_memory)


def test_pass_store_keeps_graphs_and_dtypes():
    from sam2_ext.pass_store import PassStore

    store = PassStore(budget=0)
    with_graph = torch.ones(2, 3, requires_grad=True) * 2
    half = torch.linspace(-1024, 7, 12).reshape(3, 4).to(torch.bfloat16)
    store.put("graph", with_graph)
    store.put("half", half)
    assert store.spilled == 1  # a tensor with a graph stays in memory: its gradient needs it
    assert store.pop("graph") is with_graph
    back = store.pop("half")
    assert back.dtype == torch.bfloat16 and torch.equal(back, half)
    store.close()


def test_grad_mode_encodes_every_frame_once_with_the_same_results(tiny_predictor, monkeypatch):
    """Training keeps every frame's image features for the whole run (both passes, conditioning frames): the
    logits and gradients are those of SAM2's one-frame cache, without encoding a frame again."""
    images, prompts = _three_classes()
    tiny_predictor.eval()  # no stochastic layers: both ways must agree
    encoded = []
    real_forward_image = tiny_predictor.forward_image

    def spy(image):
        encoded.append(1)
        return real_forward_image(image)

    monkeypatch.setattr(tiny_predictor, "forward_image", spy)

    def run():
        encoded.clear()
        tiny_predictor.zero_grad(set_to_none=True)
        results = sorted(track(tiny_predictor, images, prompts, "both", grad=True), key=lambda r: r.index)
        logits = torch.stack([r.logits for r in results])
        logits.float().clamp(-20, 20).mean().backward()
        grads = [p.grad.clone() for p in tiny_predictor.image_encoder.parameters() if p.grad is not None]
        return logits.detach(), grads, len(encoded)

    logits, grads, calls = run()
    assert calls == DEPTH and grads  # once per slice, though both passes and the prompts visit slices again
    one_frame_cache = functools.partial(svp.SAM2VideoPredictor._get_image_feature, tiny_predictor)
    monkeypatch.setattr(tiny_predictor, "_get_image_feature", one_frame_cache)
    again, again_grads, again_calls = run()
    assert again_calls > DEPTH  # SAM2's own cache encodes slices again
    assert torch.allclose(logits, again, atol=1e-4)
    assert all(torch.allclose(g, h, atol=1e-5, rtol=1e-4) for g, h in zip(grads, again_grads))
