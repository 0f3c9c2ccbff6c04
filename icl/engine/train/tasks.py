"""Training tasks: what one step shows the model — frames, each object's prompts, the direction, the truth.

Why one form: the engine has one propagation rule (``sam2_ext.track``), so every training sample is put in the
shape that rule takes. Two sources feed it:

* clips of the preprocessed datasets (``icl.data.loaders.ICLDataset`` samples): the support slices are put in front
  of the query clip and tracked forward, every class of the sample one object;
* look-alike tasks generated on the fly (``icl.data.lookalike``): several objects that share one appearance, the
  support marking them. Every look-alike visible on a support slice becomes its own object with its own masks
  (``objects="all"``): the same frames, different supports, different answers — a model that ignores its memory
  cannot fit them. Same-scan levels are tracked the way users' sparse annotations are (support slices inside the
  scan, ``direction="both"``; ``adjacent``/``far`` forward from the support slice); ``cross`` puts another scan's
  support slices in front of the query.
* anatomy tasks generated on the fly (``icl.data.anatomy_tasks``, levels ``anat_*``): 1-3 marked structures among
  10-60 touching ones of a synthetic anatomy; the generator already writes them in the rule's terms
  (:func:`task_from_anatomy`);
* the same task kinds on real labelled volumes (levels ``real_*``, ``-real_volumes``; ``icl.engine.train.real_tasks``,
  handed in as a callable so this module stays free of the volumes).

``-tasks`` mixes the sources along a schedule (:func:`parse_schedule`), e.g.
``0:adjacent=1;300:sparse=0.4,cross=0.3,clips=0.3``: from step 0 only ``adjacent``, from step 300 that mix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from icl.data.anatomy_tasks import make_anatomy_task
from icl.data.lookalike import as_video, make_task
from icl.data.vocabulary import ANATOMY_LEVELS, LEVELS, REAL_LEVELS
from icl.engine.train.schedule import CLIPS, source_at, source_name
from icl.errors import InputError

ANATOMY_DEPTH = 12  # slices of a generated anatomy slab unless the caller says otherwise


@dataclass
class Task:
    """One training/validation sample in the propagation rule's terms (objects in the order of ``prompts``)."""

    frames: torch.Tensor  # [N, H, W] float in [0, 1]
    prompts: dict[int, dict[int, torch.Tensor]]  # object -> {frame: mask [H, W]}
    direction: str  # "forward" or "both"
    targets: torch.Tensor  # [K, N, H, W] float {0, 1}
    scored: list[int]  # frames whose predictions the loss and the Dice count
    kind: str = CLIPS  # CLIPS or a look-alike level
    name: str = ""
    class_ids: list[int] = field(default_factory=list)  # clips: the dataset's class id of each object
    distractors: torch.Tensor | None = None  # look-alikes: [J, N, H, W] masks of the objects nobody marked
    sources: list[tuple[str, int]] | None = None  # clips: (case id, slice) of each frame, for the feature cache
    priors: dict[int, dict[int, torch.Tensor]] | None = None  # object -> {frame: mask prior} (icl.engine.train.prior_tasks)
    cropped: bool = False  # cut to the fill's box already (real volumes): a prior is added without a new cut

    def to(self, device: str | torch.device) -> "Task":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Task(move(self.frames), {k: {z: move(m) for z, m in p.items()} for k, p in self.prompts.items()},
                    self.direction, move(self.targets), self.scored, self.kind, self.name, self.class_ids,
                    move(self.distractors), self.sources,
                    None if self.priors is None else {k: {z: move(m) for z, m in p.items()}
                                                      for k, p in self.priors.items()}, self.cropped)


# ------------------------------------------------------------------------------------------------ conversions
def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def task_from_clip(sample: Mapping[str, Any]) -> Task:
    """An ``ICLDataset`` sample (one or K classes) as a forward task: support slices first, then the query clip."""
    image, support_image = sample["image"], sample["support_image"]
    if "class_ids" in sample:  # -classes_per_sample K: K classes on the same query slices
        ids = [int(c) for c in sample["class_ids"]]
        labels, supports = sample["labels"], sample["support_labels"]
    else:
        ids, labels, supports = [int(sample["class_id"])], sample["label"][None], sample["support_label"][None]
    num_support = len(support_image)
    frames = torch.cat([support_image, image.to(support_image.device)])
    prompts = {k: {s: supports[k][s] for s in range(num_support)} for k in range(len(ids))}
    targets = torch.cat([torch.zeros_like(supports), labels.to(supports.dtype)], dim=1)
    sources = None
    if "support_name" in sample and "slice_index" in sample:
        sources = [(str(sample["support_name"]), int(z)) for z in sample["support_slice_index"]] + \
                  [(str(sample["name"]), int(z)) for z in sample["slice_index"]]
    return Task(frames, prompts, "forward", targets, list(range(num_support, len(frames))), CLIPS,
                str(sample.get("name", "")), list(ids), sources=sources)


