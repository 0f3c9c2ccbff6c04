"""Dataset readers: one per on-disk layout, each returning ``Case`` records (paths + header facts, no voxel data).

Why: the rest of the pipeline must not care whether data came as KiTS, BTCV or MSD/nnU-Net; a ``Case`` carries what
preprocessing needs (which file, which channel, which axis is the slice axis, how source label values map onto class
ids, which CT window). Headers are read and image/label grids cross-checked here, so layout errors surface early.
The slice axis is an axis of the closest-canonical (RAS) orientation the frames are made in (``icl.data.frames``):
2, axial, for every layout, whatever order the file stores its voxels in.

Label values: ``Case.remap`` maps *source* label values (as stored in the NIfTI) onto *class ids* (``label_map``
keys, 0 = background / ignored). The cache stores source values; the remap is applied when sampling, so one cache
serves every label mode and the combined set.
"""
from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from icl.data.frames import DEFAULT_SLICE_AXIS
from icl.data.validate import check_dims, check_grid, load_nifti_header, require_dir
from icl.errors import InputError

KITS_NAMES = {1: "kidney", 2: "tumor", 3: "cyst"}
KITS_SEED_NAME = "kidney_and_tumor"
BTCV_NAMES = {
    1: "spleen", 2: "right_kidney", 3: "left_kidney", 4: "gallbladder", 5: "esophagus", 6: "liver", 7: "stomach",
    8: "aorta", 9: "inferior_vena_cava", 10: "portal_and_splenic_vein", 11: "pancreas", 12: "right_adrenal_gland",
    13: "left_adrenal_gland",
}


@dataclass
class Case:
    """One image/label pair. ``spacing`` is in the file's own voxel axis order; ``slice_axis`` is canonical (RAS)."""

    id: str
    image: Path
    label: Path | None
    label_map: dict[int, str]  # class id -> name
    spacing: tuple[float, float, float]
    affine: np.ndarray
    slice_axis: int  # axis of the closest-canonical (RAS) orientation; 2 = axial
    channel: int | None = None  # modality channel of a 4D image
    modality: str = "CT"  # "CT" (windowed) or "MR" (percentile-scaled)
    window: str = "abdomen"  # CT window: icl.data.frames.WINDOWS["ct_" + window]
    remap: dict[int, int] = field(default_factory=dict)  # source label value -> class id (0 = ignore)
    dataset: str = ""


def _header_case(image: Path, label: Path | None, channel: int | None, **kw: Any) -> Case:
    """Read the headers, check the pair's grids agree, and build a Case."""
    img = load_nifti_header(image)
    check_dims(img.shape, image)
    if label is not None:
        if not label.is_file():
            raise InputError(label, f"label file not found (for image {image.name})")
        lab = load_nifti_header(label)
        check_grid(img.shape, img.affine, lab.shape, lab.affine, label)
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    return Case(image=image, label=label, channel=channel, spacing=spacing, affine=img.affine.copy(), **kw)


def read_kits(root: str | Path, label_mode: str = "per_class", slice_axis: int = DEFAULT_SLICE_AXIS) -> list[Case]:
    """KiTS19/23: ``case_XXXXX/imaging.nii.gz`` + ``segmentation.nii.gz``, stored slice-axis first.

    The file's first axis is the axial one; its affine maps it to z, so in canonical order it is axis 2 as for
    every other layout.

    ``label_mode``: ``"per_class"`` → 1 kidney, 2 tumor, 3 cyst; ``"seed"`` → kidney+tumor merged into class 1,
    cyst treated as background (the seed protocol of the original ICL-SAM2 KiTS experiments).
    """
    root = require_dir(root)
    if label_mode == "per_class":
        label_map, remap = dict(KITS_NAMES), {1: 1, 2: 2, 3: 3}
    elif label_mode == "seed":
        label_map, remap = {1: KITS_SEED_NAME}, {1: 1, 2: 1, 3: 0}
    else:
        raise InputError("--label_mode", f"unknown KiTS label mode {label_mode!r} (per_class | seed)")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("case_"))
    if not dirs:
        raise InputError(root, "no case_XXXXX folders (expected the KiTS layout)")
    cases = []
    for d in dirs:
        image = d / "imaging.nii.gz"
        seg = d / "segmentation.nii.gz"
        cases.append(_header_case(
            image, seg if seg.exists() else None, None, id=d.name, label_map=label_map, slice_axis=slice_axis,
            modality="CT", window="kidney", remap=remap, dataset="kits",
        ))
    return cases


