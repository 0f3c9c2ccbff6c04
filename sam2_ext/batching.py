"""Memory attention for several objects in one call, each object reading only its own memory bank.

Why: sam2 1.1 tracks every object with batch size 1 (one memory-attention, mask-decoder and memory-encoder call per
object per frame), so ten classes cost ten times the per-object work. The image features are the same for every
object; only the memories differ, and in length too (an object prompted on more slices has more conditioning
memories). Here each object's memory is gathered by SAM2's own code, the memories are padded to one length and a
key mask keeps every object from attending to padding, so one batched call gives each object what its own call
would (equal up to float rounding; tested against the official predictor).

The mask needs a hook inside the cross-attention: :class:`KeyMaskedRoPEAttention` is sam2's ``RoPEAttention``
plus an optional key mask. Without a mask it *is* sam2's forward; the masked branch has to repeat that forward's few
steps (projections, rotary encoding, attention) because sam2's attention call takes no mask argument.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from sam2.modeling.position_encoding import apply_rotary_enc
from sam2.modeling.sam.transformer import RoPEAttention


class KeyMaskedRoPEAttention(RoPEAttention):
    """sam2's RoPE attention; while ``key_mask`` ([B, Nk] bool, True = attend) is set, padded keys are ignored."""

    key_mask: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_k_exclude_rope: int = 0) -> torch.Tensor:
        if self.key_mask is None:
            return super().forward(q, k, v, num_k_exclude_rope)
        q = self._separate_heads(self.q_proj(q), self.num_heads)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        if self.freqs_cis.shape[0] != q.shape[-2] or self.freqs_cis.device != q.device:
            side = math.sqrt(q.shape[-2])
            self.freqs_cis = self.compute_cis(end_x=side, end_y=side).to(q.device)
        n_rope = k.shape[-2] - num_k_exclude_rope
        q, k_rope = apply_rotary_enc(q, k[:, :, :n_rope], freqs_cis=self.freqs_cis, repeat_freqs_k=self.rope_k_repeat)
        k = torch.cat([k_rope, k[:, :, n_rope:]], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.key_mask[:, None, None, :],
                                             dropout_p=self.dropout_p if self.training else 0.0)
        return self.out_proj(self._recombine_heads(out))


def enable_key_masks(memory_attention: torch.nn.Module) -> bool:
    """Give every RoPE cross-attention of ``memory_attention`` the key-mask hook (same weights, same results).

    Returns whether every layer can now be masked; a model with other attention types is run one object at a time
    whenever its objects' memories differ in length.
    """
    layers = getattr(memory_attention, "layers", [])
    for layer in layers:
        attn = layer.cross_attn_image
        if type(attn) is RoPEAttention:
            attn.__class__ = KeyMaskedRoPEAttention  # a subclass adding a class-level default: state is unchanged
    return bool(layers) and all(isinstance(layer.cross_attn_image, KeyMaskedRoPEAttention) for layer in layers)


@contextlib.contextmanager
def key_mask_on(memory_attention: torch.nn.Module, mask: torch.Tensor | None) -> Iterator[None]:
    """Set the key mask of every cross-attention layer for the duration of one call."""
    layers = [layer.cross_attn_image for layer in memory_attention.layers] if mask is not None else []
    for attn in layers:
        attn.key_mask = mask
    try:
        yield
    finally:
        for attn in layers:
            del attn.key_mask  # back to the class default (None)


@contextlib.contextmanager
def capture_memory_inputs(memory_attention: torch.nn.Module) -> Iterator[list[tuple]]:
    """Make ``memory_attention`` record ``(memory, memory_pos, num_obj_ptr_tokens)`` instead of running.

    SAM2's ``_prepare_memory_conditioned_features`` gathers one object's memories (conditioning frames, recent
    frames, object pointers with their temporal encodings) and then calls memory attention; recording that call
    reuses the gathering as it is. The recorder returns the current features unchanged, so SAM2's reshape works.
    """
    captured: list[tuple] = []

    def record(curr, memory, curr_pos=None, memory_pos=None, num_obj_ptr_tokens=0):
        captured.append((memory, memory_pos, num_obj_ptr_tokens))
        return curr[0] if isinstance(curr, list) else curr

    memory_attention.forward = record  # an instance attribute shadows the class's forward for this call only
    try:
        yield captured
    finally:
        del memory_attention.forward


def pad_memories(captured: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
    """Stack per-object memories ``[L_i, 1, D]`` into ``[L, B, D]`` with a key mask (None when no padding).

    Layout per object: its spatial memory tokens first (whole frames, where the rotary encoding repeats every
    H*W tokens), padding, then its object-pointer tokens, padding. Every object's pointers then sit in the last
    ``P`` positions, which is where SAM2's attention leaves out the rotary encoding (``num_k_exclude_rope``).
    """
    spatial = [m.shape[0] - n for m, _, n in captured]
    pointers = [n for _, _, n in captured]
    s_max, p_max = max(spatial), max(pointers)
    if all(s == s_max for s in spatial) and all(p == p_max for p in pointers):
        memory = torch.cat([m for m, _, _ in captured], dim=1)
        pos = torch.cat([p for _, p, _ in captured], dim=1)
        return memory, pos, p_max, None
    first = captured[0][0]
    batch, dim = len(captured), first.shape[-1]
    memory = first.new_zeros(s_max + p_max, batch, dim)
    pos = first.new_zeros(s_max + p_max, batch, dim)
    mask = torch.zeros(batch, s_max + p_max, dtype=torch.bool, device=first.device)
    for b, ((m, p, n), s) in enumerate(zip(captured, spatial)):
        memory[:s, b], pos[:s, b] = m[:s, 0], p[:s, 0]
        memory[s_max:s_max + n, b], pos[s_max:s_max + n, b] = m[s:, 0], p[s:, 0]
        mask[b, :s] = True
        mask[b, s_max:s_max + n] = True
    return memory, pos, p_max, mask
