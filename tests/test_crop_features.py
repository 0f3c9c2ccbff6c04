"""Stored encoder outputs of real-volume crops (-feature_cache auto with real_* levels): computed once then read,
never handed back for other pixels, and standing in for the encoder under grad (training) as without it."""
from __future__ import annotations

import numpy as np
import torch

from engine_fixtures import make_tiny_predictor, single_thread
from icl.engine.feature_cache import CropFeatures, FeatureCache, frame_sum
from sam2_ext.predictor import prepare_frames
from sam2_ext.track import track


def _frozen(seed: int = 0):
    model = make_tiny_predictor(seed)
    model.image_encoder.requires_grad_(False)
    return model


def _fresh(model, frame: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.encode_levels(prepare_frames(frame[None], model.image_size))


def test_a_crop_slice_is_encoded_once_then_read_and_other_pixels_are_recomputed(tmp_path, capsys):
    model = _frozen()
    frames = torch.rand(3, 128, 128)
    sources = [("real:abc:0:2:0-64-0-64", z) for z in (5, 6, 7)]
    with single_thread():
        cache = CropFeatures(model, tmp_path)
        source = cache.source(sources, frames)
        first = [source(f) for f in range(3)]
        assert (cache.computed, cache.read) == (3, 0)
        again = CropFeatures(model, tmp_path).source(sources, frames)  # a new process: read from disk
        second = [again(f) for f in range(3)]
        fresh = _fresh(model, frames[1])
    assert all(torch.equal(a, b) for x, y in zip(first, second) for a, b in zip(x, y))
    assert all((a - b).abs().max() <= 2e-3 * max(1.0, float(b.abs().max())) for a, b in zip(first[1], fresh)), \
        "stored to fp16 rounding"
    changed = frames.clone()
    changed[0] += 0.1
    with single_thread():
        cache = CropFeatures(model, tmp_path)
        cache.source(sources, changed)(0)
    assert (cache.computed, cache.read, cache.mismatched) == (1, 0, 1)
    assert "other pixels" in capsys.readouterr().err
    assert frame_sum(changed[0]) != frame_sum(frames[0])


def test_other_encoder_weights_invalidate_the_crops(tmp_path):
    frames = torch.rand(1, 128, 128)
    sources = [("real:abc:0:1:0-32-0-32", 3)]
    with single_thread():
        CropFeatures(_frozen(0), tmp_path).source(sources, frames)(0)
        other = CropFeatures(_frozen(1), tmp_path)
        other.source(sources, frames)(0)
    assert (other.computed, other.read) == (1, 0)
    assert len(list(tmp_path.iterdir())) == 1, "the other encoder's folder was deleted"


def test_under_grad_stored_crops_replace_the_encoder_exactly(tmp_path):
    """Training runs the model in grad mode: the stored outputs (fp32 here) must stand in for the encoder there too,
    with the same logits and gradients as running it."""
    model = _frozen()
    torch.manual_seed(0)
    frames = torch.rand(5, 128, 128)
    mask = torch.zeros(128, 128)
    mask[40:80, 30:70] = 1
    prompts = {0: {0: mask, 4: mask}}
    sources = [("real:k:0:0:0-128-0-128", z) for z in range(5)]
    with single_thread():
        cache = FeatureCache(model, [], dtype="fp32", crops=CropFeatures(model, tmp_path, dtype="fp32"))
        cache.source(sources, frames)  # nothing computed until asked
        for f in range(5):
            cache.source(sources, frames)(f)
        calls = []
        hook = model.image_encoder.register_forward_hook(lambda *a: calls.append(1))

        def run(features):
            model.zero_grad(set_to_none=True)
            out = torch.stack([r.logits for r in track(model, frames, prompts, "both", grad=True, features=features)])
            out.float().mean().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            return out.detach(), grads

        plain, plain_grads = run(None)
        ran = len(calls)
        stored, stored_grads = run(cache.source(sources, frames))
        hook.remove()
    assert ran == 5 and len(calls) == 5, "with the store the encoder never ran under grad"
    assert (plain - stored).abs().max() <= 1e-5
    assert plain_grads.keys() == stored_grads.keys() and all(
        torch.allclose(plain_grads[n], stored_grads[n], atol=1e-5) for n in plain_grads)
    assert np.isfinite(float(stored.sum()))


def test_crops_stored_by_an_older_format_are_deleted_not_read(tmp_path):
    """Stores of icl-features-v1 (named without the format) may hold TinyViT features normalised by training
    batches' statistics: a new cache deletes them."""
    model = _frozen()
    old = tmp_path / "abcdef123456_128_float16"
    (old / "x").mkdir(parents=True)
    with single_thread():
        cache = CropFeatures(model, tmp_path)
    assert not old.exists() and cache.root.name.startswith("icl-features-v2_")