def task_from_lookalike(task: Mapping[str, Any], objects: str = "all", seed: int = 0) -> Task:
    """A generated look-alike task (``icl.data.lookalike.make_task``) in the rule's terms (module docstring)."""
    level = task["level"]
    if task["support_images"] is not None:  # cross: another scan's support slices, then the whole query scan
        video = as_video(task)
        frames, others = video["frames"], [j for j in range(len(task["masks"])) if j != task["target"]]
        prompts = {0: {f: _t(m) for f, m in video["support"].items()}}
        return Task(_t(frames), prompts, "forward", _t(video["targets"][[task["target"]]]), video["query"], level,
                    distractors=_t(video["targets"][others]))
    if level == "sparse":  # support slices inside the scan: both ways, as users' sparse annotations are filled
        frames, masks, support = task["volume"], task["masks"], list(task["support_slices"])
        direction, scored = "both", [z for z in range(len(frames)) if z not in support]
        support_frames = {z: z for z in support}
    else:  # adjacent / far / discs: forward from the support slice
        video = as_video(task, seed=seed)
        order = video["order"]
        frames, masks = video["frames"], task["masks"][:, order]
        support_frames = {i: z for i, z in enumerate(order) if z in task["support_slices"]}
        direction, scored = "forward", list(video["query"])
    objs = [task["target"]]
    if objects == "all":  # every look-alike seen on a support slice is marked there: its own object
        objs += [j for j in range(len(masks)) if j != task["target"] and any(masks[j, f].any() for f in support_frames)]
    prompts = {k: {f: _t(masks[j, f]) for f in support_frames} for k, j in enumerate(objs)}
    rest = [j for j in range(len(masks)) if j not in objs]
    return Task(_t(frames), prompts, direction, _t(masks[objs]), scored, level, distractors=_t(masks[rest]))


def task_from_anatomy(task: Mapping[str, Any]) -> Task:
    """A generated anatomy task (``icl.data.anatomy_tasks.make_anatomy_task``) as a Task (it is already in the
    rule's terms: frames, per-object prompts, direction, truth, scored frames, distractors)."""
    prompts = {k: {f: _t(m) for f, m in p.items()} for k, p in task["prompts"].items()}
    return Task(_t(task["frames"]), prompts, task["direction"], _t(task["targets"]), list(task["scored"]),
                task["level"], distractors=_t(task["distractors"]))


def level_task(level: str, seed: int, image_size: int, depth: int, k: int, held_out: Sequence[str] = (),
               objects: str = "all", anatomy_drop: frozenset = frozenset()) -> Task:
    """The Task of one generated ``level`` from ``seed`` (anatomy: 1-3 targets and ``depth`` slices of its own;
    ``anatomy_drop``: generator parts left out, an ablation)."""
    if level in ANATOMY_LEVELS:
        return task_from_anatomy(make_anatomy_task(seed, level, size=image_size, depth=depth, drop=anatomy_drop))
    task = make_task(seed, level, size=image_size, depth=depth, k=k, held_out=held_out)
    return task_from_lookalike(task, objects=objects, seed=seed)


def level_depths(lookalike_depth: int, anatomy_depth: int = ANATOMY_DEPTH) -> dict[str, int]:
    """Slices per generated volume of every level: look-alike levels one depth, anatomy levels another."""
    return {**{lv: lookalike_depth for lv in LEVELS}, **{lv: anatomy_depth for lv in ANATOMY_LEVELS}}


