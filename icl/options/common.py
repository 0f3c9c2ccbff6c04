"""What the commands' options share: the model, data, device and logging options of ``train_3d.py`` and
``eval_3d.py`` (:class:`CommonConfig`), and the option specs every command reuses (model config, image size, memory
selector, mixed precision).

Why one definition: the commands share options; each is a dataclass field defined once, with its help, type,
choices and check, and each command's argparse parser is generated from its dataclass (:mod:`icl.options.spec`) in
that command's spelling: the seed's single dash for train_3d.py and eval_3d.py (``-exp_name``, booleans as
``True``/``False`` words, so MedSAM2-ICL command lines keep working) and double dashes for ``python -m
icl.segment``. Every problem is an :class:`icl.errors.InputError` naming the flag as the command spells it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from icl.data.readers import LAYOUTS
from icl.errors import InputError
from icl.model.boundary import library_errors
from icl.model.device import resolve_device
from icl.model.precision import AMP_MODES
from icl.model.weights import no_weights
from icl.options.checks import NON_NEGATIVE, POSITIVE, none_word
from icl.options.checks import exp_name as _exp_name
from icl.options.spec import Opt, Options, opt
from sam2_ext.build import load_model_config
from sam2_ext.errors import ConfigError
from sam2_ext.selector import parse_selector_config

DATASETS = (*LAYOUTS, "combined")  # preprocess's layouts (the same words), and several datasets at once
#: Top-level parts of a SAM2 model that ``-freeze`` may name (comma-separated), or ``none``.
FREEZABLE = ("image_encoder", "memory_attention", "memory_encoder", "sam_prompt_encoder", "sam_mask_decoder")
QUERY_MODES = ("gt_slices", "context")
PROTOCOLS = ("gt_slices", "full_volume")
SPLITS = ("val", "train", "all")
DEFAULT_PRETRAIN = "./checkpoint/MedSAM2_pretrain.pth"
DEFAULT_CHECKPOINT_PATH = "./checkpoint"


def _weights(value: str) -> str | None:
    return None if no_weights(value) else value


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
        with library_errors(self.DASHES):
            try:
                load_model_config(self.config, self.image_size)
            except ConfigError as err:
                problem = err.problem if err.where == str(self.config) else f"{err.where}: {err.problem}"
                raise InputError(self.flag("config"), problem) from None
            parse_selector_config(self.memory_selector)

