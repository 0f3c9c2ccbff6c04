"""P3: peak memory (RSS) of full-volume inference vs the query's depth, ours vs the official SAM2VideoPredictor.

One phantom CT scan is resampled along its slice axis to 64 and to 512 slices (the query); the support is the
original scan with its label (another file, so support slices are prepended); ``ours_both``: the query is its own
support (its label resampled the same way), tracked both ways. Every (method, depth) runs in a fresh
subprocess that reports its peak RSS (``resource.ru_maxrss``) and its RSS after imports and model build (base).
Ours streams slices through a lazy frame source and keeps a uint8 label map; the official predictor is given the
whole prepared video (``load_video_frames`` monkeypatched, as it would load a JPEG folder) and run once per class
(``bench/official.py``).
Target: ours flat within ±20 % between 64 and 512 slices. Tiny config, random weights.

    .venv/bin/python bench/bench_memory.py [--depths 64,512] [--image-size 128] [--methods ours,ours_both,official]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CLASSES = ("ellipsoid", "box", "tube")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def make_inputs(work: Path, depths: list[int], inplane: int = 96, base_depth: int = 64) -> dict:
    """Support scan + label (``base_depth`` slices) and one query per depth (the same scan resampled in z)."""
    import nibabel as nib
    from scipy import ndimage

    from icl.data.phantom import make_case

    work.mkdir(parents=True, exist_ok=True)
    images, label, affine = make_case(0, seed=0, shape=(inplane, inplane, base_depth), classes=CLASSES)
    image = images[0]
    paths = {"support": work / "support.nii.gz", "support_label": work / "support_label.nii.gz"}
    nib.save(nib.Nifti1Image(image, affine), str(paths["support"]))
    nib.save(nib.Nifti1Image(label, affine), str(paths["support_label"]))
    for d in depths:
        zoomed = ndimage.zoom(image.astype(np.float32), (1, 1, d / base_depth), order=1).round().astype(np.int16)
        zoomed_label = ndimage.zoom(label, (1, 1, d / base_depth), order=0)
        aff = affine.copy()
        aff[:3, 2] *= base_depth / d
        paths[f"query_{d}"] = work / f"query_{d}.nii.gz"
        paths[f"query_label_{d}"] = work / f"query_label_{d}.nii.gz"  # both ways: the query is its own support
        nib.save(nib.Nifti1Image(zoomed, aff), str(paths[f"query_{d}"]))
        nib.save(nib.Nifti1Image(zoomed_label, aff), str(paths[f"query_label_{d}"]))
    return {k: str(v) for k, v in paths.items()}


def child_ours(a: argparse.Namespace) -> dict:
    import torch

    from icl.api import ICLSegmenter

    torch.manual_seed(0)
    seg = ICLSegmenter(checkpoint="none", config=a.config, device="cpu", image_size=a.image_size)
    with torch.no_grad():  # random object-score heads: bias them to "present" so masks are tracked
        seg.predictor.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.add_(5.0)
    base = _rss_mb()
    t0 = time.perf_counter()
    result = seg.segment(query=a.query, support=a.support, support_label=a.support_label)
    return {"base": base, "seconds": time.perf_counter() - t0, "fg": int((result.labels > 0).sum())}


def child_official(a: argparse.Namespace) -> dict:
    import torch
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    from bench.official import run_official
    from icl.infer.segmenter import ConcatFrames, PreparedFrames
    from icl.infer.support import choose_support_slices, load_support
    from icl.data.frames import Scan, VolumeFrames, label_slices
    from sam2_ext.build import build_icl_predictor

    torch.manual_seed(0)
    model = build_icl_predictor(a.config, "cpu", image_size=a.image_size, predictor_cls=SAM2VideoPredictor).eval()
    with torch.no_grad():
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.add_(5.0)
    base = _rss_mb()
    t0 = time.perf_counter()
    s_scan, label_scan, label, classes = load_support(a.support, a.support_label)
    picks = choose_support_slices(label, 2, 3)
    q = Scan.open(a.query)
    sup = VolumeFrames(s_scan, "auto", model.image_size, indices=picks)
    qry = VolumeFrames(q, "auto", model.image_size)
    video = ConcatFrames(PreparedFrames(sup), PreparedFrames(qry))
    frames = torch.stack([video[i] for i in range(len(video))])  # what load_video_frames would hold
    masks = label_slices(label_scan, 2, picks, model.image_size)
    prompts = {c: {i: torch.from_numpy(masks[i] == c) for i in range(len(picks))} for c in classes}
    hw = qry.in_plane_shape
    out = np.zeros(q.canonical_shape, np.uint8)
    best = np.full(q.canonical_shape, -np.inf, np.float32)

    def fold(c: int, f: int, logits) -> None:  # compact accumulation, as ours does
        if f >= len(picks):
            z, lg = f - len(picks), logits.float().numpy()
            win = (lg > 0) & (lg > best[..., z])
            out[..., z][win] = c
            best[..., z] = np.maximum(best[..., z], lg)

    # one state per class: with all classes in one state sam2 tracks a class on slices before its first mask and
    # crashes on the CPU there (its bf16 memories meet float32 layers without an object pointer to promote them)
    run_official(model, frames, hw, prompts, one_state=False, on_frame=fold)
    return {"base": base, "seconds": time.perf_counter() - t0, "fg": int((out > 0).sum())}


def run_child(method: str, depth: int, paths: dict, a: argparse.Namespace) -> dict:
    """One run in a fresh process. ``ours_both``: the query is its own support (3 slices per class), tracked
    both ways, so the forward pass's logits wait for the reverse pass (``sam2_ext.pass_store``)."""
    query = paths[f"query_{depth}"]
    support, label = (query, paths[f"query_label_{depth}"]) if method == "ours_both" else \
        (paths["support"], paths["support_label"])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--query", query,
           "--support", support, "--support-label", label,
           "--config", a.config, "--image-size", str(a.image_size), "--threads", str(a.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", default="64,512")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--config", default="tiny_cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="/tmp/bench_memory")
    p.add_argument("--methods", default="ours,ours_both,official")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--query", default=None, help=argparse.SUPPRESS)
    p.add_argument("--support", default=None, help=argparse.SUPPRESS)
    p.add_argument("--support-label", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        import torch

        torch.set_num_threads(a.threads)
        res = (child_official if a.child == "official" else child_ours)(a)
        res["peak"] = _rss_mb()
        print(json.dumps(res))
        return 0

    depths = [int(d) for d in a.depths.split(",")]
    paths = make_inputs(Path(a.work), depths)
    methods = a.methods.split(",")
    rows = {}
    for m in methods:
        for d in depths:
            rows[m, d] = run_child(m, d, paths, a)
    print(f"## P3: peak RSS vs query depth ({a.config} @ {a.image_size}, {len(CLASSES)} classes, "
          f"{a.threads} thread(s), fresh process per run)\n")
    print("| method | slices | peak RSS (MiB) | after model build (MiB) | inference (MiB) | seconds |")
    print("|---|---|---|---|---|---|")
    for (m, d), r in rows.items():
        print(f"| {m} | {d} | {r['peak']:.0f} | {r['base']:.0f} | {r['peak'] - r['base']:.0f} | {r['seconds']:.1f} |")
    print()
    lo, hi = min(depths), max(depths)
    for m in methods:
        ratio = rows[m, hi]["peak"] / rows[m, lo]["peak"]
        grow = (rows[m, hi]["peak"] - rows[m, hi]["base"]) - (rows[m, lo]["peak"] - rows[m, lo]["base"])
        print(f"- {m}: peak RSS {hi} vs {lo} slices = {ratio:.3f}x ({100 * (ratio - 1):+.1f} %), "
              f"inference memory grows by {grow:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