# ------------------------------------------------------------------------------------------------ the dataset
class TaskMix(Dataset):
    """``length`` samples per epoch drawn along a source schedule: generated tasks (look-alike, anatomy), or clips.

    Sample ``i`` of epoch ``e`` on a sequential sampler is step ``(e - 1) * steps + i // world`` of the run (each rank
    takes every ``world``-th index), so the schedule follows the optimizer steps; its randomness depends only on
    ``(seed, e, i)``, so a resumed run sees the same samples.
    """

    def __init__(self, schedule: list[tuple[int, dict[str, float]]], length: int, image_size: int, depth: int,
                 k: int, held_out: Sequence[str] = (), seed: int = 0, clips: Dataset | None = None,
                 world_size: int = 1, depths: Mapping[str, int] | None = None, objects: str = "all",
                 anatomy_drop: frozenset = frozenset(), real: Callable[[str, int], Task] | None = None):
        if any(CLIPS in mix for _, mix in schedule) and clips is None:
            raise InputError("-tasks", "the schedule asks for clips but no dataset is given")
        check_real(schedule, real)
        self.real = real  # real_* levels: icl.engine.train.real_tasks.RealTaskSource
        self.schedule, self.length, self.image_size = schedule, int(length), int(image_size)
        self.depth, self.k, self.held_out, self.seed = int(depth), int(k), tuple(held_out), int(seed)
        self.clips, self.world_size, self.epoch = clips, int(world_size), 1
        self.depths, self.objects, self.anatomy_drop = dict(depths or {}), objects, frozenset(anatomy_drop)

    def __len__(self) -> int:
        return self.length * self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.clips is not None and hasattr(self.clips, "set_epoch"):
            self.clips.set_epoch(epoch)

    def __getitem__(self, index: int) -> Task:
        step = (self.epoch - 1) * self.length + index // self.world_size
        rng = np.random.default_rng([self.seed, self.epoch, index, 11])
        source = source_at(self.schedule, step, rng)
        if source == CLIPS:
            return task_from_clip(self.clips[int(rng.integers(len(self.clips)))])
        task_seed = int(rng.integers(2**31))
        if source in REAL_LEVELS:
            return self.real(source, task_seed)
        depth = self.depths.get(source, ANATOMY_DEPTH if source in ANATOMY_LEVELS else self.depth)
        return level_task(source, task_seed, self.image_size, depth, self.k, self.held_out, self.objects,
                          self.anatomy_drop)


class ClipTasks(Dataset):
    """A dataset of ICL clips (``icl.data.loaders.ICLDataset``), each served as a task."""

    def __init__(self, clips: Dataset):
        self.clips = clips

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> Task:
        return task_from_clip(self.clips[index])

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.clips, "set_epoch"):
            self.clips.set_epoch(epoch)


class LookalikeSet(Dataset):
    """A fixed set of generated tasks (look-alike or anatomy levels), ``per_level`` of each level, from seeds
    training never draws (validation)."""

    SEED0 = 2**31  # training draws task seeds below 2**31

    def __init__(self, levels: Sequence[str], per_level: int, image_size: int, depth: int, k: int,
                 held_out: Sequence[str] = (), depths: Mapping[str, int] | None = None,
                 real: Callable[[str, int], Task] | None = None):
        self.items = [(source_name(lv), self.SEED0 + i) for lv in levels for i in range(per_level)]
        self.image_size, self.depth, self.k, self.held_out = image_size, depth, k, tuple(held_out)
        self.depths, self.real = dict(depths or {}), real

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Task:
        level, seed = self.items[index]
        if level in REAL_LEVELS:
            return self.real(level, seed)
        depth = self.depths.get(level, ANATOMY_DEPTH if level in ANATOMY_LEVELS else self.depth)
        return level_task(level, seed, self.image_size, depth, self.k, self.held_out)


def check_real(schedule: list[tuple[int, dict[str, float]]], real: Callable | None) -> None:
    """A schedule naming ``real_*`` levels needs real volumes (``-real_volumes``)."""
    named = sorted({name for _, mix in schedule for name in mix if name in REAL_LEVELS})
    if named and real is None:
        raise InputError("-tasks", f"{', '.join(named)} need real labelled volumes: give -real_volumes IMG:LAB")


def first(batch: list[Task]) -> Task:
    """DataLoader collate for tasks (batch size 1: a task is a whole video)."""
    if len(batch) != 1:
        raise ValueError(f"tasks are whole videos; use batch_size=1 (got {len(batch)})")
    return batch[0]
