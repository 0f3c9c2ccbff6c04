"""A DICOM series — a folder of slices as a scanner or a PACS exports it — read as one volume with SimpleITK's
GDCM reader, which applies each slice's Rescale Slope and Intercept (CT numbers in HU, not stored integers).

Which series: a folder holding one series is that series; a folder holding several is refused with the list of
them, and one of its files names its series (``--query CT/IM0007`` reads the series IM0007 belongs to).
Order: by position along the slice normal (the cross product of the orientation's row and column directions, as
ITK and 3D Slicer sort), never by file name or instance number. The grid: the first slice's position, the pixel
spacing in-plane, the mean step between slices across.
Refused with one line naming the folder: no image in it; several series; images of several sizes or orientations;
two images at one position (echoes, phases, time points in one series); uneven slice spacing (a missing slice).
A gantry tilt (slices shifted in-plane by the same step each: a sheared grid) is resampled onto the rectangular
grid of the first slice — each slice shifted back, linearly interpolated, as 3D Slicer regularises such a series —
and one line says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from icl.data.formats.itk import itk_problem, open_itk, read_info
from icl.data.formats.volume import Volume, channel_loader, nifti_header, say_once
from icl.errors import InputError

TAGS = {"series": "0020|000e", "position": "0020|0032", "orientation": "0020|0037", "rows": "0028|0010",
        "columns": "0028|0011", "spacing": "0028|0030", "frames": "0028|0008", "description": "0008|103e",
        "modality": "0008|0060", "number": "0020|0011"}
PREAMBLE = 128  # a DICOM file (Part 10) has "DICM" after a 128-byte preamble
SAME_POSITION_MM = 1e-3  # two slices closer than this along the normal are at one position
SPACING_TOLERANCE = 0.01  # steps between slices may differ by 1 % (rounding in positions), else a slice is missing
ORIENTATION_TOLERANCE = 1e-4
TILT_VOXELS = 0.01  # an in-plane drift below this (in voxels, over the whole series) is rounding, not a tilt


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` name or the Part 10 preamble ("DICM" at byte 128)."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            f.seek(PREAMBLE)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def is_dicom_folder(path: Path) -> bool:
    """A folder holding DICOM files (it is read as one series, not as a folder of scans)."""
    return path.is_dir() and any(is_dicom_file(p) for p in _files(path))


@dataclass
class Image:
    """One DICOM file with pixel data: what its header says of its place in a series."""

    path: Path
    series: str
    size: tuple[int, int]  # (rows, columns)
    position: np.ndarray | None  # ImagePositionPatient, LPS mm
    orientation: np.ndarray | None  # ImageOrientationPatient: row direction, column direction
    spacing: tuple[float, float] | None  # PixelSpacing: between rows, between columns
    frames: int
    description: str
    modality: str
    number: str


def _numbers(text: str | None, n: int) -> np.ndarray | None:
    try:
        values = np.array([float(v) for v in (text or "").split("\\")], dtype=np.float64)
    except ValueError:
        return None
    return values if values.size == n and np.isfinite(values).all() else None


def read_image_header(path: Path) -> Image | None:
    """The header of a DICOM image (None: not DICOM, or a DICOM file without pixel data)."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None

    def get(key: str) -> str:
        tag = TAGS[key]
        return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""
    rows, cols, frames = (_numbers(get(key) or default, 1) for key, default in
                          (("rows", "0"), ("columns", "0"), ("frames", "1")))
    if rows is None or cols is None or min(rows[0], cols[0]) < 1:
        return None
    spacing = _numbers(get("spacing"), 2)
    return Image(path, get("series"), (int(rows[0]), int(cols[0])), _numbers(get("position"), 3),
                 _numbers(get("orientation"), 6), tuple(spacing) if spacing is not None else None,
                 int(frames[0]) if frames is not None else 1, get("description"), get("modality"), get("number"))


