"""torch.hub entry points: LILA pixel features from a checkpoint, without reading the training code.

    import torch
    lila = torch.hub.load(".", "lila_vits14", source="local", ckpt="runs/lila/ckpt.pt")  # a clone
    feats = lila.features(Image.open("frame.jpg"))        # (D, H, W) at the image's own size
    lila = torch.hub.load(".", "lila_dinov2_vitb14", source="local", pretrained=True,
                          checkpoint_path="lila_dino2_b14_ytvos.pt")      # an official file

Ours: `lila_vits14 | lila_vitb14 | lila_vitl14(ckpt=..., weights=..., preset=..., seed=...)`.
The official names and arguments (google-research lila/hubconf.py): `lila(encoder=...)`,
`lila_dinov2_vits14 | vitb14 | vitl14 | vitl14_kts(pretrained=..., checkpoint_path=...,
checkpoint_url=...)`. Every entry returns this repo's LILA (model.py), whichever file it reads.
`ckpt`, `checkpoint_path` and `checkpoint_url` take a train.py checkpoint or an official one
(`TrainLILA.state_dict()`, maybe under "state_dict", maybe half precision), recognised by its
keys; an http(s) URL is downloaded once into $TORCH_HOME/hub/checkpoints/, keyed by the URL.

read_lila_checkpoint(path_or_url) reads either kind into one dict (probe.py uses it too):
  kind "lila" | "official"; build: the build_lila arguments (backbone, weights, preset, seed);
  decoder: a DPTDecoder state dict under our names; encoder: the file's DINOv2 tensors or None;
  config: the training config (official: what the file says); note: the keys left out.
load_lila(ck, weights=None) builds LILA from it: strict decoder load; an official file's
encoder tensors must equal the DINOv2 weights used (weights=, default the official DINOv2).

Every bad file (missing, a directory, empty, text, truncated, Python objects, another backbone,
a missing or mis-shaped decoder tensor, non-finite weights, a trained fnorm) or failed download
is one line naming the file: FileNotFoundError, ValueError or RuntimeError beginning "hubconf.py: ".
"""
import hashlib
import os
import pickle
import re
import socket
import sys
import urllib.parse
from collections import Counter

import torch

import model

dependencies = ["torch", "numpy", "PIL"]  # what torch.hub checks before importing this file

CONFIG_KEYS = ("backbone", "preset", "weights", "seed")  # what the rebuild reads from a config

# The released official snapshots (a later version of the official lila/hubconf.py,
# RELEASED_CHECKPOINTS): fetched when pretrained=True names no file.
RELEASED = {
    "dinov2_vits14": "http://storage.googleapis.com/gresearch/lila-ckpts/lila_dino2_s14_ytvos.pt",
    "dinov2_vitb14": "http://storage.googleapis.com/gresearch/lila-ckpts/lila_dino2_b14_ytvos.pt",
    "dinov2_vitl14": "http://storage.googleapis.com/gresearch/lila-ckpts/lila_dino2_l14_ytvos.pt",
    "dinov2_vitl14_kts": "http://storage.googleapis.com/gresearch/lila-ckpts/lila_dino2_l14_kts.pt",
}


# ------------------------------------------------------------------ entry points
def lila_vits14(ckpt=None, weights=None, preset=None, seed=None):
    """LILA on DINOv2 ViT-S/14 (the paper's main model). ckpt: a train.py or official checkpoint
    (path, pathlib.Path or http(s) URL), or "none" for an untrained decoder. weights: encoder
    weights ("hub", a .pth path, "none"); default: as the checkpoint was trained. preset, seed:
    default from the checkpoint ("paper" and 0 with ckpt="none")."""
    return _lila("dinov2_vits14", ckpt, weights, preset, seed)


def lila_vitb14(ckpt=None, weights=None, preset=None, seed=None):
    """LILA on DINOv2 ViT-B/14 (paper preset: D = 192); arguments as lila_vits14."""
    return _lila("dinov2_vitb14", ckpt, weights, preset, seed)


