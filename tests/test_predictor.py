"""ICLPredictor and the ICL helpers against the official SAM2 video predictor (tiny config, random weights)."""
from __future__ import annotations

import pytest
import sam2.sam2_video_predictor as svp
import torch
from monai.losses import DiceLoss
from sam2.modeling.sam2_base import NO_OBJ_SCORE

from engine_fixtures import make_tiny_predictor, tiny_predictor, toy_slices  # noqa: F401 (fixture)
from sam2_ext.icl import segment_volume_with_support, segment_with_support
from sam2_ext.predictor import prepare_frames

NUM_SUPPORT = 2


def _official_query_logits(monkeypatch, weights: dict, images, class_masks: dict[int, torch.Tensor], num_support):
    """Official SAM2VideoPredictor: add_new_mask on the support frames, propagate_in_video, query logits."""
    official = make_tiny_predictor(predictor_cls=svp.SAM2VideoPredictor)
    official.load_state_dict(weights)
    height, width = images.shape[-2:]
    monkeypatch.setattr(svp, "load_video_frames",
                        lambda **kw: (prepare_frames(images, official.image_size), height, width))
    state = official.init_state("unused-video-path")
    for s in range(num_support):
        for cid, masks in class_masks.items():
            official.add_new_mask(state, s, cid, masks[s] > 0.5)
    logits = {f: out[:, 0] for f, _, out in official.propagate_in_video(state)}
    return torch.stack([logits[f] for f in range(num_support, len(images))])


def test_equivalent_to_official_predictor(tiny_predictor, monkeypatch):
    images, masks = toy_slices(11)  # 9 query slices: more than num_maskmem, so the memory bank fills up
    class_masks = {1: masks[:NUM_SUPPORT], 2: 1 - masks[:NUM_SUPPORT]}
    ours = segment_with_support(tiny_predictor, images[:NUM_SUPPORT], class_masks, images[NUM_SUPPORT:])
    ref = _official_query_logits(monkeypatch, tiny_predictor.state_dict(), images, class_masks, NUM_SUPPORT)
    assert ours["logits"].shape == ref.shape == (9, 2, 64, 64)
    delta = (ours["logits"] - ref).abs().max().item()
    print(f"max |logit difference| ICLPredictor vs SAM2VideoPredictor: {delta:.3g}")
    assert delta <= 1e-4
    # the comparison is not trivial: SAM2 predicted real (non-placeholder) masks with both signs
    assert (ref > 0).any() and (ref < 0).any() and (ref > NO_OBJ_SCORE).all()


def _dice_and_grads(model, images, masks):
    out = segment_with_support(model, images[:NUM_SUPPORT], {1: masks[:NUM_SUPPORT]}, images[NUM_SUPPORT:],
                               grad=True)
    loss = DiceLoss(sigmoid=True)(out["logits"], masks[NUM_SUPPORT:, None])
    loss.backward()
    return {name: sum(p.grad.abs().sum().item() for p in getattr(model, name).parameters() if p.grad is not None)
            for name in ("image_encoder", "memory_attention", "memory_encoder", "sam_mask_decoder")}


def test_gradients_reach_all_modules_in_train_mode(tiny_predictor):
    images, masks = toy_slices(5)
    tiny_predictor.train()  # dropout on, SAM2 train-mode branches (object scores must still be kept)
    grads = _dice_and_grads(tiny_predictor, images, masks)
    assert all(g > 0 for g in grads.values()), grads


def test_frozen_image_encoder_gets_no_gradient(tiny_predictor):
    images, masks = toy_slices(5)
    for p in tiny_predictor.image_encoder.parameters():
        p.requires_grad_(False)
    grads = _dice_and_grads(tiny_predictor, images, masks)
    assert grads["image_encoder"] == 0
    assert all(p.grad is None for p in tiny_predictor.image_encoder.parameters())
    assert grads["memory_attention"] > 0 and grads["memory_encoder"] > 0 and grads["sam_mask_decoder"] > 0


def test_no_grad_path_builds_no_graph(tiny_predictor):
    images, masks = toy_slices(4)
    out = segment_with_support(tiny_predictor, images[:1], {1: masks[:1]}, images[1:])
    assert not out["logits"].requires_grad


def test_two_classes_in_one_pass_equal_two_single_runs(tiny_predictor):
    images, masks = toy_slices(5)
    sup, qry = images[:NUM_SUPPORT], images[NUM_SUPPORT:]
    other = torch.zeros_like(masks[:NUM_SUPPORT])
    other[:, 5:20, 30:60] = 1
    both = segment_with_support(tiny_predictor, sup, {3: masks[:NUM_SUPPORT], 7: other}, qry)
    only3 = segment_with_support(tiny_predictor, sup, {3: masks[:NUM_SUPPORT]}, qry)
    only7 = segment_with_support(tiny_predictor, sup, {7: other}, qry)
    for key in ("logits", "object_score_logits", "iou_pred"):
        assert torch.allclose(both[key][:, 0], only3[key][:, 0], atol=1e-5)
        assert torch.allclose(both[key][:, 1], only7[key][:, 0], atol=1e-5)
    assert not torch.allclose(both["logits"][:, 0], both["logits"][:, 1])


