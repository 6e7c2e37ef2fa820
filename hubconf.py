"""torch.hub entry points: LILA pixel features without reading the training code.

    import torch
    lila = torch.hub.load("<owner>/<this repo>", "lila_vits14", ckpt="runs/lila/ckpt.pt")
    feats = lila.features(Image.open("frame.jpg"))        # (D, H, W) at the image's own size

From a clone without internet: torch.hub.load(".", "lila_vits14", source="local", ckpt=...).
D is the checkpoint's: the paper preset gives 128 (ViT-S), 192 (ViT-B), 256 (ViT-L); the tiny
preset 32, 48, 64. `lila.features` takes PIL images, numpy arrays and tensors (model.py says
which); `lila(x)` on a (B, 3, H, W) float batch in [0, 1], sides multiples of 14, returns
(last encoder grid (B, E, H/14, W/14), features (B, D, H, W)).

Each entry builds the frozen DINOv2 encoder (weights through torch.hub's cache in TORCH_HOME,
a local .pth, or "none" for the seeded random encoder a `--weights none` run trained on) and
the DPT decoder of a checkpoint written by train.py: a local path (str or pathlib.Path) or an
http(s) URL, downloaded once into torch.hub's cache ($TORCH_HOME/hub/checkpoints/<file name>)
and read from there. Checkpoints are read with weights_only=True (no code runs) and the
decoder is loaded strictly. Its preset, backbone and random-encoder seed come from the
checkpoint's config, so the module is the one that was trained.

A bad checkpoint (missing, a directory, empty, text, truncated, holding Python objects, not a
train.py dict, of another backbone or preset) or a failed download is one error line that
names the file: FileNotFoundError, ValueError or RuntimeError beginning "hubconf.py: ".
"""
import os
import pickle
import re
import socket
import urllib.parse

import torch

import model

dependencies = ["torch", "numpy", "PIL"]  # what torch.hub checks before importing this file

CONFIG_KEYS = ("backbone", "preset", "weights", "seed")  # what the rebuild reads from a config


def _bad(path, what, exc=ValueError):
    """The one-line error for checkpoint `path` (raised by the caller `from None`)."""
    return exc(f"hubconf.py: checkpoint '{path}' {what}")


def _first_line(e, limit=160):
    """'Type: first sentence' of an exception, for a one-line message."""
    text = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
    return f"{type(e).__name__}: {text[:limit]}"


def _read_checkpoint(path):
    """A train.py checkpoint file -> its dict {'decoder': state dict, 'config': dict, ...}."""
    if os.path.isdir(path):
        raise _bad(path, "is a directory; train.py writes DIR/ckpt.pt", FileNotFoundError)
    if not os.path.isfile(path):
        raise _bad(path, "not found (write one with `python train.py --out DIR`: DIR/ckpt.pt)",
                   FileNotFoundError)
    size = os.path.getsize(path)
    if size == 0:
        raise _bad(path, "is empty (0 bytes): an interrupted copy or download?")
    with open(path, "rb") as f:
        head = f.read(512)
    # torch.save writes a zip archive ("PK\x03\x04"); the legacy format starts as a pickle.
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        text = head.decode("utf-8", errors="replace").strip()
        kind = (f"a text file (it begins {text[:40]!r})" if b"\0" not in head and "\ufffd" not in text
                else "neither a zip archive nor a pickle")
        raise _bad(path, f"is not a torch checkpoint: {kind}")
    try:  # weights_only: tensors and plain data only, no code runs while reading
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise _bad(path, f"is not a readable torch checkpoint ({_first_line(e)})") from None
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if not found:  # a broken stream rather than a foreign object
            detail = re.search(r"WeightsUnpickler error:\s*([^.\n]+)", str(e))
            raise _bad(path, f"is not a readable torch checkpoint (corrupt? the unpickler "
                             f"stopped: {detail.group(1) if detail else '-'})") from None
        raise _bad(path, f"holds a Python object ({found.group(1)}) that safe loading "
                         f"(weights_only=True) refuses; a train.py checkpoint holds only tensors "
                         f"and plain data") from None
    except Exception as e:  # noqa: BLE001 - the zip or pickle stream itself is broken
        raise _bad(path, f"is truncated or corrupt ({size} bytes; {_first_line(e)})") from None
    if not isinstance(state, dict):
        raise _bad(path, f"holds a {type(state).__name__}, not a train.py checkpoint (a dict "
                         f"with 'decoder' and 'config')")
    missing = [k for k in ("decoder", "config") if k not in state]
    if missing:
        bare = state and all(torch.is_tensor(v) for v in state.values())
        raise _bad(path, f"is not a train.py checkpoint: no {missing} among its keys "
                         f"{sorted(map(str, state))[:3]}"
                         + (" (a bare state dict?)" if bare else ""))
    cfg, dec = state["config"], state["decoder"]
    lacking = [k for k in CONFIG_KEYS if k not in cfg] if isinstance(cfg, dict) else CONFIG_KEYS
    if lacking:
        raise _bad(path, f"has a 'config' without {list(lacking)} (train.py saves them all)")
    if not isinstance(dec, dict) or not all(torch.is_tensor(v) for v in dec.values()):
        raise _bad(path, "has a 'decoder' that is not a state dict (name -> tensor)")
    return state


