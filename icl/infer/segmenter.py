"""Python API for in-context segmentation of NIfTI scans (the engine under ``python -m icl.segment``).

    from icl.api import ICLSegmenter
    seg = ICLSegmenter()                                     # the default CPU model (checkpoint/icl_tiny_cpu.pth)
    labels = seg.segment(query="q.nii.gz", support="s.nii.gz", support_label="s_lab.nii.gz")
    seg.save(labels, "pred.nii.gz")

One road: scans become frames through ``icl.data.frames`` (the cache's own preprocessing: canonical orientation,
the engine's NaN rule, window, resize), support masks through ``label_slices`` at the model's size, and the
propagation is ``sam2_ext.track.track``, the rule training and evaluation use. So a checkpoint sees here exactly
the frames and the tracking it was trained with.

Which slices are support (``support_slices``): ``"auto"`` (3) or N slices spread across the extent of *every* label
value present in the support label (so the prompts a class gets do not depend on which other classes are asked
for), or ``"labelled"``: exactly the slices that carry any label value (a scan annotated on a few slices, as in
3D Slicer or ITK-SNAP); each class is prompted on the chosen slices where it appears.

Direction (``direction``): ``"auto"`` decides by content: support and query the same scan (same grid, affine and
voxel values, whatever the file names) → the masks stay on their own slices and the scan is tracked both ways; with
``"labelled"`` the annotated slices are written back exactly as given (the sparse fill). Support from another scan →
its support slices are put in front of the query, tracked forward. ``"both"`` / ``"forward"`` choose explicitly
(``"both"`` needs the query on the support's grid). Scans are NIfTI paths, nibabel images or (array, affine). Memory stays flat in the
query's depth: slices are read, windowed and encoded when tracking reaches them, and each finished slice goes
straight into a compact label map in the query's own voxel order (written with its affine and header).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from icl.data.frames import (DEFAULT_SLICE_AXIS, Scan, VolumeFrames, check_slice_axis, check_window, label_slices,
                             resize_slices, resolve_window)
from icl.errors import InputError, spell_flag
from icl.infer.outputs import nifti_name
from icl.infer.scan_source import check_direction, decide_both_ways, open_scan
from icl.infer.support import (LABELLED, check_crop, check_sparse_options, choose_support_slices, load_support,
                               parse_classes, parse_support_slices)
from icl.model.boundary import library_errors
from icl.model.build import build_predictor
from icl.model.device import resolve_device
from icl.model.precision import amp_dtype, autocast, check_amp
from icl.model.settings import check_image_memory, settle_model
from icl.model.weights import DEFAULT_SEGMENT_CONFIG, resolve_checkpoint
from icl.progress import progress as progress_bar
from icl.report.nifti import write_mask_nifti
from icl.sparse.annotation import Annotation
from icl.sparse.fill import StructureCheck, choose, fill_volume, self_check
from icl.sparse.methods import AUTO, MODEL
from icl.sparse.model_fill import ModelFill
from sam2_ext.predictor import prepare_frames
from sam2_ext.track import track


# ---------------------------------------------------------------------------------------------------- frames
class PreparedFrames:
    """``VolumeFrames`` items ([S, S] in [0, 1]) as SAM2's normalised [3, S, S] tensors, still one at a time."""

    def __init__(self, frames: VolumeFrames):
        self.frames = frames

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> torch.Tensor:
        return prepare_frames(torch.from_numpy(self.frames[i])[None], self.frames.image_size)[0]


class ConcatFrames:
    """Support frames followed by query frames, still lazy."""

    def __init__(self, first: Any, second: Any):
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, i: int) -> torch.Tensor:
        n = len(self.first)
        return self.first[i] if i < n else self.second[i - n]


def _slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """One slice of a (canonical-order) volume along ``axis``: a view."""
    sl: list[Any] = [slice(None)] * 3
    sl[axis] = index
    return volume[tuple(sl)]


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class Segmentation:
    """A label map on the query's voxel grid, with what is needed to save it and to draw overlays."""

    labels: np.ndarray  # query's own voxel order and shape; original label values, 0 = background
    affine: np.ndarray
    header: nib.Nifti1Header
    query: Path
    classes: list[int]
    support_slices: list[int]  # support-scan slices (canonical axis ``slice_axis``) used as prompts
    mode: str  # "both_ways" (support is the query) or "prepended" (support from another scan)
    slice_axis: int = DEFAULT_SLICE_AXIS
    frames: VolumeFrames | None = field(default=None, repr=False)  # the query's lazy frames (overlays)
    checks: list[StructureCheck] = field(default_factory=list)  # labelled mode: the self-check, per structure

    def report(self) -> dict:
        """The self-check table as written by ``--report`` (JSON-ready)."""
        return {"query": str(self.query), "structures": [c.as_dict() for c in self.checks]}

    def canonical_labels(self) -> np.ndarray:
        """The label map in the frames' canonical orientation (a view; slice ``z`` matches ``frames[z]``)."""
        return self.frames.scan.to_canonical(self.labels) if self.frames is not None else self.labels


