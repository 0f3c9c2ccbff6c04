"""3D evaluation of in-context SAM2 (``eval_3d.py``): every evaluation case × class, scored at the ORIGINAL resolution.

Two protocols:

* ``gt_slices`` — the seed's protocol: the query video is only the slices (of the cache) that contain the class,
  in order, one pass per class. Slices outside that set count as *predicted empty*; the truth is the class's full
  labelled volume. Optimistic: the model is told where the object is along the slice axis.
* ``full_volume`` — every slice is queried, all classes in ONE pass (one SAM2 object per class, image features
  shared); a prediction on a slice without the class is a false positive and lowers Dice.

Support: ``num_support`` slices spread over each class's extent (``pick_support_slices``) in the support case
(``-support_instance``; by default or with ``none`` the training case holding the most classes, first by id).
The support case is never scored. A class the support case lacks gets a warning row (NaN metrics, ``note`` column) instead of a crash.

Resolution: logits are predicted on the cache grid ([Z, S, S], slices-first), resampled back onto the source
NIfTI's voxel grid with ``to_original_grid(order=1)`` — *bilinear on logits*, in-plane only — and thresholded at 0
there (same as sigmoid > 0.5). Bilinear on logits gives smoother boundaries than nearest on the coarse mask and
never invents objects (a whole frame without the object is uniformly negative). The truth is the original label
file read with nibabel; spacing comes from its header in array-axis order.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from icl.config import AMP_MODES, EvalConfig, build_eval_parser, validate
from icl.data.preprocess import CachedCase, open_cache, to_original_grid
from icl.data.sampling import load_splits, make_splits, pick_support_slices
from icl.data.validate import load_nifti_volume
from icl.engine.metrics import MetricRows, logits_to_mask
from icl.engine.precision import amp_dtype, autocast
from icl.engine.train import prepare_caches
from icl.errors import InputError, library_errors, report
from icl.io import atomic_path, write_json
from sam2_ext.icl import segment_with_support  # module attribute on purpose: tests replace it with a fake

PROTOCOLS: tuple[str, ...] = ("gt_slices", "full_volume")
PROTOCOL_CHOICES: tuple[str, ...] = PROTOCOLS + ("both",)
SPLITS: tuple[str, ...] = ("val", "train", "all")
NO_PRED = -1024.0  # logit of a slice that was not queried (SAM2's own "no object" score)
_EPOCH_RE = re.compile(r"^epoch_(\d+)\.pth$")
_DEFAULT_CKPT = EvalConfig().checkpoint_path


@dataclass
class EvalOptions:
    """Eval-only flags (not in ``icl.config.EvalConfig``)."""

    split: str = "val"
    splits: str | None = None
    all_checkpoints: str | None = None
    save_nifti: str | None = None
    save_pic: str | None = None
    amp: str = "auto"
    nsd_tolerance: float = 2.0
    max_cases: int = 0
    progress: bool = True


def protocols_of(protocol: str) -> tuple[str, ...]:
    """``both`` expands to every protocol, in report order."""
    return PROTOCOLS if protocol == "both" else (protocol,)


# ----------------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    """``icl.config``'s eval parser with ``-protocol both`` (default) and the eval-only flags."""
    p = build_eval_parser()
    for action in p._actions:  # widen the shared flag: 'both' is an eval_3d choice (and its default)
        if action.dest == "protocol":
            action.choices, action.default = PROTOCOL_CHOICES, "both"
            action.help = "gt_slices (seed, optimistic) | full_volume (every slice) | both"
        if action.dest == "checkpoint_path":
            action.help = "weights to evaluate: a .pth file (ours or official {'model': ...}) or a run folder"
        if action.dest == "support_instance":
            action.help = "case the support slices come from (default / none: the training case with most classes)"
    p.set_defaults(support_instance=None, out_dir=None)
    p.add_argument("-split", type=str, default="val", choices=SPLITS,
                   help="cases to evaluate: the -fold's val (default) or train split, or all cases")
    p.add_argument("-splits", type=str, default=None,
                   help="splits.json (default: beside the checkpoint, in the cache, else made from -seed)")
    p.add_argument("-all_checkpoints", type=str, default=None, help="run folder: evaluate every epoch_N.pth")
    p.add_argument("-save_nifti", type=str, default=None, help="folder for predicted label maps (.nii.gz)")
    p.add_argument("-save_pic", type=str, default=None, help="folder for overlay PNGs")
    p.add_argument("-amp", type=str, default="auto", choices=AMP_MODES, help="autocast on CUDA (auto = bf16)")
    p.add_argument("-nsd_tolerance", type=float, default=2.0, help="surface Dice tolerance in mm")
    p.add_argument("-max_cases", type=int, default=0, help="evaluate at most N cases (0 = all)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[EvalConfig, EvalOptions]:
    """Command line -> (validated EvalConfig, EvalOptions). File checks happen in :func:`evaluate`."""
    try:
        ns = vars(build_parser().parse_args(list(argv) if argv is not None else None))
    except argparse.ArgumentError as err:
        raise InputError(err.argument_name or "arguments", err.message) from None
    extra = {f.name: ns.pop(f.name) for f in dataclasses.fields(EvalOptions) if f.name in ns}
    if ns.get("data_path") is None:
        ns["data_path"] = f"./datasets/{ns['dataset']}"
    if ns.get("out_dir") is None:
        ns["out_dir"] = str(Path("runs") / "eval" / ns["exp_name"])
    cfg = EvalConfig(**ns)
    validate(cfg, check_files=False)
    opts = EvalOptions(**extra)
    if opts.max_cases < 0:
        raise InputError("-max_cases", f"must be >= 0, got {opts.max_cases}")
    if not (math.isfinite(opts.nsd_tolerance) and opts.nsd_tolerance >= 0):
        raise InputError("-nsd_tolerance", f"must be >= 0 mm, got {opts.nsd_tolerance}")
    return cfg, opts


# ----------------------------------------------------------------------------------------------------- weights
def epoch_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(N, epoch_N.pth)`` of a run folder, sorted by N (temp files of killed saves never match)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(run_dir, "run folder not found (-all_checkpoints)")
    found = sorted((int(m.group(1)), p) for p in run_dir.iterdir() if (m := _EPOCH_RE.match(p.name)) and p.is_file())
    if not found:
        raise InputError(run_dir, "no epoch_N.pth checkpoints in this run folder")
    return found


def resolve_weights(cfg: EvalConfig, opts: EvalOptions) -> list[tuple[int | None, Path | None]]:
    """Which weights to evaluate: ``[(epoch or None, file or None = random init)]``."""
    if opts.all_checkpoints:
        return [(n, p) for n, p in epoch_checkpoints(opts.all_checkpoints)]
    ck = Path(cfg.checkpoint_path)
    if ck.is_file():
        m = _EPOCH_RE.match(ck.name)
        return [(int(m.group(1)) if m else None, ck)]
    if cfg.checkpoint_path != _DEFAULT_CKPT:
        if ck.is_dir():
            for name in ("best.pth", "last.pth"):
                if (ck / name).is_file():
                    return [(None, ck / name)]
            raise InputError(ck, "run folder has no best.pth or last.pth (use -all_checkpoints for epoch_N.pth)")
        raise InputError(ck, "checkpoint not found (-checkpoint_path)")
    if cfg.pretrain is None:
        print("note: -pretrain none: evaluating a randomly initialised model", file=sys.stderr)
        return [(None, None)]
    if not Path(cfg.pretrain).is_file():
        raise InputError("-pretrain", f"weights file {cfg.pretrain} not found; give -checkpoint_path FILE, "
                                      "-pretrain FILE or -pretrain none (random init)")
    return [(None, Path(cfg.pretrain))]


def _warn_config_mismatch(cfg: EvalConfig, weights: list[tuple[int | None, Path | None]]) -> None:
    """A run folder's config.json (written by train_3d.py) names the model config and image size it was trained
    with; evaluating with others is allowed but almost always a mistake, so say so."""
    seen = {p.parent / "config.json" for _, p in weights if p is not None}
    for path in sorted(s for s in seen if s.is_file()):
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for key in ("config", "image_size"):
            if key in saved and saved[key] != getattr(cfg, key):
                print(f"warning: {path} says the model was trained with -{key} {saved[key]}, "
                      f"evaluating with -{key} {getattr(cfg, key)}", file=sys.stderr)


def build_predictor(cfg: EvalConfig, device: str):
    """The eval-mode predictor (weights are loaded per checkpoint by :func:`evaluate`)."""
    from sam2_ext.build import build_icl_predictor

    from sam2_ext.errors import ConfigError

    try:
        predictor = build_icl_predictor(cfg.config, device=device, image_size=cfg.image_size)
    except ConfigError as err:
        raise InputError("-config", f"{err.where}: {err.problem}") from None
    if cfg.memory_selector.strip().lower() != "recency":
        from sam2_ext.selector import MemorySelector

        predictor.memory_selector = MemorySelector.from_name(cfg.memory_selector)
    return predictor.eval()


# ----------------------------------------------------------------------------------------------------- data
def _flag(err: InputError) -> InputError:
    """The data modules name ``--flags``; eval_3d.py spells them with one dash (as train_3d.py does)."""
    return InputError(err.where[1:] if err.where.startswith("--") else err.where, err.problem)


def open_eval_cache(cfg: EvalConfig) -> tuple[list[CachedCase], dict[int, str], Path]:
    """The evaluation data as cached cases: ``(cases, label_map, cache folder)``.

    Same caches as ``train_3d.py`` (``icl.engine.train.prepare_caches``: ``<cache_dir or cache>/<dataset>_<folder>_
    <image_size>``, preprocessed once, valid entries skipped; ``combined`` maps classes by name). A ``-cache_dir``
    that is itself a cache (holds ``index.json``) is opened as is.
    """
    from icl.data.loaders import open_caches
    from icl.engine.distributed import DistInfo

    if cfg.cache_dir and (Path(cfg.cache_dir) / "index.json").is_file():
        cases, label_map = open_cache(cfg.cache_dir)
        return cases, label_map, Path(cfg.cache_dir)
    if not Path(cfg.data_path).is_dir():
        raise InputError("-data_path", f"dataset folder {cfg.data_path} does not exist (see datasets/README.md)")
    try:
        caches = prepare_caches(cfg, DistInfo())  # type: ignore[arg-type]  (reads only the shared fields)
        cases, label_map = open_caches(caches)
    except InputError as err:
        raise _flag(err) from None
    return cases, label_map, caches[0]


def _find_splits(opts: EvalOptions, places: Sequence[Path]) -> Path | None:
    if opts.splits:
        if not Path(opts.splits).is_file():
            raise InputError("-splits", f"splits file {opts.splits} not found")
        return Path(opts.splits)
    return next((p for p in places if p.is_file()), None)


def split_cases(cases: Sequence[CachedCase], cfg: EvalConfig, opts: EvalOptions,
                places: Sequence[Path] = ()) -> tuple[list[CachedCase], list[CachedCase]]:
    """``(evaluation cases, training cases)`` for ``-split``; folds from splits.json if found, else made from -seed."""
    by_id = {c.id: c for c in cases}
    if opts.split == "all":
        return list(cases), list(cases)
    path = _find_splits(opts, places)
    if path is not None:
        folds = {int(s["fold"]): s for s in load_splits(path)}
        if cfg.fold not in folds:
            raise InputError(path, f"has no fold {cfg.fold} (folds {sorted(folds)})")
        split = folds[cfg.fold]
        unknown = [c for c in split["train"] + split["val"] if c not in by_id]
        if unknown:
            raise InputError(path, f"names cases not in the data: {', '.join(unknown[:5])}")
    else:
        split = make_splits(sorted(by_id), cfg.folds, cfg.seed)[cfg.fold]
    train = [by_id[c] for c in split["train"]]
    chosen = [by_id[c] for c in split[opts.split]]
    if not chosen:
        raise InputError("-fold", f"the {opts.split} split of fold {cfg.fold} is empty")
    return chosen, train


def choose_support(cases: Sequence[CachedCase], train: Sequence[CachedCase], support_id: str | None) -> CachedCase:
    """``-support_instance`` by case id (suffixes .nii/.nii.gz dropped), else the training case with most classes."""
    if support_id is not None and support_id.strip().lower() not in ("", "none"):
        key = re.sub(r"\.nii(\.gz)?$", "", Path(support_id).name)
        for case in cases:
            if case.id == key:
                return case
        have = ", ".join(c.id for c in list(cases)[:5])
        raise InputError("-support_instance", f"case {key!r} not found in the data (cases: {have}, ...)")
    pool = list(train) or list(cases)
    return max(sorted(pool, key=lambda c: c.id), key=lambda c: len(c.class_ids()))


def support_slices(support: CachedCase, class_ids: Sequence[int], num_support: int) -> dict[int, np.ndarray]:
    """Unique support slice indices per class, spread over its extent; classes the support lacks are left out."""
    out = {}
    present = set(support.class_ids())
    for cid in class_ids:
        if cid in present:
            out[cid] = np.unique(pick_support_slices(support.label, support.sources(cid), num_support))
    return out


# ----------------------------------------------------------------------------------------------------- prediction
def _tensor(arr: np.ndarray, device: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(device)


def predict_case(predictor: Any, case: CachedCase, support: CachedCase, sup_idx: dict[int, np.ndarray],
                 protocol: str, device: str, amp: str = "auto") -> dict[int, np.ndarray]:
    """Logits ``{class_id: [Z, S, S]}`` on the cache grid for the classes in ``sup_idx``.

    gt_slices: one pass per class over the slices holding it; other slices get ``NO_PRED``.
    full_volume: one pass for all classes over every slice. The video's support frames are the union of every
    class's support slices; a class's mask is kept only on its own slices (elsewhere it is not a conditioning
    frame), so each class is prompted with exactly its ``num_support`` slices.
    """
    depth = case.num_slices
    shape = tuple(case.meta["cached_shape"])
    out: dict[int, np.ndarray] = {}
    if not sup_idx:
        return out
    with torch.no_grad(), autocast(device, amp_dtype(amp, device)):
        if protocol == "gt_slices":
            for cid, idx in sup_idx.items():
                full = np.full(shape, NO_PRED, dtype=np.float32)
                query = case.slices_with(cid)
                if query.size:
                    res = segment_with_support(predictor, _tensor(support.image[idx], device),
                                               {cid: _tensor(support.mask(cid, idx), device)},
                                               _tensor(case.image[query], device))
                    full[query] = res["logits"][:, 0].float().cpu().numpy()
                out[cid] = full
        elif protocol == "full_volume":
            union = np.unique(np.concatenate(list(sup_idx.values())))
            masks = {cid: _tensor(support.mask(cid, union) * np.isin(union, idx)[:, None, None], device)
                     for cid, idx in sup_idx.items()}
            res = segment_with_support(predictor, _tensor(support.image[union], device), masks,
                                       _tensor(case.image[np.arange(depth)], device))
            logits = res["logits"].float().cpu().numpy()
            for col, cid in enumerate(masks):
                out[cid] = np.ascontiguousarray(logits[:, col])
        else:
            raise InputError("-protocol", f"unknown protocol {protocol!r} ({' | '.join(PROTOCOL_CHOICES)})")
    return out


# ----------------------------------------------------------------------------------------------------- scoring
@dataclass
class Truth:
    """A case's original label (source values, NIfTI voxel order) with its affine, header and spacing (mm)."""

    label: np.ndarray
    affine: np.ndarray
    header: Any
    spacing: tuple[float, float, float]


def read_truth(case: CachedCase) -> Truth:
    """Read the original label file named in the cache meta; check it still matches the cached grid."""
    path = case.meta["source"]["label"]["path"]
    label, affine, header = load_nifti_volume(path)
    if tuple(label.shape) != tuple(case.meta["original_shape"]):
        raise InputError(path, f"label shape {label.shape} differs from the cached {case.meta['original_shape']}; "
                               "re-run preprocessing")
    spacing = tuple(float(z) for z in header.get_zooms()[:3])
    return Truth(label, affine, header, spacing)  # type: ignore[arg-type]


def _label_dtype(values: Sequence[int]) -> type:
    return np.uint8 if max(values, default=0) < 256 else np.int16


def score_case(rows: MetricRows, case: CachedCase, truth: Truth, logits: dict[int, np.ndarray],
               class_ids: Sequence[int], label_map: dict[int, str], protocol: str, epoch: int | None,
               extra: dict[str, Any]) -> np.ndarray:
    """Add one row per class (original grid); returns the predicted label map (source values, highest logit wins)."""
    labels = np.zeros(truth.label.shape, dtype=np.int16)
    best = np.full(truth.label.shape, -np.inf, dtype=np.float32)
    for cid in class_ids:
        name = label_map.get(cid, str(cid))
        common = dict(case=case.id, class_id=cid, class_name=name, protocol=protocol, epoch=epoch, **extra)
        if cid not in logits:
            rows.rows.append({**common, "dice": math.nan, "iou": math.nan, "hd95": math.nan, "nsd": math.nan,
                              "note": f"class absent from support case {extra.get('support_case')}; not evaluated"})
            continue
        orig = to_original_grid(logits[cid], case.meta, order=1).astype(np.float32)
        pred = logits_to_mask(orig)
        truth_c = np.isin(truth.label, case.sources(cid))
        rows.add(pred=pred, truth=truth_c, spacing=truth.spacing, note="", **common)
        win = pred & (orig > best)
        best[win] = orig[win]
        labels[win] = min(case.sources(cid))
    return labels


# ----------------------------------------------------------------------------------------------------- the run
def _epoch_tag(epoch: int | None) -> Path:
    return Path(f"epoch_{epoch}") if epoch is not None else Path()


def _write_outputs(df, cfg: EvalConfig, opts: EvalOptions, info: dict[str, Any]) -> list[Path]:
    from icl.report.tables import summary_frame, summary_markdown, write_tables

    out = Path(cfg.out_dir)
    csv_path, md_path = write_tables(df, out, "eval")
    summary = out / "eval_summary.csv"
    with atomic_path(summary) as tmp:
        summary_frame(df).to_csv(tmp, index=False)
    cfg_path = write_json(out / "eval_config.json", {**cfg.to_dict(), **dataclasses.asdict(opts), **info})
    print(summary_markdown(df))
    return [csv_path, md_path, summary, cfg_path]


def _progress_iter(items: list, enabled: bool, desc: str) -> Iterator:
    return iter(tqdm(items, desc=desc, disable=not enabled, unit="case", dynamic_ncols=True, file=sys.stderr))


def evaluate(cfg: EvalConfig, opts: EvalOptions) -> tuple[Any, list[Path]]:
    """Run the evaluation; returns ``(results table, written files)``. Everything is checked before any work."""
    from icl.report.nifti import write_mask_nifti
    from icl.report.overlays import save_case_overlays
    from sam2_ext.build import load_weights

    weights = resolve_weights(cfg, opts)
    validate(dataclasses.replace(cfg, pretrain=None), check_files=False)
    from sam2_ext.build import resolve_config_path
    from sam2_ext.selector import parse_selector_config

    from sam2_ext.errors import ConfigError

    try:
        resolve_config_path(cfg.config)
    except ConfigError as err:
        raise InputError("-config", err.problem) from None
    with library_errors("-"):
        parse_selector_config(cfg.memory_selector)
    _warn_config_mismatch(cfg, weights)
    device = cfg.device
    predictor = build_predictor(cfg, device)
    loaded = weights[0][1]
    if loaded is not None:  # a corrupt or misfit checkpoint fails here, before any data is read or cached
        load_weights(predictor, loaded)
    cases, label_map, cache = open_eval_cache(cfg)
    places = [p.parent / "splits.json" for _, p in weights if p is not None] + [cache / "splits.json"]
    eval_cases, train_cases = split_cases(cases, cfg, opts, places)
    support = choose_support(cases, train_cases, cfg.support_instance)
    if any(c.id == support.id for c in eval_cases):
        print(f"note: support case {support.id} is not scored (it would see its own masks)", file=sys.stderr)
        eval_cases = [c for c in eval_cases if c.id != support.id]
    if opts.max_cases:
        eval_cases = eval_cases[:opts.max_cases]
    if not eval_cases:
        raise InputError("-split", "no evaluation cases left (the only case is the support case)")
    class_ids = sorted(c for c in label_map if c > 0)
    sup_idx = support_slices(support, class_ids, cfg.num_support)
    for cid in class_ids:
        if cid not in sup_idx:
            print(f"warning: class {cid} ({label_map[cid]}) is absent from support case {support.id}; "
                  "its rows are marked and not scored", file=sys.stderr)
    protocols = protocols_of(cfg.protocol)
    rows = MetricRows(nsd_tolerance_mm=opts.nsd_tolerance)
    written: list[Path] = []
    for epoch, path in weights:
        if path is not None and path != loaded:
            load_weights(predictor, path)
            loaded = path
        predictor.eval()
        extra = {"support_case": support.id, "num_support": cfg.num_support,
                 "checkpoint": str(path) if path is not None else "random_init"}
        desc = "eval" if epoch is None else f"eval epoch {epoch}"
        for case in _progress_iter(eval_cases, opts.progress, desc):
            truth = read_truth(case)
            for protocol in protocols:
                t0 = time.time()
                logits = predict_case(predictor, case, support, sup_idx, protocol, device, opts.amp)
                labels = score_case(rows, case, truth, logits, class_ids, label_map, protocol, epoch,
                                    {**extra, "seconds": round(time.time() - t0, 3)})
                sub = _epoch_tag(epoch) / protocol
                if opts.save_nifti:
                    values = [v for c in class_ids for v in case.sources(c)]
                    written.append(write_mask_nifti(labels, (truth.affine, truth.header),
                                                    Path(opts.save_nifti) / sub / f"{case.id}.nii.gz",
                                                    dtype=_label_dtype(values)))
                if opts.save_pic:
                    for cid, lg in logits.items():
                        name = f"{case.id}_{label_map.get(cid, cid)}"
                        written += save_case_overlays(np.asarray(case.image), case.mask(cid), lg > 0,
                                                      Path(opts.save_pic) / sub, name)
            case.release()
    df = rows.frame()
    info = {"cache": str(cache), "support_case": support.id, "eval_cases": [c.id for c in eval_cases],
            "support_slices": {str(k): v.tolist() for k, v in sup_idx.items()}}
    written = _write_outputs(df, cfg, opts, info) + written
    return df, written


def main(argv: Sequence[str] | None = None) -> int:
    """``eval_3d.py`` entry: bad input prints one ``error: ...`` line on stderr and exits 2 (no traceback)."""
    try:
        with library_errors("-"):
            cfg, opts = parse_args(argv)
            evaluate(cfg, opts)
    except InputError as err:
        return report(err)
    return 0
