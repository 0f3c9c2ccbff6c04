"""One definition of every option of ``train_3d.py``, ``eval_3d.py`` and ``python -m icl.segment``.

Why one: the commands share options (model config, image size, memory selector, mixed precision ...). Each option
is a dataclass field defined once here, with its help, type, choices and check; each command's argparse parser is
generated from its dataclass in that command's spelling: the seed's single dash for train_3d.py and eval_3d.py
(``-exp_name``, ``-gpu_device``, booleans as ``True``/``False`` words, so MedSAM2-ICL command lines keep working)
and conventional double dashes for ``python -m icl.segment`` (``--support-label``, ``--quiet``). Values are checked
once, in :func:`validate`; every problem is an :class:`icl.errors.InputError` naming the flag as the command spells
it, which the commands print as one ``error: ...`` line with exit status 2.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

from icl.data.frames import DEFAULT_SLICE_AXIS, WINDOW_CHOICES, parse_window
from icl.data.readers import LAYOUTS
from icl.model.precision import AMP_MODES
from icl.errors import InputError, library_errors
from icl.model.device import resolve_device  # noqa: F401  (re-exported: the options use it)
from icl.options import (NONE_WORDS, NON_NEGATIVE, POSITIVE, Opt, Options, at_least, none_word, opt, parse_options,
                         probability)
from icl.options import build_parser, str2bool, validate  # noqa: F401  (the commands' parsers and checks)
from icl.option_checks import class_list as _class_list, exp_name as _exp_name, generator_parts as _generator_parts
from icl.option_checks import schedule as _schedule, shape_list as _shape_list

AUTO_SUPPORT_PER_CLASS = 3  # support slices per label value for --support-slices auto
LABELLED = "labelled"  # --support-slices labelled: exactly the slices that carry a label value

DEFAULT_SEGMENT_CONFIG = "tiny_cpu"  # icl.segment / the API when neither --config nor the weights say
DATASETS = (*LAYOUTS, "combined")  # preprocess's layouts (the same words), and several datasets at once
#: Top-level parts of a SAM2 model that ``-freeze`` may name (comma-separated), or ``none``.
FREEZABLE = ("image_encoder", "memory_attention", "memory_encoder", "sam_prompt_encoder", "sam_mask_decoder")
QUERY_MODES = ("gt_slices", "context")
PROTOCOLS = ("gt_slices", "full_volume")
SPLITS = ("val", "train", "all")
DEFAULT_PRETRAIN = "./checkpoint/MedSAM2_pretrain.pth"
DEFAULT_CHECKPOINT_PATH = "./checkpoint"
#: Values of a weights option (``-pretrain``, ``--checkpoint``) that mean "no weights file: random init".
NO_WEIGHTS = (*NONE_WORDS, "random")


def no_weights(value: Any) -> bool:
    """THE random-init rule of every weights option: ``none``, ``null``, ``random`` (or empty) name no file."""
    return value is not None and str(value).strip().lower() in NO_WEIGHTS


# ----------------------------------------------------------------------------------------------------- checks
def _weights(value: str) -> str | None:
    return None if no_weights(value) else value


def _parts(value: str) -> str:
    parts = [] if value == "none" else [p for p in value.split(",") if p]
    unknown = [p for p in parts if p not in FREEZABLE]
    if unknown or (value != "none" and not parts):
        raise ValueError(f"unknown part {','.join(unknown) or value!r}; use none or {','.join(FREEZABLE)}")
    return value


# shared by the commands that have them: one default, help, type and check each
CONFIG = Opt("sam2.1_hiera_t", "model config: a name in cfg/ (e.g. sam2.1_hiera_t, tiny_cpu) or a yaml path")
IMAGE_SIZE = Opt(512, "model input size in pixels, a multiple of 32 (Hiera's total stride)", int)
def _command_line_selector(value: str) -> str:
    """The oracle policy ranks memories by IoU with the ground truth, which no command line hands the model."""
    if str(value).strip().lower().split(":")[0] == "oracle":
        raise ValueError("'oracle' ranks memories by the ground truth, which no command line gives the model; it is "
                         "an analysis tool of the Python API (sam2_ext.selector, bench/bench_selector.py)")
    return value


MEMORY_SELECTOR = Opt("recency", "memories each slice attends to: recency (SAM2's own) or scored[:key=value,...], "
                                 "e.g. scored:budget=4 (see sam2_ext/selector.py)", check=_command_line_selector)
AMP = Opt("auto", "mixed precision on CUDA: auto (bf16 if supported, else fp16), bf16, fp16 or none; the CPU "
                  "always runs float32", choices=AMP_MODES)
SUPPORT_INSTANCE = Opt("case_00028.nii.gz", "case the support slices come from (none: another training case "
                                            "holding the class)", check=none_word)


@dataclass
class CommonConfig(Options):
    """Fields shared by training and evaluation (model, data, device, logging)."""

    exp_name: str = opt("icl", "run name; run folder is <checkpoint_path>/<exp_name>_<timestamp>", check=_exp_name)
    dataset: str = opt("kits", "dataset layout", choices=DATASETS)
    data_path: str | None = opt(None, "dataset root (default ./datasets/<dataset>)")
    cache_dir: str | None = opt(None, "preprocess cache (default: the data helper's)")
    pretrain: str | None = opt(DEFAULT_PRETRAIN, "weights to start from; none = random init", check=_weights)
    config: str = CONFIG()
    gpu_device: int = opt(0, "CUDA index; -1 = CPU", int)
    image_size: int = IMAGE_SIZE()
    out_size: int = opt(512, "size the logits are scored at", int, check=POSITIVE)
    video_length: int = opt(12, "query slices per sample", int, check=POSITIVE)
    num_support: int = opt(8, "support slices per sample", int, check=POSITIVE)
    support_instance: str | None = SUPPORT_INSTANCE()
    memory_selector: str = MEMORY_SELECTOR()
    fold: int = opt(0, "cross-validation fold, in [0, -folds)", int)
    folds: int = opt(5, "number of cross-validation folds", int, check=POSITIVE)
    num_workers: int = opt(0, "data loader workers", int, check=NON_NEGATIVE)
    seed: int = opt(0, "seed of init, sampling and the fold split", int)
    checkpoint_path: str = opt(DEFAULT_CHECKPOINT_PATH, "folder the run folders are made in")
    distributed: bool = opt(False, "True when launched by torchrun", bool)
    wandb_enabled: bool = opt(True, "log to Weights & Biases (offline without credentials)", bool)
    amp: str = AMP()

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda:N"`` from ``-gpu_device`` (-1 = CPU; CPU when CUDA is missing)."""
        return resolve_device(self.gpu_device, self.flag("gpu_device"))

    @property
    def support_case(self) -> str | None:
        """Case id of ``-support_instance`` without the NIfTI suffix (``case_00028.nii.gz`` -> ``case_00028``)."""
        if self.support_instance is None:
            return None
        return re.sub(r"\.nii(\.gz)?$", "", Path(self.support_instance).name)

    def finish(self) -> None:
        if self.data_path is None:
            self.data_path = f"./datasets/{self.dataset}"
        if not 0 <= self.fold < self.folds:
            raise InputError(self.flag("fold"), f"must be in [0, {self.folds}), got {self.fold}")

    def check_files(self) -> None:
        """The model config (with ``-image_size``, checked by sam2_ext) and ``-memory_selector``."""
        from sam2_ext.build import load_model_config
        from sam2_ext.errors import ConfigError
        from sam2_ext.selector import parse_selector_config

        with library_errors(self.DASHES):
            try:
                load_model_config(self.config, self.image_size)
            except ConfigError as err:
                problem = err.problem if err.where == str(self.config) else f"{err.where}: {err.problem}"
                raise InputError(self.flag("config"), problem) from None
            parse_selector_config(self.memory_selector)


