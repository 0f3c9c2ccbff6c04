"""Shared helpers for the training tests: a tiny phantom run on CPU (random init, 128 px, few slices, 1 thread).

    from conftest_train import train_argv, train_data, one_thread  # noqa: F401  (pytest fixtures)
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from icl.data.phantom import make_phantom_dataset


@pytest.fixture
def one_thread():
    """The CI box has 2 cores shared by several suites; more torch threads only thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> dict[str, Path]:
    """3 KiTS-layout phantom cases (40x36x20) and a cache folder shared by all training tests."""
    data = make_phantom_dataset(tmp_path_factory.mktemp("train_phantom"), "kits", 3, seed=0, shape=(40, 36, 20))
    return {"data": data, "cache": tmp_path_factory.mktemp("train_cache")}


def override(base: list[str], extra: list[str]) -> list[str]:
    """``base`` (single-dash ``-flag value`` pairs) with the flags ``extra`` gives replaced by them: a flag given
    twice is an error (#27), so a test's own values take the place of the defaults."""
    given = {t for t in extra[::2]}
    kept = [t for i in range(0, len(base), 2) if base[i] not in given for t in base[i:i + 2]]
    return kept + list(extra)


def train_argv(train_data: dict[str, Path], checkpoints: Path, exp_name: str, *extra: str) -> list[str]:
    """A tiny, fast training command line: 2 support + 3 query slices, 2 steps per epoch, 1 val sample."""
    return override([
        "-exp_name", exp_name, "-dataset", "phantom", "-data_path", str(train_data["data"]),
        "-cache_dir", str(train_data["cache"]), "-checkpoint_path", str(checkpoints),
        "-config", "tiny_cpu", "-image_size", "128", "-out_size", "128", "-pretrain", "none",
        "-video_length", "3", "-num_support", "2", "-support_instance", "case_00000", "-folds", "2",
        "-steps_per_epoch", "2", "-val_samples", "1", "-val_freq", "1", "-wandb_enabled", "false",
        "-count_flops", "false", "-lr", "1e-3", "-warmup_epochs", "0", "-gpu_device", "-1",
    ], list(extra))