def read_btcv(root: str | Path, slice_axis: int = DEFAULT_SLICE_AXIS) -> list[Case]:
    """BTCV (Beyond the Cranial Vault abdomen): ``img/imgXXXX.nii.gz`` + ``label/labelXXXX.nii.gz``, 13 organs."""
    root = require_dir(root)
    img_dir = root / "img"
    if not img_dir.is_dir():
        raise InputError(img_dir, "BTCV image folder not found (expected img/ and label/)")
    images = sorted(img_dir.glob("img*.nii.gz"))
    if not images:
        raise InputError(img_dir, "no imgXXXX.nii.gz files")
    cases = []
    for image in images:
        num = image.name[len("img"):-len(".nii.gz")]
        label = root / "label" / f"label{num}.nii.gz"
        cases.append(_header_case(
            image, label, None, id=num, label_map=dict(BTCV_NAMES), slice_axis=slice_axis, modality="CT",
            window="abdomen", remap={k: k for k in BTCV_NAMES}, dataset="btcv",
        ))
    return cases


def _msd_labels(meta: dict, path: Path) -> dict[int, str]:
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise InputError(path, "dataset.json has no 'labels'")
    out: dict[int, str] = {}
    for k, v in labels.items():
        if isinstance(v, int):  # nnU-Net v2: {name: value}
            out[v] = k
        elif isinstance(v, str) and k.lstrip("-").isdigit():  # MSD: {"1": name}
            out[int(k)] = v
        else:
            raise InputError(path, f"unsupported label entry {k!r}: {v!r} (region-based labels are not supported)")
    out.pop(0, None)
    return out


def read_msd(root: str | Path, modality: int = 0, slice_axis: int = DEFAULT_SLICE_AXIS) -> list[Case]:
    """MSD / nnU-Net raw: ``dataset.json`` + ``imagesTr/`` + ``labelsTr/``.

    Images are either 4D (MSD: channel ``modality`` is used) or one file per channel with a ``_000k`` suffix
    (nnU-Net: ``CASE_{modality:04d}.nii.gz``). Class names come from dataset.json; "CT" modality → CT windowing.
    """
    root = require_dir(root)
    js = root / "dataset.json"
    if not js.is_file():
        raise InputError(js, "dataset.json not found (expected the MSD / nnU-Net layout)")
    try:
        meta = json.loads(js.read_text())
    except json.JSONDecodeError as e:
        raise InputError(js, f"invalid JSON ({e})") from None
    label_map = _msd_labels(meta, js)
    channels = meta.get("modality") or meta.get("channel_names") or {"0": "CT"}
    if str(modality) not in channels:
        raise InputError("--modality", f"channel {modality} not in dataset.json channels {channels}")
    kind = "CT" if str(channels[str(modality)]).upper() == "CT" else "MR"
    labels_dir = root / "labelsTr"
    if not labels_dir.is_dir():
        raise InputError(labels_dir, "labelsTr folder not found")
    label_files = sorted(labels_dir.glob("*.nii.gz"))
    if not label_files:
        raise InputError(labels_dir, "no labels (*.nii.gz)")
    cases = []
    for label in label_files:
        cid = label.name[: -len(".nii.gz")]
        single = root / "imagesTr" / f"{cid}.nii.gz"
        if single.is_file():
            image, channel = single, modality
        else:
            image, channel = root / "imagesTr" / f"{cid}_{modality:04d}.nii.gz", None
            if not image.is_file():
                raise InputError(image, f"image for label {label.name} not found")
        case = _header_case(
            image, label, channel, id=cid, label_map=dict(label_map), slice_axis=slice_axis, modality=kind,
            window="abdomen", remap={k: k for k in label_map}, dataset=str(meta.get("name", root.name)),
        )
        if len(load_nifti_header(image).shape) == 3:
            case.channel = None
        cases.append(case)
    return cases