@dataclass
class TrainConfig(CommonConfig):
    """Everything ``train_3d.py`` needs; one source of truth for the training loop."""

    DESCRIPTION: ClassVar[str] = "Train SAM2 for in-context 3D medical segmentation."

    epochs: int = opt(100, "training epochs", int, check=POSITIVE)
    val_freq: int = opt(5, "validate every N epochs (and after the last)", int, check=POSITIVE)
    lr: float = opt(5e-5, "AdamW learning rate", float, check=POSITIVE)
    weight_decay: float = opt(0.01, "AdamW weight decay", float, check=NON_NEGATIVE)
    warmup_epochs: float = opt(1.0, "linear warm-up before cosine decay", float, check=NON_NEGATIVE)
    lr_schedule: str = opt("cosine", "after the warm-up: cosine decay over all epochs, or constant",
                           choices=("cosine", "constant"))
    grad_clip: float = opt(1.0, "max grad norm; 0 = off", float, check=NON_NEGATIVE)
    freeze: str = opt("none", f"none or comma list of {','.join(FREEZABLE)}", check=_parts)
    resume: str | None = opt(None, "checkpoint file or run folder to continue", check=none_word)
    steps_per_epoch: int = opt(0, "cap on samples per epoch; 0 = all", int, check=NON_NEGATIVE)
    val_samples: int = opt(0, "cap on validation samples; 0 = all", int, check=NON_NEGATIVE)
    log_images: int = opt(4, "overlay images logged per validation", int, check=NON_NEGATIVE)
    count_flops: bool = opt(True, "print FLOPs per frame at start", bool)
    obj_loss_weight: float = opt(1.0, "weight of the object-score head's BCE (is the object present?) in either "
                                      "-loss (SAM2's own weight: 1)", float, check=NON_NEGATIVE)
    keep_epochs: int = opt(0, "keep only the newest N epoch_N.pth (last/best always kept); 0 = keep all", int,
                           check=NON_NEGATIVE)
    classes: str = opt("all", "comma list of class ids to train and validate on (e.g. 1,2,3,4,5 holds out class "
                              "6); all = every class", check=_class_list)
    query_mode: str = opt("gt_slices", "gt_slices: query clips only hold slices with the class; context: "
                                       "-video_length consecutive slices around the object, so clips also hold "
                                       "empty slices and other classes", choices=QUERY_MODES)
    time_limit_min: float = opt(0.0, "wall-clock cap in minutes: stop after the step that crosses it (validate + "
                                     "save); 0 = off", float, check=NON_NEGATIVE)
    same_case_support: float = opt(0.0, "probability that a training sample's support slices come from its own "
                                        "query scan (0..1)", float, check=probability)
    classes_per_sample: int = opt(1, "classes tracked together per training sample on the same query slices "
                                     "(1 = seed)", int, check=POSITIVE)
    tasks: str = opt("0:clips=1", "what training shows the model, along the steps: 'STEP:source=weight,...;STEP:...' "
                                  "with sources clips (the dataset's clips), the look-alike levels discs_fixed, "
                                  "discs_random, adjacent, far, sparse, cross (icl/data/lookalike.py) and the anatomy "
                                  "levels anat_sparse, anat_adjacent, anat_far, anat_cross (icl/data/anatomy_tasks.py)",
                 check=_schedule)
    loss: str = opt("sam2", "sam2 (SAM2's loss: best candidate mask, IoU head, object score) or dice_bce (Dice + BCE "
                            "of the returned mask + object-score BCE)", choices=("sam2", "dice_bce"))
    mask_logits: str = opt("raw", "masks either -loss scores: raw (the decoder's, before SAM2's object-score gate) "
                                  "or gated (SAM2's, -1024 without gradient where the object is called absent)",
                           choices=("raw", "gated"))
    multimask_tracking: str = opt("config", "track with SAM2's 3 candidate masks (on), its single mask (off), or as "
                                            "the model config says", choices=("config", "on", "off"))
    aux: float = opt(0.0, "weight of an auxiliary loss: a training-only 1x1 probe on the memory-conditioned features "
                          "must locate the target (trains memory encoder and attention directly); 0 = off", float,
                     check=NON_NEGATIVE)
    qk_init: float = opt(0.0, "start every memory cross-attention as a pure relative-position kernel: q/k weights 0, "
                              "biases this constant (e.g. 4); from-scratch training only; 0 = off", float,
                         check=NON_NEGATIVE)
    mask_prior: float = opt(0.0, "chance that a both-ways training task is cropped like the sparse fill and given "
                                 "the classic interpolation as a dense mask prompt to refine (icl.sparse.prior)",
                            float, check=NON_NEGATIVE)
    mask_prior_gain: float = opt(0.0, "with -mask_prior: the prior is also added to the decoder's logits as "
                                      "gain * (2 * prior - 1), so the model learns corrections (10 = SAM2's +-10 "
                                      "mask-as-output scale); 0 = the prompt alone", float, check=NON_NEGATIVE)
    mask_prior_res: str = opt("grid", "where the gain's residual is read: on the decoder's mask grid (grid) or at the "
                                      "output's resolution, the prior's own detail kept (output; sam2_ext.priors)",
                              choices=("grid", "output"))
    lookalike_objects: str = opt("all", "look-alike tasks: every look-alike seen on a support slice is an object "
                                        "with its own support (all), or only the target", choices=("all", "target"))
    lookalike_k: int = opt(3, "look-alike objects per generated volume", int, check=at_least(2))
    lookalike_depth: int = opt(12, "slices per generated look-alike volume", int, check=at_least(4))
    anatomy_depth: int = opt(12, "slices per generated anatomy slab (anat_* levels)", int, check=at_least(4))
    anatomy_drop: str = opt("", "generator parts left out of the anat_* levels, an ablation (comma names, e.g. "
                                "texture,bias; icl.data.anatomy_tasks.GENERATOR_PARTS)", check=_generator_parts)
    held_out_shapes: str = opt("", "look-alike shape classes never trained on (comma names, e.g. torus,cone)",
                               check=_shape_list)
    export: str | None = opt(None, "at the end, write the weights alone of best.pth (else last.pth) to this file "
                                   "(e.g. checkpoint/icl_tiny_cpu.pth)", check=none_word)
    # fine-tuning pretrained weights cheaply (icl/model/lora.py, icl/engine/feature_cache.py)
    peft: str = opt("none", "lora: train LoRA adapters (peft) on the attention projections of -lora_targets, every "
                            "base weight frozen (with -freeze P: only the parts P frozen); none: train the weights",
                    choices=("none", "lora"))
    lora_rank: int = opt(8, "rank r of each LoRA adapter (-peft lora)", int, check=POSITIVE)
    lora_alpha: float = opt(16.0, "LoRA scaling alpha (the update is scaled by alpha / r)", float, check=POSITIVE)
    lora_targets: str = opt("image_encoder,memory_attention", "comma list of parts whose attention projections get "
                            "adapters: image_encoder, memory_attention, sam_mask_decoder",
                            check=lambda v: __import__("icl.model.lora", fromlist=["x"]).check_parts(v))
    feature_cache: str = opt("off", "auto: store the frozen image encoder's outputs of every dataset slice once, "
                                    "beside the preprocessing cache (fp16; 2 x 256 x 21 x (S/16)^2 bytes per slice: "
                                    "2.75 MB at 256 px, 11 MB at 512 px) and read them instead of running it; "
                                    "needs the image encoder frozen", choices=("auto", "off"))

    @property
    def frozen_parts(self) -> list[str]:
        """Model parts named by ``-freeze`` (empty for ``none``)."""
        return [] if self.freeze == "none" else [p for p in self.freeze.split(",") if p]

    @property
    def class_ids(self) -> list[int] | None:
        """Class ids named by ``-classes`` (None for ``all``)."""
        return None if self.classes == "all" else [int(c) for c in self.classes.split(",") if c.strip()]

    def check_files(self) -> None:
        """Fail early, before any model is built, on paths that do not exist."""
        if self.pretrain is not None and not Path(self.pretrain).is_file():
            raise InputError(self.flag("pretrain"), f"weights file {self.pretrain} not found; download MedSAM2 or "
                             "SAM2.1 weights (e.g. sam2.1_hiera_tiny.pt) into ./checkpoint/ (see checkpoint/README.md"
                             "), or pass -pretrain none to train from random init")
        if self.dataset != "phantom" and not Path(self.data_path).is_dir():
            raise InputError(self.flag("data_path"),
                             f"dataset folder {self.data_path} does not exist (see datasets/README.md)")
        if self.resume is not None and not Path(self.resume).exists():
            raise InputError(self.flag("resume"), f"{self.resume} does not exist (give a checkpoint .pth or a run "
                                                  "folder)")
        super().check_files()


