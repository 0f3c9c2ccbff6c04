"""MemorySelector inside the real (tiny) SAM2 model: recency equals official SAM2, budget, scored, oracle, gradients."""
from __future__ import annotations

import pytest
import torch

from sam2_ext.errors import Sam2ExtError
from sam2_ext.selector import mask_iou

N_FRAMES = 9
SIZE = 128  # = image_size of cfg/tiny_cpu.yaml, so no resampling anywhere


@pytest.fixture(scope="module")
def video():
    """A disk drifting and growing over N_FRAMES grey frames, as uint8 RGB (JPEG-exact for the official loader)."""
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    masks = torch.stack([(((yy - 64) ** 2 + (xx - 54 - 2 * t) ** 2) <= (18 + t) ** 2).float()
                         for t in range(N_FRAMES)])
    grey = 0.2 + 0.6 * masks + 0.1 * torch.rand(N_FRAMES, SIZE, SIZE, generator=gen)
    rgb = (grey[:, None].expand(-1, 3, -1, -1) * 255).round().to(torch.uint8)
    return rgb, masks


@pytest.fixture(scope="module")
def tiny():
    """Seeded tiny ICLPredictor (objects predicted present), single-threaded torch on the shared CI cores."""
    from engine_fixtures import make_tiny_predictor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield make_tiny_predictor(seed=0)
    finally:
        torch.set_num_threads(threads)


