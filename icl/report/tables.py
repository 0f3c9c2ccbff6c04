"""Result tables: one row per case × class × protocol (× epoch), summaries as mean ± std, CSV + markdown files.

NaN means "not scored" (an empty truth with an empty prediction, or a surface distance to an empty mask, see
:mod:`icl.engine.eval.metrics`); summaries skip NaN and say how many cases were scored and how many had an empty truth,
so a reader can always tell what a mean stands on.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from icl.io import atomic_path, write_text

#: Columns identifying a row, in report order (``epoch`` may be empty for a one-off evaluation).
KEY_COLUMNS: tuple[str, ...] = ("case", "class_id", "class_name", "protocol", "epoch")
#: Metric columns summarised as mean ± std.
METRICS: tuple[str, ...] = ("dice", "iou", "hd95", "nsd")
#: Columns a row must have; everything else is optional.
REQUIRED: tuple[str, ...] = ("case", "class_name", "protocol", "dice")
_FLAGS: tuple[str, ...] = ("empty_truth", "empty_pred")
_ORDER: tuple[str, ...] = KEY_COLUMNS + METRICS + ("volume_truth_ml", "volume_pred_ml") + _FLAGS


def results_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Build the per-case table from metric rows (e.g. :class:`icl.engine.eval.metrics.MetricRows`).

    Known columns come first in a fixed order, extra columns keep their order after them. Metric columns are float
    (NaN = not scored), flag columns bool. Raises ``ValueError`` naming a missing required column.
    """
    df = pd.DataFrame(list(rows))
    if df.empty:
        return pd.DataFrame(columns=list(_ORDER))
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"metric rows lack required column(s) {missing}; have {list(df.columns)}")
    for col in KEY_COLUMNS:
        if col not in df.columns:
            df[col] = None
    for col in ("class_id", "epoch"):  # nullable ints, so CSVs say "3" not "3.0" when some rows have none
        values = pd.to_numeric(df[col], errors="coerce")
        if values.notna().sum() == df[col].notna().sum() and (values.dropna() % 1 == 0).all():
            df[col] = values.astype("Int64")
    for col in METRICS + ("volume_truth_ml", "volume_pred_ml"):
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    for col in _FLAGS:
        if col in df.columns:
            df[col] = df[col].fillna(False).astype(bool)
    known = [c for c in _ORDER if c in df.columns]
    return df[known + [c for c in df.columns if c not in known]].reset_index(drop=True)


def summary_frame(df: pd.DataFrame, by: Sequence[str] = ("protocol", "class_name")) -> pd.DataFrame:
    """Per-group ``<metric>_mean`` / ``<metric>_std`` plus counts, ignoring NaN.

    Counts: ``n_rows`` (all rows), ``n_scored`` (rows with a Dice value), ``n_empty_truth`` (rows whose truth is
    empty, scored 0 if the model predicted something, NaN if it predicted nothing). ``std`` is the sample standard
    deviation (ddof=1), NaN for a single scored case. If the table holds more than one epoch and ``epoch`` is not in
    ``by``, it is added first so that epochs are never averaged together.
    """
    by = list(by)
    missing = [c for c in by if c not in df.columns]
    if missing:
        raise ValueError(f"cannot group by {missing}: not columns of the results table")
    if "epoch" in df.columns and "epoch" not in by and df["epoch"].dropna().nunique() > 1:
        by = ["epoch"] + by
    metrics = [m for m in METRICS if m in df.columns]
    columns = by + [f"{m}_{s}" for m in metrics for s in ("mean", "std")] + ["n_rows", "n_scored", "n_empty_truth"]
    if df.empty:
        return pd.DataFrame(columns=columns)
    records = []
    for key, group in df.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        rec: dict[str, Any] = dict(zip(by, key))
        for m in metrics:
            values = group[m].astype(float)
            rec[f"{m}_mean"] = values.mean(skipna=True)
            rec[f"{m}_std"] = values.std(skipna=True, ddof=1)
        rec["n_rows"] = int(len(group))
        rec["n_scored"] = int(group["dice"].notna().sum())
        rec["n_empty_truth"] = int(group["empty_truth"].astype(bool).sum()) if "empty_truth" in group else 0
        records.append(rec)
    return pd.DataFrame.from_records(records, columns=columns)


def _fmt(mean: float, std: float, digits: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def summary_markdown(df: pd.DataFrame, by: Sequence[str] = ("protocol", "class_name")) -> str:
    """A markdown table of :func:`summary_frame` of the per-case table ``df`` with ``mean ± std`` cells.

    Dice, IoU and NSD use 3 decimals, HD95 (mm) 2; "–" marks a metric with no scored case.
    """
    summary = summary_frame(df, by)
    keys = [c for c in summary.columns if not c.endswith(("_mean", "_std")) and not c.startswith("n_")]
    metrics = [m for m in METRICS if f"{m}_mean" in summary.columns]
    labels = {"dice": "Dice", "iou": "IoU", "hd95": "HD95 (mm)", "nsd": "NSD"}
    header = keys + [labels[m] for m in metrics] + ["scored / rows", "empty truth"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for _, r in summary.iterrows():
        cells = [str(r[k]) for k in keys]
        cells += [_fmt(r[f"{m}_mean"], r[f"{m}_std"], 2 if m == "hd95" else 3) for m in metrics]
        cells += [f"{r['n_scored']} / {r['n_rows']}", str(r["n_empty_truth"])]
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "\nDice/IoU/HD95/NSD are 3D per case and class on sigmoid > 0.5; mean ± std over scored cases. "
        "Empty truth with empty prediction is not scored; empty truth with a prediction scores Dice 0.\n"
    )
    return "\n".join(lines) + "\n" + note


def write_tables(df: pd.DataFrame, out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """Write ``<stem>.csv`` (every row) and ``<stem>.md`` (the summary) into ``out_dir``, each atomically."""
    out_dir = Path(out_dir)
    csv_path = out_dir / f"{stem}.csv"
    md_path = out_dir / f"{stem}.md"
    with atomic_path(csv_path) as tmp:
        df.to_csv(tmp, index=False)
    write_text(md_path, f"# {stem}\n\n" + summary_markdown(df))
    return csv_path, md_path