def _label(images: list[Image]) -> str:
    first = images[0]
    rows, cols = first.size
    what = f"'{first.description}' " if first.description else ""
    number = f"series number {first.number}, " if first.number else ""
    return (f"{what}({first.modality or 'DICOM'}, {len(images)} image(s) {cols}x{rows}, {number}e.g. "
            f"{first.path.name})")


def find_series(path: Path) -> tuple[Path, list[Image]]:
    """(the folder, the images of the one series ``path`` names): a folder with one series, or a file of one."""
    folder = path if path.is_dir() else path.parent
    files = _files(folder)
    images = [im for im in (read_image_header(f) for f in files) if im is not None]
    if path.is_file():
        mine = next((im for im in images if im.path == path), None)
        if mine is None:
            raise InputError(path, "not a DICOM image (no pixel data, or not DICOM)")
        return folder, [im for im in images if im.series == mine.series]
    series: dict[str, list[Image]] = {}
    for im in images:
        series.setdefault(im.series, []).append(im)
    if not series:
        dicom = sum(is_dicom_file(f) for f in files)
        raise InputError(folder, f"no DICOM image in this folder ({dicom} DICOM file(s) without pixel data, such "
                                 f"as a DICOMDIR, reports or structure sets; {len(files) - dicom} other file(s))")
    if len(series) > 1:
        listed = "; ".join(_label(ims) for ims in sorted(series.values(), key=lambda s: s[0].path.name))
        raise InputError(folder, f"{len(series)} DICOM series in one folder: {listed}. Give one file of the series "
                                 "to read instead of the folder (its series is read), or put each series in a "
                                 "folder of its own")
    return folder, next(iter(series.values()))


@dataclass
class Geometry:
    """A series placed in space: its files in slice order, the volume's affine, and each slice's in-plane shift
    back onto a rectangular grid (voxels along rows, columns; None without a gantry tilt)."""

    files: list[Path]
    affine: np.ndarray
    shape: tuple[int, int, int]
    shifts: np.ndarray | None = None


def place(folder: Path, images: list[Image]) -> Geometry:
    """The series' grid, checked (module docstring)."""
    sizes = sorted({im.size for im in images})
    if len(sizes) > 1:
        shown = ", ".join(f"{c}x{r}" for r, c in sizes)
        raise InputError(folder, f"the series mixes image sizes ({shown}): one volume has one size; give one file "
                                 "of the images to read, or split the series")
    spacings = {im.spacing for im in images}
    if len(spacings) > 1:
        raise InputError(folder, f"the series mixes pixel spacings ({', '.join(map(str, sorted(spacings, key=str)))})"
                                 ": one volume has one spacing")
    if any(im.position is None or im.orientation is None for im in images):
        raise InputError(folder, "a slice without Image Position / Orientation (Patient): the series cannot be "
                                 "placed in space")
    orientation = images[0].orientation
    if any(np.abs(im.orientation - orientation).max() > ORIENTATION_TOLERANCE for im in images):
        raise InputError(folder, "the series holds images of several orientations (a localiser, or several "
                                 "stacks): one volume has one orientation")
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    along = np.array([im.position @ normal for im in images])
    order = np.argsort(along, kind="stable")
    images, along = [images[i] for i in order], along[order]
    steps = np.diff(along)
    if (steps < SAME_POSITION_MM).any():
        raise InputError(folder, f"{int((steps < SAME_POSITION_MM).sum()) + 1} images share a slice position: the "
                                 "series holds several volumes (echoes, phases or time points); split it into one "
                                 "folder per volume")
    step = float(steps.mean())
    if (np.abs(steps - step) > max(SPACING_TOLERANCE * step, SAME_POSITION_MM)).any():
        raise InputError(folder, f"the slice spacing varies from {steps.min():.4g} to {steps.max():.4g} mm: a "
                                 "slice is missing, or the images are not one volume")
    rows, cols = images[0].size
    if images[0].spacing is None:
        say_once(f"warning: {folder}: no Pixel Spacing in the series: 1 mm between rows and columns assumed")
    row_spacing, col_spacing = images[0].spacing or (1.0, 1.0)
    positions = np.stack([im.position for im in images])
    drift = positions - positions[0] - np.outer(along - along[0], normal)  # in-plane, mm
    shifts = np.stack([drift @ col / row_spacing, drift @ row / col_spacing], axis=1)  # (rows, columns) voxels
    lps = np.eye(4)
    lps[:3, :3] = np.stack([row * col_spacing, col * row_spacing, normal * step], axis=1)
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    geometry = Geometry([im.path for im in images], affine, (cols, rows, len(images)))
    if np.abs(shifts).max() > TILT_VOXELS:
        tilt = np.linalg.lstsq((along - along[0])[:, None], drift, rcond=None)[0][0]  # mm in-plane per mm across
        if np.abs(drift - np.outer(along - along[0], tilt)).max() > max(row_spacing, col_spacing) * TILT_VOXELS:
            raise InputError(folder, "the slices drift in-plane by uneven steps: not one volume (nor a gantry tilt)")
        angle = math.degrees(math.atan(float(np.linalg.norm(tilt))))
        say_once(f"note: {folder}: gantry tilt of {angle:.2f} degrees: the slices are resampled onto a rectangular "
                 f"grid (each shifted in-plane, by up to {np.abs(shifts).max():.1f} voxels, linear interpolation; "
                 "voxels shifted in from outside take the scan's minimum), as 3D Slicer regularises such a series")
        geometry.shifts = shifts
    return geometry