@dataclass
class EvalConfig(CommonConfig):
    """Everything ``eval_3d.py`` needs (the shared fields, some with eval's own default or meaning)."""

    DESCRIPTION: ClassVar[str] = "Evaluate an in-context SAM2 model on 3D volumes."
    EPILOG: ClassVar[str] = (
        "Weights: -checkpoint_path names them when it is given (a .pth file, or a run folder: its best.pth, else "
        "last.pth); -pretrain is used only when -checkpoint_path is left at its default. none (for either) = "
        "random init. -all_checkpoints RUN evaluates every epoch_N.pth of a run folder instead.")

    exp_name: str = opt("icl", "evaluation name: the tables go to runs/eval/<exp_name> unless -out_dir is given",
                        check=_exp_name)
    pretrain: str | None = opt(DEFAULT_PRETRAIN, "weights when -checkpoint_path is left at its default; none = "
                                                 "random init", check=_weights)
    checkpoint_path: str = opt(DEFAULT_CHECKPOINT_PATH, "weights to evaluate: a .pth file (ours or official "
                               "{'model': ...}) or a run folder (best.pth, else last.pth); wins over -pretrain")
    support_instance: str | None = SUPPORT_INSTANCE(
        default=None, help="case the support slices come from (default / none: the training case with most classes)")
    protocol: str = opt("both", "gt_slices (seed, optimistic) | full_volume (every slice) | both",
                        choices=(*PROTOCOLS, "both"))
    out_dir: str | None = opt(None, "folder for the tables (default runs/eval/<exp_name>)")
    split: str = opt("val", "cases to evaluate: the -fold's val (default) or train split, or all cases",
                     choices=SPLITS)
    splits: str | None = opt(None, "splits.json (default: beside the checkpoint, in the cache, else made from -seed)")
    all_checkpoints: str | None = opt(None, "run folder: evaluate every epoch_N.pth")
    save_nifti: str | None = opt(None, "folder for predicted label maps (.nii.gz)")
    save_pic: str | None = opt(None, "folder for overlay PNGs")
    nsd_tolerance: float = opt(2.0, "surface Dice tolerance in mm", float, check=at_least(0, unit=" mm"))
    max_cases: int = opt(0, "evaluate at most N cases (0 = all)", int, check=NON_NEGATIVE)
    feature_cache: str = opt("off", "auto: read the image encoder's outputs of the cached slices from the feature "
                                    "cache (computed on first use; see train_3d.py -feature_cache)",
                             choices=("auto", "off"))
    config: str | None = CONFIG(default=None, help=CONFIG.help + "; default: the one the weights were trained "
                                                                 f"with, else {CONFIG.default}")
    image_size: int | None = IMAGE_SIZE(default=None, help=IMAGE_SIZE.help + "; default: the weights' training "
                                                                             f"size, else {IMAGE_SIZE.default}")

    def check_files(self) -> None:
        """Config and image size are settled with the weights (``icl.model.settings``) and checked then again; here
        a given image size is checked against the fallback config already."""
        given = self.config
        self.config = given or CONFIG.default
        try:
            super().check_files()
        finally:
            self.config = given

    def finish(self) -> None:
        super().finish()
        if self.out_dir is None:
            self.out_dir = str(Path("runs") / "eval" / self.exp_name)


