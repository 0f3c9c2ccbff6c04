"""Segment scans in context: one labelled support scan prompts SAM2, every requested class in one pass.

    python -m icl.segment --support S.nii.gz --support-label S_lab.nii.gz --query Q.nii.gz --out PRED.nii.gz
    python -m icl.segment --support S.nii.gz --support-label S_sparse.nii.gz --query S.nii.gz --out FILLED.nii.gz \\
        --support-slices labelled [--fill auto|registration|interpolation|nearest|model] [--report R.json]
    python -m icl.segment --support S.nii.gz --support-label S_lab.nii.gz --query QUERIES/ --out PREDS/ \\
        --classes 1,2 --checkpoint ckpt.pth --config sam2.1_hiera_t --device cuda:0 --overlays PNGS/

Weights: without --checkpoint the default model shipped for --config is used (said on stderr; tiny_cpu only);
--checkpoint none is a randomly initialised model (a warning says so). --config and --image-size default to what
the weights were trained with (recorded in our checkpoints; another config is an error, another size a warning).

Support slices: N slices spread across the extent of every label value of the support label, or 'labelled': the
slices that carry a label value (a scan annotated on a few slices, as in 3D Slicer), or 'auto' (default):
'labelled' for a drawing on a few slices of the query's own scan (one line says so), else 3.
--slice-axis auto (default): the axis along which the drawn slices leave gaps (a full segmentation: axial).
Each requested class (--classes, default every label value) is one SAM2 object; the output keeps the original
label values (where classes overlap the highest score wins), in the query's own orientation, affine and header,
written atomically. Scans are read in their closest canonical (RAS) orientation, so RAS, LPS and oblique files
meet the model the same way; NaN voxels become the scan's minimum (one warning line); 4D images need --channel.

A scan annotated on a few slices ('labelled', the scan given as --support and --query), two conventions:
  per structure (default, as in 3D Slicer / ITK-SNAP): structure c is annotated exactly where c is drawn. E.g.
    3 drawn on slices 10, 16, 22 and 5 on 12, 18: both are filled on every slice; drawn voxels stay as drawn,
    the rest of a slice drawn for 3 is filled for 5 like any other slice.
  --complete-slices: every labelled slice is annotated for every structure: on slice 10 structure 5 is absent
    (the slice is written back whole) and 5's fill ends there.
Beyond a structure's outermost annotated slices it extends at most half its annotation spacing (every fill).
--fill: registration (each drawn slice's image registered, 2D, to the slices between it and the next; the drawn
masks carried there and blended by distance: reads the image), interpolation (shape-based: signed distance maps
blended between annotated slices, aligned by centroid), nearest (copy of the nearest annotated slice), model (SAM2
propagation, with each structure's best classic fill as its prior), or auto (default): a
self-check holds out every other annotated slice of each structure, fills them with every method from the rest,
and takes per structure the one with the best held-out Dice. One line per structure on stderr gives that table
(your quality estimate); --report FILE.json writes it. --crop on tracks the model in a box around the annotation.

Support from other scans (--support and --support-label once per scan, in pairs): --fill auto (default) and
registration register each support scan to the query (ITK-SNAP's greedy: affine, then deformable, mutual
information) and carry its labels; several supports are registered in parallel processes (one per core) and fused
(majority vote) and, with two or more, each is left out in turn and scored against its own labels: one line per
structure gives that leave-one-out Dice (your estimate), --report FILE.json writes it. --cross-check composed
(default) reaches each support through the registrations to the query (no extra registration), full registers every
support to every other one, none skips it. --fill model (or --direction forward) tracks the model instead.

Propagation (--direction): auto (default) decides by content: support and query the same scan (the same grid in
space and voxel values within storage precision, so a copy, a re-save or an LPS copy counts) -> tracked both ways from the support slices (forward from each
class's first support slice, backward from its last; slices seen by both passes get the mean logit); support from
another scan -> its support slices are put in front of the query, which is tracked from its first slice to its last.
--direction both / forward chooses one (both needs the query on the support's grid). One line per query on stderr,
kept with --quiet, says which road was taken.

A query folder: every .nii/.nii.gz in it is a query, except what is not a scan, skipped with one line saying why:
the support label itself, label maps (few non-negative integer values), and where files follow nnU-Net's channel
names (CASE_0000.nii.gz) every file but the _0000 ones. --query-glob PATTERN (e.g. '*_ct.nii.gz') chooses the
files by name instead (only the support label is still skipped).

Formats: scans and labels may be NIfTI (.nii.gz, .nii), NRRD (.nrrd, .nhdr), 3D Slicer segmentations (.seg.nrrd:
segment names kept), MetaImage (.mha, .mhd) or a DICOM series (its folder, or one file of it to pick one of several
series); the output's format is --out's suffix (a .seg.nrrd output keeps the support label's segment names, colours
and label values). A query folder's DICOM series sub-folders are queries (output <folder>.nii.gz).

A cohort (a query folder): outputs that exist are finished ones and are skipped (--overwrite redoes them), so an
interrupted run resumes; --workers N segments N queries at once, each process with its share of the cores (the
labels of a serial run); --shard I/N takes every N-th query from offset I, for the tasks of a job array
(--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT). The supports are read and prepared once for all queries.

No output may be one of the inputs (compared as files: other spellings and links of a path count), --out must be
a label-map name or a folder, --report a file, each flag given once, and every output folder creatable; all checked
before any work. Negative values need no '=': --window -100,200.
Bad input prints one line "error: <file or flag>: <problem>" on stderr and exits with status 2; nothing is written.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from icl.api import ICLSegmenter
from icl.data.frames import Scan
from icl.errors import EXIT_INPUT_ERROR, InputError
from icl.infer.outputs import check_writable, plan_outputs, refuse_overwriting_inputs, report_file
from icl.cli.cohort import run_queries
from icl.infer.query_folder import (UNREADABLE, is_query_folder, list_queries, shard_of, skipped_line, unfinished,
                                     unreadable_line)
from icl.infer.support import (AUTO_SLICES, LABELLED, check_sparse_options, load_support, parse_classes,
                               parse_support_slices, support_pairs)
from icl.io import write_json
from icl.options.segment import SegmentOptions
from icl.options.spec import build_parser as options_parser
from icl.options.spec import parse_options, run_command
from icl.report.label_overlays import save_label_overlays

EXIT_BAD_INPUT = EXIT_INPUT_ERROR


def build_parser() -> argparse.ArgumentParser:
    """The parser generated from ``icl.config.SegmentOptions``, with this module's docstring as its --help text."""
    doc = __doc__.split("\n\n")
    return options_parser(SegmentOptions, prog="python -m icl.segment", description=doc[0],
                          epilog="\n\n".join(doc[2:]), formatter_class=argparse.RawDescriptionHelpFormatter)