def _plane(path: Path) -> np.ndarray:
    try:
        image = sitk.ReadImage(str(path), imageIO="GDCMImageIO")
    except RuntimeError as e:
        raise InputError(path, f"unreadable or truncated DICOM pixel data ({itk_problem(e)})") from None
    arr = sitk.GetArrayFromImage(image)
    return arr.reshape(arr.shape[-2:]) if arr.ndim == 3 and arr.shape[0] == 1 else arr


def read_series(geometry: Geometry) -> np.ndarray:
    """The series' rescaled values ``[i, j, k]`` (float32 where a slope or intercept is fractional)."""
    planes = [_plane(f) for f in geometry.files]
    for f, p in zip(geometry.files, planes):
        if p.ndim != 2 or p.shape != planes[0].shape:
            raise InputError(f, f"pixel data of shape {p.shape}, the series' images are {planes[0].shape}")
    dtype = np.result_type(*{p.dtype for p in planes})
    if dtype.kind == "f" or dtype.itemsize > 4:
        dtype = np.dtype(np.float32)
    volume = np.stack(planes).astype(dtype, copy=False)  # [k, rows, columns]
    if geometry.shifts is not None:
        volume = volume.astype(np.float32)
        low = float(volume.min())
        for k, shift in enumerate(np.round(geometry.shifts, 4)):  # positions are decimal strings: snap their noise
            volume[k] = ndimage.shift(volume[k], shift, order=1, mode="grid-constant", cval=low)
    return volume.transpose(2, 1, 0)


def open_series(path: Path, channel: int | None = None) -> Volume:
    """A DICOM series (a folder, or one file of it) as a :class:`Volume`: headers now, pixels on first use."""
    folder, images = find_series(path)
    if len(images) == 1:
        if images[0].frames > 1:  # one multi-frame file: ITK places its frames
            return open_itk(images[0].path, channel, read_info(images[0].path))
        raise InputError(path, "a single 2D DICOM image: a 3D scan is a series of slices (give its folder)")
    if any(im.frames > 1 for im in images):
        raise InputError(folder, "a series of several multi-frame files: give one of them")
    geometry = place(folder, images)
    where = folder if path.is_dir() else path
    _, load = channel_loader(where, geometry.shape, None, lambda: read_series(geometry))
    return Volume(where, load, geometry.affine, nifti_header(geometry.shape, geometry.affine, np.int16),
                  geometry.shape)


def stored_shape(path: Path) -> tuple[int, ...]:
    folder, images = find_series(path)
    if len(images) == 1:
        return read_info(images[0].path).shape
    rows, cols = images[0].size
    return (cols, rows, len(images))

