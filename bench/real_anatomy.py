"""Sparse → dense and cross-case on a real labelled scan, every method side by side in one run.

The protocol of ``../shared/data/inia19/README.md``, on any labelled scan of yours:

* **sparse → dense**, both annotation styles (``per_structure``: each structure drawn on its own slices;
  ``complete``: all structures on the same slices), every 4th / 6th / 8th / 12th slice
  (``icl.sparse.protocol.annotate_sparse``); each structure scored (Dice) on the slices where it was not annotated,
  mean over structures. Methods: the engine's ``auto`` (self-check per structure), ``model`` (SAM2 propagation
  with its prior; ``model_without_prior`` alone), ``registration`` (the image-guided fill: each drawn slice's image
  registered to the slices between), ``interpolation`` and ``nearest`` —
  all through ``icl.api.ICLSegmenter`` on NIfTI files, as ``python -m icl.segment --support-slices labelled``
  runs them — and, when installed, ITK morphological contour interpolation (``mci``, 3D Slicer's "Fill between
  slices"), scikit-image's ``random_walker`` (``rw``) and MedSAM's own 3D workflow (``litemedsam_box``: LiteMedSAM
  from the box of the interpolated mask on each slice, ``bench/litemedsam_box.py``).
* **cross-case**: the query is the scan mirrored left–right and moved (6° about the slice axis, scale 1/1.06,
  shift (5, −4, 3) voxels about the centre); its truth is the moved label with left/right homologues ``v`` and
  ``v + --homologue-offset`` swapped (the mirrored left structure is the new left structure). Support: the scan
  itself with its labels. Methods: ``model`` (support slices from the other scan), ``atlas`` (the support label
  copied as it is) and, when installed, affine registration + label transfer (SimpleITK, ``affine``).

    .venv/bin/python bench/real_anatomy.py --image T1.nii.gz --label LABELS.nii.gz --classes 1,1001,147,1147 \\
        [--steps 4,6,8,12] [--styles per_structure,complete] [--checkpoint FILE] [--no-cross] [--json out.json]
        [--compare NAME=CHECKPOINT[@CONFIG] ...]     # other weights' model fills beside, in the same run

Missing optional baselines are named on stderr (``pip install -r bench/requirements-bench.txt``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy.ndimage import affine_transform

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from icl.api import ICLSegmenter  # noqa: E402
from icl.errors import InputError  # noqa: E402
from bench.baselines import affine_label_transfer, random_walker_fill  # noqa: E402
from icl.sparse.itk_contour import itk_interpolation  # noqa: E402
from icl.sparse.protocol import annotate_sparse, sparse_dice  # noqa: E402
from icl.sparse.annotation import Annotation  # noqa: E402
from icl.sparse.methods import INTERPOLATION
from icl.sparse.classic import ClassicFill  # noqa: E402
from icl.sparse.fill import compose  # noqa: E402
from bench.litemedsam_box import litemedsam_box_fill, litemedsam_model  # noqa: E402

ENGINE_FILLS = ("auto", "model", "registration", "interpolation", "nearest")


def plain_sdf(sparse: np.ndarray, classes: list[int], style: str) -> np.ndarray:
    """Plain shape-based interpolation (no centroid alignment, no taper): the README's ``sdf`` baseline."""
    annotation = Annotation.from_label(sparse, 2, classes, style == "complete")
    plain = ClassicFill(annotation, INTERPOLATION, align=False, taper=0.0)
    out = np.zeros(sparse.shape, np.int32)
    out_zhw = np.moveaxis(out, 2, 0)
    for z in range(annotation.depth):
        scores = [(c, s) for c in classes if (s := plain.score(c, z)) is not None]
        out_zhw[z] = compose(annotation.in_plane_shape, scores, out.dtype)
    return out


def moved_query(image: np.ndarray, label: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """The cross-case query: mirrored along axis 0, rotated 6° about axis 2, scaled 1/1.06 and shifted
    (5, −4, 3) voxels about the centre; labels nearest, homologues ``v`` and ``v + offset`` swapped."""
    a = np.deg2rad(6.0)
    matrix = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) / 1.06  # output -> input
    centre = (np.array(image.shape) - 1) / 2.0
    shift = np.array([5.0, -4.0, 3.0])
    off = centre - matrix @ (centre + shift)
    img = affine_transform(image[::-1].astype(np.float32), matrix, off, order=1)
    lab = affine_transform(label[::-1], matrix, off, order=0)
    swapped = lab.copy()
    for v in np.unique(lab):
        if 0 < v < offset and (lab == v + offset).any():
            swapped[lab == v] = v + offset
            swapped[lab == v + offset] = v
    return img, swapped