def _fetch(url, timeout_s=30.0):
    """An http(s) checkpoint through torch.hub's cache -> (local path). A cached file is used
    as it is; a download that fails (offline, refused, 404) is one error line saying where to
    put the file by hand. timeout_s bounds each network wait, so a dead route cannot hang."""
    name = os.path.basename(urllib.parse.urlparse(url).path) or "ckpt.pt"
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", name)  # as load_state_dict_from_url
    if os.path.isfile(cached):
        return cached
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)  # urllib (inside torch.hub) waits forever by default
    try:  # torch.hub writes to a temporary file and moves it into place only when complete
        torch.hub.download_url_to_file(url, cached, progress=False)
    except Exception as e:  # noqa: BLE001 - every failed download is the same user-facing story
        raise RuntimeError(
            f"hubconf.py: could not download the checkpoint {url} ({_first_line(e)}); offline? "
            f"fetch it on a connected machine and put it at {cached} (torch.hub's cache, "
            f"$TORCH_HOME/hub/checkpoints/) or pass its local path as ckpt=") from None
    finally:
        socket.setdefaulttimeout(previous)
    return cached


def _load_decoder(lila, state, path, backbone, preset):
    """Strict load of the checkpoint's decoder, with a one-line summary of what differs."""
    want = lila.decoder.state_dict()
    got = state["decoder"]
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = [f"{k} {tuple(got[k].shape)} vs {tuple(v.shape)}" for k, v in want.items()
             if k in got and got[k].shape != v.shape]
    if not (missing or extra or wrong):
        lila.decoder.load_state_dict(got, strict=True)
        return
    hint = ""
    if {"norm.weight", "norm.bias"} & set(extra):
        hint = "; its LayerNorm has an affine norm.weight: written by an older model.py, retrain it"
    parts = [f"{len(ks)} {what}, e.g. {ks[0]}" for what, ks in
             (("missing keys", missing), ("unexpected keys", extra), ("of another shape", wrong)) if ks]
    raise _bad(path, f"has a decoder that does not fit {backbone} with preset '{preset}': "
                     f"{'; '.join(parts)}{hint}")


def _lila(backbone, ckpt, weights, preset, seed):
    if ckpt is None:
        raise ValueError("hubconf.py: pass ckpt=PATH_OR_URL (a train.py checkpoint), or "
                         "ckpt='none' for the untrained decoder baseline")
    if not isinstance(ckpt, (str, os.PathLike)):
        raise ValueError(f"hubconf.py: ckpt must be a path or an http(s) URL, got "
                         f"{type(ckpt).__name__}")
    ckpt = os.fspath(ckpt)
    if ckpt == "none":  # untrained, seeded decoder: the baseline every table needs
        lila = model.build_lila(backbone, weights or "hub", preset or "paper", seed=seed or 0)
        return lila.eval()
    path = _fetch(ckpt) if ckpt.startswith(("http://", "https://")) else ckpt
    state = _read_checkpoint(path)
    cfg = state["config"]
    if cfg["backbone"] != backbone:
        entry = lambda b: str(b).replace("dinov2_", "lila_")
        raise _bad(path, f"was trained on {cfg['backbone']}; load it with the entry "
                         f"'{entry(cfg['backbone'])}', not '{entry(backbone)}'")
    preset = preset or cfg["preset"]
    seed = cfg["seed"] if seed is None else seed
    if weights is None:  # the encoder the checkpoint was trained on, unless told otherwise
        weights = cfg["weights"]
    try:
        lila = model.build_lila(backbone, weights, preset, seed=seed)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        msg = " ".join(str(e).split())  # one line
        raise _bad(path, f"(encoder weights '{weights}', preset '{preset}') cannot be rebuilt: "
                         f"{msg}; pass weights=... to use other encoder weights",
                   type(e)) from None
    _load_decoder(lila, state, path, backbone, preset)
    return lila.eval()


def lila_vits14(ckpt=None, weights=None, preset=None, seed=None):
    """LILA on DINOv2 ViT-S/14 (the paper's main model). ckpt: train.py checkpoint path (str or
    pathlib.Path) or http(s) URL, or "none" for an untrained decoder. weights: encoder weights
    ("hub", a .pth path, "none"); default: as the checkpoint was trained. preset, seed:
    default from the checkpoint ("paper" and 0 with ckpt="none")."""
    return _lila("dinov2_vits14", ckpt, weights, preset, seed)


def lila_vitb14(ckpt=None, weights=None, preset=None, seed=None):
    """LILA on DINOv2 ViT-B/14 (paper preset: D = 192); arguments as lila_vits14."""
    return _lila("dinov2_vitb14", ckpt, weights, preset, seed)


def lila_vitl14(ckpt=None, weights=None, preset=None, seed=None):
    """LILA on DINOv2 ViT-L/14 (paper preset: D = 256); arguments as lila_vits14."""
    return _lila("dinov2_vitl14", ckpt, weights, preset, seed)