def lila_vitl14(ckpt=None, weights=None, preset=None, seed=None):
    """LILA on DINOv2 ViT-L/14 (paper preset: D = 256); arguments as lila_vits14."""
    return _lila("dinov2_vitl14", ckpt, weights, preset, seed)


def lila(encoder="dinov2_vitb14", pretrained=False, checkpoint_path=None, checkpoint_url=None,
         weights=None, device=None, release=None):
    """The official entry (same name, defaults and checkpoint arguments). pretrained=False: the
    untrained paper decoder; True: checkpoint_path (first choice), checkpoint_url, or else the
    released snapshot of `encoder` (RELEASED). weights: the DINOv2 weights (default "hub")."""
    if encoder not in model.BACKBONES:
        raise ValueError(f"hubconf.py: encoder '{encoder}' is not supported here; choose from "
                         f"{list(model.BACKBONES)} (no ViT-g/14, no register models)")
    if checkpoint_path and checkpoint_url:
        raise ValueError("hubconf.py: pass checkpoint_path or checkpoint_url, not both")
    given = checkpoint_path or checkpoint_url
    if given and not pretrained:
        raise ValueError(f"hubconf.py: checkpoint '{given}' given with pretrained=False; pass "
                         f"pretrained=True to load it (pretrained=False is the untrained decoder)")
    ckpt = (given or RELEASED[release or encoder]) if pretrained else "none"
    net = _lila(encoder, ckpt, weights, None, None)
    return net if device is None else net.to(device)


def lila_dinov2_vits14(**kwargs):
    return lila(encoder="dinov2_vits14", **kwargs)


def lila_dinov2_vitb14(**kwargs):
    return lila(encoder="dinov2_vitb14", **kwargs)


def lila_dinov2_vitl14(**kwargs):
    return lila(encoder="dinov2_vitl14", **kwargs)


def lila_dinov2_vitl14_kts(**kwargs):
    """The official ViT-L/14 snapshot trained on Kinetics (the others: YouTube-VOS)."""
    return lila(encoder="dinov2_vitl14", release="dinov2_vitl14_kts", **kwargs)


def _lila(backbone, ckpt, weights, preset, seed):
    if ckpt is None:
        raise ValueError("hubconf.py: pass ckpt=PATH_OR_URL (a train.py or official checkpoint), "
                         "or ckpt='none' for the untrained decoder baseline")
    if not isinstance(ckpt, (str, os.PathLike)):
        raise ValueError(f"hubconf.py: ckpt must be a path or an http(s) URL, got "
                         f"{type(ckpt).__name__}")
    ckpt = os.fspath(ckpt)
    if ckpt == "none":  # untrained, seeded decoder: the baseline every table needs
        return model.build_lila(backbone, weights or "hub", preset or "paper", seed=seed or 0).eval()
    ck = read_lila_checkpoint(ckpt)
    if ck["build"]["backbone"] != backbone:
        have = ck["build"]["backbone"].replace("dinov2_", "")
        kind = "an official" if ck["kind"] == "official" else "a train.py"
        raise _bad(ck["path"], f"is {kind} checkpoint of {ck['build']['backbone']}; load it with the "
                               f"entry 'lila_{have}' or 'lila_dinov2_{have}', not one for {backbone}")
    return load_lila(ck, weights, preset, seed)


# ------------------------------------------------------------------ official checkpoints
def official_names(levels=4):
    """Our DPTDecoder module -> the official module under latent_head (lila/lila/dpt_lila.py
    SmallDPTHead, util/blocks.py): every decoder tensor of ours has exactly one source. The
    official refinenet4.resConfUnit1 has no counterpart: it is built but never called."""
    names = {"head_conv1": "scratch.output_conv1", "head_conv2": "scratch.output_conv2.0",
             "head_out": "scratch.output_conv2.2"}  # output_conv2.1 is the ReLU
    for i in range(levels):
        ref = f"scratch.refinenet{i + 1}"
        names.update({f"reassemble.{i}.project": f"projects.{i}",
                      f"reassemble.{i}.resample": f"resize_layers.{i}",  # 2: an Identity
                      f"reassemble.{i}.to_features": f"scratch.layer{i + 1}_rn",
                      f"fusion.{i}.skip_unit": f"{ref}.resConfUnit1",
                      f"fusion.{i}.unit": f"{ref}.resConfUnit2",
                      f"fusion.{i}.out_conv": f"{ref}.out_conv"})
    return names