def save_overlays(result, out_dir: Path, max_slices: int = 8) -> list[Path]:
    """PNG overlays (``icl.report.label_overlays``) of up to ``max_slices`` slices where something was found; the
    query's own annotated slices (both ways) are marked."""
    labels_zhw = np.moveaxis(result.canonical_labels(), result.slice_axis, 0)
    annotated = result.support_slices if result.mode == "both_ways" else []
    name = result.query.name.removesuffix(".gz").removesuffix(".nii")
    return save_label_overlays(result.frames.slice01, labels_zhw, result.classes, annotated, result.slice_axis,
                               out_dir, name, max_slices)


def run(args: argparse.Namespace) -> list[Path]:
    classes = parse_classes(args.classes)
    per_class = parse_support_slices(args.support_slices)
    check_sparse_options(per_class, args.fill, args.complete_slices)
    query = Path(args.query)
    if args.query_glob and not is_query_folder(query):
        raise InputError("--query-glob", f"chooses files in a query folder, but {query} is not a folder")
    if args.shard is not None and not is_query_folder(query):
        raise InputError("--shard", f"splits a query folder, but {query} is not a folder")
    pairs_given = support_pairs(args.support, args.support_label)
    queries, skipped = (list_queries(query, args.query_glob, [Path(lab) for _, lab in pairs_given])
                        if is_query_folder(query) else (None, []))
    if queries and args.shard is not None:  # every task lists the same folder, then keeps its own share
        queries = shard_of(queries, args.shard)
        if not queries:
            print(f"note: {query}: shard {args.shard[0]}/{args.shard[1]} holds none of the folder's query scans "
                  "(more shards than queries): nothing to do", file=sys.stderr)
            return []
    for q in list(queries or []):  # a file of a folder that cannot be read is left out, with a warning
        try:
            Scan.open(q, args.channel)
        except InputError as err:
            queries.remove(q)
            skipped.append((q, f"{UNREADABLE}: {err.problem}"))
    pairs = plan_outputs(query, Path(args.out), queries)
    inputs = [*((flag, Path(p)) for s, lab in pairs_given for flag, p in (("--support", s), ("--support-label", lab))),
              *(("--query", q) for q, _ in pairs)]
    if args.checkpoint:
        inputs.append(("--checkpoint", Path(args.checkpoint)))
    outputs = [("--out", o) for _, o in pairs] + ([("--report", Path(args.report))] if args.report else [])
    refuse_overwriting_inputs(outputs, inputs)
    if args.report:
        report_file(args.report)
        if per_class not in (LABELLED, AUTO_SLICES):
            raise InputError("--report", f"the self-check report needs --support-slices {LABELLED}")
        if len(pairs) != 1:
            raise InputError("--report", "one report per run: give a single --query file")
        check_writable(Path(args.report).parent, "--report")
    for q, _ in pairs:  # every query must be a readable 3D NIfTI (or a chosen channel) before any work starts
        Scan.open(q, args.channel)
    for s, lab in pairs_given:  # fail fast, before the model is built
        load_support(s, lab, classes, args.channel)
    for folder in sorted({o.parent for _, o in pairs}):
        check_writable(folder, "--out")
    if args.overlays:
        check_writable(Path(args.overlays), "--overlays")
    for line in (skipped_line(query, skipped) if any(not w.startswith(UNREADABLE) for _, w in skipped) else None,
                 unreadable_line(query, skipped)):  # said once the checks have passed: bad input stays one line
        if line:
            print(line, file=sys.stderr)
    if is_query_folder(query) and not args.overwrite:  # finished outputs (written whole, then renamed) are skipped
        pairs, finished = unfinished(pairs)
        if finished:
            print(f"note: {args.out}: {len(finished)} of {len(finished) + len(pairs)} output(s) exist (finished by "
                  "an earlier run): skipped (--overwrite segments them again)", file=sys.stderr)
    segmenter = dict(checkpoint=args.checkpoint, config=args.config, device=args.device,
                     image_size=args.image_size, memory_selector=args.memory_selector, window=args.window,
                     slice_axis=args.slice_axis, support_slices=args.support_slices, channel=args.channel,
                     amp=args.amp, fill=args.fill, complete_slices=args.complete_slices, crop=args.crop,
                     direction=args.direction, adapt_steps=args.adapt_steps, prior=args.prior,
                     cross_check=args.cross_check)
    shared = PerQuery([s for s, _ in pairs_given], [lab for _, lab in pairs_given], classes, args.quiet, args.report,
                      args.overlays)
    written = []
    for _, out, lines in run_queries(segment_one, segmenter, shared, pairs, args.workers):
        written.append(out)
        for line in lines:  # the self-check and the summary line: shown even with --quiet
            print(line, file=sys.stderr)
    return written


