"""torch.hub entry points: LILA pixel features from a checkpoint, without reading the training code.

    import torch
    lila = torch.hub.load(".", "lila_vits14", source="local", ckpt="runs/lila/ckpt.pt")  # a clone
    feats = lila.features(Image.open("frame.jpg"))        # (D, H, W) at the image's own size
    lila = torch.hub.load(".", "lila_dinov2_vitb14", source="local", pretrained=True)  # released file

Ours: `lila_vits14 | lila_vitb14 | lila_vitl14 | lila_vits14_reg | lila_vitb14_reg |
lila_vitl14_reg(ckpt=..., weights=..., preset=..., seed=...)`. The official names, arguments and
defaults (google-research lila/hubconf.py): `lila(encoder=...)`, `lila_dinov2_vits14 | vitb14 |
vitl14 | vitl14_kts`, `lila_dinov2reg_vits14 | vitb14 | vitl14`; of the same form for DINOv3 (no
official LILA code builds it): `lila_dinov3_vits16 | vitb16 | vitl16`. `ckpt`, `checkpoint_path`
and `checkpoint_url` take a train.py checkpoint or an official one (`TrainLILA.state_dict()`,
maybe under "state_dict", maybe half precision), recognised by its keys.

What every entry returns, compared with the official model: this repo's LILA (model.py), in eval
mode, with the official decoder and encoder weights when it reads an official file. Input: images
in [0, 1], ImageNet-normalised inside (the official model takes them normalised; a normalised
image is refused with one line, never mis-read). `lila(x)`, sides multiples of the patch, returns
what the official forward does: (the last tapped encoder grid (B, E, h, w), the LayerNormed pixel
features (B, D, H, W)); the official forward's keyword arguments (with_norm, ...) are not taken.
`lila.features(image)` is ours: any size, PIL / numpy / tensor, (D, H, W) at the image's own size.

The official arguments of lila(), with the official meaning: pretrained=False is the untrained
paper decoder; True reads checkpoint_path, else checkpoint_url, else DIR/model_name/checkpoint_name,
else the released file of release_key or encoder (RELEASED). DIR is checkpoints_dir, else
$LILA_CHECKPOINTS_DIR, else checkpoints/ beside this file; it also holds the encoder weights under
their official file names (model.BACKBONES .file: dinov2_vitb14_pretrain.pth, ..._reg4_pretrain.pth,
and ours for DINOv3), read before torch.hub's. Downloads land in $TORCH_HOME/hub/checkpoints/ as
the official loader puts them: a released file under its own name (so one the official loader
fetched is found, not fetched again), a URL with checkpoint_name under that name; a URL without
one under a key of the whole URL (the official default name, best_checkpoint.pt, would give two
runs' files one name).
strict=False (the official default) leaves out what LILA does not hold (the cue networks: listed
on stderr); strict=True refuses any such key and requires the encoder tensors. Either way the whole
decoder must be there (the official strict=False would leave a missing tensor at its random init).
Ours besides: weights= (the encoder's; default as above), and one file argument at a time (the
official silently takes the first of checkpoint_path, checkpoint_url, model_name).

read_lila_checkpoint(path_or_url) reads either kind into one dict (probe.py uses it too):
  kind "lila" | "official"; build: the build_lila arguments (backbone, weights, preset, seed);
  decoder: a DPTDecoder state dict under our names; encoder: the file's encoder tensors or None;
  config: the training config (official: what the file says); note: the keys left out.
load_lila(ck, weights=None) builds LILA from it: strict decoder load; an official file's
encoder tensors (register tokens included) must equal the encoder weights used (weights=,
default the official DINOv2).

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
# RELEASED_CHECKPOINTS; it releases none for the register models): fetched when pretrained=True
# names no file.
RELEASED = {
    "dinov2_vits14": "http://storage.googleapis.com/gresearch/lila-ckpts/lila_dino2_s14_ytvos.pt",
    "dinov2_vitb14": "http://storage.googleapis.com/gresearch/lila-ckpts/lila_dino2_b14_ytvos.pt",
    "dinov2_vitl14": "http://storage.googleapis.com/gresearch/lila-ckpts/lila_dino2_l14_ytvos.pt",
    "dinov2_vitl14_kts": "http://storage.googleapis.com/gresearch/lila-ckpts/lila_dino2_l14_kts.pt",
}
# The official encoder names of the register models (lila/lila/dpt_lila.py load_encoder) -> ours.
OFFICIAL_ENCODERS = {f"dinov2reg_vit{s}14": f"dinov2_vit{s}14_reg" for s in "sblg"}
CHECKPOINT_NAME = "best_checkpoint.pt"  # the official checkpoint_name default (the trainer's file)
CHECKPOINTS_ENV = "LILA_CHECKPOINTS_DIR"  # the official lila/lila/model_zoo.py CHECKPOINTS_ENV_VAR


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


def lila_vits14_reg(ckpt=None, weights=None, preset=None, seed=None):
    """LILA on DINOv2 ViT-S/14 with 4 registers; arguments as lila_vits14."""
    return _lila("dinov2_vits14_reg", ckpt, weights, preset, seed)


def lila_vitb14_reg(ckpt=None, weights=None, preset=None, seed=None):
    """LILA on DINOv2 ViT-B/14 with 4 registers; arguments as lila_vits14."""
    return _lila("dinov2_vitb14_reg", ckpt, weights, preset, seed)


def lila_vitl14_reg(ckpt=None, weights=None, preset=None, seed=None):
    """LILA on DINOv2 ViT-L/14 with 4 registers; arguments as lila_vits14."""
    return _lila("dinov2_vitl14_reg", ckpt, weights, preset, seed)


def lila(encoder="dinov2_vitb14", pretrained=False, checkpoint_path=None, checkpoint_url=None,
         checkpoints_dir=None, model_name=None, checkpoint_name=CHECKPOINT_NAME, strict=False,
         device=None, release_key=None, weights=None):
    """The official entry: its arguments, defaults and meaning (see the header). encoder: an
    official name (dinov2_vitb14, dinov2reg_vitb14, ...) or one of model.BACKBONES."""
    backbone = OFFICIAL_ENCODERS.get(encoder, encoder)
    if backbone not in model.BACKBONES:
        raise ValueError(f"hubconf.py: encoder '{encoder}' is not supported here; choose from "
                         f"{sorted(set(model.BACKBONES) | set(OFFICIAL_ENCODERS))}")
    given = [k for k, v in (("checkpoint_path", checkpoint_path), ("checkpoint_url", checkpoint_url),
                            ("model_name", model_name)) if v]
    if len(given) > 1:
        raise ValueError(f"hubconf.py: pass one of checkpoint_path, checkpoint_url, model_name, not "
                         f"{' and '.join(given)}")
    if given and not pretrained:
        raise ValueError(f"hubconf.py: {given[0]} given with pretrained=False; pass pretrained=True to "
                         f"load it (pretrained=False is the untrained decoder)")
    root = os.path.abspath(os.path.expanduser(checkpoints_dir or os.environ.get(CHECKPOINTS_ENV) or
                                              os.path.join(os.path.dirname(__file__), "checkpoints")))
    if weights is None:  # the official DINOv2 is read from DIR first (model_zoo.py), then the hub
        local = os.path.join(root, model.BACKBONES[backbone].file)
        weights = local if os.path.isfile(local) else "hub"
    name = None if checkpoint_name == CHECKPOINT_NAME else os.path.basename(checkpoint_name)
    if not pretrained:
        ckpt = "none"
    elif checkpoint_path:
        ckpt = os.path.expanduser(os.fspath(checkpoint_path))
    elif checkpoint_url:
        ckpt = _fetch(checkpoint_url, name)
    elif model_name:
        ckpt = os.path.join(root, model_name, checkpoint_name)
        if not os.path.isfile(ckpt):
            raise FileNotFoundError(f"hubconf.py: checkpoint '{ckpt}' not found (model_name is read from "
                                    f"DIR/model_name/checkpoint_name; DIR: checkpoints_dir, else "
                                    f"${CHECKPOINTS_ENV}, else checkpoints/ beside hubconf.py)")
    elif (release_key or encoder) in RELEASED:
        ckpt = _fetch(RELEASED[release_key or encoder], name)
    else:
        raise ValueError(f"hubconf.py: no released LILA checkpoint for '{release_key or encoder}' "
                         f"(released: {list(RELEASED)}); pass checkpoint_path=, checkpoint_url= or "
                         f"model_name=")
    net = _lila(backbone, ckpt, weights, None, None, strict)
    return net if device is None else net.to(device)


def lila_dinov2_vits14(**kwargs):
    return lila(encoder="dinov2_vits14", **kwargs)


def lila_dinov2_vitb14(**kwargs):
    return lila(encoder="dinov2_vitb14", **kwargs)


def lila_dinov2_vitl14(**kwargs):
    return lila(encoder="dinov2_vitl14", **kwargs)


def lila_dinov2_vitl14_kts(**kwargs):
    """The official ViT-L/14 snapshot trained on Kinetics (the others: YouTube-VOS)."""
    return lila(encoder="dinov2_vitl14", release_key="dinov2_vitl14_kts", **kwargs)


def lila_dinov2reg_vits14(**kwargs):
    return lila(encoder="dinov2reg_vits14", **kwargs)


def lila_dinov2reg_vitb14(**kwargs):
    return lila(encoder="dinov2reg_vitb14", **kwargs)


def lila_dinov2reg_vitl14(**kwargs):
    return lila(encoder="dinov2reg_vitl14", **kwargs)


def lila_dinov3_vits16(**kwargs):
    """DINOv3 ViT-S/16 (ours: its weights are gated, so pass weights=PATH or weights="none")."""
    return lila(encoder="dinov3_vits16", **kwargs)


def lila_dinov3_vitb16(**kwargs):
    return lila(encoder="dinov3_vitb16", **kwargs)


def lila_dinov3_vitl16(**kwargs):
    return lila(encoder="dinov3_vitl16", **kwargs)


def _lila(backbone, ckpt, weights, preset, seed, strict=False):
    if ckpt is None:
        raise ValueError("hubconf.py: pass ckpt=PATH_OR_URL (a train.py or official checkpoint), "
                         "or ckpt='none' for the untrained decoder baseline")
    if not isinstance(ckpt, (str, os.PathLike)):
        raise ValueError(f"hubconf.py: ckpt must be a path or an http(s) URL, got "
                         f"{type(ckpt).__name__}")
    ckpt = os.fspath(ckpt)
    if ckpt == "none":  # untrained, seeded decoder: the baseline every table needs
        return model.build_lila(backbone, weights or "hub", preset or "paper", seed=seed or 0).eval()
    ck = read_lila_checkpoint(ckpt, strict, backbone)
    if ck["build"]["backbone"] != backbone:
        kind = "an official" if ck["kind"] == "official" else "a train.py"
        raise _bad(ck["path"], f"is {kind} checkpoint of {ck['build']['backbone']}; load it with "
                               f"{_entries(ck['build']['backbone'])}, not an entry for {backbone}")
    return load_lila(ck, weights, preset, seed)


def _entries(backbone):
    """The hub entries that build `backbone` (ours, the official form), for error messages."""
    official = {v: k for k, v in OFFICIAL_ENCODERS.items()}.get(backbone, backbone)
    names = dict.fromkeys([f"lila_{backbone.replace('dinov2_', '')}", f"lila_{official}"])  # DINOv3: one
    return " or ".join(f"'{n}'" for n in names if n in globals()) or f"lila(encoder='{official}')"


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


def _from_official(sd, path, strict=False, like=None):
    """An official TrainLILA.state_dict() -> (backbone, our decoder state dict, the encoder's
    tensors or None, note). Always: every decoder tensor mapped, shape-checked, finite. strict:
    no key outside the inference model (LILA: pretrained, latent_head, fnorm). The backbone is the
    DINOv2 of the decoder's input width, with registers if the file holds register_tokens (a file
    without encoder tensors does not say: then as `like`, the entry's backbone)."""
    widths = {spec.embed_dim: name for name, spec in model.BACKBONES.items()
              if name.startswith("dinov2_") and not name.endswith("_reg")}  # the official LILA's
    first = sd.get("latent_head.projects.0.weight")
    if first is None or first.dim() != 4 or int(first.shape[1]) not in widths:
        what = "missing" if first is None else f"of shape {tuple(first.shape)}"
        raise _bad(path, f"is an official LILA file whose latent_head.projects.0.weight is {what}: "
                         f"not a DINOv2 decoder (widths {sorted(widths)})")
    backbone = widths[int(first.shape[1])]
    bare = not any(k.startswith("pretrained.") and k != "pretrained.pos_embed" for k in sd)
    if "pretrained.register_tokens" in sd or (bare and like == backbone + "_reg"):
        backbone += "_reg"
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
    outside = sorted(p for p in left if not p.startswith(("pretrained.pos_embed", never)))
    if strict and (outside or encoder is None):  # pos_embed: both loaders drop it; resConfUnit1: built
        what = ", ".join(f"{p} ({left[p]})" for p in outside)
        raise _bad(path, (f"holds keys outside the LILA model ({what})" if outside else
                          "holds no encoder tensors (pretrained.*)") +
                   "; strict=True refuses that (strict=False, the default, loads it)")
    note = "left out: " + ", ".join(f"{p} ({n})" for p, n in sorted(left.items())) if left else ""
    return backbone, decoder, encoder, note


