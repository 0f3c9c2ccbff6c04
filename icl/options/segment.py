"""The options of ``python -m icl.segment`` (:class:`SegmentOptions`; its --help text is that module's docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from icl.data.frames import DEFAULT_SLICE_AXIS, WINDOW_CHOICES, parse_window
from icl.infer.query_folder import parse_shard
from icl.infer.support import AUTO_SUPPORT_PER_CLASS, LABELLED, parse_slice_axis
from icl.model.weights import DEFAULT_SEGMENT_CONFIG
from icl.options.checks import NON_NEGATIVE, POSITIVE
from icl.options.common import AMP, CONFIG, IMAGE_SIZE, MEMORY_SELECTOR
from icl.options.spec import Options, opt
from icl.sparse.cross_check import CHECKS
from icl.sparse.methods import FILLS


@dataclass
class SegmentOptions(Options):
    """The options of ``python -m icl.segment`` (its --help text is that module's docstring)."""

    DASHES: ClassVar[str] = "--"

    support: list[str] | None = opt(help="support image (NIfTI, NRRD, MetaImage, a DICOM series folder); several other "
                                         "scans: once per scan, each with its "
                                         "--support-label in the same order (registered and fused)", required=True,
                                    repeat=True)
    support_label: list[str] | None = opt(help="label map of the support image, on its grid (NIfTI, NRRD, Slicer's "
                                               ".seg.nrrd, MetaImage); once per --support",
                                          required=True, repeat=True)
    query: str | None = opt(help="query image (any format of --support), or a folder of query scans",
                            required=True)
    query_glob: str | None = opt(None, "with a query folder: the file names to segment (a glob, e.g. '*_0000.nii.gz'"
                                       "); default: every NIfTI image, label maps and nnU-Net non-_0000 files skipped")
    out: str | None = opt(help="output label map (one query; its suffix picks the format: .nii.gz, .nii, .seg.nrrd, "
                               ".nrrd, .mha, .mhd) or folder (one output per query)", required=True)
    shard: str | None = opt(None, "with a query folder: I/N runs every N-th query from offset I (task I of N, from "
                                  "0): one command per task of a job array, e.g. $SLURM_ARRAY_TASK_ID/"
                                  "$SLURM_ARRAY_TASK_COUNT", check=parse_shard)
    workers: int = opt(1, "queries segmented at once, each in its own process with its share of the cores",
                       int, check=POSITIVE)
    overwrite: bool = opt(False, "with a query folder: segment queries whose output exists too (default: skip them,"
                                 " so an interrupted run resumes where it stopped)", bool)
    classes: str | None = opt(None, "comma-separated label values (default: all in the support)")
    support_slices: str = opt("auto", f"N support slices per label value, or '{LABELLED}' (every slice carrying a "
                                      f"label value), or 'auto': '{LABELLED}' for a drawing on a few slices of the "
                                      f"query's own scan (one line says so), else {AUTO_SUPPORT_PER_CLASS}")
    complete_slices: bool = opt(False, f"with '{LABELLED}': every slice that carries a label is annotated for every "
                                       "requested structure (absent there = absent); default: per structure", bool)
    fill: str = opt("auto", f"with '{LABELLED}' on the scan itself: auto (per structure, the best of the self-check), "
                            "registration (each drawn slice's image registered to the slices between, its mask "
                            "carried), interpolation, nearest or model; with support from other scans: auto (= "
                            "registration), registration (each support registered to the query, several fused) or "
                            "model", choices=FILLS)
    prior: str = opt("auto", "the model's classic prior: auto (for weights trained with -mask_prior: on a drawing, each "
                             "structure's best classic fill of the self-check; from another scan, the registered "
                             "labels) or none (the learned part alone, to see "
                             "what it does)", choices=("auto", "none"))
    cross_check: str = opt("composed", "several other scans: the leave-one-out check of registration, composed "
                                       "from the registrations to the query (k registrations in all), full (each "
                                       "support also registered to every other one: k (k - 1) more, once per set "
                                       "of supports) or none", choices=CHECKS)
    report: str | None = opt(None, "write the self-check table to this JSON file (a drawing on the scan itself: "
                                   "held-out Dice per structure and method; several other scans: leave-one-out Dice "
                                   "of registration; the method chosen)")
    direction: str = opt("auto", "auto: both ways when the query is the support scan (by content), else forward; "
                                 "both; forward", choices=("auto", "both", "forward"))
    crop: str = opt("auto", f"with '{LABELLED}': track the model in a square box around the annotated structures "
                            "(on) or on the whole slice (off); auto: on for weights trained with -mask_prior (they "
                            "were trained on such boxes)", choices=("auto", "on", "off"))
    adapt_steps: int = opt(0, f"with '{LABELLED}': test-time adaptation of the model on your own annotation (Adam "
                              "steps on tasks between your annotated slices, weights restored after); 0 = off",
                           int, check=NON_NEGATIVE)
    checkpoint: str | None = opt(None, "weights (ours, official SAM2.1, MedSAM2); default: the model shipped for "
                                       "--config; none: random init")
    config: str | None = CONFIG(default=None, help=CONFIG.help + f"; default: the one the weights were trained "
                                                                  f"with, else {DEFAULT_SEGMENT_CONFIG}")
    image_size: int | None = IMAGE_SIZE(default=None, help=IMAGE_SIZE.help + "; default: the weights' training "
                                                                             "size, else the config's own")
    device: str = opt("cpu", "cpu, cuda or cuda:N (CUDA asked for without a GPU runs on the CPU)")
    overlays: str | None = opt(None, "folder for overlay PNGs of the prediction (a colour and legend per label "
                                     "value, annotated slices framed, radiological orientation, named by plane)")
    memory_selector: str = MEMORY_SELECTOR()
    window: str = opt("auto", f"intensity window: {', '.join(WINDOW_CHOICES)} (CT presets, mr percentiles, auto: CT "
                              "if air values present) or lo,hi in HU (e.g. 0,300; negative values as --window -100,200)",
                      check=parse_window)
    slice_axis: str | int = opt("auto", "axis to slice along, of the closest canonical (RAS) orientation: 0, 1, "
                                        f"2 (axial), or auto: the axis along which the drawn slices leave gaps "
                                        f"(a label dense along every axis: {DEFAULT_SLICE_AXIS})",
                                check=parse_slice_axis)
    channel: int | None = opt(None, "channel of the 4D (multi-channel) images, e.g. MSD; 3D files ignore it", int)
    amp: str = AMP()
    quiet: bool = opt(False, "no progress bar (the summary line per query and the self-check table stay)", bool)

