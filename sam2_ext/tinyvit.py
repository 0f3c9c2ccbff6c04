"""TinyViT as SAM2's image encoder, in LiteMedSAM's configuration and with its parameter names.

Why here: LiteMedSAM (MedSAM distilled into a 5.7 M-parameter TinyViT, trained on medical image–mask pairs) gives
the engine an encoder that has seen real scans. Written from the TinyViT paper (Wu et al., ECCV 2022): a stem, one
stage of MBConv blocks, then stages of windowed self-attention blocks with a depthwise "local" convolution between
attention and MLP, joined by convolutional patch merging; a SAM-style neck maps the last stage to 256 channels.

LiteMedSAM's choices, read off its weights (every key and shape below matches ``image_encoder.*`` of its
checkpoint, so it loads with strict key matching):

* the stem is two 1x1 convolutions (stride 1), so the MBConv stage runs at the input's resolution;
* patch merging halves the resolution twice and keeps it into the last stage: total stride 4 (256 px -> 64 x 64);
* the attention bias of a window is one learned value per head and absolute offset (|dy|, |dx|).

What SAM2 reads from an image encoder (``SAM2Base.forward_image``, ``neck.d_model``, ``neck.position_encoding``)
is presented by :class:`TinyViT`: one feature level (the decoder's high-resolution inputs are off, as in LiteMedSAM).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ConvBN(nn.Sequential):
    """A bias-free convolution then batch norm (keys ``c`` and ``bn``)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 bn_weight: float = 1.0):
        super().__init__()
        self.c = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        nn.init.constant_(self.bn.weight, bn_weight)
        nn.init.zeros_(self.bn.bias)