# ---------------------------------------------------------------------------------------------------- the API
class ICLSegmenter:
    """Segment NIfTI scans from one labelled support scan with an ICL SAM2 model (no ground truth needed).

    ``checkpoint``: None = the default model shipped for the config (``checkpoint/README.md``); ``"none"`` = random
    init (with a warning); else a weights file (ours, official SAM2 ``{"model": ...}`` or MedSAM2). ``config`` and
    ``image_size``: None = what the weights were trained with (``icl.model.settings``), else ``tiny_cpu`` at its own
    size; a config other than the weights' is an error, another image size a warning.
    """

    def __init__(self, checkpoint: str | Path | None = None, config: str | Path | None = None,
                 device: str | torch.device = "cpu", image_size: int | None = None,
                 memory_selector: str | None = None, window: str = "auto", slice_axis: int = DEFAULT_SLICE_AXIS,
                 support_slices: str | int = "auto", channel: int | None = None, amp: str = "auto",
                 fill: str = AUTO, complete_slices: bool = False, crop: bool | str = "auto",
                 direction: str = "auto", adapt_steps: int = 0):
        self.device = torch.device(resolve_device(device))
        self.amp = check_amp(amp, "--amp")
        self.window, self.slice_axis = check_window(window), check_slice_axis(slice_axis)
        self.channel = channel
        self.per_class = parse_support_slices(support_slices)
        self.fill, self.complete_slices = check_sparse_options(self.per_class, fill, complete_slices), \
            bool(complete_slices)
        self.adapt_steps = int(adapt_steps)  # test-time adaptation before the model fills (icl.sparse.adapt)
        self.direction = check_direction(direction)
        weights = resolve_checkpoint(checkpoint, config or DEFAULT_SEGMENT_CONFIG)
        with library_errors("--"):
            config, image_size, record = settle_model(config, image_size, weights, DEFAULT_SEGMENT_CONFIG,
                                                      lambda name: spell_flag(name, "--"))
            self.ct_window = record.get("ct_window")  # --window auto on CT: the training window
            # trained to refine the classic interpolation, in boxes around the structures (icl.sparse.prior)
            self.mask_prior = float(record.get("mask_prior") or 0) > 0
            self.crop = check_crop(crop, self.mask_prior)
            check_image_memory(config, image_size, "--image-size")
            self.predictor = build_predictor(config, self.device, weights, image_size, memory_selector).eval()
            self.predictor.prior_gain = float(record.get("mask_prior_gain") or 0)  # as trained (sam2_ext.priors)
            self.predictor.prior_resolution = str(record.get("mask_prior_res") or "grid")

    def window_for(self, scan: Scan) -> str | tuple[float, float]:
        """The window of ``scan``'s frames: ``--window`` as given; with ``auto``, a CT scan gets the CT window the
        weights were trained with, when they record one (``icl.model.settings``)."""
        if self.window == "auto" and self.ct_window is not None and resolve_window(scan, "auto") != "mr":
            return self.ct_window
        return self.window

    def segment(self, query: Any, support: Any, support_label: Any,
                classes: Sequence[int] | str | None = None, progress: bool = False) -> Segmentation:
        """Segment ``query`` with the labelled ``support`` scan; all ``classes`` (default: every label value of
        the support) in one pass. Scans: NIfTI paths, nibabel images or (array, affine) pairs. Returns a
        :class:`Segmentation` on the query's grid."""
        s_scan, label_scan, label, cls = load_support(support, support_label, parse_classes(classes), self.channel)
        q_scan = open_scan(query, self.channel, "query")
        query = q_scan.path
        axis, size = self.slice_axis, self.predictor.image_size
        picks = choose_support_slices(label, axis, self.per_class, label_scan.path)
        same = decide_both_ways(self.direction, q_scan, s_scan)
        if self.per_class == LABELLED and same:
            return self._fill_sparse(q_scan, label, cls, query, label_scan.path, picks, progress)
        if self.fill not in (AUTO, MODEL):
            raise InputError("--fill", f"{self.fill} fills a scan from its own annotated slices: give the same "
                                       f"scan as --support and --query (and not --direction forward)")
        q_frames = VolumeFrames(q_scan, self.window_for(q_scan), size, axis)
        masks = label_slices(label_scan, axis, picks, size)
        labels = _empty_labels(q_scan, cls)
        out = q_scan.to_canonical(labels)
        values = torch.tensor(cls, device=self.device)
        if same:
            source: Any = PreparedFrames(q_frames)
            prompts = {c: {z: masks[i] == c for i, z in enumerate(picks)} for c in cls}
            direction, offset = "both", 0
        else:
            s_frames = VolumeFrames(s_scan, self.window_for(s_scan), size, axis, indices=picks)
            source = ConcatFrames(PreparedFrames(s_frames), PreparedFrames(q_frames))
            prompts = {c: {i: masks[i] == c for i in range(len(picks))} for c in cls}
            direction, offset = "forward", len(picks)
        bar = progress_bar(total=len(source), desc=f"segment {query.name}", unit="slice", enabled=progress)
        try:
            with autocast(self.device, amp_dtype(self.amp, self.device)):
                for result in track(self.predictor, source, prompts, direction):
                    bar.update()
                    if result.index >= offset:
                        _slice(out, axis, result.index - offset)[...] = _label_slice(
                            result.logits, q_frames.in_plane_shape, values)
        finally:
            bar.close()
        return Segmentation(labels, q_scan.affine, _header_3d(q_scan), query, cls, picks,
                            "both_ways" if same else "prepended", axis, q_frames)

    def _fill_sparse(self, scan: Scan, label: np.ndarray, cls: list[int], query: Path, label_path: Path,
                     picks: list[int], progress: bool) -> Segmentation:
        """A scan annotated on a few slices, filled per structure (``icl.sparse``): the self-check on the user's
        own annotation, then each structure by its chosen method; what was drawn stays as given."""
        axis = self.slice_axis
        annotation = Annotation.from_label(label, axis, cls, self.complete_slices)
        for c in cls:
            if len(annotation.slices[c]) == 1:
                reach = annotation.reach(c)
                print(f"warning: {label_path}: structure {c} is annotated on one slice only: no self-check for it; "
                      + ("nothing to fill between: classic fills keep that slice, the model is not bounded"
                         if reach is None else f"filled within {reach} slice(s) of it"), file=sys.stderr)
        window = self.window_for(scan)
        runner = ModelFill(self.predictor, scan, window, axis, self.crop,
                           lambda: autocast(self.device, amp_dtype(self.amp, self.device)), PreparedFrames,
                           priors=self.mask_prior, adapt_steps=self.adapt_steps)
        checks = choose(annotation, self_check(annotation, _counted(runner, progress, f"self-check {query.name}")
                                               if self.fill in (AUTO, MODEL) else None), self.fill)
        labels = _empty_labels(scan, cls)
        out_zhw = np.moveaxis(scan.to_canonical(labels), axis, 0)
        bar = progress_bar(total=annotation.depth, desc=f"fill {query.name}", unit="slice", enabled=progress)
        try:
            fill_volume(annotation, {c.structure: c.chosen for c in checks}, runner, out_zhw, bar.update)
        finally:
            bar.close()
        return Segmentation(labels, scan.affine, _header_3d(scan), query, cls, picks, "both_ways", axis,
                            VolumeFrames(scan, window, self.predictor.image_size, axis), checks)

    def save(self, result: Segmentation, path: str | Path) -> Path:
        """Write the label map with the query's affine and header, atomically; a name without a suffix gets
        ``.nii.gz``, any other suffix than ``.nii``/``.nii.gz`` is refused."""
        dtype = np.uint8 if result.labels.dtype == np.uint8 else np.int16
        return write_mask_nifti(result.labels, (result.affine, result.header), nifti_name(path), dtype=dtype)


