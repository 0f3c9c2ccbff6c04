"""MemorySelector on synthetic banks: flag parsing, scoring, budget, slot remapping, oracle (the real model: test_selector_model.py)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from icl.errors import InputError
from icl.model.boundary import library_errors
from sam2_ext.errors import Sam2ExtError
from sam2_ext.selector import MemorySelector, SelectorConfig, mask_confidence, mask_iou, parse_selector_config

LOW = 16  # low-res mask side of the synthetic bank


def _model(**kw) -> SimpleNamespace:
    base = dict(num_maskmem=7, max_cond_frames_in_attn=-1, memory_temporal_stride_for_eval=1, training=False,
                max_obj_ptrs_in_encoder=16)
    base.update(kw)
    return SimpleNamespace(**base)


def _disk(radius: int = 4) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(LOW), torch.arange(LOW), indexing="ij")
    return (((yy - LOW // 2) ** 2 + (xx - LOW // 2) ** 2) <= radius**2).float()


def _mem(t: int, good: bool = True, present: bool = True, iou: float | None = None) -> dict:
    """A stored frame output; maskmem_features is filled with ``t`` so a view's slots can be traced to frames."""
    disk = _disk()
    logits = (disk * 2 - 1) * (10.0 if good else 0.2)  # confident vs mushy mask
    if not present:
        logits = torch.full_like(disk, -1024.0)
    out = {
        "maskmem_features": torch.full((1, 4, 2, 2), float(t)),
        "maskmem_pos_enc": [torch.zeros(1, 4, 2, 2)],
        "pred_masks": logits.reshape(1, 1, LOW, LOW),
        "obj_ptr": torch.full((1, 8), float(t)),
        "object_score_logits": torch.tensor([[5.0 if present else -5.0]]),
        "iou_pred": torch.tensor([[iou if iou is not None else (0.9 if good else 0.1)]]),
    }
    return out


def _bank(n_cond: int = 1, n_frames: int = 10, bad: tuple[int, ...] = (), absent: tuple[int, ...] = ()) -> dict:
    """Cond frames 0..n_cond-1, non-cond frames n_cond..n_frames-1."""
    return {
        "cond_frame_outputs": {t: _mem(t) for t in range(n_cond)},
        "non_cond_frame_outputs": {t: _mem(t, good=t not in bad, present=t not in absent)
                                   for t in range(n_cond, n_frames)},
    }


def _state(bank: dict) -> dict:
    return {"output_dict_per_obj": {0: bank}, "obj_idx_to_id": {0: 7}, "obj_id_to_idx": {7: 0}}


def _slot_frames(view: dict) -> dict[int, int]:
    """memory slot key -> real frame id of the mask memory placed there."""
    return {k: int(v["maskmem_features"].flatten()[0]) for k, v in view["non_cond_frame_outputs"].items()
            if "maskmem_features" in v}


def _ptr_frames(view: dict) -> dict[int, int]:
    """key -> real frame id of the object pointer SAM2 finds there."""
    return {k: int(v["obj_ptr"].flatten()[0]) for k, v in view["non_cond_frame_outputs"].items()}


# ---------------------------------------------------------------- flag parsing

def test_parse_flag_values_and_types():
    cfg = parse_selector_config("scored:budget=4,decay=0.8,w_iou=2,min_object_score=none")
    assert (cfg.policy, cfg.budget, cfg.decay, cfg.w_iou, cfg.min_object_score) == ("scored", 4, 0.8, 2.0, None)
    assert parse_selector_config("Oracle").policy == "oracle"
    sel = MemorySelector.from_name("scored", budget=2)
    assert sel.config.budget == 2 and sel.config.policy == "scored"
    assert MemorySelector().config == SelectorConfig() and SelectorConfig().policy == "recency"
    with pytest.raises(Sam2ExtError, match="budget must be >= 0"):
        SelectorConfig(policy="scored", budget=-1)


