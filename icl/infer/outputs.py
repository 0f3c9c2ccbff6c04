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

from icl.errors import InputError
from icl.infer.query_folder import NIFTI_SUFFIXES, is_nifti
from icl.io import same_file


def nifti_name(path: str | Path) -> Path:
    """An output file name as a NIfTI name: ``pred`` → ``pred.nii.gz``; ``.nii``/``.nii.gz`` kept; else refused."""
    path = Path(path)
    if is_nifti(path):
        return path
    if not path.suffix:
        return path.with_name(path.name + ".nii.gz")
    raise InputError(path, f"not a NIfTI file name: expected {' or '.join(NIFTI_SUFFIXES)} (or no suffix)")


def output_file(path: str | Path, flag: str) -> Path:
    """A label map's file name (:func:`nifti_name`) that is not an existing folder."""
    target = Path(path)
    if not target.is_dir():
        target = nifti_name(path)
    if target.is_dir():
        raise InputError(target, f"{flag} is a folder: give a file name ending in .nii.gz")
    return target


def report_file(path: str | Path, flag: str = "--report") -> Path:
    """A report's file name: not an existing folder, and not a name ending in a path separator."""
    target = Path(path)
    if target.is_dir() or str(path).endswith(("/", os.sep)):
        raise InputError(path, f"{flag} is a folder: give a file name, e.g. check.json")
    return target


def plan_outputs(query: Path, out: Path, queries: list[Path] | None = None) -> list[tuple[Path, Path]]:
    """(query file, output file) pairs: one file → ``out`` (a NIfTI name) or ``out/<query name>``; a folder's
    ``queries`` → one output each, named like the query, in the folder ``out``."""
    if query.is_dir():
        if not queries:
            raise InputError(query, "query folder holds no query scans (.nii/.nii.gz images)")
        if is_nifti(out):
            raise InputError(out, "--query is a folder, so --out must be a folder, not a NIfTI file name")
        return [(q, out / q.name) for q in queries]
    if not query.exists():
        raise InputError(query, "file not found")
    if is_nifti(out):
        return [(query, output_file(out, "--out"))]
    if out.suffix and not out.is_dir():
        raise InputError(out, f"--out is not a NIfTI file name (expected {' or '.join(NIFTI_SUFFIXES)}), nor an "
                              "existing folder")
    return [(query, out / query.name)]


def refuse_overwriting_inputs(outputs: Iterable[tuple[str, Path]], inputs: Iterable[tuple[str, Path]]) -> None:
    """An InputError when an output ``(flag, path)`` is one of the inputs (as ``cp`` refuses "the same file")."""
    inputs = list(inputs)
    for out_flag, out in outputs:
        for in_flag, given in inputs:
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
