"""Python API for in-context segmentation of NIfTI scans (the engine under ``python -m icl.segment``).

    from icl.api import ICLSegmenter
    seg = ICLSegmenter(checkpoint=None, config="cfg/tiny_cpu.yaml", device="cpu")
    labels = seg.segment(query="q.nii.gz", support="s.nii.gz", support_label="s_lab.nii.gz")
    seg.save(labels, "pred.nii.gz")

Why a streaming engine instead of ``sam2_ext.icl.segment_with_support``: that helper takes the whole query as a
tensor and returns dense ``[Q, C, H, W]`` logits, so memory grows with the scan's depth. Here query slices are read
from the (memory-mapped or raw-dtype) volume, windowed, resized and encoded one at a time when SAM2 asks for them
(a lazy frame source), old tracking outputs are pruned behind the current slice (``keep_history``), and each
finished slice is folded at once into a compact uint8/int16 label map (argmax over classes of logits > 0).

Which slices are support: ``support_slices`` ("auto" = 3, or N) slices spread across the extent of *every* label
value present in the support label (not only the requested classes), so the prompts a class gets do not depend on
which other classes are asked for. Each requested class gets its GT mask on every support slice where it is
present; all classes are tracked in one pass (one SAM2 object per class, image features computed once per slice).

Propagation direction:
* support and query are the same file: the masks are added at their own slice positions and the scan is tracked
  forward from each class's first support slice to the end and, with the forward memories dropped, backward from
  its last support slice to slice 0; slices seen by both passes get the mean of the two logits (per class, as
  ``sam2_ext.icl.segment_volume_with_support`` does for one class). The forward pass's low-resolution logits
  (``image_size / 4`` squared per class) are kept for the slices the backward pass revisits.
* the support comes from another scan: its support slices (in slice order) are prepended to the query's slices
  and the query stack is tracked in order, from slice 0 to the last.
A class's tracking outputs on slices before its own first prompt (in the pass direction) are dropped, so every class
follows exactly the track the official SAM2 predictor would give it if prompted alone on the same frames.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.transforms import ScaleIntensityRange
from sam2.modeling.sam2_base import NO_OBJ_SCORE

from icl.data.preprocess import CT_WINDOWS, MR_PERCENTILES
from icl.data.sampling import pick_support_slices
from icl.data.validate import check_dims, check_grid, load_nifti_header, load_nifti_volume
from icl.errors import InputError
from icl.report.nifti import write_mask_nifti
from sam2_ext.icl import frame_output

AUTO_SUPPORT_PER_CLASS = 3
# "auto": CT if the scan holds values this low (air in HU), else MR-like percentile scaling
CT_AIR_THRESHOLD = -500.0
WINDOWS: dict[str, tuple[float, float] | None] = {
    **{f"ct_{name}": win for name, win in CT_WINDOWS.items()},
    "mr": None,  # 0.5-99.5 percentile scaling
}
WINDOW_CHOICES = (*WINDOWS, "auto")
SELECTOR_HISTORY = 32  # tracked slices kept behind the current one when a memory selector picks among them
PERCENTILE_SAMPLE_SLICES = 64  # MR percentiles from at most this many evenly spaced slices (bounded memory)


# ---------------------------------------------------------------------------------------------------- volumes
def _take(volume: np.ndarray, index: int, axis: int) -> np.ndarray:
    """One slice of a (memory-mapped) volume along ``axis`` without touching the others."""
    sl: list[Any] = [slice(None)] * volume.ndim
    sl[axis] = index
    return volume[tuple(sl)]


def intensity_range(volume: np.ndarray, slice_axis: int, window: str) -> tuple[float, float]:
    """The (low, high) intensities mapped to [0, 1]: a CT window, or MR percentiles of a slice sample."""
    if window not in WINDOW_CHOICES:
        raise InputError("--window", f"unknown window {window!r}; choose one of {', '.join(WINDOW_CHOICES)}")
    depth = volume.shape[slice_axis]
    sample_idx = np.unique(np.linspace(0, depth - 1, min(depth, PERCENTILE_SAMPLE_SLICES)).round().astype(int))
    sample = np.stack([np.asarray(_take(volume, int(z), slice_axis), dtype=np.float32) for z in sample_idx])
    if window == "auto":
        window = "ct_abdomen" if float(sample.min()) <= CT_AIR_THRESHOLD else "mr"
    if WINDOWS[window] is not None:
        return WINDOWS[window]
    lo, hi = np.percentile(sample, MR_PERCENTILES)
    return float(lo), float(max(hi, lo + 1e-6))


class VolumeFrames:
    """Lazy frame source over a 3D volume: slice ``i`` is read, windowed to [0, 1] and prepared only when asked.

    Satisfies ``sam2_ext.predictor.FrameSource``; ``indices`` restricts it to some slices (the support frames).
    """

    def __init__(self, volume: np.ndarray, slice_axis: int, value_range: tuple[float, float], image_size: int,
                 indices: Sequence[int] | None = None):
        self.volume = volume
        self.axis = slice_axis
        self.scale = ScaleIntensityRange(a_min=value_range[0], a_max=value_range[1], b_min=0.0, b_max=1.0, clip=True)
        self.image_size = image_size
        self.indices = list(range(volume.shape[slice_axis])) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def slice01(self, i: int) -> np.ndarray:
        """Slice ``i`` of this source as float32 [H, W] in [0, 1] (what overlays show)."""
        raw = np.nan_to_num(np.asarray(_take(self.volume, self.indices[i], self.axis), dtype=np.float32))
        return np.asarray(self.scale(raw), dtype=np.float32)

    def __getitem__(self, i: int) -> torch.Tensor:
        from sam2_ext.predictor import prepare_frames

        return prepare_frames(torch.from_numpy(self.slice01(i))[None], self.image_size)[0]


class ConcatFrames:
    """Support frames followed by query frames, still lazy."""

    def __init__(self, first: Any, second: Any):
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, i: int) -> torch.Tensor:
        n = len(self.first)
        return self.first[i] if i < n else self.second[i - n]


@dataclass
class Scan:
    """A NIfTI scan opened for streaming: raw-dtype (memory-mapped when possible) voxels plus its geometry."""

    path: Path
    volume: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header

    @classmethod
    def open(cls, path: str | Path) -> "Scan":
        path = Path(path)
        img = load_nifti_header(path)
        check_dims(img.shape, path)
        if len(img.shape) == 4 and img.shape[3] != 1:
            raise InputError(path, f"4D image {img.shape} with several channels; give one 3D channel")
        try:
            vol = np.asanyarray(img.dataobj)  # raw dtype unless scaled; a memmap for uncompressed .nii
        except Exception as e:
            raise InputError(path, f"unreadable or truncated NIfTI data ({type(e).__name__}: {e})") from None
        if vol.ndim == 4:
            vol = vol[..., 0]
        return cls(path, vol, img.affine.copy(), img.header)


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class Segmentation:
    """A label map on the query's voxel grid, with what is needed to save it and to draw overlays."""

    labels: np.ndarray  # query's voxel order and shape; original label values, 0 = background
    affine: np.ndarray
    header: nib.Nifti1Header
    query: Path
    classes: list[int]
    support_slices: list[int]  # support-scan slice indices used as prompts
    mode: str  # "both_ways" (support is the query) or "prepended" (support from another scan)
    slice_axis: int = 2
    frames: VolumeFrames | None = field(default=None, repr=False)  # the query's lazy frames (overlays)


