"""model.py: LILA's pixel decoder on a frozen DINOv2 encoder (paper: "Encoder", "Decoder").

What the paper adds is the decoder: a light DPT head (the official SmallDPTHead + LILA.fnorm,
google-research lila/lila/dpt_lila.py) turns four tapped patch grids of a frozen DINOv2
ViT-S/B/L/14 into one D-dimensional, per-pixel LayerNormed feature for every image pixel.
Only the decoder trains. Read top to bottom: the decoder, the encoder (DINOv2 as released),
LILA (the two together), then the plumbing (checks, image inputs, building, DINOv2 weights).

Shape legend: B batch, H x W image (sides multiples of 14), h x w = H/14 x W/14 patch grid,
T = 1 + h*w tokens (class token first), E encoder width (384 S, 768 B, 1024 L),
F decoder fusion width, D pixel-feature dim (F/2 in the paper).

Images come in [0, 1] and are ImageNet-normalised inside LILA (the official LILA takes them
normalised). The encoder's parameter names and shapes equal the official DINOv2 hub
checkpoints, so `dinov2_vits14_pretrain.pth` loads with strict=True; the decoder computes the
official head op for op under our names (official LILA checkpoints load through hubconf.py).
Deviations from the official code: README's Differences.

Run:  python -m pytest -q tests/test_model.py;  timings: python bench.py model
Use:  import model; net = model.build_lila("dinov2_vits14", weights="hub", preset="paper")
"""
import hashlib
import os
import sys
from collections import namedtuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ImageNet statistics used by DINOv2 (and by its hub transforms); applied inside LILA only.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> (E, depth, heads, tapped 0-based blocks). Taps: official lila/lila/config.py
# (intermediate_layer_idx), DPT's choice.
Backbone = namedtuple("Backbone", "embed_dim depth heads taps")
BACKBONES = {
    "dinov2_vits14": Backbone(384, 12, 6, (2, 5, 8, 11)),
    "dinov2_vitb14": Backbone(768, 12, 12, (2, 5, 8, 11)),
    "dinov2_vitl14": Backbone(1024, 24, 16, (4, 11, 17, 23)),
}
# dinov2/hub/utils.py (_DINOV2_BASE_URL) + hub/backbones.py (f"/{base}/{full}_pretrain.pth").
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{name}/{name}_pretrain.pth"

# Decoder sizes per backbone: F ("features") and the reassemble widths ("out_channels") of the
# official lila/lila/config.py (lila_config), D = F / 2 (official LILA.dec_dim = features // 2;
# paper: D = 128 for ViT-S). "tiny" is the same code at CPU size: F and D a quarter of the
# paper's, widths a third of the paper's for S and B and a quarter for L (whose official widths
# are already 5x S's), so each backbone keeps the official pattern of widths.
PRESETS = {
    "paper": {
        "dinov2_vits14": dict(features=256, out_dim=128, widths=(48, 96, 192, 384)),
        "dinov2_vitb14": dict(features=384, out_dim=192, widths=(96, 192, 384, 768)),
        "dinov2_vitl14": dict(features=512, out_dim=256, widths=(256, 512, 1024, 1024)),
    },
    "tiny": {
        "dinov2_vits14": dict(features=64, out_dim=32, widths=(16, 32, 64, 128)),
        "dinov2_vitb14": dict(features=96, out_dim=48, widths=(32, 64, 128, 256)),
        "dinov2_vitl14": dict(features=128, out_dim=64, widths=(64, 128, 256, 256)),
    },
}
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
        self.norm = nn.LayerNorm(out_dim, eps=ln_eps, elementwise_affine=False)

    def forward(self, grids, size):
        if len(grids) != len(self.reassemble):
            raise ValueError(f"model.py: DPTDecoder: got {len(grids)} grids, expected "
                             f"{len(self.reassemble)} (one per tapped block)")
        levels = [r(g) for r, g in zip(self.reassemble, grids)]      # (B, F, 4h, 4w) ... (B, F, h/2, w/2)
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
        return self.norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()  # (B, D, H, W)


