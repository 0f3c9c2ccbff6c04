"""MedSAM's own 3D workflow as a baseline: LiteMedSAM from a box on every unannotated slice.

How MedSAM is used on a volume: a box per slice, one 2D segmentation each. The boxes here come from the classic
interpolation of the sparse annotation (``icl.sparse.classic``, the engine's own): on each slice where a structure
is not drawn but the interpolation has it, the box around the interpolated mask prompts LiteMedSAM; drawn slices
keep their drawing; structures meet by the highest logit. LiteMedSAM's input rule, as its own inference does:
each slice min–max to [0, 1], the longest side resized to 256 and zero-padded, boxes in those pixels, the logits
cropped and resized back. Runs the SAM2 model of ``cfg/medsam_lite.yaml`` with ``-pretrain litemedsam`` through
the pretrained decoder's own path (``sam2_ext.litemedsam.box_logits``).

    .venv/bin/python bench/litemedsam_box.py --image T1.nii.gz --label LABELS.nii.gz --classes 1,1001,147,1147 \\
        [--step 6] [--style per_structure] [--json out.json]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from icl.io import write_json  # noqa: E402
from icl.model.weights import weights_path  # noqa: E402
from icl.sparse.annotation import Annotation  # noqa: E402
from icl.sparse.classic import ClassicFill  # noqa: E402
from icl.sparse.fill import compose  # noqa: E402
from icl.sparse.methods import INTERPOLATION  # noqa: E402
from icl.sparse.protocol import annotate_sparse, sparse_dice  # noqa: E402
from sam2_ext.build import build_icl_predictor  # noqa: E402
from sam2_ext.frames import prepare_frames  # noqa: E402
from sam2_ext.litemedsam import box_logits  # noqa: E402

SIZE = 256  # LiteMedSAM's input size


def litemedsam_model(device: str = "cpu"):
    """The medsam_lite SAM2 model at LiteMedSAM's own size with the package's weights."""
    return build_icl_predictor("medsam_lite", device, weights_path("litemedsam", "--weights"), SIZE).eval()


def _square(plane: np.ndarray) -> tuple[torch.Tensor, float]:
    """A slice min–max to [0, 1], zero-padded bottom/right to a square; the scale to model pixels."""
    x = torch.from_numpy(plane.astype(np.float32))
    low, high = float(x.min()), float(x.max())
    x = (x - low) / (high - low) if high > low else torch.zeros_like(x)
    side = max(x.shape)
    return F.pad(x, (0, side - x.shape[1], 0, side - x.shape[0])), SIZE / side


def _box(mask: np.ndarray, scale: float) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [xs.min() * scale, ys.min() * scale, xs.max() * scale, ys.max() * scale]


@torch.no_grad()
def litemedsam_box_fill(image: np.ndarray, sparse: np.ndarray, classes: list[int], axis: int = 2,
                        complete: bool = False, model=None) -> np.ndarray:
    """The label volume LiteMedSAM gives from boxes of the interpolated sparse annotation (module docstring)."""
    model = model if model is not None else litemedsam_model()
    annotation = Annotation.from_label(sparse, axis, classes, complete)
    interpolation = ClassicFill(annotation, INTERPOLATION)
    out = np.zeros(sparse.shape, np.int32)
    out_zhw, image_zhw = np.moveaxis(out, axis, 0), np.moveaxis(image, axis, 0)
    shape = annotation.in_plane_shape
    whole = (0, shape[0], 0, shape[1])
    for z in range(annotation.depth):
        scores, prompts = [], []
        for c in classes:
            if z in annotation.slices[c]:  # drawn: the drawing, sure everywhere inside
                scores.append((c, (whole, np.where(annotation.mask(c, z), 1e4, -1e4).astype(np.float32))))
            else:
                guess = interpolation.mask(c, z)
                if guess.any():
                    prompts.append((c, guess))
        if prompts:
            square, scale = _square(image_zhw[z])
            features = model.forward_image(prepare_frames(square[None], SIZE, model.input_rule))["vision_features"]
            boxes = torch.tensor([_box(guess, scale) for _, guess in prompts], dtype=torch.float32)
            logits = box_logits(model, features, boxes)[:, 0]
            valid = logits[:, : round(shape[0] * scale), : round(shape[1] * scale)]
            logits = F.interpolate(valid[:, None], size=shape, mode="bilinear", align_corners=False)[:, 0]
            scores += [(c, (whole, logits[i].numpy())) for i, (c, _) in enumerate(prompts)]
        out_zhw[z] = compose(shape, scores, out.dtype)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image", required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--classes", required=True, help="comma-separated label values")
    p.add_argument("--step", type=int, default=6)
    p.add_argument("--style", choices=("per_structure", "complete"), default="per_structure")
    p.add_argument("--json", help="write the per-structure Dice and seconds here")
    args = p.parse_args(argv)
    classes = [int(c) for c in args.classes.split(",")]
    image = np.asarray(nib.load(args.image).dataobj, np.float32)
    label = np.asarray(nib.load(args.label).dataobj).astype(np.int32)
    sparse, drawn = annotate_sparse(label, classes, args.step, args.style)
    model = litemedsam_model()
    start = time.perf_counter()
    pred = litemedsam_box_fill(image, sparse, classes, complete=args.style == "complete", model=model)
    seconds = time.perf_counter() - start
    dice = sparse_dice(pred, label, classes, drawn)
    mean = float(np.nanmean(list(dice.values())))
    print(f"litemedsam_box {args.style} @ {args.step}: Dice {mean:.3f} ({seconds:.0f} s) "
          + " ".join(f"{c}:{d:.3f}" for c, d in dice.items()))
    if args.json:
        write_json(args.json, {"dice": {str(c): d for c, d in dice.items()}, "mean": mean, "seconds": seconds})
    return 0


if __name__ == "__main__":
    sys.exit(main())