# ---------------------------------------------------------------------------------------------------- engine
def sweep(predictor: Any, state: dict, start: int, reverse: bool, bound: Sequence[int],
          on_frame: Callable[[], None] | None = None) -> Iterator[tuple[int, torch.Tensor, list[bool]]]:
    """One propagation pass; yields ``(frame_idx, low-res logits [C, 1, h, w], valid per object)``.

    ``bound[obj_idx]`` is the object's first (forward) / last (reverse) prompted frame. Before it (in the pass
    direction) the object is *not tracked*: a placeholder "absent" conditioning output stands in for exactly the
    frame being processed (so SAM2 skips the object there, as the official predictor prompted with that object
    alone would never visit the frame) and is removed before the next frame; those frames are marked invalid.
    """
    low_res = predictor.image_size // 4  # SAM2's mask decoder output size
    placeholder = {"pred_masks": torch.full((1, 1, low_res, low_res), NO_OBJ_SCORE,
                                            device=state["storage_device"])}
    step = -1 if reverse else 1
    placed: list[tuple[int, int]] = []

    def place(frame_idx: int) -> None:
        if not 0 <= frame_idx < state["num_frames"]:
            return
        for obj_idx, b in enumerate(bound):
            if (frame_idx > b) if reverse else (frame_idx < b):
                state["output_dict_per_obj"][obj_idx]["cond_frame_outputs"][frame_idx] = placeholder
                placed.append((obj_idx, frame_idx))

    def unplace() -> None:
        while placed:
            obj_idx, frame_idx = placed.pop()
            state["output_dict_per_obj"][obj_idx]["cond_frame_outputs"].pop(frame_idx, None)

    place(start)
    try:
        for frame_idx, obj_ids, _ in predictor.train_propagate_in_video(state, start_frame_idx=start,
                                                                         reverse=reverse):
            low = torch.cat([frame_output(state, i, frame_idx)["pred_masks"] for i in range(len(obj_ids))], dim=0)
            valid = [(frame_idx <= b) if reverse else (frame_idx >= b) for b in bound]
            unplace()
            place(frame_idx + step)
            if on_frame is not None:
                on_frame()
            yield frame_idx, low.float(), valid
    finally:
        unplace()


