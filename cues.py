"""The cues LILA's linear in-context learner reads (paper section 3): flow, depth, SD.

Flow and depth are computed on the base frames (Hb x Wb: 224^2 in the paper preset, the view
side in the tiny one), never on the crops, then warped into each view (data.py). Method first:
- `flow_confidence`: forward-backward consistency, 1 where exp(-e / tau) > 0.5.
- `disparity_to_depth`: relative inverse depth -> bounded log depth + a far-pixel mask.
- `sd_cue`: the self-distillation cue: random encoder channels (one subset per pair, shared by
  its two views) upsampled to pixels by PAMR (pamr.py), L2-normalised per pixel.
Below the plumbing line: `FlowCue` (RAFT) and `DepthCue` (MiDaS) through torch.hub, and the
cue cache ROOT/Cues/<video>/<frame>.npz (`write_cue_cache`, the CLI) so that training needs no
cue network. Both networks always run in float32, also inside an autocast region, so cues
computed during training equal the cached ones.

Why the cues are normalised differently: flow and depth are scalar fields of arbitrary scale
(motion grows with the frame gap, MiDaS' depth unit is per image); train.py z-scores each with
one scalar over the batch, shared by both views, which puts every cue at unit std (so lam,
sigma and the L1 weigh them alike) without changing any shape within a view. An SD cue is a
direction in the encoder's feature space (features are compared by cosine, and their norms
vary a lot between tokens): each pixel's 32-vector is scaled to unit length (as the official
RFFEncoder), every pixel weighs the same and each channel stays within [-1, 1].

Shapes: B batch, H x W image/map, h x w encoder patch grid, E encoder width, C selected SD
channels. Flow (B, 2, H, W): channel 0 = x (u), 1 = y (v), in normalised units u * 2 / W,
v * 2 / H (grid_sample, align_corners=False); the cache stores pixels.
Deviations from the official code (SEA-RAFT and Depth-Anything-V2 there): README, "Differences".
Run: python cues.py --data ytvos/ [--shard i/n]   (tests: python -m pytest -q tests/test_cues.py)
What the user can cause (a missing or wrongly laid-out folder, a Cues/ that cannot be written,
a full disk, a network that cannot be loaded) ends as "cues.py: error: ..." (the whole
message, status 2); anything else is a bug and keeps its traceback.
"""
import argparse
import errno
import importlib
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# the real reader of every supported layout, and PairDataset's base frames (the cache's frames)
import runs
from data import VideoFolder, base_frame
from pamr import pamr_cascade


# --- method: flow and its confidence ---

def pixels_to_normalised(flow):
    """(B, 2, H, W) pixel flow -> normalised units (u * 2 / W, v * 2 / H)."""
    H, W = flow.shape[-2:]
    scale = flow.new_tensor([2.0 / W, 2.0 / H]).view(1, 2, 1, 1)     # (1, 2, 1, 1)
    return flow * scale                                               # (B, 2, H, W)


def normalised_to_pixels(flow):
    """Inverse of `pixels_to_normalised`."""
    H, W = flow.shape[-2:]
    scale = flow.new_tensor([W / 2.0, H / 2.0]).view(1, 2, 1, 1)     # (1, 2, 1, 1)
    return flow * scale                                               # (B, 2, H, W)


def forward_backward_error(flow_fwd, flow_bwd):
    """e(p) = || f_fwd(p) + f_bwd(p + f_fwd(p)) ||, in normalised units.

    Why: a pixel followed forward and back returns where it started exactly where both flows
    are right and it stays visible; occlusions and flow errors leave a residual e(p).
    f_bwd is read bilinearly at the landing point p + f_fwd(p), clamped to the image (border
    padding; the same pixels as official func_utils.py flow_sample, tests/test_cues.py).
    flow_fwd, flow_bwd (B, 2, H, W) normalised -> (B, 1, H, W).
    """
    B, _, H, W = flow_fwd.shape
    ys = (torch.arange(H, device=flow_fwd.device, dtype=flow_fwd.dtype) * 2 + 1) / H - 1  # (H,)
    xs = (torch.arange(W, device=flow_fwd.device, dtype=flow_fwd.dtype) * 2 + 1) / W - 1  # (W,)
    base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)   # (H, W, 2) pixel centres
    grid = base + flow_fwd.permute(0, 2, 3, 1)                        # (B, H, W, 2)
    bwd_at = F.grid_sample(flow_bwd, grid, mode="bilinear", padding_mode="border",
                           align_corners=False)                       # (B, 2, H, W)
    return (flow_fwd + bwd_at).norm(dim=1, keepdim=True)              # (B, 1, H, W)


