"""NRRD (``.nrrd``, ``.nhdr``) and MetaImage (``.mha``, ``.mhd``) through SimpleITK — ITK's own readers and writers,
the ones MONAI's ``LoadImage`` and nnU-Net's ``SimpleITKIO`` use — and the bridge between ITK's grids and ours.

Why a bridge: ITK keeps a grid as origin, spacing and a direction matrix in LPS world coordinates, with arrays
indexed ``[z, y, x]`` (components last); nibabel and the engine keep a 4x4 voxel-to-RAS affine with arrays indexed
``[i, j, k]``. The two are one grid: negate the world's x and y, and reverse the array's spatial axes. A NRRD
written in RAS space is turned into LPS by ITK itself, so both spaces read alike.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import SimpleITK as sitk

from icl.data.formats.volume import Volume, channel_loader, nifti_header
from icl.errors import InputError
from icl.io import atomic_path

NRRD_SUFFIXES = (".nrrd", ".nhdr")
METAIMAGE_SUFFIXES = (".mha", ".mhd")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # ITK world (LPS) <-> NIfTI world (RAS); its own inverse
NAMES = {".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage", ".mhd": "MetaImage"}

sitk.ProcessObject_SetGlobalWarningDisplay(False)  # ITK's warnings go to stderr in C++: our lines say what matters


def kind_name(path: Path) -> str:
    return NAMES.get(path.suffix.lower(), "image")


def itk_problem(err: BaseException) -> str:
    """ITK's message without SimpleITK's wrapping (source file, line, object address): the sentence that says why
    (for a NRRD, teem's last line: "expected 2772 bytes but received 2505")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    teem = [re.sub(r"^\[nrrd\]\s*(_?\w+:\s*)?", "", line) for line in lines if line.startswith("[nrrd]")]
    teem = [line for line in teem if line and not line.startswith("trouble")]
    if teem:
        return teem[-1][:300]
    text = " ".join(line for line in lines if not line.startswith("Exception thrown in SimpleITK"))
    found = re.findall(r"ERROR:\s*(?:\w+\(0x[0-9a-f]+\):\s*)?(.*?)(?=\s*(?:itk::|sitk::|$))", text)
    why = re.sub(r"\s+", " ", (found[-1] if found else text)).strip()
    return why[:300] if why else type(err).__name__


@dataclass
class Info:
    """An ITK header: the grid of the image's first three axes, its stored shape in our order, its fields."""

    shape: tuple[int, ...]  # [i, j, k] (+ components or a 4th axis, last)
    affine: np.ndarray
    pixel: str  # ITK's pixel type, in words
    fields: dict[str, str]  # the header's key/value fields (NRRD's "key:=value", MetaImage's extra keys)


def affine_of(spacing, origin, direction) -> np.ndarray:
    """ITK's (spacing, origin, direction) of the first three axes as a voxel-to-RAS affine."""
    n = int(round(len(direction) ** 0.5))
    d = np.asarray(direction, dtype=np.float64).reshape(n, n)[:3, :3]
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ d @ np.diag(np.asarray(spacing, dtype=np.float64)[:3])
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(origin, dtype=np.float64)[:3]
    return affine


def geometry_of(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """A voxel-to-RAS affine as ITK's (spacing, origin, direction)."""
    m = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    if not (spacing > 0).all():
        raise ValueError(f"affine with a zero-length voxel axis: {affine.tolist()}")
    direction = m / spacing
    origin = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)[:3, 3]
    return tuple(map(float, spacing)), tuple(map(float, origin)), tuple(map(float, direction.ravel()))


def read_info(path: Path) -> Info:
    """The header only (no voxels); an unreadable one is an InputError naming the file."""
    if not path.is_file():
        raise InputError(path, "file not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise InputError(path, f"unreadable {kind_name(path)} header ({itk_problem(e)})") from None
    size = tuple(int(s) for s in reader.GetSize())
    components = int(reader.GetNumberOfComponents())
    shape = size + ((components,) if components > 1 else ())
    fields = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}
    if len(size) < 3:
        return Info(shape, np.eye(4), sitk.GetPixelIDValueAsString(reader.GetPixelID()), fields)
    affine = affine_of(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    return Info(shape, affine, sitk.GetPixelIDValueAsString(reader.GetPixelID()), fields)


def voxel_order(arr: np.ndarray, components: bool) -> np.ndarray:
    """An ITK array ``[(t,) z, y, x (, c)]`` in our order ``[i, j, k (, c or t)]`` (a view)."""
    spatial = arr.ndim - (1 if components else 0)
    order = tuple(reversed(range(spatial))) + ((spatial,) if components else ())
    return arr.transpose(order)


def read_voxels(path: Path, what: str | None = None) -> np.ndarray:
    """The whole image's voxels in our order; a truncated or corrupt file is an InputError naming it."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise InputError(path, f"unreadable or truncated {what or kind_name(path)} data ({itk_problem(e)})") from None
    arr = sitk.GetArrayFromImage(image)
    return voxel_order(arr, image.GetNumberOfComponentsPerPixel() > 1)


def open_itk(path: Path, channel: int | None = None, info: Info | None = None) -> Volume:
    """A NRRD or MetaImage file as a :class:`Volume`: header now, voxels on first use."""
    info = info or read_info(path)
    channel, load = channel_loader(path, info.shape, channel, lambda: read_voxels(path))
    dtype = np.float32 if "float" in info.pixel else np.int16
    return Volume(path, load, info.affine, nifti_header(info.shape[:3], info.affine, dtype), info.shape,
                  channel=channel)


def stored_shape(path: Path) -> tuple[int, ...]:
    return read_info(path).shape


# ------------------------------------------------------------------------------------------------ writing
def image_of(labels: np.ndarray, affine: np.ndarray, fields: Mapping[str, str] | None = None) -> sitk.Image:
    """A 3D array in our voxel order on ``affine``'s grid as an ITK image carrying ``fields`` in its header."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(labels).transpose(2, 1, 0)))
    spacing, origin, direction = geometry_of(affine)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    for key, value in (fields or {}).items():
        image.SetMetaData(str(key), str(value))
    return image


def write_image(image: sitk.Image, target: Path) -> Path:
    """Write ``image`` (compressed) so that no reader ever sees half a file: a temp file renamed onto ``target``;
    a ``.mhd`` header and its data file are written under a temp folder with their final names, then moved, the
    data file first (the header names it)."""
    target = Path(target)
    try:
        if target.name.lower().endswith(".mhd"):
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
                sitk.WriteImage(image, str(Path(tmp) / target.name), True)
                for written in sorted(Path(tmp).iterdir(), key=lambda p: p.name == target.name):
                    os.replace(written, target.parent / written.name)
            return target
        with atomic_path(target) as tmp:
            sitk.WriteImage(image, str(tmp), True)
    except RuntimeError as e:
        raise InputError(target, f"cannot write {kind_name(target)} ({itk_problem(e)})") from None
    return target


def companions(path: Path) -> list[Path]:
    """The data files a detached header names (``.mhd``'s ElementDataFile, ``.nhdr``'s data file): part of the
    image when outputs are checked against inputs. A ``.mhd`` we write names ``<stem>.zraw``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".mhd", ".nhdr"):
        return []
    if not path.is_file():
        return [path.with_suffix(".zraw")] if suffix == ".mhd" else []
    key = re.compile(r"^\s*(ElementDataFile\s*=|data ?file\s*:)\s*(.+?)\s*$", re.IGNORECASE)
    try:
        with open(path, "rb") as f:
            head = f.read(65536).decode("latin-1")
    except OSError:
        return []
    for line in head.splitlines():
        match = key.match(line)
        if match and match.group(2).upper() not in ("LOCAL", "LIST") and "%" not in match.group(2):
            return [path.parent / match.group(2).split()[0]]
    return []
