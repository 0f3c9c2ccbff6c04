"""One tiny training epoch on phantom data: weights move, checkpoints are complete and load with weights_only."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest_train import one_thread, train_argv, train_data  # noqa: F401  (fixtures)
from icl.options.train import parse_train_args
from icl.model.weights import load_checkpoint
from icl.engine.train.loop import main, train
from sam2_ext.build import build_icl_predictor, load_weights

ROOT = Path(__file__).resolve().parents[1]


def _initial_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # train() seeds with -seed 0 before building the model
    return build_icl_predictor("tiny_cpu", "cpu", image_size=128).state_dict()


def test_one_epoch_trains_and_writes_checkpoints(train_data, tmp_path, one_thread, capsys):  # noqa: F811
    argv = train_argv(train_data, tmp_path / "ck", "tiny", "-epochs", "1", "-count_flops", "true",
                      "-wandb_enabled", "true")  # conftest forces WANDB_MODE=offline
    summary = train(parse_train_args(argv))
    run = Path(summary["run_dir"])
    assert run.parent == tmp_path / "ck" and run.name.startswith("tiny_")
    assert summary["epoch"] == 1 and summary["step"] == 2
    assert summary["total_params"] == summary["trainable_params"] > 100_000
    assert summary["flops_per_frame"] > 1e7
    err = capsys.readouterr().err
    assert "trainable" in err and "GFLOPs per frame" in err and "epoch 1/1 step 2" in err
    epoch_line = next(line for line in err.splitlines() if line.startswith("epoch 1/1 step 2"))
    shown = [item.rsplit(" ", 1)[0] for item in epoch_line.split(": ", 1)[1].split(", ")]
    # losses read as losses, scores as scores: no bare "dice" or "iou" beside val/dice_class_*
    assert {"loss", "loss/mask_focal", "loss/dice", "loss/iou_head", "loss/object"} <= set(shown), shown
    assert all(k in ("loss", "lr") or k.startswith(("loss/", "val/")) for k in shown), shown

    names = sorted(p.name for p in run.iterdir())
    assert names == ["best.pth", "config.json", "epoch_1.pth", "last.pth", "splits.json", "wandb"]
    assert list((run / "wandb").glob("offline-run-*")), "wandb ran offline inside the run folder"
    for name in ("epoch_1.pth", "last.pth", "best.pth"):
        ck = torch.load(run / name, weights_only=True)
        assert ck["epoch"] == 1 and ck["step"] == 2
        assert ck["config"]["exp_name"] == "tiny" and ck["config"]["image_size"] == 128
        assert set(ck["rng"]) >= {"torch", "numpy", "python"}
        assert ck["optimizer"]["state"], "AdamW moments are saved"
        assert ck["scheduler"]["last_epoch"] == 2
    best = load_checkpoint(run / "best.pth")
    assert 0.0 <= best["best_metric"] <= 1.0 and summary["best_metric"] == best["best_metric"]
    val = summary["last_val"]
    assert "val/dice_mean" not in val and best["best_metric"] == val["val/selection_score"]

    before = _initial_weights()
    after = best["model"]
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, "one epoch of AdamW moves most tensors"
    model = build_icl_predictor("tiny_cpu", "cpu", image_size=128)
    load_weights(model, run / "last.pth")  # the engine loads our checkpoints as -pretrain weights
    assert torch.equal(model.state_dict()[changed[0]], after[changed[0]])


def test_freeze_keeps_image_encoder_fixed(train_data, tmp_path, one_thread, capsys):  # noqa: F811
    argv = train_argv(train_data, tmp_path / "ck", "frozen", "-epochs", "1", "-steps_per_epoch", "1",
                      "-freeze", "image_encoder")
    summary = train(parse_train_args(argv))
    assert summary["trainable_params"] < summary["total_params"]
    before = _initial_weights()
    after = load_checkpoint(Path(summary["run_dir"]) / "last.pth")["model"]
    enc = [k for k in before if k.startswith("image_encoder.")]
    rest = [k for k in before if k.startswith("sam_mask_decoder.")]
    assert enc and all(torch.equal(before[k], after[k]) for k in enc)
    assert any(not torch.equal(before[k], after[k]) for k in rest)


def test_missing_support_instance_is_one_line_error(train_data, tmp_path, one_thread, capsys):  # noqa: F811
    argv = train_argv(train_data, tmp_path / "ck", "nosupport", "-support_instance", "case_00099.nii.gz")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: -support_instance: case 'case_00099' is not in")
    assert not (tmp_path / "ck").exists(), "bad input leaves no half-made run folder"


def test_cli_exits_2_without_traceback_on_missing_weights(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train_3d.py"), "-dataset", "phantom",
                           "-pretrain", str(tmp_path / "MedSAM2_pretrain.pth")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: -pretrain: weights file")
    assert "-pretrain none" in proc.stderr and "Traceback" not in proc.stderr


def test_lookalike_schedule_with_levers_trains_and_exports(train_data, tmp_path, one_thread, capsys):  # noqa: F811
    """-tasks mixes generated look-alike tasks with the dataset's clips; the levers apply; -export writes weights."""
    export = tmp_path / "shipped" / "model.pth"
    argv = train_argv(train_data, tmp_path / "ck", "mix", "-epochs", "1", "-tasks", "0:sparse=1,clips=1;1:cross=1",
                      "-lookalike_depth", "6", "-qk_init", "4", "-multimask_tracking", "off",
                      "-export", str(export), "-val_samples", "0")
    summary = train(parse_train_args(argv))
    assert summary["step"] == 2 and summary["exported"] == str(export)
    payload = torch.load(export, map_location="cpu", weights_only=True)
    assert payload["trained"]["config"]["tasks"] == "0:sparse=1,clips=1;1:cross=1"
    # how the frames were made travels with the weights: KiTS-layout clips are windowed ct_kidney
    from icl.data.frames import WINDOWS
    from icl.model.settings import trained_settings

    assert trained_settings(export) == {"config": "tiny_cpu", "image_size": 128, "ct_window": WINDOWS["ct_kidney"],
                                        "mask_prior": 0.0, "mask_prior_gain": 0.0,
                                        "mask_prior_res": "grid"}  # no prior: none at inference
    model = build_icl_predictor("tiny_cpu", "cpu", image_size=128)
    load_weights(model, export)  # the exported file loads like any SAM2 checkpoint
    val = summary["last_val"]
    assert {"val/sparse_marked", "val/sparse_others", "val/cross_marked", "val/cross_others"} <= set(val)
    assert any(k.startswith("val/dice_class_") for k in val) and math.isfinite(val["val/selection_score"])
    # the positional init was applied before training (q/k biases start at the constant, weights at 0)
    start = torch.load(Path(summary["run_dir"]) / "epoch_1.pth", weights_only=True)["model"]
    q_bias = start["memory_attention.layers.0.cross_attn_image.q_proj.bias"]
    assert (q_bias - 4).abs().max() < 0.1, "two steps move the positional init only a little"


def test_a_short_run_on_look_alikes_learns_to_follow_the_support(tmp_path, one_thread):  # noqa: F811
    """150 steps from random init on two identical discs, the support marking one: with the recipe's levers the
    model's prediction already overlaps the marked disc and not the other one (a support-blind model scores the
    same on both)."""
    argv = ["-exp_name", "learn", "-dataset", "phantom", "-data_path", str(tmp_path / "unused"),
            "-checkpoint_path", str(tmp_path / "ck"), "-config", "tiny_cpu", "-image_size", "128", "-out_size", "128",
            "-pretrain", "none", "-gpu_device", "-1", "-tasks", "0:discs_random=1", "-lookalike_depth", "4",
            "-qk_init", "2", "-aux", "1", "-loss", "dice_bce", "-lr", "1e-3", "-warmup_epochs", "0.2", "-epochs", "1",
            "-steps_per_epoch", "150", "-val_freq", "1", "-wandb_enabled", "false", "-count_flops", "false"]
    val = train(parse_train_args(argv))["last_val"]
    marked, others = val["val/discs_random_marked"], val["val/discs_random_others"]
    assert marked > 0.1 and marked > 5 * others, (marked, others)