def flow_confidence(flow_fwd, flow_bwd, tau=0.05):
    """Forward-backward consistency (paper section 3; official func_utils.py compute_uniconf,
    tau = conf_temp 0.05 in normalised units, configs/train_ytvos.yaml):

        conf(p) = [exp(-e(p) / tau) > 0.5],   e = forward_backward_error(f_fwd, f_bwd)

    i.e. e < tau ln 2 = 0.035 normalised units, which is 0.035 * W / 2 px on a frame of side W
    (one unit is half the side): 3.9 px on the paper's 224^2 base frames, 1.9 px on the tiny
    preset's 112^2. A pixel is trusted where going there and back lands within that distance
    of where it started; occluded pixels and flow errors fail. The flow channels alone (official: three
    channels [flow, flow, depth-valid]; depth validity comes from `disparity_to_depth`).
    flow_fwd, flow_bwd (B, 2, H, W) normalised -> (B, 1, H, W) float in {0, 1}.
    """
    err = forward_backward_error(flow_fwd, flow_bwd)                  # (B, 1, H, W)
    return (torch.exp(-err / tau) > 0.5).float()


# --- method: depth ---

def disparity_to_depth(disp, q=0.95, far=0.02):
    """Relative inverse depth (any positive scale) -> bounded log-compressed depth + validity.

        d     = disp / quantile_q(disp[disp > 0])          per image (robust scale, q = 0.95)
        valid = d > far                                    (far = 0.02: 50x farther than the
                                                            q-quantile; sky, "infinitely far")
        depth = log(1 + 1 / max(d, far))                   in [0, log(1 + 1 / far)] ~ [0, 3.93]

    Why: MiDaS gives inverse depth up to an unknown scale (and shift, not removed here); the
    quantile fixes the scale per image, the log keeps near and far within one bounded range.
    Ours (the official DepthCore's constants assume Depth-Anything-V2's units).
    disp (B, 1, H, W) -> (depth (B, 1, H, W), valid (B, 1, H, W) float in {0, 1}).
    """
    B = disp.shape[0]
    x = disp.float().flatten(1)                                        # (B, H*W)
    pos = torch.where(x > 0, x, torch.full_like(x, float("nan")))     # (B, H*W) nan if <= 0
    scale = torch.nanquantile(pos, q, dim=1).nan_to_num(1.0)          # (B,) (no positive: 1)
    d = (disp.float() / scale.view(B, 1, 1, 1)).nan_to_num(0.0)       # (B, 1, H, W)
    valid = (d > far).float()                                          # (B, 1, H, W)
    depth = torch.log1p(1.0 / d.clamp(min=far))                       # (B, 1, H, W)
    return depth, valid


# --- method: the self-distillation cue ---

def sd_channels(n_total, n_channels=32, generator=None, batch=None):
    """A random subset of `n_channels` of `n_total` encoder channels: (n_channels,), or with
    `batch`, (batch, n_channels), one subset per pair (official dpt_lila.py random_subset
    draws one per pair, shared by its two views). Row b is the b-th draw of the batch=None
    call from the same generator."""
    if n_channels > n_total:
        raise ValueError(f"cues.py: n_channels={n_channels} > encoder width {n_total}")
    if batch is None:
        return torch.randperm(n_total, generator=generator)[:n_channels]        # (C,)
    return torch.stack([torch.randperm(n_total, generator=generator)[:n_channels]
                        for _ in range(batch)])                                # (batch, C)


