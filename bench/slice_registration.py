"""Which registration, which settings and which rule for the image-guided fill of a drawing, by measurement.

Every variant fills the same sparse drawings of a labelled scan (the protocol of ``bench/real_anatomy.py``:
``icl.sparse.protocol``, per structure and complete slices) with :class:`icl.sparse.slice_registration.
RegistrationFill`, changing one thing at a time: the registration library and its settings (SimpleITK's demons
filters, ITK-SNAP's greedy in 2D) and the rule (``chain``: each slice registered to its neighbour and the drawn
mask carried through them, the engine's; ``direct``: each drawn slice registered straight onto every slice it fills,
Penney et al.'s rule as issue #31 measured it). Dice: mean over structures on their undrawn slices; seconds: CPU
seconds of the fill in this process (one registration at a time, one thread), so variants compare within a run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/slice_registration.py --image T1.nii.gz --label LABELS.nii.gz \\
        --classes 1,1001,147,1147,45,1045,37,1037,7,1007 [--steps 6,8,12] [--styles per_structure,complete] \\
        [--variants chain-fsf-15x3,direct-diffeo-60,...]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from icl.sparse.annotation import Annotation  # noqa: E402
from icl.sparse.fill import compose  # noqa: E402
from icl.sparse.protocol import annotate_sparse, sparse_dice  # noqa: E402
from icl.sparse.registration import greedy_log  # noqa: E402
from icl.sparse.slice_registration import RegistrationFill, SliceFields, register_slices, warp  # noqa: E402

FILTERS = {"fsf": "FastSymmetricForcesDemonsRegistrationFilter", "diffeo": "DiffeomorphicDemonsRegistrationFilter",
           "plain": "DemonsRegistrationFilter"}


class DirectFill(RegistrationFill):
    """The direct rule: each drawn slice registered straight onto the slice it fills (two registrations per slice)."""

    def jobs(self, wanted=None):
        return {(a, z, self._boxes[c]) for c in self.annotation.classes if self._extents[c] is not None
                for z in range(self._extents[c][0], self._extents[c][1] + 1) for a in self.sources(c, z)}

    def _carried(self, c, a, z):
        return warp(self._distance(c, a), self.fields[(a, z, self._boxes[c])])


def greedy2d(fixed: np.ndarray, moving: np.ndarray, iterations: str) -> np.ndarray:
    """ITK-SNAP's greedy in 2D (SSD, its default smoothing 1.5 / 0.5 voxels): the field as register_slices gives."""
    from picsl_greedy import Greedy2D

    g = Greedy2D()
    with greedy_log() as log:
        g.execute(f"-threads 1 -d 2 -i fixed moving -m SSD -n {iterations} -s 1.5vox 0.5vox -o warp",
                  fixed=sitk.GetImageFromArray(fixed), moving=sitk.GetImageFromArray(moving), warp=None,
                  out=log, err=log)
    xy = sitk.GetArrayFromImage(g["warp"])
    return np.stack([xy[..., 1], xy[..., 0]]).astype(np.float32)


def variant(name: str):
    """``rule-library-iterations``, e.g. ``chain-fsf-15x3`` (pyramid levels coarse to fine), ``direct-diffeo-60``,
    ``chain-greedy-40x20``: (fill class, register function)."""
    rule, library, iterations = name.split("-")
    fill = {"chain": RegistrationFill, "direct": DirectFill}[rule]
    if library == "greedy":
        return fill, partial(greedy2d, iterations=iterations)
    counts = tuple(int(i) for i in iterations.split("x"))
    return fill, partial(register_slices, iterations=counts, demons=FILTERS[library])


def run(image_zhw, label, classes, style, step, name) -> tuple[float, float, int]:
    """One variant on one drawing: (mean Dice, CPU seconds, registrations)."""
    sparse, drawn = annotate_sparse(label, classes, step, style)
    annotation = Annotation.from_label(sparse, 2, classes, style == "complete")
    fill_class, register = variant(name)
    fields = SliceFields(image_zhw, workers=1, register=register)
    out = np.zeros(label.shape, np.int32)
    t0 = time.process_time()
    fill = fill_class(annotation, fields)  # scored here, slice by slice, as fill_volume scores the engine's fills
    fill.prepare()
    out_zhw = np.moveaxis(out, 2, 0)
    for z in range(annotation.depth):
        scores = [(c, s) for c in classes if z not in annotation.slices[c] and (s := fill.score(c, z)) is not None]
        out_zhw[z] = compose(annotation.in_plane_shape, scores, out.dtype)
        given = annotation.written_back(z)
        if given is not None:
            out_zhw[z][given[0]] = given[1][given[0]]
    seconds = time.process_time() - t0
    return float(np.nanmean(list(sparse_dice(out, label, classes, drawn).values()))), seconds, len(fields.fields)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--classes", required=True)
    p.add_argument("--steps", default="6,8,12")
    p.add_argument("--styles", default="per_structure,complete")
    p.add_argument("--variants", default="direct-diffeo-60,direct-fsf-60,direct-plain-60,direct-greedy-40x20,"
                                         "direct-fsf-30x5,chain-fsf-30x5,chain-fsf-15x3,chain-fsf-20,chain-diffeo-15x3")
    a = p.parse_args(argv)
    classes = [int(c) for c in a.classes.split(",")]
    image = np.asarray(nib.load(a.image).dataobj, dtype=np.float32)
    label = np.asarray(nib.load(a.label).dataobj).astype(np.int32)
    label = np.where(np.isin(label, classes), label, 0)
    image_zhw = np.ascontiguousarray(np.moveaxis(image, 2, 0))
    rows = [(style, step) for style in a.styles.split(",") for step in (int(s) for s in a.steps.split(","))]
    print("| variant | " + " | ".join(f"{s} @ {n}" for s, n in rows) + " | CPU s per fill (mean) | registrations |")
    print("|---" * (len(rows) + 3) + "|")
    for name in a.variants.split(","):
        results = [run(image_zhw, label, classes, style, step, name) for style, step in rows]
        cells = " | ".join(f"{d:.3f}" for d, _, _ in results)
        print(f"| {name} | {cells} | {np.mean([s for _, s, _ in results]):.1f} | "
              f"{np.mean([n for _, _, n in results]):.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
