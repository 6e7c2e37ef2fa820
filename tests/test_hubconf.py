"""hubconf.py: torch.hub.load(source="local") gives the trained LILA of a train.py checkpoint;
every entry builds the official decoder widths; every bad checkpoint or offline URL is one line.
Offline: the URL test uses the discard port on 127.0.0.1, refused at once.
Run: python -m pytest -q tests/test_hubconf.py
"""
import argparse
import math
import os
import pathlib
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import hubconf
import model
import train
from test_model import OFFICIAL_CONFIG, official_head_shapes  # the official SmallDPTHead's layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny", "--weights", "none", "--batch", "2", "--workers", "0",
        "--synthetic-videos", "2", "--synthetic-frames", "4", "--size", "56", "--base", "56",
        "--seed", "3"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hub") / "run")
    torch.set_num_threads(1)
    train.main(TINY + ["--steps", "2", "--out", out])
    return os.path.join(out, "ckpt.pt")


def test_hub_load_equals_loading_the_checkpoint_directly(ckpt):
    lila = torch.hub.load(REPO, "lila_vits14", source="local", ckpt=ckpt, weights="none",
                          trust_repo=True)
    state = torch.load(ckpt, weights_only=True)
    ref = model.build_lila("dinov2_vits14", "none", "tiny", seed=state["config"]["seed"])
    ref.decoder.load_state_dict(state["decoder"])
    ref.eval()
    x = torch.rand(1, 3, 56, 70)
    torch.testing.assert_close(lila(x)[1], ref(x)[1])
    assert not lila.training
    # The decoder really is the trained one, not a fresh seeded one.
    fresh = model.build_lila("dinov2_vits14", "none", "tiny", seed=3)
    assert not torch.allclose(lila(x)[1], fresh.eval()(x)[1])


def test_features_come_back_at_the_image_size(ckpt):
    lila = torch.hub.load(REPO, "lila_vits14", source="local", ckpt=ckpt, trust_repo=True)
    pil = Image.fromarray((np.random.rand(45, 61, 3) * 255).astype(np.uint8))
    f = lila.features(pil)
    assert f.shape == (32, 45, 61) and torch.isfinite(f).all()
    assert lila.features(torch.rand(2, 3, 33, 20)).shape == (2, 32, 33, 20)
    # Same preprocessing as training: a multiple-of-14 tensor goes through unchanged.
    x = torch.rand(3, 56, 42)
    torch.testing.assert_close(lila.features(x), lila(x[None])[1][0])


def test_wrong_width_or_backbone_fails_clearly(ckpt):
    with pytest.raises(ValueError, match="does not fit dinov2_vits14 with preset 'paper'"):
        torch.hub.load(REPO, "lila_vits14", source="local", ckpt=ckpt, preset="paper",
                       trust_repo=True)
    with pytest.raises(ValueError, match="lila_vits14"):
        torch.hub.load(REPO, "lila_vitb14", source="local", ckpt=ckpt, weights="none",
                       trust_repo=True)
    with pytest.raises(FileNotFoundError, match="not found"):
        torch.hub.load(REPO, "lila_vits14", source="local", ckpt="/nope/ckpt.pt", trust_repo=True)


# ------------------------------------------------------------------ backbones and shapes
@pytest.mark.parametrize("entry", ["lila_vits14", "lila_vitb14", "lila_vitl14"])
def test_hub_entries_build_the_official_decoder_widths(entry):
    from test_model import assert_official_decoder_shapes
    with torch.device("meta"):  # shapes only: no ViT-L's 300 M random values
        lila = torch.hub.load(REPO, entry, source="local", ckpt="none", weights="none",
                              preset="paper", trust_repo=True)
    assert_official_decoder_shapes(lila.decoder, entry.replace("lila_", "dinov2_"))


def test_vitb14_entry_runs_end_to_end_at_tiny_size():
    lila = torch.hub.load(REPO, "lila_vitb14", source="local", ckpt="none", weights="none",
                          preset="tiny", trust_repo=True)
    assert lila.encoder.embed_dim == 768 and lila.taps == (2, 5, 8, 11)
    f = lila.features(torch.rand(3, 30, 44))
    assert f.shape == (model.PRESETS["tiny"]["dinov2_vitb14"]["out_dim"], 30, 44) == (48, 30, 44)
    assert torch.isfinite(f).all()