# ------------------------------------------------------------------ encoder: DINOv2 ViT, frozen, as released
class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> E channels (a strided conv), flattened row-major."""

    def __init__(self, embed_dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, E)


class Attention(nn.Module):
    """Multi-head self-attention: softmax(q k^T / sqrt(E/heads)) v, fused qkv with bias."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, E = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, E // self.heads)  # (B, T, 3, heads, E/heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                               # 3 x (B, heads, T, E/heads)
        x = F.scaled_dot_product_attention(q, k, v)                        # (B, heads, T, E/heads)
        return self.proj(x.transpose(1, 2).reshape(B, T, E))               # (B, T, E)


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT; DINOv2 `ls1`, `ls2`)."""

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


class Block(nn.Module):
    """Pre-norm transformer block: x += ls1(attn(norm1 x)); x += ls2(mlp(norm2 x))."""

    def __init__(self, dim, heads, mlp_ratio, layerscale_init, ln_eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim, layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale_init)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))  # (B, T, E)
        return x + self.ls2(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """DINOv2 ViT/14 with the official parameter names (facebookresearch/dinov2 models/
    vision_transformer.py, layers/*.py); the same numbers up to rounding, with torch's SDPA
    attention and no xFormers, stochastic depth, registers or masking (mask_token only loads).

    Defaults are ViT-S/14 as on torch.hub: img_size 518 -> a 37 x 37 position table,
    MLP ratio 4, LayerNorm eps 1e-6, interpolation offset 0.1 without antialiasing
    (hub/backbones.py defaults for the non-register models)."""

    def __init__(self, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, patch_size=14,
                 img_size=518, layerscale_init=1e-5, ln_eps=1e-6, interpolate_offset=0.1,
                 interpolate_antialias=False):
        super().__init__()
        self.embed_dim, self.patch_size = embed_dim, patch_size
        self.grid = img_size // patch_size  # M: side of the learned position table (37)
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        self.patch_embed = PatchEmbed(embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # unused here (iBOT masking)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, layerscale_init, ln_eps) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=ln_eps)
        self._init_weights()

    def _init_weights(self, std=0.02, cls_std=1e-6):
        # DinoVisionTransformer.init_weights: truncated normal pos_embed and Linear weights
        # (timm's ViT init), tiny normal class token, zero biases; the conv keeps torch's init.
        nn.init.trunc_normal_(self.pos_embed, std=std)
        nn.init.normal_(self.cls_token, std=cls_std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, h, w):
        """(1, 1 + h*w, E) position embeddings for an h x w patch grid, the official numbers.

        Official DinoVisionTransformer.interpolate_pos_encoding (hub defaults offset 0.1,
        antialias False): at the native M x M grid the table is returned untouched; else
        bicubic (torch's a = -0.75, align_corners=False) with an explicit
        scale_factor ((h + 0.1) / M, (w + 0.1) / M) instead of an output size. The output
        still has h x w cells, but torch then samples source row (i + 0.5) * M / (h + 0.1) - 0.5
        rather than (i + 0.5) * M / h - 0.5, which changes the numbers; the 0.1 is a historic
        floating-point guard (facebookresearch/dino issue 8) kept for identical features.
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
        """ImageNet-normalised (B, 3, H, W) -> tokens (B, 1 + h*w, E) with positions added."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"model.py: ViT: expected images (B, 3, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(
                f"model.py: ViT: input size {H}x{W} (HxW) is not a multiple of the patch size {p}; "
                f"resize or crop it, e.g. to {max(p, H // p * p)}x{max(p, W // p * p)}")
        tokens = self.patch_embed(x)                                  # (B, h*w, E)
        cls = self.cls_token.expand(x.shape[0], -1, -1)               # (B, 1, E)
        tokens = torch.cat([cls, tokens], dim=1)                      # (B, T, E)
        return tokens + self.interpolate_pos_encoding(H // p, W // p)

    def get_intermediate_layers(self, x, indices):
        """List of (B, E, h, w): outputs of the 0-based blocks `indices`, each passed through
        the final LayerNorm, class token dropped (official norm=True, reshape=True)."""
        indices = [int(i) for i in indices]
        if not indices or any(not 0 <= i < len(self.blocks) for i in indices):
            raise ValueError(f"model.py: ViT: block indices {indices} must lie in "
                             f"0..{len(self.blocks) - 1}")
        B, _, H, W = x.shape
        h, w = H // self.patch_size, W // self.patch_size
        t = self.prepare_tokens(x)                                    # (B, T, E)
        taken = {}
        for i, block in enumerate(self.blocks[:max(indices) + 1]):
            t = block(t)
            if i in indices:
                taken[i] = t
        grids = []
        for i in indices:
            patches = self.norm(taken[i])[:, 1:]                      # (B, h*w, E)
            grids.append(patches.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous())  # (B, E, h, w)
        return grids

    def forward(self, x):
        return self.get_intermediate_layers(x, [len(self.blocks) - 1])[0]  # (B, E, h, w)


# ------------------------------------------------------------------ LILA: frozen encoder + decoder
class LILA(nn.Module):
    """Frozen encoder + trainable decoder. Takes images in [0, 1]; normalises them here."""

    def __init__(self, encoder, decoder, taps):
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.decoder = decoder
        self.taps = tuple(int(t) for t in taps)
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
            return self.encoder.get_intermediate_layers(x, taps or self.taps)

    def forward(self, img):
        """(B, 3, H, W) float in [0, 1], sides multiples of 14 -> (last tapped grid (B, E, h, w),
        pixel features (B, D, H, W)), as the official LILA.forward (enc_grid, dec_features)."""
        grids = self.encode(img)                                     # 4 x (B, E, h, w)
        feats = self.decoder(grids, size=img.shape[-2:])             # (B, D, H, W)
        return grids[-1], feats

    def encoder_features(self, img):
        """The baseline: last tapped grid, bilinearly upsampled to the image size."""
        grid = self.encode(img, taps=self.taps[-1:])[0]              # (B, E, h, w)
        return F.interpolate(grid, size=img.shape[-2:], mode="bilinear", align_corners=False)

    @torch.no_grad()
    def features(self, image, short_side=None, patch=14, range_tol=1 / 255, max_pixels=MAX_PIXELS):
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
    """LILA with a frozen DINOv2 `backbone` and a seeded, untrained decoder of `preset`."""
    cfg = decoder_config(backbone, preset)  # checked before the (slow) encoder is built
    encoder = load_dinov2(backbone, weights, seed=seed)
    spec = BACKBONES[backbone]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = DPTDecoder(spec.embed_dim, **cfg)
    return LILA(encoder, decoder, spec.taps)


# ------------------------------------------------------------------ loading the weights
def _read_state_dict(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"model.py: load_dinov2: weights file '{path}' does not exist. Pass weights='hub' for "
            f"the official checkpoint, a path to a *_pretrain.pth file, or 'none' (random).")
    if os.path.getsize(path) == 0:
        raise RuntimeError(f"model.py: load_dinov2: weights file '{path}' is empty (0 bytes)")
    try:  # weights_only: a plain tensor pickle, no code runs while reading it
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise RuntimeError(f"model.py: load_dinov2: could not read '{path}' as a torch state dict "
                           f"({_first_sentence(e)})") from None


def _first_sentence(e):
    """'Type: first sentence' of an exception, so that an error stays one line."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0].split('. ')[0]}"


def _fetch_hub(name):
    """The official checkpoint through torch.hub's download-and-cache ($TORCH_HOME/hub/checkpoints).

    Hash check: torch.hub's check_hash only verifies names of the form `file-<sha256 prefix>.pth`;
    the official DINOv2 file names carry no hash, so it could check nothing and we pass False
    rather than pretend. What we do check: the download comes over HTTPS from Meta's URL, it is
    read with weights_only=True, every key and shape must match (strict), and load_dinov2's
    `sha256=` argument compares the whole file against a digest you recorded."""
    url = DINOV2_URL.format(name=name)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    was_cached = os.path.exists(cached)
    try:
        state = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=False,
                                                   weights_only=True)
    except Exception as e:
        if was_cached:
            raise RuntimeError(f"model.py: load_dinov2: the cached checkpoint '{cached}' could not be "
                               f"read ({_first_sentence(e)}); delete it to download it again") from None
        raise RuntimeError(
            f"model.py: load_dinov2: could not download {url} ({_first_sentence(e)}); offline? "
            f"fetch the file on a connected machine and either place it at {cached} (torch.hub's "
            f"cache, $TORCH_HOME/hub/checkpoints/) or pass its path as the weights argument "
            f"(e.g. --weights /path/{os.path.basename(url)})") from None
    return state, cached


def _load_strict(model, state, source, name):
    """load_state_dict(strict=True), with an error that lists what differs and guesses why."""
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        keys = list(state)[:5] if isinstance(state, dict) else []
        raise RuntimeError(f"model.py: load_dinov2: '{source}' is not a plain state dict "
                           f"(name -> tensor) like the official {name}_pretrain.pth; got "
                           f"{type(state).__name__} with keys {keys}")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs {name} {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or wrong):
        bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
        if bad is not None:
            raise RuntimeError(f"model.py: load_dinov2: '{source}' has non-finite weights (NaN or inf) in {bad}")
        model.load_state_dict(state, strict=True)
        return
    hints = []
    if any("register_tokens" in k for k in unexpected):
        hints.append("this looks like a *_reg4 checkpoint (with registers), not supported")
    if any(k.startswith(("module.", "backbone.", "teacher.", "student.")) for k in unexpected):
        hints.append("keys carry a wrapper prefix; save the bare backbone state dict")
    if wrong:
        hints.append("shapes differ: is it the checkpoint of another size (S/B/L)?")
    show = lambda ks: f"{len(ks)} {ks[:8]}" + (" ..." if len(ks) > 8 else "")
    raise RuntimeError(f"model.py: load_dinov2: '{source}' does not match {name} (strict loading): "
                       f"missing keys: {show(missing)}; unexpected keys: {show(unexpected)}; "
                       f"shape mismatches: {show(wrong)}; hint: {', '.join(hints) or '-'}")


def file_sha256(path, chunk=1 << 24):
    """sha256 of a file's content: load_dinov2's pin, probe.py's key of a checkpoint."""
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


def load_dinov2(name, weights="hub", seed=0, sha256=None):
    """Frozen eval-mode ViT for `name` in BACKBONES. weights: "hub" (official checkpoint via
    torch.hub's cache in $TORCH_HOME), a path to a state-dict file, or "none" (random init
    seeded by `seed`, announced loudly). `sha256` (optional) must equal the file's digest."""
    if name not in BACKBONES:
        raise ValueError(f"model.py: load_dinov2: unknown backbone '{name}', choose from {list(BACKBONES)}")
    spec = BACKBONES[name]
    if weights != "none":  # read (and check) the file first: a bad one fails before the build
        state, source = _fetch_hub(name) if weights == "hub" else (_read_state_dict(weights), weights)
        if sha256 is not None and file_sha256(source) != sha256.lower():
            raise RuntimeError(f"model.py: load_dinov2: SHA-256 of '{source}' is {file_sha256(source)}, "
                               f"expected {sha256}")
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = ViT(spec.embed_dim, spec.depth, spec.heads)
    if weights == "none":
        _announce_random_weights(name, seed)
    else:
        _load_strict(model, state, source, name)
        print(f"model.py: loaded {name} from {source}", file=sys.stderr, flush=True)
    return model.requires_grad_(False).eval()
