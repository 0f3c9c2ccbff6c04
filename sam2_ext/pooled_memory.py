"""Memory pooled ``p x p`` (EfficientTAM's lever): each memory frame holds ``(H/p) x (W/p)`` tokens, not ``H x W``.

Why: memory attention's cross-attention costs (query tokens) x (memory frames x tokens per frame); on LiteMedSAM's
stride-4 embedding that is 32 x 32 queries against 7 x 32 x 32 keys at 128 px, most of a training step on a CPU.
Memory is local and smooth (a frame's mask and features change little within a few cells), so averaging it over
``p x p`` cells loses little and divides the keys, and the memory encoder's fuser work, by ``p^2``. Queries keep the
full grid, so the mask decoder sees features at its own resolution.

Two parts, chosen by the model config (``cfg/medsam_lite_pool2.yaml``):

* :class:`PooledMemoryEncoder`: SAM2's memory encoder with the fused input (image features + downsampled mask)
  average-pooled ``pool x pool`` before the fuser; its position encoding is the coarse grid's own;
* :class:`PooledKeyRoPEAttention`: the cross-attention's rotary encoding of memory keys on that coarse grid, each
  coarse token at the centre of the fine cells it averages (``p * i + (p - 1) / 2``), so a query still reads the
  memory at its own place. Key masks (several objects batched, ``sam2_ext.batching``) work as before.

With ``pool = 1`` both are exactly sam2's modules.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from sam2.modeling.memory_encoder import MemoryEncoder

from sam2_ext.batching import KeyMaskedRoPEAttention


class PooledMemoryEncoder(MemoryEncoder):
    """SAM2's memory encoder, its fused features pooled ``pool x pool`` before the fuser (module docstring)."""

    def __init__(self, *args, pool: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        if int(pool) < 1:
            raise ValueError(f"pool must be >= 1, got {pool}")
        self.pool = int(pool)

    def forward(self, pix_feat: torch.Tensor, masks: torch.Tensor, skip_mask_sigmoid: bool = False) -> dict:
        if self.pool == 1:
            return super().forward(pix_feat, masks, skip_mask_sigmoid)
        if not skip_mask_sigmoid:
            masks = F.sigmoid(masks)
        masks = self.mask_downsampler(masks)
        x = self.pix_feat_proj(pix_feat.to(masks.device)) + masks
        x = F.avg_pool2d(x, self.pool, ceil_mode=True)
        x = self.out_proj(self.fuser(x))
        return {"vision_features": x, "vision_pos_enc": [self.position_encoding(x).to(x.dtype)]}


def axial_cis(dim: int, xs: torch.Tensor, ys: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary factors [N, dim / 2] (complex) of tokens at (possibly fractional) grid positions ``xs``, ``ys``:
    sam2's axial rotary encoding (``compute_axial_cis``) at arbitrary positions."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 4)[: dim // 4].float() / dim))
    angles = torch.cat([torch.outer(xs.float(), freqs), torch.outer(ys.float(), freqs)], dim=-1)
    return torch.polar(torch.ones_like(angles), angles)


def grid_cis(dim: int, side: int, theta: float, step: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    """:func:`axial_cis` of a ``side x side`` grid, row-major, token ``(y, x)`` at ``(step * x + offset,
    step * y + offset)`` (sam2's order: x varies fastest)."""
    t = torch.arange(side * side, dtype=torch.float32)
    return axial_cis(dim, step * (t % side) + offset, step * torch.div(t, side, rounding_mode="floor") + offset,
                     theta)


def rotate(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """``x`` [B, heads, N, D] rotated by ``cis`` [N, D / 2] (the rotary encoding), in ``x``'s dtype."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * cis).flatten(3).type_as(x)


class PooledKeyRoPEAttention(KeyMaskedRoPEAttention):
    """Memory cross-attention whose spatial keys lie on the ``key_pool``-coarser grid (module docstring)."""

    def __init__(self, *args, key_pool: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        if int(key_pool) < 1:
            raise ValueError(f"key_pool must be >= 1, got {key_pool}")
        self.key_pool = int(key_pool)
        self.rope_theta = float(kwargs.get("rope_theta", 10000.0))
        self._cis: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def _factors(self, queries: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(query factors on the fine grid, key factors on the coarse grid) for ``queries`` query tokens."""
        key = (queries, str(device))
        if key not in self._cis:
            side = math.isqrt(queries)
            coarse = -(-side // self.key_pool)
            dim = self.internal_dim // self.num_heads
            fine = grid_cis(dim, side, self.rope_theta)
            keys = grid_cis(dim, coarse, self.rope_theta, self.key_pool, (self.key_pool - 1) / 2)
            self._cis[key] = (fine.to(device), keys.to(device))
        return self._cis[key]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_k_exclude_rope: int = 0) -> torch.Tensor:
        if self.key_pool == 1:
            return super().forward(q, k, v, num_k_exclude_rope)
        q = self._separate_heads(self.q_proj(q), self.num_heads)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        q_cis, k_cis = self._factors(q.shape[-2], q.device)
        n_rope = k.shape[-2] - num_k_exclude_rope
        if n_rope % len(k_cis):
            raise ValueError(f"{n_rope} spatial memory tokens are not whole frames of {len(k_cis)} pooled tokens")
        q = rotate(q, q_cis)
        k_rope = rotate(k[:, :, :n_rope], k_cis.repeat(n_rope // len(k_cis), 1))
        k = torch.cat([k_rope, k[:, :, n_rope:]], dim=2)
        mask = None if self.key_mask is None else self.key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout_p if self.training else 0.0)
        return self.out_proj(self._recombine_heads(out))
