"""Which files of a query folder are scans to segment. A folder often holds more than scans: the support label
itself, label maps beside their images (a 3D Slicer ``.seg.nrrd`` among them), nnU-Net's ``_0000`` channel files
next to their labels. Segmenting a label map as an image gives nonsense without an error, so those are skipped and
the skip is said in one line. Files of no format read here (``notes.txt``) are named in that line too, and a file
that cannot be read as a scan (corrupt, truncated, 2D) is left out with a warning naming it and why, instead of
stopping the whole folder. Scans are files of any format ``icl.data.formats`` reads (NIfTI, NRRD, MetaImage) and
sub-folders holding a DICOM series; a folder that itself holds DICOM files is one scan, not a query folder.

A cohort's folder is split for a job array by :func:`shard_of` (every N-th query from offset I: tasks 0..N-1 split
it exactly), and outputs that exist are finished ones (written whole, then renamed), skipped by :func:`unfinished`.
"""
from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from icl.data.formats import is_dicom_folder, is_scan_file, is_segmentation, stored_shape
from icl.data.frames import Scan
from icl.errors import InputError
from icl.io import same_file

NNUNET_CHANNEL = re.compile(r"_(\d{4})\.(nii|nii\.gz|nrrd|mha)$")  # nnU-Net raw: CASE_XXXX.nii.gz, XXXX the channel
NNUNET_IMAGE = "0000"
MAX_LABEL_VALUES = 64  # a label map holds few distinct non-negative integers; a scan holds many, or fractions
LABEL_SAMPLE_STEP = 4  # voxels per axis read to tell a label map (every 4th: 1/64 of the volume)
SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")  # --shard I/N


def is_query_folder(path: Path) -> bool:
    """A folder of scans to segment one by one (a folder holding DICOM files is one scan: its series)."""
    return path.is_dir() and not is_dicom_folder(path)


def is_scan(path: Path) -> bool:
    """A file of a format read here, or a folder holding a DICOM series."""
    return is_scan_file(path) if path.is_file() else is_dicom_folder(path)


def label_map_reason(path: Path) -> str | None:
    """Why the file looks like a label map (a Slicer segmentation; few non-negative integer values), or None."""
    if is_segmentation(path):
        return "a 3D Slicer segmentation (a label map)"
    if path.is_dir():  # a DICOM series: images (a DICOM segmentation is no series of slices)
        return None
    if len(stored_shape(path)) != 3:  # label maps are 3D; a 4D file is a multi-channel image
        return None
    scan = Scan.open(path)
    step = LABEL_SAMPLE_STEP
    sample = scan.values(scan.raw[::step, ::step, ::step])
    if not np.isfinite(sample).all() or sample.min() < 0 or not np.array_equal(sample, np.round(sample)):
        return None
    values = np.unique(sample)
    if len(values) > MAX_LABEL_VALUES:
        return None
    return f"a label map: only {len(values)} integer value(s) {int(values.min())}..{int(values.max())}"


def list_queries(folder: Path, pattern: str | None = None,
                 labels: Iterable[Path] = ()) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(query scans, [(skipped file, why)]) of ``folder``. ``pattern`` (a glob on file names) chooses the files
    and turns off the guessing; without it every scan (module docstring) is a candidate, and label maps and,
    where the folder uses nnU-Net's channel names, everything but ``_0000`` are skipped. A file that is one of
    ``labels`` (the support label) is skipped either way."""
    labels = list(labels)
    files = sorted(p for p in folder.iterdir() if (p.is_file() or is_dicom_folder(p)) and not p.name.startswith("."))
    chosen = [p for p in files if (fnmatch.fnmatch(p.name, pattern) if pattern else is_scan(p))]
    nnunet = pattern is None and any(NNUNET_CHANNEL.search(p.name) for p in chosen)
    queries: list[Path] = []
    skipped = [(p, "not a scan file") for p in files if pattern is None and not is_scan(p)]
    for path in chosen:
        try:
            why = _why_skip(path, labels, nnunet, guess=pattern is None)
        except InputError as err:
            why = f"{UNREADABLE}: {err.problem}"
        if why is None:
            queries.append(path)
        else:
            skipped.append((path, why))
    return queries, skipped


UNREADABLE = "cannot be read as a scan"


def unreadable_line(folder: Path, skipped: list[tuple[Path, str]]) -> str | None:
    """The warning naming the files of a query folder that could not be read (None when all could)."""
    bad = [f"{p.name} ({why.removeprefix(UNREADABLE + ': ')})" for p, why in skipped if why.startswith(UNREADABLE)]
    return (f"warning: {folder}: {len(bad)} file(s) cannot be read as a scan and are not segmented: "
            + "; ".join(bad)) if bad else None


def _why_skip(path: Path, labels: list[Path], nnunet: bool, guess: bool) -> str | None:
    if any(same_file(path, label) for label in labels):
        return "the support label"
    if not guess:
        return None
    if nnunet:
        match = NNUNET_CHANNEL.search(path.name)
        if match is None:
            return "no nnU-Net channel suffix beside _0000 files (a label)"
        if match.group(1) != NNUNET_IMAGE:
            return f"nnU-Net channel {match.group(1)}, not {NNUNET_IMAGE}"
    return label_map_reason(path)


def skipped_line(folder: Path, skipped: list[tuple[Path, str]]) -> str:
    """The one line that says what was left out of a query folder, and why."""
    skipped = [(p, why) for p, why in skipped if not why.startswith(UNREADABLE)]  # those have their warning
    listed = "; ".join(f"{p.name} ({why})" for p, why in skipped)
    return f"note: {folder}: skipped {len(skipped)} file(s) that are not query scans: {listed} " \
           f"(--query-glob chooses the files)"


def parse_shard(value: str) -> tuple[int, int]:
    """``I/N`` (0 <= I < N) as (I, N); a check of ``--shard`` (ValueError: the problem)."""
    if isinstance(value, tuple):  # checked already
        value = "/".join(map(str, value))
    match = SHARD.fullmatch(str(value))
    if match is None:
        raise ValueError(f"expected I/N (task I of N, counted from 0, e.g. 3/10), got {value!r}")
    i, n = int(match.group(1)), int(match.group(2))
    if n < 1 or i >= n:
        raise ValueError(f"expected 0 <= I < N, got {i}/{n}")
    return i, n


def shard_of(queries: Sequence[Path], shard: tuple[int, int] | None) -> list[Path]:
    """Every N-th query from offset I (all of them without a shard)."""
    if shard is None:
        return list(queries)
    i, n = shard
    return list(queries[i::n])


def unfinished(pairs: Sequence[tuple[Path, Path]]) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """(query, output) pairs whose output does not exist yet, and the outputs that do (finished by an earlier run:
    outputs are only ever renamed into place whole)."""
    todo = [(q, o) for q, o in pairs if not o.exists()]
    return todo, [o for _, o in pairs if o.exists()]