class LayerNorm2d(nn.Module):
    """Layer norm over the channels of an NCHW map (SAM's neck normalises per pixel, not per map)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class Stem(nn.Module):
    """3 -> C0 channels with two pointwise ConvBN (LiteMedSAM keeps full resolution here)."""

    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.seq = nn.Sequential(ConvBN(cin, dim // 2), nn.GELU(), ConvBN(dim // 2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: expand 1x1, depthwise 3x3, project 1x1 (its BN starts at zero: the block starts as
    identity), GELU after the sum."""

    def __init__(self, dim: int, expand: float):
        super().__init__()
        hidden = int(dim * expand)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim, bn_weight=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """Between stages: 1x1 to the next width, depthwise 3x3 with ``stride``, 1x1."""

    def __init__(self, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


class WindowAttention(nn.Module):
    """Pre-norm multi-head self-attention inside one window, with a learned bias per head and absolute offset.

    The name ends in ``Attention`` and its projections are direct ``nn.Linear`` children (``qkv``, ``proj``): what
    the LoRA target rule looks for.
    """

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)  # per head: q, k, v side by side
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(heads, window * window))
        ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        offset = (ys[:, None] - ys[None]).abs() * window + (xs[:, None] - xs[None]).abs()
        self.register_buffer("bias_index", offset, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[windows, tokens, C] -> the same."""
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.heads, 3 * self.head_dim).permute(0, 2, 1, 3)
        q, k, v = qkv.chunk(3, dim=-1)
        logits = (q @ k.transpose(-2, -1)) * self.scale + self.attention_biases[:, self.bias_index]
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class Mlp(nn.Module):
    """Pre-norm two-layer GELU MLP."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """x + window attention, depthwise local conv, x + MLP; on NHWC maps.

    A map that the windows do not tile is zero-padded at the bottom and right and the padded tokens take part in
    attention unmasked: what the weights were trained with."""

    def __init__(self, dim: int, heads: int, window: int, mlp_ratio: float, local_conv: int):
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, heads, window)
        self.local_conv = ConvBN(dim, dim, local_conv, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        s = self.window
        pad_h, pad_w = -h % s, -w % s
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        nh, nw = (h + pad_h) // s, (w + pad_w) // s
        x = x.view(b, nh, s, nw, s, c).transpose(2, 3).reshape(b * nh * nw, s * s, c)
        x = self.attn(x)
        x = x.view(b, nh, nw, s, s, c).transpose(2, 3).reshape(b, nh * s, nw * s, c)
        return x[:, :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attend(x)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class ConvStage(nn.Module):
    """Stage 0: MBConv blocks (at full resolution convolutions are far cheaper than attention), then merging."""

    def __init__(self, dim: int, depth: int, out_dim: int, expand: float, stride: int):
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, stride)


class AttnStage(nn.Module):
    """Stages 1..: TinyViT blocks, then merging into the next stage (none after the last)."""

    def __init__(self, dim: int, depth: int, heads: int, window: int, mlp_ratio: float, local_conv: int,
                 out_dim: int | None, stride: int):
        super().__init__()
        self.blocks = nn.ModuleList(TinyViTBlock(dim, heads, window, mlp_ratio, local_conv) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, stride) if out_dim else None


class Neck(nn.Module):
    """SAM's neck (1x1 conv, LN, 3x3 conv, LN; keys ``0``..``3``), carrying what SAM2 reads off a neck:
    ``d_model`` (its width) and ``position_encoding`` (SAM2's sine encoding, no weights)."""

    def __init__(self, in_dim: int, d_model: int, position_encoding: nn.Module | None):
        super().__init__()
        self.d_model = d_model
        layers = (nn.Conv2d(in_dim, d_model, 1, bias=False), LayerNorm2d(d_model),
                  nn.Conv2d(d_model, d_model, 3, padding=1, bias=False), LayerNorm2d(d_model))
        for i, layer in enumerate(layers):
            self.add_module(str(i), layer)
        self.position_encoding = position_encoding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(4):
            x = self._modules[str(i)](x)
        return x


class TinyViT(nn.Module):
    """TinyViT image encoder for a SAM2 model; defaults are LiteMedSAM's (9.8 M parameters with SAM's heads).

    ``forward(images [B, 3, S, S])`` returns what SAM2's ``ImageEncoder`` returns: ``vision_features``,
    ``vision_pos_enc`` and ``backbone_fpn`` (one level: the [B, 256, S/4, S/4] embedding).
    """

    #: total stride of the encoder (its embedding is image_size / 4): the model config's ``backbone_stride``
    stride = 4

    def __init__(self, position_encoding: nn.Module | None = None, in_chans: int = 3,
                 embed_dims: Sequence[int] = (64, 128, 160, 320), depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (2, 4, 5, 10), window_sizes: Sequence[int] = (7, 7, 14, 7),
                 mlp_ratio: float = 4.0, mbconv_expand_ratio: float = 4.0, local_conv_size: int = 3,
                 out_chans: int = 256):
        super().__init__()
        dims = list(embed_dims)
        self.patch_embed = Stem(in_chans, dims[0])
        stages: list[nn.Module] = [ConvStage(dims[0], depths[0], dims[1], mbconv_expand_ratio, stride=2)]
        for i in range(1, len(dims)):
            last = i == len(dims) - 1
            # merging halves the resolution into every stage but the last (LiteMedSAM: total stride 4)
            stages.append(AttnStage(dims[i], depths[i], num_heads[i], window_sizes[i], mlp_ratio, local_conv_size,
                                    None if last else dims[i + 1], stride=1 if i == len(dims) - 2 else 2))
        self.layers = nn.ModuleList(stages)
        self.neck = Neck(dims[-1], out_chans, position_encoding)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] -> the embedding [B, 256, S/4, S/4] (what LiteMedSAM's encoder returns)."""
        x = self.patch_embed(x)
        conv_stage, *attn_stages = self.layers
        for block in conv_stage.blocks:
            x = block(x)
        x = conv_stage.downsample(x).permute(0, 2, 3, 1)  # attention stages work on NHWC
        for stage in attn_stages:
            for block in stage.blocks:
                x = block(x)
            if stage.downsample is not None:
                x = stage.downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.neck(x.permute(0, 3, 1, 2))

    def forward(self, x: torch.Tensor) -> dict:
        features = self.embed(x)
        pos = self.neck.position_encoding(features).to(features.dtype)
        return {"vision_features": features, "vision_pos_enc": [pos], "backbone_fpn": [features]}
