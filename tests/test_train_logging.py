"""Experiment logging: offline unless told otherwise, no-op when disabled, overlay colours."""
from __future__ import annotations

import numpy as np

from icl.engine.train.logging import NullLogger, has_wandb_credentials, make_logger, overlay, wandb_mode


def test_mode_is_offline_without_credentials_and_env_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert not has_wandb_credentials() and wandb_mode() == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert has_wandb_credentials() and wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_disabled_or_non_main_rank_gives_null_logger(tmp_path):
    assert isinstance(make_logger(False, tmp_path, "x", {}), NullLogger)
    assert isinstance(make_logger(True, tmp_path, "x", {}, is_main=False), NullLogger)
    log = make_logger(False, tmp_path, "x", {})
    log.log({"loss": 1.0}, step=0)
    log.log_overlays("val", [(np.zeros((4, 4, 3), np.uint8), "c")], step=0)
    log.finish()
    assert not any(tmp_path.iterdir()), "a disabled logger writes nothing"


def test_overlay_paints_prediction_red_and_truth_green():
    image = np.linspace(0, 100, 16, dtype=np.float32).reshape(4, 4)
    pred = np.zeros((4, 4))
    gt = np.zeros((4, 4))
    pred[0, 0] = gt[0, 0] = 1  # overlap
    pred[0, 1] = 1  # prediction only
    gt[0, 2] = 1  # truth only
    rgb = overlay(image, pred, gt)
    assert rgb.shape == (4, 4, 3) and rgb.dtype == np.uint8
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    assert r[0, 1] > g[0, 1] and g[0, 2] > r[0, 2] and r[0, 0] > b[0, 0] < g[0, 0]
    assert (r[3] == g[3]).all() and (g[3] == b[3]).all()  # untouched rows stay grey
    assert rgb[0, 3].tolist() == [51, 51, 51] and rgb[3, 3].tolist() == [255, 255, 255]
