"""The options of ``eval_3d.py`` (:class:`EvalConfig`): the shared ones (:mod:`icl.options.common`), some with
evaluation's own default or meaning."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

from icl.options.checks import NON_NEGATIVE, at_least
from icl.options.checks import exp_name as _exp_name
from icl.options.common import (CONFIG, DEFAULT_CHECKPOINT_PATH, DEFAULT_PRETRAIN, IMAGE_SIZE, PROTOCOLS, SPLITS,
                                SUPPORT_INSTANCE, CommonConfig, _weights)
from icl.options.spec import opt, parse_options


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



def parse_eval_args(argv: Sequence[str] | None = None, check_files: bool = True) -> EvalConfig:
    """``eval_3d.py``'s command line -> validated EvalConfig (weights are resolved by the evaluation)."""
    return parse_options(EvalConfig, argv, check_files)
