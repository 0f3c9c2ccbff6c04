"""Held-out shape class benchmark: does the model segment what its SUPPORT shows, or just "some object"?

Steps (each printed as it runs):

1. a BTCV-layout phantom dataset in which every volume holds all six shape classes (ids 1..6: ellipsoid, torus,
   tube, box, cone, twin_blobs), preprocessed at ``--image_size``;
2. training of the tiny model from random init with ``python -m icl.engine.train.loop -classes <all but the held-out>``
   under a wall-clock cap ``-time_limit_min`` (skipped with ``--checkpoint``);
3. on the validation cases of fold 0 (never trained on), per case and class, 3D Dice on the cache grid for

   * ``cross_case``: support slices from another (training) case, every slice of the query volume queried;
   * ``same_scan``: support slices from the query scan itself (``segment_volume_with_support``), scored on the
     slices that are NOT support slices;
   * the switch test: one pass per query volume with the support masks of every class; the support of class A is
     scored against the truth of A (should be high) and of every other class B (should be ~0).

    python bench/icl_heldout.py --out runs/heldout --minutes 15 --report runs/heldout/report.md

Dice is computed on the cache grid (``--image_size`` in-plane), not the NIfTI grid eval_3d.py uses.

Finding (tiny config, random init, <= 15 CPU minutes, 2026-11): every recipe tried (lr 1e-3, context clips, same-scan
supports, 128 px, no high-res skips) gives a support-AGNOSTIC model: both rows of the switch table are equal (logits
for support A vs B differ by ~1e-2 out of ~9). The switch test is the check to watch when trying longer training or
pretrained SAM2 weights (``--checkpoint``).
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from icl.data.vocabulary import SHAPES  # noqa: E402
from icl.data.preprocess import CachedCase, open_cache  # noqa: E402
from icl.model.dice import binary_dice as dice  # noqa: E402
from icl.data.sampling import make_splits, spread  # noqa: E402
from icl.errors import InputError  # noqa: E402
from icl.io import write_text  # noqa: E402


def run_cmd(cmd: list[str]) -> None:
    """Print a command (as a user would type it) and run it; a failure stops the benchmark."""
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode:
        raise SystemExit(f"error: command failed: {cmd[2] if len(cmd) > 2 else cmd[0]}")


def train_args(a: argparse.Namespace, data: Path, cache: Path, runs: Path) -> list[str]:
    """The training command line of the benchmark (also used in its report)."""
    classes = ",".join(str(c) for c in range(1, len(SHAPES) + 1) if c != a.heldout)
    return ["-exp_name", a.exp_name, "-dataset", "phantom", "-data_path", str(data), "-cache_dir", str(cache),
            "-pretrain", "none", "-config", a.config, "-gpu_device", "-1",
            "-image_size", str(a.image_size), "-out_size", str(a.image_size), "-video_length", str(a.video_length),
            "-num_support", str(a.num_support), "-support_instance", "none", "-folds", str(a.folds),
            "-classes", classes, "-query_mode", a.query_mode, "-same_case_support", str(a.same_case_support),
            "-classes_per_sample", str(a.classes_per_sample), "-lr", str(a.lr), "-warmup_epochs", "0.1",
            "-epochs", str(a.epochs), "-steps_per_epoch", str(a.steps_per_epoch), "-val_freq", str(a.epochs),
            "-val_samples", "20", "-time_limit_min", str(a.minutes), "-keep_epochs", "1", "-log_images", "0",
            "-wandb_enabled", "False", "-count_flops", "False", "-checkpoint_path", str(runs)]


def newest_run(runs: Path, exp_name: str) -> Path:
    found = sorted(runs.glob(f"{exp_name}_*/last.pth"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"error: no last.pth under {runs}")
    return found[-1]


def load_predictor(config: str, checkpoint: Path | None, image_size: int):
    from sam2_ext.build import build_icl_predictor

    return build_icl_predictor(config, device="cpu", checkpoint=checkpoint, image_size=image_size).eval()


def _t(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(arr, dtype=np.float32))  # a writable copy of the memory-mapped slices


def cross_case(predictor, query: CachedCase, support: CachedCase, classes: Sequence[int], num_support: int) -> dict:
    """Logits [Z, H, W] per support class: support slices of ``support``, every slice of ``query`` queried."""
    from sam2_ext.icl import segment_with_support

    sup_idx = {c: spread(support.slices_with(c), num_support) for c in classes}
    out = {}
    for c in classes:  # one pass per class: the support slices differ per class
        res = segment_with_support(predictor, _t(support.image[sup_idx[c]]), {c: _t(support.mask(c, sup_idx[c]))},
                                   _t(query.image[:]))
        out[c] = res["logits"][:, 0].numpy()
    return out


def same_scan(predictor, query: CachedCase, classes: Sequence[int], num_support: int) -> tuple[dict, dict]:
    """Logits per class from support slices of the query scan itself, and those slices (excluded from scoring)."""
    from sam2_ext.icl import segment_volume_with_support

    sup = {c: spread(query.slices_with(c), num_support) for c in classes}
    prompts = {c: {int(z): _t(query.mask(c, [int(z)])[0]) for z in sup[c]} for c in classes}
    res = segment_volume_with_support(predictor, _t(query.image[:]), prompts)
    return {c: res["logits"][:, i].numpy() for i, c in enumerate(classes)}, sup


def evaluate(predictor, cases: Sequence[CachedCase], support: CachedCase, classes: Sequence[int],
             heldout: int, num_support: int) -> pd.DataFrame:
    """One row per (case, protocol, support class, truth class) with Dice."""
    rows = []
    for case in cases:
        truth = {c: case.mask(c) > 0.5 for c in classes}
        logits = cross_case(predictor, case, support, classes, num_support)
        for s in classes:
            for t in classes:
                rows.append(dict(case=case.id, protocol="cross_case", support_class=s, truth_class=t,
                                 dice=dice(logits[s] > 0, truth[t])))
        logits, sup = same_scan(predictor, case, classes, num_support)
        for s in classes:
            keep = np.setdiff1d(np.arange(case.num_slices), sup[s])
            for t in classes:
                rows.append(dict(case=case.id, protocol="same_scan", support_class=s, truth_class=t,
                                 dice=dice(logits[s][keep] > 0, truth[t][keep])))
        case.release()
    df = pd.DataFrame(rows)
    df["heldout"] = df["support_class"] == heldout
    return df


def report(df: pd.DataFrame, heldout: int, names: dict[int, str], header: str) -> str:
    """Markdown: Dice on held-out vs trained classes per protocol, and the switch test."""
    match = df[df.support_class == df.truth_class]
    lines = [header, "", "| protocol | classes | Dice (mean ± std over cases) | n |", "|---|---|---|---|"]
    for protocol in ("cross_case", "same_scan"):
        for label, sel in ((f"held-out {heldout} ({names[heldout]})", True), ("trained (mean of 5)", False)):
            d = match[(match.protocol == protocol) & (match.heldout == sel)].dice.dropna()
            lines.append(f"| {protocol} | {label} | {d.mean():.3f} ± {d.std(ddof=0):.3f} | {len(d)} |")
    other = next(c for c in sorted(names) if c != heldout)
    lines += ["", f"Switch test (cross_case, same query volumes): support of class A → Dice against the truth of A "
              f"and of B; A = held-out {heldout} ({names[heldout]}), B = {other} ({names[other]}).", "",
              f"| support ↓ / truth → | {heldout} {names[heldout]} | {other} {names[other]} |", "|---|---|---|"]
    cc = df[df.protocol == "cross_case"]
    for s in (heldout, other):
        vals = [cc[(cc.support_class == s) & (cc.truth_class == t)].dice.mean() for t in (heldout, other)]
        lines.append(f"| {s} {names[s]} | {vals[0]:.3f} | {vals[1]:.3f} |")
    off = cc[cc.support_class != cc.truth_class].groupby(["case", "support_class"]).dice.max().mean()
    matching = match[match.protocol == "cross_case"].dice.mean()
    lines += ["", f"All classes (cross_case): matching-support Dice {matching:.3f} "
              f"vs best non-matching class {off:.3f} (a support-agnostic model scores these alike)."]
    return "\n".join(lines) + "\n"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python bench/icl_heldout.py")
    p.add_argument("--out", default="runs/heldout", help="working folder (data, cache, runs)")
    p.add_argument("--report", default=None, help="markdown file for the table (default <out>/report.md)")
    p.add_argument("--cases", type=int, default=24, help="phantom cases (fold 0 of --folds is evaluated)")
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--shape", default="64,64,32", help="phantom X,Y,Z voxels")
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--heldout", type=int, default=6, help=f"class id held out of training (1..{len(SHAPES)})")
    p.add_argument("--minutes", type=float, default=15.0, help="training wall-clock cap")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps_per_epoch", type=int, default=90)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--query_mode", default="context", choices=("gt_slices", "context"))
    p.add_argument("--same_case_support", type=float, default=0.5)
    p.add_argument("--classes_per_sample", type=int, default=1)
    p.add_argument("--config", default="tiny_cpu", help="model config (name in cfg/ or yaml path)")
    p.add_argument("--video_length", type=int, default=8)
    p.add_argument("--num_support", type=int, default=3)
    p.add_argument("--eval_cases", type=int, default=0, help="evaluate at most N validation cases (0 = all)")
    p.add_argument("--exp_name", default="heldout", help="training run name (runs go to <out>/runs/<exp_name>)")
    p.add_argument("--checkpoint", default=None, help="skip training, evaluate this .pth ('none' = random init)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    torch.set_num_threads(1)
    a = parse(argv)
    if not 1 <= a.heldout <= len(SHAPES):
        print(f"error: --heldout: must be in 1..{len(SHAPES)}, got {a.heldout}", file=sys.stderr)
        return 2
    out = Path(a.out).resolve()
    data, cache, runs = out / "data", out / "cache", out / "runs" / a.exp_name
    py = sys.executable
    if not data.exists():
        run_cmd([py, "-m", "icl.cli.phantom", "--out", str(data), "--layout", "btcv", "--cases", str(a.cases),
                 "--shape", a.shape, "--classes", ",".join(SHAPES)])
    t0 = time.time()
    if a.checkpoint is None:
        run_cmd([py, "-m", "icl.engine.train.loop", *train_args(a, data, cache, runs)])
        checkpoint: Path | None = newest_run(runs, a.exp_name)
    else:
        checkpoint = None if a.checkpoint.lower() == "none" else Path(a.checkpoint)
        if not (cache / f"phantom_{data.name}_{a.image_size}" / "index.json").is_file():
            # training makes the cache; without training, preprocess here
            run_cmd([py, "-m", "icl.cli.preprocess", "--dataset", "btcv", "--data_path", str(data),
                     "--cache", str(cache / f"phantom_{data.name}_{a.image_size}"), "--image_size", str(a.image_size)])
    train_min = (time.time() - t0) / 60
    try:
        cases, label_map = open_cache(cache / f"phantom_{data.name}_{a.image_size}")
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    split = make_splits([c.id for c in cases], a.folds, 0)[0]
    val = [c for c in cases if c.id in set(split["val"])][:a.eval_cases or None]
    support = next(c for c in cases if c.id in set(split["train"]))
    classes = list(range(1, len(SHAPES) + 1))
    names = {c: SHAPES[c - 1] for c in classes}
    print(f"evaluating {checkpoint or 'random init'} on {len(val)} held-out-fold cases (support case {support.id})",
          flush=True)
    t1 = time.time()
    df = evaluate(load_predictor(a.config, checkpoint, a.image_size), val, support, classes, a.heldout, a.num_support)
    header = (f"### Held-out class benchmark (class {a.heldout} {names[a.heldout]} never trained)\n\n"
              f"checkpoint `{checkpoint}`; training {train_min:.1f} min wall clock (cap {a.minutes:g}), "
              f"lr {a.lr:g}, query_mode {a.query_mode}, same_case_support {a.same_case_support:g}, "
              f"{a.classes_per_sample} classes per sample, {a.num_support} support slices, {a.image_size} px; "
              f"{len(val)} validation cases; eval {time.time() - t1:.0f} s")
    text = report(df, a.heldout, names, header)
    print(text)
    target = Path(a.report) if a.report else out / "report.md"
    write_text(target, text)
    df.to_csv(target.with_suffix(".csv"), index=False)
    print(f"report: {target} (rows: {target.with_suffix('.csv')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