def _prefix(key, never):
    """The group a left-out key is reported under."""
    if key.startswith(never):
        return never + "* built, never called"
    if key == "pretrained.pos_embed":
        return key + ": the official loader drops it too"
    return key.split(".")[0] + ".*"


def _check_encoder(lila, encoder, path, weights, backbone, strict=False):
    """An official file's frozen encoder tensors (register tokens included) must be the encoder
    built from `weights` (compared at the file's precision: a half-precision file holds the
    rounded weights). strict: every encoder tensor but pos_embed must be there."""
    mine = lila.encoder.state_dict()
    for k, t in encoder.items():
        if k not in mine or tuple(mine[k].shape) != tuple(t.shape):
            raise _bad(path, f"has the encoder tensor pretrained.{k} {tuple(t.shape)} that {backbone} "
                             f"has not (another encoder?)")
        ours = mine[k].to(t.dtype).float()
        if not torch.allclose(_finite(t, "pretrained." + k, path).float(), ours, rtol=1e-3, atol=1e-5):
            diff = float((t.float() - ours).abs().max())
            raise _bad(path, f"was trained on other encoder weights: its pretrained.{k} differs from "
                             f"{backbone} weights '{weights}' (max |diff| {diff:.3g}); pass weights= the "
                             f"encoder file it was trained with")
    missing = sorted(set(mine) - set(encoder) - {"pos_embed"})
    if strict and missing:
        raise _bad(path, f"lacks {len(missing)} encoder tensors of {backbone}, e.g. pretrained.{missing[0]}; "
                         f"strict=True refuses it, strict=False uses weights '{weights}' for them")


