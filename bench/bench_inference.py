"""P1: full-volume multi-class inference, ours (one pass, all classes) vs the official SAM2VideoPredictor per class.

Both get the same frames (support slices then query slices, prepared once and injected into the official
``init_state`` by monkeypatching ``sam2.sam2_video_predictor.load_video_frames``) and the same weights; the official
predictor is prompted with ``add_new_mask`` on the support frames and run with ``propagate_in_video`` once per class.
Prints markdown tables: equality (max |Δ| of logits, mask agreement) and speed ratio, then time per slice vs memory
budget (selector) and image size. Random weights (tiny config); ratios come from one run.

    .venv/bin/python bench/bench_inference.py [--depth 48] [--classes 3] [--threads 1] [--config tiny_cpu]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from icl.api import ConcatFrames, VolumeFrames, run_prepended  # noqa: E402


def official_per_class(model, frames: torch.Tensor, video_hw: tuple[int, int],
                       prompts: dict[int, dict[int, np.ndarray]],
                       on_frame=None) -> dict[int, dict[int, torch.Tensor]]:
    """Run the official predictor once per class on ``frames`` [N, 3, S, S]: {class: {frame: logits [H, W]}}.

    With ``on_frame(class, frame, logits)`` nothing is kept (memory benchmark) and the dicts stay empty."""
    import sam2.sam2_video_predictor as svp

    original = svp.load_video_frames
    svp.load_video_frames = lambda *a, **k: (frames, video_hw[0], video_hw[1])
    out: dict[int, dict[int, torch.Tensor]] = {}
    try:
        for cid, per_frame in prompts.items():
            state = model.init_state(video_path="<frames injected>")
            for z in sorted(per_frame):
                if per_frame[z].any():
                    model.add_new_mask(state, z, 1, torch.from_numpy(np.ascontiguousarray(per_frame[z])))
            out[cid] = {}
            for f, _, masks in model.propagate_in_video(state):
                if on_frame is None:
                    out[cid][f] = masks[0, 0].clone()
                else:
                    on_frame(cid, f, masks[0, 0])
    finally:
        svp.load_video_frames = original
    return out


def ours_logits(model, support: VolumeFrames, masks: dict[int, list[np.ndarray]], query: VolumeFrames,
                video_hw: tuple[int, int], keep: bool = True) -> dict[int, torch.Tensor]:
    """Our one pass; {query slice: logits [C, H, W]} (``keep=False`` drops them: timing only)."""
    got: dict[int, torch.Tensor] = {}

    def write(z: int, logits: torch.Tensor) -> None:
        if keep:
            got[z] = logits.clone()

    with torch.no_grad():
        run_prepended(model, support, masks, query, video_hw, write)
    return got


def phantom_volume(depth: int, size: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[Z, H, W] image in [0, 1] and uint8 label with ``classes`` drifting discs of different brightness."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = 0.15 + 0.05 * rng.random((depth, size, size), dtype=np.float32)
    label = np.zeros((depth, size, size), np.uint8)
    for c in range(1, classes + 1):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        vy, vx = rng.uniform(-0.3, 0.3, 2) * size / depth
        r = size * rng.uniform(0.08, 0.15)
        for z in range(depth):
            disc = (yy - cy - vy * z) ** 2 + (xx - cx - vx * z) ** 2 <= r * r
            label[z][disc] = c
            image[z][disc] = 0.3 + 0.2 * c
    return image.clip(0, 1), label


def build_pair(config: str, image_size: int, seed: int = 0):
    """(ours ICLPredictor, official SAM2VideoPredictor) with identical random weights, eval mode."""
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    from sam2_ext.build import build_icl_predictor

    torch.manual_seed(seed)
    ours = build_icl_predictor(config, "cpu", image_size=image_size).eval()
    with torch.no_grad():  # random object-score heads say "absent" half the time; bias them to "present"
        ours.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.add_(5.0)
    official = build_icl_predictor(config, "cpu", image_size=image_size, predictor_cls=SAM2VideoPredictor).eval()
    official.load_state_dict(ours.state_dict())
    return ours, official


def setup(depth: int, size: int, classes: int, image_size: int, support_per_class: int = 2):
    """Support frames/masks from one phantom scan, query frames from another, as the CLI builds them."""
    from icl.api import choose_support_slices

    s_img, s_lab = phantom_volume(depth, size, classes, seed=1)
    q_img, _ = phantom_volume(depth, size, classes, seed=2)
    picks = choose_support_slices(s_lab, 0, support_per_class)
    support = VolumeFrames(s_img, 0, (0.0, 1.0), image_size, indices=picks)
    query = VolumeFrames(q_img, 0, (0.0, 1.0), image_size)
    masks = {c: [s_lab[z] == c for z in picks] for c in range(1, classes + 1)}
    return support, masks, query, picks


def compare(depth: int, size: int, classes: int, image_size: int, config: str, repeats: int = 2) -> dict:
    """Time both methods ``repeats`` times, alternating (best time of each counts: the CPU is shared and noisy).

    The official timing includes preparing the whole video (what its ``init_state`` does when loading frames);
    ours prepares each slice lazily inside its pass.
    """
    ours, official = build_pair(config, image_size)
    support, masks, query, picks = setup(depth, size, classes, image_size)
    n = len(support)
    prompts = {c: dict(enumerate(m)) for c, m in masks.items()}
    video = ConcatFrames(support, query)
    ours_logits(ours, support, masks, query, (size, size))  # warm-up (allocator, lazy inits)
    t_ours, t_official = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        got = ours_logits(ours, support, masks, query, (size, size))
        t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        frames = torch.stack([video[i] for i in range(len(video))])
        ref = official_per_class(official, frames, (size, size), prompts)
        t_official.append(time.perf_counter() - t0)
    max_diff, agree, total = 0.0, 0, 0
    for z, logits in got.items():
        for ci, c in enumerate(masks):
            r = ref[c][z + n].float()
            max_diff = max(max_diff, float((logits[ci] - r).abs().max()))
            agree += int(((logits[ci] > 0) == (r > 0)).sum())
            total += r.numel()
    return {"t_ours": min(t_ours), "t_official": min(t_official), "max_diff": max_diff, "agree": agree / total,
            "slices": len(query), "support": n}


def time_per_slice(depth: int, size: int, classes: int, image_size: int, config: str, selector: str | None,
                   repeats: int = 2) -> float:
    """Best-of-``repeats`` seconds per frame (support + query) of our one pass with a memory selector."""
    from sam2_ext.selector import MemorySelector

    ours, _ = build_pair(config, image_size)
    ours.memory_selector = MemorySelector.from_name(selector) if selector else None
    support, masks, query, _ = setup(depth, size, classes, image_size)
    ours_logits(ours, support, masks, query, (size, size), keep=False)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        ours_logits(ours, support, masks, query, (size, size), keep=False)
        best = min(best, time.perf_counter() - t0)
    return best / (len(support) + len(query))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=48, help="query slices")
    p.add_argument("--size", type=int, default=96, help="in-plane voxels of the phantom")
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--config", default="tiny_cpu")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--sizes", default="128,256", help="image sizes for the time-per-slice table")
    p.add_argument("--budgets", default="none,1,3,6", help="selector budgets ('none' = SAM2's own memory)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="best of N timings (shared CPUs are noisy)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    r = compare(a.depth, a.size, a.classes, a.image_size, a.config, a.repeats)
    print(f"## P1: {a.classes}-class full-volume inference, {a.depth} query + {r['support']} support slices, "
          f"{a.config} @ {a.image_size}, {a.threads} thread(s), best of {a.repeats}, random weights\n")
    print("| method | seconds | s / query slice | speed-up |")
    print("|---|---|---|---|")
    print(f"| official SAM2VideoPredictor, once per class | {r['t_official']:.2f} | "
          f"{r['t_official'] / r['slices']:.4f} | 1.00x |")
    print(f"| ours, one pass (all classes) | {r['t_ours']:.2f} | {r['t_ours'] / r['slices']:.4f} | "
          f"{r['t_official'] / r['t_ours']:.2f}x |")
    print(f"\nmax |Δ logits| ours vs official: {r['max_diff']:.3g}; mask agreement {100 * r['agree']:.4f} %\n")

    budgets = [None if b == "none" else f"scored:budget={b}" for b in a.budgets.split(",")]
    sizes = [int(s) for s in a.sizes.split(",")]
    print("## Time per slice (s, all classes, one pass) vs memory budget and image size\n")
    print("| memory | " + " | ".join(f"image {s}" for s in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for b in budgets:
        cells = [f"{time_per_slice(a.depth, a.size, a.classes, s, a.config, b, a.repeats):.4f}" for s in sizes]
        print(f"| {b or 'SAM2 recency (6)'} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
