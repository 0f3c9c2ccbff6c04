"""The files a scan or a label map may come in — one reader and one writer per format — and which format a path is.

| format | suffix | read with | written with |
|---|---|---|---|
| NIfTI | ``.nii.gz``, ``.nii`` | nibabel (``nifti.py``) | nibabel (``icl.report.nifti``) |
| NRRD | ``.nrrd``, ``.nhdr`` | SimpleITK (``itk.py``) | SimpleITK (``.nrrd``) |
| 3D Slicer segmentation | ``.seg.nrrd`` | SimpleITK + its segment fields (``slicer.py``) | the same |
| MetaImage | ``.mha``, ``.mhd`` | SimpleITK (``itk.py``) | SimpleITK |
| DICOM series | a folder, or one file of it | SimpleITK's GDCM (``dicom.py``) | — (outputs are label maps) |

Every reader yields a :class:`Volume`: what the NIfTI reader yields (the array in the file's voxel order, channels
last, a voxel-to-RAS affine, a NIfTI header of that grid), so ``icl.data.frames.Scan`` and everything after it —
canonical orientation, spacing, windows, outputs on the query's grid — is the same road for every format.
"""
from __future__ import annotations

from pathlib import Path

from icl.data.formats import dicom, itk, nifti, slicer
from icl.data.formats.volume import Volume
from icl.errors import InputError

SCAN_SUFFIXES = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".mha", ".mhd")  # what a label map may be written as
FORMATS = {".nii.gz": "nifti", ".nii": "nifti", ".seg.nrrd": "nrrd", ".nrrd": "nrrd", ".nhdr": "nrrd",
           ".mha": "metaimage", ".mhd": "metaimage", ".dcm": "dicom"}
READABLE = ("NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr, Slicer's .seg.nrrd), MetaImage (.mha, .mhd) or a DICOM "
            "series (its folder, or one of its files)")


def suffix_of(path: str | Path) -> str | None:
    """The known suffix a file name ends with (``.seg.nrrd`` before ``.nrrd``), any case; None if none."""
    name = Path(path).name.lower()
    return next((s for s in SCAN_SUFFIXES if name.endswith(s) and len(name) > len(s)), None)


def is_scan_file(path: str | Path) -> bool:
    """A file name of a format read here (a DICOM file without ``.dcm`` is known by content: :func:`format_of`)."""
    return suffix_of(path) is not None


def is_dicom_folder(path: str | Path) -> bool:
    return dicom.is_dicom_folder(Path(path))


def format_of(path: str | Path) -> str | None:
    """``nifti``, ``nrrd``, ``metaimage`` or ``dicom`` (a folder holding DICOM files, or a DICOM file), or None."""
    path = Path(path)
    if path.is_dir():
        return "dicom" if dicom.is_dicom_folder(path) else None
    suffix = suffix_of(path)
    if suffix is not None:
        return FORMATS[suffix]
    return "dicom" if path.is_file() and dicom.is_dicom_file(path) else None


def is_segmentation(path: str | Path) -> bool:
    """A 3D Slicer segmentation by name (``.seg.nrrd``): a label map, never a scan to segment."""
    return suffix_of(path) == slicer.SUFFIX


def open_volume(path: str | Path, channel: int | None = None) -> Volume:
    """The reader of ``path``'s format (header now, voxels on first use); anything unreadable is an InputError."""
    path = Path(path)
    kind = format_of(path)
    if kind is None:
        if not path.exists():
            raise InputError(path, "file not found")
        what = "a folder without DICOM files" if path.is_dir() else "not a format read here"
        raise InputError(path, f"{what}: expected {READABLE}")
    if kind == "nifti":
        return nifti.open_nifti(path, channel)
    if kind == "dicom":
        return dicom.open_series(path, channel)
    info = itk.read_info(path)
    if kind == "nrrd" and (slicer.is_segmentation(info.fields) or is_segmentation(path)):
        return slicer.open_segmentation(path, info)
    return itk.open_itk(path, channel, info)


def stored_shape(path: str | Path) -> tuple[int, ...]:
    """The stored shape (header only): 3D, or 4D with channels (or a segmentation's layers) last."""
    path = Path(path)
    kind = format_of(path)
    if kind == "nifti":
        return nifti.stored_shape(path)
    if kind == "dicom":
        return dicom.stored_shape(path)
    return open_volume(path).shape if kind is None else itk.stored_shape(path)


def files_of(path: str | Path) -> list[Path]:
    """The file and the data files its header names (``.mhd``, ``.nhdr``): all of them are the image."""
    return [Path(path), *itk.companions(Path(path))]


def output_suffix(path: str | Path) -> str | None:
    """The label-map format a file name asks for (``.seg.nrrd``, ``.nii.gz``, ...), or None."""
    suffix = suffix_of(path)
    return suffix if suffix in OUTPUT_SUFFIXES else None


def output_name(query: str | Path) -> str:
    """The name of a query's output in an output folder: the query's own name in its own format where labels can
    be written so (``.nhdr`` as ``.nrrd``), else (a DICOM series) the name with ``.nii.gz``."""
    query = Path(query)
    suffix = suffix_of(query)
    if suffix in OUTPUT_SUFFIXES:
        return query.name
    if suffix == ".nhdr":
        return query.name[: -len(suffix)] + ".nrrd"
    stem = query.name[: -len(suffix)] if suffix else query.name
    return stem + ".nii.gz"


__all__ = ["Volume", "SCAN_SUFFIXES", "OUTPUT_SUFFIXES", "READABLE", "suffix_of", "is_scan_file", "format_of",
           "is_dicom_folder", "is_segmentation", "open_volume", "stored_shape", "files_of", "output_suffix",
           "output_name"]