def history_to_keep(predictor: Any) -> int:
    """Tracked outputs to keep behind the current slice: all SAM2 reads (memories, object pointers), or more
    for a memory selector to choose from; older ones are dropped so memory does not grow with depth."""
    keep = max(predictor.num_maskmem * predictor.memory_temporal_stride_for_eval, predictor.max_obj_ptrs_in_encoder)
    selector = getattr(predictor, "memory_selector", None)
    if selector is not None:
        keep = max(keep, getattr(selector.config, "window", None) or SELECTOR_HISTORY)
    return keep + 1


def _label_frame(logits: torch.Tensor, values: torch.Tensor) -> np.ndarray:
    """[C, H, W] logits → label map [H, W]: the class with the highest logit where it is > 0 (overlaps resolved)."""
    best, arg = logits.max(dim=0)
    return torch.where(best > 0, values[arg], torch.zeros_like(arg)).cpu().numpy()


def _to_video_res(predictor: Any, state: dict, low: torch.Tensor) -> torch.Tensor:
    return predictor._get_orig_video_res_output(state, low)[1][:, 0]


def run_prepended(predictor: Any, support: VolumeFrames, support_masks: dict[int, list[np.ndarray]],
                  query: VolumeFrames, query_hw: tuple[int, int], write: Callable[[int, torch.Tensor], None],
                  progress: Callable[[], None] | None = None) -> None:
    """Support frames then query frames in one video; ``write(query_slice, logits [C, H, W])`` per query slice."""
    state = predictor.init_state_from_frames(ConcatFrames(support, query), video_height=query_hw[0],
                                             video_width=query_hw[1])
    state["keep_history"] = history_to_keep(predictor)
    first = _add_prompts(predictor, state, {cid: dict(enumerate(m)) for cid, m in support_masks.items()})
    n = len(support)
    for frame_idx, low, valid in sweep(predictor, state, min(first), False, first, progress):
        if frame_idx >= n:
            write(frame_idx - n, _mask_invalid(_to_video_res(predictor, state, low), valid))


def _mask_invalid(logits: torch.Tensor, valid: Sequence[bool]) -> torch.Tensor:
    for i, ok in enumerate(valid):
        if not ok:
            logits[i] = NO_OBJ_SCORE
    return logits


def _add_prompts(predictor: Any, state: dict, prompts: dict[int, dict[int, np.ndarray]]) -> list[int]:
    """Add every non-empty GT mask (slice-major, one image-encoder run per slice); returns each object's first
    prompted frame (object order = ``prompts`` order)."""
    frames = sorted({z for per in prompts.values() for z in per})
    for cid in prompts:  # fix the object order to the class order
        predictor._obj_id_to_idx(state, cid)
    for z in frames:
        for cid, per in prompts.items():
            mask = per.get(z)
            if mask is not None and mask.any():
                predictor.train_add_new_mask(state, z, cid, torch.from_numpy(np.ascontiguousarray(mask)).float())
    firsts = []
    for cid, per in prompts.items():
        zs = [z for z, m in per.items() if m.any()]
        if not zs:
            raise InputError("support", f"class {cid} has no non-empty support mask")
        firsts.append(min(zs))
    return firsts


