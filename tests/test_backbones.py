"""Tests for the encoders beyond DINOv2 S/B/L (model.py): DINOv2 with registers, ViT-g/14 and
DINOv3, each against a slow statement of its official forward.

The statements below restate facebookresearch/dinov2 and facebookresearch/dinov3 (models/
vision_transformer.py, layers/*.py, hub/backbones.py) in float64 with explicit loops: the patch
matmul, the position table resized by explicit bicubic matrices (the register models: torch's
antialiased kernel, PIL's a = -0.5 cubic stretched when shrinking), the registers / storage
tokens, RoPE as explicit rotations of channel pairs (c, c + d/2), the k-masked qkv bias, a
per-head softmax, exact GELU or SwiGLU, LayerScale, the final LayerNorm. The weights are seeded
values in the official file layout (every key and shape written out here), saved to a file and
read back through model.load_encoder, at a non-square input. Planted bugs (LayerNorm eps 1e-6, a
tanh GELU, RoPE normalised by the longer side, no k-bias mask, the non-register position
resize) move the statement far beyond the tolerance, so the tolerance can see them.
Also: the official key layout of every backbone (shapes only for ViT-g and H+), the loader's
errors, LILA on a patch-16 encoder, and train.py / probe.py end to end on DINOv2-reg and DINOv3.
CPU, offline, about a minute.
Run: python -m pytest -q tests/test_backbones.py
"""
import json
import math
import os
import subprocess
import sys
import urllib.error

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402
from test_model import VITS14_SHAPES, bicubic_matrix, keys_cubic  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TOL = 3e-5  # float32 against float64: the round-off measured here is 2e-6 to 9e-6 on outputs of size ~7


# ------------------------------------------------------------------ the official file layouts
# SwiGLU hidden widths: 2/3 of the MLP's, rounded up to a multiple of 8 (DINOv2 SwiGLUFFNFused,
# DINOv3 SwiGLUFFN): ViT-g 4 * 1536 -> 4096, S+ 6 * 384 -> 1536, H+ 6 * 1280 -> 5120.
SWIGLU_HIDDEN = {"dinov2_vitg14": 4096, "dinov2_vitg14_reg": 4096, "dinov3_vits16plus": 1536,
                 "dinov3_vith16plus": 5120}


