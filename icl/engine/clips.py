"""What training learns from: the data sources, their preprocessing caches and the training clips.

Why its own module: both commands read the same caches (``eval_3d.py`` opens them with :func:`open_training_caches`),
and the sample recipe of training (``-classes``, ``-query_mode context``, ``-same_case_support``,
``-classes_per_sample``) is the data side of the loop, not the loop. A missing phantom folder is generated first.
"""
from __future__ import annotations

import contextlib
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Subset

from icl.data.frames import DEFAULT_SLICE_AXIS
from icl.data.loaders import ICLDataset, make_loader, open_caches
from icl.data.phantom import DEFAULT_CLASSES, make_phantom_dataset
from icl.data.preprocess import CachedCase, preprocess_dataset
from icl.data.readers import detect_layout
from icl.data.sampling import make_splits, spread
from icl.data.real_volumes import load_real_volumes
from icl.data.vocabulary import REAL_LEVELS, SHAPES
from icl.engine import distributed as dd
from icl.engine.train.prior_tasks import PriorTasks
from icl.engine.train.real_tasks import RealTaskSource
from icl.engine.train.schedule import CLIPS, TASK_LEVELS, parse_schedule
from icl.engine.train.tasks import ClipTasks, LookalikeSet, TaskMix, first, level_depths
from icl.errors import InputError, spell_flag
from icl.io import write_json
from icl.options.common import CommonConfig
from icl.options.train import TrainConfig

PHANTOM_CASES = 8  # cases generated when -dataset phantom points at a folder that does not exist yet
TASKS_PER_EPOCH = 100  # steps per epoch of a schedule without clips, unless -steps_per_epoch says otherwise
VAL_TASKS_PER_LEVEL = 6  # fixed look-alike validation tasks per level of the schedule
COMBINED_PARTS = ("kits", "btcv", "msd")


def phantom_shapes(cfg: CommonConfig) -> tuple[str, ...]:
    """Shape classes of a generated phantom dataset: the KiTS-layout default, or, when training holds shape classes
    out (``-held_out_shapes``), every other phantom class, so held-out classes stay unseen in clips too."""
    held_out = [s for s in getattr(cfg, "held_out_shapes", "").split(",") if s]
    if not held_out:
        return DEFAULT_CLASSES["kits"]
    return tuple(s for s in SHAPES if s not in held_out)


def _sources(cfg: CommonConfig) -> list[tuple[str, Path]]:
    """(layout, folder) pairs to cache; a missing phantom folder is generated first."""
    root = Path(cfg.data_path)
    if cfg.dataset == "phantom":
        if not root.exists():
            shapes = phantom_shapes(cfg)
            print(f"note: generating {PHANTOM_CASES} phantom cases in {root} ({', '.join(shapes)})", file=sys.stderr)
            make_phantom_dataset(root, "kits" if len(shapes) <= 3 else "btcv", PHANTOM_CASES, seed=cfg.seed,
                                 classes=shapes)
        return [(detect_layout(root, "-data_path"), root)]
    if cfg.dataset == "combined":
        parts = [(name, root / name) for name in COMBINED_PARTS if (root / name).is_dir()]
        if not parts:
            raise InputError("-data_path", f"combined: expected sub-folders {', '.join(COMBINED_PARTS)} in {root}")
        return parts
    return [(cfg.dataset, root)]


def prepare_caches(cfg: CommonConfig, info: dd.DistInfo) -> list[Path]:
    """Preprocess (once, on rank 0; valid entries are skipped) and return the cache folders."""
    base = Path(cfg.cache_dir) if cfg.cache_dir else Path("cache")
    sources: list[tuple[str, Path]] = []
    problem = None
    if info.is_main:
        try:
            sources = _sources(cfg)
            for layout, folder in sources:
                preprocess_dataset(layout, folder, base / f"{cfg.dataset}_{folder.name}_{cfg.image_size}",
                                   image_size=cfg.image_size, progress=True)
        except InputError as err:
            problem = (err.where, err.problem)
    # rank 0's outcome goes to every rank, so a bad file stops the whole job instead of hanging the others
    sources, problem = dd.broadcast_object((sources, problem), info)
    if problem is not None:
        raise InputError(*problem)
    return [base / f"{cfg.dataset}_{folder.name}_{cfg.image_size}" for _, folder in sources]