@dataclass
class SegmentOptions(Options):
    """The options of ``python -m icl.segment`` (its --help text is that module's docstring)."""

    DASHES: ClassVar[str] = "--"

    support: str | None = opt(help="support image (NIfTI)", required=True)
    support_label: str | None = opt(help="label map of the support image (same grid)", required=True)
    query: str | None = opt(help="query image, or a folder of .nii/.nii.gz query images", required=True)
    query_glob: str | None = opt(None, "with a query folder: the file names to segment (a glob, e.g. '*_0000.nii.gz'"
                                       "); default: every NIfTI image, label maps and nnU-Net non-_0000 files skipped")
    out: str | None = opt(help="output .nii.gz (one query) or folder (one output per query)", required=True)
    classes: str | None = opt(None, "comma-separated label values (default: all in the support)")
    support_slices: str = opt("auto", f"'auto' ({AUTO_SUPPORT_PER_CLASS}) or N support slices per label value, or "
                                      f"'{LABELLED}' (every slice carrying a label value)")
    complete_slices: bool = opt(False, f"with '{LABELLED}': every slice that carries a label is annotated for every "
                                       "requested structure (absent there = absent); default: per structure", bool)
    fill: str = opt("auto", f"with '{LABELLED}' on the scan itself: auto (per structure, the best of the self-check), "
                            "model, interpolation or nearest", choices=("auto", "model", "interpolation", "nearest"))
    report: str | None = opt(None, f"with '{LABELLED}': write the self-check table (held-out Dice per structure "
                                   "and method, the method chosen) to this JSON file")
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
                              "if air values present) or lo,hi in HU (e.g. 0,300)", check=parse_window)
    slice_axis: int = opt(DEFAULT_SLICE_AXIS, "axis to slice along, of the closest canonical (RAS) orientation: "
                                              "2 = axial", int, choices=(0, 1, 2))
    channel: int | None = opt(None, "channel of the 4D (multi-channel) images, e.g. MSD; 3D files ignore it", int)
    amp: str = AMP()
    quiet: bool = opt(False, "no progress bar (the summary line per query and the self-check table stay)", bool)


# ----------------------------------------------------------------------------------------------------- parsing
def parse_train_args(argv: Sequence[str] | None = None, check_files: bool = True) -> TrainConfig:
    """``train_3d.py``'s command line -> validated TrainConfig."""
    return parse_options(TrainConfig, argv, check_files)


def parse_eval_args(argv: Sequence[str] | None = None, check_files: bool = True) -> EvalConfig:
    """``eval_3d.py``'s command line -> validated EvalConfig (weights are resolved by the evaluation)."""
    return parse_options(EvalConfig, argv, check_files)
