"""THE preprocessing of the engine: one volume (NIfTI, or any format `icl.data.formats` reads) → the model's frames,
for the cache *and* the CLI/API.

Why one module: a checkpoint trained on cached frames must see the very same frames at inference. Everything that
decides a frame's pixels lives here and nowhere else:

1. orientation: the voxels are viewed in nibabel's closest canonical (RAS) axis order (permutations and flips
   only, as MONAI's ``Orientation("RAS")``; an oblique affine keeps its residual rotation), so scans stored RAS,
   LPS or slices-first give the same slices;
2. values: stored voxels times ``scl_slope`` plus ``scl_inter``; non-finite voxels follow the engine's one rule
   (NaN and -inf → the volume's finite minimum, +inf → its finite maximum, one warning line per scan);
3. window: a CT preset, or MR 0.5-99.5 percentiles of the whole volume (bounded memory, see
   :func:`intensity_range`), mapped to [0, 1] and clipped;
4. resize: :func:`resize_slices` (bilinear with antialiasing for images, nearest-exact for labels).

Slices are read one at a time from the memory-mapped (uncompressed) or raw-dtype (gzipped) data: memory does not
grow with the scan beyond its stored size.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from nibabel.volumeutils import apply_read_scaling

from icl.data.formats import open_volume
from icl.data.validate import check_integer_labels, no_finite_voxels, warn_nonfinite
from icl.errors import InputError

if TYPE_CHECKING:
    import torch

# CT windows (HU). kidney: nnU-Net's KiTS19 foreground 0.5-99.5 percentiles; abdomen: the soft-tissue window used
# for BTCV by UNETR / Swin-UNETR. None: MR-like percentile scaling.
WINDOWS: dict[str, tuple[float, float] | None] = {
    "ct_abdomen": (-175.0, 250.0), "ct_kidney": (-79.0, 304.0), "mr": None,
}
WINDOW_CHOICES = (*WINDOWS, "auto")
CT_AIR_THRESHOLD = -500.0  # "auto": a scan holding values this low (air in HU) is CT
MR_PERCENTILES = (0.5, 99.5)
PERCENTILE_VOXEL_BUDGET = 2**24  # exact percentiles up to this many voxels, else a regular-grid subsample
SLAB_VOXELS = 2**22  # voxels per block of a whole-volume pass (statistics, percentiles)
DEFAULT_SLICE_AXIS = 2  # an axis of the canonical (RAS) orientation: 2 = axial
RAS = axcodes2ornt(("R", "A", "S"))
RESIZE_MODES = ("image", "label", "logits")


# ------------------------------------------------------------------------------------------------ orientation
def canonical_ornt(affine: np.ndarray, where: str | Path = "affine") -> np.ndarray:
    """The (3, 2) nibabel orientation transform from the file's voxel axes to the closest canonical (RAS) ones."""
    ornt = ornt_transform(io_orientation(np.asarray(affine, dtype=np.float64)), RAS)
    if np.isnan(ornt).any():
        raise InputError(where, "the affine has a zero-length voxel axis; the scan's orientation is undefined")
    return ornt


def inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    """The transform undoing ``ornt`` (canonical → file voxel order)."""
    return ornt_transform(RAS, np.asarray(ornt, dtype=np.float64))