def test_image_features_computed_once_per_frame(tiny_predictor, monkeypatch):
    images, masks = toy_slices(5)
    calls = []
    original = tiny_predictor.forward_image
    monkeypatch.setattr(tiny_predictor, "forward_image", lambda x: calls.append(1) or original(x))
    segment_with_support(tiny_predictor, images[:NUM_SUPPORT], {1: masks[:NUM_SUPPORT], 2: 1 - masks[:NUM_SUPPORT]},
                         images[NUM_SUPPORT:])
    assert len(calls) == len(images)


def test_empty_support_masks(tiny_predictor):
    images, masks = toy_slices(5)
    partly = masks[:NUM_SUPPORT].clone()
    partly[0] = 0  # class 1 absent on the first support slice: that slice is not a conditioning frame for it
    out = segment_with_support(tiny_predictor, images[:NUM_SUPPORT],
                               {1: partly, 4: torch.zeros_like(partly)}, images[NUM_SUPPORT:])
    assert out["logits"].shape == (3, 2, 64, 64)
    assert (out["logits"][:, 1] == NO_OBJ_SCORE).all() and (out["iou_pred"][:, 1] == 0).all()
    assert (out["logits"][:, 0] > NO_OBJ_SCORE).any()
    none = segment_with_support(tiny_predictor, images[:1], {2: torch.zeros(1, 64, 64)}, images[1:])
    assert (none["logits"] == NO_OBJ_SCORE).all()


def test_iou_pred_stored_in_every_output(tiny_predictor):
    images, masks = toy_slices(4)
    state = tiny_predictor.init_state_from_frames(images)
    with torch.no_grad():
        tiny_predictor.train_add_new_mask(state, 0, 1, masks[0])
        frames = [f for f, _, _ in tiny_predictor.train_propagate_in_video(state)]
    assert frames == [0, 1, 2, 3]
    out = state["output_dict_per_obj"][0]
    assert out["cond_frame_outputs"][0]["iou_pred"].tolist() == [[1.0]]
    for f in (1, 2, 3):
        iou = out["non_cond_frame_outputs"][f]["iou_pred"]
        assert iou.shape == (1, 1) and 0 < iou.item() < 1  # sigmoid IoU head


class _RecordingSelector:
    """Keeps only the conditioning memories and records what it was called with."""

    def __init__(self):
        self.calls = []

    def select(self, model, inference_state, output_dict, frame_idx, num_frames, track_in_reverse):
        self.calls.append((frame_idx, num_frames, track_in_reverse, inference_state is not None))
        return {"cond_frame_outputs": output_dict["cond_frame_outputs"], "non_cond_frame_outputs": {}}


def test_memory_selector_hook(tiny_predictor):
    images, masks = toy_slices(5)
    plain = segment_with_support(tiny_predictor, images[:1], {1: masks[:1]}, images[1:])
    selector = _RecordingSelector()
    tiny_predictor.memory_selector = selector
    selected = segment_with_support(tiny_predictor, images[:1], {1: masks[:1]}, images[1:])
    assert selector.calls == [(f, 5, False, True) for f in (1, 2, 3, 4)]
    # frame 1 only ever sees the conditioning memory, so it is unchanged; later frames lose their history
    assert torch.allclose(plain["logits"][0], selected["logits"][0], atol=1e-6)
    assert not torch.allclose(plain["logits"][1:], selected["logits"][1:])


def _track_with_history(predictor, images, mask, history, reverse=False):
    """Propagate one object from a mask on frame 0 (``reverse``: on the last frame, down to 0) with
    ``keep_history``; returns (logits [N, 1, H, W], the largest number of tracked outputs the bank held at any
    frame, the frames it held at the end)."""
    state = predictor.init_state_from_frames(images)
    state["keep_history"] = history
    start = len(images) - 1 if reverse else 0
    logits, longest = [], 0
    with torch.no_grad():
        predictor.train_add_new_mask(state, start, 1, mask)
        bank = state["output_dict_per_obj"][0]["non_cond_frame_outputs"]
        for _, _, out in predictor.train_propagate_in_video(state, start_frame_idx=start, reverse=reverse):
            logits.append(out)
            longest = max(longest, len(bank))
    return torch.cat(logits), longest, sorted(bank)