@dataclass(frozen=True)
class PerQuery:
    """What every query of a run is segmented with (handed once to each worker process)."""
    supports: list[str]
    labels: list[str]
    classes: list[int] | None
    quiet: bool
    report: str | None
    overlays: str | None


def segment_one(seg: ICLSegmenter, q: Path, out: Path, args: PerQuery) -> list[str]:
    """One query of the run: segmented, saved (report, overlays), and the lines to print: the self-check per
    structure (the user's quality estimate) and the summary line (the road taken)."""
    several = len(args.supports) > 1
    result = seg.segment(query=q, support=args.supports if several else args.supports[0],
                         support_label=args.labels if several else args.labels[0], classes=args.classes,
                         progress=not args.quiet)
    if args.report and not result.checks:  # auto read the support label as N slices per value: no self-check
        raise InputError("--report", "no self-check ran: the query is not the support scan with a drawing on "
                                     f"a few slices (--support-slices {LABELLED}); nothing was written")
    seg.save(result, out)
    if args.report:
        write_json(args.report, result.report())
    if args.overlays:
        save_overlays(result, Path(args.overlays))
    return [check.line() for check in result.checks] + [summary_line(result, q, out)]


ROADS = {"both_ways": "both ways: the support slices are this scan's own",
         "prepended": "forward: support from another scan",
         "registered": "registered: support from another scan, carried by registration"}


def summary_line(result, query: Path, out: Path) -> str:
    """The one line per query that stays with --quiet: where it went and how it was tracked."""
    found = sorted(int(v) for v in np.unique(result.labels) if v > 0)
    where = (f"{result.supports} support scan(s)" if result.mode == "registered"
             else f"support slices {result.support_slices}")
    return f"{query} -> {out} ({ROADS[result.mode]}; {where}; classes found {found})"


def parse_segment_args(argv: Sequence[str] | None = None):
    """The command line -> ``icl.config.SegmentOptions`` (files are checked by the run, before any work)."""
    return parse_options(SegmentOptions, argv, check_files=False, parser=build_parser())


def main(argv: Sequence[str] | None = None) -> int:
    """A bad flag or input prints one ``error: ...`` line and exits 2; ``--help`` prints the usage and exits 0."""
    return run_command(parse_segment_args, run, argv)


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    sys.exit(main())