@pytest.mark.parametrize("spec, needle", [
    ("best", "unknown policy"),
    ("scored:bogus=1", "bad option"),
    ("scored:budget", "bad option"),
    ("scored:budget=two", "not a valid"),
    ("scored:decay=0", "decay"),
    ("scored:w_iou=-1", "w_iou"),
    ("recency:budget=3", "takes no budget"),
])
def test_parse_flag_errors_name_the_option(spec, needle):
    with pytest.raises(Sam2ExtError, match=needle) as err:
        parse_selector_config(spec)
    assert err.value.where == "memory_selector"
    # at the icl boundary each command spells it as its own flag
    for dashes, flag in (("-", "-memory_selector"), ("--", "--memory-selector")):
        with pytest.raises(InputError) as mapped, library_errors(dashes):
            parse_selector_config(spec)
        assert mapped.value.where == flag and needle in mapped.value.problem


# ---------------------------------------------------------------- scores

def test_mask_confidence_and_iou_values():
    disk = _disk()
    assert mask_confidence((disk * 2 - 1) * 10) == pytest.approx(1.0, abs=1e-3)
    assert mask_confidence(torch.zeros(LOW, LOW)) == 0.0  # all exactly uncertain
    assert mask_confidence(torch.full((LOW, LOW), -1024.0)) == 0.0  # nothing predicted: nothing to remember
    assert 0.05 < mask_confidence((disk * 2 - 1) * 0.2) < 0.15
    gt = torch.nn.functional.interpolate(disk[None, None], scale_factor=4, mode="nearest")[0, 0]
    assert mask_iou((disk * 2 - 1)[None, None] * 10, gt) > 0.95  # resized to the GT grid
    assert mask_iou(torch.full((1, 1, LOW, LOW), -5.0), torch.zeros(64, 64)) == 1.0  # both empty
    assert mask_iou(torch.full((1, 1, LOW, LOW), -5.0), gt) == 0.0


# ---------------------------------------------------------------- synthetic banks

def test_recency_returns_the_bank_unchanged():
    bank = _bank()
    view = MemorySelector.from_name("recency").select(_model(), _state(bank), bank, 10, 20, False)
    assert view is bank


def test_scored_view_respects_budget_and_remaps_by_recency_without_mutating():
    bank = _bank(n_cond=1, n_frames=10)
    before = {k: dict(v) for k, v in bank.items()}
    sel = MemorySelector.from_name("scored:budget=3")
    view = sel.select(_model(), _state(bank), bank, 10, 20, False)
    # all frames equally good: the 3 most recent win, most recent in slot frame_idx-1
    assert _slot_frames(view) == {9: 9, 8: 8, 7: 7}
    assert list(view["cond_frame_outputs"]) == [0]
    assert sel.last_selection.memory_frames == [9, 8, 7]
    # slot keys 6, 5, 4 stay empty (SAM2 would read a mask memory there); the next best frames give their
    # pointers on the keys SAM2 reads only pointers from (3 .. 0, as frame_idx - t_diff must stay >= 0)
    assert _ptr_frames(view) == {9: 9, 8: 8, 7: 7, 3: 6, 2: 5, 1: 4, 0: 3}
    assert sel.last_selection.pointer_frames == [6, 5, 4, 3]
    assert all(set(v) == {"obj_ptr"} for k, v in view["non_cond_frame_outputs"].items() if k < 4)
    assert bank.keys() == before.keys() and all(bank[k] == before[k] for k in bank)  # same entries, same objects
    assert view is not bank and view["non_cond_frame_outputs"] is not bank["non_cond_frame_outputs"]


def test_scored_drops_bad_and_absent_memories_even_when_recent():
    bank = _bank(n_cond=1, n_frames=12, bad=(11,), absent=(10,))
    sel = MemorySelector.from_name("scored")  # budget = num_maskmem - 1 = 6
    view = sel.select(_model(), _state(bank), bank, 12, 20, False)
    frames = sel.last_selection.memory_frames
    assert len(frames) == 6 and 11 not in frames and 10 not in frames
    assert frames == [9, 8, 7, 6, 5, 4]
    assert 10 not in sel.last_selection.scores  # absent object: not eligible at all
    assert sorted(_slot_frames(view)) == [6, 7, 8, 9, 10, 11] and _slot_frames(view)[11] == 9
    # pointer-only keys 5..0 have room for every remaining eligible frame, the bad one included (nearest first)
    assert sel.last_selection.pointer_frames == [11, 3, 2, 1]
    assert 10 not in _ptr_frames(view).values()
    strict = MemorySelector.from_name("scored:min_score=0.6")  # bad frame scores ~0.49, good ones >= 0.8
    view = strict.select(_model(), _state(bank), bank, 12, 20, False)
    assert strict.last_selection.pointer_frames == [3, 2, 1]
    assert 11 not in _ptr_frames(view).values() and 11 not in strict.last_selection.scores