READERS: dict[str, Callable[..., list[Case]]] = {
    "kits": read_kits, "btcv": read_btcv, "msd": read_msd, "nnunet": read_msd,
}
PHANTOM = "phantom"  # generated phantoms: a folder in any of the layouts above, found by looking
LAYOUTS = (*READERS, PHANTOM)  # what every command's --dataset / -dataset accepts for one folder


def detect_layout(folder: str | Path, flag: str = "--data_path") -> str:
    """Which reader a folder needs, from what it holds (phantom folders may be in any layout)."""
    folder = Path(folder)
    if any(folder.glob("case_*/imaging.nii.gz")):
        return "kits"
    if (folder / "img").is_dir():
        return "btcv"
    if (folder / "imagesTr").is_dir():
        return "msd"
    raise InputError(flag, f"{folder}: no KiTS, BTCV or MSD layout found")


def read_dataset(layout: str, root: str | Path, **options: Any) -> list[Case]:
    """Dispatch on the layout name (``kits``, ``btcv``, ``msd``, ``nnunet``; ``phantom``: by what the folder holds)."""
    if layout not in LAYOUTS:
        raise InputError("--dataset", f"unknown dataset layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if not Path(root).exists():
        raise InputError(root, "dataset folder not found")
    if layout == PHANTOM:
        layout = detect_layout(root)
    allowed = inspect.signature(READERS[layout]).parameters
    for name in options:
        if name not in allowed or name == "root":
            raise InputError(f"--{name}", f"option not supported by the {layout} reader")
    return READERS[layout](root, **options)


def normalise_name(name: str) -> str:
    """Class names are matched across datasets case- and separator-insensitively ("Right Kidney" = "right_kidney")."""
    return re.sub(r"[\s_\-]+", "_", name.strip().lower())


def unify_label_maps(
    label_maps: Sequence[dict[int, str]], classes: Sequence[str] | None = None
) -> tuple[dict[int, str], list[dict[int, int]]]:
    """Map several datasets' class ids onto one unified class list, by (normalised) name.

    ``classes`` fixes the unified list (others are dropped to background); by default it is the union of all
    names in order of first appearance. Returns ``(unified {id: name}, [per-dataset {class id: unified id}])``.
    """
    if classes is None:
        names: list[str] = []
        for lm in label_maps:
            for _, n in sorted(lm.items()):
                if normalise_name(n) not in names:
                    names.append(normalise_name(n))
    else:
        names = [normalise_name(n) for n in classes]
    unified = {i: n for i, n in enumerate(names, start=1)}
    index = {n: i for i, n in unified.items()}
    maps = [{k: index.get(normalise_name(n), 0) for k, n in lm.items()} for lm in label_maps]
    return unified, maps


def read_combined(
    sources: Sequence[tuple[str, str | Path, dict[str, Any]]], classes: Sequence[str] | None = None
) -> tuple[list[Case], dict[int, str]]:
    """Read several datasets ``[(layout, root, options), ...]`` onto one unified class list (see unify_label_maps).

    Each returned Case keeps its own files; its ``remap`` goes source value → unified id and ``label_map`` is the
    unified map, so a KiTS "kidney" and a BTCV "left_kidney" stay distinct classes unless named alike.
    """
    per = [read_dataset(layout, root, **opts) for layout, root, opts in sources]
    if not any(per):
        raise InputError("combined", "no cases in any dataset")
    unified, maps = unify_label_maps([cases[0].label_map for cases in per if cases], classes)
    out: list[Case] = []
    it = iter(maps)
    for cases in per:
        if not cases:
            continue
        m = next(it)
        for c in cases:
            remap = {src: m.get(cls, 0) for src, cls in c.remap.items()}
            out.append(replace(c, label_map=dict(unified), remap=remap))
    return out, unified