def sd_cue(enc_grid, image, n_channels=32, generator=None, channels=None, use_pamr=True):
    """Self-distillation cue (paper section 3; official TrainLILA.train_forward): C random
    channels (num_fts = 32) of the encoder's last tapped layer, upsampled from h x w to H x W
    by the PAMR cascade guided by the view's RGB (or bilinearly: the "no PAMR" ablation),
    L2-normalised per pixel: an SD cue is a direction in feature space (module docstring).

    Why it exists: flow and depth say nothing where the scene is geometrically uniform (two
    static objects side by side at one depth have the same flow and depth), so geometry alone
    would let the decoder forget what the frozen encoder knows there. Predicting, per pair, a
    random subset of the encoder's own channels makes the decoder keep that knowledge,
    linearly readable and at pixel resolution (hence PAMR: the encoder sees 14 px patches).

    enc_grid (B, E, h, w), image (B, 3, H, W) in [0, 1] -> (B, C, H, W).
    channels: (C,) one subset for every element, or (B, C) one subset per element (as the
    official code: pass the pair's row for both of its views, e.g. `ch.repeat(2, 1)` for a
    [queries; contexts] batch); None: draw (C,) = `sd_channels(E, n_channels, generator)`.
    """
    B, E, h, w = enc_grid.shape
    H, W = image.shape[-2:]
    if channels is None:
        channels = sd_channels(E, n_channels, generator)
    channels = torch.as_tensor(channels, device=enc_grid.device)
    if channels.dim() == 1:
        sub = enc_grid[:, channels]                                    # (B, C, h, w)
    elif channels.dim() == 2 and channels.shape[0] == B:
        idx = channels[:, :, None, None].expand(-1, -1, h, w)          # (B, C, h, w)
        sub = torch.gather(enc_grid, 1, idx)                           # (B, C, h, w)
    else:
        raise ValueError(f"cues.py: sd_cue channels must be (C,) or (B, C) with B = {B}, "
                         f"got shape {tuple(channels.shape)}")
    with torch.autocast(image.device.type, enabled=False):
        sub = sub.float()
        if use_pamr:
            up = pamr_cascade(image.float(), sub)                      # (B, C, H, W)
        else:
            up = F.interpolate(sub, size=(H, W), mode="bilinear", align_corners=False)  # (B, C, H, W)
        return F.normalize(up, dim=1)                                  # (B, C, H, W) unit norm


# --- plumbing: the cue networks (torch.hub) ---
# source="github" downloads the hub repo and the weights into TORCH_HOME (~/.cache/torch);
# source="local" with hub_dir = a local clone of the repo (weights still from
# TORCH_HOME/hub/checkpoints); net = an injected nn.Module with the same call signature (how
# the tests drive the real pre- and post-processing). torchvision (RAFT) and timm (MiDaS) are
# optional dependencies, checked up front with a message saying how to install them.

