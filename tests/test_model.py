"""Tests for model.py: DINOv2-compatible ViT, weight loading, DPT decoder, LILA wrapper,
the images LILA.features takes and refuses.

The slow references below restate the official DINOv2 formulas (facebookresearch/dinov2,
models/vision_transformer.py and layers/*.py) with explicit loops and matmuls, torch's
bicubic kernel (Keys, a = -0.75) as an explicit matrix, and the official LILA decoder
(google-research lila/lila/dpt_lila.py SmallDPTHead + LILA.norm_feats, util/blocks.py,
config.py) as explicit convs with align_corners=True resizes as explicit matrices and its
parameter shapes per backbone. CPU, offline, about ten seconds.
Run: python -m pytest -q tests/test_model.py
"""
import hashlib
import io
import math
import os
import re
import shutil
import sys
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402

# Official ViT-S/14 checkpoint layout, from facebookresearch/dinov2 with the hub settings of
# dinov2/hub/backbones.py (img_size=518 -> 37x37 positions + class token, patch_size=14,
# init_values=1.0 -> LayerScale present, block_chunks=0 -> flat "blocks.{i}", no registers;
# qkv_bias=True; Mlp ratio 4). 7 top-level + 12 x 14 block tensors = 175 keys, 22,056,576 values.
VITS14_TOP = {
    "cls_token": (1, 1, 384),
    "pos_embed": (1, 1370, 384),
    "mask_token": (1, 384),
    "patch_embed.proj.weight": (384, 3, 14, 14),
    "patch_embed.proj.bias": (384,),
    "norm.weight": (384,),
    "norm.bias": (384,),
}
VITS14_BLOCK = {
    "norm1.weight": (384,), "norm1.bias": (384,),
    "attn.qkv.weight": (1152, 384), "attn.qkv.bias": (1152,),
    "attn.proj.weight": (384, 384), "attn.proj.bias": (384,),
    "ls1.gamma": (384,),
    "norm2.weight": (384,), "norm2.bias": (384,),
    "mlp.fc1.weight": (1536, 384), "mlp.fc1.bias": (1536,),
    "mlp.fc2.weight": (384, 1536), "mlp.fc2.bias": (384,),
    "ls2.gamma": (384,),
}
VITS14_SHAPES = {**VITS14_TOP, **{f"blocks.{i}.{k}": s for i in range(12)
                                  for k, s in VITS14_BLOCK.items()}}

TINY_VIT = dict(embed_dim=48, depth=4, num_heads=4)  # same code, CPU-test size


def tiny_vit(seed=0, gamma_std=0.5):
    """A small ViT whose LayerScales are large enough that every block matters."""
    torch.manual_seed(seed)
    vit = model.ViT(**TINY_VIT)
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if name.endswith("gamma"):
                p.normal_(0.0, gamma_std)
    return vit.eval()


TINY_DEC = model.PRESETS["tiny"]["dinov2_vits14"]  # F=64, D=32, widths (16, 32, 64, 128)


def tiny_lila(seed=0):
    vit = tiny_vit(seed)
    dec = model.DPTDecoder(TINY_VIT["embed_dim"], **TINY_DEC)
    return model.LILA(vit, dec, taps=(0, 1, 2, 3))


# ------------------------------------------------------------------ slow references
def keys_cubic(t, a=-0.75):
    t = abs(t)
    if t <= 1:
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
    return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a if t < 2 else 0.0


def bicubic_matrix(n_out, n_in, scale):
    """(n_out, n_in) weights of torch's bicubic (align_corners=False, border clamped) when
    called with an explicit scale_factor: output i samples input (i + 0.5) / scale - 0.5."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        i0 = math.floor(src)
        for k in range(-1, 3):
            m[i, min(max(i0 + k, 0), n_in - 1)] += keys_cubic(src - i0 - k)
    return m


def slow_dinov2_layers(sd, x, indices, heads, patch=14, offset=0.1, eps=1e-6):
    """Official DINOv2 get_intermediate_layers(x, n=indices, reshape=True, norm=True),
    written out in float64 from a state dict: explicit patch matmul, per-head softmax loop."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    B, _, H, W = x.shape
    h, w, E = H // patch, W // patch, sd["cls_token"].shape[-1]
    M = math.isqrt(sd["pos_embed"].shape[1] - 1)
    patches = x.reshape(B, 3, h, patch, w, patch).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, -1)
    tok = patches @ sd["patch_embed.proj.weight"].reshape(E, -1).T + sd["patch_embed.proj.bias"]
    tok = torch.cat([sd["cls_token"].expand(B, 1, E), tok], dim=1)
    pos = sd["pos_embed"][0]
    if (h, w) != (M, M):  # official: untouched at the native grid, else offset bicubic
        table = pos[1:].reshape(M, M, E)
        grid = torch.einsum("im,mne,jn->ije", bicubic_matrix(h, M, (h + offset) / M), table,
                            bicubic_matrix(w, M, (w + offset) / M)).reshape(h * w, E)
        pos = torch.cat([pos[:1], grid])
    t = tok + pos

    def ln(z, p):
        mu = z.mean(-1, keepdim=True)
        var = ((z - mu) ** 2).mean(-1, keepdim=True)
        return (z - mu) / torch.sqrt(var + eps) * sd[p + ".weight"] + sd[p + ".bias"]

    def lin(z, p):
        return z @ sd[p + ".weight"].T + sd[p + ".bias"]

    out, d = {}, E // heads
    for i in range(max(indices) + 1):
        b = f"blocks.{i}."
        q, k, v = lin(ln(t, b + "norm1"), b + "attn.qkv").split(E, dim=-1)
        per_head = []
        for hd in range(heads):
            s = slice(hd * d, (hd + 1) * d)
            att = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d), dim=-1)
            per_head.append(att @ v[..., s])
        t = t + sd[b + "ls1.gamma"] * lin(torch.cat(per_head, -1), b + "attn.proj")
        y = lin(ln(t, b + "norm2"), b + "mlp.fc1")
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))  # exact GELU
        t = t + sd[b + "ls2.gamma"] * lin(y, b + "mlp.fc2")
        out[i] = t
    return [ln(out[i], "norm")[:, 1:].reshape(B, h, w, E).permute(0, 3, 1, 2) for i in indices]


