"""model.py: LILA's pixel decoder on a frozen DINOv2 / DINOv3 encoder (paper: "Encoder", "Decoder").

What the paper adds is the decoder: a light DPT head (the official SmallDPTHead + LILA.fnorm,
google-research lila/lila/dpt_lila.py) turns four tapped patch grids of a frozen ViT (DINOv2
S/B/L/g/14, with or without registers, or DINOv3 S/S+/B/L/H+/16) into one D-dimensional,
per-pixel LayerNormed feature for every image pixel. Only the decoder trains. Read top to
bottom: the decoder, the encoder (DINOv2 and DINOv3 as released), LILA (the two together), then
the plumbing (checks, image inputs, building, loading the encoder weights).

Shape legend: B batch, p patch side (14 DINOv2, 16 DINOv3), H x W image (sides multiples of p),
h x w = H/p x W/p patch grid, T = 1 + R + h*w tokens (class token first, then R = 0 or 4
registers / storage tokens), E encoder width (384 S, 768 B, 1024 L, 1280 H+, 1536 g),
d = E / heads, F decoder fusion width, D pixel-feature dim (F/2 in the paper).

Images come in [0, 1] and are ImageNet-normalised inside LILA (the official LILA takes them
normalised). The encoder's parameter names and shapes equal the official hub files, so
`dinov2_vits14_pretrain.pth`, `dinov2_vits14_reg4_pretrain.pth` or
`dinov3_vits16_pretrain_lvd1689m-08c60483.pth` load with strict=True; the decoder computes the
official head op for op under our names (official LILA checkpoints load through hubconf.py).
Deviations from the official code: README's Differences.

Run:  python -m pytest -q tests/test_model.py tests/test_backbones.py;  timings: python bench.py model
Use:  import model; net = model.build_lila("dinov2_vits14", weights="hub", preset="paper")
      enc = model.load_encoder("dinov3_vits16", weights="/path/dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
"""
import hashlib
import math
import os
import sys
from collections import namedtuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ImageNet statistics used by DINOv2 and DINOv3 (their hub transforms for the LVD-trained
# weights); applied inside LILA only.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> the frozen encoder. embed_dim (E), depth, heads: the official vit_small / base / large /
# giant2 and DINOv3's S+ / H+ (facebookresearch/dinov2 and dinov3, models/vision_transformer.py
# and hub/backbones.py). taps: the 0-based blocks the decoder reads (official lila/lila/config.py
# intermediate_layer_idx, DPT's choice, for every DINOv2; DINOv3 has no official LILA setting, so
# it takes the DINOv2 taps of its depth, and H+ (depth 32) the last block of each quarter, as ViT-g
# does). patch: image pixels per token side. family: dinov2 (learned positions) | dinov3 (RoPE).
# tokens: tokens after the class token, never in the patch grid (DINOv2-reg's 4 "registers",
# DINOv3's 4 "storage tokens"). ffn, ffn_ratio: the feed-forward block, its hidden width / E
# (mlp: GELU MLP; swiglufused: DINOv2 ViT-g's SwiGLU, w1 and w2 packed as `w12`; swiglu: DINOv3's
# SwiGLU, w1 and w2 apart). file: the official weights file.
Backbone = namedtuple("Backbone", "embed_dim depth heads taps patch family tokens ffn ffn_ratio file")
TAPS_12, TAPS_24 = (2, 5, 8, 11), (4, 11, 17, 23)
BACKBONES = {
    "dinov2_vits14": Backbone(384, 12, 6, TAPS_12, 14, "dinov2", 0, "mlp", 4, "dinov2_vits14_pretrain.pth"),
    "dinov2_vitb14": Backbone(768, 12, 12, TAPS_12, 14, "dinov2", 0, "mlp", 4, "dinov2_vitb14_pretrain.pth"),
    "dinov2_vitl14": Backbone(1024, 24, 16, TAPS_24, 14, "dinov2", 0, "mlp", 4, "dinov2_vitl14_pretrain.pth"),
    "dinov2_vitg14": Backbone(1536, 40, 24, (9, 19, 29, 39), 14, "dinov2", 0, "swiglufused", 4,
                              "dinov2_vitg14_pretrain.pth"),
    "dinov2_vits14_reg": Backbone(384, 12, 6, TAPS_12, 14, "dinov2", 4, "mlp", 4, "dinov2_vits14_reg4_pretrain.pth"),
    "dinov2_vitb14_reg": Backbone(768, 12, 12, TAPS_12, 14, "dinov2", 4, "mlp", 4, "dinov2_vitb14_reg4_pretrain.pth"),
    "dinov2_vitl14_reg": Backbone(1024, 24, 16, TAPS_24, 14, "dinov2", 4, "mlp", 4, "dinov2_vitl14_reg4_pretrain.pth"),
    "dinov2_vitg14_reg": Backbone(1536, 40, 24, (9, 19, 29, 39), 14, "dinov2", 4, "swiglufused", 4,
                                  "dinov2_vitg14_reg4_pretrain.pth"),
    "dinov3_vits16": Backbone(384, 12, 6, TAPS_12, 16, "dinov3", 4, "mlp", 4,
                              "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"),
    "dinov3_vits16plus": Backbone(384, 12, 6, TAPS_12, 16, "dinov3", 4, "swiglu", 6,
                                  "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth"),
    "dinov3_vitb16": Backbone(768, 12, 12, TAPS_12, 16, "dinov3", 4, "mlp", 4,
                              "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth"),
    "dinov3_vitl16": Backbone(1024, 24, 16, TAPS_24, 16, "dinov3", 4, "mlp", 4,
                              "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"),
    "dinov3_vith16plus": Backbone(1280, 32, 20, (7, 15, 23, 31), 16, "dinov3", 4, "swiglu", 6,
                                  "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth"),
}
# dinov2/hub/utils.py (_DINOV2_BASE_URL) + hub/backbones.py: "/{dinov2_vits14}/{file}" (the folder
# drops "_reg4"). DINOv3's files sit behind a licence form: downloaded by hand, passed as a path.
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{folder}/{file}"
DINOV3_DOWNLOADS = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"

# Decoder sizes per encoder width E: F ("features") and the reassemble widths ("out_channels") of
# the official lila/lila/config.py (lila_config, keyed by vits / vitb / vitl / vitg, so the register
# models share their width's), D = F / 2 (official LILA.dec_dim = features // 2; paper: D = 128 for
# ViT-S). DINOv3 takes the DINOv2 setting of its width (no official LILA setting exists); H+
# (E = 1280, no DINOv2 that wide) takes ViT-L's. "tiny" is the same code at CPU size: F and D a
# quarter of the paper's, widths a third of the paper's for S and B and a quarter for L and g
# (whose official widths are already 5x and 32x S's), so each keeps the official pattern.
DECODERS = {
    "paper": {
        384: dict(features=256, out_dim=128, widths=(48, 96, 192, 384)),
        768: dict(features=384, out_dim=192, widths=(96, 192, 384, 768)),
        1024: dict(features=512, out_dim=256, widths=(256, 512, 1024, 1024)),
        1536: dict(features=768, out_dim=384, widths=(1536, 1536, 1536, 1536)),
    },
    "tiny": {
        384: dict(features=64, out_dim=32, widths=(16, 32, 64, 128)),
        768: dict(features=96, out_dim=48, widths=(32, 64, 128, 256)),
        1024: dict(features=128, out_dim=64, widths=(64, 128, 256, 256)),
        1536: dict(features=192, out_dim=96, widths=(384, 384, 384, 384)),
    },
}
DECODER_OF_WIDTH = {1280: 1024}  # H+ -> ViT-L's decoder
PRESETS = {preset: {name: by_width[DECODER_OF_WIDTH.get(b.embed_dim, b.embed_dim)]
                    for name, b in BACKBONES.items()} for preset, by_width in DECODERS.items()}
UNIT_TOL = 1 / 255        # one 8-bit level: what rounding or a resize may add to a [0, 1] image
MAX_PIXELS = 1920 * 1080  # LILA.features' default bound: a full-HD frame


# ------------------------------------------------------------------ decoder: the light DPT head
# A ViT sees the image only as 14 x 14 px patches, at one resolution. DPT (Ranftl et al., ICCV
# 2021) makes a pyramid out of it: it taps four blocks (shallow ones keep where things are,
# deep ones what they are), resamples them to 4x, 2x, 1x and 1/2x the patch grid, and fuses
# them deepest first, each fusion upsampling to the next finer level, as a CNN decoder does.
def conv3x3(c_in, c_out, stride=1, bias=True):
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class Reassemble(nn.Module):
    """One tapped grid (B, E, h, w) -> one pyramid level (B, F, h*factor, w*factor): 1x1 conv to
    `width`, resample by `factor` (4, 2: transposed conv k=s=factor; 1: identity; 0.5: 3x3 conv
    stride 2), 3x3 conv to F without bias (official projects[i], resize_layers[i], layer{i}_rn)."""

    def __init__(self, embed_dim, width, factor, features):
        super().__init__()
        self.project = nn.Conv2d(embed_dim, width, 1)
        if factor > 1:
            self.resample = nn.ConvTranspose2d(width, width, int(factor), stride=int(factor))
        elif factor == 1:
            self.resample = nn.Identity()
        elif factor == 0.5:
            self.resample = conv3x3(width, width, stride=2)
        else:
            raise ValueError(f"model.py: Reassemble: factor {factor} not in (4, 2, 1, 0.5)")
        self.to_features = conv3x3(width, features, bias=False)

    def forward(self, grid):
        return self.to_features(self.resample(self.project(grid)))  # (B, F, h*factor, w*factor)


class ResidualConvUnit(nn.Module):
    """RefineNet's residual unit: x + conv2(relu(conv1(relu(x)))), 3x3 convs, no batch norm."""

    def __init__(self, ch):
        super().__init__()
        self.conv1, self.conv2 = conv3x3(ch, ch), conv3x3(ch, ch)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))        # (B, F, h, w)