def run_both_ways(predictor: Any, frames: VolumeFrames, prompts: dict[int, dict[int, np.ndarray]],
                  hw: tuple[int, int], write: Callable[[int, torch.Tensor], None],
                  progress: Callable[[], None] | None = None) -> None:
    """Masks on slices of the scan itself; forward then backward pass per class (see the module docstring)."""
    state = predictor.init_state_from_frames(frames, video_height=hw[0], video_width=hw[1])
    state["keep_history"] = history_to_keep(predictor)
    first = _add_prompts(predictor, state, prompts)
    last = [max(z for z, m in per.items() if m.any()) for per in prompts.values()]
    stored: dict[int, tuple[torch.Tensor, list[bool]]] = {}  # forward low-res logits of slices the reverse revisits
    for z, low, valid in sweep(predictor, state, min(first), False, first, progress):
        if z > max(last):  # beyond every class's last prompt: forward only, final now
            write(z, _mask_invalid(_to_video_res(predictor, state, low), valid))
        else:
            stored[z] = (low.to(state["storage_device"]), valid)
    for obj_out in state["output_dict_per_obj"].values():
        obj_out["non_cond_frame_outputs"].clear()
    for z, low, valid in sweep(predictor, state, max(last), True, last, progress):
        fwd, fwd_valid = stored.pop(z, (None, [False] * len(valid)))
        merged = []
        for c in range(len(valid)):
            parts = [x[c] for x, ok in ((low, valid[c]), (fwd, fwd_valid[c])) if ok]
            merged.append(torch.stack(parts).mean(0) if parts else torch.full_like(low[c], NO_OBJ_SCORE))
        write(z, _to_video_res(predictor, state, torch.stack(merged)))


# ---------------------------------------------------------------------------------------------------- the API
def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def parse_classes(text: str | None) -> list[int] | None:
    """``"1,2"`` → [1, 2]; None/"" → None (every label value of the support)."""
    if text is None or not str(text).strip():
        return None
    try:
        classes = [int(c) for c in str(text).split(",") if c.strip()]
    except ValueError:
        raise InputError("--classes", f"expected comma-separated integers, got {text!r}") from None
    if not classes or min(classes) <= 0 or len(set(classes)) != len(classes):
        raise InputError("--classes", f"expected distinct positive label values, got {text!r}")
    return classes


def parse_support_slices(value: str | int) -> int:
    """``"auto"`` → AUTO_SUPPORT_PER_CLASS; ``"N"`` → N (>= 1) support slices per class."""
    if str(value).strip().lower() == "auto":
        return AUTO_SUPPORT_PER_CLASS
    try:
        n = int(value)
    except ValueError:
        raise InputError("--support-slices", f"expected 'auto' or a positive integer, got {value!r}") from None
    if n < 1:
        raise InputError("--support-slices", f"expected 'auto' or a positive integer, got {value!r}")
    return n


def choose_support_slices(label: np.ndarray, slice_axis: int, per_class: int) -> list[int]:
    """``per_class`` slices spread across each label value's extent, for every value present (sorted, unique)."""
    zhw = np.moveaxis(label, slice_axis, 0)
    picks: set[int] = set()
    for value in np.unique(label):
        if value > 0:
            picks.update(int(z) for z in pick_support_slices(zhw, int(value), per_class))
    return sorted(picks)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or a.samefile(b)
    except OSError:
        return False


def load_support(support: str | Path, support_label: str | Path,
                 classes: Sequence[int] | None = None) -> tuple[np.ndarray, list[int]]:
    """Validate the support pair and the requested classes; returns (label array, classes to segment)."""
    support, support_label = Path(support), Path(support_label)
    img = load_nifti_header(support)
    check_dims(img.shape, support)
    label, label_affine, _ = load_nifti_volume(support_label)
    check_grid(img.shape, img.affine, label.shape, label_affine, support_label)
    if label.dtype.kind == "f":
        if not np.array_equal(label, np.round(label)):
            raise InputError(support_label, "label has non-integer values")
        label = label.astype(np.int64)
    present = sorted(int(v) for v in np.unique(label) if v > 0)
    if not present:
        raise InputError(support_label, "support label is empty (no foreground voxels)")
    classes = present if classes is None else [int(c) for c in classes]
    missing = [c for c in classes if c not in present]
    if missing:
        raise InputError(support_label, f"requested class(es) {missing} not in the support label "
                                        f"(values present: {present})")
    return label, classes


