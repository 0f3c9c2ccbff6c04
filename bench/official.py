"""The official sam2 ``SAM2VideoPredictor`` as a baseline for the benchmarks, fed the very frames ours gets.

Its ``init_state`` loads a JPEG folder; here ``load_video_frames`` is replaced for the call by a function returning
our prepared frames, which is all that loader would produce. Two ways of running it:

* one state for all classes (each class an object of the same state): sam2's own multi-object mode, which already
  computes every frame's image features once for all objects;
* one state per class (the whole video once per class).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch


def build_pair(config: str, image_size: int, seed: int = 0, object_bias: float = 5.0):
    """(ours ICLPredictor, official SAM2VideoPredictor) with identical random weights, eval mode.

    Random object-score heads call half the objects absent (and SAM2 then outputs a constant); ``object_bias`` is
    added to that head's last bias so masks are really tracked, as a trained model would.
    """
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    from sam2_ext.build import build_icl_predictor

    torch.manual_seed(seed)
    ours = build_icl_predictor(config, "cpu", image_size=image_size).eval()
    with torch.no_grad():
        ours.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.add_(object_bias)
    official = build_icl_predictor(config, "cpu", image_size=image_size, predictor_cls=SAM2VideoPredictor).eval()
    official.load_state_dict(ours.state_dict())
    return ours, official


def run_official(model, frames: torch.Tensor, video_hw: tuple[int, int],
                 prompts: Mapping[int, Mapping[int, torch.Tensor]], one_state: bool = True,
                 on_frame: Callable[[int, int, torch.Tensor], None] | None = None) -> dict[int, dict[int, torch.Tensor]]:
    """Run the official predictor on prepared ``frames`` [N, 3, S, S]: ``{class: {frame: logits [H, W]}}``.

    ``prompts``: {class: {frame: mask}}; empty masks are skipped. With ``on_frame(class, frame, logits)`` nothing is
    kept (memory benchmark) and the result stays empty.
    """
    import sam2.sam2_video_predictor as svp

    original = svp.load_video_frames
    svp.load_video_frames = lambda *a, **k: (frames, video_hw[0], video_hw[1])
    out: dict[int, dict[int, torch.Tensor]] = {c: {} for c in prompts}

    def take(cid: int, f: int, logits: torch.Tensor) -> None:
        if on_frame is None:
            out[cid][f] = logits.clone()
        else:
            on_frame(cid, f, logits)

    try:
        groups = [list(prompts)] if one_state else [[c] for c in prompts]
        for group in groups:
            state = model.init_state(video_path="<frames injected>")
            for cid in group:
                for z in sorted(prompts[cid]):
                    mask = torch.as_tensor(prompts[cid][z])
                    if mask.any():
                        model.add_new_mask(state, z, cid, mask)
            for f, obj_ids, masks in model.propagate_in_video(state):
                for i, cid in enumerate(obj_ids):
                    take(cid, f, masks[i, 0])
    finally:
        svp.load_video_frames = original
    return out
