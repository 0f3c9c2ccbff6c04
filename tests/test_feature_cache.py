"""-feature_cache: stored encoder outputs equal fresh ones (to fp16 rounding), stand in for the encoder exactly
(fp32), are rebuilt when the weights or the image size change, and a corrupt or truncated file is never used."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest_train import one_thread, train_argv, train_data  # noqa: F401  (fixtures)
from engine_fixtures import make_tiny_predictor, single_thread
from icl.options.train import parse_train_args
from icl.data.phantom import make_phantom_dataset
from icl.data.preprocess import preprocess_dataset
from icl.engine import feature_cache as FC
from icl.engine.train import loop as T
from icl.engine.feature_cache import FeatureCache
from sam2_ext.predictor import prepare_frames
from sam2_ext.track import track


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fc")
    make_phantom_dataset(root / "raw", "kits", 1, seed=0, shape=(40, 36, 20))
    return root


@pytest.fixture
def cases(data, tmp_path):
    """A fresh preprocessed cache per test (the feature files live inside it)."""
    return preprocess_dataset("kits", data / "raw", tmp_path / "cache", 128, progress=False)


def _frozen(seed: int = 0, image_size: int | None = None):
    model = make_tiny_predictor(seed, image_size=image_size)
    model.image_encoder.requires_grad_(False)
    return model


def _fresh(model, case, z: int) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.encode_levels(prepare_frames(torch.from_numpy(np.array(case.image[z:z + 1])), model.image_size))


def _folders(case) -> list[Path]:
    return sorted((Path(case.path) / "features").iterdir())


def test_cached_levels_equal_fresh_ones_to_fp16_rounding_and_are_reused(cases):
    (case,) = cases
    with single_thread():
        model = _frozen()
        cache = FeatureCache(model, cases)
        got = cache.levels(case.id, 3)
        fresh = _fresh(model, case, 3)
        assert cache.computed == 1 and len(got) == len(fresh) == 3
        for a, b in zip(got, fresh):
            assert a.shape == b.shape and torch.equal(a, b.half().float())
            assert (a - b).abs().max() <= b.abs().max() * 2 ** -11
        again = FeatureCache(model, cases)  # a new run on the same weights reads them from disk
        for a, b in zip(again.levels(case.id, 3), got):
            assert torch.equal(a, b)
        assert (again.computed, again.read) == (0, 1)


def test_stored_fp32_features_replace_the_encoder_exactly(cases):
    (case,) = cases
    cid = case.class_ids()[0]
    idx = case.slices_with(cid)[:4]
    frames = torch.from_numpy(np.array(case.image[idx]))
    prompts = {0: {0: torch.from_numpy(case.mask(cid, idx[:1])[0])}}
    with single_thread():
        model = _frozen()
        plain = torch.stack([r.logits for r in track(model, frames, prompts, "forward")])
        cache = FeatureCache(model, cases, dtype="fp32")
        source = cache.source([(case.id, int(z)) for z in idx])
        calls = []
        hook = model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
        first = torch.stack([r.logits for r in track(model, frames, prompts, "forward", features=source)])
        built = len(calls)
        cached = torch.stack([r.logits for r in track(model, frames, prompts, "forward", features=source)])
        hook.remove()
    assert built == 4 and len(calls) == 4, "the encoder ran once per slice, then never"
    assert (first - plain).abs().max().item() <= 1e-6 and (cached - plain).abs().max().item() <= 1e-6


@pytest.mark.parametrize("change", ["weights", "image_size"])
def test_a_change_of_weights_or_image_size_rebuilds(cases, change):
    (case,) = cases
    with single_thread():
        FeatureCache(_frozen(), cases).levels(case.id, 1)
        old = _folders(case)
        model = _frozen(seed=1) if change == "weights" else _frozen(image_size=64)
        cache = FeatureCache(model, cases)
        got = cache.levels(case.id, 1)
        fresh = _fresh(model, case, 1)
    assert (cache.computed, cache.read) == (1, 0), "computed again, not reused"
    assert len(_folders(case)) == 1 and _folders(case) != old, "the stale entry is gone"
    for a, b in zip(got, fresh):
        assert torch.equal(a, b.half().float())


def test_a_corrupt_slice_is_recomputed_not_used(cases, capsys):
    (case,) = cases
    with single_thread():
        model = _frozen()
        FeatureCache(model, cases).levels(case.id, 2)
        (folder,) = _folders(case)
        stored = np.load(folder / "level1.npy", mmap_mode="r+")
        stored[2, 0, 0, :4] += 1.0  # bit rot in one stored slice
        stored.flush()
        del stored
        cache = FeatureCache(model, cases)
        got = cache.levels(case.id, 2)
        fresh = _fresh(model, case, 2)
    assert "does not match its checksum" in capsys.readouterr().err
    assert cache.computed == 1
    for a, b in zip(got, fresh):
        assert torch.equal(a, b.half().float())


def test_a_truncated_file_rebuilds_the_entry(cases, capsys):
    (case,) = cases
    with single_thread():
        model = _frozen()
        FeatureCache(model, cases).levels(case.id, 0)
        (folder,) = _folders(case)
        level = folder / "level0.npy"
        level.write_bytes(level.read_bytes()[: level.stat().st_size // 2])
        cache = FeatureCache(model, cases)
        got = cache.levels(case.id, 0)
        fresh = _fresh(model, case, 0)
    assert "unreadable" in capsys.readouterr().err and cache.computed == 1
    for a, b in zip(got, fresh):
        assert torch.equal(a, b.half().float())


def test_training_on_cached_features_gives_the_same_loss_curve(train_data, tmp_path, one_thread,  # noqa: F811
                                                               monkeypatch):
    monkeypatch.setattr(FC, "DEFAULT_DTYPE", "fp32")
    real_step = T.train_step
    curves: dict[str, list[float]] = {}

    def recording(name):
        def step(run, task):
            terms = real_step(run, task)
            curves.setdefault(name, []).append(terms["loss"])
            return terms
        return step

    for mode in ("off", "auto"):
        monkeypatch.setattr(T, "train_step", recording(mode))
        argv = train_argv(train_data, tmp_path, mode, "-epochs", "2", "-freeze", "image_encoder",
                          "-feature_cache", mode)
        T.train(parse_train_args(argv))
    assert len(curves["off"]) == len(curves["auto"]) == 4
    assert np.allclose(curves["off"], curves["auto"], rtol=1e-5, atol=1e-6), curves
    assert list(Path(train_data["cache"]).rglob("features/*/meta.json")), "the cache was built"