FLOW_NETS = ("raft_small", "raft_large")  # torchvision hubconf.py entry points
# MiDaS variant -> (target side, resize method, mean, std): intel-isl/MiDaS hubconf.py transforms()
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MIDAS_PREPROCESS = {
    "MiDaS_small": (256, "upper_bound", IMAGENET_MEAN, IMAGENET_STD),
    "MiDaS": (384, "upper_bound", IMAGENET_MEAN, IMAGENET_STD),
    "DPT_Hybrid": (384, "minimal", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "DPT_Large": (384, "minimal", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
HUB_REPOS = {"flow": ("pytorch/vision", "vision"), "depth": ("intel-isl/MiDaS", "MiDaS")}


class CueLoadError(RuntimeError):
    """A cue network could not be loaded; the message says how to provide it."""


def _import_problem(name):
    """None if `import name` works, else the reason (missing, or a broken install such as a
    torchvision built for another torch version)."""
    try:
        importlib.import_module(name)
        return None
    except Exception as err:  # noqa: BLE001 (any failure means: not usable)
        return f"{type(err).__name__}: {err}"


def _hub_load(kind, name, source, hub_dir, needs, **kwargs):
    """torch.hub.load with checks up front and a readable error instead of a deep traceback."""
    repo, clone = HUB_REPOS[kind]
    how = (f"  - online: the first run downloads the code and weights into the torch.hub cache "
           f"{torch.hub.get_dir()} (= $TORCH_HOME/hub); without internet, run once on a machine "
           f"with internet, copy $TORCH_HOME over and set TORCH_HOME to it;\n"
           f"  - or a local clone: git clone https://github.com/{repo} DIR/{clone} and pass "
           f"--hub-dir DIR (source='local', hub_dir='DIR/{clone}'); the weights still come "
           f"from TORCH_HOME/hub/checkpoints;\n"
           f"  - a weights file there that fails to load (an interrupted download) must be "
           f"deleted, then run again; an error from inside the hub code itself usually means "
           f"an installed package (torchvision, timm) the repo was not written for.")
    for module, pip in needs:
        problem = _import_problem(module)
        if problem is not None:
            raise CueLoadError(f"cues.py: {kind} network '{name}' needs the Python package "
                               f"'{module}', which cannot be imported ({problem}).\n"
                               f"Install it (matching your torch version): pip install {pip}")
    if source not in ("github", "local"):
        raise CueLoadError(f"cues.py: source must be 'github' or 'local', got {source!r}")
    if source == "local":
        if hub_dir is None or not os.path.isfile(os.path.join(str(hub_dir), "hubconf.py")):
            raise CueLoadError(f"cues.py: source='local' needs hub_dir = a local clone of "
                               f"{repo} containing hubconf.py; got hub_dir={hub_dir!r}\n{how}")
        where = str(hub_dir)
    else:
        where = repo
    try:
        # trust_repo=True: the two repos are fixed here; "check" would prompt on stdin.
        net = torch.hub.load(where, name, source=source, trust_repo=True, **kwargs)
    except Exception as err:  # noqa: BLE001 (a third-party hub load fails in many ways)
        raise CueLoadError(f"cues.py: could not load {kind} network '{name}' from {where} "
                           f"({type(err).__name__}: {err}).\nTo provide it:\n{how}") from err
    return net.eval()


def pad_to_multiple(x, multiple):
    """Replicate-pad (B, C, H, W) symmetrically to sides divisible by `multiple`.
    Returns the padded tensor and (left, right, top, bottom) for `unpad`."""
    H, W = x.shape[-2:]
    ph, pw = (-H) % multiple, (-W) % multiple
    pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    return F.pad(x, pad, mode="replicate"), pad


def unpad(x, pad):
    left, right, top, bottom = pad
    H, W = x.shape[-2:]
    return x[..., top:H - bottom, left:W - right]


class FlowCue(nn.Module):
    """RAFT optical flow in both directions, normalised units (official: SEA-RAFT). Inputs
    to [-1, 1] as torchvision's OpticalFlow preset, replicate-padded symmetrically to
    multiples of 8 (as RAFT's InputPadder).
    name: "raft_small" (default) or "raft_large" (torchvision hubconf, weights="DEFAULT" =
    Raft_*_Weights.C_T_V2). source/hub_dir: see above. net: an injected module called
    as net(img1, img2) with images in [-1, 1], sides multiples of `multiple`, returning a
    list of (B, 2, H, W) pixel flows (RAFT's iterates; the last is the finest) or a tensor.
    """

    def __init__(self, name="raft_small", source="github", hub_dir=None, net=None,
                 multiple=8):  # RAFT's feature pyramid works at 1/8 resolution
        super().__init__()
        if net is None:
            if name not in FLOW_NETS:
                raise CueLoadError(f"cues.py: unknown flow network {name!r}; choose from {FLOW_NETS}")
            net = _hub_load("flow", name, source, hub_dir, needs=[("torchvision", "torchvision")],
                            weights="DEFAULT")
        self.net, self.multiple = net.eval(), multiple

    @torch.no_grad()
    def forward(self, img1, img2):
        """img1, img2 (B, 3, H, W) in [0, 1] -> (flow_fwd 1->2, flow_bwd 2->1), each (B, 2, H, W).
        Always float32: any surrounding autocast is switched off for the network."""
        B = img1.shape[0]
        with torch.autocast(img1.device.type, enabled=False):
            src = torch.cat([img1, img2]).float() * 2 - 1            # (2B, 3, H, W) in [-1, 1]
            dst = torch.cat([img2, img1]).float() * 2 - 1            # (2B, 3, H, W)
            src, pad = pad_to_multiple(src, self.multiple)           # (2B, 3, H8, W8)
            dst, _ = pad_to_multiple(dst, self.multiple)
            out = self.net(src, dst)
            out = out[-1] if isinstance(out, (list, tuple)) else out  # (2B, 2, H8, W8) pixels
            flow = pixels_to_normalised(unpad(out.float(), pad))     # (2B, 2, H, W)
        return flow[:B], flow[B:]


def midas_input_size(H, W, side, method, multiple=32):
    """Network input (h, w) for an H x W image: MiDaS Resize.get_size with keep_aspect_ratio
    (intel-isl/MiDaS midas/transforms.py): one scale for both sides, then each side rounded
    to a multiple of `multiple` ("upper_bound": at most `side`, "minimal": plain rounding).
    "minimal" takes the scale nearer to 1, the height's on a tie (as get_size: the width's
    only if strictly nearer)."""
    sh, sw = side / H, side / W
    if method == "upper_bound":
        s = min(sh, sw)
    elif method == "minimal":
        s = sw if abs(1 - sw) < abs(1 - sh) else sh
    else:
        raise ValueError(f"cues.py: unknown MiDaS resize method {method!r}")

    def constrain(x):
        y = int(np.round(x / multiple) * multiple)
        if method == "upper_bound" and y > side:
            y = int(math.floor(x / multiple) * multiple)
        return max(y, multiple)  # (official: min_val=0; a 0-sized side would crash the net)
    return constrain(s * H), constrain(s * W)


class DepthCue(nn.Module):
    """MiDaS relative inverse depth (larger = nearer; unknown scale and shift per image;
    official: Depth-Anything-V2). Preprocessing as intel-isl/MiDaS hubconf.py transforms(),
    in torch bicubic on the batch (theirs: cv2 INTER_CUBIC, the same kernel, one image).

    name in MIDAS_PREPROCESS ("MiDaS_small" default, "DPT_Hybrid", "DPT_Large", "MiDaS").
    net: an injected module called on the preprocessed (B, 3, h, w) batch, returning
    (B, h, w) or (B, 1, h, w) like MiDaS.
    """

    def __init__(self, name="MiDaS_small", source="github", hub_dir=None, net=None):
        super().__init__()
        if name not in MIDAS_PREPROCESS:
            raise CueLoadError(f"cues.py: unknown depth network {name!r}; "
                               f"choose from {tuple(MIDAS_PREPROCESS)}")
        if net is None:
            # MiDaS's hubconf imports timm for every variant; MiDaS_small additionally fetches
            # rwightman/gen-efficientnet-pytorch through torch.hub (cached in TORCH_HOME too).
            net = _hub_load("depth", name, source, hub_dir, needs=[("timm", "timm")])
        self.net = net.eval()
        self.side, self.method, mean, std = MIDAS_PREPROCESS[name]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, img):
        """(B, 3, H, W) [0, 1] -> (B, 3, h, w) resized (bicubic) and normalised."""
        H, W = img.shape[-2:]
        x = F.interpolate(img, size=midas_input_size(H, W, self.side, self.method),
                          mode="bicubic", align_corners=False)      # (B, 3, h, w)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, img):
        """img (B, 3, H, W) in [0, 1] -> disparity (B, 1, H, W), raw MiDaS units.
        Always float32: any surrounding autocast is switched off for the network."""
        H, W = img.shape[-2:]
        with torch.autocast(img.device.type, enabled=False):
            out = self.net(self.preprocess(img.float()))
            out = out.float().view(img.shape[0], 1, *out.shape[-2:])  # (B, 1, h, w)
            return F.interpolate(out, size=(H, W), mode="bilinear", align_corners=False)


# --- plumbing: the cue cache ---

class CacheWriteError(RuntimeError):
    """The cue cache cannot be written (no permission, disk full, ...); names the file."""


def _write_problem(path, err):
    """A one-line reason for an OSError `err` raised while writing `path`."""
    why = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        return (f"cues.py: disk full while writing {path} ({why}); the partial file was "
                f"removed. Free some space and run again: finished files are kept and skipped")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cues.py: cannot write {path} ({why}): the Cues/ folder must be writable"
    return f"cues.py: cannot write {path} ({why})"


def _write_npz(f, arrays):
    """The writer of one cue file (an open binary file); a seam the tests replace."""
    np.savez(f, **arrays)


def _save_atomic(path, arrays):
    """Write `path` through `path`.tmp, fsync, os.replace: a file that exists is complete. On any
    failure (disk full, Ctrl-C) the .tmp file is removed; an OSError becomes a CacheWriteError."""
    tmp = path + ".tmp"  # a leftover from a killed run is simply overwritten
    try:
        with open(tmp, "wb") as f:
            _write_npz(f, arrays)
            f.flush()
            os.fsync(f.fileno())                   # on disk before the name points at it
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.remove(tmp)
        except OSError:
            pass                                   # never created, or already gone
        if isinstance(err, OSError):
            raise CacheWriteError(_write_problem(tmp, err)) from err
        raise


def check_cache_writable(cues_dir):
    """Fail fast, before any network runs: create `cues_dir` and write a probe file in it."""
    if os.path.exists(cues_dir) and not os.path.isdir(cues_dir):
        raise CacheWriteError(f"cues.py: {cues_dir} exists but is not a folder; move it away "
                              f"(the cue cache is written to ROOT/Cues/<video>/<frame>.npz)")
    probe = os.path.join(cues_dir, f".write-test-{os.getpid()}")
    try:
        os.makedirs(cues_dir, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as err:
        raise CacheWriteError(_write_problem(cues_dir, err)) from err


def open_videos(root):
    """data.py's VideoFolder of `root`, or a cues.py error saying what is wrong with it."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"cues.py: the dataset folder {root!r} "
                                f"{'is not a folder' if os.path.exists(root) else 'does not exist'}")
    try:
        return VideoFolder(root)
    except FileNotFoundError as err:   # empty or wrongly laid out: data.py names the layouts
        raise FileNotFoundError(f"cues.py: {err}") from err


def _write_video(folder, paths, outs, todo, flow_cue, depth_cue, size, batch, device, bar, stats):
    """Cue files outs[i] for the frame indices in `todo` of one video (counted in stats)."""
    T, frames, pairs = len(paths), {}, {}                             # pairs[j]: flows j <-> j+1

    def frame(i):
        if i not in frames:
            frames[i] = base_frame(folder.load(paths[i]), size)       # (3, S, S)
        return frames[i]

    for k in range(0, len(todo), batch):
        chunk = todo[k:k + batch]
        need = sorted({j for i in chunk for j in (i - 1, i) if 0 <= j < T - 1} - set(pairs))
        if need:
            a = torch.stack([frame(j) for j in need]).to(device)       # (P, 3, S, S)
            b = torch.stack([frame(j + 1) for j in need]).to(device)
            fwd, bwd = flow_cue(a, b)                                  # (P, 2, S, S) normalised
            fwd, bwd = normalised_to_pixels(fwd).cpu(), normalised_to_pixels(bwd).cpu()
            pairs.update({j: (fwd[n], bwd[n]) for n, j in enumerate(need)})
        disp = depth_cue(torch.stack([frame(i) for i in chunk]).to(device)).cpu()  # (C, 1, S, S)
        for n, i in enumerate(chunk):
            arrays = {"disparity": disp[n, 0].numpy().astype(np.float16)}
            if i + 1 < T:
                arrays["flow_next"] = pairs[i][0].permute(1, 2, 0).numpy().astype(np.float16)
            if i > 0:
                arrays["flow_prev"] = pairs[i - 1][1].permute(1, 2, 0).numpy().astype(np.float16)
            _save_atomic(outs[i], arrays)
            stats["written"] += 1
            bar.update(1)
        keep = chunk[-1]                                               # drop what is no longer needed
        pairs = {j: v for j, v in pairs.items() if j >= keep}
        frames = {j: v for j, v in frames.items() if j >= keep}


def shard_videos(videos, shard=None):
    """The videos of shard (i, n): every n-th of the sorted names from the i-th, so the n
    shards are disjoint and cover all videos (None: all). Several GPUs or machines each write
    one shard into the same ROOT/Cues; no file is written by two of them."""
    if shard is None:
        return list(videos)
    i, n = shard
    if not (isinstance(i, int) and isinstance(n, int) and 0 <= i < n):
        raise ValueError(f"cues.py: a shard is (i, n) with 0 <= i < n, got {shard!r}")
    return sorted(videos)[i::n]


def parse_shard(text, where="--shard"):
    """'i/n' -> (i, n) with 0 <= i < n, or a cues.py error naming `where`."""
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:                                   # not two integers
        i, n = -1, 0
    if not 0 <= i < n:
        raise ValueError(f"cues.py: {where} must be i/n with 0 <= i < n (shard i of n; e.g. "
                         f"0/4, 1/4, 2/4, 3/4), got {text!r}")
    return i, n


def write_cue_cache(root, flow_cue, depth_cue, size=224, batch=8, device="cpu", progress=True,
                    folder=None, shard=None):
    """Write ROOT/Cues/<video>/<frame-stem>.npz for every frame of every video in ROOT (of
    shard (i, n) only: `shard_videos`).

    Per file: `disparity` (size x size float16, raw depth-net output), `flow_next` /
    `flow_prev` (size x size x 2 float16, pixels, to the next / previous frame; absent at
    the ends). Frames first go to the base frame (`base_frame`). Existing .npz files are
    complete (written atomically) and skipped; a video with an unreadable frame is logged,
    counted and left for later. Returns dict(written, skipped, failed_videos).
    folder: `open_videos(root)` if already opened (the CLI opens it first, to fail fast).
    A folder that cannot be written (permissions, disk full) raises CacheWriteError.
    """
    folder = open_videos(root) if folder is None else folder
    check_cache_writable(os.path.join(root, "Cues"))
    jobs, stats = [], {"written": 0, "skipped": 0, "failed_videos": 0}
    for video in shard_videos(folder.videos, shard):
        paths = list(folder.frames(video))
        outs = [os.path.join(root, "Cues", video, os.path.splitext(os.path.basename(p))[0] + ".npz")
                for p in paths]
        todo = [i for i, o in enumerate(outs) if not os.path.isfile(o)]
        stats["skipped"] += len(paths) - len(todo)
        if todo:
            jobs.append((video, paths, outs, todo))
    bar = tqdm(total=sum(len(j[3]) for j in jobs), desc="cues" if shard is None else
               f"cues {shard[0]}/{shard[1]}", unit=" frames", disable=not progress)  # frames/s
    with bar:                      # closed on an error too, so the error message gets its own line
        for video, paths, outs, todo in jobs:
            try:
                os.makedirs(os.path.join(root, "Cues", video), exist_ok=True)
            except OSError as err:
                raise CacheWriteError(_write_problem(os.path.join(root, "Cues", video), err)) from err
            try:
                _write_video(folder, paths, outs, todo, flow_cue, depth_cue, size, batch, device,
                             bar, stats)
            except ValueError as err:  # data.py: "cannot read image <path>: ..."
                stats["failed_videos"] += 1
                tqdm.write(f"cues.py: skipping the rest of video {video} "
                           f"({stats['failed_videos']} so far): {err}")
    return stats


def main(argv=None):
    """The CLI. Returns the exit status (1 if some video had an unreadable frame)."""
    p = argparse.ArgumentParser(prog="cues.py", description="Precompute the LILA cue cache "
                                "ROOT/Cues/<video>/<frame>.npz (RAFT flow both ways, MiDaS "
                                "disparity) on the base frames.")
    p.add_argument("--data", required=True, help="dataset root (YouTube-VOS or DAVIS layout, see data.py)")
    p.add_argument("--flow", default="raft_large", choices=FLOW_NETS,
                   help="torchvision RAFT variant (default raft_large, as train.py's paper preset; "
                        "raft_small: faster, weaker)")
    p.add_argument("--depth", default="DPT_Large", choices=tuple(MIDAS_PREPROCESS),
                   help="MiDaS variant (default DPT_Large, the strongest MiDaS that torch.hub "
                        "serves with a current timm, as train.py's paper preset; MiDaS_small: "
                        "faster, weaker)")
    p.add_argument("--hub-dir", default=None,
                   help="offline: a directory holding local clones DIR/vision (pytorch/vision) and "
                        "DIR/MiDaS (isl-org/MiDaS); default: download through torch.hub (TORCH_HOME)")
    p.add_argument("--size", type=int, default=224,
                   help="base-frame side in pixels: short side resized, centre square crop (default "
                        "224; at least 128: torchvision's RAFT refuses feature maps under 16 cells at "
                        "its 1/8 resolution)")
    p.add_argument("--batch", type=int, default=8, help="frames per network call (default 8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default cuda if available; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--shard", default=None, metavar="i/n",
                   help="write only shard i of n (videos i, i+n, ...; 0 <= i < n), one per GPU or "
                        "machine, into the same ROOT/Cues (default: all; under torchrun RANK/WORLD_SIZE)")
    args = p.parse_args(argv)
    try:
        if args.shard is not None:
            shard = parse_shard(args.shard)
        elif "WORLD_SIZE" in os.environ:                               # torchrun
            shard = parse_shard(f"{os.environ.get('RANK', '')}/{os.environ['WORLD_SIZE']}",
                                "RANK/WORLD_SIZE (torchrun)")
        else:
            shard = None
    except ValueError as err:
        p.error(str(err)[len("cues.py: "):])
    if "LOCAL_RANK" in os.environ and args.device == "cuda":
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"              # one GPU per torchrun rank
    if args.size < 128:
        p.error(f"--size must be at least 128 pixels (torchvision's RAFT works at 1/8 resolution "
                f"and needs 16 cells there), got {args.size}")
    if args.batch < 1:
        p.error(f"--batch must be at least 1, got {args.batch}")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        p.error(f"--device {args.device!r} is not a torch device ({err})")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is available here (use --device cpu)")
    print("config:", vars(args))

    # Cheap checks first: a wrong folder fails before any network is downloaded or run.
    folder = open_videos(args.data)
    check_cache_writable(os.path.join(args.data, "Cues"))
    source = "local" if args.hub_dir else "github"
    hub = (lambda clone: os.path.join(args.hub_dir, clone)) if args.hub_dir else (lambda clone: None)
    flow = FlowCue(args.flow, source, hub("vision")).to(device)
    depth = DepthCue(args.depth, source, hub("MiDaS")).to(device)
    t0 = time.perf_counter()
    stats = write_cue_cache(args.data, flow, depth, size=args.size, batch=args.batch,
                            device=device, folder=folder, shard=shard)
    seconds = time.perf_counter() - t0
    print(f"cues{'' if shard is None else ' shard %d/%d' % shard}: wrote {stats['written']} files "
          f"in {seconds:.0f} s ({stats['written'] / max(seconds, 1e-9):.1f} frames/s), skipped "
          f"{stats['skipped']} complete ones, {stats['failed_videos']} videos with unreadable "
          f"frames, in {os.path.join(args.data, 'Cues')}")
    return 1 if stats["failed_videos"] else 0


def cli(argv=None):
    """main() with this repo's error convention: what the user can cause (a wrong folder, an
    unwritable or full disk, a network that cannot be loaded) raises an error whose message
    starts with "cues.py: "; it is printed as "cues.py: error: ..." with exit status 2.
    Anything else is a bug and keeps its traceback."""
    return runs.cli("cues.py", lambda: main(argv), code=2, oom="--batch or --size", status=True,
                    interrupted=lambda: "the cache files written so far are complete and kept "
                                        "(a rerun skips them)")


if __name__ == "__main__":
    sys.exit(cli())
