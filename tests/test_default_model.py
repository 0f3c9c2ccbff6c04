"""The shipped default model (``checkpoint/icl_tiny_cpu.pth``) reads its support.

Three look-alike objects (one shape class, one intensity distribution) in one scan, on a seed training never
draws; each in turn is marked on every 4th slice. Same image, same propagation, only the support differs, so the
prediction can follow the marked object only by reading the support. Through ``icl.api`` (what
``python -m icl.segment`` runs), with the default weights: no ``checkpoint`` argument.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from icl.api import ICLSegmenter
from icl.baselines import sparse_label
from icl.data.lookalike import make_task
from icl.engine.metrics import binary_dice

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "checkpoint" / "icl_tiny_cpu.pth"
SEEDS = (2**31 + 91_000, 2**31 + 91_001)  # far from the seeds training draws


def test_default_model_is_shipped():
    assert DEFAULT_MODEL.is_file(), "checkpoint/icl_tiny_cpu.pth is part of the repository (see checkpoint/README.md)"
    state = torch.load(DEFAULT_MODEL, map_location="cpu", weights_only=True)
    assert "model" in state and "memory_attention.layers.0.cross_attn_image.q_proj.weight" in state["model"]


def test_default_model_follows_the_marked_object(tmp_path):
    torch.set_num_threads(1)
    seg = ICLSegmenter(config="tiny_cpu", window=(0.0, 1.0), support_slices="labelled", fill="model")
    marked, others = [], []
    for i, seed in enumerate(SEEDS):
        task = make_task(seed, "sparse", size=128, depth=12, k=3, same_prob=1.0, every=4)
        image = tmp_path / f"scan{i}.nii.gz"
        nib.save(nib.Nifti1Image(np.transpose(task["volume"], (1, 2, 0)), np.eye(4)), str(image))
        masks = np.transpose(task["masks"], (0, 2, 3, 1)) > 0  # [K, H, W, Z]
        for j in range(len(masks)):
            sparse, kept = sparse_label(masks[j].astype(np.uint8), 4)
            label = tmp_path / f"scan{i}_mark{j}.nii.gz"
            nib.save(nib.Nifti1Image(sparse.astype(np.uint8), np.eye(4)), str(label))
            pred = seg.segment(image, image, label).labels > 0
            free = [z for z in range(pred.shape[2]) if z not in kept]
            marked.append(binary_dice(pred[..., free], masks[j][..., free]))
            others += [binary_dice(pred[..., free], masks[o][..., free]) for o in range(len(masks)) if o != j]
    marked_mean, others_mean = np.nanmean(marked), np.nanmean(others)
    print(f"Dice(marked) {marked_mean:.3f}, Dice(others) {others_mean:.3f}")
    # BENCHMARKS.md (bench/icl_switch.py) has the full figures; these bounds only say "it follows the support"
    assert marked_mean > 0.6, (marked, others)
    assert others_mean < 0.2, (marked, others)
