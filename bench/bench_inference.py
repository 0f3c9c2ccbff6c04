"""P1: time per slice vs number of classes — ours (all classes as one batch) vs the official SAM2VideoPredictor.

Baselines, all on the same prepared frames with the same weights (``bench/official.py``):
* official, one state: every class an object of one state (sam2's own multi-object mode; it already shares the
  image encoder between objects, then runs memory attention, decoder and memory encoder once per object);
* official, per class: one state per class (the whole video once per class).
Ours: ``sam2_ext.track.track`` (the engine's one propagation rule), every class through memory attention, mask
decoder and memory encoder as one batch.

The volume: a grid of discs, one per class, drifting over ``--support + --query`` slices; the support slices come
first (as ``icl.segment`` does with support from another scan) and every class is present on each, so all three
methods track every class over the same slices and their logits are comparable (max |Δ| is printed). Random weights
(object-score head biased to "present"). Methods alternate, best of ``--repeats`` counts (the CPU is shared).

    .venv/bin/python bench/bench_inference.py [--configs tiny_cpu@128,sam2.1_hiera_t@256] [--classes 1,3,10,30]
        [--query 12] [--support 2] [--repeats 2] [--per-class-max 10] [--threads 1]
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

from bench.official import build_pair, run_official  # noqa: E402


def grid_volume(depth: int, size: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[Z, S, S] image in [0, 1] and label: one disc per class on a grid, each drifting a little per slice."""
    rng = np.random.default_rng(seed)
    cols = int(np.ceil(np.sqrt(classes)))
    cell = size / cols
    yy, xx = np.mgrid[:size, :size]
    image = (0.15 + 0.05 * rng.random((depth, size, size))).astype(np.float32)
    label = np.zeros((depth, size, size), np.uint8)
    for c in range(classes):
        cy, cx = (c // cols + 0.5) * cell, (c % cols + 0.5) * cell
        vy, vx = rng.uniform(-0.1, 0.1, 2) * cell / max(depth, 1)
        r = cell * rng.uniform(0.22, 0.32)
        for z in range(depth):
            disc = (yy - cy - vy * z) ** 2 + (xx - cx - vx * z) ** 2 <= r * r
            label[z][disc] = c + 1
            image[z][disc] = 0.35 + 0.5 * rng.random()
    return image.clip(0, 1), label


def run_ours(model, frames: torch.Tensor, prompts: dict) -> dict[int, torch.Tensor]:
    """{frame: low-res logits [C, h, w]} of the engine's rule (support frames first, forward)."""
    from sam2_ext.track import track

    return {r.index: r.logits for r in track(model, frames, prompts, "forward")}


def measure(config: str, size: int, classes: int, a: argparse.Namespace, pair) -> dict:
    """Times (best of repeats) and the largest logit difference ours vs official (one state)."""
    from sam2_ext.predictor import prepare_frames
    from sam2_ext.track import to_size

    ours, official = pair
    image, label = grid_volume(a.support + a.query, size, classes, seed=classes)
    frames = torch.from_numpy(image)
    prepared = prepare_frames(frames, size, ours.input_rule)  # the config's input rule, as track() prepares them
    prompts = {c: {z: torch.from_numpy(label[z] == c) for z in range(a.support)} for c in range(1, classes + 1)}
    methods = {"ours": lambda: run_ours(ours, frames, prompts),
               "official_one_state": lambda: run_official(official, prepared, (size, size), prompts)}
    if classes <= a.per_class_max:
        methods["official_per_class"] = lambda: run_official(official, prepared, (size, size), prompts, False)
    best: dict[str, float] = {}
    results: dict[str, object] = {}
    with torch.no_grad():
        for _ in range(a.repeats):
            for name, run in methods.items():
                t0 = time.perf_counter()
                results[name] = run()
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    ours_out, ref = results["ours"], results["official_one_state"]
    delta, agree = 0.0, []
    for f in range(a.support, a.support + a.query):
        mine = to_size(ours_out[f], (size, size))
        for col, c in enumerate(prompts):
            delta = max(delta, (mine[col] - ref[c][f]).abs().max().item())
            agree.append(((mine[col] > 0) == (ref[c][f] > 0)).float().mean().item())
    return {"seconds": best, "delta": delta, "agree": float(np.mean(agree))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="tiny_cpu@128,sam2.1_hiera_t@256")
    p.add_argument("--classes", default="1,3,10,30")
    p.add_argument("--query", type=int, default=12)
    p.add_argument("--support", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--per-class-max", type=int, default=10, help="skip the per-class baseline above this many")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    counts = [int(c) for c in a.classes.split(",")]
    print(f"## P1: seconds per query slice vs classes ({a.support} support + {a.query} query slices, "
          f"{a.threads} thread(s), best of {a.repeats})\n")
    print("| config @ size | classes | official, per class | official, one state | ours (one batch) | "
          "speed-up vs one state | vs per class | max \\|Δ logits\\| | mask agreement |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in a.configs.split(","):
        config, size = spec.split("@")
        pair = build_pair(config, int(size))
        for classes in counts:
            r = measure(config, int(size), classes, a, pair)
            s = {k: v / a.query for k, v in r["seconds"].items()}
            per_class = s.get("official_per_class")
            per_class_cells = ("—", "—") if per_class is None else (f"{per_class:.3f}", f"{per_class / s['ours']:.2f}×")
            print(f"| {config} @ {size} | {classes} | {per_class_cells[0]} | {s['official_one_state']:.3f} | "
                  f"{s['ours']:.3f} | **{s['official_one_state'] / s['ours']:.2f}×** | {per_class_cells[1]} | "
                  f"{r['delta']:.2g} | {100 * r['agree']:.2f} % |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