def _from_official(sd, path):
    """An official TrainLILA.state_dict() -> (backbone, our decoder state dict, the encoder's
    tensors or None, note). Strict: every decoder tensor mapped, shape-checked, finite."""
    widths = {spec.embed_dim: name for name, spec in model.BACKBONES.items()}
    first = sd.get("latent_head.projects.0.weight")
    if first is None or first.dim() != 4 or int(first.shape[1]) not in widths:
        what = "missing" if first is None else f"of shape {tuple(first.shape)}"
        raise _bad(path, f"is an official LILA file whose latent_head.projects.0.weight is {what}: "
                         f"not a ViT-S/B/L/14 decoder (widths {sorted(widths)})")
    backbone = widths[int(first.shape[1])]
    with torch.device("meta"):  # our decoder's names and shapes, nothing allocated
        want = model.DPTDecoder(model.BACKBONES[backbone].embed_dim,
                                **model.decoder_config(backbone, "paper")).state_dict()
    names, used, decoder = official_names(), set(), {}
    for key, ref in want.items():
        mod = max((m for m in names if key.startswith(m + ".")), key=len)
        src = f"latent_head.{names[mod]}{key[len(mod):]}"
        if not torch.is_tensor(sd.get(src)):
            raise _bad(path, f"is an official {backbone} file without the decoder tensor {src} "
                             f"(our {key}): truncated or another head?")
        if tuple(sd[src].shape) != tuple(ref.shape):
            raise _bad(path, f"has {src} of shape {tuple(sd[src].shape)}, but the official "
                             f"{backbone} decoder has {tuple(ref.shape)} (our {key})")
        decoder[key] = _finite(sd[src], src, path).float()
        used.add(src)
    dim = want["head_out.weight"].shape[0]
    for part, identity in (("weight", 1.0), ("bias", 0.0)):
        t = sd.get(f"fnorm.{part}")
        if t is not None:
            used.add(f"fnorm.{part}")
            if tuple(t.shape) != (dim,) or not torch.equal(_finite(t, f"fnorm.{part}", path).float(),
                                                           torch.full((dim,), identity)):
                raise _bad(path, f"has a trained fnorm.{part} (the affine of the final LayerNorm; "
                                 f"the official trainer never updates it): this decoder has none, so "
                                 f"it cannot be applied; refused rather than dropped")
    never = "latent_head.scratch.refinenet4.resConfUnit1."
    extra = [k for k in sd if k.startswith("latent_head.") and k not in used and not k.startswith(never)]
    if extra:
        raise _bad(path, f"has {len(extra)} decoder tensors this decoder does not have, e.g. {extra[0]} "
                         f"(a head built with use_bn or use_clstoken?)")
    encoder = {k[len("pretrained."):]: v for k, v in sd.items()
               if k.startswith("pretrained.") and k != "pretrained.pos_embed"} or None
    left = Counter(_prefix(k, never) for k in sd if k not in used and not
                   (encoder and k.startswith("pretrained.") and k != "pretrained.pos_embed"))
    note = "left out: " + ", ".join(f"{p} ({n})" for p, n in sorted(left.items())) if left else ""
    return backbone, decoder, encoder, note


def _prefix(key, never):
    """The group a left-out key is reported under."""
    if key.startswith(never):
        return never + "* built, never called"
    if key == "pretrained.pos_embed":
        return key + ": the official loader drops it too"
    return key.split(".")[0] + ".*"