# ------------------------------------------------------------------ encoder
def test_vits14_has_exactly_the_official_keys_and_shapes():
    vit = model.ViT()  # defaults = ViT-S/14 on torch.hub
    got = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    assert got == VITS14_SHAPES
    assert sum(math.prod(s) for s in got.values()) == 22_056_576
    g = torch.Generator().manual_seed(0)
    official_like = {k: torch.randn(s, generator=g) for k, s in VITS14_SHAPES.items()}
    vit.load_state_dict(official_like, strict=True)


@pytest.mark.parametrize("size", [(98, 70), (518, 518), (224, 224)])
def test_intermediate_layers_match_slow_official_reference(size):
    vit = tiny_vit()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    idx = [0, 2, 3]
    with torch.no_grad():
        got = vit.get_intermediate_layers(x, idx, reshape=True)
    ref = slow_dinov2_layers(vit.state_dict(), x, idx, heads=TINY_VIT["num_heads"])
    for g, r in zip(got, ref):
        assert g.shape == (2, TINY_VIT["embed_dim"], size[0] // 14, size[1] // 14)
        torch.testing.assert_close(g.double(), r, atol=2e-4, rtol=1e-4)


def test_pos_embed_interpolation_is_identity_at_native_37x37_grid():
    vit = tiny_vit()
    assert vit.interpolate_pos_encoding(37, 37) is vit.pos_embed
    assert vit.interpolate_pos_encoding(37, 36).shape == (1, 1 + 37 * 36, TINY_VIT["embed_dim"])


def test_pos_embed_interpolation_uses_official_offset_not_output_size():
    vit = tiny_vit()
    h, w = 16, 11
    got = vit.interpolate_pos_encoding(h, w)[0, 1:].double()          # (h*w, E)
    table = vit.pos_embed[0, 1:].detach().double().reshape(37, 37, -1)
    ref = lambda sh, sw: torch.einsum("im,mne,jn->ije", bicubic_matrix(h, 37, sh), table,
                                      bicubic_matrix(w, 37, sw)).reshape(h * w, -1)
    torch.testing.assert_close(got, ref((h + 0.1) / 37, (w + 0.1) / 37), atol=1e-5, rtol=1e-5)
    assert (got - ref(h / 37, w / 37)).abs().max() > 1e-3  # the offset does change the numbers


@pytest.mark.parametrize("size", [(225, 224), (224, 100)])
def test_non_multiple_of_14_input_raises_naming_the_size(size):
    with pytest.raises(ValueError, match=f"{size[0]}x{size[1]}"):
        tiny_vit().get_intermediate_layers(torch.zeros(1, 3, *size), [0], reshape=True)


def test_vit_state_dict_round_trip_is_strict_and_exact():
    a, b = tiny_vit(seed=0), tiny_vit(seed=1)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    x = torch.rand(1, 3, 56, 42)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


# ------------------------------------------------------------------ load_encoder
@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """A file in the official format (random values), as dinov2_vits14_pretrain.pth."""
    g = torch.Generator().manual_seed(0)
    sd = {k: 0.02 * torch.randn(s, generator=g) for k, s in VITS14_SHAPES.items()}
    path = tmp_path_factory.mktemp("weights") / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    return path, sd


def assert_loaded(enc, sd):
    assert not enc.training
    assert all(not p.requires_grad for p in enc.parameters())
    got = enc.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())


def test_load_encoder_from_path_is_strict_frozen_and_eval(official_file):
    path, sd = official_file
    assert_loaded(model.load_encoder("dinov2_vits14", str(path)), sd)


def test_load_encoder_hub_reads_prefilled_torch_home_cache(official_file, tmp_path, monkeypatch):
    path, sd = official_file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert torch.hub.get_dir() == str(tmp_path / "hub")
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    shutil.copy(path, cache / "dinov2_vits14_pretrain.pth")

    def no_download(*args, **kwargs):
        raise AssertionError("torch.hub tried to download although the file is cached")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert_loaded(model.load_encoder("dinov2_vits14", "hub", sha256=digest), sd)
    with pytest.raises(RuntimeError, match="SHA-256"):
        model.load_encoder("dinov2_vits14", "hub", sha256="0" * 64)


