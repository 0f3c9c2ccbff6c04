"""Model building from cfg/ and weight loading (official, MedSAM2/DDP, own checkpoints, broken files)."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from engine_fixtures import make_tiny_predictor, single_thread, tiny_predictor, toy_slices  # noqa: F401 (fixture)
from sam2_ext.errors import ConfigError, OptionError, Sam2ExtError
from sam2_ext.build import (CFG_DIR, CheckpointError, build_icl_predictor, load_model_config, load_weights,
                            resolve_config_path)
from sam2_ext.icl import segment_with_support
from sam2_ext.predictor import ICLPredictor


def _query_logits(model) -> torch.Tensor:
    images, masks = toy_slices(4)
    return segment_with_support(model, images[:1], {1: masks[:1]}, images[1:])["logits"]


def test_tiny_config_builds_an_icl_predictor(tiny_predictor):
    assert isinstance(tiny_predictor, ICLPredictor)
    assert tiny_predictor.image_size == 128 and tiny_predictor.num_maskmem == 7
    n_params = sum(p.numel() for p in tiny_predictor.parameters())
    assert 1_000_000 < n_params < 3_000_000
    assert tiny_predictor.memory_selector is None


def test_build_leaves_train_mode_to_caller():
    model = build_icl_predictor("tiny_cpu")
    assert model.training


@pytest.mark.parametrize("wrap", ["official", "ddp_prefix", "bare", "own_training"])
def test_checkpoint_round_trip(tiny_predictor, tmp_path, wrap):
    sd = tiny_predictor.state_dict()
    payload = {
        "official": {"model": sd},
        "ddp_prefix": {"model": {f"module.{k}": v for k, v in sd.items()}},
        "bare": sd,
        "own_training": {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3,
                         "config": {"lr": 1e-4, "image_size": 128}},
    }[wrap]
    path = tmp_path / "weights.pt"
    torch.save(payload, path)
    torch.manual_seed(123)  # different random init: only the checkpoint can make the outputs equal
    loaded = build_icl_predictor("tiny_cpu", checkpoint=path).eval()
    assert torch.equal(_query_logits(loaded), _query_logits(tiny_predictor))


def test_wrong_keys_name_the_keys(tiny_predictor, tmp_path):
    sd = dict(tiny_predictor.state_dict())
    sd.pop("no_mem_embed")
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "wrong.pt"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError) as err:
        load_weights(tiny_predictor, path)
    msg = str(err.value)
    assert str(path) in msg and "no_mem_embed" in msg and "extra.weight" in msg
    assert isinstance(err.value, Sam2ExtError)  # the library's own error type, no icl import


def test_shape_mismatch_is_reported(tiny_predictor, tmp_path):
    sd = dict(tiny_predictor.state_dict())
    sd["no_mem_embed"] = torch.zeros(1, 1, 3)
    path = tmp_path / "shape.pt"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match="shape mismatches: no_mem_embed"):
        load_weights(tiny_predictor, path)


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b""])
def test_corrupt_checkpoint(tiny_predictor, tmp_path, content):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_weights(tiny_predictor, path)


def test_truncated_and_missing_checkpoint(tiny_predictor, tmp_path):
    path = tmp_path / "trunc.pt"
    torch.save({"model": tiny_predictor.state_dict()}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_weights(tiny_predictor, path)
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(tiny_predictor, tmp_path / "absent.pt")
    torch.save({"model": {"a": 1}}, tmp_path / "nosd.pt")
    with pytest.raises(CheckpointError, match="no model state dict"):
        load_weights(tiny_predictor, tmp_path / "nosd.pt")


@pytest.mark.parametrize("bad", [100, 0, -32, 48])
def test_image_size_validation(bad):
    with pytest.raises(OptionError, match="image_size: image_size must be a positive multiple of 32"):
        load_model_config("tiny_cpu", image_size=bad)


def test_bad_image_size_in_config_names_the_file(tmp_path):
    cfg = tmp_path / "odd.yaml"
    cfg.write_text(f"base: {CFG_DIR / 'tiny_cpu.yaml'}\nmodel:\n  image_size: 200\n")
    with pytest.raises(ConfigError, match="odd.yaml: image_size"):
        load_model_config(cfg)


def test_256_px_build_keeps_dependent_keys_in_step():
    model = make_tiny_predictor(image_size=256)
    assert model.image_size == 256
    assert model.sam_prompt_encoder.image_embedding_size == (16, 16)
    rope = model.memory_attention.layers[0].self_attn
    assert rope.freqs_cis.shape[0] == 16 * 16
    images, masks = toy_slices(3, size=96)
    with single_thread():
        out = segment_with_support(model, images[:1], {1: masks[:1]}, images[1:])
    assert out["logits"].shape == (2, 1, 96, 96)
    assert (out["logits"] > -1024).all()


def test_config_resolution_and_package_base(tmp_path):
    assert resolve_config_path("tiny_cpu") == CFG_DIR / "tiny_cpu.yaml"
    assert resolve_config_path("sam2.1_hiera_t") == CFG_DIR / "sam2.1_hiera_t.yaml"
    assert resolve_config_path(str(CFG_DIR / "tiny_cpu.yaml")) == CFG_DIR / "tiny_cpu.yaml"
    with pytest.raises(ConfigError, match="no_such_model: model config not found"):
        resolve_config_path("no_such_model")
    for size, embed in (("t", 96), ("s", 96), ("b+", 112), ("l", 144)):
        cfg = load_model_config(f"sam2.1_hiera_{size}")
        assert cfg.model.image_size == 512  # our default, overriding the package's 1024
        assert cfg.model.image_encoder.trunk.embed_dim == embed  # architecture from the package file
        assert list(cfg.model.memory_attention.layer.self_attention.feat_sizes) == [32, 32]
        assert cfg.model._target_ == "sam2_ext.predictor.ICLPredictor"
    cfg = load_model_config("sam2.1_hiera_t", image_size=1024)
    assert list(cfg.model.memory_attention.layer.cross_attention.feat_sizes) == [64, 64]
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: configs/sam2.1/nope.yaml\n")
    with pytest.raises(ConfigError, match="bad.yaml: base config"):
        load_model_config(bad)
    OmegaConf.save(OmegaConf.create({"model": {"image_size": 64}}), tmp_path / "notarget.yaml")
    with pytest.raises(ConfigError, match="_target_"):
        load_model_config(tmp_path / "notarget.yaml")


def test_real_tiny_size_instantiates():
    torch.manual_seed(0)
    model = build_icl_predictor("sam2.1_hiera_t")
    assert isinstance(model, ICLPredictor) and model.image_size == 512
    assert 30e6 < sum(p.numel() for p in model.parameters()) < 45e6


def test_sam2_ext_is_a_library_that_imports_nothing_from_icl():
    """sam2_ext knows nothing of the application built on it (its own error types; no icl import anywhere)."""
    import subprocess
    import sys

    code = ("import sys, sam2_ext.build, sam2_ext.predictor, sam2_ext.selector, sam2_ext.track, sam2_ext.icl, "
            "sam2_ext.batching, sam2_ext.errors; print(sorted(m for m in sys.modules if m.split('.')[0] == 'icl'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(CFG_DIR.parent))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
