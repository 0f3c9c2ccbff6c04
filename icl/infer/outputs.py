"""THE output rule of the CLI and the API (and the viewer): where outputs go, checked before any work — every
output can be created, is of the right kind (a NIfTI file name for labels, a file and not a folder for a report),
and none is an input of the run (compared as files: other spellings, symbolic and hard links count).

Why before: inference takes minutes, so an unwritable output found at the end wastes them, and an output that is
one of the inputs (the scan, the hand-made annotation) would be replaced by a label map without a word.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

from icl.data.formats import OUTPUT_SUFFIXES, files_of, output_name, output_suffix
from icl.errors import InputError
from icl.infer.query_folder import is_query_folder
from icl.io import same_file

OUTPUTS = ", ".join(OUTPUT_SUFFIXES)


def label_map_name(path: str | Path) -> Path:
    """An output file name as a label-map name: its suffix picks the format (``.nii.gz``, ``.nii``, ``.seg.nrrd``,
    ``.nrrd``, ``.mha``, ``.mhd``); ``pred`` → ``pred.nii.gz``; any other suffix is refused."""
    path = Path(path)
    if output_suffix(path) is not None:
        return path
    if not path.suffix:
        return path.with_name(path.name + ".nii.gz")
    raise InputError(path, f"not a label-map file name: expected {OUTPUTS} (or no suffix: .nii.gz)")


def output_file(path: str | Path, flag: str) -> Path:
    """A label map's file name (:func:`label_map_name`) that is not an existing folder."""
    target = Path(path)
    if not target.is_dir():
        target = label_map_name(path)
    if target.is_dir():
        raise InputError(target, f"{flag} is a folder: give a file name ending in .nii.gz (or {OUTPUTS})")
    return target


def report_file(path: str | Path, flag: str = "--report") -> Path:
    """A report's file name: not an existing folder, and not a name ending in a path separator."""
    target = Path(path)
    if target.is_dir() or str(path).endswith(("/", os.sep)):
        raise InputError(path, f"{flag} is a folder: give a file name, e.g. check.json")
    return target


def plan_outputs(query: Path, out: Path, queries: list[Path] | None = None) -> list[tuple[Path, Path]]:
    """(query, output file) pairs: one scan (a file or a DICOM series folder) → ``out`` (a label-map name: its
    format) or ``out/<query name>``; a folder's ``queries`` → one output each in the folder ``out``, named like the
    query and in its format (a DICOM series: ``<folder name>.nii.gz``)."""
    if is_query_folder(query):
        if not queries:
            raise InputError(query, "query folder holds no query scans (NIfTI, NRRD, MetaImage files or DICOM "
                                    "series folders)")
        if output_suffix(out) is not None:
            raise InputError(out, "--query is a folder, so --out must be a folder, not a label-map file name")
        return [(q, out / output_name(q)) for q in queries]
    if not query.exists():
        raise InputError(query, "file not found")
    if output_suffix(out) is not None:
        return [(query, output_file(out, "--out"))]
    if out.suffix and not out.is_dir():
        raise InputError(out, f"--out is not a label-map file name (expected {OUTPUTS}), nor an existing folder")
    return [(query, out / output_name(query))]


def refuse_overwriting_inputs(outputs: Iterable[tuple[str, Path]], inputs: Iterable[tuple[str, Path]]) -> None:
    """An InputError when an output ``(flag, path)`` is one of the inputs (as ``cp`` refuses "the same file"); the
    data file a ``.mhd`` / ``.nhdr`` header names counts as that file on either side."""
    inputs = [(flag, f) for flag, given in inputs for f in files_of(given)]
    for out_flag, out_path in outputs:
        for out, (in_flag, given) in ((o, i) for o in files_of(out_path) for i in inputs):
            if same_file(out, given):
                raise InputError(out, f"{out_flag} and {in_flag} are the same file: the output would overwrite "
                                      f"an input")


def check_writable(folder: Path, flag: str) -> None:
    """Fail before any inference when an output folder cannot be created or written to (leaves nothing behind:
    a probe file, or a probe folder where the folder does not exist yet, is made and removed at once)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(folder, f"{flag} folder cannot be created: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(folder, f"{flag} folder is not writable")
    try:
        if existing == folder:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".icl_write_test."):
                pass
        else:
            os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".icl_write_test."))
    except OSError as e:
        what = "is not writable" if existing == folder else f"cannot be created in {existing}"
        raise InputError(folder, f"{flag} folder {what} ({e.strerror or e})") from None