def _run(model, video, spec: str | None, gt: bool = False, corrupt: dict | None = None):
    """Support = GT mask on frame 0, track frames 1..; returns (logits per frame, selector, per-frame memory count).

    ``corrupt``: {frame: fn(out)} applied to the stored memory right after that frame is tracked.
    """
    from sam2_ext.selector import MemorySelector as Sel

    rgb, masks = video
    model.memory_selector = None if spec is None else Sel.from_name(spec, record=True)
    state = model.init_state_from_frames(rgb.float() / 255.0)
    model.train_add_new_mask(state, 0, 1, masks[0])
    if gt:
        model.memory_selector.attach_ground_truth(state, 1, {t: masks[t] for t in range(N_FRAMES)})
    counts: dict[int, tuple[int, int]] = {}
    spatial = (SIZE // 16) ** 2

    def spy(_module, _args, kwargs):
        n_ptr = kwargs["num_obj_ptr_tokens"]
        counts[len(counts) + 1] = ((kwargs["memory"].shape[0] - n_ptr) // spatial, n_ptr)

    handle = model.memory_attention.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        logits = {}
        with torch.no_grad():
            for t, _ids, out in model.train_propagate_in_video(state):
                logits[t] = out.clone()
                if corrupt and t in corrupt:
                    corrupt[t](state["output_dict_per_obj"][0]["non_cond_frame_outputs"][t])
    finally:
        handle.remove()
        sel, model.memory_selector = model.memory_selector, None
    return logits, sel, counts, state


def test_recency_equals_official_sam2_video_predictor(tiny, video, tmp_path):
    from PIL import Image
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    from sam2_ext.build import build_icl_predictor

    rgb, masks = video
    for t in range(N_FRAMES):
        Image.fromarray(rgb[t].permute(1, 2, 0).numpy()).save(tmp_path / f"{t:05d}.jpg", quality=95)
    decoded = torch.stack([torch.from_numpy(__import__("numpy").array(Image.open(tmp_path / f"{t:05d}.jpg")))
                           .permute(2, 0, 1) for t in range(N_FRAMES)])
    official = build_icl_predictor("tiny_cpu", "cpu", predictor_cls=SAM2VideoPredictor).eval()
    official.load_state_dict(tiny.state_dict())
    state = official.init_state(str(tmp_path))
    official.add_new_mask(state, 0, 1, masks[0])
    ref = {t: out.clone() for t, _ids, out in official.propagate_in_video(state)}

    ours, sel, _counts, _ = _run(tiny, (decoded, masks), "recency")
    assert sorted(ours) == sorted(ref) == list(range(N_FRAMES))
    fg = torch.stack([(ref[t] > 0).float().mean() for t in ref])
    assert bool((fg > 0.01).all() and (fg < 0.99).all())  # real masks, not "object absent" everywhere
    delta = max(float((ours[t] - ref[t]).abs().max()) for t in ref)
    assert delta <= 1e-4
    assert sel.history[-1].memory_frames == [7, 6, 5, 4, 3, 2]  # the official slots, most recent first


def test_budget_is_what_sam2_attends_to(tiny, video):
    _, sel, counts, _ = _run(tiny, video, "scored:budget=2,min_object_score=none")
    _, _, official_counts, _ = _run(tiny, video, "recency")
    # frames 1..8: one support memory + at most K=2 frame memories
    assert [c[0] for c in counts.values()] == [1, 2, 3, 3, 3, 3, 3, 3]
    assert [c[0] for c in official_counts.values()] == [1, 2, 3, 4, 5, 6, 7, 7]
    # object pointers (4 tokens each): support + the 2 memories' own + pointer-only keys below the 6 slots
    assert [c[1] // 4 for c in counts.values()] == [1, 2, 3, 3, 3, 3, 4, 5]
    assert [c[1] // 4 for c in official_counts.values()] == list(range(1, N_FRAMES))
    assert all(len(s.memory_frames) <= 2 for s in sel.history)


def test_scored_on_recency_alone_reproduces_official(tiny, video):
    ref, _, _, _ = _run(tiny, video, None)
    ours, sel, _, _ = _run(tiny, video, "scored:w_conf=0,w_iou=0,w_obj=0,min_object_score=none")
    assert sel.history[-1].memory_frames == [7, 6, 5, 4, 3, 2] and sel.history[-1].pointer_frames == [1]
    assert max(float((ours[t] - ref[t]).abs().max()) for t in ref) <= 1e-4


def test_scored_never_attends_a_memory_forced_bad(tiny, video):
    def ruin(out):
        out["iou_pred"] = torch.zeros_like(out["iou_pred"])
        out["object_score_logits"] = torch.full_like(out["object_score_logits"], -20.0)
        out["pred_masks"] = torch.zeros_like(out["pred_masks"])  # every pixel maximally uncertain

    _, sel, counts, _ = _run(tiny, video, "scored:budget=3,min_object_score=none", corrupt={3: ruin})
    later = [s for s in sel.history if s.frame_idx > 4]  # from frame 5 on there are 4+ candidates for 3 slots
    assert later and all(3 not in s.memory_frames and len(s.memory_frames) == 3 for s in later)
    assert all(s.scores[3] < min(s.scores[t] for t in s.memory_frames) for s in later)
    # with the default absent-object filter the ruined memory is not even a candidate
    _, sel2, _, _ = _run(tiny, video, "scored:budget=3", corrupt={3: ruin})
    assert all(3 not in s.scores for s in sel2.history if s.frame_idx > 3)
    assert all(len(s.memory_frames) == 3 for s in sel2.history if s.frame_idx > 4)


def test_oracle_picks_highest_iou_frames_and_refuses_without_gt(tiny, video):
    with pytest.raises(Sam2ExtError, match="attach_ground_truth"):
        _run(tiny, video, "oracle")
    _, sel, _, state = _run(tiny, video, "oracle:budget=2", gt=True)
    bank = state["output_dict_per_obj"][0]["non_cond_frame_outputs"]
    masks = video[1]
    for s in sel.history:
        for t, score in s.scores.items():  # the score is the stored prediction's IoU with GT
            assert score == pytest.approx(mask_iou(bank[t]["pred_masks"], masks[t]))
        unchosen = [s.scores[t] for t in s.scores if t not in s.memory_frames]
        if unchosen:
            assert min(s.scores[t] for t in s.memory_frames) >= max(unchosen)


def test_scored_run_is_deterministic(tiny, video):
    a, sel_a, _, _ = _run(tiny, video, "scored:budget=3")
    b, sel_b, _, _ = _run(tiny, video, "scored:budget=3")
    assert all(torch.equal(a[t], b[t]) for t in a)
    assert sel_a.history == sel_b.history


def test_scored_selector_keeps_gradients_in_training(tiny, video):
    from sam2_ext.selector import MemorySelector as Sel

    rgb, masks = video
    tiny.train()
    tiny.zero_grad()
    try:
        tiny.memory_selector = Sel.from_name("scored:budget=2", record=True)
        state = tiny.init_state_from_frames(rgb[:5].float() / 255.0)
        tiny.train_add_new_mask(state, 0, 1, masks[0])
        loss = sum(out.sigmoid().mean() for _t, _ids, out in tiny.train_propagate_in_video(state))
        loss.backward()
        assert tiny.memory_selector.history[-1].memory_frames == [3, 2]
        grad = tiny.memory_encoder.out_proj.weight.grad  # memories reach the loss via memory attention
        assert grad is not None and float(grad.abs().sum()) > 0
    finally:
        tiny.memory_selector = None
        tiny.zero_grad()
        tiny.eval()
