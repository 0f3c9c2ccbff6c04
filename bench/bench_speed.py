"""Time per frame of the engine: inference (no_grad tracking) and a training step (forward + backward).

One object, the engine's rule (``sam2_ext.track.track``, support frame first, forward), random weights, frames
already at the model's size. Training: train mode, a Dice + BCE loss on every query slice's logits, backward;
the optimizer step is left out (it does not scale with frames). Best of ``--repeats`` (the CPU is shared).

    .venv/bin/python bench/bench_speed.py [--config tiny_cpu] [--image-size 128] [--frames 9] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny_cpu")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--frames", type=int, default=9, help="1 support + N-1 query frames")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from monai.losses import DiceLoss

    from bench.bench_inference import grid_volume
    from bench.official import build_pair
    from sam2_ext.track import to_size, track

    model, _ = build_pair(a.config, a.image_size)
    image, label = grid_volume(a.frames, a.image_size, 1)
    frames, target = torch.from_numpy(image), torch.from_numpy((label[1:] > 0).astype("float32"))
    prompts = {1: {0: torch.from_numpy(label[0] == 1)}}
    dice = DiceLoss(sigmoid=True)

    def infer() -> None:
        model.eval()
        list(track(model, frames, prompts, "forward"))

    def train_step() -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        results = sorted(track(model, frames, prompts, "forward", grad=True), key=lambda r: r.index)[1:]
        logits = to_size(torch.stack([r.logits[0] for r in results]), target.shape[-2:])
        loss = dice(logits[:, None], target[:, None]) + torch.nn.functional.binary_cross_entropy_with_logits(
            logits, target)
        loss.backward()

    best = {}
    for _ in range(a.repeats):
        for name, run in (("inference (no_grad)", infer), ("training forward + backward", train_step)):
            t0 = time.perf_counter()
            run()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    print(f"## Time per frame: {a.config} @ {a.image_size}, 1 object, {a.frames} frames, {a.threads} thread(s), "
          f"best of {a.repeats}\n")
    print("| what | ms per frame |")
    print("|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {1000 * seconds / a.frames:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
