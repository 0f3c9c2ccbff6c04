"""-resume continues exactly: 2 epochs straight == 1 epoch + resume, also after a save killed mid-write."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest_train import one_thread, train_argv, train_data  # noqa: F401  (fixtures)
from icl.options.train import parse_train_args
from icl.model.weights import load_checkpoint
from icl.engine.train import loop as T
from icl.engine.train.loop import train


class Crash(Exception):
    pass


def test_resume_matches_uninterrupted_run(train_data, tmp_path, one_thread, capsys, monkeypatch):  # noqa: F811
    ck = tmp_path / "ck"
    straight = train(parse_train_args(train_argv(train_data, ck, "straight", "-epochs", "2", "-keep_epochs", "1")))
    assert sorted(p.name for p in Path(straight["run_dir"]).glob("*.pth")) == ["best.pth", "epoch_2.pth", "last.pth"]

    # same command, but the process dies at the start of epoch 2 (the LR schedule depends on -epochs,
    # so the interrupted run must be the same 2-epoch run, not a 1-epoch one)
    real_epoch = T.train_one_epoch

    def crash_in_epoch_2(run, epoch):
        if epoch == 2:
            raise Crash()
        return real_epoch(run, epoch)

    monkeypatch.setattr(T, "train_one_epoch", crash_in_epoch_2)
    with pytest.raises(Crash):
        train(parse_train_args(train_argv(train_data, ck, "split", "-epochs", "2")))
    monkeypatch.setattr(T, "train_one_epoch", real_epoch)
    (run,) = ck.glob("split_*")
    assert load_checkpoint(run / "last.pth")["step"] == 2 and not (run / "epoch_2.pth").exists()

    # a save of epoch 2 that was SIGKILLed half-way leaves only a hidden temp file next to the good ones
    good = (run / "epoch_1.pth").read_bytes()
    (run / ".epoch_2.pth.k1ll3d.tmp.pth").write_bytes(good[: len(good) // 3])

    resumed = train(parse_train_args(train_argv(train_data, ck, "split", "-epochs", "2", "-resume", str(run))))
    assert "resumed from" in capsys.readouterr().err
    assert resumed["run_dir"] == str(run), "a resumed run keeps writing into its own folder"
    assert not list(run.glob(".*tmp*")), "the stale temp file was cleaned up"
    assert (resumed["epoch"], resumed["step"]) == (straight["epoch"], straight["step"]) == (2, 4)

    a = load_checkpoint(Path(straight["run_dir"]) / "last.pth")
    b = load_checkpoint(run / "last.pth")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 4)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["step"], sb["step"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 4
    assert a["scheduler"]["_last_lr"] == b["scheduler"]["_last_lr"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert a["best_metric"] == b["best_metric"]


def test_resume_from_file_rejects_other_image_size(train_data, tmp_path, one_thread):  # noqa: F811
    from icl.errors import InputError

    first = train(parse_train_args(train_argv(train_data, tmp_path, "a", "-epochs", "1", "-steps_per_epoch", "1")))
    last = Path(first["run_dir"]) / "last.pth"
    with pytest.raises(InputError) as err:
        train(parse_train_args(train_argv(train_data, tmp_path, "a", "-epochs", "2", "-image_size", "64",
                                          "-out_size", "64", "-resume", str(last))))
    assert err.value.where == "-resume" and "-image_size 128" in err.value.problem
