"""3D evaluation of in-context SAM2 (``eval_3d.py``): every evaluation case × class, scored at the ORIGINAL resolution.

Two protocols:

* ``gt_slices`` — the seed's protocol: the query video is only the slices (of the cache) that contain the class,
  in order, one pass per class. Slices outside that set count as *predicted empty*; the truth is the class's full
  labelled volume. Optimistic: the model is told where the object is along the slice axis.
* ``full_volume`` — every slice is queried, all classes in ONE pass (one SAM2 object per class, image features
  shared); a prediction on a slice without the class is a false positive and lowers Dice.

Support: ``num_support`` slices spread over each class's extent (``pick_support_slices``) in the support case
(``-support_instance``; by default or with ``none`` the training case holding the most classes, first by id).
The support case is never scored. A class the support case lacks gets a warning row (NaN metrics, ``note``
column) instead of a crash.

Resolution: logits are predicted on the cache grid ([Z, S, S], slices-first), resampled back onto the source
NIfTI's voxel grid with ``to_original_grid(order=1)`` — *bilinear on logits*, in-plane only — and thresholded at 0
there (same as sigmoid > 0.5). Bilinear on logits gives smoother boundaries than nearest on the coarse mask and
never invents objects (a whole frame without the object is uniformly negative). The truth is the original label
file read with nibabel; spacing comes from its header in array-axis order.

Weights: ``icl.engine.checkpoint.resolve_weights`` (``-checkpoint_path`` names them when given, else ``-pretrain``).
Which cases, their support and their rows: :mod:`icl.engine.eval.cases`; this module runs the model over them.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from sam2.modeling.sam2_base import NO_OBJ_SCORE

from icl.data.preprocess import CachedCase
from icl.engine.checkpoint import resolve_weights
from icl.engine.eval.cases import (choose_support, label_dtype, open_eval_cache, read_truth, score_case, split_cases,
                                   support_slices)
from icl.engine.eval.metrics import MetricRows
from icl.engine.feature_cache import FeatureCache
from icl.errors import InputError
from icl.io import atomic_path, write_json
from icl.model.boundary import library_errors
from icl.model.build import build_predictor
from icl.model.precision import amp_dtype, autocast
from icl.model.settings import settle_model
from icl.model.weights import load_any_weights as load_weights
from icl.options.common import CONFIG, IMAGE_SIZE, PROTOCOLS, CommonConfig
from icl.options.evaluate import EvalConfig, parse_eval_args
from icl.options.spec import run_command
from icl.progress import progress as progress_bar
from icl.report.nifti import write_mask_nifti
from icl.report.overlays import save_case_overlays
from icl.report.tables import summary_frame, summary_markdown, write_tables
from sam2_ext.icl import segment_with_support  # module attribute on purpose: tests replace it with a fake

EVAL_FALLBACK_CONFIG, EVAL_FALLBACK_IMAGE_SIZE = CONFIG.default, IMAGE_SIZE.default  # weights that record neither


def protocols_of(protocol: str) -> tuple[str, ...]:
    """``both`` expands to every protocol, in report order."""
    return PROTOCOLS if protocol == "both" else (protocol,)


# ----------------------------------------------------------------------------------------------------- prediction
def _tensor(arr: np.ndarray, device: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(device)


def predict_case(predictor: Any, case: CachedCase, support: CachedCase, sup_idx: dict[int, np.ndarray],
                 protocol: str, device: str, amp: str = "auto", cache: Any = None) -> dict[int, np.ndarray]:
    """Logits ``{class_id: [Z, S, S]}`` on the cache grid for the classes in ``sup_idx``.

    gt_slices: one pass per class over the slices holding it; other slices get ``NO_OBJ_SCORE`` (SAM2's "no
    object" logit).
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
                full = np.full(shape, NO_OBJ_SCORE, dtype=np.float32)
                query = case.slices_with(cid)
                if query.size:
                    res = segment_with_support(predictor, _tensor(support.image[idx], device),
                                               {cid: _tensor(support.mask(cid, idx), device)},
                                               _tensor(case.image[query], device),
                                               **_stored(cache, support, idx, case, query))
                    full[query] = res["logits"][:, 0].float().cpu().numpy()
                out[cid] = full
        elif protocol == "full_volume":
            union = np.unique(np.concatenate(list(sup_idx.values())))
            masks = {cid: _tensor(support.mask(cid, union) * np.isin(union, idx)[:, None, None], device)
                     for cid, idx in sup_idx.items()}
            res = segment_with_support(predictor, _tensor(support.image[union], device), masks,
                                       _tensor(case.image[np.arange(depth)], device),
                                       **_stored(cache, support, union, case, np.arange(depth)))
            logits = res["logits"].float().cpu().numpy()
            for col, cid in enumerate(masks):
                out[cid] = np.ascontiguousarray(logits[:, col])
        else:
            raise InputError("-protocol", f"unknown protocol {protocol!r} ({' | '.join(PROTOCOLS)})")
    return out


def _stored(cache: Any, support: CachedCase, support_slices: np.ndarray, case: CachedCase,
            query_slices: np.ndarray) -> dict[str, Any]:
    """``-feature_cache auto``: the stored encoder outputs of the video (support slices, then the query's)."""
    if cache is None:
        return {}
    sources = [(support.id, int(z)) for z in support_slices] + [(case.id, int(z)) for z in query_slices]
    return {"features": cache.source(sources)}


# ----------------------------------------------------------------------------------------------------- the run
def _feature_cache(cfg: EvalConfig, predictor: Any, cases: Sequence[CachedCase]) -> Any:
    """``-feature_cache auto``: the image encoder's outputs of the cached slices, computed once and stored beside
    the preprocessing cache (``icl.engine.feature_cache``); evaluation trains nothing, so the encoder is frozen."""
    if cfg.feature_cache == "off":
        return None
    predictor.image_encoder.requires_grad_(False)
    return FeatureCache(predictor, cases)


def _epoch_tag(epoch: int | None) -> Path:
    return Path(f"epoch_{epoch}") if epoch is not None else Path()


def _write_outputs(df, cfg: EvalConfig, info: dict[str, Any]) -> list[Path]:
    out = Path(cfg.out_dir)
    csv_path, md_path = write_tables(df, out, "eval")
    summary = out / "eval_summary.csv"
    with atomic_path(summary) as tmp:
        summary_frame(df).to_csv(tmp, index=False)
    cfg_path = write_json(out / "eval_config.json", {**cfg.to_dict(), **info})
    print(summary_markdown(df))
    return [csv_path, md_path, summary, cfg_path]


def evaluate(cfg: EvalConfig, progress: bool = True) -> tuple[Any, list[Path]]:
    """Run the evaluation of options checked by :func:`icl.config.parse_eval_args`; returns ``(results table,
    written files)``. The weights are resolved and loaded before any data is read."""
    weights = resolve_weights(cfg)
    with library_errors(cfg.DASHES):
        cfg.config, size, _ = settle_model(cfg.config, cfg.image_size, weights[0][1], EVAL_FALLBACK_CONFIG, cfg.flag)
        cfg.image_size = size or EVAL_FALLBACK_IMAGE_SIZE
        CommonConfig.check_files(cfg)
    device = cfg.device
    predictor = build_predictor(cfg.config, device, None, cfg.image_size, cfg.memory_selector).eval()
    loaded = weights[0][1]
    if loaded is not None:  # a corrupt or misfit checkpoint fails here, before any data is read or cached
        load_weights(predictor, loaded)
    cases, label_map, cache = open_eval_cache(cfg)
    places = [p.parent / "splits.json" for _, p in weights if p is not None] + [cache / "splits.json"]
    eval_cases, train_cases = split_cases(cases, cfg, places)
    support = choose_support(cases, train_cases, cfg.support_case)
    if any(c.id == support.id for c in eval_cases):
        print(f"note: support case {support.id} is not scored (it would see its own masks)", file=sys.stderr)
        eval_cases = [c for c in eval_cases if c.id != support.id]
    if cfg.max_cases:
        eval_cases = eval_cases[:cfg.max_cases]
    if not eval_cases:
        raise InputError("-split", "no evaluation cases left (the only case is the support case)")
    class_ids = sorted(c for c in label_map if c > 0)
    sup_idx = support_slices(support, class_ids, cfg.num_support)
    for cid in class_ids:
        if cid not in sup_idx:
            print(f"warning: class {cid} ({label_map[cid]}) is absent from support case {support.id}; "
                  "its rows are marked and not scored", file=sys.stderr)
    protocols = protocols_of(cfg.protocol)
    rows = MetricRows(nsd_tolerance_mm=cfg.nsd_tolerance)
    written: list[Path] = []
    for epoch, path in weights:
        if path is not None and path != loaded:
            load_weights(predictor, path)
            loaded = path
        predictor.eval()
        stored = _feature_cache(cfg, predictor, cases)  # keyed by the weights just loaded
        extra = {"support_case": support.id, "num_support": cfg.num_support,
                 "checkpoint": str(path) if path is not None else "random_init"}
        desc = "eval" if epoch is None else f"eval epoch {epoch}"
        for case in progress_bar(eval_cases, enabled=progress, desc=desc, unit="case"):
            truth = read_truth(case)
            for protocol in protocols:
                t0 = time.time()
                logits = predict_case(predictor, case, support, sup_idx, protocol, device, cfg.amp, stored)
                labels = score_case(rows, case, truth, logits, class_ids, label_map, protocol, epoch,
                                    {**extra, "seconds": round(time.time() - t0, 3)})
                sub = _epoch_tag(epoch) / protocol
                if cfg.save_nifti:
                    values = [v for c in class_ids for v in case.sources(c)]
                    written.append(write_mask_nifti(labels, (truth.affine, truth.header),
                                                    Path(cfg.save_nifti) / sub / f"{case.id}.nii.gz",
                                                    dtype=label_dtype(values)))
                if cfg.save_pic:
                    for cid, lg in logits.items():
                        name = f"{case.id}_{label_map.get(cid, cid)}"
                        written += save_case_overlays(np.asarray(case.image), case.mask(cid), lg > 0,
                                                      Path(cfg.save_pic) / sub, name)
            case.release()
    df = rows.frame()
    info = {"cache": str(cache), "support_case": support.id, "eval_cases": [c.id for c in eval_cases],
            "support_slices": {str(k): v.tolist() for k, v in sup_idx.items()}}
    written = _write_outputs(df, cfg, info) + written
    return df, written


def main(argv: Sequence[str] | None = None) -> int:
    """``eval_3d.py`` entry: bad input prints one ``error: ...`` line on stderr and exits 2 (no traceback)."""
    return run_command(parse_eval_args, evaluate, argv)