def test_pointers_option_caps_pointer_frames():
    bank = _bank(n_cond=1, n_frames=20)
    sel = MemorySelector.from_name("scored:budget=2,pointers=5")
    view = sel.select(_model(), _state(bank), bank, 20, 40, False)
    assert sel.last_selection.memory_frames == [19, 18]
    assert sel.last_selection.pointer_frames == [17, 16, 15]
    assert _ptr_frames(view) == {19: 19, 18: 18, 13: 17, 12: 16, 11: 15}  # keys 17..14 are memory slots
    with pytest.raises(Sam2ExtError, match="pointers"):
        parse_selector_config("scored:budget=4,pointers=2")


def test_scored_forced_bad_iou_alone_is_enough():
    bank = _bank(n_cond=1, n_frames=9)
    bank["non_cond_frame_outputs"][8]["iou_pred"] = torch.tensor([[0.0]])
    sel = MemorySelector.from_name("scored:budget=4,w_conf=0,w_obj=0")
    sel.select(_model(), _state(bank), bank, 9, 20, False)
    assert sel.last_selection.memory_frames == [7, 6, 5, 4]


def test_min_object_score_none_keeps_absent_frames():
    bank = _bank(n_cond=1, n_frames=4, absent=(3,))
    sel = MemorySelector.from_name("scored:min_object_score=none,budget=3")
    sel.select(_model(), _state(bank), bank, 4, 20, False)
    assert sel.last_selection.memory_frames == [3, 2, 1]


def test_budget_larger_than_slots_is_refused():
    bank = _bank()
    with pytest.raises(Sam2ExtError, match="exceeds"):
        MemorySelector.from_name("scored:budget=7").select(_model(), _state(bank), bank, 10, 20, False)


def test_reverse_tracking_uses_following_frames():
    bank = {"cond_frame_outputs": {19: _mem(19)},
            "non_cond_frame_outputs": {t: _mem(t, good=t != 17) for t in range(2, 19)}}
    sel = MemorySelector.from_name("scored:budget=3")
    view = sel.select(_model(), _state(bank), bank, 10, 20, True)
    assert sel.last_selection.memory_frames == [11, 12, 13]  # only frames after 10 are "past" in reverse
    assert _slot_frames(view) == {11: 11, 12: 12, 13: 13}


def test_slot_keys_follow_sam2_stride():
    m = _model(memory_temporal_stride_for_eval=3)
    assert MemorySelector.slot_keys(m, 20, False) == [19, 18, 15, 12, 9, 6]
    assert MemorySelector.slot_keys(m, 20, True) == [21, 24, 27, 30, 33, 36]
    m.training = True  # sam2 uses stride 1 while training
    assert MemorySelector.slot_keys(m, 20, False) == [19, 18, 17, 16, 15, 14]


def test_cond_frames_capped_to_the_closest_and_not_leaked():
    bank = _bank(n_cond=4, n_frames=8)
    sel = MemorySelector.from_name("scored:budget=2,min_object_score=none")
    view = sel.select(_model(max_cond_frames_in_attn=2), _state(bank), bank, 8, 20, False)
    assert sorted(view["cond_frame_outputs"]) == [2, 3]
    # unselected supports 0,1 compete as ordinary memories but lose to the more recent frames here
    assert sel.last_selection.memory_frames == [7, 6]
    assert 0 in sel.last_selection.scores


def test_window_limits_candidates():
    bank = _bank(n_cond=1, n_frames=12, bad=(11, 10, 9))
    sel = MemorySelector.from_name("scored:window=3,budget=3")
    sel.select(_model(), _state(bank), bank, 12, 20, False)
    assert sorted(sel.last_selection.scores) == [9, 10, 11]


