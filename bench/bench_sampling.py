"""Benchmark of the data pipeline: (1) clip sampling from the preprocessed cache vs decoding the NIfTI per sample,
(2) peak RSS of chunked combined loading for two dataset sizes (each in its own subprocess).

    .venv/bin/python bench/bench_sampling.py [--clips 100] [--small 8] [--large 32] [--chunk 4] [--work DIR]

Prints a markdown table. Both paths of (1) produce the same clips (checked), so the ratio is like for like.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from icl.data.loaders import ICLDataset, open_caches  # noqa: E402
from icl.data.phantom import make_phantom_dataset  # noqa: E402
from icl.data.frames import Scan, VolumeFrames, label_slices  # noqa: E402
from icl.data.preprocess import CachedCase, open_cache, preprocess_dataset  # noqa: E402
from icl.data.sampling import extract_object  # noqa: E402
from icl.data.validate import check_label  # noqa: E402

SHAPE = (96, 96, 40)
IMAGE_SIZE = 128
VIDEO_LENGTH = 8


def build(work: Path, cases: int, tag: str) -> Path:
    """Phantom BTCV dataset + its cache (reused across runs)."""
    src, cache = work / f"btcv_{tag}", work / f"cache_{tag}"
    if not (src / "img").is_dir() or len(list((src / "img").glob("*.nii.gz"))) != cases:
        make_phantom_dataset(src, "btcv", cases, seed=0, shape=SHAPE)
    preprocess_dataset("btcv", src, cache, image_size=IMAGE_SIZE, progress=False)
    return cache


def clip_from_nifti(case: CachedCase, idx: np.ndarray, class_id: int) -> tuple[np.ndarray, np.ndarray]:
    """What sampling costs without a cache: decode + validate both files, then the CLI's frames of the clip."""
    m = case.meta
    image, label = Scan.open(m["source"]["image"]["path"]), Scan.open(m["source"]["label"]["path"])
    check_label(label.canonical, label.path)
    img = VolumeFrames(image, m["window_name"], IMAGE_SIZE, m["slice_axis"], indices=idx).stack()
    lab = label_slices(label, m["slice_axis"], idx, IMAGE_SIZE)
    return img, (lab == class_id).astype(np.float32)


def clip_from_cache(path: Path, idx: np.ndarray, class_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The cached path, opened afresh per sample (meta + memmap) so it is not flattered by warm objects."""
    case = CachedCase(path)
    return np.ascontiguousarray(case.image[idx]), case.mask(class_id, idx)


def bench_speed(cache: Path, n_clips: int) -> dict[str, float]:
    cases, _ = open_cache(cache)
    rng = np.random.default_rng(0)
    clips = []
    for _ in range(n_clips):
        case = cases[int(rng.integers(len(cases)))]
        cid = int(rng.choice(case.class_ids()))
        clips.append((case, cid, extract_object(case, cid, VIDEO_LENGTH, rng)))
    t0 = time.perf_counter()
    cached = [clip_from_cache(c.path, idx, cid) for c, cid, idx in clips]
    t_cache = time.perf_counter() - t0
    t0 = time.perf_counter()
    raw = [clip_from_nifti(c, idx, cid) for c, cid, idx in clips]
    t_nifti = time.perf_counter() - t0
    for (a_img, a_lab), (b_img, b_lab) in zip(cached, raw):  # same clips, same contents
        assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    return {"cache_ms": 1e3 * t_cache / n_clips, "nifti_ms": 1e3 * t_nifti / n_clips, "ratio": t_nifti / t_cache}


def rss_child(caches: list[str], chunk: int | None) -> None:
    """Run in a subprocess: iterate one full round of chunks and print peak RSS (MiB) as JSON."""
    import psutil

    cases, _ = open_caches(caches)
    base = psutil.Process().memory_info().rss
    ds = ICLDataset(cases, video_length=VIDEO_LENGTH, num_support=2, chunk_size=chunk, seed=0)
    if chunk is None:  # the naive alternative: every case held in RAM
        for c in cases:
            c.load()
    peak = 0
    for epoch in range(ds.num_chunks):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            ds[i]
            peak = max(peak, psutil.Process().memory_info().rss)
    print(json.dumps({"base_mib": base / 2**20, "peak_mib": peak / 2**20,
                      "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "resident": len(ds.resident_ids()), "cases": len(cases)}))


def measure_rss(cache: Path, chunk: int | None) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--rss-child", str(cache), "--chunk", str(chunk or 0)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clips", type=int, default=100)
    p.add_argument("--small", type=int, default=8)
    p.add_argument("--large", type=int, default=32)
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--work", default=None, help="folder for phantom data + caches (default: a temp folder)")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rss_child:
        rss_child([a.rss_child], a.chunk or None)
        return
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench_sampling_"))
    small, large = build(work, a.small, "small"), build(work, a.large, "large")
    speed = bench_speed(small, a.clips)
    print(f"\n### Clip sampling ({a.clips} clips of {VIDEO_LENGTH} slices, {SHAPE} NIfTI → {IMAGE_SIZE}², CPU)\n")
    print("| path | ms / clip |\n|---|---|")
    print(f"| NIfTI decode + window + resize per sample | {speed['nifti_ms']:.1f} |")
    print(f"| preprocessed cache (memmap) | {speed['cache_ms']:.2f} |")
    print(f"| **speed-up** | **{speed['ratio']:.0f}×** |")
    print(f"\n### Peak RSS over one round of epochs (chunk_size={a.chunk}), separate processes\n")
    print("| cases | mode | RSS before data (MiB) | peak RSS (MiB) | growth (MiB) | resident cases at end |")
    print("|---|---|---|---|---|---|")
    for n, cache in [(a.small, small), (a.large, large)]:
        for chunk in (a.chunk, None):
            r = measure_rss(cache, chunk)
            mode = f"chunked ({chunk})" if chunk else "all in RAM"
            print(f"| {n} | {mode} | {r['base_mib']:.0f} | {r['peak_mib']:.0f} | "
                  f"{r['peak_mib'] - r['base_mib']:.0f} | {r['resident']} |")


if __name__ == "__main__":
    main()
