"""Memory pooled 2 x 2 (cfg/medsam_lite_pool2.yaml, sam2_ext/pooled_memory.py): sam2's modules at pool 1, coarse keys
at their cells' centres, 4x fewer memory tokens, the same weights as medsam_lite, objects batched as run alone."""
from __future__ import annotations

import pytest
import torch
from sam2.modeling.position_encoding import PositionEmbeddingSine, compute_axial_cis
from sam2.modeling.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
from sam2.modeling.sam.transformer import RoPEAttention

from sam2_ext.build import build_icl_predictor, config_lineage
from sam2_ext.pooled_memory import PooledKeyRoPEAttention, PooledMemoryEncoder, grid_cis
from sam2_ext.track import track


def _encoder(cls, **kw):
    torch.manual_seed(0)
    return cls(out_dim=16, in_dim=32, mask_downsampler=MaskDownSampler(embed_dim=32, total_stride=4),
               fuser=Fuser(CXBlock(dim=32, kernel_size=7, padding=3), num_layers=1),
               position_encoding=PositionEmbeddingSine(num_pos_feats=16), **kw).eval()


def test_pool_one_is_sam2_and_pool_two_halves_the_grid():
    pix, mask = torch.randn(2, 32, 8, 8), torch.randn(2, 1, 32, 32)
    plain, same = _encoder(MemoryEncoder), _encoder(PooledMemoryEncoder, pool=1)
    same.load_state_dict(plain.state_dict())
    with torch.no_grad():
        a, b = plain(pix, mask), same(pix, mask)
        pooled = _encoder(PooledMemoryEncoder, pool=2)
        pooled.load_state_dict(plain.state_dict())
        c = pooled(pix, mask)
    assert torch.equal(a["vision_features"], b["vision_features"])
    assert c["vision_features"].shape == (2, 16, 4, 4) and c["vision_pos_enc"][0].shape == (2, 16, 4, 4)
    assert torch.allclose(grid_cis(32, 6, 10000.0), compute_axial_cis(32, 6, 6, 10000.0))

    torch.manual_seed(1)
    rope = RoPEAttention(32, 1, rope_k_repeat=True, feat_sizes=(4, 4), kv_in_dim=16).eval()
    mine = PooledKeyRoPEAttention(32, 1, rope_k_repeat=True, feat_sizes=(4, 4), kv_in_dim=16, key_pool=1).eval()
    mine.load_state_dict(rope.state_dict())
    q, k = torch.randn(2, 16, 32), torch.randn(2, 3 * 16 + 4, 16)
    with torch.no_grad():
        assert torch.allclose(rope(q, k.clone(), k.clone(), 4), mine(q, k.clone(), k.clone(), 4), atol=1e-6)


def test_coarse_keys_sit_at_the_centre_of_the_cells_they_average():
    """q.k as the rotary kernel alone (q/k weights 0, biases equal): every fine query attends most to the coarse key
    of its own 2 x 2 cell."""
    attn = PooledKeyRoPEAttention(64, 1, rope_k_repeat=True, feat_sizes=(8, 8), kv_in_dim=64, key_pool=2).eval()
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj):
            proj.weight.zero_()
            proj.bias.fill_(3.0)
    fine, coarse = 8, 4
    q_cis, k_cis = attn._factors(fine * fine, torch.device("cpu"))
    q = torch.ones(1, 1, fine * fine, 64) * 3.0
    from sam2_ext.pooled_memory import rotate
    scores = rotate(q, q_cis) @ rotate(torch.ones(1, 1, coarse * coarse, 64) * 3.0, k_cis).transpose(-1, -2)
    best = scores[0, 0].argmax(-1)
    for t in range(fine * fine):
        y, x = divmod(t, fine)
        assert int(best[t]) == (y // 2) * coarse + x // 2, f"query {(y, x)} reads key {divmod(int(best[t]), coarse)}"


@pytest.fixture(scope="module")
def pooled_model():
    torch.manual_seed(0)
    return build_icl_predictor("medsam_lite_pool2", "cpu", None, 64).eval()


def test_the_pooled_config_fits_medsam_lite_weights_and_keeps_a_quarter_of_the_memory(pooled_model):
    plain = build_icl_predictor("medsam_lite", "cpu", None, 64)
    assert {k: v.shape for k, v in plain.state_dict().items()} == \
        {k: v.shape for k, v in pooled_model.state_dict().items()}, "no new parameter: the same weights load"
    assert config_lineage("medsam_lite_pool2") == ["medsam_lite_pool2", "medsam_lite"]
    frames = torch.rand(5, 64, 64)
    mask = torch.zeros(64, 64)
    mask[20:40, 16:36] = 1
    seen = []
    hook = pooled_model.memory_attention.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(kwargs["memory"].shape[0] - kwargs["num_obj_ptr_tokens"]),
        with_kwargs=True)
    with torch.no_grad():
        list(track(pooled_model, frames, {0: {0: mask}}, "forward"))
    hook.remove()
    per_frame = (64 // 4 // 2) ** 2  # LiteMedSAM's stride-4 grid, pooled 2 x 2
    assert seen and all(n % per_frame == 0 for n in seen) and seen[-1] == 4 * per_frame


def test_batched_objects_equal_each_object_alone_and_train(pooled_model):
    """Two objects with memories of different lengths (key-masked) give what each gives alone, and under grad
    the memory modules get gradients."""
    torch.manual_seed(3)
    frames = torch.rand(6, 64, 64)
    a, b = torch.zeros(64, 64), torch.zeros(64, 64)
    a[10:30, 10:30] = 1
    b[30:50, 28:52] = 1
    prompts = {0: {0: a}, 1: {0: b, 2: b}}
    with torch.no_grad():
        both = torch.stack([r.logits for r in track(pooled_model, frames, prompts, "forward")])
        alone = [torch.stack([r.logits for r in track(pooled_model, frames, {0: p}, "forward")])
                 for p in prompts.values()]
    assert (both[:, 0] - alone[0][:, 0]).abs().max() <= 1e-4
    assert (both[:, 1] - alone[1][:, 0]).abs().max() <= 1e-4
    pooled_model.train()
    try:
        out = list(track(pooled_model, frames, prompts, "both", grad=True))
        sum(r.logits.float().mean() for r in out).backward()
    finally:
        pooled_model.eval()
    grads = [p.grad for n, p in pooled_model.named_parameters() if n.startswith(("memory_attention", "memory_encoder"))]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    pooled_model.zero_grad(set_to_none=True)