def reorient(arr: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """``arr`` with its first three axes flipped/transposed by ``ornt``: a view, never a copy."""
    return apply_orientation(arr, np.asarray(ornt, dtype=np.float64))


def reoriented_shape(shape: Sequence[int], ornt: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(s) for s in reorient(np.broadcast_to(np.uint8(0), tuple(shape)), ornt).shape)  # type: ignore


# ------------------------------------------------------------------------------------------------ the scan
class Scan:
    """One 3D image (or one channel of a 4D one) of any format read here, opened lazily: header now, voxels on
    first use.

    ``shape``/``affine`` are the file's own; ``canonical`` shows the voxels in closest-canonical axis order.
    """

    def __init__(self, path: str | Path, load: Callable[[], np.ndarray], affine: np.ndarray, header: Any,
                 shape: Sequence[int], slope: float = 1.0, inter: float = 0.0, channel: int | None = None,
                 segments: tuple | None = None):
        self.path = Path(path)
        self.affine = np.array(affine, dtype=np.float64)
        self.header = header
        self.shape: tuple[int, int, int] = tuple(int(s) for s in shape[:3])  # type: ignore[assignment]
        self.channel = channel
        self.segments = segments  # a Slicer segmentation's segments (names, colours, values), kept for its outputs
        self.slope, self.inter = float(slope), float(inter)
        self.ornt = canonical_ornt(self.affine, self.path)
        self.canonical_shape = reoriented_shape(self.shape, self.ornt)
        self._load, self._raw = load, None
        self._scaled: np.ndarray | None = None
        self._range: tuple[float, float] | None = None
        self.nonfinite = 0  # voxels replaced by the non-finite rule (known once the range is computed)
        self.memo: dict[Any, Any] = {}  # per-scan results (percentiles), so every user of this scan agrees

    @classmethod
    def open(cls, path: str | Path, channel: int | None = None) -> "Scan":
        """A 3D image, or 4D channels-last (``channel`` picks one; needed when there are several), in any format
        ``icl.data.formats`` reads: NIfTI, NRRD and Slicer's ``.seg.nrrd``, MetaImage, a DICOM series."""
        v = open_volume(path, channel)
        return cls(v.path, v.load, v.affine, v.header, v.shape, v.slope, v.inter, v.channel, v.segments)

    @classmethod
    def from_array(cls, arr: np.ndarray, affine: np.ndarray | None = None, path: str | Path = "<array>") -> "Scan":
        """An in-memory 3D volume as a scan (identity affine by default: file order is canonical)."""
        arr = np.asanyarray(arr)
        if arr.ndim != 3:
            raise InputError(path, f"volume is {arr.ndim}D {arr.shape}, expected 3D")
        affine = np.eye(4) if affine is None else np.asarray(affine)
        return cls(path, lambda: arr, affine, nib.Nifti1Header(), arr.shape)

    # ---- voxels
    @property
    def raw(self) -> np.ndarray:
        """Stored (unscaled) voxels in file order; loaded on first use."""
        if self._raw is None:
            self._raw = self._load()
        return self._raw

    @property
    def scaled(self) -> bool:
        return (self.slope, self.inter) != (1.0, 0.0)

    def to_canonical(self, arr: np.ndarray) -> np.ndarray:
        """An array on this scan's grid (file voxel order) as a canonical-order VIEW (writable when ``arr`` is)."""
        if tuple(np.shape(arr)[:3]) != self.shape:
            raise ValueError(f"array of shape {np.shape(arr)} is not on the grid {self.shape} of {self.path}")
        return reorient(arr, self.ornt)

    def from_canonical(self, arr: np.ndarray) -> np.ndarray:
        """A canonical-order array back in the file's voxel order (a view)."""
        if tuple(np.shape(arr)[:3]) != self.canonical_shape:
            raise ValueError(f"array of shape {np.shape(arr)} is not canonical {self.canonical_shape}")
        return reorient(arr, inverse_ornt(self.ornt))

    @property
    def canonical(self) -> np.ndarray:
        """The voxel values in canonical axis order: a view of the stored data (a float32 copy if scl_slope/inter
        scale it). Non-finite voxels are left as stored; frames apply the rule."""
        if not self.scaled:
            return self.to_canonical(self.raw)
        if self._scaled is None:
            self._scaled = self.to_canonical(self.values(self.raw))
        return self._scaled

    def values(self, block: np.ndarray) -> np.ndarray:
        """Stored voxels → float32 values (``scl_slope``/``scl_inter`` applied), a fresh writable array."""
        return np.array(apply_read_scaling(np.asarray(block), self.slope, self.inter), dtype=np.float32)

    def blocks(self, step: int = 1) -> Iterator[np.ndarray]:
        """Float32 values of the canonical volume (every ``step``-th voxel per axis) in slabs of bounded size."""
        canon = self.to_canonical(self.raw)[::step, ::step]
        chunk = max(1, SLAB_VOXELS // max(1, canon.shape[0] * canon.shape[1])) * step
        for z0 in range(0, self.canonical_shape[2], chunk):
            yield self.values(canon[:, :, z0:z0 + chunk:step])

    @property
    def may_be_nonfinite(self) -> bool:
        return self.raw.dtype.kind not in "biu" or self.scaled

    @property
    def finite_range(self) -> tuple[float, float]:
        """(min, max) of the finite values, from one slab-wise pass; warns once if any voxel is not finite."""
        if self._range is None:
            lo, hi, bad = math.inf, -math.inf, 0
            for v in self.blocks():
                ok = np.isfinite(v)
                n_ok = int(np.count_nonzero(ok))
                bad += v.size - n_ok
                if n_ok:
                    fin = v if n_ok == v.size else v[ok]
                    lo, hi = min(lo, float(fin.min())), max(hi, float(fin.max()))
            if lo > hi:
                raise no_finite_voxels(self.path)
            self._range, self.nonfinite = (lo, hi), bad
            if bad:
                warn_nonfinite(self.path, bad)
        return self._range

    def fix_nonfinite(self, v: np.ndarray) -> np.ndarray:
        """The engine's one rule, in place: NaN/-inf → finite minimum, +inf → finite maximum."""
        if self.may_be_nonfinite:
            lo, hi = self.finite_range
            if self.nonfinite:
                np.nan_to_num(v, copy=False, nan=lo, posinf=hi, neginf=lo)
        return v

    def read_slice(self, index: int, axis: int = DEFAULT_SLICE_AXIS) -> np.ndarray:
        """Canonical slice ``index`` along ``axis``: float32 values [H, W], non-finite voxels replaced."""
        sl: list[Any] = [slice(None)] * 3
        sl[axis] = int(index)
        return self.fix_nonfinite(self.values(self.to_canonical(self.raw)[tuple(sl)]))

    def __repr__(self) -> str:
        return f"Scan({str(self.path)!r}, shape={self.shape}, canonical_shape={self.canonical_shape})"


# ------------------------------------------------------------------------------------------------ intensities
def parse_window(text: str) -> str | tuple[float, float]:
    """A CLI ``--window``: a name from WINDOW_CHOICES or ``'lo,hi'`` (HU)."""
    if text in WINDOW_CHOICES:
        return text
    try:
        lo, hi = (float(v) for v in str(text).split(","))
    except ValueError:
        raise InputError("--window", f"expected one of {', '.join(WINDOW_CHOICES)} or 'lo,hi', got {text!r}") from None
    return check_window((lo, hi))


def check_window(window: Any) -> str | tuple[float, float]:
    """A window name, or a (lo, hi) pair with lo < hi; anything else is an InputError on ``--window``."""
    if isinstance(window, str):
        if window not in WINDOW_CHOICES:
            raise InputError("--window", f"unknown window {window!r}; choose one of {', '.join(WINDOW_CHOICES)}")
        return window
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        raise InputError("--window", f"expected a window name or (lo, hi), got {window!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise InputError("--window", f"expected finite lo < hi, got ({lo}, {hi})")
    return (lo, hi)


def resolve_window(scan: Scan, window: str | tuple[float, float]) -> str | tuple[float, float]:
    """``auto`` → ``ct_abdomen`` if the scan holds air-like values (<= -500), else ``mr``; others unchanged."""
    window = check_window(window)
    if window == "auto":
        return "ct_abdomen" if scan.finite_range[0] <= CT_AIR_THRESHOLD else "mr"
    return window


def percentile_step(shape: Sequence[int], budget: int) -> int:
    """The smallest per-axis stride whose regular grid holds at most ``budget`` voxels (1 = every voxel)."""
    step = max(1, int((math.prod(shape) / max(1, budget)) ** (1 / 3)))
    while math.prod(-(-int(s) // step) for s in shape) > budget:
        step += 1
    return step


def mr_percentiles(scan: Scan) -> tuple[float, float]:
    """MR_PERCENTILES of the whole (canonical) volume: exact over every voxel up to PERCENTILE_VOXEL_BUDGET voxels,
    else over the regular grid of every ``step``-th voxel per axis — deterministic, memory bounded by the budget."""
    budget = int(PERCENTILE_VOXEL_BUDGET)
    key = ("percentiles", budget)
    if key not in scan.memo:
        step = percentile_step(scan.canonical_shape, budget)
        sample = np.empty(math.prod(-(-s // step) for s in scan.canonical_shape), dtype=np.float32)
        n = 0
        for v in scan.blocks(step):
            sample[n:n + v.size] = scan.fix_nonfinite(v).ravel()
            n += v.size
        lo, hi = (float(p) for p in np.percentile(sample[:n], MR_PERCENTILES, overwrite_input=True))
        scan.memo[key] = (lo, max(hi, lo + 1e-6))
    return scan.memo[key]


def intensity_range(scan: Scan, window: str | tuple[float, float]) -> tuple[float, float]:
    """(lo, hi) mapped to [0, 1]: a CT preset (or a given (lo, hi)), or the scan's MR percentiles."""
    window = resolve_window(scan, window)
    if isinstance(window, tuple):
        return window
    preset = WINDOWS[window]
    return preset if preset is not None else mr_percentiles(scan)


def window01(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] to [0, 1] and clip (MONAI ScaleIntensityRange with clip=True), float32."""
    return np.clip((np.asarray(x, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0,
                   dtype=np.float32)


# ------------------------------------------------------------------------------------------------ resize
def resize_slices(x: "torch.Tensor | np.ndarray", size: Sequence[int], mode: str) -> "torch.Tensor | np.ndarray":
    """[N, H, W] → [N, *size] (always a new array): "image" bilinear + antialiasing (closest to SAM2's own
    PIL-resized frames), "label" nearest-exact (dtype kept), "logits" bilinear (float32)."""
    import torch  # torch only where tensors are resized: the data layer and the generators run without it
    import torch.nn.functional as F

    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r} not in {RESIZE_MODES}")
    size = tuple(int(s) for s in size)
    was_numpy = not isinstance(x, torch.Tensor)
    if was_numpy:
        arr = np.ascontiguousarray(x)
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # torch refuses read-only memory
    else:
        t = x
    if t.dim() != 3 or len(size) != 2:
        raise ValueError(f"expected [N, H, W] and (H, W), got {tuple(t.shape)} and {size}")
    dtype = t.dtype if mode == "label" else torch.float32
    if tuple(t.shape[1:]) == size:
        out = t.to(dtype, copy=True)
    else:
        f = t[:, None].float()
        if mode == "label":
            f = F.interpolate(f, size=size, mode="nearest-exact")
        else:
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=False, antialias=mode == "image")
        out = f[:, 0].round().to(dtype) if mode == "label" and not dtype.is_floating_point else f[:, 0].to(dtype)
    return out.numpy() if was_numpy else out


# ------------------------------------------------------------------------------------------------ frames
def check_slice_axis(axis: int) -> int:
    if axis not in (0, 1, 2):
        raise InputError("--slice-axis", f"expected 0, 1 or 2 (canonical RAS axes; 2 = axial), got {axis}")
    return int(axis)


class VolumeFrames:
    """The lazy frames of one scan along canonical ``slice_axis``: item ``i`` is read, windowed and resized only
    when asked for. ``indices`` restricts it to some slices (support frames); ``crop`` (y0, y1, x0, x1, end
    exclusive, in-plane canonical voxels) to a box of every slice, windowed like the whole scan."""

    def __init__(self, scan: Scan, window: str | tuple[float, float] = "auto", image_size: int = 128,
                 slice_axis: int = DEFAULT_SLICE_AXIS, indices: Sequence[int] | None = None,
                 crop: tuple[int, int, int, int] | None = None):
        self.scan = scan
        self.slice_axis = check_slice_axis(slice_axis)
        if int(image_size) < 1:
            raise InputError("--image-size", f"expected a positive size, got {image_size}")
        self.image_size = int(image_size)
        self.window = resolve_window(scan, window)
        self.value_range = intensity_range(scan, self.window)
        depth = scan.canonical_shape[self.slice_axis]
        self.indices = list(range(depth)) if indices is None else [int(i) for i in indices]
        outside = [i for i in self.indices if not 0 <= i < depth]
        if outside:
            raise IndexError(f"slice indices {outside[:5]} outside 0..{depth - 1} of {scan.path}")
        full = tuple(s for a, s in enumerate(scan.canonical_shape) if a != self.slice_axis)
        self.crop = None if crop is None else tuple(int(v) for v in crop)
        y0, y1, x0, x1 = self.crop or (0, full[0], 0, full[1])
        if not (0 <= y0 < y1 <= full[0] and 0 <= x0 < x1 <= full[1]):
            raise ValueError(f"crop {crop} outside the in-plane shape {full} of {scan.path}")
        self.in_plane_shape: tuple[int, int] = (y1 - y0, x1 - x0)

    def __len__(self) -> int:
        return len(self.indices)

    def slice01(self, i: int) -> np.ndarray:
        """Item ``i`` windowed to [0, 1] at native in-plane size [H, W] (what overlays show)."""
        plane = self.scan.read_slice(self.indices[i], self.slice_axis)
        if self.crop is not None:
            y0, y1, x0, x1 = self.crop
            plane = plane[y0:y1, x0:x1]
        return window01(plane, *self.value_range)

    def __getitem__(self, i: int) -> np.ndarray:
        """Item ``i`` as the model's frame: float32 [image_size, image_size] in [0, 1]."""
        out = resize_slices(self.slice01(i)[None], (self.image_size, self.image_size), "image")[0]
        return np.clip(out, 0.0, 1.0, out=out)

    def stack(self, out: np.ndarray | None = None) -> np.ndarray:
        """Every item into ``out`` (e.g. a memmap; default a new array) [N, S, S] — item by item, so a stack
        equals the items exactly."""
        if out is None:
            out = np.empty((len(self), self.image_size, self.image_size), dtype=np.float32)
        for i in range(len(self)):
            out[i] = self[i]
        return out


def label_slices(label: Scan, slice_axis: int, indices: Sequence[int] | None, image_size: int) -> np.ndarray:
    """Label slices [N, S, S] (nearest-exact, class values kept): uint8 when stored as uint8, else int32.

    NaN/inf or non-integer label voxels are an InputError (labels have no replacement rule).
    """
    axis = check_slice_axis(slice_axis)
    depth = label.canonical_shape[axis]
    idx = list(range(depth)) if indices is None else [int(i) for i in indices]
    dtype = np.uint8 if not label.scaled and label.raw.dtype in (np.uint8, np.bool_) else np.int32
    out = np.empty((len(idx), image_size, image_size), dtype=dtype)
    canon = label.to_canonical(label.raw)
    for n, z in enumerate(idx):
        sl: list[Any] = [slice(None)] * 3
        sl[axis] = z
        v = label.values(canon[tuple(sl)])
        check_integer_labels(v, label.path)
        out[n] = resize_slices(v.astype(dtype)[None], (image_size, image_size), "label")[0]
    return out


__all__ = ["WINDOWS", "WINDOW_CHOICES", "DEFAULT_SLICE_AXIS", "MR_PERCENTILES", "CT_AIR_THRESHOLD", "Scan",
           "VolumeFrames", "intensity_range", "label_slices", "resize_slices", "resolve_window", "parse_window",
           "canonical_ornt", "inverse_ornt", "reorient"]