def save(arr: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def sparse_rows(seg: ICLSegmenter, image: np.ndarray, label: np.ndarray, affine: np.ndarray, classes: list[int],
                styles: list[str], steps: list[int], tmp: Path, fills: tuple[str, ...] = ENGINE_FILLS,
                classic: bool = True, litemedsam=None, compared: dict[str, ICLSegmenter] | None = None
                ) -> list[dict]:
    """The sparse rows; ``litemedsam``: LiteMedSAM's model for MedSAM's own workflow (a box per slice), or None;
    ``compared``: other weights ({name: segmenter}) whose model fills (auto, model, without prior) run beside,
    named ``<fill>[<name>]``, on the same annotations in the same run."""
    image_path = save(image.astype(np.float32), affine, tmp / "image.nii.gz")
    rows = []
    for style in styles:
        for step in steps:
            sparse, drawn = annotate_sparse(label, classes, step, style)
            missing = [c for c in classes if not drawn.get(c)]
            if missing:  # e.g. complete slices @ 1000: the one shared slice misses some structures
                print(f"note: {style} @ {step}: no drawn slice holds structure(s) {missing}; row skipped",
                      file=sys.stderr)
                continue
            sparse_path = save(sparse.astype(np.int16), affine, tmp / f"sparse_{style}_{step}.nii.gz")
            row: dict = {"style": style, "step": step, "dice": {}, "seconds": {}, "chosen": {}}
            segmenters = [("", seg, [f for f in ENGINE_FILLS if f in fills])]
            segmenters += [(f"[{name}]", other, [f for f in ("auto", "model") if f in fills])
                           for name, other in (compared or {}).items()]
            for suffix, runner, names in segmenters:
                prior = runner.mask_prior
                runs = names + (["model_without_prior"] if "model" in names and prior else [])
                for fill in runs:
                    runner.fill, runner.complete_slices = fill.removesuffix("_without_prior"), style == "complete"
                    runner.mask_prior = prior and fill != "model_without_prior"  # = prior="none": same weights
                    t0 = time.perf_counter()
                    result = runner.segment(query=image_path, support=image_path, support_label=sparse_path,
                                            classes=classes)
                    row["seconds"][fill + suffix] = time.perf_counter() - t0
                    row["dice"][fill + suffix] = sparse_dice(result.labels, label, classes, drawn)
                    if fill == "auto" and not suffix:
                        row["chosen"] = {c.structure: c.chosen for c in result.checks}
                        row["self_check"] = [c.as_dict() for c in result.checks]
                    if fill == "auto":
                        for c in result.checks:
                            print(f"  {suffix} " + c.line(), file=sys.stderr)
                runner.mask_prior = prior
            for name, run in (("sdf", lambda: plain_sdf(sparse, classes, style)),
                              ("mci", lambda: itk_interpolation(sparse)),
                              ("rw", lambda: random_walker_fill(image, sparse, drawn)),
                              ("litemedsam_box", lambda: None if litemedsam is None else litemedsam_box_fill(
                                  image, sparse, classes, complete=style == "complete", model=litemedsam))
                              ) if classic else ():
                t0 = time.perf_counter()
                pred = run()
                if pred is not None:
                    row["seconds"][name] = time.perf_counter() - t0
                    row["dice"][name] = sparse_dice(pred, label, classes, drawn)
            rows.append(row)
            print(table_line(row), flush=True)
    return rows


def cross_row(seg: ICLSegmenter, image: np.ndarray, label: np.ndarray, affine: np.ndarray, classes: list[int],
              offset: int, tmp: Path) -> dict:
    q_img, q_lab = moved_query(image, label, offset)
    support_label = np.where(np.isin(label, classes), label, 0).astype(np.int16)
    paths = (save(image.astype(np.float32), affine, tmp / "support.nii.gz"),
             save(support_label, affine, tmp / "support_label.nii.gz"), save(q_img, affine, tmp / "query.nii.gz"))
    row: dict = {"style": "cross-case", "step": "-", "dice": {}, "seconds": {}}
    seg.fill, seg.complete_slices = "model", False
    t0 = time.perf_counter()
    result = seg.segment(query=paths[2], support=paths[0], support_label=paths[1], classes=classes)
    row["seconds"]["model"] = time.perf_counter() - t0
    row["dice"]["model"] = sparse_dice(result.labels, q_lab, classes)
    row["dice"]["atlas"] = sparse_dice(support_label, q_lab, classes)
    t0 = time.perf_counter()
    moved = affine_label_transfer(q_img, image, support_label)
    if moved is not None:
        row["seconds"]["affine"] = time.perf_counter() - t0
        row["dice"]["affine"] = sparse_dice(moved, q_lab, classes)
    print(table_line(row), flush=True)
    return row


def mean(values: dict[int, float]) -> float:
    return float(np.nanmean(list(values.values())))


def table_line(row: dict) -> str:
    cells = ", ".join(f"{m} {mean(d):.3f} ({row['seconds'].get(m, 0):.1f} s)" for m, d in row["dice"].items())
    return f"{row['style']} @ {row['step']}: {cells}"


def markdown(rows: list[dict]) -> str:
    methods = list(dict.fromkeys(m for r in rows for m in r["dice"]))
    lines = ["| style @ step | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for r in rows:
        best = max((mean(d), m) for m, d in r["dice"].items() if not m.startswith(("auto", "model")))[1] \
            if len(r["dice"]) > 2 else None
        cells = [f"**{mean(r['dice'][m]):.3f}**" if m == best else
                 (f"{mean(r['dice'][m]):.3f}" if m in r["dice"] else "—") for m in methods]
        lines.append(f"| {r['style']} @ {r['step']} | " + " | ".join(cells) + " |")
    seconds = [f"{m} {np.mean([r['seconds'][m] for r in rows if m in r['seconds']]):.1f} s" for m in methods
               if any(m in r["seconds"] for r in rows)]
    return "\n".join(lines) + "\n\nmean seconds per run: " + ", ".join(seconds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--classes", required=True, help="comma-separated label values")
    p.add_argument("--steps", default="4,6,8,12")
    p.add_argument("--styles", default="per_structure,complete")
    p.add_argument("--checkpoint", default=None, help="default: the shipped default model")
    p.add_argument("--config", default="tiny_cpu")
    p.add_argument("--compare", action="append", default=[], metavar="NAME=CHECKPOINT[@CONFIG]",
                   help="other weights whose model fills run beside in the same run (repeatable)")
    p.add_argument("--crop", default="auto", choices=("auto", "on", "off"),
                   help="the model's crop (auto: on for weights trained with a mask prior)")
    p.add_argument("--fills", default=",".join(ENGINE_FILLS), help="the engine's fills to run (comma names); a model "
                   "trained with a mask prior also runs without it (model_without_prior)")
    p.add_argument("--adapt-steps", type=int, default=0, help="test-time adaptation steps of the model (0 = off)")
    p.add_argument("--no-classic", action="store_true", help="skip sdf / mci / rw (a quick check of a model)")
    p.add_argument("--homologue-offset", type=int, default=1000)
    p.add_argument("--no-cross", action="store_true")
    p.add_argument("--no-litemedsam", action="store_true", help="skip MedSAM's own workflow (LiteMedSAM from a box "
                                                                 "on each slice: about 4 CPU minutes per row)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    classes = [int(c) for c in a.classes.split(",")]
    img_nii, lab_nii = nib.load(a.image), nib.load(a.label)
    image = np.asarray(img_nii.dataobj, dtype=np.float32)
    label = np.asarray(lab_nii.dataobj).astype(np.int32)
    label = np.where(np.isin(label, classes), label, 0)
    for name, module in (("mci", "itk"), ("rw", "skimage"), ("affine", "SimpleITK")):
        if __import__("importlib").util.find_spec(module) is None:
            print(f"note: {name} baseline skipped ({module} not installed: "
                  f"pip install -r bench/requirements-bench.txt)", file=sys.stderr)
    lite = None
    if not a.no_litemedsam and not a.no_classic:
        try:
            lite = litemedsam_model()
        except InputError as err:  # the package is not installed: the row is skipped, and said
            print(f"note: litemedsam_box baseline skipped ({err})", file=sys.stderr)
    seg = ICLSegmenter(checkpoint=a.checkpoint, config=a.config, support_slices="labelled", crop=a.crop,
                       adapt_steps=a.adapt_steps)
    compared = {}
    for item in a.compare:
        name, _, rest = item.partition("=")
        weights, _, config = rest.partition("@")
        compared[name] = ICLSegmenter(checkpoint=weights, config=config or None, support_slices="labelled",
                                      crop=a.crop, adapt_steps=a.adapt_steps)
    with tempfile.TemporaryDirectory() as tmp:
        rows = sparse_rows(seg, image, label, img_nii.affine, classes, a.styles.split(","),
                           [int(s) for s in a.steps.split(",")], Path(tmp), tuple(a.fills.split(",")),
                           not a.no_classic, lite, compared)
        if not a.no_cross:
            rows.append(cross_row(seg, image, label, img_nii.affine, classes, a.homologue_offset, Path(tmp)))
    print(markdown(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