def _counted(runner: ModelFill, progress: bool, desc: str):
    """The runner with a bar over the slices it tracks: the self-check is the fill's longest silent part."""
    def run(annotation: Annotation, classes: list[int]):
        bar = progress_bar(total=annotation.depth, desc=desc, unit="slice", enabled=progress)
        try:
            for item in runner(annotation, classes):
                bar.update()
                yield item
        finally:
            bar.close()
    return run


def _empty_labels(scan: Scan, classes: Sequence[int]) -> np.ndarray:
    """The output label map on the scan's own grid: uint8 while the label values fit, else int16."""
    return np.zeros(scan.shape, dtype=np.uint8 if max(classes) < 256 else np.int16)


def _header_3d(scan: Scan) -> nib.Nifti1Header:
    """The query's header for a 3D label map (one channel of a 4D image → a 3D header on the same grid)."""
    header = scan.header.copy()
    if len(header.get_data_shape()) != 3:
        header.set_data_shape(scan.shape)
    return header


def _label_slice(low_res: torch.Tensor, size: tuple[int, int], values: torch.Tensor) -> np.ndarray:
    """Low-res logits [C, h, w] → label map [H, W]: the class with the highest logit where it is > 0."""
    logits = resize_slices(low_res.float(), size, "logits")
    best, arg = logits.max(dim=0)
    return torch.where(best > 0, values[arg], torch.zeros_like(arg)).cpu().numpy()
