"""hubconf.py: torch.hub.load(source="local") gives the trained LILA of a train.py checkpoint;
every entry builds the official decoder widths; every bad checkpoint or offline URL is one line.
Offline: the URL test uses the discard port on 127.0.0.1, refused at once.
Run: python -m pytest -q tests/test_hubconf.py
"""
import argparse
import os
import pathlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import model
import train

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
    cached = os.path.join(str(tmp_path), "hub", "checkpoints", "lila_run.pt")
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