def test_hub_download_failure_says_how_to_provide_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match="could not download") as err:
        model.load_encoder("dinov2_vits14", "hub")
    msg = str(err.value)
    assert os.path.join(str(tmp_path), "hub", "checkpoints", "dinov2_vits14_pretrain.pth") in msg
    assert "dinov2_vits14/dinov2_vits14_pretrain.pth" in msg and "weights" in msg
    assert "\n" not in msg


def test_wrong_keys_and_shapes_give_a_helpful_error(official_file, tmp_path):
    _, sd = official_file
    bad = dict(sd)
    bad["blocks.0.ls1.scale"] = bad.pop("blocks.0.ls1.gamma")
    bad["norm.weight"] = torch.zeros(10)
    path = tmp_path / "renamed.pth"
    torch.save(bad, path)
    with pytest.raises(RuntimeError) as err:
        model.load_encoder("dinov2_vits14", str(path))
    msg = str(err.value)
    for needle in (str(path), "blocks.0.ls1.gamma", "blocks.0.ls1.scale", "norm.weight: file (10,)"):
        assert needle in msg, (needle, msg)
    assert "\n" not in msg


def test_unreadable_weights_files_are_one_line_naming_the_file(official_file, tmp_path):
    data = official_file[0].read_bytes()
    for name, content in {"empty.pth": b"", "text.pth": b"Not Found\n",
                          "cut.pth": data[:len(data) // 3]}.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(RuntimeError) as err:
            model.load_encoder("dinov2_vits14", str(tmp_path / name))
        msg = str(err.value)
        assert msg.startswith("model.py: load_encoder: ") and str(tmp_path / name) in msg
        assert "\n" not in msg, msg
        assert err.value.__cause__ is None  # no chained traceback from inside torch.load
        assert err.value.__context__ is None or err.value.__suppress_context__


def test_missing_file_and_unknown_names_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        model.load_encoder("dinov2_vits14", str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="dinov2_vits14"):
        model.load_encoder("dinov2_vitx14", "none")
    with pytest.raises(ValueError, match="tiny"):
        model.build_lila(weights="none", preset="huge")


def test_random_init_is_seeded_and_announced_once_per_process(capfd, monkeypatch):
    monkeypatch.setattr(model, "_random_weights_announced", False)  # as in a fresh process
    a = model.load_encoder("dinov2_vits14", "none", seed=0).state_dict()
    b = model.load_encoder("dinov2_vits14", "none", seed=0).state_dict()
    c = model.load_encoder("dinov2_vits14", "none", seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["pos_embed"], c["pos_embed"])
    assert capfd.readouterr().err.count("RANDOM weights") == 1  # three builds, one banner


# ------------------------------------------------------------------ decoder and LILA
@pytest.mark.parametrize("size", [(224, 224), (210, 154), (56, 98)])
def test_lila_shapes_square_and_non_square(size):
    lila = tiny_lila()
    img = torch.rand(2, 3, *size)
    enc, feats = lila(img)
    h, w = size[0] // 14, size[1] // 14
    assert enc.shape == (2, TINY_VIT["embed_dim"], h, w)
    assert feats.shape == (2, TINY_DEC["out_dim"], *size)
    assert lila.decoder.out_dim == feats.shape[1]
    assert lila.encoder_features(img).shape == (2, TINY_VIT["embed_dim"], *size)


def test_decoder_features_are_layer_normed_per_pixel():
    _, feats = tiny_lila()(torch.rand(1, 3, 112, 84))
    torch.testing.assert_close(feats.mean(1), torch.zeros(1, 112, 84), atol=1e-5, rtol=0)
    torch.testing.assert_close(feats.var(1, unbiased=False), torch.ones(1, 112, 84), atol=1e-3, rtol=0)


def test_lila_normalises_with_imagenet_stats_and_upsamples_the_last_tap():
    lila = tiny_lila()
    img = torch.rand(1, 3, 70, 56)
    mean = torch.tensor(model.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(model.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        grid = lila.encoder.get_intermediate_layers((img - mean) / std, [3], reshape=True)[0]
    enc, _ = lila(img)
    torch.testing.assert_close(enc, grid)
    up = F.interpolate(grid, size=(70, 56), mode="bilinear", align_corners=False)
    torch.testing.assert_close(lila.encoder_features(img), up)
    with pytest.raises(ValueError, match="0..255"):
        lila(img * 255)


def test_only_the_decoder_gets_gradients_and_encoder_stays_eval():
    lila = tiny_lila().train()
    assert lila.decoder.training and not lila.encoder.training
    assert all(not p.requires_grad for p in lila.encoder.parameters())
    trainable = {id(p) for p in lila.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lila.decoder.parameters()}
    enc, feats = lila(torch.rand(2, 3, 56, 70))
    assert not enc.requires_grad
    (feats[:, :3] ** 2).mean().backward()
    assert all(p.grad is None for p in lila.encoder.parameters())
    grads = [p.grad for p in lila.decoder.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_tiny_preset_forward_backward_step_changes_features():
    lila = model.build_lila("dinov2_vits14", weights="none", preset="tiny", seed=0)
    img = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD([p for p in lila.parameters() if p.requires_grad], lr=0.1)
    _, feats = lila(img)
    target = torch.randn_like(feats)
    loss = (feats - target).abs().mean()
    loss.backward()
    opt.step()
    _, feats2 = lila(img)
    assert torch.isfinite(loss) and (feats2 - target).abs().mean() < loss


def test_decoder_state_dict_round_trip_is_strict_and_exact():
    a = tiny_lila(seed=0)
    torch.manual_seed(5)
    other = model.DPTDecoder(TINY_VIT["embed_dim"], **TINY_DEC)
    buf = io.BytesIO()
    torch.save(a.decoder.state_dict(), buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    b = model.LILA(a.encoder, other, a.taps)
    img = torch.rand(1, 3, 42, 56)
    with torch.no_grad():
        assert torch.equal(a(img)[1], b(img)[1])


# ------------------------------------------------------------------ decoder vs the official code
# Official lila/lila/config.py (lila_config): fusion width F ("features") and reassemble widths
# ("out_channels") per backbone; the official LILA's D is features // 2 (dec_dim).
OFFICIAL_CONFIG = {
    "dinov2_vits14": (2 * 128, (48, 96, 192, 384)),
    "dinov2_vitb14": (2 * 192, (96, 192, 384, 768)),
    "dinov2_vitl14": (2 * 256, (256, 512, 1024, 1024)),
}


def official_head_shapes(E, F_, widths):
    """Parameter shapes of the official SmallDPTHead(use_bn=False, use_clstoken=False), under
    its own names, written out from lila/lila/dpt_lila.py and lila/lila/util/blocks.py."""
    s = {}
    for i, w in enumerate(widths):
        s[f"projects.{i}.weight"], s[f"projects.{i}.bias"] = (w, E, 1, 1), (w,)
        s[f"scratch.layer{i + 1}_rn.weight"] = (F_, w, 3, 3)          # bias=False
    for i, k in ((0, 4), (1, 2), (3, 3)):  # ConvTranspose k=s=4, k=s=2, (Identity), Conv 3x3 s2
        s[f"resize_layers.{i}.weight"] = (widths[i], widths[i], k, k)
        s[f"resize_layers.{i}.bias"] = (widths[i],)
    for r in range(1, 5):
        for unit in ("resConfUnit1", "resConfUnit2"):
            for c in ("conv1", "conv2"):
                s[f"scratch.refinenet{r}.{unit}.{c}.weight"] = (F_, F_, 3, 3)
                s[f"scratch.refinenet{r}.{unit}.{c}.bias"] = (F_,)
        s[f"scratch.refinenet{r}.out_conv.weight"], s[f"scratch.refinenet{r}.out_conv.bias"] = (F_, F_, 1, 1), (F_,)
    s["scratch.output_conv1.weight"], s["scratch.output_conv1.bias"] = (F_ // 2, F_, 3, 3), (F_ // 2,)
    s["scratch.output_conv2.0.weight"], s["scratch.output_conv2.0.bias"] = (F_ // 2, F_ // 2, 3, 3), (F_ // 2,)
    s["scratch.output_conv2.2.weight"], s["scratch.output_conv2.2.bias"] = (F_ // 2, F_ // 2, 1, 1), (F_ // 2,)
    return s


OUR_TO_OFFICIAL = [  # our DPTDecoder parameter names -> the official SmallDPTHead's
    (r"^reassemble\.(\d)\.project\.", lambda m: f"projects.{m[1]}."),
    (r"^reassemble\.(\d)\.resample\.", lambda m: f"resize_layers.{m[1]}."),
    (r"^reassemble\.(\d)\.to_features\.", lambda m: f"scratch.layer{int(m[1]) + 1}_rn."),
    (r"^fusion\.(\d)\.skip_unit\.", lambda m: f"scratch.refinenet{int(m[1]) + 1}.resConfUnit1."),
    (r"^fusion\.(\d)\.unit\.", lambda m: f"scratch.refinenet{int(m[1]) + 1}.resConfUnit2."),
    (r"^fusion\.(\d)\.out_conv\.", lambda m: f"scratch.refinenet{int(m[1]) + 1}.out_conv."),
    (r"^head_conv1\.", lambda m: "scratch.output_conv1."),
    (r"^head_conv2\.", lambda m: "scratch.output_conv2.0."),
    (r"^head_out\.", lambda m: "scratch.output_conv2.2."),
]


def as_official_shapes(decoder):
    out = {}
    for name, p in decoder.named_parameters():
        for pattern, repl in OUR_TO_OFFICIAL:
            if re.match(pattern, name):
                out[re.sub(pattern, repl, name)] = tuple(p.shape)
                break
        else:
            raise AssertionError(f"no official counterpart for {name}")
    return out


def assert_official_decoder_shapes(decoder, backbone):
    F_, widths = OFFICIAL_CONFIG[backbone]
    want = official_head_shapes(model.BACKBONES[backbone].embed_dim, F_, widths)
    # The official refinenet4 builds a resConfUnit1 it never calls; ours does not build it.
    want = {k: v for k, v in want.items() if not k.startswith("scratch.refinenet4.resConfUnit1.")}
    assert as_official_shapes(decoder) == want
    assert decoder.out_dim == F_ // 2
    # The official fnorm's affine weight and bias never train: ours has none.
    assert list(decoder.norm.parameters()) == []


@pytest.mark.parametrize("backbone", list(OFFICIAL_CONFIG))
def test_paper_preset_builds_the_official_decoder_shapes(backbone):
    cfg = model.PRESETS["paper"][backbone]
    assert (cfg["features"], cfg["widths"]) == OFFICIAL_CONFIG[backbone]
    with torch.device("meta"):  # shapes only: ViT-L's decoder has 63 M parameters
        decoder = model.DPTDecoder(model.BACKBONES[backbone].embed_dim, **cfg)
    assert_official_decoder_shapes(decoder, backbone)


def test_presets_cover_every_backbone_with_d_half_of_f():
    for preset, table in model.PRESETS.items():
        assert set(table) == set(model.BACKBONES), preset
        for cfg in table.values():
            assert cfg["out_dim"] == cfg["features"] // 2 and len(cfg["widths"]) == 4
    assert model.PRESETS["tiny"]["dinov2_vits14"] == dict(features=64, out_dim=32, widths=(16, 32, 64, 128))
    with pytest.raises(ValueError, match="preset 'huge'"):
        model.decoder_config("dinov2_vits14", "huge")


def bilinear_matrix_align_corners(n_out, n_in):
    """(n_out, n_in) weights of bilinear resizing with align_corners=True: output i samples
    input i (n_in - 1) / (n_out - 1), linear between the two neighbours."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        i0 = min(math.floor(src), n_in - 1)
        m[i, i0] += 1 - (src - i0)
        if src > i0:
            m[i, i0 + 1] += src - i0
    return m


def resize_align_corners(x, size):
    return torch.einsum("ih,bchw,jw->bcij", bilinear_matrix_align_corners(size[0], x.shape[2]), x,
                        bilinear_matrix_align_corners(size[1], x.shape[3]))


def slow_official_decoder(sd, grids, size, eps=1e-5):
    """SmallDPTHead.forward + LILA.norm_feats of the official lila/lila/dpt_lila.py, written
    out with explicit convs from our state dict, resizes as explicit align_corners=True
    matrices, the final 2x resize of refinenet1 as its scale_factor=2, the LayerNorm by hand."""
    def conv(x, p, **kw):
        return F.conv2d(x, sd[p + ".weight"], sd.get(p + ".bias"), **kw)

    def rcu(x, p):  # ResidualConvUnit: out = conv2(relu(conv1(relu(x)))) + x
        return conv(torch.relu(conv(torch.relu(x), p + ".conv1", padding=1)), p + ".conv2", padding=1) + x

    layer = []
    for i, g in enumerate(grids):
        x = conv(g, f"reassemble.{i}.project")
        r = f"reassemble.{i}.resample"
        if i < 2:
            x = F.conv_transpose2d(x, sd[r + ".weight"], sd[r + ".bias"], stride=4 // (i + 1))
        elif i == 3:
            x = conv(x, r, stride=2, padding=1)
        layer.append(conv(x, f"reassemble.{i}.to_features", padding=1))  # layer{i+1}_rn
    # refinenet4 (one input) -> size of layer 3; refinenet3, 2 -> next sizes; refinenet1 -> x2.
    path = conv(resize_align_corners(rcu(layer[3], "fusion.3.unit"), layer[2].shape[-2:]),
                "fusion.3.out_conv")
    for i in (2, 1, 0):
        x = path + rcu(layer[i], f"fusion.{i}.skip_unit")
        target = layer[i - 1].shape[-2:] if i else tuple(2 * s for s in layer[0].shape[-2:])
        path = conv(resize_align_corners(rcu(x, f"fusion.{i}.unit"), target), f"fusion.{i}.out_conv")
    out = resize_align_corners(conv(path, "head_conv1", padding=1), size)   # output_conv1, resize
    out = conv(torch.relu(conv(out, "head_conv2", padding=1)), "head_out")  # output_conv2
    mu = out.mean(1, keepdim=True)
    return (out - mu) / torch.sqrt(((out - mu) ** 2).mean(1, keepdim=True) + eps)


@pytest.mark.parametrize("grid", [(3, 5), (4, 4)])
def test_decoder_matches_slow_official_reference(grid):
    torch.manual_seed(0)
    E = TINY_VIT["embed_dim"]
    dec = model.DPTDecoder(E, **TINY_DEC).double()
    grids = [torch.randn(2, E, *grid, dtype=torch.float64) for _ in range(4)]
    size = (14 * grid[0], 14 * grid[1])
    with torch.no_grad():
        got = dec(grids, size)
        ref = slow_official_decoder(dec.state_dict(), grids, size)
        assert got.shape == (2, TINY_DEC["out_dim"], *size)
        torch.testing.assert_close(got, ref, atol=1e-9, rtol=1e-9)
        # The reference can tell: the same weights resized with align_corners=False differ.
        other = model.DPTDecoder(E, **TINY_DEC, align_corners=False).double()
        other.load_state_dict(dec.state_dict())
        assert (other(grids, size) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("backbone", list(model.BACKBONES))
def test_tiny_decoder_shapes_per_backbone(backbone):
    E, cfg = model.BACKBONES[backbone].embed_dim, model.PRESETS["tiny"][backbone]
    torch.manual_seed(0)
    dec = model.DPTDecoder(E, **cfg)
    with torch.no_grad():
        out = dec([torch.randn(1, E, 3, 5) for _ in range(4)], (42, 70))
    assert out.shape == (1, cfg["out_dim"], 42, 70) and dec.out_dim == cfg["out_dim"]
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------ LILA.features: accepted images
@pytest.fixture(scope="module")
def small_lila():
    return tiny_lila().eval()


def rgb8(h=20, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)  # (H, W, 3)


def canonical(small_lila, chw):
    """The reference call: a float32 tensor (3, H, W) in [0, 1]."""
    return small_lila.features(chw.float())


def test_features_of_uint8_kinds_equal_the_float_tensor(small_lila):
    a = rgb8()
    ref = canonical(small_lila, torch.from_numpy(a).permute(2, 0, 1) / 255.0)
    assert ref.shape == (TINY_DEC["out_dim"], 20, 30)
    got = {
        "numpy uint8": small_lila.features(a),
        "PIL RGB": small_lila.features(Image.fromarray(a)),
        "PIL RGBA (alpha dropped)": small_lila.features(Image.fromarray(np.dstack([a, a[..., :1]]))),
        "tensor uint8": small_lila.features(torch.from_numpy(a).permute(2, 0, 1).contiguous()),
        "numpy float32 in [0, 1]": small_lila.features(a.astype(np.float32) / 255),
        "numpy float64 in [0, 1]": small_lila.features(a / 255.0),
    }
    for kind, f in got.items():
        torch.testing.assert_close(f, ref, msg=kind)
    # A float image in [0, 1] is not divided by 255 again (the features differ if it is).
    assert (canonical(small_lila, torch.from_numpy(a).permute(2, 0, 1) / 255.0 ** 2) - ref).abs().max() > 0.1


def test_features_of_grey_and_16_bit_images_equal_the_float_tensor(small_lila):
    g16 = np.random.default_rng(1).integers(0, 65536, (20, 30), dtype=np.uint16)  # (H, W)
    ref16 = canonical(small_lila, torch.from_numpy(g16.astype(np.float32) / 65535).expand(3, -1, -1))
    for kind, img in {"PIL I;16": Image.fromarray(g16),
                      "PIL I (32-bit, as many 16-bit PNGs open)": Image.fromarray(g16.astype(np.int32)),
                      "numpy uint16 (H, W)": g16,
                      "numpy uint16 (H, W, 3)": np.repeat(g16[..., None], 3, axis=2),
                      "tensor uint16": torch.from_numpy(g16.astype(np.int32)).to(torch.uint16).expand(3, -1, -1)}.items():
        torch.testing.assert_close(small_lila.features(img), ref16, msg=kind)
    # A dark 16-bit image is not white (PIL's convert("RGB") clips I;16 to 255 = white).
    dark = Image.fromarray(np.full((20, 30), 3000, np.uint16))
    white = canonical(small_lila, torch.ones(3, 20, 30))
    assert (small_lila.features(dark) - white).abs().max() > 0.1
    g8 = rgb8()[..., 0]
    ref8 = canonical(small_lila, torch.from_numpy(g8).expand(3, -1, -1) / 255.0)
    for kind, img in {"PIL L": Image.fromarray(g8), "numpy (H, W)": g8, "numpy (H, W, 1)": g8[..., None],
                      "PIL F": Image.fromarray(g8.astype(np.float32) / 255)}.items():
        torch.testing.assert_close(small_lila.features(img), ref8, msg=kind)


def test_features_of_a_batch_equal_each_image_and_tolerate_rounding(small_lila):
    x = torch.rand(2, 3, 20, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    f = small_lila.features(x)
    assert f.shape == (2, TINY_DEC["out_dim"], 20, 30)
    for i in range(2):
        torch.testing.assert_close(f[i], canonical(small_lila, x[i]))
    y = x[0].float().clone()
    y[0, 0, 0], y[0, 0, 1] = 1 + 1e-4, -1e-4  # within one 8-bit level: accepted, not clipped
    assert small_lila.features(y).shape == (TINY_DEC["out_dim"], 20, 30)


# ------------------------------------------------------------------ LILA.features: refusals
def nan_image():
    x = torch.rand(3, 20, 30)
    x[1, 2, 3] = float("nan")
    return x


REFUSED = {
    "float 0..255 numpy": (lambda: rgb8().astype(np.float32), r"\[0, 255\], expected \[0, 1\]"),
    "float above 1 + tol": (lambda: torch.full((3, 20, 30), 1.01), r"\[1.01, 1.01\], expected \[0, 1\]"),
    "negative float": (lambda: torch.full((3, 20, 30), -0.5), r"expected \[0, 1\]"),
    "NaN": (nan_image, "non-finite"),
    "inf": (lambda: torch.full((1, 3, 20, 30), float("inf")), "non-finite"),
    "numpy RGBA": (lambda: np.zeros((20, 30, 4), np.uint8), r"\(20, 30, 4\)"),
    "numpy 2 channels": (lambda: np.zeros((20, 30, 2), np.uint8), r"\(20, 30, 2\)"),
    "tensor 4 channels": (lambda: torch.rand(4, 20, 30), r"\(4, 20, 30\)"),
    "tensor HWC": (lambda: torch.rand(20, 30, 3), r"permute\(2, 0, 1\)"),
    "tensor 2-D": (lambda: torch.rand(20, 30), r"\(20, 30\)"),
    "0x0 PIL": (lambda: Image.new("RGB", (0, 0)), "empty \\(0x0 pixels\\)"),
    "0x5 numpy": (lambda: np.zeros((0, 5, 3), np.uint8), "empty \\(0x5 pixels\\)"),
    "empty batch": (lambda: torch.rand(0, 3, 20, 30), "no image"),
    "int64 numpy": (lambda: np.zeros((20, 30, 3), np.int64), "int64"),
    "bool numpy": (lambda: np.zeros((20, 30, 3), bool), "bool"),
    "int32 tensor": (lambda: torch.zeros(3, 20, 30, dtype=torch.int32), "int32"),
    "PIL I beyond 16 bit": (lambda: Image.fromarray(np.full((20, 30), 70000, np.int32)), "70000"),
    "a list": (lambda: [[0, 1], [1, 0]], "got list"),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_features_refuse_bad_images_with_one_clear_line(small_lila, kind):
    make, needle = REFUSED[kind]
    with pytest.raises(ValueError, match=r"^model\.py: LILA\.features: ") as err:
        small_lila.features(make())
    assert re.search(needle, str(err.value)), str(err.value)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ every constant pinned to its source
# Official values, each with where it is written: lila/lila/dinov2.py (vit_small/base/large and
# DINOv2(): img_size=518, patch_size=14, init_values=1.0, mlp_ratio 4, LayerNorm eps 1e-6,
# interpolate_offset 0.1, antialias False), lila/lila/config.py (features, out_channels,
# intermediate_layer_idx), lila/lila/dpt_lila.py (SmallDPTHead: resize factors 4, 2, 1, 1/2,
# head F -> F/2 -> F/2, dec_dim = features // 2, fnorm = nn.LayerNorm(dec_dim), eps 1e-5),
# lila/lila/util/blocks.py (align_corners=True, refinenet1's scale_factor=2).
OFFICIAL_BACKBONES = {  # E, depth, heads, intermediate_layer_idx
    "dinov2_vits14": (384, 12, 6, (2, 5, 8, 11)),
    "dinov2_vitb14": (768, 12, 12, (2, 5, 8, 11)),
    "dinov2_vitl14": (1024, 24, 16, (4, 11, 17, 23)),
}


def test_backbone_and_preset_constants_are_the_official_ones():
    assert {k: tuple(model.BACKBONES[k][:4]) for k in OFFICIAL_BACKBONES} == OFFICIAL_BACKBONES
    paper = {b: (c["features"], c["widths"], c["out_dim"]) for b, c in model.PRESETS["paper"].items()
             if b in OFFICIAL_BACKBONES}  # the other backbones: tests/test_backbones.py
    assert paper == {b: (F_, w, F_ // 2) for b, (F_, w) in OFFICIAL_CONFIG.items()}
    assert [paper[b][2] for b in OFFICIAL_BACKBONES] == [128, 192, 256]  # the paper's D
    tiny = {b: (c["features"], c["widths"], c["out_dim"]) for b, c in model.PRESETS["tiny"].items()
            if b in OFFICIAL_BACKBONES}
    assert tiny == {"dinov2_vits14": (64, (16, 32, 64, 128), 32),
                    "dinov2_vitb14": (96, (32, 64, 128, 256), 48),
                    "dinov2_vitl14": (128, (64, 128, 256, 256), 64)}
    assert model.IMAGENET_MEAN == (0.485, 0.456, 0.406) and model.IMAGENET_STD == (0.229, 0.224, 0.225)


def test_encoder_and_decoder_defaults_are_the_official_ones():
    import inspect
    vit = {k: p.default for k, p in inspect.signature(model.ViT).parameters.items()}
    assert vit == dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, patch_size=14, img_size=518,
                       layerscale_init=1e-5, ln_eps=1e-6, interpolate_offset=0.1,
                       interpolate_antialias=False, ffn="mlp", num_register_tokens=0, rope_base=None,
                       n_storage_tokens=0, mask_k_bias=False)
    dec = {k: p.default for k, p in inspect.signature(model.DPTDecoder).parameters.items()}
    assert {k: dec[k] for k in ("factors", "last_upsample", "align_corners", "ln_eps")} == dict(
        factors=(4, 2, 1, 0.5), last_upsample=2, align_corners=True, ln_eps=1e-5)
    for name, (E, depth, heads, _) in OFFICIAL_BACKBONES.items():
        with torch.device("meta"):
            enc = model.ViT(*model.BACKBONES[name][:3])
        assert (enc.embed_dim, len(enc.blocks), enc.blocks[0].attn.heads, enc.patch_size) == (E, depth, heads, 14)
        assert enc.blocks[0].mlp.fc1.out_features == 4 * E and enc.norm.eps == 1e-6
        assert enc.pos_embed.shape == (1, 1 + 37 * 37, E)
    with torch.device("meta"):
        d = model.DPTDecoder(384, **model.PRESETS["paper"]["dinov2_vits14"])
    assert (d.head_conv1.out_channels, d.head_conv2.out_channels, d.head_out.out_channels) == (128, 128, 128)
    assert d.norm.eps == 1e-5 and d.norm.normalized_shape == (128,)


@pytest.mark.parametrize("backbone", ["dinov2_vits14", "dinov2_vitl14"])
def test_lila_taps_exactly_the_named_blocks_through_the_final_norm(backbone):
    """A random encoder built with LayerScale 1e-5 barely changes from block to block, so a
    wrong tap or head count would hardly show in its numbers. Here every block's LayerScale is
    large: each tapped grid must equal the slow official statement at the official indices
    (official head count, final norm) and differ clearly from the neighbouring blocks."""
    E, depth, heads, taps = OFFICIAL_BACKBONES[backbone]
    if backbone == "dinov2_vits14":  # the real build
        lila = model.build_lila(backbone, weights="none", preset="tiny", seed=0)
        assert lila.taps == taps and len(lila.encoder.blocks) == depth
    else:  # ViT-L's 24 blocks and taps at CPU-test width (its 300 M values take 30 s to draw)
        torch.manual_seed(0)
        vit = model.ViT(32, model.BACKBONES[backbone].depth, 2)
        heads = 2
        lila = model.LILA(vit, model.DPTDecoder(32, **TINY_DEC), model.BACKBONES[backbone].taps)
        assert lila.taps == taps and len(lila.encoder.blocks) == depth
    with torch.no_grad():
        for name, p in lila.encoder.named_parameters():
            if name.endswith("gamma"):
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    img = torch.rand(1, 3, 28, 42, generator=torch.Generator().manual_seed(0))
    x = (img - lila.mean) / lila.std
    got = lila.encode(img)
    near = sorted({t + s for t in taps for s in (-1, 1)} - set(taps))
    near = [i for i in near if 0 <= i < depth]
    sd = lila.encoder.state_dict()
    ref = slow_dinov2_layers(sd, x, list(taps) + near, heads=heads)
    for i, (g, r) in enumerate(zip(got, ref)):
        torch.testing.assert_close(g.double(), r, atol=2e-4, rtol=1e-4)
        for j, other in zip(near, ref[len(taps):]):
            if abs(j - taps[i]) == 1:  # a neighbouring block is clearly another grid
                assert (g.double() - other).abs().max() > 0.01, (taps[i], j)
    # The final norm is applied: without it the grids differ.
    raw = lila.encoder.blocks[0](lila.encoder.prepare_tokens(x))
    for blk in lila.encoder.blocks[1:taps[0] + 1]:
        raw = blk(raw)
    assert (raw[:, 1:].transpose(1, 2).reshape_as(got[0]) - got[0]).abs().max() > 0.05


# ------------------------------------------------------------------ inputs and weights that cannot be right
def test_encode_refuses_images_outside_unit_range_saying_which_convention():
    lila = tiny_lila()
    dark = torch.rand(1, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 0.3
    mean = torch.tensor(model.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(model.IMAGENET_STD).view(1, 3, 1, 1)
    normalised = (dark - mean) / std                  # the official input: max < 2, min < 0
    assert normalised.max() < 2 < -normalised.min()
    for bad in (normalised, dark + 0.75, dark - 0.1):
        with pytest.raises(ValueError) as err:
            lila(bad)
        msg = str(err.value)
        assert msg.startswith("model.py: LILA: image values span") and "expected [0, 1]" in msg, msg
        assert "ImageNet-normalised" in msg and "normalised twice" in msg and "\n" not in msg
    # Rounding and resizing may step one 8-bit level outside: accepted.
    edge = dark.clone()
    edge[0, 0, 0, 0], edge[0, 1, 0, 0] = 1 + 0.9 / 255, -0.9 / 255
    lila(edge)
    assert model.UNIT_TOL == 1 / 255


def test_features_refuse_a_12_megapixel_photo_before_spending_anything(small_lila):
    photo = torch.zeros(3, 1, 1).expand(3, 3000, 4000)  # 12 MP that take no memory
    with pytest.raises(ValueError) as err:
        small_lila.features(photo)
    msg = str(err.value)
    assert msg.startswith("model.py: LILA.features: 4000x3000 px (12.0 MP") and "\n" not in msg, msg
    assert "max_pixels=2073600" in msg and "1x32x3000x4000 float32 features (1.5 GB)" in msg
    assert "max_pixels=None" in msg
    # A lower run size does not help: the features still come back at 3000 x 4000.
    with pytest.raises(ValueError, match="run at 42x28"):
        small_lila.features(photo, short_side=28)
    # The bound is an argument: None runs it, a smaller one refuses a smaller image.
    img = torch.rand(3, 28, 42)
    assert small_lila.features(img, max_pixels=None).shape == (32, 28, 42)
    with pytest.raises(ValueError, match="max_pixels=1000"):
        small_lila.features(img, max_pixels=1000)
    assert model.MAX_PIXELS == 1920 * 1080


def test_dinov2_file_with_non_finite_weights_is_refused_naming_the_tensor(official_file, tmp_path):
    _, sd = official_file
    bad = dict(sd)
    bad["blocks.7.mlp.fc2.weight"] = sd["blocks.7.mlp.fc2.weight"].clone()
    bad["blocks.7.mlp.fc2.weight"][3, 3] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(bad, path)
    with pytest.raises(RuntimeError) as err:
        model.load_encoder("dinov2_vits14", str(path))
    msg = str(err.value)
    assert str(path) in msg and "blocks.7.mlp.fc2.weight" in msg and "non-finite" in msg
