"""bench/gpu_train.py (the real-anatomy recipe on a GPU): its flags are the recipe's with the GPU's changes, and the
CPU check trains a few steps end to end, writing the run, the weights, the log and the step rate into its folder."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from bench import gpu_train
from icl.cli.recipe import REAL
from icl.options.train import parse_train_args
from real_fixtures import real_pair  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]


def _flags(argv: list[str]) -> dict[str, str]:
    return dict(zip(argv[::2], argv[1::2]))


def test_the_gpu_flags_are_the_recipe_with_what_a_gpu_changes(tmp_path, real_pair):  # noqa: F811
    image, label = real_pair
    flags = _flags(gpu_train.recipe_flags(tmp_path, f"{image}:{label}", 8, 0, None))
    assert (flags["-image_size"], flags["-out_size"], flags["-amp"]) == ("256", "256", "bf16")
    assert flags["-gpu_device"] == "0"
    assert flags["-time_limit_min"] == "8" and flags["-export"] == str(tmp_path / "candidate.pth")
    same = [k for k in REAL if k not in gpu_train.GPU and k not in ("-real_volumes", "-checkpoint_path", "-export",
                                                                      "-time_limit_min")]
    assert all(flags[k] == REAL[k] for k in same), "everything else is the CPU recipe's"
    assert flags["-real_held_out"] == "1,1001,147,1147,45,1045,37,1037,7,1007"
    cfg = parse_train_args(gpu_train.recipe_flags(tmp_path, f"{image}:{label}", 8, 0, None), check_files=False)
    assert cfg.image_size == 256 and cfg.amp == "bf16" and cfg.feature_cache == "off"


def test_cpu_check_trains_a_few_steps_and_reports_the_step_rate(tmp_path, real_pair, capsys):  # noqa: F811
    image, label = real_pair
    threads = torch.get_num_threads()
    try:
        code = gpu_train.main(["--out", str(tmp_path / "run"), "--real-volumes", f"{image}:{label}", "--cpu",
                               "--steps", "2", "--set", "real_min_voxels=50"])
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "run"
    assert code == 0
    rate = json.loads((out / "step_rate.json").read_text())
    assert rate["steps"] == 2 and rate["device"] == "cpu" and rate["steps_per_minute"] > 0
    assert (out / "candidate.pth").is_file() and list(out.glob("icl_real_cpu_*/last.pth"))
    log = (out / "train.log").read_text()
    assert "-real_held_out 1,1001,147" in log and "epoch 1/1 step 2" in log
    assert "step rate on cpu" in capsys.readouterr().out


def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    if torch.cuda.is_available():
        return
    result = subprocess.run([sys.executable, "bench/gpu_train.py", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "CUDA" in result.stderr
