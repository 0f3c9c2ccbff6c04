"""``python -m icl.cli.demo --quick``: the README's first command runs end to end and leaves sane result files."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from icl.cli import demo

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def test_quick_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "icl.cli.demo", "--quick", "--out", str(out)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for step in ("icl.segment", "icl.cli.phantom", "icl.cli.preprocess", "train_3d.py", "eval_3d.py"):
        assert f"$ python {step}" in proc.stdout or f"$ python -m {step}" in proc.stdout, f"{step} not shown"
    for row in ("| auto (icl.segment: self-check per structure) |", "| default model alone (--fill model) |",
                "| registration (--fill registration) |", "| interpolation (--fill interpolation) |",
                "| nearest (--fill nearest) |"):
        assert row in proc.stdout, row
    assert "held-out Dice" in proc.stderr and "-> " in proc.stderr  # the per-structure self-check table
    assert (out / "sparse" / "filled.nii.gz").is_file() and (out / "sparse" / "self_check.json").is_file()
    assert "summary of the freshly trained model: 3D Dice" in proc.stdout and "| protocol | class |" in proc.stdout
    df = pd.read_csv(out / "eval" / "eval.csv")
    assert {(p, c) for p, c in zip(df.protocol, df.class_name)} == {
        (p, c) for p in ("gt_slices", "full_volume") for c in ("kidney", "tumor", "cyst")}
    assert all(math.isnan(d) or 0.0 <= d <= 1.0 for d in df.dice)
    assert (out / "eval" / "eval_summary.csv").is_file() and (out / "eval" / "eval.md").is_file()
    runs = list((out / "runs").glob("demo_*/last.pth"))
    assert len(runs) == 1 and str(runs[0].parent) in proc.stdout, "the demo says where the checkpoints are"


def test_help_and_bad_out(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "icl.cli.demo", "--help"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "--quick" in proc.stdout and "--minutes" in proc.stdout
    afile = tmp_path / "file"
    afile.write_text("x")
    assert demo.main(["--out", str(afile)]) == 2


def test_failing_step_stops_with_one_line_error(tmp_path, monkeypatch, capsys):
    real = demo.commands

    def broken(s, out, minutes):
        cmd = real(s, out, minutes)
        cmd["segment"] = [*cmd["segment"], "--workers", "0"]  # icl.segment rejects this (the first step: fast)
        return cmd

    monkeypatch.setattr(demo, "commands", broken)
    assert demo.main(["--quick", "--out", str(tmp_path / "d")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "1/6 fill a phantom scan" in err[0]
    assert not (tmp_path / "d" / "data").exists() and not (tmp_path / "d" / "runs").exists(), "later steps ran"