def context_window(object_slices: np.ndarray, num_slices: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``length`` consecutive slice indices holding at least one slice of the object, at a random offset.

    Unlike the seed's clips (only slices with the class) such a window also reaches past the object's ends, so a
    model that segments "whatever object is there" without reading its support memory is penalised on slices
    where the class is absent or where only other classes are.
    """
    length = min(length, num_slices)
    centre = int(object_slices[int(rng.integers(len(object_slices)))])
    start = centre - int(rng.integers(length))
    start = min(max(start, 0), num_slices - length)
    return np.arange(start, start + length, dtype=np.int64)


class TrainClipDataset(ICLDataset):
    """The seed's training samples, optionally changed so that ignoring the support costs loss.

    * ``query_mode="context"``: the query clip becomes a :func:`context_window` (the label is the class's mask on
      every slice of the window, often empty);
    * ``same_case_support=p``: with probability ``p`` the support slices come from the query scan itself (spread
      over the class's slices, as ``segment_volume_with_support`` gets them at inference). Object intensities are
      random per scan, so a same-scan support also gives an intensity cue, not only shape;
    * ``classes_per_sample=K``: K classes on the same query slices, each with its own support masks
      (:meth:`_with_more_classes`).

    The last two replace the supports ``ICLDataset`` chose (also a fixed ``-support_instance``) when they apply.
    """

    def __init__(self, *args: Any, query_mode: str = "gt_slices", same_case_support: float = 0.0,
                 classes_per_sample: int = 1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.query_mode, self.same_case_support = query_mode, same_case_support
        self.classes_per_sample = classes_per_sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = super().__getitem__(index)
        if self.query_mode == "gt_slices" and self.same_case_support <= 0 and self.classes_per_sample <= 1:
            return sample
        case = next(c for c in self.cases if c.id == sample["name"])
        cid = sample["class_id"]
        rng = np.random.default_rng([self.seed, self.epoch, index, 1])
        if self.query_mode == "context":
            idx = context_window(case.slices_with(cid), case.num_slices, self.video_length, rng)
            sample["image"] = torch.from_numpy(np.ascontiguousarray(case.image[idx], dtype=np.float32))
            sample["label"] = torch.from_numpy(case.mask(cid, idx))
            sample["slice_index"] = torch.from_numpy(idx)
        same = rng.random() < self.same_case_support
        if self.classes_per_sample > 1:
            return self._with_more_classes(sample, case, case if same else None, rng)
        if same:
            sup = spread(case.slices_with(cid), self.num_support)
            sample["support_image"] = torch.from_numpy(np.ascontiguousarray(case.image[sup], dtype=np.float32))
            sample["support_label"] = torch.from_numpy(case.mask(cid, sup))
            sample["support_name"], sample["support_slice_index"] = case.id, torch.from_numpy(np.asarray(sup))
        return sample

    def _with_more_classes(self, sample: dict[str, Any], case: Any, support: Any, rng: np.random.Generator) -> dict:
        """Add ``class_ids`` [K], ``labels`` [K, T, H, W] and ``support_labels`` [K, S', H, W]: the sampled class plus
        K-1 others of the query scan, all on the same query slices. The support slices (S' = K * num_support) are
        each class's ``num_support`` slices of one support scan, every class's mask on all of them. Same query,
        different support, different target: a model that ignores its memory cannot fit this."""
        cid = sample["class_id"]
        if support is None:
            pool = [c for c in self.support_pool if c is not case and cid in c.class_ids()]
            support = pool[int(rng.integers(len(pool)))] if pool else case
        shared = [c for c in self.class_ids if c != cid and c in case.class_ids() and c in support.class_ids()]
        others = rng.permutation(shared)[:self.classes_per_sample - 1].tolist() if shared else []
        ids = [cid, *[int(c) for c in others]]
        sup = np.concatenate([spread(support.slices_with(c), self.num_support) for c in ids])
        idx = sample["slice_index"].numpy()
        sample["support_image"] = torch.from_numpy(np.ascontiguousarray(support.image[sup], dtype=np.float32))
        sample["support_label"] = torch.from_numpy(support.mask(cid, sup))
        sample["support_name"], sample["support_slice_index"] = support.id, torch.from_numpy(np.asarray(sup))
        sample["class_ids"] = torch.tensor(ids, dtype=torch.int64)
        sample["labels"] = torch.from_numpy(np.stack([case.mask(c, idx) for c in ids]))
        sample["support_labels"] = torch.from_numpy(np.stack([support.mask(c, sup) for c in ids]))
        return sample


@contextlib.contextmanager
def seed_spelling() -> Iterator[None]:
    """The data modules name their own ``--flags``; train_3d.py and eval_3d.py spell the same options with one dash."""
    try:
        yield
    except InputError as err:
        where = spell_flag(err.where[2:].replace("-", "_"), "-") if err.where.startswith("--") else err.where
        raise InputError(where, err.problem) from None


def open_training_caches(cfg: CommonConfig, info: dd.DistInfo) -> tuple[list[CachedCase], dict[int, str], list[Path]]:
    """``(cases, label map, cache folders)`` of ``-dataset``/``-data_path``, preprocessed first where needed."""
    with seed_spelling():
        caches = prepare_caches(cfg, info)
        cases, label_map = open_caches(caches)
    return cases, label_map, caches


def frames_record(cfg: TrainConfig, info: dd.DistInfo) -> dict[str, Any]:
    """How this run's frames were made, for inference to make the same (``icl.model.settings``): the CT window of
    the cached training cases (the most common one; None without CT clips), the image size and the slice axis."""
    windows: list[tuple[float, ...]] = []
    if CLIPS in {name for _, mix in parse_schedule(cfg.tasks) for name in mix}:
        windows = [tuple(c.meta["window"]) for c in open_training_caches(cfg, info)[0]
                   if c.meta.get("modality") == "CT" and c.meta.get("window")]
    common = Counter(windows).most_common(1)
    return {"ct_window": list(common[0][0]) if common else None, "image_size": cfg.image_size,
            "slice_axis": DEFAULT_SLICE_AXIS}


def build_loaders(cfg: TrainConfig, info: dd.DistInfo, run_dir: Path | None = None) -> tuple[Any, Any]:
    """Train and validation loaders of :class:`~icl.engine.train.tasks.Task` s, as ``-tasks`` schedules them.

    Clips (``clips`` in the schedule) come from the dataset's caches, split by ``-fold``/``-folds`` (deterministic
    k-fold on case ids, written to ``splits.json``), support slices from ``-support_instance`` (``none``: another
    training case holding the class). Look-alike and anatomy levels are generated on the fly; their validation
    tasks are a fixed set of seeds training never draws. The train order depends only on (seed, epoch), so resume is exact.
    """
    schedule = parse_schedule(cfg.tasks)
    sources = {name for _, mix in schedule for name in mix}
    levels = [lv for lv in TASK_LEVELS if lv in sources]
    depths = level_depths(cfg.lookalike_depth, cfg.anatomy_depth)
    clip_train, clip_val = _clip_sets(cfg, info, run_dir) if CLIPS in sources else (None, None)
    real = real_source(cfg, info) if sources & set(REAL_LEVELS) else None
    held_out = [s for s in cfg.held_out_shapes.split(",") if s]
    if sources == {CLIPS}:  # the seed's training: every clip once per epoch, shuffled
        train_set, shuffle = ClipTasks(clip_train), True
    else:
        length = cfg.steps_per_epoch or (len(clip_train) if clip_train is not None else TASKS_PER_EPOCH)
        train_set = TaskMix(schedule, length, cfg.image_size, cfg.lookalike_depth, cfg.lookalike_k, held_out,
                            cfg.seed, clip_train, info.world_size, depths=depths, objects=cfg.lookalike_objects,
                            anatomy_drop=frozenset(p for p in cfg.anatomy_drop.split(",") if p), real=real)
        shuffle = False  # the schedule follows the steps (TaskMix); each task is random anyway
    if cfg.mask_prior > 0:  # both-ways tasks as the sparse fill runs them: cropped, the interpolation as a prior
        train_set = PriorTasks(train_set, cfg.mask_prior, cfg.image_size, cfg.seed)
    val_parts = [ClipTasks(clip_val)] if clip_val is not None else []
    if levels:
        val_parts.append(LookalikeSet(levels, VAL_TASKS_PER_LEVEL, cfg.image_size, cfg.lookalike_depth,
                                      cfg.lookalike_k, held_out, depths=depths, real=real))
    val_set = ConcatDataset(val_parts)
    # DistributedSampler even on one process: its order is a function of (seed, epoch), which makes resume exact.
    train_loader = make_loader(train_set, shuffle=shuffle, num_workers=cfg.num_workers, distributed=True,
                               seed=cfg.seed, num_replicas=info.world_size, rank=info.rank, collate_fn=first)
    val_loader = make_loader(Subset(val_set, dd.shard_indices(len(val_set), info)), shuffle=False,
                             num_workers=cfg.num_workers, collate_fn=first)
    return train_loader, val_loader


def real_source(cfg: TrainConfig, info: dd.DistInfo) -> RealTaskSource:
    """The ``real_*`` levels' tasks: ``-real_volumes`` read once (``-real_held_out`` never sampled), each with its
    bank of ``-real_variants`` versions (icl.data.real_volumes)."""
    if cfg.real_volumes is None:
        raise InputError("-tasks", "real_* levels need real labelled volumes: give -real_volumes IMAGE:LABEL")
    with seed_spelling():
        volumes = load_real_volumes(cfg.real_volumes, cfg.real_held_out, cfg.real_min_voxels, cfg.real_variants,
                                    cfg.seed)
    if info.is_main:
        for v in volumes:
            print(f"note: real volume {v.name}: {v.structures} structures of >= {cfg.real_min_voxels} voxels "
                  f"(held out: {cfg.real_held_out or 'none'}), {len(v.variants)} variants", file=sys.stderr)
    return RealTaskSource(volumes, cfg.image_size, cfg.real_depth)


def _clip_sets(cfg: TrainConfig, info: dd.DistInfo, run_dir: Path | None) -> tuple[Any, Any]:
    """The training and validation clip datasets of the caches (see :func:`build_loaders`)."""
    cases = open_training_caches(cfg, info)[0]
    with seed_spelling():
        ids = [c.id for c in cases]
        splits = make_splits(ids, cfg.folds, cfg.seed)
        split = splits[cfg.fold]
        support = cfg.support_case
        if support is not None and support not in ids:
            raise InputError("-support_instance", f"case {support!r} is not in {cfg.data_path} "
                                                  f"({len(ids)} cases, e.g. {', '.join(ids[:3])}); or pass none")
        train_cases = [c for c in cases if c.id in set(split["train"])]
        # the fixed support case is given to the model, so it is never scored as a validation query
        val_cases = [c for c in cases if c.id in set(split["val"]) and c.id != support]
        support_pool = train_cases + [c for c in cases if c.id == support and c not in train_cases]
        if not train_cases or not val_cases:
            raise InputError("-folds", f"fold {cfg.fold} of {cfg.folds} leaves {len(train_cases)} training and "
                                       f"{len(val_cases)} validation cases; use fewer folds or more cases")
        common = dict(video_length=cfg.video_length, num_support=cfg.num_support, support_instance=support,
                      support_cases=support_pool, seed=cfg.seed, class_ids=cfg.class_ids)
        train_set = TrainClipDataset(train_cases, "gt_slices", query_mode=cfg.query_mode,
                                     same_case_support=cfg.same_case_support,
                                     classes_per_sample=cfg.classes_per_sample, **common)
        val_set = ICLDataset(val_cases, "gt_slices", **common)
    if run_dir is not None and info.is_main:  # same format as icl.data.sampling.make_splits(path=...)
        write_json(run_dir / "splits.json", {"seed": cfg.seed, "folds": cfg.folds, "splits": splits})
    return train_set, val_set
