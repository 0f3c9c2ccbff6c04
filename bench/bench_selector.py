"""Benchmark the memory selectors side by side: 3D Dice and time per slice in the full-volume protocol.

Why: the scored selector only earns its place if it beats SAM2's recency memory where it matters (whole volumes,
where early mistakes propagate); the oracle (GT-IoU scores) bounds what any memory choice could gain.

    python bench/bench_selector.py                                  # phantom data, tiny config, random weights
    python bench/bench_selector.py --checkpoint runs/x/best.pth --config sam2.1_hiera_t --image-size 512 \\
        --data datasets/kits --layout kits --cases 10 --selectors recency scored scored:budget=3 oracle

Every query volume is segmented whole (all slices in order, the class present or not) from ``--num-support``
slices of another case; Dice is computed on the whole 3D volume per (case, class) at logit > 0.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from icl.data.loaders import ICLDataset  # noqa: E402
from icl.data.phantom import make_phantom_dataset  # noqa: E402
from icl.data.preprocess import open_cache, preprocess_dataset  # noqa: E402
from icl.engine.eval.metrics import case_class_metrics, logits_to_mask  # noqa: E402
from icl.errors import InputError  # noqa: E402
from icl.io import write_text  # noqa: E402
from sam2_ext.build import build_icl_predictor  # noqa: E402
from sam2_ext.icl import segment_with_support  # noqa: E402
from sam2_ext.selector import MemorySelector  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="dataset folder (default: a phantom made in a temp folder)")
    p.add_argument("--layout", default="kits", help="dataset layout of --data (kits, btcv, msd, nnunet)")
    p.add_argument("--cases", type=int, default=3, help="phantom cases to make (without --data)")
    p.add_argument("--shape", default="64,64,24", help="phantom X,Y,Z voxels (without --data)")
    p.add_argument("--cache-size", type=int, default=128, help="in-plane size of the preprocessed slices")
    p.add_argument("--config", default="tiny_cpu", help="model config (cfg/ name or yaml path)")
    p.add_argument("--checkpoint", default=None, help="trained weights; default random weights (Dice ~ meaningless)")
    p.add_argument("--image-size", type=int, default=None, help="model input size (default: the config's)")
    p.add_argument("--num-support", type=int, default=1, help="support slices from another case")
    p.add_argument("--selectors", nargs="+", default=["recency", "scored", "oracle"],
                   help="-memory_selector values to compare, e.g. recency scored:budget=3 oracle")
    p.add_argument("--max-samples", type=int, default=None, help="stop after this many (case, class) volumes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="also write the markdown tables here")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _TimedSelector:
    """Stands in for a selector on the predictor and adds up the time spent choosing memories (its overhead)."""

    def __init__(self, selector: MemorySelector, device: torch.device):
        self.selector, self.device, self.seconds = selector, device, 0.0

    def select(self, **kwargs: Any) -> dict:
        _sync(self.device)
        start = time.perf_counter()
        view = self.selector.select(**kwargs)
        _sync(self.device)
        self.seconds += time.perf_counter() - start
        return view


def run_sample(predictor: Any, selector: MemorySelector, sample: dict) -> dict[str, Any]:
    """Segment one query volume with ``selector``: 3D Dice, seconds per query slice (all of it, and the selector's
    share) and the mean number of frame memories attended."""
    cid = sample["class_id"]
    support, support_gt, query, truth = (sample[k] for k in ("support_image", "support_label", "image", "label"))
    if selector.config.policy == "oracle":  # video frames = support slices, then the query slices
        n_sup = len(support)
        gt = {s: support_gt[s] for s in range(n_sup)}
        gt.update({n_sup + z: truth[z] for z in range(len(query))})
        selector.attach_ground_truth(None, cid, gt)
    selector.history.clear()
    device = predictor.device
    timed = _TimedSelector(selector, device)
    predictor.memory_selector = timed
    try:
        _sync(device)
        start = time.perf_counter()
        out = segment_with_support(predictor, support.to(device), {cid: support_gt.to(device)}, query.to(device))
        _sync(device)
        elapsed = time.perf_counter() - start
    finally:
        predictor.memory_selector = None
    pred = logits_to_mask(out["logits"][:, 0]).cpu()
    dice = case_class_metrics(pred, truth > 0.5, spacing=(1.0, 1.0, 1.0))["dice"]
    mems = [len(s.memory_frames) for s in selector.history]
    return {"dice": float(dice), "sec_per_slice": elapsed / len(query), "select_sec_per_slice":
            timed.seconds / len(query), "memories": statistics.fmean(mems) if mems else 0.0,
            "chosen": {s.frame_idx: frozenset(s.memory_frames) for s in selector.history}}


def differs_from(rows: list[dict], name: str, ref: str) -> float | None:
    """Fraction of tracked frames on which selector ``name`` attended other frame memories than ``ref``."""
    pairs = {}
    for r in rows:
        if r["selector"] in (name, ref):
            pairs.setdefault((r["case"], r["class_id"]), {})[r["selector"]] = r["chosen"]
    diff = total = 0
    for per in pairs.values():
        if name in per and ref in per:
            for t, chosen in per[name].items():
                total += 1
                diff += chosen != per[ref].get(t)
    return diff / total if total else None


def _fmt(values: list[float]) -> str:
    vals = [v for v in values if v == v]  # drop NaN (class absent from the query and predicted absent)
    if not vals:
        return "n/a"
    sd = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals):.4f} ± {sd:.4f}"


def markdown_tables(rows: list[dict], selectors: list[str], header: str) -> str:
    """Summary table (one row per selector) and the per-volume Dice table."""
    lines = [header, "", "| selector | Dice (mean ± sd) | volumes | ms / slice | of which selecting | "
                         "frame memories attended | frames choosing other memories than `recency` |",
             "|---|---|---|---|---|---|---|"]
    for name in selectors:
        mine = [r for r in rows if r["selector"] == name]
        diff = differs_from(rows, name, "recency")
        lines.append(f"| `{name}` | {_fmt([r['dice'] for r in mine])} | {len(mine)} | "
                     f"{1000 * statistics.fmean(r['sec_per_slice'] for r in mine):.1f} | "
                     f"{1000 * statistics.fmean(r['select_sec_per_slice'] for r in mine):.2f} | "
                     f"{statistics.fmean(r['memories'] for r in mine):.2f} | "
                     f"{'n/a' if diff is None else f'{100 * diff:.0f} %'} |")
    lines += ["", "| case | class | slices | " + " | ".join(f"`{s}`" for s in selectors) + " |",
              "|---|---|---|" + "---|" * len(selectors)]
    keys = sorted({(r["case"], r["class_id"], r["slices"]) for r in rows})
    for case, cid, slices in keys:
        dice = {r["selector"]: r["dice"] for r in rows if (r["case"], r["class_id"]) == (case, cid)}
        lines.append(f"| {case} | {cid} | {slices} | " + " | ".join(f"{dice[s]:.4f}" for s in selectors) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        selectors = {name: MemorySelector.from_name(name, record=True) for name in args.selectors}
        shape = tuple(int(s) for s in args.shape.split(","))
        with tempfile.TemporaryDirectory(prefix="bench_selector_") as tmp:
            data = Path(args.data) if args.data else make_phantom_dataset(Path(tmp) / "phantom", args.layout,
                                                                          args.cases, args.seed, shape)
            if not data.exists():
                raise InputError(data, "dataset folder not found")
            preprocess_dataset(args.layout, data, Path(tmp) / "cache", image_size=args.cache_size, progress=False)
            cases, _label_map = open_cache(Path(tmp) / "cache")
            dataset = ICLDataset(cases, protocol="full_volume", num_support=args.num_support, seed=args.seed)
            torch.manual_seed(args.seed)
            device = torch.device(args.device)
            predictor = build_icl_predictor(args.config, device, args.checkpoint, args.image_size).eval()
            n = len(dataset) if args.max_samples is None else min(args.max_samples, len(dataset))
            rows = []
            for i in tqdm(range(n), desc="volumes", file=sys.stderr):
                sample = dataset[i]
                for name, sel in selectors.items():
                    rows.append({"selector": name, "case": sample["name"], "class_id": sample["class_id"],
                                 "slices": len(sample["image"]), **run_sample(predictor, sel, sample)})
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    weights = args.checkpoint or "random weights (untrained: Dice is not meaningful)"
    header = (f"Memory selectors, full-volume protocol: {len({r['case'] for r in rows})} cases, "
              f"{n} (case, class) volumes, config `{args.config}`, {weights}, device {device.type}, "
              f"{args.num_support} support slice(s) from another case.")
    text = markdown_tables(rows, list(selectors), header)
    print(text)
    if args.out:
        write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
