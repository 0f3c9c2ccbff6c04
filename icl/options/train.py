"""The options of ``train_3d.py`` (:class:`TrainConfig`), on top of the shared ones (:mod:`icl.options.common`), and
the checks only they need (vocabularies from the light modules that own them: :mod:`icl.data.vocabulary`,
:mod:`icl.engine.train.loop.schedule`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

from icl.data.real_volumes import parse_pairs, parse_values
from icl.data.vocabulary import GENERATOR_PARTS, REAL_LEVELS, SHAPES
from icl.engine.train.schedule import parse_schedule
from icl.errors import InputError
from icl.model.lora import check_parts as _lora_parts
from icl.model.weights import PACKAGED_WEIGHTS, packaged_pretrain
from icl.options.checks import NON_NEGATIVE, POSITIVE, at_least, none_word, probability
from icl.options.common import FREEZABLE, QUERY_MODES, CommonConfig
from icl.options.spec import opt, parse_options


# ----------------------------------------------------------------------------------------------------- checks
def _schedule(text: str) -> str:
    """A ``-tasks`` schedule (:func:`icl.engine.train.loop.schedule.parse_schedule`)."""
    try:
        parse_schedule(text)
    except InputError as err:
        raise ValueError(err.problem) from None
    return text


def _names(text: str, allowed: tuple[str, ...], what: str) -> str:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; choose from {', '.join(allowed)}")
    return ",".join(names)


def _shape_list(text: str) -> str:
    """Look-alike shape classes (``-held_out_shapes``)."""
    return _names(text, SHAPES, "shape class(es)")


def _generator_parts(text: str) -> str:
    """Parts of the anatomy generator an ablation leaves out (``-anatomy_drop``)."""
    return _names(text, GENERATOR_PARTS, "generator part(s)")


def _class_list(value: str) -> str:
    text = value.strip().lower().replace(" ", "") or "all"
    if text == "all":
        return text
    try:
        ids = [int(c) for c in text.split(",") if c]
    except ValueError:
        raise ValueError(f"expected all or comma-separated integers, got {value!r}") from None
    if not ids or min(ids) < 1:
        raise ValueError(f"class ids are >= 1 (0 is background), got {value!r}")
    return text


def _label_values(value: str) -> str:
    """``-real_held_out``: comma-separated label values (icl.data.real_volumes.parse_values)."""
    try:
        return ",".join(str(v) for v in parse_values(value))
    except InputError as err:
        raise ValueError(err.problem) from None


def _even(value: int) -> int:
    if value < 2 or value % 2:
        raise ValueError(f"must be an even count >= 2 (contrast groups of two: as is, warped), got {value}")
    return value


def _parts(value: str) -> str:
    parts = [] if value == "none" else [p for p in value.split(",") if p]
    unknown = [p for p in parts if p not in FREEZABLE]
    if unknown or (value != "none" and not parts):
        raise ValueError(f"unknown part {','.join(unknown) or value!r}; use none or {','.join(FREEZABLE)}")
    return value




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
                                  "levels anat_sparse, anat_adjacent, anat_far, anat_cross "
                                  "(icl/data/anatomy_tasks.py), and on -real_volumes real_sparse, real_adjacent, "
                                  "real_far, real_cross (icl/data/real_tasks.py)",
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
                              "biases this constant (e.g. 4); only where memory attention is new (random init, "
                              "-pretrain litemedsam); 0 = off", float,
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
                            check=_lora_parts)
    # real labelled volumes as a task source (icl/data/real_volumes.py, real_tasks.py; levels real_* of -tasks)
    real_volumes: str | None = opt(None, "real labelled scans to train on: IMAGE:LABEL[,IMAGE:LABEL...] (NIfTI, "
                                         "label values = structures); -tasks names their levels real_sparse, "
                                         "real_adjacent, real_far, real_cross", check=none_word)
    real_held_out: str = opt("", "label values of -real_volumes never sampled (background for training), e.g. "
                                 "1,1001,147: structures a benchmark measures", check=_label_values)
    real_min_voxels: int = opt(500, "smallest structure of -real_volumes kept (voxels)", int, check=POSITIVE)
    real_depth: int = opt(12, "slices per slab of the real_* levels", int, check=at_least(4))
    real_variants: int = opt(8, "versions of each real volume made once (contrast groups of two: as is, warped; "
                                "the first is the scan itself)", int, check=_even)
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
        if self.dataset != "phantom" and not Path(self.data_path).is_dir():  # the data first: named first
            raise InputError(self.flag("data_path"),
                             f"dataset folder {self.data_path} does not exist (see datasets/README.md)")
        if self.pretrain is not None and self.pretrain.strip().lower() in PACKAGED_WEIGHTS:
            self.pretrain = str(packaged_pretrain(self.pretrain, self.config, self.flag("pretrain")))
        if self.pretrain is not None and not Path(self.pretrain).is_file():
            raise InputError(self.flag("pretrain"), f"weights file {self.pretrain} not found; download MedSAM2 or "
                             "SAM2.1 weights (e.g. sam2.1_hiera_tiny.pt) into ./checkpoint/ (see checkpoint/README.md"
                             "), or pass -pretrain none to train from random init")
        if self.real_volumes is not None:
            parse_pairs(self.real_volumes, self.flag("real_volumes"))
        named = [lv for _, mix in parse_schedule(self.tasks) for lv in mix if lv in REAL_LEVELS]
        if named and self.real_volumes is None:
            raise InputError(self.flag("tasks"), f"{', '.join(sorted(set(named)))} need real labelled volumes: "
                                                 f"give {self.flag('real_volumes')} IMAGE:LABEL")
        if self.resume is not None and not Path(self.resume).exists():
            raise InputError(self.flag("resume"), f"{self.resume} does not exist (give a checkpoint .pth or a run "
                                                  "folder)")
        super().check_files()



def parse_train_args(argv: Sequence[str] | None = None, check_files: bool = True) -> TrainConfig:
    """``train_3d.py``'s command line -> validated TrainConfig."""
    return parse_options(TrainConfig, argv, check_files)