def _check_encoder(lila, encoder, path, weights):
    """An official file's frozen DINOv2 tensors must be the encoder built from `weights`
    (compared at the file's precision: a half-precision file holds the rounded weights)."""
    mine = lila.encoder.state_dict()
    for k, t in encoder.items():
        if k not in mine or tuple(mine[k].shape) != tuple(t.shape):
            raise _bad(path, f"has the encoder tensor pretrained.{k} {tuple(t.shape)} that DINOv2 "
                             f"{lila.encoder.embed_dim}-wide has not ("
                             f"{'register tokens: not supported' if 'register' in k else 'another encoder'})")
        ours = mine[k].to(t.dtype).float()
        if not torch.allclose(_finite(t, "pretrained." + k, path).float(), ours, rtol=1e-3, atol=1e-5):
            diff = float((t.float() - ours).abs().max())
            raise _bad(path, f"was trained on other encoder weights: its pretrained.{k} differs from "
                             f"DINOv2 weights '{weights}' (max |diff| {diff:.3g}); pass weights= the "
                             f"DINOv2 file it was trained with")


# ------------------------------------------------------------------ reading and building
def read_lila_checkpoint(path_or_url):
    """A train.py or official LILA checkpoint (path or http(s) URL) -> dict(kind, build,
    decoder, encoder, config, note, path); see the header."""
    src = os.fspath(path_or_url)
    path = _fetch(src) if src.startswith(("http://", "https://")) else src
    state = _read_file(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a wrapped state dict, as the official loader accepts
    if isinstance(state, dict) and state and all(str(k).startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items()}  # a Lightning module's keys
    if isinstance(state, dict) and any(str(k).startswith("latent_head.") for k in state):
        backbone, decoder, encoder, note = _from_official(state, path)
        dtypes = sorted({str(v.dtype)[6:] for k, v in state.items()
                         if k.startswith("latent_head.") and torch.is_tensor(v)})
        return dict(kind="official", build=dict(backbone=backbone, weights="hub", preset="paper", seed=0),
                    decoder=decoder, encoder=encoder, note=note, path=path,
                    config=dict(source="official", backbone=backbone, preset="paper", dtypes=dtypes))
    _check_ours(state, path)
    cfg = state["config"]
    for k, v in state["decoder"].items():
        _finite(v, f"decoder.{k}", path)
    return dict(kind="lila", build={k: cfg[k] for k in CONFIG_KEYS}, decoder=state["decoder"],
                encoder=None, config=dict(cfg), note="", path=path)


def load_lila(ck, weights=None, preset=None, seed=None):
    """LILA (eval mode) from read_lila_checkpoint's dict: the encoder from `weights` (default:
    the checkpoint's; an official file's: the official DINOv2), the decoder loaded strictly."""
    path, build = ck["path"], dict(ck["build"])
    if ck["kind"] == "official" and preset not in (None, "paper"):
        raise _bad(path, f"is an official file (the paper decoder); preset '{preset}' cannot hold it")
    build.update({k: v for k, v in dict(weights=weights, preset=preset, seed=seed).items() if v is not None})
    try:
        lila = model.build_lila(**build)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        msg = " ".join(str(e).split())  # one line
        raise _bad(path, f"(encoder weights '{build['weights']}', preset '{build['preset']}') cannot "
                         f"be rebuilt: {msg}; pass weights=... to use other encoder weights",
                   type(e)) from None
    if ck["encoder"] is not None:
        _check_encoder(lila, ck["encoder"], path, build["weights"])
    _load_decoder(lila, ck["decoder"], path, build["backbone"], build["preset"])
    if ck["note"]:
        print(f"hubconf.py: {path}: official {build['backbone']} decoder loaded; {ck['note']}",
              file=sys.stderr, flush=True)
    return lila.eval()


# --- plumbing: one-line errors, reading files, the URL cache, the strict decoder load ---
def _bad(path, what, exc=ValueError):
    """The one-line error for checkpoint `path` (raised by the caller `from None`)."""
    return exc(f"hubconf.py: checkpoint '{path}' {what}")


def _first_line(e, limit=160):
    """'Type: first sentence' of an exception, for a one-line message."""
    text = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
    return f"{type(e).__name__}: {text[:limit]}"


def _finite(t, name, path):
    if t.is_floating_point() and not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise _bad(path, f"has non-finite weights: {bad} of the {t.numel()} values of {name} are "
                         f"NaN or inf (a diverged run?); refused")
    return t


def _read_file(path):
    """torch.load of a checkpoint file (weights_only: no code runs), each failure one line."""
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
    try:  # mmap: an official file (~2 GB with its cue networks) is not read into memory whole
        return torch.load(path, map_location="cpu", weights_only=True, mmap=head.startswith(b"PK"))
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise _bad(path, f"is not a readable torch checkpoint ({_first_line(e)})") from None
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if not found:  # a broken stream rather than a foreign object
            detail = re.search(r"WeightsUnpickler error:\s*([^.\n]+)", str(e))
            raise _bad(path, f"is not a readable torch checkpoint (corrupt? the unpickler "
                             f"stopped: {detail.group(1) if detail else '-'})") from None
        raise _bad(path, f"holds a Python object ({found.group(1)}) that safe loading "
                         f"(weights_only=True) refuses; a checkpoint holds only tensors "
                         f"and plain data") from None
    except Exception as e:  # noqa: BLE001 - the zip or pickle stream itself is broken
        raise _bad(path, f"is truncated or corrupt ({size} bytes; {_first_line(e)})") from None


def _check_ours(state, path):
    """A train.py checkpoint: {'decoder': state dict, 'config': dict with CONFIG_KEYS, ...}."""
    if not isinstance(state, dict):
        raise _bad(path, f"holds a {type(state).__name__}, not a LILA checkpoint (a train.py dict "
                         f"with 'decoder' and 'config', or an official state dict with latent_head.*)")
    missing = [k for k in ("decoder", "config") if k not in state]
    if missing:
        bare = state and all(torch.is_tensor(v) for v in state.values())
        raise _bad(path, f"is not a train.py checkpoint: no {missing} among its keys "
                         f"{sorted(map(str, state))[:3]}"
                         + (" (a bare state dict? an official one holds latent_head.*)" if bare else ""))
    cfg, dec = state["config"], state["decoder"]
    lacking = [k for k in CONFIG_KEYS if k not in cfg] if isinstance(cfg, dict) else CONFIG_KEYS
    if lacking:
        raise _bad(path, f"has a 'config' without {list(lacking)} (train.py saves them all)")
    if not isinstance(dec, dict) or not all(torch.is_tensor(v) for v in dec.values()):
        raise _bad(path, "has a 'decoder' that is not a state dict (name -> tensor)")


def cache_path(url):
    """Where a downloaded checkpoint lives: torch.hub's cache, keyed by the whole URL (every
    train.py checkpoint is called ckpt.pt, so the file name alone would mix two runs up)."""
    name = os.path.basename(urllib.parse.urlparse(url).path) or "ckpt.pt"
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return os.path.join(torch.hub.get_dir(), "checkpoints", f"url{digest}-{name}")


def _fetch(url, timeout_s=30.0):
    """An http(s) checkpoint through torch.hub's cache -> (local path). A cached file is used
    as it is; a download that fails (offline, refused, 404) is one error line saying where to
    put the file by hand. timeout_s bounds each network wait, so a dead route cannot hang."""
    cached = cache_path(url)
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
            f"fetch it on a connected machine and put it at {cached} (torch.hub's cache, keyed by "
            f"the URL) or pass its local path (ckpt= or checkpoint_path=)") from None
    finally:
        socket.setdefaulttimeout(previous)
    return cached


def _load_decoder(lila, got, path, backbone, preset):
    """Strict load of the checkpoint's decoder, with a one-line summary of what differs."""
    want = lila.decoder.state_dict()
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
