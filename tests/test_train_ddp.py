"""DDP on gloo with 2 CPU processes (torchrun's environment variables): one short epoch, only rank 0 writes."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

import icl.engine.train.loop  # noqa: F401  (imported here so the forked ranks inherit it instead of re-importing)
from conftest_train import train_argv, train_data  # noqa: F401  (fixture)
from icl.model.weights import load_checkpoint

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, argv: list[str], out: str) -> None:
    """One rank, set up exactly as torchrun would (env://), with spies on the checkpoint writer and the result."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import icl.engine.train.loop as T
    from icl.options.train import parse_train_args

    out_dir = Path(out)
    real_save, real_fit = T.save_checkpoint, T.fit

    def save_spy(path, *args, **kwargs):
        with open(out_dir / f"saves_rank{rank}.txt", "a") as f:
            f.write(f"{Path(path).name}\n")
        return real_save(path, *args, **kwargs)

    def fit_spy(run):
        summary = real_fit(run)
        torch.save(run.predictor.state_dict(), out_dir / f"weights_rank{rank}.pt")
        (out_dir / f"summary_rank{rank}.json").write_text(json.dumps(summary, default=str))
        return summary

    T.save_checkpoint, T.fit = save_spy, fit_spy
    T.train(parse_train_args(argv))


def test_ddp_two_cpu_processes(train_data, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    # clips and generated look-alike tasks mixed, with the training-only probe and the default model's loss (every head
    # it returns must get a gradient on every rank, or DDP stops): all of it must stay in step
    argv = train_argv(train_data, tmp_path / "ck", "ddp", "-epochs", "1", "-distributed", "True",
                      "-tasks", "0:clips=1,sparse=1", "-lookalike_depth", "6", "-aux", "1", "-qk_init", "4", "-loss", "dice_bce")
    # fork: the ranks inherit the imported modules (spawn would re-import torch + sam2 per rank: ~15 s on CI)
    mp.start_processes(_worker, args=(_free_port(), argv, str(out)), nprocs=WORLD, join=True, start_method="fork")

    assert (out / "saves_rank0.txt").read_text().split() == ["epoch_1.pth"]
    assert not (out / "saves_rank1.txt").exists(), "rank 1 never writes checkpoints"
    (run,) = (tmp_path / "ck").iterdir()  # one run folder, named once by rank 0 and shared
    assert sorted(p.name for p in run.glob("*.pth")) == ["best.pth", "epoch_1.pth", "last.pth"]

    w0 = torch.load(out / "weights_rank0.pt", weights_only=True)
    w1 = torch.load(out / "weights_rank1.pt", weights_only=True)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"ranks diverged on {k}: gradients were not all-reduced"
    ck = load_checkpoint(run / "last.pth")
    assert ck["step"] == 2 and ck["epoch"] == 1 and torch.equal(ck["model"]["no_mem_embed"], w0["no_mem_embed"])
    assert set(ck["extra"]) == {"aux_probe"}  # the probe is saved for resume, beside (not inside) the model

    s0, s1 = (json.loads((out / f"summary_rank{r}.json").read_text()) for r in range(WORLD))
    assert s0["last_val"] == s1["last_val"], "validation Dice is reduced over ranks"
    assert s0["run_dir"] == s1["run_dir"] == str(run)