# ------------------------------------------------------------------ reading and building
def read_lila_checkpoint(path_or_url, strict=False, backbone=None):
    """A train.py or official LILA checkpoint (path or http(s) URL) -> dict(kind, build,
    decoder, encoder, config, note, path, strict); see the header. strict, backbone: the official
    file's strictness and the backbone assumed when it does not say (_from_official)."""
    src = os.fspath(path_or_url)
    path = _fetch(src) if src.startswith(("http://", "https://")) else src
    state = _read_file(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a wrapped state dict, as the official loader accepts
    if isinstance(state, dict) and state and all(str(k).startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items()}  # a Lightning module's keys
    if isinstance(state, dict) and any(str(k).startswith("latent_head.") for k in state):
        backbone, decoder, encoder, note = _from_official(state, path, strict, backbone)
        dtypes = sorted({str(v.dtype)[6:] for k, v in state.items()
                         if k.startswith("latent_head.") and torch.is_tensor(v)})
        return dict(kind="official", build=dict(backbone=backbone, weights="hub", preset="paper", seed=0),
                    decoder=decoder, encoder=encoder, note=note, path=path, strict=strict,
                    config=dict(source="official", backbone=backbone, preset="paper", dtypes=dtypes))
    _check_ours(state, path)
    cfg = state["config"]
    for k, v in state["decoder"].items():
        _finite(v, f"decoder.{k}", path)
    return dict(kind="lila", build={k: cfg[k] for k in CONFIG_KEYS}, decoder=state["decoder"],
                encoder=None, config=dict(cfg), note="", path=path, strict=strict)


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
        _check_encoder(lila, ck["encoder"], path, build["weights"], build["backbone"], ck.get("strict"))
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
        raise _bad(path, "not found: give a train.py checkpoint (DIR/ckpt.pt or DIR/best.pt of a "
                   "`python train.py --out DIR` run) or an official LILA file (a path or an http(s) URL)",
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


def cache_path(url, name=None):
    """Where a downloaded checkpoint lives in torch.hub's cache: under `name` if given (the
    official checkpoint_name), a released file under its own name (where the official loader puts
    it), any other URL under a key of the whole URL (every train.py checkpoint is called ckpt.pt,
    so the file name alone would mix two runs up)."""
    base = os.path.basename(urllib.parse.urlparse(url).path) or "ckpt.pt"
    if name is None and url not in RELEASED.values():
        name = f"url{hashlib.sha256(url.encode()).hexdigest()[:12]}-{base}"
    return os.path.join(torch.hub.get_dir(), "checkpoints", name or base)


def _fetch(url, name=None, timeout_s=30.0):
    """An http(s) checkpoint through torch.hub's cache (cache_path) -> (local path). A cached
    file is used as it is; a download that fails (offline, refused, 404) is one error line saying
    where to put the file by hand. timeout_s bounds each network wait: a dead route cannot hang."""
    cached = cache_path(url, name)
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
            f"fetch it on a connected machine and put it at {cached} (torch.hub's cache) or pass "
            f"its local path (ckpt= or checkpoint_path=)") from None
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