class ICLSegmenter:
    """Segment NIfTI scans from one labelled support scan with an ICL SAM2 model (no ground truth needed)."""

    def __init__(self, checkpoint: str | Path | None = None, config: str | Path = "tiny_cpu",
                 device: str | torch.device = "cpu", image_size: int | None = None,
                 memory_selector: str | None = None, window: str = "auto", slice_axis: int = 2,
                 support_slices: str | int = "auto"):
        from sam2_ext.build import build_icl_predictor

        self.device = _check_device(device)
        if window not in WINDOW_CHOICES:
            raise InputError("--window", f"unknown window {window!r}; choose one of {', '.join(WINDOW_CHOICES)}")
        if slice_axis not in (0, 1, 2):
            raise InputError("--slice-axis", f"expected 0, 1 or 2, got {slice_axis}")
        self.window, self.slice_axis = window, slice_axis
        self.per_class = parse_support_slices(support_slices)
        self.predictor = build_icl_predictor(config, self.device, checkpoint=checkpoint, image_size=image_size).eval()
        if memory_selector:
            from sam2_ext.selector import MemorySelector

            self.predictor.memory_selector = MemorySelector.from_name(memory_selector)

    def segment(self, query: str | Path, support: str | Path, support_label: str | Path,
                classes: Sequence[int] | str | None = None, progress: bool = False) -> Segmentation:
        """Segment ``query`` with the labelled ``support`` scan; all ``classes`` (default: every label value of
        the support) in one pass. Returns a :class:`Segmentation` on the query's grid."""
        query, support, support_label = Path(query), Path(support), Path(support_label)
        if isinstance(classes, str):
            classes = parse_classes(classes)
        label, cls = load_support(support, support_label, classes)
        q = Scan.open(query)
        axis = self.slice_axis
        picks = choose_support_slices(label, axis, self.per_class)
        hw = tuple(s for i, s in enumerate(q.volume.shape) if i != axis)
        frames = VolumeFrames(q.volume, axis, intensity_range(q.volume, axis, self.window), self.predictor.image_size)
        dtype = np.uint8 if max(cls) < 256 else np.int16
        labels = np.zeros(q.volume.shape, dtype=dtype)
        values = torch.tensor(cls, device=self.device)

        def write(z: int, logits: torch.Tensor) -> None:
            sl: list[Any] = [slice(None)] * 3
            sl[axis] = z
            labels[tuple(sl)] = _label_frame(logits.float(), values)

        same = _same_file(query, support)
        # forward from the first support slice to the end, then back from the last one to 0 (or S + Q frames)
        total = len(frames) - min(picks) + max(picks) + 1 if same else len(picks) + len(frames)
        bar = _progress_bar(total, query.name, progress)
        try:
            with torch.no_grad(), _autocast(self.device):
                if same:
                    prompts = {c: {z: _take(label, z, axis) == c for z in picks} for c in cls}
                    run_both_ways(self.predictor, frames, prompts, hw, write, bar.update)
                else:
                    s = Scan.open(support)
                    sup = VolumeFrames(s.volume, axis, intensity_range(s.volume, axis, self.window),
                                       self.predictor.image_size, indices=picks)
                    masks = {c: [_take(label, z, axis) == c for z in picks] for c in cls}
                    run_prepended(self.predictor, sup, masks, frames, hw, write, bar.update)
        finally:
            bar.close()
        return Segmentation(labels, q.affine, q.header, query, cls, picks, "both_ways" if same else "prepended",
                            axis, frames)

    def save(self, result: Segmentation, path: str | Path) -> Path:
        """Write the label map with the query's affine and header, atomically."""
        dtype = np.uint8 if result.labels.dtype == np.uint8 else np.int16
        return write_mask_nifti(result.labels, (result.affine, result.header), path, dtype=dtype)


def _check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError("--device", f"not a torch device: {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device", f"{device} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise InputError("--device", f"expected cpu or cuda[:N], got {device!r}")
    return dev


def _progress_bar(total: int, name: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"segment {name}", unit="slice", disable=not enabled, leave=False)


__all__ = [
    "ICLSegmenter", "Segmentation", "VolumeFrames", "ConcatFrames", "Scan", "intensity_range",
    "choose_support_slices", "load_support", "parse_classes", "parse_support_slices", "run_prepended",
    "run_both_ways", "sweep", "history_to_keep", "WINDOW_CHOICES",
]
