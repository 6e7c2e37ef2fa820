"""torch.hub entry points: LILA pixel features without reading the training code.

    import torch
    lila = torch.hub.load("<owner>/<this repo>", "lila_vits14", ckpt="runs/lila/ckpt.pt")
    feats = lila.features(Image.open("frame.jpg"))        # (D, H, W) at the image's own size

From a clone without internet: torch.hub.load(".", "lila_vits14", source="local", ckpt=...).

Each entry builds the frozen DINOv2 encoder (weights through torch.hub's cache in TORCH_HOME,
a local .pth, or "none" for the seeded random encoder a `--weights none` run trained on) and
the DPT decoder of a checkpoint written by train.py (a local path or a URL; loaded with
weights_only=True, strictly). The decoder's preset and the random encoder's seed come from the
checkpoint's config, so the module is the one that was trained.
"""
import os

import torch

import model

dependencies = ["torch", "numpy", "PIL"]  # what torch.hub checks before importing this file


def _load_checkpoint(ckpt):
    """A train.py checkpoint from a local path or a URL -> its dict (tensors and plain data)."""
    if ckpt.startswith(("http://", "https://")):
        return torch.hub.load_state_dict_from_url(ckpt, map_location="cpu", weights_only=True)
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"LILA checkpoint not found: {ckpt} (write one with "
                                f"`python train.py --out DIR`, it is DIR/ckpt.pt)")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "decoder" not in state or "config" not in state:
        raise ValueError(f"{ckpt} is not a train.py checkpoint (needs 'decoder' and 'config')")
    return state


def _lila(backbone, ckpt, weights, preset, seed):
    if ckpt is None:
        raise ValueError(f"pass ckpt=PATH_OR_URL (a train.py checkpoint), or ckpt='none' for "
                         f"the untrained decoder baseline")
    if ckpt == "none":  # untrained, seeded decoder: the baseline every table needs
        lila = model.build_lila(backbone, weights or "hub", preset or "paper", seed=seed or 0)
        return lila.eval()
    state = _load_checkpoint(ckpt)
    cfg = state["config"]
    if cfg.get("backbone", backbone) != backbone:
        raise ValueError(f"{ckpt} was trained on {cfg['backbone']}; load it with the entry "
                         f"'{cfg['backbone'].replace('dinov2', 'lila')}', not "
                         f"'{backbone.replace('dinov2', 'lila')}'")
    preset = preset or cfg.get("preset", "paper")
    seed = cfg.get("seed", 0) if seed is None else seed
    if weights is None:  # the encoder the checkpoint was trained on, unless told otherwise
        weights = cfg.get("weights", "hub")
    lila = model.build_lila(backbone, weights, preset, seed=seed)
    try:
        lila.decoder.load_state_dict(state["decoder"], strict=True)
    except RuntimeError as e:
        raise ValueError(f"{ckpt}: its decoder does not fit {backbone} with preset '{preset}' "
                         f"(trained with preset '{cfg.get('preset')}'): "
                         f"{str(e).splitlines()[0]} ...") from None
    return lila.eval()


def lila_vits14(ckpt=None, weights=None, preset=None, seed=None):
    """LILA on DINOv2 ViT-S/14 (the paper's main model). ckpt: train.py checkpoint path/URL.
    weights: encoder weights (hub, a .pth path, none); default: as the checkpoint was trained."""
    return _lila("dinov2_vits14", ckpt, weights, preset, seed)


def lila_vitb14(ckpt=None, weights=None, preset=None, seed=None):
    """LILA on DINOv2 ViT-B/14; arguments as lila_vits14."""
    return _lila("dinov2_vitb14", ckpt, weights, preset, seed)


def lila_vitl14(ckpt=None, weights=None, preset=None, seed=None):
    """LILA on DINOv2 ViT-L/14; arguments as lila_vits14."""
    return _lila("dinov2_vitl14", ckpt, weights, preset, seed)
