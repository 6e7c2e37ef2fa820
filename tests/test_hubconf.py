"""hubconf.py: torch.hub.load(source="local") gives the trained LILA of a train.py checkpoint."""
import os

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