def test_keep_history_prunes_without_changing_results(tiny_predictor):
    images, masks = toy_slices(10)
    full, full_longest, _ = _track_with_history(tiny_predictor, images, masks[0], None)
    pruned, pruned_longest, _ = _track_with_history(tiny_predictor, images, masks[0], 2)
    assert pruned_longest == 3  # current frame + 2 behind
    assert full_longest == 9
    assert torch.allclose(full[:4], pruned[:4])  # identical while the window covers the memory
    assert len(tiny_predictor.init_state_from_frames(images)["cached_features"]) == 0


def test_reverse_pass_prunes_the_frames_behind_it(tiny_predictor):
    """Tracking down from the last frame, 'behind' is above: the bank keeps the frames just above the current one."""
    images, masks = toy_slices(10)
    full, full_longest, _ = _track_with_history(tiny_predictor, images, masks[-1], None, reverse=True)
    pruned, longest, kept = _track_with_history(tiny_predictor, images, masks[-1], 2, reverse=True)
    assert full_longest == 9 and longest == 3
    assert kept == [0, 1, 2]  # at frame 0: itself and the two above it; frames 3..8 were dropped
    assert torch.allclose(full[:4], pruned[:4])


def test_keep_history_at_exact_window_is_identical(tiny_predictor):
    keep = tiny_predictor.min_exact_history()
    assert keep == 16  # object-pointer window of SAM2.1 (mask memories need only 7)
    images, masks = toy_slices(keep + 4, size=32)
    for reverse in (False, True):
        mask = masks[-1] if reverse else masks[0]
        full, _, _ = _track_with_history(tiny_predictor, images, mask, None, reverse)
        pruned, longest, _ = _track_with_history(tiny_predictor, images, mask, keep, reverse)
        assert longest == keep + 1
        assert torch.equal(full, pruned), reverse


def test_lazy_frame_source_equals_tensor_input(tiny_predictor):
    images, masks = toy_slices(4, size=128)

    class Lazy:
        def __init__(self):
            self.asked = []

        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            self.asked.append(i)
            return prepare_frames(images[i: i + 1], 128)[0]

    outs = []
    for frames in (images, Lazy()):
        state = tiny_predictor.init_state_from_frames(frames)
        with torch.no_grad():
            tiny_predictor.train_add_new_mask(state, 0, 1, masks[0])
            outs.append(torch.cat([o for _, _, o in tiny_predictor.train_propagate_in_video(state)]))
        assert len(state["cached_features"]) == 0  # features released once propagation ends
    assert sorted(set(frames.asked)) == [0, 1, 2, 3]
    assert torch.equal(outs[0], outs[1])


def test_segment_volume_both_directions(tiny_predictor):
    images, masks = toy_slices(7)
    support = {1: {2: masks[2], 4: masks[4]}, 9: {}}
    out = segment_volume_with_support(tiny_predictor, images, support)
    assert out["logits"].shape == (7, 2, 64, 64) and out["iou_pred"].shape == (7, 2)
    # support slices return their GT-derived conditioning logits (+-10 low-res logits, upsampled)
    assert ((out["logits"][2, 0] > 0) == (masks[2] > 0.5)).float().mean() > 0.95
    assert out["iou_pred"][2, 0] == 1 and out["iou_pred"][4, 0] == 1
    # slices before the first support (reverse pass) and after the last (forward pass) are predicted
    assert (out["logits"][[0, 1, 5, 6], 0] > NO_OBJ_SCORE).all()
    assert (out["logits"][:, 1] == NO_OBJ_SCORE).all()  # class without support


def test_segment_volume_bad_slice(tiny_predictor):
    images, masks = toy_slices(3)
    with pytest.raises(ValueError, match="outside"):
        segment_volume_with_support(tiny_predictor, images, {1: {5: masks[0]}})


def test_class_with_empty_first_support_runs_in_float32(tiny_predictor):
    """SAM2 keeps memories in bf16; a class whose first support slice is empty must still run on CPU in fp32
    (it used to crash: bf16 memory into a float32 layer), and the other class is unaffected by it."""
    torch.manual_seed(0)
    images = torch.rand(6, 64, 64)
    both = torch.zeros(2, 64, 64)
    both[:, 20:40, 20:40] = 1
    late = both.clone()
    late[0] = 0
    together = segment_with_support(tiny_predictor, images[:2], {1: late, 2: both}, images[2:])
    alone = segment_with_support(tiny_predictor, images[:2], {2: both}, images[2:])
    assert together["logits"].dtype == torch.float32
    assert torch.isfinite(together["logits"]).all()
    assert together["logits"][:, 0].abs().max() < 1000  # class 1 was really tracked, not the no-object fill
    assert torch.allclose(together["logits"][:, 1], alone["logits"][:, 0], atol=1e-4)
