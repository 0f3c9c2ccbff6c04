"""Training checkpoints: full round trip under weights_only=True, RNG restore, and survival of a kill mid-save."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from icl.engine.checkpoint import (capture_rng, epoch_path, export_weights, find_resume_point, remove_stale_temps, resolve_resume, restore_rng, save_checkpoint)
from icl.model.weights import load_checkpoint
from icl.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _one_step(model, opt, sched):
    loss = model(torch.randn(5, 4)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    sched.step()


def test_round_trip_restores_model_optimizer_scheduler_and_counters(tmp_path):
    model, opt, sched = _parts()
    for _ in range(3):
        _one_step(model, opt, sched)
    path = save_checkpoint(tmp_path / "run" / "epoch_2.pth", model, opt, sched, epoch=2, step=3,
                           config={"lr": 1e-3, "data_path": tmp_path, "folds": [1, 2]}, best_metric=0.5)
    payload = torch.load(path, weights_only=True)  # the plain loader must work, not only ours
    assert payload["epoch"] == 2 and payload["step"] == 3 and payload["best_metric"] == 0.5
    assert payload["config"] == {"lr": 1e-3, "data_path": str(tmp_path), "folds": [1, 2]}

    model2, opt2, sched2 = _parts(seed=1)
    ck = load_checkpoint(path)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["optimizer"])
    sched2.load_state_dict(ck["scheduler"])
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == sched.get_last_lr()
    # continuing both gives identical weights: the optimizer moments came back too
    torch.manual_seed(5)
    _one_step(model, opt, sched)
    torch.manual_seed(5)
    _one_step(model2, opt2, sched2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert not list(path.parent.glob(".*tmp*")), "no temp file left behind"


def test_rng_states_round_trip_through_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    state = capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected


def test_corrupt_truncated_missing_and_foreign_files_raise_input_error(tmp_path):
    model, opt, sched = _parts()
    good = save_checkpoint(tmp_path / "good.pth", model, opt, sched, 1, 1, {}, None)
    data = good.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    torch.save({"model": model.state_dict()}, tmp_path / "foreign.pth")
    for name, text in [("trunc.pth", "corrupt or truncated"), ("junk.pth", "corrupt or truncated"),
                       ("missing.pth", "not found"), ("foreign.pth", "not a training checkpoint")]:
        with pytest.raises(InputError) as err:
            load_checkpoint(tmp_path / name)
        assert err.value.where == str(tmp_path / name) and text in err.value.problem


def _write_run(run: Path, epochs: int) -> None:
    model, opt, sched = _parts()
    for e in range(1, epochs + 1):
        _one_step(model, opt, sched)
        save_checkpoint(epoch_path(run, e), model, opt, sched, e, e * 10, {}, None)
        save_checkpoint(run / "last.pth", model, opt, sched, e, e * 10, {}, None)


def test_find_resume_point_prefers_newest_loadable(tmp_path):
    run = tmp_path / "exp_20260101"
    _write_run(run, 3)
    assert find_resume_point(run) == run / "last.pth"
    assert load_checkpoint(resolve_resume(run))["epoch"] == 3
    # killed between writing epoch_4 and last.pth: epoch_4 is newer than last.pth and wins
    model, opt, sched = _parts()
    save_checkpoint(epoch_path(run, 4), model, opt, sched, 4, 40, {}, None)
    assert find_resume_point(run) == run / "epoch_4.pth"
    # a damaged newest file is skipped: fall back to last.pth (epoch 3)
    (run / "epoch_4.pth").write_bytes(b"\0" * 100)
    assert find_resume_point(run) == run / "last.pth"
    # last.pth damaged too (e.g. a non-atomic copy): fall back to the newest good epoch file
    (run / "last.pth").write_bytes((run / "last.pth").read_bytes()[:200])
    assert find_resume_point(run) == run / "epoch_3.pth"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert find_resume_point(empty) is None
    with pytest.raises(InputError):
        resolve_resume(empty)


_KILLED_SAVER = textwrap.dedent("""
    import io, sys, time
    sys.path.insert(0, {root!r})
    import torch
    from icl.engine.checkpoint import save_checkpoint, epoch_path
    run = sys.argv[1]
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(epoch_path(run, 1), model, opt, None, 1, 5, {{}}, None)
    save_checkpoint(run + "/last.pth", model, opt, None, 1, 5, {{}}, None)
    real_save = torch.save
    def slow_save(obj, f):  # write half of the bytes, then hang as if the disk were slow
        buf = io.BytesIO(); real_save(obj, buf); data = buf.getvalue()
        with open(f, "wb") as fh:
            fh.write(data[: len(data) // 2]); fh.flush()
            print("WRITING", flush=True)
            time.sleep(60)
            fh.write(data[len(data) // 2:])
    torch.save = slow_save
    with torch.no_grad():
        model.weight.add_(1.0)
    save_checkpoint(epoch_path(run, 2), model, opt, None, 2, 10, {{}}, None)
""")


def test_sigkill_mid_save_leaves_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    script = tmp_path / "saver.py"
    script.write_text(_KILLED_SAVER.format(root=str(ROOT)))
    proc = subprocess.Popen([sys.executable, str(script), str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    temps = list(run.glob(".epoch_2.pth.*"))
    assert len(temps) == 1, "the half-written temp file is there ..."
    assert not (run / "epoch_2.pth").exists(), "... but never under the real name"
    found = find_resume_point(run)
    assert found == run / "last.pth"
    assert load_checkpoint(found)["epoch"] == 1 and load_checkpoint(found)["step"] == 5
    assert remove_stale_temps(run) == temps and not list(run.glob(".*"))


def test_export_keeps_the_weights_and_the_run_config_only(tmp_path):
    model, opt, sched = _parts()
    _one_step(model, opt, sched)
    src = save_checkpoint(tmp_path / "best.pth", model, opt, sched, 4, 40, {"tasks": "0:sparse=1", "lr": 1e-3}, 0.7)
    dst = export_weights(src, tmp_path / "out" / "model.pth")
    payload = torch.load(dst, map_location="cpu", weights_only=True)
    assert set(payload) == {"model", "trained"} and "optimizer" not in payload
    assert payload["trained"]["config"]["tasks"] == "0:sparse=1" and payload["trained"]["step"] == 40
    for key, value in model.state_dict().items():
        assert torch.equal(payload["model"][key], value)
    assert dst.stat().st_size < src.stat().st_size
    assert [p.name for p in dst.parent.iterdir()] == ["model.pth"]  # written atomically, no temp left
