"""Python API for in-context segmentation of NIfTI scans (the engine under ``python -m icl.segment``).

    from icl.api import ICLSegmenter
    seg = ICLSegmenter()                                     # the default CPU model (checkpoint/icl_tiny_cpu.pth)
    labels = seg.segment(query="q.nii.gz", support="s.nii.gz", support_label="s_lab.nii.gz")
    seg.save(labels, "pred.nii.gz")

One road: scans become frames through ``icl.data.frames`` (the cache's own preprocessing: canonical orientation,
the engine's NaN rule, window, resize), support masks through ``label_slices`` at the model's size, and the
propagation is ``sam2_ext.track.track``, the rule training and evaluation use. So a checkpoint sees here exactly
the frames and the tracking it was trained with.

Which slices are support (``support_slices``): N slices spread across the extent of *every* label value present
in the support label (so the prompts a class gets do not depend on which other classes are asked for), or
``"labelled"``: exactly the slices that carry any label value (a scan annotated on a few slices, as in 3D Slicer or
ITK-SNAP), or ``"auto"``: ``labelled`` for a drawing on a few slices of the query's own scan, else 3; each class is
prompted on the chosen slices where it appears. ``slice_axis="auto"``: the axis the drawing was made along
(``icl.infer.support.read_support``). Whatever it read, ``save`` never writes over it (``icl.infer.outputs``).

Direction (``direction``): ``"auto"`` decides by content: support and query the same scan (in world space: the
same grid and voxel values within storage precision, whatever the file names, orientation or storage type) → the masks stay on their own slices and the scan is tracked both ways; with
``"labelled"`` the annotated slices are written back exactly as given (the sparse fill). Support from another scan →
its support slices are put in front of the query, tracked forward. ``"both"`` / ``"forward"`` choose explicitly
(``"both"`` needs the query on the support's grid). Scans are NIfTI paths, nibabel images or (array, affine). Memory stays flat in the
query's depth: slices are read, windowed and encoded when tracking reaches them, and each finished slice goes
straight into a compact label map in the query's own voxel order (written with its affine and header).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icl.data.frames import (Scan, VolumeFrames, check_window, label_slices, resize_slices,
                             resolve_window)
from icl.errors import InputError, spell_flag
from icl.infer.cross_memory import ConcatFrames, registered_fill, registered_memory, warn_carried_nowhere
from icl.infer.outputs import output_file, refuse_overwriting_inputs
from icl.infer.scan_source import check_direction, decide_both_ways, open_scan, segments_of
from icl.infer.segmentation import Segmentation, empty_labels, header_3d
from icl.infer.support import (AUTO_AXIS, LABELLED, check_crop, check_sparse_options, choose_support_slices,
                               parse_classes, parse_slice_axis, parse_support_slices, read_support,
                               support_pairs, warn_annotation)
from icl.infer.support_cache import SupportCache
from icl.model.boundary import library_errors
from icl.model.build import build_predictor
from icl.model.device import resolve_device
from icl.model.precision import amp_dtype, autocast, check_amp
from icl.model.settings import check_image_memory, check_run, settle_model
from icl.model.weights import DEFAULT_SEGMENT_CONFIG, resolve_checkpoint
from icl.progress import progress as progress_bar
from icl.report.label_map import write_label_map
from icl.sparse.annotation import Annotation
from icl.sparse.cross_check import CHECKS, CrossCheck, registered_and_checked
from icl.sparse.fill import StructureCheck, choose, compose, fill_volume, self_check
from icl.sparse.fusion import on_query_grid, stderr_line
from icl.sparse.methods import AUTO, MODEL, NO_MODEL_FILLS, REGISTRATION
from icl.sparse.model_fill import ModelFill
from icl.sparse.slice_registration import scan_fields
from sam2_ext.frames import SAM2_INPUT, InputRule, prepare_frames
from sam2_ext.track import track


PRIORS = ("auto", "none")  # the model's classic prior as its weights record it, or none (the model alone)
FRAME_SIZE_WITHOUT_MODEL = 128  # the overlays' lazy frames when no model runs (they read slices unresized)


# ---------------------------------------------------------------------------------------------------- frames
class PreparedFrames:
    """``VolumeFrames`` items ([S, S] in [0, 1]) as the model's [3, S, S] input tensors (its input rule: SAM2's
    ImageNet normalisation, or LiteMedSAM's per-slice min-max), still one at a time."""

    def __init__(self, frames: VolumeFrames, rule: InputRule = SAM2_INPUT):
        self.frames, self.rule = frames, rule

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> torch.Tensor:
        return prepare_frames(torch.from_numpy(self.frames[i])[None], self.frames.image_size, self.rule)[0]