def test_history_needed_tells_how_far_back_the_selector_reads():
    assert MemorySelector.from_name("recency").history_needed() == 0
    assert MemorySelector.from_name("scored").history_needed() is None
    assert MemorySelector.from_name("oracle:window=12").history_needed() == 12


def test_no_cond_frame_means_no_selection():
    bank = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    sel = MemorySelector.from_name("oracle")  # no GT, but nothing is read from memory on an initial frame
    assert sel.select(_model(), _state(bank), bank, 0, 5, False) is bank


def test_oracle_picks_highest_gt_iou_and_refuses_without_gt():
    bank = _bank(n_cond=1, n_frames=10)
    state = _state(bank)
    sel = MemorySelector.from_name("oracle:budget=2")
    with pytest.raises(Sam2ExtError, match="attach_ground_truth"):
        sel.select(_model(), state, bank, 10, 20, False)
    gt = {t: _disk() for t in range(10)}
    gt[9] = torch.zeros(LOW, LOW)  # the most recent prediction is now totally wrong
    shifted = torch.roll(_disk(), 2, dims=1)
    for t in range(1, 9):
        gt[t] = shifted
    gt[3] = _disk()  # frames 3 and 5 match perfectly
    gt[5] = _disk()
    sel.attach_ground_truth(state, obj_id=7, masks=gt)
    view = sel.select(_model(), state, bank, 10, 20, False)
    assert sel.last_selection.memory_frames == [5, 3]
    assert sel.last_selection.scores[9] == 0.0 and sel.last_selection.scores[5] == pytest.approx(1.0)
    assert _slot_frames(view) == {9: 5, 8: 3}


def test_oracle_missing_frame_and_bad_gt_are_clear_errors():
    bank = _bank(n_cond=1, n_frames=4)
    state = _state(bank)
    sel = MemorySelector.from_name("oracle")
    with pytest.raises(Sam2ExtError, match=r"\[H, W\]"):
        sel.attach_ground_truth(state, 7, {1: torch.zeros(1, LOW, LOW)})
    sel.attach_ground_truth(state, 7, {1: _disk(), 2: _disk()})
    with pytest.raises(Sam2ExtError, match="frame 3"):
        sel.select(_model(), state, bank, 4, 20, False)


def test_selector_level_ground_truth_serves_any_state():
    bank = _bank(n_cond=1, n_frames=4)
    sel = MemorySelector.from_name("oracle:budget=1")
    gt = {t: torch.zeros(LOW, LOW) for t in range(4)}
    gt[1] = _disk()
    sel.attach_ground_truth(None, 7, gt)
    sel.select(_model(), _state(bank), bank, 4, 20, False)
    assert sel.last_selection.memory_frames == [1]
    gt[1], gt[2] = torch.zeros(LOW, LOW), _disk()
    sel.attach_ground_truth(None, 7, gt)  # new GT: cached IoUs must not be reused
    state = _state(bank)
    sel.select(_model(), state, bank, 4, 20, False)
    assert sel.last_selection.memory_frames == [2]
    sel.attach_ground_truth(state, 7, {t: _disk() if t == 3 else torch.zeros(LOW, LOW) for t in range(4)})
    sel.select(_model(), state, bank, 4, 20, False)  # a state's own GT wins over the selector's
    assert sel.last_selection.memory_frames == [3]


def test_deterministic_and_cache_follows_bank_changes():
    bank = _bank(n_cond=1, n_frames=10, bad=(4, 8))
    state = _state(bank)
    a = MemorySelector.from_name("scored:budget=4")
    b = MemorySelector.from_name("scored:budget=4")
    a.select(_model(), state, bank, 10, 20, False)
    b.select(_model(), copy.deepcopy(state), copy.deepcopy(bank), 10, 20, False)
    assert a.last_selection == b.last_selection
    bank["non_cond_frame_outputs"][9] = _mem(9, good=False)  # a re-tracked frame replaces the stored memory
    a.select(_model(), state, bank, 10, 20, False)
    assert 9 not in a.last_selection.memory_frames

