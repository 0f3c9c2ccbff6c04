"""Command-line options of train_3d.py: MedSAM2-ICL flag compatibility, defaults, and one-line errors."""
from __future__ import annotations

import pytest

from icl.config import (
    DEFAULT_PRETRAIN,
    EvalConfig,
    TrainConfig,
    parse_eval_args,
    parse_train_args,
    resolve_device,
    str2bool,
)
from icl.errors import InputError

BASE = ["-dataset", "phantom", "-pretrain", "none"]


def test_defaults_match_medsam2_icl():
    cfg = parse_train_args([], check_files=False)
    assert isinstance(cfg, TrainConfig)
    assert (cfg.val_freq, cfg.lr, cfg.gpu_device, cfg.image_size, cfg.out_size) == (5, 5e-5, 0, 512, 512)
    assert (cfg.video_length, cfg.num_support, cfg.support_instance) == (12, 8, "case_00028.nii.gz")
    assert cfg.pretrain == DEFAULT_PRETRAIN and cfg.config == "sam2.1_hiera_t"
    assert cfg.distributed is False and cfg.wandb_enabled is True
    assert cfg.memory_selector == "recency" and cfg.freeze == "none" and cfg.resume is None
    assert cfg.data_path == "./datasets/kits"  # follows -dataset when not given
    assert cfg.support_case == "case_00028"


@pytest.mark.parametrize("word,value", [("True", True), ("true", True), ("1", True),
                                        ("False", False), ("false", False), ("0", False)])
def test_boolean_flags_accept_words_and_digits(word, value):
    cfg = parse_train_args(BASE + ["-distributed", word, "-wandb_enabled", word])
    assert cfg.distributed is value and cfg.wandb_enabled is value
    assert str2bool(word) is value


def test_values_are_typed_and_pretrain_none_means_random_init():
    cfg = parse_train_args(BASE + ["-exp_name", "run1", "-lr", "1e-4", "-image_size", "128", "-epochs", "3",
                                   "-freeze", "image_encoder,memory_encoder", "-seed", "7", "-fold", "2"])
    assert cfg.pretrain is None
    assert (cfg.exp_name, cfg.lr, cfg.image_size, cfg.epochs, cfg.seed, cfg.fold) == ("run1", 1e-4, 128, 3, 7, 2)
    assert cfg.frozen_parts == ["image_encoder", "memory_encoder"]
    d = cfg.to_dict()
    assert d["lr"] == 1e-4 and d["pretrain"] is None and set(d) >= {"exp_name", "dataset", "freeze", "resume"}


@pytest.mark.parametrize("argv,flag,text", [
    (["-dataset", "mnist"], "-dataset", "invalid choice"),
    (["-distributed", "maybe"], "-distributed", "True/False"),
    (["-wandb_enabled", "yes please"], "-wandb_enabled", "True/False"),
    (["-lr", "fast"], "-lr", "invalid float"),
    (["-lr", "0"], "-lr", "> 0"),
    (["-image_size", "100"], "-image_size", "multiple of 32"),
    (["-val_freq", "0"], "-val_freq", "> 0"),
    (["-fold", "5", "-folds", "5"], "-fold", "[0, 5)"),
    (["-freeze", "trunk"], "-freeze", "unknown part"),
    (["-amp", "fp8"], "-amp", "invalid choice"),
    (["-exp_name", "a/b"], "-exp_name", "letters"),
    (["-no_such_flag", "1"], "arguments", "unrecognized"),
    (["-memory_selector", "telepathy"], "-memory_selector", "unknown policy"),
    (["-config", "no_such_model"], "-config", "not found"),
])
def test_bad_values_raise_input_error_naming_the_flag(argv, flag, text):
    with pytest.raises(InputError) as err:
        parse_train_args(BASE + argv)
    assert err.value.where == flag
    assert text in err.value.problem


def test_missing_pretrain_file_says_how_to_get_weights(tmp_path):
    with pytest.raises(InputError) as err:
        parse_train_args(["-dataset", "phantom", "-pretrain", str(tmp_path / "MedSAM2_pretrain.pth")])
    assert err.value.where == "-pretrain"
    assert "checkpoint/README.md" in err.value.problem and "-pretrain none" in err.value.problem


def test_existing_pretrain_file_is_kept(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    assert parse_train_args(["-dataset", "phantom", "-pretrain", str(weights)]).pretrain == str(weights)


def test_missing_data_path_and_resume_and_config(tmp_path):
    with pytest.raises(InputError) as err:
        parse_train_args(["-dataset", "kits", "-pretrain", "none", "-data_path", str(tmp_path / "nope")])
    assert err.value.where == "-data_path" and "does not exist" in err.value.problem
    with pytest.raises(InputError) as err:
        parse_train_args(BASE + ["-resume", str(tmp_path / "gone")])
    assert err.value.where == "-resume"
    with pytest.raises(InputError) as err:
        parse_train_args(BASE + ["-config", str(tmp_path / "model.yaml")])
    assert err.value.where == "-config"


def test_eval_config_shares_the_common_fields():
    cfg = parse_eval_args(BASE + ["-protocol", "full_volume", "-image_size", "256", "-wandb_enabled", "false"])
    assert isinstance(cfg, EvalConfig) and not isinstance(cfg, TrainConfig)
    assert (cfg.protocol, cfg.image_size, cfg.wandb_enabled, cfg.pretrain) == ("full_volume", 256, False, None)
    with pytest.raises(InputError):
        parse_eval_args(BASE + ["-epochs", "3"])  # a training-only flag


def test_device_helper(capsys, monkeypatch):
    import torch

    assert resolve_device(-1) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(0) == "cpu"
    assert "CUDA is not available" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(1) == "cuda:1"
    with pytest.raises(InputError) as err:
        resolve_device(3, "-gpu_device")
    assert err.value.where == "-gpu_device"
    # one rule for -gpu_device N and --device cpu|cuda[:N]
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cuda") == "cuda:0" and resolve_device("cpu") == "cpu"
    for bad in ("gpu", "cuda:x", "mps"):
        with pytest.raises(InputError, match="expected cpu, cuda or cuda:N") as err:
            resolve_device(bad)
        assert err.value.where == "--device"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cuda:0") == "cpu"