def _slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """One slice of a (canonical-order) volume along ``axis``: a view."""
    sl: list[Any] = [slice(None)] * 3
    sl[axis] = index
    return volume[tuple(sl)]


# ---------------------------------------------------------------------------------------------------- the API
class ICLSegmenter:
    """Segment NIfTI scans from one labelled support scan with an ICL SAM2 model (no ground truth needed).

    ``checkpoint``: None = the default model shipped for the config (``checkpoint/README.md``); ``"none"`` = random
    init (with a warning); else a weights file (ours, official SAM2 ``{"model": ...}`` or MedSAM2). ``config`` and
    ``image_size``: None = what the weights were trained with (``icl.model.settings``), else ``tiny_cpu`` at its own
    size; a config other than the weights' is an error, another image size a warning. ``cross_check``: the
    leave-one-out check of several other scans (``icl.sparse.cross_check``: composed, full or none).
    """

    def __init__(self, checkpoint: str | Path | None = None, config: str | Path | None = None,
                 device: str | torch.device = "cpu", image_size: int | None = None,
                 memory_selector: str | None = None, window: str = "auto", slice_axis: int | str = AUTO_AXIS,
                 support_slices: str | int = "auto", channel: int | None = None, amp: str = "auto",
                 fill: str = AUTO, complete_slices: bool = False, crop: bool | str = "auto",
                 direction: str = "auto", adapt_steps: int = 0, prior: str = "auto", cross_check: str = "composed"):
        self.device = torch.device(resolve_device(device))
        self.amp = check_amp(amp, "--amp")
        self.window, self.slice_axis = check_window(window), parse_slice_axis(slice_axis)
        self.channel = channel
        self.per_class = parse_support_slices(support_slices)
        self.fill, self.complete_slices = check_sparse_options(self.per_class, fill, complete_slices), \
            bool(complete_slices)
        self.adapt_steps = int(adapt_steps)  # test-time adaptation before the model fills (icl.sparse.adapt)
        self.direction = check_direction(direction)
        if prior not in PRIORS:  # none: the learned part alone, without the classic prior it was trained to refine
            raise InputError("--prior", f"expected one of {', '.join(PRIORS)}, got {prior!r}")
        self.prior = prior
        if cross_check not in CHECKS:  # the leave-one-out check of several other scans (icl.sparse.cross_check)
            raise InputError("--cross-check", f"expected one of {', '.join(CHECKS)}, got {cross_check!r}")
        self.cross_check, self._supports = cross_check, SupportCache()  # supports read once for every query
        self.read: list[tuple[str, Path]] = []  # every file this segmenter read: save() never writes over one
        self.mask_prior, self.ct_window, self.predictor = False, None, None
        self._model = (checkpoint, config, image_size, memory_selector, crop)
        self.crop = check_crop(crop, False) if crop != "auto" else False
        if self.fill in NO_MODEL_FILLS:  # interpolation, nearest, registration: no model is loaded or announced
            return
        self._build_model()

    def _build_model(self) -> None:
        """The weights rule, the settings they were trained with, the memory check, then the predictor."""
        checkpoint, config, image_size, memory_selector, crop = self._model
        weights = resolve_checkpoint(checkpoint, config or DEFAULT_SEGMENT_CONFIG)
        if weights is not None:
            self.read.append(("--checkpoint", Path(weights)))
        with library_errors("--"):
            config, image_size, record = settle_model(
                config, image_size, weights, DEFAULT_SEGMENT_CONFIG, lambda name: spell_flag(name, "--"),
                before_warning=lambda cfg, size: check_image_memory(cfg, size, "--image-size"))
            self.ct_window = record.get("ct_window")  # --window auto on CT: the training window
            # trained to refine the classic interpolation, in boxes around the structures (icl.sparse.prior)
            trained_with_prior = float(record.get("mask_prior") or 0) > 0
            self.mask_prior = trained_with_prior and self.prior == "auto"
            self.crop = check_crop(crop, trained_with_prior)  # the boxes it was trained in, with or without the prior
            self.config = config
            self.predictor = build_predictor(config, self.device, weights, image_size, memory_selector).eval()
            self.predictor.prior_gain = float(record.get("mask_prior_gain") or 0)  # as trained (sam2_ext.priors)
            self.predictor.prior_resolution = str(record.get("mask_prior_res") or "grid")

    def _prepared(self, frames: VolumeFrames) -> PreparedFrames:
        """``frames`` as this model's input tensors (its config's input rule, ``sam2_ext.frames``)."""
        return PreparedFrames(frames, self.predictor.input_rule)

    def window_for(self, scan: Scan) -> str | tuple[float, float]:
        """The window of ``scan``'s frames: ``--window`` as given; with ``auto``, a CT scan gets the CT window the
        weights were trained with, when they record one (``icl.model.settings``)."""
        if self.window == "auto" and self.ct_window is not None and resolve_window(scan, "auto") != "mr":
            return self.ct_window
        return self.window

    def _remember(self, what: str, scan: Scan) -> None:
        if scan.path.exists():
            self.read.append((what, scan.path))

    def segment(self, query: Any, support: Any, support_label: Any,
                classes: Sequence[int] | str | None = None, progress: bool = False) -> Segmentation:
        """Segment ``query`` with the labelled ``support`` scan; all ``classes`` (default: every label value of
        the support) in one pass. Scans: paths (NIfTI, NRRD, Slicer's .seg.nrrd, MetaImage, a DICOM series
        folder), nibabel images or (array, affine) pairs; ``support`` and ``support_label`` may be lists of
        several other scans, paired in order (registered and fused). Returns a :class:`Segmentation` on the
        query's grid, carrying the support label's segment names for a ``.seg.nrrd`` output."""
        result = self._segment(query, support, support_label, classes, progress)
        result.segments = segments_of(support_label)
        return result

    def _segment(self, query: Any, support: Any, support_label: Any, classes: Sequence[int] | str | None,
                 progress: bool) -> Segmentation:
        pairs = support_pairs(support, support_label)
        loaded = self._supports.load(pairs, parse_classes(classes), self.channel)  # every class in each
        s_scan, label_scan, label, cls = loaded[0]
        q_scan = open_scan(query, self.channel, "query")
        self._remember("--query", q_scan)
        for s, lab, _, _ in loaded:
            self._remember("--support", s)
            self._remember("--support-label", lab)
        query = q_scan.path
        if len(loaded) > 1:  # several supports: other scans, each registered (a drawing on the query takes one)
            for s, lab, _, _ in loaded:
                if decide_both_ways("auto", q_scan, s)[0]:
                    raise InputError(lab.path, "several support scans are other scans, registered to the query; "
                                               "this one is the query itself: give its drawing alone")
            same, comparison = False, None
        else:
            same, comparison = decide_both_ways(self.direction, q_scan, s_scan)
        reading = read_support(label, cls, self.slice_axis, self.per_class, same, label_scan.path)
        axis = reading.axis
        picks = choose_support_slices(label, axis, reading.per_class, label_scan.path)
        if not same and comparison is not None and comparison.grid and reading.drawn_along is not None:
            print(f"note: {query}: the support label is a drawing on a few slices of a scan on the query's grid, "
                  f"but the query is not that scan: {comparison.why()}; so the support is read as another scan's "
                  "(give --direction both if it is the same scan)", file=sys.stderr)
        if reading.per_class == LABELLED and same:
            return self._fill_sparse(q_scan, label, cls, query, label_scan.path, picks, axis, progress)
        # another scan: registration, unless the model was asked for (--fill model, or its --direction forward)
        if not same and (self.fill == REGISTRATION or (self.fill == AUTO and self.direction == "auto")) \
                and not self.complete_slices:
            return self._registered(q_scan, [(s, lab) for s, lab, _, _ in loaded], cls, query, axis, progress)
        if self.fill not in (AUTO, MODEL) or self.complete_slices:
            what = "--complete-slices" if self.complete_slices else "--fill"
            raise InputError(what, f"{'complete slices' if self.complete_slices else self.fill} read a scan's own "
                                   "annotated slices: give the same scan as --support and --query, with a drawing "
                                   f"on a few slices (--support-slices {LABELLED}), and not --direction forward")
        if self.predictor is None:
            self._build_model()
        if not same and self.mask_prior:  # registration's labels as the prior, its resampled supports as memory
            return self._model_on_registered(q_scan, [(s, lab) for s, lab, _, _ in loaded], cls, query, axis,
                                             reading.per_class, progress)
        size = self.predictor.image_size
        q_frames = VolumeFrames(q_scan, self.window_for(q_scan), size, axis)
        picked = [(s, lab, picks if i == 0 else choose_support_slices(lab_values, axis, reading.per_class, lab.path))
                  for i, (s, lab, lab_values, _) in enumerate(loaded)]
        masks = [label_slices(lab, axis, zs, size) for _, lab, zs in picked]
        source_len = len(q_frames) + (0 if same else sum(len(zs) for _, _, zs in picked))
        check_run(self.config, size, q_scan, source_len, self.device, "--image-size")
        labels = empty_labels(q_scan, cls)
        out = q_scan.to_canonical(labels)
        values = torch.tensor(cls, device=self.device)
        if same:
            source: Any = self._prepared(q_frames)
            prompts = {c: {z: masks[0][i] == c for i, z in enumerate(picks)} for c in cls}
            direction, offset = "both", 0
        else:  # every support scan's slices in front of the query, tracked forward: the model's memory holds them all
            stacked = np.concatenate(masks)
            source = ConcatFrames(*(self._prepared(VolumeFrames(s, self.window_for(s), size, axis, indices=zs))
                                    for s, _, zs in picked), self._prepared(q_frames))
            prompts = {c: {i: stacked[i] == c for i in range(len(stacked))} for c in cls}
            direction, offset = "forward", len(stacked)
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
        return Segmentation(labels, q_scan.affine, header_3d(q_scan), query, cls, picks,
                            "both_ways" if same else "prepended", axis, q_frames, supports=len(loaded))

    def _model_on_registered(self, scan: Scan, supports: list[tuple[Scan, Scan]], cls: list[int], query: Path,
                             axis: int, per_class: int | str, progress: bool) -> Segmentation:
        """The model on another scan, with weights trained with a prior: registration's labels as its prior, the
        supports resampled onto the query's grid as its memory (``icl.infer.cross_memory``), in the sparse fill's
        box (``--crop``)."""
        if progress:
            print(f"note: {query}: registering {len(supports)} support scan(s) to it for the model's memory and "
                  "prior (about a minute per support on one CPU core)", file=sys.stderr)
        memory = registered_memory(scan, self._supports.support_set(supports, cls), cls, axis, per_class)
        window, size = self.window_for(scan), self.predictor.image_size
        frames = VolumeFrames(scan, window, size, axis)
        check_run(self.config, size, scan, len(frames) + sum(len(zs) for _, _, zs in memory.supports), self.device,
                  "--image-size")
        runner = ModelFill(self.predictor, scan, window, axis, self.crop,
                           lambda: autocast(self.device, amp_dtype(self.amp, self.device)), self._prepared, priors=True)
        labels = empty_labels(scan, cls)
        out_zhw = np.moveaxis(scan.to_canonical(labels), axis, 0)
        bar = progress_bar(total=len(frames), desc=f"segment {query.name}", unit="slice", enabled=progress)
        try:
            for z, scores in registered_fill(runner, memory, cls, self.window_for):
                out_zhw[z] = compose(out_zhw.shape[1:], list(scores.items()), out_zhw.dtype)
                bar.update()
        finally:
            bar.close()
        used = memory.supports[0][2] if memory.supports else []  # the first support's registered slices
        return Segmentation(labels, scan.affine, header_3d(scan), query, cls, used, "prepended", axis, frames,
                            supports=len(supports))

    def _registered(self, scan: Scan, supports: list[tuple[Scan, Scan]], cls: list[int], query: Path,
                    axis: int, progress: bool) -> Segmentation:
        """Support from other scans, by the classic fill of this road: every support scan registered to the query
        (greedy: affine, then deformable, mutual information), its structures carried and several supports fused
        (``icl.sparse.registration``); with two or more, each left out in turn tells how well that works here."""
        if progress:  # what the next minutes are spent on (a progress line, quiet with --quiet)
            print(f"note: {query}: registering {len(supports)} support scan(s) to it (affine, then deformable; about a "
                  "minute per support and 10 M voxels on one CPU core)" + (", and each of them to the others to "
                  "check how well that works" if len(supports) > 1 and self.cross_check == "full" else ""),
                  file=sys.stderr)
        fused, checks = registered_and_checked(scan, self._supports.support_set(supports, cls), self.fill,
                                               self.cross_check, stderr_line if progress else None)
        labels = empty_labels(scan, cls)
        labels[...] = on_query_grid(scan, fused)
        warn_carried_nowhere(query, labels, cls)
        size = self.predictor.image_size if self.predictor is not None else FRAME_SIZE_WITHOUT_MODEL
        return Segmentation(labels, scan.affine, header_3d(scan), query, cls, [], "registered", axis,
                            VolumeFrames(scan, self.window_for(scan), size, axis), checks, len(supports))

    def _fill_sparse(self, scan: Scan, label: np.ndarray, cls: list[int], query: Path, label_path: Path,
                     picks: list[int], axis: int, progress: bool) -> Segmentation:
        """A scan annotated on a few slices, filled per structure (``icl.sparse``): the self-check on the user's
        own annotation, then each structure by its chosen method; what was drawn stays as given."""
        annotation = Annotation.from_label(label, axis, cls, self.complete_slices)
        warn_annotation(annotation, label_path)
        window = self.window_for(scan)
        runner = None
        if self.fill in (AUTO, MODEL):
            check_run(self.config, self.predictor.image_size, scan, annotation.depth, self.device, "--image-size")
            runner = ModelFill(self.predictor, scan, window, axis, self.crop,
                               lambda: autocast(self.device, amp_dtype(self.amp, self.device)), self._prepared,
                               priors=self.mask_prior, adapt_steps=self.adapt_steps)
        counted = None if runner is None else _counted(runner, progress, f"self-check {query.name}")
        # the image between the drawn slices: for the registration fill, and for auto and the model (the best classic
        # fill is the model's prior); an explicit shape fill skips its cost (its table shows the shape fills)
        fields = scan_fields(scan, axis, progress) if self.fill in (AUTO, MODEL, REGISTRATION) else None
        checks = choose(annotation, self_check(annotation, counted, fields), self.fill)
        labels = empty_labels(scan, cls)
        out_zhw = np.moveaxis(scan.to_canonical(labels), axis, 0)
        bar = progress_bar(total=annotation.depth, desc=f"fill {query.name}", unit="slice", enabled=progress)
        try:
            fill_volume(annotation, {c.structure: c.chosen for c in checks}, runner, out_zhw, bar.update, fields,
                        {c.structure: c.prior for c in checks})
        finally:
            bar.close()
        size = self.predictor.image_size if self.predictor is not None else FRAME_SIZE_WITHOUT_MODEL
        return Segmentation(labels, scan.affine, header_3d(scan), query, cls, picks, "both_ways", axis,
                            VolumeFrames(scan, window, size, axis), checks)

    def save(self, result: Segmentation, path: str | Path) -> Path:
        """Write the label map with the query's affine and header, atomically, in the format the suffix names
        (``icl.report.label_map``: NIfTI, NRRD, Slicer's .seg.nrrd with the support's segment names, MetaImage).
        THE output rule (the CLI's too, ``icl.infer.outputs``): a name without a suffix gets ``.nii.gz``, an unknown
        suffix or an existing folder is refused, and so is any file this segmenter has read (query, support, support
        label, checkpoint) — the user's scan is never replaced by labels."""
        target = output_file(path, "save")
        refuse_overwriting_inputs([("save", target)], self.read)
        dtype = np.uint8 if result.labels.dtype == np.uint8 else np.int16
        return write_label_map(result.labels, result.affine, result.header, target, dtype=dtype,
                               segments=result.segments, values=result.classes)


def _counted(runner: ModelFill, progress: bool, desc: str):
    """The runner with a bar over the slices it tracks: the self-check is the fill's longest silent part."""
    def run(annotation: Annotation, classes: list[int], priors=None):
        bar = progress_bar(total=annotation.depth, desc=desc, unit="slice", enabled=progress)
        try:
            for item in runner(annotation, classes, priors):
                bar.update()
                yield item
        finally:
            bar.close()
    return run


def _label_slice(low_res: torch.Tensor, size: tuple[int, int], values: torch.Tensor) -> np.ndarray:
    """Low-res logits [C, h, w] → label map [H, W]: the class with the highest logit where it is > 0."""
    logits = resize_slices(low_res.float(), size, "logits")
    best, arg = logits.max(dim=0)
    return torch.where(best > 0, values[arg], torch.zeros_like(arg)).cpu().numpy()