def official_shapes(name, depth=None):
    """{key: shape} of the official weights file of `name` (its first `depth` blocks)."""
    b = model.BACKBONES[name]
    E, p = b.embed_dim, b.patch
    if b.family == "dinov2":  # vision_transformer.py, hub img_size 518 -> 37 x 37 table
        top = {"cls_token": (1, 1, E), "pos_embed": (1, 1 + 37 * 37, E), "mask_token": (1, E)}
        if b.tokens:
            top["register_tokens"] = (1, 4, E)
    else:                     # DINOv3: no table; storage tokens; the RoPE periods buffer (d/4)
        top = {"cls_token": (1, 1, E), "storage_tokens": (1, 4, E), "mask_token": (1, E),
               "rope_embed.periods": (E // b.heads // 4,)}
    top.update({"patch_embed.proj.weight": (E, 3, p, p), "patch_embed.proj.bias": (E,),
                "norm.weight": (E,), "norm.bias": (E,)})
    block = {"norm1.weight": (E,), "norm1.bias": (E,), "attn.qkv.weight": (3 * E, E),
             "attn.qkv.bias": (3 * E,), "attn.proj.weight": (E, E), "attn.proj.bias": (E,),
             "ls1.gamma": (E,), "norm2.weight": (E,), "norm2.bias": (E,), "ls2.gamma": (E,)}
    if b.family == "dinov3":
        block["attn.qkv.bias_mask"] = (3 * E,)   # LinearKMaskedBias's buffer
    H = SWIGLU_HIDDEN.get(name)
    if H is None:
        block.update({"mlp.fc1.weight": (4 * E, E), "mlp.fc1.bias": (4 * E,),
                      "mlp.fc2.weight": (E, 4 * E), "mlp.fc2.bias": (E,)})
    elif b.family == "dinov2":                   # w1 and w2 packed
        block.update({"mlp.w12.weight": (2 * H, E), "mlp.w12.bias": (2 * H,),
                      "mlp.w3.weight": (E, H), "mlp.w3.bias": (E,)})
    else:
        block.update({"mlp.w1.weight": (H, E), "mlp.w1.bias": (H,), "mlp.w2.weight": (H, E),
                      "mlp.w2.bias": (H,), "mlp.w3.weight": (E, H), "mlp.w3.bias": (E,)})
    blocks = {f"blocks.{i}.{k}": s for i in range(depth or b.depth) for k, s in block.items()}
    return {**top, **blocks}


def official_weights(name, depth=None, seed=0):
    """Seeded values in the official layout, scaled so that every part moves the output: O(1)
    attention logits, LayerScales of 0.3, a small patch embedding (so that LayerNorm's eps shows),
    non-zero k biases (so that the mask shows). bias_mask and periods: the official values."""
    g = torch.Generator().manual_seed(seed)
    b = model.BACKBONES[name]
    d = b.embed_dim // b.heads
    sd = {}
    for k, s in official_shapes(name, depth).items():
        n = lambda std: std * torch.randn(s, generator=g)  # noqa: E731
        if k.endswith("bias_mask"):         # init_weights_vit: ones, the middle (k) third zero
            E = s[0] // 3
            sd[k] = torch.cat([torch.ones(E), torch.zeros(E), torch.ones(E)])
        elif k == "rope_embed.periods":     # base ** (2 k / (d / 2)), base 100
            sd[k] = 100.0 ** (2 * torch.arange(d // 4, dtype=torch.float32) / (d // 2))
        elif k.endswith("gamma"):
            sd[k] = n(0.3)
        elif "norm" in k and k.endswith("weight"):
            sd[k] = 1 + n(0.2)
        elif k == "patch_embed.proj.weight":
            sd[k] = n(0.002)
        elif k.endswith("weight"):
            sd[k] = n(1 / math.sqrt(s[1]))
        else:                               # biases, tokens, the position table
            sd[k] = n(0.1)
    return sd


# ------------------------------------------------------------------ the slow official statement
def aa_bicubic_matrix(n_out, n_in, a=-0.5):
    """(n_out, n_in) weights of torch's bicubic with antialias=True and an output size (the
    register models' position resize; PIL's filter): output i is centred at (i + 0.5) s,
    s = n_in / n_out; when shrinking the cubic (a = -0.5) is stretched by s; the weights of the
    inputs j within its support are normalised to sum 1 (no border clamping)."""
    s = n_in / n_out
    support, inv = (2 * s, 1 / s) if s >= 1 else (2.0, 1.0)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        c = (i + 0.5) * s
        lo, hi = max(int(c - support + 0.5), 0), min(int(c + support + 0.5), n_in)
        w = torch.tensor([keys_cubic((j - c + 0.5) * inv, a) for j in range(lo, hi)], dtype=torch.float64)
        m[i, lo:hi] = w / w.sum()
    return m


def official_forward(sd, x, name, taps, eps=None, gelu="erf", rope_norm="separate", k_mask=True,
                     offset=None, antialias=None):
    """Official get_intermediate_layers(x, n=taps, reshape=True, return_class_token=True), in
    float64 from a state dict. The keywords plant deviations (defaults: the hub's settings)."""
    b = model.BACKBONES[name]
    v3 = b.family == "dinov3"
    eps = eps if eps is not None else (1e-5 if v3 else 1e-6)
    offset = offset if offset is not None else (0.0 if b.tokens else 0.1)
    antialias = antialias if antialias is not None else bool(b.tokens)
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    B, _, Hp, Wp = x.shape
    p, E, heads = b.patch, b.embed_dim, b.heads
    h, w, d = Hp // p, Wp // p, E // heads
    patches = x.reshape(B, 3, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, 3 * p * p)
    tok = patches @ sd["patch_embed.proj.weight"].reshape(E, -1).T + sd["patch_embed.proj.bias"]
    cls = sd["cls_token"].expand(B, 1, E)
    if v3:    # class, 4 storage tokens, patches; no position added
        t = torch.cat([cls, sd["storage_tokens"].expand(B, 4, E), tok], dim=1)
    else:     # class + patches get the (resized) table, then the registers go in after the class token
        pos, M = sd["pos_embed"][0], 37
        if (h, w) != (M, M):
            mh, mw = ((aa_bicubic_matrix(h, M), aa_bicubic_matrix(w, M)) if antialias else
                      (bicubic_matrix(h, M, (h + offset) / M), bicubic_matrix(w, M, (w + offset) / M)))
            grid = torch.einsum("im,mne,jn->ije", mh, pos[1:].reshape(M, M, E), mw).reshape(h * w, E)
            pos = torch.cat([pos[:1], grid])
        t = torch.cat([cls, tok], dim=1) + pos
        if b.tokens:
            t = torch.cat([t[:, :1], sd["register_tokens"].expand(B, b.tokens, E), t[:, 1:]], dim=1)
    n_prefix = 1 + b.tokens

    def ln(z, key):
        mu = z.mean(-1, keepdim=True)
        var = ((z - mu) ** 2).mean(-1, keepdim=True)
        return (z - mu) / torch.sqrt(var + eps) * sd[key + ".weight"] + sd[key + ".bias"]

    def lin(z, key, bias_scale=1.0):
        return z @ sd[key + ".weight"].T + sd[key + ".bias"] * bias_scale

    if v3:    # angle of channel pair (c, c + d/2) at patch (i, j): y-angles for c < d/4, then x
        H_, W_ = (h, w) if rope_norm == "separate" else (max(h, w), max(h, w))
        periods = sd["rope_embed.periods"]
        angle = torch.zeros(h * w, d // 2, dtype=torch.float64)
        for i in range(h):
            for j in range(w):
                y, xx = 2 * (i + 0.5) / H_ - 1, 2 * (j + 0.5) / W_ - 1
                for c in range(d // 4):
                    angle[i * w + j, c] = 2 * math.pi * y / periods[c]
                    angle[i * w + j, d // 4 + c] = 2 * math.pi * xx / periods[c]

        def rotate(v):  # v (B, T, d): the patch tokens' pairs turned by their angles
            a, bb = v[:, n_prefix:, :d // 2], v[:, n_prefix:, d // 2:]
            cos, sin = torch.cos(angle), torch.sin(angle)
            turned = torch.cat([a * cos - bb * sin, bb * cos + a * sin], dim=-1)
            return torch.cat([v[:, :n_prefix], turned], dim=1)

    out = {}
    for i in range(max(taps) + 1):
        k_ = f"blocks.{i}."
        mask = sd[k_ + "attn.qkv.bias_mask"] if v3 and k_mask else 1.0
        q, k, v = lin(ln(t, k_ + "norm1"), k_ + "attn.qkv", mask).split(E, dim=-1)
        per_head = []
        for hd in range(heads):
            s = slice(hd * d, (hd + 1) * d)
            qh, kh = (rotate(q[..., s]), rotate(k[..., s])) if v3 else (q[..., s], k[..., s])
            att = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), dim=-1)
            per_head.append(att @ v[..., s])
        t = t + sd[k_ + "ls1.gamma"] * lin(torch.cat(per_head, -1), k_ + "attn.proj")
        z = ln(t, k_ + "norm2")
        if k_ + "mlp.fc1.weight" in sd:
            y = lin(z, k_ + "mlp.fc1")
            if gelu == "erf":
                y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
            else:
                y = 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))
            y = lin(y, k_ + "mlp.fc2")
        else:
            if k_ + "mlp.w12.weight" in sd:
                a, g_ = lin(z, k_ + "mlp.w12").chunk(2, dim=-1)
            else:
                a, g_ = lin(z, k_ + "mlp.w1"), lin(z, k_ + "mlp.w2")
            y = lin(a * torch.sigmoid(a) * g_, k_ + "mlp.w3")
        t = t + sd[k_ + "ls2.gamma"] * y
        out[i] = t
    res = []
    for i in taps:
        z = ln(out[i], "norm")
        res.append((z[:, n_prefix:].reshape(B, h, w, E).permute(0, 3, 1, 2), z[:, 0]))
    return res


def max_err(got, ref):
    return max(max((g.double() - r).abs().max().item(), (c.double() - rc).abs().max().item())
               for (g, c), (r, rc) in zip(got, ref))


# name, blocks kept (None: all; ViT-g and H+ at 2 of their blocks, every other size real)
EXACT = [("dinov2_vits14_reg", None), ("dinov2_vitg14", 2), ("dinov2_vitg14_reg", 2),
         ("dinov3_vits16", None), ("dinov3_vits16plus", None), ("dinov3_vith16plus", 2)]


@pytest.fixture
def loaded(tmp_path, monkeypatch):
    """-> (name, depth) -> (encoder loaded from an official-layout file, its state dict, a
    non-square input of 3 x 5 patches, taps)."""
    def make(name, depth):
        if depth:  # fewer blocks, every other setting of the real backbone
            monkeypatch.setitem(model.BACKBONES, name, model.BACKBONES[name]._replace(depth=depth))
        sd = official_weights(name, depth)
        path = tmp_path / model.BACKBONES[name].file
        torch.save(sd, path)
        enc = model.load_encoder(name, str(path))
        p = enc.patch_size
        x = torch.randn(2, 3, 3 * p, 5 * p, generator=torch.Generator().manual_seed(1))
        taps = [0, 1] if depth else [1, 5, 11]
        return enc, sd, x, taps
    return make


@pytest.mark.parametrize("name,depth", EXACT)
def test_forward_equals_the_official_statement_on_a_non_square_input(loaded, name, depth):
    enc, sd, x, taps = loaded(name, depth)
    with torch.no_grad():
        got = enc.get_intermediate_layers(x, taps, reshape=True, return_class_token=True)
    assert [tuple(g.shape) for g, _ in got] == [(2, enc.embed_dim, 3, 5)] * len(taps)
    assert max_err(got, official_forward(sd, x, name, taps)) < TOL


# Each planted deviation, as the statement with it: far outside TOL of the real model.
PLANTS = {
    "dinov3_vits16": [dict(eps=1e-6), dict(gelu="tanh"), dict(rope_norm="max"), dict(k_mask=False)],
    "dinov2_vits14_reg": [dict(offset=0.1, antialias=False), dict(antialias=False), dict(eps=1e-5)],
    "dinov2_vitg14": [dict(offset=0.0), dict(eps=1e-5)],
}


@pytest.mark.parametrize("name", list(PLANTS))
def test_the_tolerance_sees_each_planted_deviation(loaded, name):
    depth = dict(EXACT)[name]
    enc, sd, x, taps = loaded(name, depth)
    with torch.no_grad():
        got = enc.get_intermediate_layers(x, taps, reshape=True, return_class_token=True)
    for plant in PLANTS[name]:
        assert max_err(got, official_forward(sd, x, name, taps, **plant)) > 5 * TOL, plant


# ------------------------------------------------------------------ every backbone's file layout
@pytest.mark.parametrize("name", list(model.BACKBONES))
def test_every_backbone_has_exactly_the_official_keys_and_shapes(name):
    with torch.device("meta"):  # shapes only: ViT-g's 1.1 G values take no memory
        vit = model.ViT(**model.encoder_kwargs(model.BACKBONES[name]))
    assert {k: tuple(v.shape) for k, v in vit.state_dict().items()} == official_shapes(name)
    assert vit.patch_size == model.BACKBONES[name].patch and vit.embed_dim == model.BACKBONES[name].embed_dim


def test_backbone_table_and_decoders_follow_the_official_configs():
    B = model.BACKBONES
    # official lila/lila/config.py 'vitg' and model_zoo.py's file names; DINOv3's hub hashes
    assert B["dinov2_vitg14"][:5] == (1536, 40, 24, (9, 19, 29, 39), 14)
    assert model.PRESETS["paper"]["dinov2_vitg14"] == dict(features=768, out_dim=384, widths=(1536,) * 4)
    assert B["dinov2_vitl14_reg"].file == "dinov2_vitl14_reg4_pretrain.pth"
    assert B["dinov3_vits16"].file == "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    for name, b in B.items():
        plain = name.replace("_reg", "")
        if b.family == "dinov2":   # registers change nothing but the tokens (official config keys)
            assert b._replace(tokens=0, file=None) == B[plain]._replace(file=None)
            for preset in model.PRESETS:
                assert model.PRESETS[preset][name] == model.PRESETS[preset][plain]
        else:                      # ours: the DINOv2 decoder of the same width, taps of the same depth
            twin = {384: "dinov2_vits14", 768: "dinov2_vitb14", 1024: "dinov2_vitl14", 1280: "dinov2_vitl14"}[b.embed_dim]
            assert model.PRESETS["paper"][name] == model.PRESETS["paper"][twin]
            assert b.patch == 16 and b.tokens == 4
            assert b.taps == (B[twin].taps if B[twin].depth == b.depth else (7, 15, 23, 31))


# ------------------------------------------------------------------ the official call
def test_get_intermediate_layers_has_the_official_signature_and_meaning():
    enc = model.load_encoder("dinov3_vits16", "none")
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        last2 = enc.get_intermediate_layers(x, 2)                   # the last 2 blocks, tokens
        picked = enc.get_intermediate_layers(x, [10, 11])
        grids = enc.get_intermediate_layers(x, [11, 3], reshape=True)   # in block order, as official
        third = enc.get_intermediate_layers(x, [3])[0]
        raw = enc.get_intermediate_layers(x, [3], norm=False)[0]
        (g, cls), = enc.get_intermediate_layers(x, 1, return_class_token=True)
    assert isinstance(last2, tuple) and last2[0].shape == (1, 6, 384)  # 2 x 3 patches, no extra tokens
    assert all(torch.equal(a, b) for a, b in zip(last2, picked))
    as_grid = lambda t: t.reshape(1, 2, 3, 384).permute(0, 3, 1, 2)  # noqa: E731 - row-major patches
    assert torch.equal(grids[0], as_grid(third)) and torch.equal(grids[1], as_grid(picked[1]))
    assert torch.allclose(enc.norm(raw), third) and not torch.allclose(raw, third)
    assert torch.equal(enc(x), cls) and cls.shape == (1, 384) and torch.equal(g, picked[1])
    for bad in (0, 13, [12], [2, 2], []):
        with pytest.raises(ValueError, match=r"^model\.py: ViT: blocks .* in 0\.\.11"):
            enc.get_intermediate_layers(x, bad)
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        enc.get_intermediate_layers(torch.zeros(1, 3, 42, 70), 1)    # a DINOv2 size


# ------------------------------------------------------------------ loading
def test_dinov3_hub_weights_say_to_download_the_file_by_hand():
    for name in ("dinov3_vits16", "dinov3_vith16plus"):
        with pytest.raises(ValueError) as err:
            model.load_encoder(name, "hub")
        msg = str(err.value)
        assert model.BACKBONES[name].file in msg and "by hand" in msg and "\n" not in msg
        assert "weights=PATH" in msg and "--weights PATH" in msg and model.DINOV3_DOWNLOADS in msg


def test_register_weights_come_from_the_hub_cache_under_the_official_name(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError) as err:
        model.load_encoder("dinov2_vits14_reg", "hub")
    assert "dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth" in str(err.value)
    sd = official_weights("dinov2_vits14_reg")
    torch.save(sd, cache / "dinov2_vits14_reg4_pretrain.pth")
    enc = model.load_encoder("dinov2_vits14_reg", "hub")
    assert torch.equal(enc.register_tokens, sd["register_tokens"]) and not enc.training


def test_a_file_of_another_family_is_refused_with_a_hint(tmp_path):
    for file_of, load_as, hint in [("dinov2_vits14_reg", "dinov2_vits14", "load it as dinov2_vits14_reg"),
                                   ("dinov3_vits16", "dinov2_vits14", "a DINOv3 file"),
                                   ("dinov3_vits16", "dinov3_vits16plus", "feed-forward keys differ")]:
        path = tmp_path / f"{file_of}.pth"
        if not path.exists():
            torch.save(official_weights(file_of), path)
        with pytest.raises(RuntimeError) as err:
            model.load_encoder(load_as, str(path))
        msg = str(err.value)
        assert msg.startswith("model.py: load_encoder: ") and hint in msg and "\n" not in msg, msg
    sd = {k: torch.zeros(s) for k, s in VITS14_SHAPES.items()}   # a plain DINOv2 file is no _reg one
    torch.save(sd, tmp_path / "plain.pth")
    with pytest.raises(RuntimeError, match="load it as dinov2_vits14"):
        model.load_encoder("dinov2_vits14_reg", str(tmp_path / "plain.pth"))


# ------------------------------------------------------------------ LILA on a patch-16 encoder
def test_lila_on_dinov3_works_in_whole_16_px_patches():
    lila = model.build_lila("dinov3_vits16", weights="none", preset="tiny", seed=0)
    assert lila.patch == 16 and lila.taps == (2, 5, 8, 11)
    enc, feats = lila(torch.rand(1, 3, 48, 80))
    assert enc.shape == (1, 384, 3, 5) and feats.shape == (1, 32, 48, 80)
    assert lila.features(torch.rand(3, 50, 70)).shape == (32, 50, 70)   # run at 48 x 64
    with pytest.raises(ValueError, match="48x80") as err:
        lila(torch.rand(1, 3, 56, 84))                                  # multiples of 14, not 16
    assert "patch size 16" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------ the scripts, end to end
TINY = ["--preset", "tiny", "--weights", "none", "--batch", "2", "--workers", "0", "--synthetic-videos", "2",
        "--synthetic-frames", "6", "--log-every", "1", "--steps", "2"]


@pytest.mark.parametrize("backbone,size", [("dinov2_vits14_reg", "56"), ("dinov3_vits16", "64")])
def test_train_runs_on_a_register_and_a_dinov3_backbone(tmp_path, backbone, size):
    r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *TINY, "--backbone", backbone,
                        "--size", size, "--base", size, "--out", str(tmp_path)],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [row["step"] for row in log] == [1, 2] and all(math.isfinite(row["loss"]) for row in log)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["config"]["backbone"] == backbone


def test_train_refuses_a_view_side_that_is_not_whole_patches(capsys):
    import train
    with pytest.raises(SystemExit):
        train.get_args([*TINY, "--backbone", "dinov3_vits16", "--size", "56"])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(   # prog: train.py from the shell
        ": error: --size 56 must be a positive multiple of 16 (the patch size of dinov3_vits16)")


def test_probe_runs_vos_knn_on_dinov3_and_refuses_a_side_of_14s(tmp_path, capsys):
    import data
    import probe
    data.write_synthetic(tmp_path / "synth", videos=2, frames=3, size=64, seed=0)
    flags = ["vos-knn", "--data", str(tmp_path / "synth"), "--ckpt", "none", "--preset", "tiny", "--weights",
             "none", "--backbone", "dinov3_vits16", "--device", "cpu", "--grid", "8"]
    m = probe.main(flags + ["--size", "48", "--out", str(tmp_path / "o")])
    assert 0 <= m["JF"] <= 1 and m["sequences"] == 2
    res = json.load(open(tmp_path / "o" / "results.json"))
    assert res["config"]["size"] == 48 and res["config"]["backbone"] == "dinov3_vits16"
    with pytest.raises(SystemExit):
        probe.parse_args(flags + ["--size", "56", "--out", str(tmp_path / "o2")])
    assert "probe.py: error: --size 56: must be a positive multiple of 16" in capsys.readouterr().err
    a = probe.parse_args(flags + ["--out", str(tmp_path / "o3")])     # the default 476 (34 x 14) -> 480
    assert a.size == 480