class FusionBlock(nn.Module):
    """y = conv1x1(resize(RCU(x + RCU_skip(skip)), size)): the coarser path x plus this level's
    grid, bilinearly resized to the next level's size. The deepest has no skip (nor its RCU)."""

    def __init__(self, ch, has_skip, align_corners):
        super().__init__()
        self.align_corners = align_corners
        self.skip_unit = ResidualConvUnit(ch) if has_skip else None
        self.unit = ResidualConvUnit(ch)
        self.out_conv = nn.Conv2d(ch, ch, 1)

    def forward(self, x, skip, size):
        if skip is not None:
            x = x + self.skip_unit(skip)                             # (B, F, h, w)
        x = F.interpolate(self.unit(x), size=size, mode="bilinear",
                          align_corners=self.align_corners)          # (B, F, *size)
        return self.out_conv(x)                                      # (B, F, *size)


class DPTDecoder(nn.Module):
    """Four (B, E, h, w) grids (shallow -> deep) -> (B, D, H, W) per-pixel LayerNormed features.

    reassemble (factors 4, 2, 1, 1/2) -> fuse deepest first, the last fusion x2
    (`last_upsample`) -> (B, F, 8h, 8w) -> head: 3x3 conv F -> F/2, bilinear resize to H x W,
    3x3 conv, ReLU, 1x1 conv to D -> LayerNorm over the D channels of every pixel.
    D = F/2 (official dec_dim = features // 2; paper D = 128 for ViT-S): the head halves F once
    and keeps that width; D also sizes the ridge fit, P = D + 1 unknowns per cue from N = 1024
    pooled samples (incontext.py). align_corners=True: every official resize of this head.
    ln_eps: torch's LayerNorm default, as the official nn.LayerNorm(dec_dim)."""

    def __init__(self, embed_dim, widths=(48, 96, 192, 384), features=256, out_dim=128,
                 factors=(4, 2, 1, 0.5), last_upsample=2, align_corners=True, ln_eps=1e-5):
        super().__init__()
        if len(widths) != len(factors):
            raise ValueError(f"model.py: DPTDecoder: {len(widths)} widths for {len(factors)} levels")
        hidden = features // 2  # official head_features_2 = features // 2
        self.out_dim, self.last_upsample = out_dim, last_upsample
        self.align_corners = align_corners
        self.reassemble = nn.ModuleList(
            Reassemble(embed_dim, wd, f, features) for wd, f in zip(widths, factors))
        self.fusion = nn.ModuleList(  # fusion[i] fuses level i; the deepest has no skip input
            FusionBlock(features, has_skip=i < len(widths) - 1, align_corners=align_corners)
            for i in range(len(widths)))
        self.head_conv1 = conv3x3(features, features // 2)
        self.head_conv2 = conv3x3(features // 2, hidden)
        self.head_out = nn.Conv2d(hidden, out_dim, 1)
        # Why a per-pixel LayerNorm last: the ridge map is fitted in closed form on these
        # features, W* = (X^T C X / N + lam I)^-1 X^T C Y / N, and scaling X by s acts as
        # lam / s^2; with every pixel's feature at zero mean and unit variance, lam means the
        # same at every pixel and step, and the decoder cannot loosen the fit by growing its
        # output. No affine weight: the official fnorm's never trains (only the head is optimised).
        self.norm = ChannelLayerNorm(out_dim, eps=ln_eps, elementwise_affine=False)

    def forward(self, grids, size):
        levels = self.reassembled(grids)                             # (B, F, 4h, 4w) ... (B, F, h/2, w/2)
        x = None
        for i in reversed(range(len(levels))):                       # deepest first
            if i > 0:
                out_size = levels[i - 1].shape[-2:]                  # next (shallower) level
            else:
                out_size = tuple(s * self.last_upsample for s in levels[0].shape[-2:])
            x = self.fusion[i](levels[i] if x is None else x, None if x is None else levels[i],
                               out_size)                             # (B, F, *out_size)
        y = self.head_conv1(x)                                       # (B, F/2, 8h, 8w)
        y = F.interpolate(y, size=tuple(size), mode="bilinear",
                          align_corners=self.align_corners)          # (B, F/2, H, W)
        y = self.head_out(F.relu(self.head_conv2(y)))                # (B, D, H, W)
        return self.norm(y)                                          # (B, D, H, W)

    def reassembled(self, grids):
        """The four pyramid levels of the tapped grids (also decoder_bands' first step)."""
        if len(grids) != len(self.reassemble):
            raise ValueError(f"model.py: DPTDecoder: got {len(grids)} grids, expected "
                             f"{len(self.reassemble)} (one per tapped block)")
        return [r(g) for r, g in zip(self.reassemble, grids)]        # (B, F, 4h, 4w) ... (B, F, h/2, w/2)


class ChannelLayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the D channels of every pixel of a (B, D, H, W) map: permuted to
    (B, H, W, D), normalised over the last dim, and permuted back (a view: the result is laid
    out channels last). Faster than a var_mean over dim 1 even with the permute's copy: torch's
    LayerNorm kernel wants the normalised dim last (on a CPU, one thread, (2, 128, 112, 112):
    5 ms against 19 ms). Parameters and eps as nn.LayerNorm's."""

    def forward(self, y):
        return super().forward(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, D, H, W)


# ------------------------------------------------------------------ encoder: DINOv2 / DINOv3 ViT, frozen, as released
# Both are pre-norm ViTs with LayerScale, under the official parameter names, so the released files
# load with strict=True. What differs, from the official hub builders (dinov2/hub/backbones.py,
# dinov3/hub/backbones.py) and layers:
#                  DINOv2                     DINOv2-reg                   DINOv3
#   positions      learned 37x37 table added  same table, resized without  RoPE: q and k of the patch
#                  to the tokens, bicubically  the 0.1 offset, antialiased  tokens rotated in every
#                  resized (offset 0.1)                                    attention (no table)
#   extra tokens   -                          4 registers after the class  4 storage tokens after it
#   LayerNorm eps  1e-6                       1e-6                         1e-5
#   qkv bias       q, k, v                    q, k, v                      q, v (k's third times 0)
#   feed-forward   GELU MLP (g: SwiGLU)       GELU MLP (g: SwiGLU)         GELU MLP (S+, H+: SwiGLU)
class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> E channels (a strided conv), flattened row-major."""

    def __init__(self, embed_dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, E)


class RopePositions(nn.Module):
    """DINOv3's 2-D rotary positions (official RopePositionEmbedding, eval mode) -> (sin, cos), each
    (h*w, d), d = E / heads. Patch (i, j) of an h x w grid sits at y = 2 (i + 0.5) / h - 1,
    x = 2 (j + 0.5) / w - 1: each axis normalised by its own side ("separate"), so a non-square
    grid spans [-1, 1] both ways. Angles: 2 pi y / period_k for d/4 channels, 2 pi x / period_k
    for the next d/4, period_k = base^(4k / d) (k < d/4, base 100), the d/2 angles used twice
    (rotate_half pairs channel c with c + d/2). The random shift / jitter / rescale of the
    coordinates (rescale 2 in the hub builders) act only in training: off here."""

    def __init__(self, head_dim, base=100.0):
        super().__init__()
        k = torch.arange(head_dim // 4, dtype=torch.float32)
        # A buffer stored in the official file (float32, pos_embed_rope_dtype="fp32" on the hub).
        self.register_buffer("periods", base ** (2 * k / (head_dim // 2)))  # (d/4,)

    def forward(self, h, w):
        dev = self.periods.device
        y = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h   # (h,) in (0, 1)
        x = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w   # (w,)
        coords = torch.stack(torch.meshgrid(y, x, indexing="ij"), -1)     # (h, w, 2)
        coords = 2.0 * coords.reshape(h * w, 2) - 1.0                     # (h*w, 2) in (-1, 1)
        angles = 2 * math.pi * coords[:, :, None] / self.periods          # (h*w, 2, d/4)
        angles = angles.flatten(1).repeat(1, 2)                           # (h*w, d): [y, x, y, x]
        return torch.sin(angles), torch.cos(angles)


def rope_rotate(t, sin, cos):
    """Rotate the last n = len(sin) tokens of t (B, heads, T, d) by their angles (official rope_apply:
    t cos + rotate_half(t) sin, rotate_half([a, b]) = [-b, a]); the first T - n (class and storage
    tokens) keep no position. In sin's dtype (float32), as the official apply_rope."""
    n, dtype = sin.shape[0], t.dtype
    head, t = t[:, :, :-n], t[:, :, -n:].to(sin.dtype)                 # (B, heads, T-n, d), (B, heads, n, d)
    a, b = t.chunk(2, dim=-1)
    t = t * cos + torch.cat([-b, a], dim=-1) * sin                     # (B, heads, n, d)
    return torch.cat([head, t.to(dtype)], dim=2)                       # (B, heads, T, d)


class Attention(nn.Module):
    """Multi-head self-attention: softmax(q k^T / sqrt(E/heads)) v, fused qkv with bias.
    mask_k_bias (DINOv3): the qkv bias is multiplied by the stored 0/1 buffer `qkv.bias_mask`, which
    zeroes k's third (official LinearKMaskedBias). With RoPE it matters: a k bias rotated by the
    key's position no longer adds the same score to every key of a query."""

    def __init__(self, dim, heads, mask_k_bias=False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.mask_k_bias = mask_k_bias
        if mask_k_bias:
            self.qkv.register_buffer("bias_mask", torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)]))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None):
        B, T, E = x.shape
        bias = self.qkv.bias * self.qkv.bias_mask if self.mask_k_bias else self.qkv.bias
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, T, 3, self.heads, E // self.heads)  # (B, T, 3, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                               # 3 x (B, heads, T, d)
        if rope is not None:
            q, k = rope_rotate(q, *rope), rope_rotate(k, *rope)
        x = F.scaled_dot_product_attention(q, k, v)                        # (B, heads, T, d)
        return self.proj(x.transpose(1, 2).reshape(B, T, E))               # (B, T, E)


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT; DINOv2 / DINOv3 `ls1`, `ls2`)."""

    def __init__(self, dim, init):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as the official nn.GELU default
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * (w2 x)), hidden width 2/3 of the MLP's rounded up to a multiple of `align`
    (official SwiGLUFFNFused of DINOv2, SwiGLUFFN of DINOv3: the same width). packed: w1 and w2 as
    one `w12` matrix, w1 first (DINOv2 ViT-g's file); else two (DINOv3's)."""

    def __init__(self, dim, hidden, packed, align=8):
        super().__init__()
        hidden = -(-int(hidden * 2 / 3) // align) * align
        self.packed = packed
        if packed:
            self.w12 = nn.Linear(dim, 2 * hidden)
        else:
            self.w1, self.w2 = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1) if self.packed else (self.w1(x), self.w2(x))
        return self.w3(F.silu(a) * b)