# ------------------------------------------------------------------ bad checkpoints: one line each
def hub(ckpt, entry="lila_vits14", **kw):
    return torch.hub.load(REPO, entry, source="local", ckpt=ckpt, trust_repo=True, **kw)


def one_line_error(exc, ckpt, *needles, **kw):
    """hub(ckpt) raises `exc` with one line beginning 'hubconf.py: ' that holds every needle,
    and no chained traceback from inside torch.load."""
    with pytest.raises(exc) as err:
        hub(ckpt, **kw)
    msg = str(err.value)
    assert msg.startswith("hubconf.py: ") and "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert err.value.__cause__ is None
    assert err.value.__context__ is None or err.value.__suppress_context__
    return msg


def test_unreadable_files_name_the_file_and_the_problem(ckpt, tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("<!DOCTYPE html><html>404 Not Found</html>\n")
    one_line_error(ValueError, str(text), str(text), "not a torch checkpoint", "text file", "DOCTYPE")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    one_line_error(ValueError, str(empty), str(empty), "empty (0 bytes)")
    data = open(ckpt, "rb").read()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[:len(data) // 2])
    one_line_error(ValueError, str(cut), str(cut), "truncated or corrupt")
    noise = tmp_path / "noise.pt"
    noise.write_bytes(bytes(range(256)) * 4)
    one_line_error(ValueError, str(noise), str(noise), "not a torch checkpoint")
    garbage = tmp_path / "garbage.pt"  # starts like a pickle, then noise
    garbage.write_bytes(b"\x80\x02" + bytes(range(255, 0, -1)))
    one_line_error(ValueError, str(garbage), str(garbage), "not a readable torch checkpoint")
    one_line_error(FileNotFoundError, str(tmp_path), "is a directory", "ckpt.pt")
    one_line_error(FileNotFoundError, str(tmp_path / "nope.pt"), "nope.pt", "not found")


def test_objects_that_weights_only_refuses_are_named(ckpt, tmp_path):
    state = torch.load(ckpt, weights_only=True)
    state["config"] = argparse.Namespace(**state["config"])  # vars(args) forgotten
    path = tmp_path / "namespace.pt"
    torch.save(state, path)
    one_line_error(ValueError, str(path), str(path), "argparse.Namespace", "weights_only=True")


def test_dicts_that_are_not_train_checkpoints_say_what_is_missing(ckpt, tmp_path):
    state = torch.load(ckpt, weights_only=True)
    cases = {
        "bare.pt": (state["decoder"], ["'config'", "bare state dict"]),
        "no_config.pt": ({"decoder": state["decoder"]}, ["['config']"]),
        "no_seed.pt": ({**state, "config": {k: v for k, v in state["config"].items() if k != "seed"}},
                       ["without ['seed']"]),
        "list.pt": ([1, 2], ["holds a list"]),
        "bad_decoder.pt": ({**state, "decoder": {"w": [1.0]}}, ["not a state dict"]),
    }
    for name, (obj, needles) in cases.items():
        torch.save(obj, tmp_path / name)
        one_line_error(ValueError, str(tmp_path / name), name, *needles)
    old = {**state, "decoder": {**state["decoder"], "norm.weight": torch.ones(32), "norm.bias": torch.zeros(32)}}
    torch.save(old, tmp_path / "old.pt")
    one_line_error(ValueError, str(tmp_path / "old.pt"), "norm.weight", "older model.py")


def test_pathlib_path_loads_the_same_model(ckpt):
    x = torch.rand(1, 3, 28, 42)
    a, b = hub(pathlib.Path(ckpt)), hub(ckpt)
    torch.testing.assert_close(a(x)[1], b(x)[1])


def test_url_offline_fails_fast_with_where_to_put_the_file(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = "http://127.0.0.1:9/lila_run.pt"  # the discard port: refused at once, no network
    cached = hubconf.cache_path(url)
    assert cached.startswith(os.path.join(str(tmp_path), "hub", "checkpoints", ""))
    one_line_error(RuntimeError, url, url, cached, "ckpt=")
    assert not os.path.exists(cached)  # no partial file left in the cache
    # With the file placed there by hand, the same URL loads it without any download.
    shutil.copy(ckpt, cached)

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded although the file is cached")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    x = torch.rand(1, 3, 28, 28)
    torch.testing.assert_close(hub(url)(x)[1], hub(ckpt)(x)[1])


def test_an_empty_image_to_features_is_one_line(ckpt):
    lila = hub(ckpt)
    with pytest.raises(ValueError, match=r"^model\.py: LILA\.features: the image is empty \(0x0 pixels\)$"):
        lila.features(Image.new("RGB", (0, 0)))


# ------------------------------------------------------------------ official checkpoints
# The official TrainLILA.state_dict() layout (google-research lila/lila/dpt_lila.py: LILA with
# `pretrained` DINOv2, `latent_head` SmallDPTHead(use_bn=False, use_clstoken=False), `fnorm`
# nn.LayerNorm(features // 2); TrainLILA adds depth_net, flow and the torch.compile'd PAMRs),
# key names and shapes written out from the official modules, values random.
NOT_MODEL = {"depth_net.depth_head.scratch.output_conv1.weight": (64, 128, 3, 3),
             "depth_net.pretrained.cls_token": (1, 1, 1024), "flow.model.cnet.conv1.weight": (64, 3, 7, 7),
             "pamr.0._orig_mod.aff_x.kernel": (8, 1, 3, 3)}


def official_state(seed=0, encoder=None, backbone="dinov2_vits14", cues=True):
    """A TrainLILA.state_dict() of `backbone` (lila_config: features, out_channels); cues: with
    the cue networks' keys (as a trainer's file), encoder: the pretrained.* tensors."""
    g = torch.Generator().manual_seed(seed)
    F_, widths = OFFICIAL_CONFIG[backbone]
    sd = {f"latent_head.{k}": torch.randn(s, generator=g) / math.sqrt(math.prod(s[1:]) or 1)
          for k, s in official_head_shapes(model.BACKBONES[backbone].embed_dim, F_, widths).items()}
    sd["fnorm.weight"], sd["fnorm.bias"] = torch.ones(F_ // 2), torch.zeros(F_ // 2)
    sd.update({k: torch.randn(s, generator=g) for k, s in NOT_MODEL.items() if cues})
    for k, v in (encoder or {}).items():
        sd[f"pretrained.{k}"] = v.clone()
    return sd


def slow_official_features(sd, grids, size, eps=1e-5):
    """SmallDPTHead.forward + LILA.norm_feats (official lila/lila/dpt_lila.py, util/blocks.py),
    op for op under the official names, in float64; grids: the four tapped DINOv2 grids."""
    sd = {k: v.double() for k, v in sd.items()}
    conv = lambda x, n, **kw: F.conv2d(x, sd[f"latent_head.{n}.weight"], sd.get(f"latent_head.{n}.bias"), **kw)

    def rcu(x, n):  # ResidualConvUnit(bn=False): conv2(relu(conv1(relu(x)))) + x
        return conv(torch.relu(conv(torch.relu(x), n + ".conv1", padding=1)), n + ".conv2", padding=1) + x

    def fusion(n, xs, size=None):  # FeatureFusionBlock(expand=False, align_corners=True)
        out = xs[0] + rcu(xs[1], n + ".resConfUnit1") if len(xs) == 2 else xs[0]
        out = rcu(out, n + ".resConfUnit2")
        resize = dict(scale_factor=2) if size is None else dict(size=size)
        return conv(F.interpolate(out, **resize, mode="bilinear", align_corners=True), n + ".out_conv")

    layers = []
    for i, x in enumerate(grids):
        x = conv(x.double(), f"projects.{i}")
        w, b = sd.get(f"latent_head.resize_layers.{i}.weight"), sd.get(f"latent_head.resize_layers.{i}.bias")
        x = (F.conv_transpose2d(x, w, b, stride=4) if i == 0 else F.conv_transpose2d(x, w, b, stride=2) if i == 1
             else x if i == 2 else F.conv2d(x, w, b, stride=2, padding=1))
        layers.append(conv(x, f"scratch.layer{i + 1}_rn", padding=1))
    path = fusion("scratch.refinenet4", [layers[3]], layers[2].shape[2:])
    path = fusion("scratch.refinenet3", [path, layers[2]], layers[1].shape[2:])
    path = fusion("scratch.refinenet2", [path, layers[1]], layers[0].shape[2:])
    path = fusion("scratch.refinenet1", [path, layers[0]])
    out = conv(path, "scratch.output_conv1", padding=1)
    out = F.interpolate(out, size, mode="bilinear", align_corners=True)  # patch grid x 14
    out = conv(torch.relu(conv(out, "scratch.output_conv2.0", padding=1)), "scratch.output_conv2.2")
    mu = out.mean(1, keepdim=True)
    norm = (out - mu) / torch.sqrt(((out - mu) ** 2).mean(1, keepdim=True) + eps)
    return norm * sd["fnorm.weight"].view(1, -1, 1, 1) + sd["fnorm.bias"].view(1, -1, 1, 1)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("official") / "lila_dino2_s14_ytvos.pt")
    torch.save(official_state(), path)
    return path


def load_official(path, entry="lila_dinov2_vits14", **kw):
    return torch.hub.load(REPO, entry, source="local", trust_repo=True, pretrained=True,
                          checkpoint_path=path, **{"weights": "none", **kw})


def assert_official_numbers(lila, sd, atol=1e-4):
    img = torch.rand(2, 3, 28, 42, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        enc, feats = lila(img)
        ref = slow_official_features(sd, lila.encode(img), (28, 42))
    D, E = sd["fnorm.weight"].shape[0], sd["latent_head.projects.0.weight"].shape[1]
    assert feats.shape == (2, D, 28, 42) and enc.shape == (2, E, 2, 3)
    torch.testing.assert_close(feats.double(), ref, atol=atol, rtol=0)


def test_official_file_gives_the_official_features_and_reports_what_it_left_out(official, capfd):
    lila = load_official(official)
    assert_official_numbers(lila, official_state())
    err = capfd.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("hubconf.py:")]
    assert len(line) == 1 and "official dinov2_vits14 decoder loaded" in line[0], err
    for group in ("depth_net.* (2)", "flow.* (1)", "pamr.* (1)",
                  "latent_head.scratch.refinenet4.resConfUnit1.* built, never called (4)"):
        assert group in line[0], (group, line[0])
    # Our entry and ckpt= read the same file to the same model.
    ours = hub(official, weights="none")
    x = torch.rand(1, 3, 28, 28)
    torch.testing.assert_close(ours(x)[1], lila(x)[1], atol=0, rtol=0)


def test_a_single_mis_mapped_decoder_key_changes_the_numbers(official, monkeypatch):
    """The parity above can fail: swapping the two residual units of one fusion block (same
    shapes, so no shape check catches it) breaks it."""
    table = hubconf.official_names()
    a, b = table["fusion.1.skip_unit"], table["fusion.1.unit"]
    monkeypatch.setattr(hubconf, "official_names", lambda: {**table, "fusion.1.skip_unit": b,
                                                            "fusion.1.unit": a})
    lila = hubconf.load_lila(hubconf.read_lila_checkpoint(official), weights="none")  # patched module
    with pytest.raises(AssertionError):
        assert_official_numbers(lila, official_state())


def test_half_precision_and_wrapped_official_files_load(tmp_path):
    half = {k: v.half() for k, v in official_state().items()}
    decoders = []
    for name, obj in (("half.pt", half), ("wrapped.pt", {"state_dict": half, "epoch": 3}),
                      ("lightning.pt", {"state_dict": {f"model.{k}": v for k, v in half.items()}})):
        torch.save(obj, tmp_path / name)
        decoders.append(hubconf.read_lila_checkpoint(str(tmp_path / name))["decoder"])
    assert all(d.keys() == decoders[0].keys() and all(torch.equal(d[k], decoders[0][k]) for k in d)
               for d in decoders[1:])
    assert_official_numbers(load_official(str(tmp_path / "wrapped.pt")), {k: v.float() for k, v in half.items()})
    ck = hubconf.read_lila_checkpoint(str(tmp_path / "half.pt"))
    assert ck["kind"] == "official" and ck["config"]["dtypes"] == ["float16"]
    assert ck["build"] == dict(backbone="dinov2_vits14", weights="hub", preset="paper", seed=0)
    assert all(v.dtype == torch.float32 for v in ck["decoder"].values())


def official_error(tmp_path, sd, *needles, entry="lila_dinov2_vits14", exc=ValueError, **kw):
    path = str(tmp_path / "bad_official.pt")
    torch.save(sd, path)
    with pytest.raises(exc) as err:
        load_official(path, entry=entry, **kw)
    msg = str(err.value)
    assert msg.startswith("hubconf.py: checkpoint ") and path in msg and "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def test_official_missing_or_mis_shaped_decoder_tensor_is_named(tmp_path):
    key = "latent_head.scratch.refinenet2.resConfUnit2.conv1.weight"
    sd = official_state()
    del sd[key]
    official_error(tmp_path, sd, key, "without the decoder tensor", "fusion.1.unit.conv1.weight")
    sd = official_state()
    sd["latent_head.scratch.output_conv1.bias"] = torch.zeros(64)
    official_error(tmp_path, sd, "latent_head.scratch.output_conv1.bias", "(64,)", "(128,)")
    sd = official_state()
    sd["latent_head.scratch.refinenet1.resConfUnit1.bn1.weight"] = torch.ones(256)
    official_error(tmp_path, sd, "refinenet1.resConfUnit1.bn1.weight", "use_bn")


def test_official_file_of_another_backbone_names_the_entry(tmp_path):
    official_error(tmp_path, official_state(), "an official checkpoint of dinov2_vits14", "lila_dinov2_vits14", "dinov2_vitb14",
                   entry="lila_dinov2_vitb14")
    sd = official_state()
    sd["latent_head.projects.0.weight"] = torch.zeros(48, 1536, 1, 1)  # ViT-g/14's width
    official_error(tmp_path, sd, "latent_head.projects.0.weight", "(48, 1536, 1, 1)")


def test_official_trained_fnorm_is_refused_naming_fnorm(tmp_path):
    sd = official_state()
    sd["fnorm.weight"] = torch.full((128,), 1.5)
    official_error(tmp_path, sd, "fnorm.weight", "refused rather than dropped")
    sd = official_state()
    sd["fnorm.bias"] = torch.full((128,), 0.1)
    official_error(tmp_path, sd, "fnorm.bias")


def test_official_encoder_tensors_must_be_the_encoder_used(tmp_path):
    """The file's frozen DINOv2 (pretrained.*) is checked against weights= (here the seeded
    random encoder): equal loads (half precision too), different is refused naming the tensor."""
    enc = model.load_encoder("dinov2_vits14", "none", seed=0).state_dict()
    sd = official_state(encoder=enc)
    torch.save({k: v.half() for k, v in sd.items()}, tmp_path / "with_encoder.pt")
    lila = load_official(str(tmp_path / "with_encoder.pt"))
    ck = hubconf.read_lila_checkpoint(str(tmp_path / "with_encoder.pt"))
    assert set(ck["encoder"]) == set(enc) - {"pos_embed"} and "pretrained.pos_embed" in ck["note"]
    assert torch.equal(lila.encoder.blocks[0].attn.qkv.weight, enc["blocks.0.attn.qkv.weight"])
    sd["pretrained.blocks.3.attn.qkv.weight"] = sd["pretrained.blocks.3.attn.qkv.weight"] + 0.01
    official_error(tmp_path, sd, "pretrained.blocks.3.attn.qkv.weight", "other encoder weights",
                   "dinov2_vits14 weights 'none'", "weights=")


def test_non_finite_weights_are_refused_naming_file_and_tensor(ckpt, tmp_path):
    sd = official_state()
    sd["latent_head.scratch.refinenet3.out_conv.weight"][0, 0] = float("nan")
    official_error(tmp_path, sd, "non-finite", "latent_head.scratch.refinenet3.out_conv.weight", "1 of the")
    state = torch.load(ckpt, weights_only=True)
    key = sorted(state["decoder"])[0]
    state["decoder"][key] = state["decoder"][key].clone().fill_(float("inf"))
    torch.save(state, tmp_path / "inf.pt")
    one_line_error(ValueError, str(tmp_path / "inf.pt"), "inf.pt", "non-finite", f"decoder.{key}")


def test_official_arguments_and_their_misuse(tmp_path, monkeypatch):
    lila = torch.hub.load(REPO, "lila_dinov2_vits14", source="local", trust_repo=True, weights="none")
    assert lila.decoder.out_dim == 128  # pretrained=False: the untrained paper decoder
    with pytest.raises(ValueError, match="pretrained=False"):
        hubconf.lila_dinov2_vits14(checkpoint_path="x.pt", weights="none")
    with pytest.raises(ValueError, match="not checkpoint_path and checkpoint_url"):
        hubconf.lila(pretrained=True, checkpoint_path="a.pt", checkpoint_url="http://b/c.pt")
    with pytest.raises(ValueError, match="'dinov2_vith14' is not supported.*dinov2reg_vitb14"):
        hubconf.lila(encoder="dinov2_vith14")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("no network here")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError) as err:  # pretrained=True alone: the released snapshot
        hubconf.lila_dinov2_vitl14_kts(pretrained=True, weights="none")
    assert hubconf.RELEASED["dinov2_vitl14_kts"] in str(err.value)
    assert hubconf.cache_path(hubconf.RELEASED["dinov2_vitl14_kts"]) in str(err.value)


def test_two_urls_with_one_file_name_are_two_cache_entries(ckpt, official, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    a, b = "http://127.0.0.1:9/run_a/ckpt.pt", "http://127.0.0.1:9/run_b/ckpt.pt"
    assert hubconf.cache_path(a) != hubconf.cache_path(b)
    os.makedirs(os.path.dirname(hubconf.cache_path(a)))
    shutil.copy(ckpt, hubconf.cache_path(a))
    shutil.copy(official, hubconf.cache_path(b))
    assert hubconf.read_lila_checkpoint(a)["kind"] == "lila"
    assert hubconf.read_lila_checkpoint(b)["kind"] == "official"


def test_probe_reads_and_builds_an_official_file(official):
    import probe
    args = argparse.Namespace(ckpt=official, weights="none", backbone="dinov2_vitb14", preset="tiny", seed=0)
    kw, cfg, state = probe.read_checkpoint(args)
    assert kw == dict(backbone="dinov2_vits14", weights="none", preset="paper", seed=0)
    assert cfg["source"] == "official"
    lila = probe.build_model(kw, state, "cpu")
    assert_official_numbers(lila, official_state())


# ------------------------------------------------------------------ the official API in full
def no_network(monkeypatch, torch_home):
    """TORCH_HOME = torch_home, and any download fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))

    def download(url, *args, **kwargs):
        raise AssertionError(f"downloaded {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)


def test_a_released_file_the_official_loader_fetched_is_used_without_a_download(tmp_path, monkeypatch):
    """The official loader keeps a released file as $TORCH_HOME/hub/checkpoints/<its name>."""
    no_network(monkeypatch, tmp_path)
    sd = official_state(backbone="dinov2_vitb14")
    os.makedirs(tmp_path / "hub" / "checkpoints")
    torch.save(sd, tmp_path / "hub" / "checkpoints" / "lila_dino2_b14_ytvos.pt")
    assert hubconf.RELEASED["dinov2_vitb14"].endswith("/lila_dino2_b14_ytvos.pt")
    assert_official_numbers(hubconf.lila_dinov2_vitb14(pretrained=True, weights="none"), sd)
    assert_official_numbers(hubconf.lila(pretrained=True, weights="none"), sd)  # encoder default: B/14
    # release_key picks another released file: not there, so it would be downloaded.
    with pytest.raises(RuntimeError, match=r"AssertionError: downloaded .* put it at .*/hub/checkpoints/lila_dino2_l14_kts\.pt "):
        hubconf.lila(encoder="dinov2_vitl14", pretrained=True, release_key="dinov2_vitl14_kts", weights="none")
    with pytest.raises(ValueError, match="no released LILA checkpoint for 'dinov2_vits14_kts'"):
        hubconf.lila(encoder="dinov2_vits14", pretrained=True, release_key="dinov2_vits14_kts")
    with pytest.raises(ValueError, match="no released LILA checkpoint for 'dinov2reg_vits14'.*model_name="):
        hubconf.lila_dinov2reg_vits14(pretrained=True)


def test_checkpoint_url_is_cached_under_checkpoint_name_else_under_the_whole_url(tmp_path, monkeypatch):
    no_network(monkeypatch, tmp_path)
    cache = tmp_path / "hub" / "checkpoints"
    os.makedirs(cache)
    torch.save(official_state(seed=1), cache / "mine.pt")
    torch.save(official_state(seed=2), cache / "best_checkpoint.pt")   # another run's, official name
    url = "http://127.0.0.1:9/run/best_checkpoint.pt"
    lila = hubconf.lila_dinov2_vits14(pretrained=True, checkpoint_url=url, checkpoint_name="mine.pt", weights="none")
    assert_official_numbers(lila, official_state(seed=1))
    # Without checkpoint_name: not the official best_checkpoint.pt (another run's) but the URL's key.
    with pytest.raises(RuntimeError, match=r"downloaded .*/hub/checkpoints/url[0-9a-f]{12}-best_checkpoint\.pt "):
        hubconf.lila_dinov2_vits14(pretrained=True, checkpoint_url=url, weights="none")


def test_model_name_checkpoints_dir_and_the_environment_variable(tmp_path, monkeypatch):
    """DIR/model_name/checkpoint_name as the official trainer writes them; DIR = checkpoints_dir,
    else $LILA_CHECKPOINTS_DIR; DIR also holds the DINOv2 weights under their official name."""
    no_network(monkeypatch, tmp_path / "th")
    root, other = tmp_path / "ckpts", tmp_path / "elsewhere"
    os.makedirs(root / "run1")
    os.makedirs(other)
    torch.save(official_state(seed=1), root / "run1" / "best_checkpoint.pt")
    torch.save(official_state(seed=2), root / "run1" / "last.pt")
    kw = dict(pretrained=True, model_name="run1", weights="none")
    assert_official_numbers(hubconf.lila_dinov2_vits14(checkpoints_dir=str(root), **kw), official_state(seed=1))
    monkeypatch.setenv("LILA_CHECKPOINTS_DIR", str(root))
    assert_official_numbers(hubconf.lila_dinov2_vits14(checkpoint_name="last.pt", **kw), official_state(seed=2))
    with pytest.raises(FileNotFoundError, match=f"'{other}/run1/best_checkpoint.pt' not found"):
        hubconf.lila_dinov2_vits14(checkpoints_dir=str(other), **kw)   # the argument beats the variable
    with pytest.raises(ValueError, match="not checkpoint_path and model_name"):
        hubconf.lila_dinov2_vits14(checkpoint_path="x.pt", **kw)
    enc = model.load_encoder("dinov2_vits14", "none", seed=5).state_dict()
    torch.save(enc, root / "dinov2_vits14_pretrain.pth")   # official model_zoo: read before the hub
    lila = hubconf.lila_dinov2_vits14()                     # untrained decoder, no weights= given
    assert all(torch.equal(v, enc[k]) for k, v in lila.encoder.state_dict().items())


def test_strict_refuses_what_the_model_does_not_hold_and_requires_the_encoder(tmp_path):
    enc = model.load_encoder("dinov2_vits14", "none", seed=0).state_dict()
    full = official_state(encoder=enc, cues=False)
    torch.save(full, tmp_path / "full.pt")
    assert_official_numbers(load_official(str(tmp_path / "full.pt"), strict=True), full)
    official_error(tmp_path, official_state(), "strict=True", "depth_net.* (2)", "flow.* (1)", strict=True)
    official_error(tmp_path, official_state(cues=False), "no encoder tensors", strict=True)
    del full["pretrained.blocks.0.norm1.weight"]
    official_error(tmp_path, full, "lacks 1 encoder tensors", "pretrained.blocks.0.norm1.weight", strict=True)
    assert_official_numbers(load_official(str(tmp_path / "bad_official.pt")), full)   # strict=False: loads


def test_a_register_model_official_file_loads_and_its_register_tokens_are_checked(tmp_path):
    enc = model.load_encoder("dinov2_vits14_reg", "none", seed=0).state_dict()
    assert enc["register_tokens"].shape == (1, 4, 384)
    sd = official_state(encoder=enc)
    torch.save(sd, tmp_path / "reg.pt")
    lila = load_official(str(tmp_path / "reg.pt"), entry="lila_dinov2reg_vits14")
    assert torch.equal(lila.encoder.register_tokens, enc["register_tokens"])
    assert_official_numbers(lila, sd)
    assert hubconf.read_lila_checkpoint(str(tmp_path / "reg.pt"))["build"]["backbone"] == "dinov2_vits14_reg"
    official_error(tmp_path, sd, "of dinov2_vits14_reg", "'lila_vits14_reg' or 'lila_dinov2reg_vits14'")
    sd["pretrained.register_tokens"] = sd["pretrained.register_tokens"] + 0.01
    official_error(tmp_path, sd, "pretrained.register_tokens differs", "other encoder weights",
                   entry="lila_dinov2reg_vits14")
    # A file without encoder tensors does not say: the entry's register backbone is taken.
    torch.save(official_state(), tmp_path / "bare.pt")
    assert hasattr(load_official(str(tmp_path / "bare.pt"), entry="lila_dinov2reg_vits14").encoder, "register_tokens")


@pytest.mark.parametrize("entry,patch", [("lila_dinov2reg_vits14", 14), ("lila_dinov2reg_vitb14", 14),
                                         ("lila_dinov3_vits16", 16), ("lila_dinov3_vitb16", 16)])
def test_register_and_dinov3_entries_run_features(entry, patch):
    lila = torch.hub.load(REPO, entry, source="local", trust_repo=True, weights="none")
    backbone = hubconf.OFFICIAL_ENCODERS.get(entry[5:], entry[5:])
    assert lila.patch == patch and lila.taps == model.BACKBONES[backbone].taps and not lila.training
    f = lila.features(torch.rand(3, 30, 44))
    assert f.shape == (model.PRESETS["paper"][backbone]["out_dim"], 30, 44) and torch.isfinite(f).all()


@pytest.mark.parametrize("entry,like", [("lila_dinov2reg_vitl14", "dinov2_vitl14"), ("lila_dinov3_vitl16", "dinov2_vitl14"),
                                        ("lila_vitl14_reg", "dinov2_vitl14")])
def test_large_entries_build_the_official_decoder_widths(entry, like):
    from test_model import assert_official_decoder_shapes
    kw = dict(ckpt="none", preset="paper") if entry.startswith("lila_vit") else {}
    with torch.device("meta"):  # shapes only: no ViT-L's 300 M random values
        lila = torch.hub.load(REPO, entry, source="local", trust_repo=True, weights="none", **kw)
    assert_official_decoder_shapes(lila.decoder, like)


@pytest.mark.parametrize("entry", ["lila_vits14_reg", "lila_vitb14_reg"])
def test_short_register_entries_run_at_tiny_size(entry):
    lila = torch.hub.load(REPO, entry, source="local", trust_repo=True, ckpt="none", weights="none", preset="tiny")
    assert hasattr(lila.encoder, "register_tokens")
    f = lila.features(torch.rand(3, 30, 44))
    assert f.shape == (model.PRESETS["tiny"][entry.replace("lila_", "dinov2_")]["out_dim"], 30, 44)