class Block(nn.Module):
    """Pre-norm transformer block: x += ls1(attn(norm1 x)); x += ls2(ffn(norm2 x))."""

    def __init__(self, dim, heads, mlp_ratio, layerscale_init, ln_eps, ffn="mlp", mask_k_bias=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = Attention(dim, heads, mask_k_bias)
        self.ls1 = LayerScale(dim, layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = Mlp(dim, hidden) if ffn == "mlp" else SwiGLU(dim, hidden, packed=ffn == "swiglufused")
        self.ls2 = LayerScale(dim, layerscale_init)

    def forward(self, x, rope=None):
        x = x + self.ls1(self.attn(self.norm1(x), rope))  # (B, T, E)
        return x + self.ls2(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """DINOv2 or DINOv3 ViT with the official parameter names (facebookresearch/dinov2 and dinov3,
    models/vision_transformer.py, layers/*.py); the same numbers up to rounding, with torch's SDPA
    attention and no xFormers, stochastic depth or masking (mask_token only loads).

    Defaults are DINOv2 ViT-S/14 as on torch.hub: img_size 518 -> a 37 x 37 position table,
    MLP ratio 4, LayerNorm eps 1e-6, interpolation offset 0.1 without antialiasing. The register
    models add num_register_tokens=4, offset 0 and antialiasing; DINOv3 sets rope_base (no
    table), n_storage_tokens, ln_eps 1e-5 and mask_k_bias (encoder_kwargs has each hub setting)."""

    def __init__(self, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, patch_size=14,
                 img_size=518, layerscale_init=1e-5, ln_eps=1e-6, interpolate_offset=0.1,
                 interpolate_antialias=False, ffn="mlp", num_register_tokens=0, rope_base=None,
                 n_storage_tokens=0, mask_k_bias=False):
        super().__init__()
        self.embed_dim, self.patch_size = embed_dim, patch_size
        self.grid = img_size // patch_size  # M: side of the learned position table (37)
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        self.n_prefix = 1 + num_register_tokens + n_storage_tokens  # class + extra tokens, before the patches
        self.patch_embed = PatchEmbed(embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if rope_base is None:
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, embed_dim))
        else:
            self.rope_embed = RopePositions(embed_dim // num_heads, rope_base)
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        if n_storage_tokens:
            self.storage_tokens = nn.Parameter(torch.zeros(1, n_storage_tokens, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # unused here (iBOT masking)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, layerscale_init, ln_eps, ffn, mask_k_bias)
            for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=ln_eps)
        self._init_weights()

    def _init_weights(self, std=0.02):
        # The official init_weights: truncated normal Linear weights (timm's ViT init) and zero
        # biases, the conv keeps torch's init (DINOv3's uniform +-1/sqrt(fan_in) is the same law);
        # DINOv2: truncated normal pos_embed, class token and registers normal(1e-6);
        # DINOv3: class and storage tokens normal(0.02), RoPE periods computed, no table.
        rope = hasattr(self, "rope_embed")
        if not rope:
            nn.init.trunc_normal_(self.pos_embed, std=std)
        for name, p in self.named_parameters():
            if name in ("cls_token", "register_tokens", "storage_tokens"):
                nn.init.normal_(p, std=std if rope else 1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, h, w):
        """(1, 1 + h*w, E) position embeddings for an h x w patch grid, the official numbers
        (DINOv2 only).

        Official DinoVisionTransformer.interpolate_pos_encoding: at the native M x M grid the
        table is returned untouched; else bicubic (torch's a = -0.75, align_corners=False). With
        the offset (0.1, the non-register hub models) torch is given an explicit scale_factor
        ((h + 0.1) / M, (w + 0.1) / M) instead of an output size: the output still has h x w
        cells, but torch then samples source row (i + 0.5) * M / (h + 0.1) - 0.5 rather than
        (i + 0.5) * M / h - 0.5, which changes the numbers; the 0.1 is a historic floating-point
        guard (facebookresearch/dino issue 8) kept for identical features. The register models
        pass the output size and antialias=True, which low-pass filters when shrinking.
        Computed in float32 like the official code."""
        M, E = self.grid, self.embed_dim
        if (h, w) == (M, M):
            return self.pos_embed
        pos = self.pos_embed.float()
        cls_pos = pos[:, :1]                                          # (1, 1, E)
        patch_pos = pos[:, 1:].reshape(1, M, M, E).permute(0, 3, 1, 2)  # (1, E, M, M)
        if self.interpolate_offset:
            off = self.interpolate_offset
            size_kw = dict(scale_factor=(float(h + off) / M, float(w + off) / M))
        else:
            size_kw = dict(size=(h, w))
        patch_pos = F.interpolate(patch_pos, mode="bicubic",
                                  antialias=self.interpolate_antialias, **size_kw)  # (1, E, h, w)
        assert patch_pos.shape[-2:] == (h, w), (patch_pos.shape, h, w)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, E)  # (1, h*w, E)
        return torch.cat([cls_pos, patch_pos], dim=1).to(self.pos_embed.dtype)

    def prepare_tokens(self, x):
        """ImageNet-normalised (B, 3, H, W) -> tokens (B, n_prefix + h*w, E): class token, extra
        tokens, patches. DINOv2 adds the table to class and patch tokens, then inserts the
        registers (which get no position); DINOv3 adds nothing here (RoPE acts in attention)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"model.py: ViT: expected images (B, 3, H, W), got {tuple(x.shape)}")
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(
                f"model.py: ViT: input size {H}x{W} (HxW) is not a multiple of the patch size {p}; "
                f"resize or crop it, e.g. to {max(p, H // p * p)}x{max(p, W // p * p)}")
        tokens = self.patch_embed(x)                                  # (B, h*w, E)
        cls = self.cls_token.expand(B, -1, -1)                        # (B, 1, E)
        if hasattr(self, "rope_embed"):                               # DINOv3
            extra = [self.storage_tokens.expand(B, -1, -1)] if hasattr(self, "storage_tokens") else []
            return torch.cat([cls, *extra, tokens], dim=1)            # (B, T, E)
        tokens = torch.cat([cls, tokens], dim=1) + self.interpolate_pos_encoding(H // p, W // p)
        if hasattr(self, "register_tokens"):                          # DINOv2-reg
            tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(B, -1, -1), tokens[:, 1:]], dim=1)
        return tokens                                                 # (B, T, E)

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False, norm=True):
        """The official DINOv2 / DINOv3 call. n: the last n blocks (int) or 0-based block indices
        (returned in block order, as the official loop appends them). A tuple with one entry per
        block: the patch tokens (B, h*w, E), or with reshape=True the grid (B, E, h, w); with
        return_class_token=True each entry is (patches, class token (B, E)). norm: through the final
        LayerNorm (DINOv3 on the hub does not untie the class and patch norms). The extra tokens
        are dropped. Runs the blocks up to the last one asked for (the official runs all: the
        same numbers)."""
        depth = len(self.blocks)
        take = range(depth - n, depth) if isinstance(n, int) else [int(i) for i in n]
        if not take or min(take) < 0 or max(take) >= depth or len(set(take)) != len(take):
            raise ValueError(f"model.py: ViT: blocks {n} must be distinct indices in 0..{depth - 1} "
                             f"(or a count 1..{depth})")
        B, _, H, W = x.shape
        h, w = H // self.patch_size, W // self.patch_size
        t = self.prepare_tokens(x)                                    # (B, T, E)
        rope = self.rope_embed(h, w) if hasattr(self, "rope_embed") else None  # 2 x (h*w, d)
        outs = []
        for i, block in enumerate(self.blocks[:max(take) + 1]):
            t = block(t, rope)                                        # (B, T, E)
            if i in take:
                outs.append(self.norm(t) if norm else t)
        result = []
        for out in outs:
            patches = out[:, self.n_prefix:]                          # (B, h*w, E)
            if reshape:
                patches = patches.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous()  # (B, E, h, w)
            result.append((patches, out[:, 0]) if return_class_token else patches)
        return tuple(result)

    def forward(self, x):
        """The official eval forward: the normed class token (B, E)."""
        return self.get_intermediate_layers(x, 1, return_class_token=True)[0][1]  # (B, E)


# ------------------------------------------------------------------ LILA: frozen encoder + decoder
class LILA(nn.Module):
    """Frozen encoder + trainable decoder. Takes images in [0, 1]; normalises them here."""

    def __init__(self, encoder, decoder, taps):
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.decoder = decoder
        self.taps = tuple(int(t) for t in taps)
        self.patch = encoder.patch_size  # px per token side (14 DINOv2, 16 DINOv3): inputs are multiples
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):
        super().train(mode)
        self.encoder.eval()  # frozen: always eval, whatever mode the decoder is in
        return self

    def encode(self, img, taps=None):
        """List of (B, E, h, w) tapped grids of the frozen encoder, without gradient."""
        check_unit_images(img)
        with torch.no_grad():
            x = (img - self.mean) / self.std                           # (B, 3, H, W)
            return list(self.encoder.get_intermediate_layers(x, list(taps or self.taps), reshape=True))

    def forward(self, img):
        """(B, 3, H, W) float in [0, 1], sides multiples of self.patch -> (last tapped grid (B, E, h, w),
        pixel features (B, D, H, W)), as the official LILA.forward (enc_grid, dec_features)."""
        grids = self.encode(img)                                     # 4 x (B, E, h, w)
        feats = self.decoder(grids, size=img.shape[-2:])             # (B, D, H, W)
        return grids[-1], feats

    def encoder_features(self, img):
        """The baseline: last tapped grid, bilinearly upsampled to the image size."""
        grid = self.encode(img, taps=self.taps[-1:])[0]              # (B, E, h, w)
        return F.interpolate(grid, size=img.shape[-2:], mode="bilinear", align_corners=False)

    @torch.no_grad()
    def features(self, image, short_side=None, patch=None, range_tol=1 / 255, max_pixels=MAX_PIXELS):
        """Pixel features of any image, at the image's own resolution: the documented call.

        image: a PIL image (any mode: L, RGB, RGBA (alpha dropped), P, I;16, I, F, ...), a numpy
        array (H, W) or (H, W, 3), or a tensor (3, H, W) or (B, 3, H, W). uint8 counts 0..255,
        uint16 0..65535 (PIL "I" too, if its values fit), float must lie in [0, 1] (up to
        `range_tol`, one 8-bit level); grey is repeated to RGB. Anything else is a ValueError.
        It is resized (bilinear) so both sides are multiples of the patch size (and the short
        side is `short_side`, if given), run through LILA exactly as in training, and the
        features are resized back to H x W. Returns (D, H, W) for one image, (B, D, H, W) for a
        batch, D = self.decoder.out_dim (the preset's: paper 128 for ViT-S, tiny 32).
        max_pixels: above it (run or returned size) it refuses and says the cost; None: no bound.
        """
        x, single = image_batch(image, range_tol)                   # (B, 3, H, W) in [0, 1]
        patch = patch or self.patch                                 # default: the encoder's patch
        H, W = x.shape[-2:]
        if short_side is not None and not short_side > 0:
            raise ValueError(f"model.py: LILA.features: short_side must be positive, got {short_side}")
        scale = 1.0 if short_side is None else short_side / min(H, W)
        run_h = max(patch, round(H * scale / patch) * patch)        # the size LILA runs at:
        run_w = max(patch, round(W * scale / patch) * patch)        # sides multiples of patch
        check_pixel_budget(x.shape[0], H, W, run_h, run_w, self.decoder.out_dim, patch, max_pixels)
        dev = next(self.decoder.parameters()).device
        x = F.interpolate(x.to(dev), size=(run_h, run_w), mode="bilinear", align_corners=False)
        _, feats = self(x)                                          # (B, D, run_h, run_w)
        feats = F.interpolate(feats.float(), size=(H, W), mode="bilinear", align_corners=False)
        return feats[0] if single else feats                        # (D, H, W) or (B, D, H, W)


# --- plumbing ---------------------------------------------------------------------------------
# ------------------------------------------------------------------ the decoder in bands of rows
# DPTDecoder.forward holds several (B, F/2, H, W) maps at once (the resized map, the 3x3 conv's
# output, the 1x1 conv's, the norm's): 4.5 GB at 1920x1080. decoder_bands computes the same
# numbers band of rows by band of rows, so only the coarse levels and a few band-sized tensors
# are alive. Each step of the head is a row map: a pointwise op needs the same rows, a 3x3 conv
# one more row above and below (zeros outside the map, as its padding), a bilinear resize the
# source rows its output rows interpolate (bilinear_taps); rows(k, a, b) asks for exactly those.
def bilinear_taps(n_in, n_out, align_corners):
    """(i0, i1, lam) of each of n_out rows of a bilinear resize from n_in rows, as torch's
    upsample_bilinear2d computes them: out[i] = (1 - lam[i]) in[i0[i]] + lam[i] in[i1[i]]."""
    i = torch.arange(n_out, dtype=torch.float32)
    if align_corners:
        src = i * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    else:
        src = ((i + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    return i0, (i0 + 1).clamp(max=n_in - 1), src - i0


def decoder_bands(decoder, grids, size, out_size=None, stride=1, band_pixels=2 ** 15):
    """DPTDecoder(grids, size), then resized to `out_size` (bilinear, align_corners=False: the
    last step of LILA.features) and kept every `stride` pixels, in bands of rows: yields
    (first row, (B, D, rows, W')) top to bottom, the same numbers as the one-piece path up to
    float round-off. band_pixels: rows x width of a band, before the stride (per frame); 2^15
    (~40 rows of 854 px) is the fastest on a CPU: the paper head at 854x480 in 2.7 s on one
    thread, 1.4 s on two, against 3.7 s and 2.3 s for the one-piece DPTDecoder."""
    levels = decoder.reassembled(grids)                              # (B, F, 4h, 4w) ... (B, F, h/2, w/2)
    x = None
    for i in reversed(range(1, len(levels))):                        # forward's loop, but the last
        x = decoder.fusion[i](levels[i] if x is None else x, None if x is None else levels[i],
                              levels[i - 1].shape[-2:])              # (B, F, *level i-1)
    last = decoder.fusion[0]
    x = last.unit(x + last.skip_unit(levels[0]))                     # (B, F, 4h, 4w): small
    up = tuple(s * decoder.last_upsample for s in levels[0].shape[-2:])
    del levels                                                       # not needed by the bands
    # Channels last from here: oneDNN's 3x3 convs run 1.5x faster on it than on (B, C, H, W)
    # (head_conv1, one CPU thread: 215 against 146 GFLOPS), the LayerNorm needs no copy, and the
    # row gathers below keep it (an index_select along dim 2 would not). The 1x1 out_conv goes
    # before the x2 resize: both are linear and a bilinear resize's weights sum to 1, so the
    # numbers are the same (to round-off) for a quarter of the pixels.
    x = x.contiguous(memory_format=torch.channels_last)              # (B, F, 4h, 4w)
    steps = [("point", last.out_conv), ("resize", up, last.align_corners), ("conv", decoder.head_conv1),
             ("resize", tuple(size), decoder.align_corners), ("conv", decoder.head_conv2),
             ("point", F.relu), ("point", decoder.head_out), ("point", decoder.norm)]
    out_size = tuple(size) if out_size is None else tuple(out_size)
    if out_size != tuple(size):
        steps.append(("resize", out_size, False))
    hw = [tuple(x.shape[-2:])]                                       # map size after each step
    for kind, arg, *_ in steps:
        hw.append(tuple(arg) if kind == "resize" else hw[-1])

    def rows(k, a, b):
        """Rows [a, b) of the map after the first k steps."""
        if k == 0:
            return x[:, :, a:b]
        kind, op, *ac = steps[k - 1]
        if kind == "point":
            return op(rows(k - 1, a, b))
        if kind == "conv":                                           # 3x3, padding 1: a 1-row halo
            lo, hi = max(a - 1, 0), min(b + 1, hw[k][0])             # (its zero padding: at the map's edge)
            return op(rows(k - 1, lo, hi))[:, :, a - lo:b - lo]      # (B, C, b - a, W)
        i0, i1, lam = (t[a:b] for t in bilinear_taps(hw[k - 1][0], op[0], ac[0]))
        lo, hi = int(i0.min()), int(i1.max()) + 1
        t = rows(k - 1, lo, hi).permute(0, 2, 3, 1)                  # the source rows (B, rows, w_in, C)
        dev = t.device
        t = torch.lerp(t.index_select(1, (i0 - lo).to(dev)), t.index_select(1, (i1 - lo).to(dev)),
                       lam.to(dev, t.dtype).view(1, -1, 1, 1))       # (B, b - a, w_in, C): the rows
        t = t.permute(0, 3, 1, 2)                                    # (B, C, b - a, w_in), channels last
        return F.interpolate(t, size=(b - a, op[1]), mode="bilinear", align_corners=ac[0])  # then the columns

    H, W = out_size
    band = max(stride, band_pixels // W // stride * stride)
    for a in range(0, H, band):
        yield a // stride, rows(len(steps), a, min(a + band, H))[:, :, ::stride, ::stride]


# ------------------------------------------------------------------ checks of LILA's inputs
def check_unit_images(img, tol=UNIT_TOL):
    """LILA's input: float (B, 3, H, W) in [0, 1] up to `tol`, else one ValueError that says why."""
    if not torch.is_floating_point(img) or img.ndim != 4 or img.shape[1] != 3:
        raise ValueError(f"model.py: LILA: expected float images (B, 3, H, W) in [0, 1], got "
                         f"{img.dtype} {tuple(img.shape)}")
    lo, hi = float(img.min()), float(img.max())
    if lo < -tol or hi > 1 + tol:
        raise ValueError(
            f"model.py: LILA: image values span [{lo:.3g}, {hi:.3g}], expected [0, 1]: LILA takes "
            f"images in [0, 1] and applies the ImageNet mean and std itself, so an ImageNet-normalised "
            f"image (the official LILA's input) would be normalised twice; pass the image before "
            f"normalising it (0..255 values: divide by 255)")


def check_pixel_budget(B, H, W, run_h, run_w, D, patch, max_pixels):
    """Refuse a LILA.features call above `max_pixels`, saying what it would cost."""
    if max_pixels is None or max(H * W, run_h * run_w) <= max_pixels:
        return
    out_gb = B * D * H * W * 4 / 1e9
    raise ValueError(
        f"model.py: LILA.features: {W}x{H} px ({H * W / 1e6:.1f} MP, run at {run_w}x{run_h}: "
        f"{run_h * run_w // patch ** 2} tokens) is above max_pixels={max_pixels}; it would return "
        f"{B}x{D}x{H}x{W} float32 features ({out_gb:.1f} GB) and hold several tensors that size in "
        f"the decoder; resize the image first, or pass max_pixels=None to run it anyway")


# ------------------------------------------------------------------ images in, for LILA.features
WHITE = {"uint8": 255, "uint16": 65535}  # integer pixel types -> the value of white


def image_batch(image, range_tol=1 / 255):
    """PIL image / numpy array / tensor -> ((B, 3, H, W) float32 in [0, 1], single image?).
    Every refusal is one ValueError beginning "model.py: LILA.features: "."""
    def refuse(msg):
        raise ValueError(f"model.py: LILA.features: {msg}")

    if type(image).__module__.startswith("PIL."):               # a PIL image -> numpy
        mode = image.mode
        if mode.startswith("I;16"):
            image = np.asarray(image).astype(np.uint16)             # (H, W), any byte order
        elif mode == "I":  # 32-bit ints: how Pillow opens many 16-bit PNGs
            image = np.asarray(image)
            if image.size and (image.min() < 0 or image.max() > WHITE["uint16"]):
                refuse(f"PIL mode 'I' values span {image.min()}..{image.max()}, not 16-bit 0..65535")
            image = image.astype(np.uint16)
        elif mode == "F":
            image = np.asarray(image)                               # (H, W) float32
        else:
            image = np.asarray(image.convert("RGB"))                # (H, W, 3) uint8
    if isinstance(image, np.ndarray):                            # numpy: HWC or HW -> CHW
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):  # grey -> RGB
            image = image.reshape(image.shape[0], image.shape[1], 1).repeat(3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3:
            refuse(f"expected a numpy image (H, W) or (H, W, 3), got shape {image.shape}")
        if image.dtype.name not in WHITE and image.dtype.kind != "f":
            refuse(f"numpy dtype {image.dtype} is not uint8, uint16 or float in [0, 1]")
        white = WHITE.get(image.dtype.name, 1)
        image = torch.from_numpy(image.astype(np.float32) / np.float32(white)).permute(2, 0, 1)
    elif not torch.is_tensor(image):
        refuse(f"expected a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")
    elif image.dim() not in (3, 4) or image.shape[-3] != 3:
        refuse(f"expected a tensor (3, H, W) or (B, 3, H, W), got {tuple(image.shape)} (an (H, W, 3) "
               f"image: pass it as a numpy array or permute(2, 0, 1))")
    elif str(image.dtype).replace("torch.", "") in WHITE:
        image = image.float() / WHITE[str(image.dtype).replace("torch.", "")]
    elif not image.is_floating_point():
        refuse(f"tensor dtype {image.dtype} is not uint8, uint16 or float in [0, 1]")
    single = image.dim() == 3
    x = (image[None] if single else image).float()              # (B, 3, H, W)
    if x.numel() == 0:
        refuse("the batch holds no image" if len(x) == 0 else
               f"the image is empty ({x.shape[2]}x{x.shape[3]} pixels)")
    if not torch.isfinite(x).all():
        refuse("the image has non-finite values (NaN or inf)")
    lo, hi = float(x.min()), float(x.max())
    if lo < -range_tol or hi > 1 + range_tol:
        refuse(f"float values span [{lo:g}, {hi:g}], expected [0, 1] (divide 8-bit values by "
               f"255, 16-bit ones by 65535)")
    return x, single


def decoder_config(backbone, preset):
    """The DPTDecoder keyword arguments (features, out_dim, widths) of `preset` for `backbone`."""
    if preset not in PRESETS:
        raise ValueError(f"model.py: unknown preset '{preset}', choose from {list(PRESETS)}")
    if backbone not in PRESETS[preset]:
        raise ValueError(f"model.py: unknown backbone '{backbone}', choose from {list(BACKBONES)}")
    return dict(PRESETS[preset][backbone])


def build_lila(backbone="dinov2_vits14", weights="hub", preset="paper", seed=0):
    """LILA with a frozen `backbone` (a name in BACKBONES) and a seeded, untrained decoder of `preset`."""
    cfg = decoder_config(backbone, preset)  # checked before the (slow) encoder is built
    encoder = load_encoder(backbone, weights, seed=seed)
    spec = BACKBONES[backbone]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = DPTDecoder(spec.embed_dim, **cfg)
    return LILA(encoder, decoder, spec.taps)


def encoder_kwargs(spec):
    """ViT keyword arguments for a BACKBONES entry: the official hub builder's settings."""
    kw = dict(embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.heads, patch_size=spec.patch,
              mlp_ratio=spec.ffn_ratio, ffn=spec.ffn)
    if spec.family == "dinov2":  # dinov2/hub/backbones.py: img_size 518, the _reg models as below
        return dict(kw, num_register_tokens=spec.tokens, interpolate_offset=0.0 if spec.tokens else 0.1,
                    interpolate_antialias=bool(spec.tokens))
    # dinov3/hub/backbones.py: RoPE base 100 ("separate" coordinates, float32), norm_layer
    # "layernormbf16" = LayerNorm eps 1e-5, n_storage_tokens 4, mask_k_bias, layerscale 1e-5.
    return dict(kw, rope_base=100.0, ln_eps=1e-5, n_storage_tokens=spec.tokens, mask_k_bias=True)


# ------------------------------------------------------------------ loading the weights
def _read_state_dict(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"model.py: load_encoder: weights file '{path}' does not exist. Pass weights='hub' for "
            f"the official DINOv2 checkpoint, a path to the official weights file, or 'none' (random).")
    if os.path.getsize(path) == 0:
        raise RuntimeError(f"model.py: load_encoder: weights file '{path}' is empty (0 bytes)")
    try:  # weights_only: a plain tensor pickle, no code runs while reading it
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise RuntimeError(f"model.py: load_encoder: could not read '{path}' as a torch state dict "
                           f"({_first_sentence(e)})") from None


def _first_sentence(e):
    """'Type: first sentence' of an exception, so that an error stays one line."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0].split('. ')[0]}"


def _fetch_hub(name):
    """The official checkpoint through torch.hub's download-and-cache ($TORCH_HOME/hub/checkpoints).

    DINOv3's files are gated (a licence form, then a signed link): no URL to fetch, so "hub" is
    an error that says which file to download and how to pass it.
    Hash check: torch.hub's check_hash only verifies names of the form `file-<sha256 prefix>.pth`;
    the official DINOv2 file names carry no hash, so it could check nothing and we pass False
    rather than pretend. What we do check: the download comes over HTTPS from Meta's URL, it is
    read with weights_only=True, every key and shape must match (strict), and load_encoder's
    `sha256=` argument compares the whole file against a digest you recorded."""
    spec = BACKBONES[name]
    if spec.family == "dinov3":
        raise ValueError(
            f"model.py: load_encoder: DINOv3 weights cannot be downloaded automatically (Meta gates them "
            f"behind a licence form): download {spec.file} by hand from Meta ({DINOV3_DOWNLOADS}) and "
            f"pass weights=PATH (train.py / probe.py: --weights PATH), or weights='none' for random ones")
    url = DINOV2_URL.format(folder=spec.file.split("_pretrain")[0].replace("_reg4", ""), file=spec.file)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", spec.file)
    was_cached = os.path.exists(cached)
    try:
        state = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=False,
                                                   weights_only=True)
    except Exception as e:
        if was_cached:
            raise RuntimeError(f"model.py: load_encoder: the cached checkpoint '{cached}' could not be "
                               f"read ({_first_sentence(e)}); delete it to download it again") from None
        raise RuntimeError(
            f"model.py: load_encoder: could not download {url} ({_first_sentence(e)}); offline? "
            f"fetch the file on a connected machine and either place it at {cached} (torch.hub's "
            f"cache, $TORCH_HOME/hub/checkpoints/) or pass its path as the weights argument "
            f"(e.g. --weights /path/{spec.file})") from None
    return state, cached


def _load_strict(model, state, source, name):
    """load_state_dict(strict=True), with an error that lists what differs and guesses why."""
    file = BACKBONES[name].file
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        keys = list(state)[:5] if isinstance(state, dict) else []
        raise RuntimeError(f"model.py: load_encoder: '{source}' is not a plain state dict "
                           f"(name -> tensor) like the official {file}; got "
                           f"{type(state).__name__} with keys {keys}")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs {name} {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or wrong):
        bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
        if bad is not None:
            raise RuntimeError(f"model.py: load_encoder: '{source}' has non-finite weights (NaN or inf) in {bad}")
        model.load_state_dict(state, strict=True)
        return
    hints, has = [], lambda part, keys: any(part in k for k in keys)
    if has("register_tokens", unexpected):
        hints.append(f"the file has registers: a *_reg4 file, load it as {name}_reg")
    if has("register_tokens", missing):
        hints.append(f"the file has no registers: load it as {name.replace('_reg', '')}")
    if has("storage_tokens", unexpected) or has("rope_embed", unexpected):
        hints.append("a DINOv3 file: choose a dinov3_* backbone")
    if has("local_cls_norm", unexpected):
        hints.append("the satellite (SAT-493M) ViT-L/16 file: only the LVD-1689M weights are supported")
    if has("mlp.w", unexpected) or has("mlp.w", missing):
        hints.append("feed-forward keys differ (SwiGLU w12 / w1 w2 vs MLP fc1): another model size")
    if any(k.startswith(("module.", "backbone.", "teacher.", "student.")) for k in unexpected):
        hints.append("keys carry a wrapper prefix; save the bare backbone state dict")
    if wrong:
        hints.append("shapes differ: is it the file of another size (S/B/L/g)?")
    show = lambda ks: f"{len(ks)} {ks[:8]}" + (" ..." if len(ks) > 8 else "")
    raise RuntimeError(f"model.py: load_encoder: '{source}' does not match {name} (strict loading): "
                       f"missing keys: {show(missing)}; unexpected keys: {show(unexpected)}; "
                       f"shape mismatches: {show(wrong)}; hint: {', '.join(hints) or '-'}")


def file_sha256(path, chunk=1 << 24):
    """sha256 of a file's content: load_encoder's pin, probe.py's key of a checkpoint."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


_random_weights_announced = False  # the banner below is printed once per process


def _announce_random_weights(name, seed):
    """Say loudly, once per process, that an encoder has random weights (a script that builds
    several models, e.g. bench.py, would otherwise print the banner each time)."""
    global _random_weights_announced
    if _random_weights_announced:
        return
    _random_weights_announced = True
    bar = "!" * 78
    print(f"{bar}\n!! model.py: {name} has RANDOM weights (weights='none', seed={seed}).\n"
          f"!! Its features are meaningless: use this for tests and smoke runs only.\n"
          f"!! (Said once per process: later random encoders are not announced again.)\n{bar}",
          file=sys.stderr, flush=True)


def load_encoder(name, weights="hub", seed=0, sha256=None):
    """Frozen eval-mode ViT for `name` in BACKBONES, with the official `get_intermediate_layers`,
    `.patch_size` and `.embed_dim`. weights: "hub" (the official DINOv2 file via torch.hub's cache
    in $TORCH_HOME; DINOv3: an error saying which file to download by hand), a path to the
    official weights file, or "none" (random init seeded by `seed`, announced loudly).
    `sha256` (optional) must equal the file's digest."""
    if name not in BACKBONES:
        raise ValueError(f"model.py: load_encoder: unknown backbone '{name}', choose from {list(BACKBONES)}")
    if weights != "none":  # read (and check) the file first: a bad one fails before the build
        state, source = _fetch_hub(name) if weights == "hub" else (_read_state_dict(weights), weights)
        if sha256 is not None and file_sha256(source) != sha256.lower():
            raise RuntimeError(f"model.py: load_encoder: SHA-256 of '{source}' is {file_sha256(source)}, "
                               f"expected {sha256}")
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = ViT(**encoder_kwargs(BACKBONES[name]))
    if weights == "none":
        _announce_random_weights(name, seed)
    else:
        _load_strict(model, state, source, name)
        print(f"model.py: loaded {name} from {source}", file=sys.stderr, flush=True)
    return model.requires_grad_(False).eval()

