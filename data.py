"""Data for LILA: frame pairs, their two views, and the cues warped into each view.

Paper: Araslanov et al., "Featurising Pixels from Dynamic 3D Scenes with Linear In-Context
Learners", CVPR 2026, sec. 3 (training pairs); official code: lila/dataload.py (class YTVOS)
with lila/configs/train_ytvos.yaml.

The method, top to bottom: PairSampler (a pair's Δ, its shared flip and its two views),
crop_grid and cut_view (a view and the grid that places it in the base frame), warp (a cue map
into a view), hflip_cues (the shared flip), base_frames (the frame the cues are computed on),
PairDataset (one training pair). Below `# --- plumbing ---`: the video folder reader, the cue
cache reader and its checks, the synthetic videos' LRU, the preview picture and the CLI.

Shapes: S view side; Hb = Wb = base, the cue resolution (train.py --base: 224 in the paper
preset, the view side in the tiny one). The base frame is a frame's
centre square, kept sharp at frame_side (HI_RES = 480) to cut the views from and resized to
base for the cues. Grids (S, S, 2) in grid_sample convention (x, y in [-1, 1],
align_corners=False) map view pixels to base-frame positions, at every resolution of the base
frame. Flow (2, Hb, Wb) in normalised units (u 2/W, v 2/H).

Deviations from the official code (the full list: README, Differences): frame t in 0..T-2;
synthetic videos rendered at twice the view side; a pair that fails to load is replaced.

Commands:  python data.py --make-synthetic /tmp/s [--videos 4 --frames 12 --size 224]
           python data.py --preview /tmp/s [--out /tmp/preview.png]
Tests: python -m pytest -q tests/test_data.py
"""
import argparse
import json
import logging
import math
import os
import re
import sys
import tempfile
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import runs
# The synthetic scenes (scenes.py): what PairDataset renders on the fly and the CLI writes.
from scenes import (SyntheticScenes, corrupt_disparity, corrupt_flow, write_synthetic,  # noqa: F401
                    flow_to_rgb, _depth_rgb, _palette)

log = logging.getLogger("data")


# --------------------------------------------------------------------------- the method: a pair and its views
HI_RES = 480  # side of the sharp base frame (official dataload.py: Resize(480), CenterCrop(480))


class PairSampler:
    """The random draws of one training pair (official dataload.py YTVOS, configs/train_ytvos.yaml):
      delta ~ U{1..gap}, gap = 5 (T: 5): frame min(t + delta, T - 1) gives the context (a video
        of T frames; PairDataset), frame t the query;
      flip ~ Bernoulli(flip_p = 0.5): one horizontal flip of the whole pair (hflip_cues);
      box_q: a square crop of a fraction U[query_area] = U[0.3, 1] of the area (crop_range) at a
        random position, with its own flip flip_q ~ Bernoulli(flip_p): the features of the query
        must give the same labels at another scale and orientation;
      box_c: a square crop of ctx_area = 0.8 of the area (mask_ratio) at a random position, never
        flipped on its own. The ridge map is fitted on the context and applied to the query, so
        the context must show most of what the query can show (an object the map never saw gets
        no label), yet not all of the frame, so that its framing still differs from the query's.
    Boxes are integer pixel boxes (top, left, side) of the frame_side^2 base frame, drawn as
    torchvision's RandomResizedCrop.get_params (ratio 1) draws them. crop=False (ablation): both
    views are the whole base frame (flips kept).
    sample(generator) -> dict(box_q, box_c, grid_q, grid_c (S, S, 2), flip, flip_q, delta)."""

    def __init__(self, size=224, frame_side=HI_RES, gap=5, crop=True, query_area=(0.3, 1.0), ctx_area=0.8,
                 flip_p=0.5):
        self.size, self.frame_side, self.gap, self.crop = size, frame_side, gap, crop
        self.query_area, self.ctx_area, self.flip_p = query_area, ctx_area, flip_p

    def _box(self, area, g):
        n = self.frame_side
        side = min(n, max(1, round(np.sqrt(area) * n))) if self.crop else n
        top, left = (int(torch.randint(0, n - side + 1, (1,), generator=g)) for _ in range(2))
        return top, left, side

    def sample(self, g):
        shared, own = (torch.rand(2, generator=g) < self.flip_p).tolist()
        delta = int(torch.randint(1, self.gap + 1, (1,), generator=g))
        smallest, largest = self.query_area
        box_q = self._box(smallest + (largest - smallest) * float(torch.rand(1, generator=g)), g)
        box_c = self._box(self.ctx_area, g)
        return dict(box_q=box_q, box_c=box_c, grid_q=crop_grid(box_q, self.frame_side, self.size, own),
                    grid_c=crop_grid(box_c, self.frame_side, self.size), flip=shared, flip_q=own, delta=delta)


def crop_grid(box, frame_side, size, flip=False):
    """The grid (size, size, 2) (x, y in [-1, 1], align_corners=False) that maps each pixel of a
    view to its position in the base frame: the view shows the box (top, left, side) of a
    frame_side^2 frame, mirrored if `flip`. In the base frame's normalised units, so the one grid
    reads every map of that frame (the sharp frame, the cue maps) whatever its resolution."""
    top, left, side = box
    u = (torch.arange(size, dtype=torch.float64) + 0.5) / size        # view pixel centres in (0, 1)
    xs = 2 * (left + side * (u.flip(0) if flip else u)) / frame_side - 1   # a flipped view runs right to left
    ys = 2 * (top + side * u) / frame_side - 1
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], -1).float()  # (size, size, 2) x, y


def cut_view(frame, box, size, flip=False):
    """frame (C, frame_side, frame_side) -> the view (C, size, size): the box cut out, resized with
    antialiasing (official: torchvision resized_crop(..., antialias=True)), mirrored if `flip`.
    Cut from the sharp base frame, so even a 30 % crop keeps its detail."""
    top, left, side = box
    x = frame[None, :, top:top + side, left:left + side]                # (1, C, side, side)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                      antialias=side > size)[0]                         # (C, size, size)
    return x.flip(-1) if flip else x


def warp(x, grid):
    """x (B, C, Hb, Wb), a map on the base frame -> (B, C, S, S) laid out in the view (bilinear,
    align_corners=False, border). Values are copied, never changed: a view's OWN flip or zoom
    never changes flow values (as in the official code); the pair's SHARED flip, applied to the
    frames and cues before (hflip_cues), does mirror the motion. Why: the flow cue is a per-object label
    that one linear map reads from the features, and the features cannot tell a mirrored or
    zoomed view from a plain one; negated or rescaled per view, the same object would need two
    labels and no single map could fit both. The flip and zoom only re-lay the map out."""
    grid = grid if grid.dim() == 4 else grid[None].expand(len(x), -1, -1, -1)  # (B, S, S, 2)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def hflip_cues(cues):
    """The shared flip mirrors the video itself, before any view is cut: every cue map mirrored
    and flow-x negated, because in the mirrored video things move the other way (as if the cue
    networks had seen the mirrored frames). Unlike a view's own flip, this changes the world
    both views show, so the labels change with it. cues: dict of (..., C, H, W), keys flow_* and others."""
    out = {}
    for k, v in cues.items():
        v = v.flip(-1)
        if k.startswith("flow"):
            v = torch.cat([-v[..., :1, :, :], v[..., 1:, :, :]], -3)
        out[k] = v
    return out


def base_frames(img, base, frame_side=HI_RES):
    """(H, W, 3) uint8 -> (sharp (3, frame_side, frame_side), cue-resolution (3, base, base)) float
    in [0, 1]: the frame's centre square at 480^2 (official dataload.py) and that square resized
    to base (PIL bicubic). The views are cut from the first. The cues are computed on the second,
    once per frame and never on a view: a crop would hide what the flow and depth networks need
    around it, the cache cues.py writes could not anticipate random crops, and warp then lays one
    map of each frame out in both views with the very grids that cut them."""
    sq = _square(img, frame_side)
    return _to_tensor(sq), _to_tensor(sq if base == frame_side else sq.resize((base, base), Image.BICUBIC))


def base_frame(img, base, frame_side=HI_RES):
    """The cue-resolution base frame (3, base, base) of `base_frames` (what cues.py caches)."""
    return base_frames(img, base, frame_side)[1]


class PairDataset(torch.utils.data.Dataset):
    """Training pairs (official dataload.py YTVOS). Item i: video i % len(self) (every video
    equally often, however long), frame t uniform in 0..T-2, t2 = min(t + delta, T - 1), all
    draws seeded by (seed, i). i may exceed len(self): train.py numbers samples across epochs,
    so each epoch draws fresh frames, crops and flips. An item holds float tensors:
      views (2, 3, S, S)     the query view (of frame t), the context view (of frame t2)
      frames (2, 3, Hb, Wb)  both base frames at the cue resolution
      grid_q, grid_c (S, S, 2), flip, flip_q, delta   (PairSampler; the shared flip is already
                             applied to frames, views and cues)
      flow_fwd, flow_bwd (2, Hb, Wb) normalised, disparity (2, 1, Hb, Wb)   (if with_cues)
      skipped ()             pairs that failed to load before this one (0 normally)
    source: a VideoFolder (cues from ROOT/Cues if with_cues, else none: the trainer computes
    them) or SyntheticVideos (see .synthetic: exact cues; the render is the sharp frame)."""

    def __init__(self, source, size=224, base=224, gap=5, crop=True, seed=0, cue_noise=0.0, with_cues=True, retries=10):
        self.source, self.size, self.base, self.seed = source, size, base, seed
        self.cue_noise, self.retries, self.with_cues = cue_noise, retries, with_cues
        self.is_synthetic = isinstance(source, SyntheticVideos)
        frame_side = source.size if self.is_synthetic else HI_RES
        if self.is_synthetic and source.size < base:
            raise ValueError(f"data.py: synthetic videos are rendered at {source.size}, below the cue resolution {base}")
        self.sampler = PairSampler(size=size, frame_side=frame_side, gap=gap, crop=crop)
        self.lengths = [source.T] * len(source) if self.is_synthetic else [len(source.frames(v)) for v in source.videos]
        if not self.is_synthetic and with_cues and source.cues_dir is not None:
            source.check_cues()
        self.skipped = 0

    def _item(self, key):
        v = key % len(self.lengths)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + key)
        s = self.sampler.sample(g)
        T = self.lengths[v]
        t = int(torch.randint(0, T - 1, (1,), generator=g))      # deviation: t <= T-2, so t2 > t
        t2 = min(t + s["delta"], T - 1)
        read = _read_synthetic if self.is_synthetic else _read_video
        sharp, cues = read(self, v, t, t2, key)                  # (2, 3, frame_side, frame_side), dict
        if s["flip"]:                                            # the shared flip: a mirrored video
            sharp, cues = sharp.flip(-1), hflip_cues(cues)
        views = torch.stack([cut_view(sharp[0], s["box_q"], self.size, s["flip_q"]),
                             cut_view(sharp[1], s["box_c"], self.size)])   # (2, 3, S, S)
        return dict(views=views, grid_q=s["grid_q"], grid_c=s["grid_c"], flip=torch.tensor(s["flip"]),
                    flip_q=torch.tensor(s["flip_q"]), delta=torch.tensor(t2 - t), **cues)

    def __getitem__(self, i):
        """Deviation: a pair that fails to load is logged, counted in .skipped and replaced by
        another one (at most `retries` times in a row)."""
        last = None
        for k in range(self.retries + 1):
            key = i + 7919 * k              # deterministic replacement pair
            try:
                return {**self._item(key), "skipped": torch.tensor(k)}   # k pairs failed first
            except (ValueError, FileNotFoundError) as e:
                self.skipped += 1
                last = e
                log.warning("skipping pair %d (%d skipped so far): %s", key, self.skipped, e)
        raise RuntimeError(f"data.py: {self.retries + 1} pairs in a row failed to load from "
                           f"{getattr(self.source, 'root', 'the synthetic videos')}; the last: {last}")

    def __len__(self):
        return len(self.lengths)

    @classmethod
    def synthetic(cls, videos=8, frames=12, scene_seed=0, base=224, size=224, render=None, cache=None,
                  cache_bytes=1e9, **kw):
        """Pairs from `videos` synthetic videos rendered on the fly (video i: scene_seed + i, as
        in write_synthetic) at `render` px, default 2 * size (deviation from 480: the smallest
        query crop still has more render pixels than view pixels, at a quarter of the cost).
        cache: videos kept rendered per DataLoader worker (default: all that fit in cache_bytes,
        ~24 bytes a pixel). The pair seed `seed` (in kw) defaults to scene_seed."""
        kw.setdefault("seed", scene_seed)
        render = render or 2 * size
        if cache is None:
            cache = int(min(videos, max(2, cache_bytes // (24 * frames * render ** 2))))
        return cls(SyntheticVideos(videos, frames, render, scene_seed, cache), base=base, size=size, **kw)


# --- plumbing ---
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
LAYOUTS = ("JPEGImages/480p/<video>/ (DAVIS)", "JPEGImages/<video>/ (YouTube-VOS)",
           "train_all_frames/JPEGImages/<video>/", "train/JPEGImages/<video>/")
_said = set()  # image folders already announced by this process (one line each)


def natural_key(path):
    """Sort key of a frame path: digit runs compare as numbers, so 2.jpg < 10.jpg."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", Path(path).name)]


def _name_step(videos):
    """The most common step between consecutive numeric frame names (1 if none are numbers)."""
    steps = Counter()
    for frames in videos:
        nums = [int(p.stem) for p in frames if p.stem.isdigit()]
        steps.update(b - a for a, b in zip(nums, nums[1:]) if b > a)
    return steps.most_common(1)[0][0] if steps else 1


class VideoFolder:
    """Frame folders of real video; the first existing layout of LAYOUTS is used and said once.
    `.videos` sorted names, `.frames(v)` paths in natural order, `.load(path)` (H, W, 3) uint8 RGB,
    `.cues_dir` (ROOT/Cues or None), `.skipped` counted skips, `.frame_step` the step of the frame
    names (1; 5 in YouTube-VOS train/JPEGImages, where a pair's Δ counts listed frames, each 5
    source frames: warned). Empty, one-frame and duplicate-name videos are skipped (counted,
    logged); verify=True also opens every frame header."""

    def __init__(self, root, verify=False):
        self.root = Path(root)
        if not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "does not exist"
            raise FileNotFoundError(f"data.py: video root {self.root} {what} (expected one of: ROOT/" + ", ROOT/".join(LAYOUTS) + ")")
        cands = [self.root / "JPEGImages/480p", self.root / "JPEGImages",
                 self.root / "train_all_frames/JPEGImages", self.root / "train/JPEGImages"]
        self.image_dir = next((c for c in cands if c.is_dir()), None)
        if self.image_dir is None:
            inside = any(p.suffix.lower() in IMAGE_EXTS for d in self.root.iterdir() if d.is_dir() for p in d.iterdir())
            raise FileNotFoundError(f"data.py: no video folders under {self.root}: looked for ROOT/" + ", ROOT/".join(LAYOUTS)
                                    + (f" ({self.root} holds the video folders themselves: give the dataset root)" if inside else ""))
        self.skipped = {"empty": 0, "one_frame": 0, "unreadable_or_mixed_sizes": 0, "duplicate_frame_names": 0}
        self._frames = {}
        for d in sorted(p for p in self.image_dir.iterdir() if p.is_dir()):
            fr = sorted((p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")
                         and p.is_file()), key=natural_key)     # not ._00000.jpg (macOS), not a folder x.jpg/
            why = "empty" if not fr else "one_frame" if len(fr) == 1 else None
            stems = [p.stem for p in fr]
            if why is None and len(set(stems)) < len(stems):  # 00000.jpg + 00000.png: one cue file
                dup = sorted(p.name for p in fr if stems.count(p.stem) > 1)[:4]
                log.warning("video %s: frames share a name (%s): their cue files would collide", d, ", ".join(dup))
                why = "duplicate_frame_names"
            if why is None and verify:
                why = self._verify(fr)
            if why:
                self.skipped[why] += 1
                log.warning("skipping video %s (%s)", d, why)
            else:
                self._frames[d.name] = fr
        self.videos = sorted(self._frames)
        if not self.videos:
            raise FileNotFoundError(f"data.py: no videos with >= 2 frames in {self.image_dir} (skipped: {self.skipped}); "
                                    "layouts: ROOT/" + ", ROOT/".join(LAYOUTS))
        if any(self.skipped.values()):
            log.warning("VideoFolder %s: %d videos, skipped %s", self.root, len(self.videos), self.skipped)
        self.cues_dir = self.root / "Cues" if (self.root / "Cues").is_dir() else None
        self.frame_step = _name_step(self._frames.values())
        if self.image_dir not in _said:
            _said.add(self.image_dir)
            print(f"data.py: {len(self.videos)} videos from {self.image_dir}"
                  + (f", cues from {self.cues_dir}" if self.cues_dir else ""), flush=True)
            k = self.frame_step
            if k > 1:
                log.warning("data.py: warning: the frame names in %s step by %d (e.g. %s): a pair's delta counts "
                            "listed frames, so delta 1..5 spans %d..%d source frames, %dx the motion of the official "
                            "training on train_all_frames/JPEGImages (every frame, 30 fps)", self.image_dir, k,
                            ", ".join(p.name for p in self._frames[self.videos[0]][:3]), k, 5 * k, k)

    @staticmethod
    def _verify(frames):
        """Open every header: 'unreadable_or_mixed_sizes' if one fails or sizes differ."""
        try:
            sizes = {Image.open(p).size for p in frames}
        except Exception as e:
            log.warning("unreadable frame header: %s", e)
            return "unreadable_or_mixed_sizes"
        return None if len(sizes) == 1 else "unreadable_or_mixed_sizes"

    def frames(self, video):
        return self._frames[video]

    def check_cues(self):
        """Error unless ROOT/Cues/<video> holds one .npz per frame of every video (a half-written
        cache is completed by rerunning `python cues.py --data ROOT`, which skips finished files)."""
        missing = {}
        for v in self.videos:
            d = self.root / "Cues" / v
            have = {n[:-4] for n in os.listdir(d) if n.endswith(".npz")} if d.is_dir() else set()
            lack = [p.stem for p in self._frames[v] if p.stem not in have]
            if lack:
                missing[v] = lack
        if missing:
            v, lack = next(iter(missing.items()))
            raise FileNotFoundError(
                f"data.py: the cue cache {self.root / 'Cues'} is incomplete: {len(missing)} of {len(self.videos)} "
                f"videos lack cue files (e.g. {self.root / 'Cues' / v}/{lack[0]}.npz); complete it with "
                f"`python cues.py --data {self.root}`, or train with --cues hub")

    @staticmethod
    def load(path):
        """(H, W, 3) uint8 RGB from any PIL mode (L, LA, RGBA, CMYK, P, I;16 ...)."""
        try:
            with Image.open(path) as im:
                im.load()  # decodes fully: truncated files fail here
                if im.mode in ("I", "I;16", "F"):  # 16-bit / float grey: scale to 8 bit
                    a = np.asarray(im, np.float32)
                    im = Image.fromarray((255 * a / max(a.max(), 1)).astype(np.uint8))
                return np.asarray(im.convert("RGB"))
        except Exception as e:
            raise ValueError(f"data.py: cannot read image {path}: {type(e).__name__}: {e}") from None


def read_npz(path, what="cue file"):
    """{name: array} of an .npz file, or one error naming the file and what it is instead."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"data.py: missing {what} {path}")
    with open(path, "rb") as fh:
        head = fh.read(8)
    bad = ("empty (0 bytes)" if not head else "a single .npy array, not an .npz archive" if head.startswith(b"\x93NUMPY")
           else None if head.startswith(b"PK") else f"not an .npz archive (it starts with {head!r})")
    try:
        if bad is None:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
    except ValueError as e:
        bad = "it holds pickled (object) arrays, which are never loaded" if "pickle" in str(e) else f"{e}"
    except Exception as e:  # BadZipFile, EOFError, zlib.error, OSError
        bad = f"a truncated or damaged .npz archive ({type(e).__name__}: {e})"
    raise ValueError(f"data.py: cannot read {what} {path}: {bad}")


def cue_array(path, arrays, key, shape=None):
    """arrays[key] as float32, checked: the documented shape, numbers, finite, plausible values."""
    if key not in arrays:
        raise ValueError(f"data.py: cue file {path} has no '{key}' (has {sorted(arrays)}; "
                         "cues.py writes disparity, flow_next, flow_prev)")
    a = arrays[key]
    want = "(h, w)" if key == "disparity" else "(h, w, 2)"
    if a.ndim != (2 if key == "disparity" else 3) or (key != "disparity" and a.shape[-1] != 2) \
            or (shape is not None and a.shape != shape) or a.size == 0:
        raise ValueError(f"data.py: cue file {path}: '{key}' has shape {a.shape}, expected {want}"
                         + (f" = {shape}" if shape is not None else ""))
    if a.dtype.kind not in "fiu":
        raise ValueError(f"data.py: cue file {path}: '{key}' holds {a.dtype} values, expected numbers")
    a = np.asarray(a, np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"data.py: cue file {path}: '{key}' holds {int((~np.isfinite(a)).sum())} NaN/inf values")
    if key == "disparity" and not (a > 0).mean() >= 0.25:  # sky may be <= 0, not most of a frame
        raise ValueError(f"data.py: cue file {path}: 'disparity' is positive on only {100 * (a > 0).mean():.0f} % of "
                         "the pixels (expected relative inverse depth: larger = nearer, > 0)")
    if key != "disparity" and np.abs(a).max() > 2 * max(a.shape[:2]):
        raise ValueError(f"data.py: cue file {path}: '{key}' reaches {np.abs(a).max():.3g} px, more than twice "
                         f"the map size {a.shape[:2]} (flow is stored in pixels of the map)")
    return a


def load_cues(root, video, i, j, names=None):
    """Cues of frames i and j from ROOT/Cues/<video>/<name>.npz. `names` are the frame stems
    (default: the npz files in natural order). Flow i->j chains flow_next (flow_prev if j < i):
    f_{i->k+1}(x) = f_{i->k}(x) + f_{k->k+1}(x + f_{i->k}(x)) (bilinear). Returns float32
    torch dict(flow_fwd (2, h, w), flow_bwd (2, h, w) normalised, disparity_i/j (1, h, w))."""
    d = Path(root) / "Cues" / video
    names = names or [p.stem for p in sorted(d.glob("*.npz"), key=natural_key)]
    files = {}

    def get(k, key, shape=None):
        path = d / f"{names[k]}.npz"
        if k not in files:
            files[k] = read_npz(path)
        return torch.from_numpy(cue_array(path, files[k], key, shape))

    if not 0 <= min(i, j) <= max(i, j) < len(names):
        raise ValueError(f"data.py: frames {i}, {j} out of range for {len(names)} cue files in {d}")
    disp_i = get(i, "disparity")  # (h, w), fixes the map size
    ref_shape = tuple(disp_i.shape)
    h, w = ref_shape
    scale = torch.tensor([2 / w, 2 / h]).view(2, 1, 1)

    def chain(a, b):
        flow = torch.zeros(2, h, w)  # pixels
        step = 1 if b > a else -1
        for k in range(a, b, step):
            f = get(k, "flow_next" if step > 0 else "flow_prev", ref_shape + (2,)).permute(2, 0, 1)  # (2, h, w)
            flow = flow + _sample(f, flow * scale) if k != a else f
        return flow * scale

    return dict(flow_fwd=chain(i, j), flow_bwd=chain(j, i),
                disparity_i=disp_i[None], disparity_j=get(j, "disparity", ref_shape)[None])


def _sample(x, flow):
    """x (C, h, w) read at pixel + flow (2, h, w, normalised units), bilinear, border."""
    _, h, w = x.shape
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) * 2 / h - 1, (torch.arange(w) + 0.5) * 2 / w - 1, indexing="ij")
    grid = torch.stack([xs + flow[0], ys + flow[1]], -1)[None]  # (1, h, w, 2)
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def _read_video(ds, v, t, t2, key):
    """The sharp base frames (2, 3, frame_side, frame_side) of frames t, t2 of a VideoFolder
    video, and dict(frames (2, 3, base, base) and, if with_cues and ROOT/Cues, the cue maps)."""
    name, src = ds.source.videos[v], ds.source
    paths = [src.frames(name)[t], src.frames(name)[t2]]
    imgs = [src.load(p) for p in paths]
    if imgs[0].shape != imgs[1].shape:
        raise ValueError(f"data.py: mixed frame sizes in video {name}: {paths[0]} {imgs[0].shape[:2]} vs {paths[1]} {imgs[1].shape[:2]}")
    pairs = [base_frames(im, ds.base, ds.sampler.frame_side) for im in imgs]
    out = dict(frames=torch.stack([p[1] for p in pairs]))          # (2, 3, Hb, Wb)
    if src.cues_dir is not None and ds.with_cues:
        c = load_cues(src.root, name, t, t2, names=[p.stem for p in src.frames(name)])
        hw, (h, w) = imgs[0].shape[:2], c["disparity_i"].shape[1:]
        if h != w and abs(h / w - hw[0] / hw[1]) >= 1e-2:         # a map of what, then?
            raise ValueError(f"data.py: cue file {src.root / 'Cues' / name / paths[0].stem}.npz: maps of {h}x{w} are "
                             f"neither square (on the base frame) nor of the frame's aspect {hw[0]}x{hw[1]}")
        out["flow_fwd"] = _cue_to_base(c["flow_fwd"], hw, ds.base, True)
        out["flow_bwd"] = _cue_to_base(c["flow_bwd"], hw, ds.base, True)
        out["disparity"] = torch.stack([_cue_to_base(c["disparity_i"], hw, ds.base),
                                        _cue_to_base(c["disparity_j"], hw, ds.base)])
    return torch.stack([p[0] for p in pairs]), out


def _read_synthetic(ds, v, t, t2, key):
    """The renders of frames t, t2 (the sharp frames) and dict(frames, and if with_cues the exact
    flow both ways and disparity, block means at the cue resolution, corrupted there by cue_noise
    seeded by (seed, key) like write_synthetic)."""
    sc = ds.source[v]
    sharp = torch.from_numpy(sc.frames[[t, t2]]).permute(0, 3, 1, 2).float() / 255  # (2, 3, R, R)
    out = dict(frames=torch.stack([_downsample(x, ds.base) for x in sharp]))
    if not ds.with_cues:
        return sharp, out
    rng = np.random.default_rng([ds.seed, key])
    b, R = ds.base, sc.S
    flows = []
    for a, c in ((t, t2), (t2, t)):
        f = _downsample(torch.from_numpy(sc.flow(a, c)).permute(2, 0, 1), b) * (b / R)  # (2, b, b) px
        f = corrupt_flow(f.permute(1, 2, 0).numpy(), ds.cue_noise, rng)
        flows.append(torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1) * (2 / b))  # normalised
    disp = [torch.from_numpy(corrupt_disparity(_downsample(torch.from_numpy(1 / sc.depth[a])[None], b)[0].numpy(),
                                               ds.cue_noise, rng))[None] for a in (t, t2)]
    return sharp, dict(out, flow_fwd=flows[0], flow_bwd=flows[1], disparity=torch.stack(disp))  # (2,b,b) x2, (2,1,b,b)


def _cue_to_base(x, frame_hw, base, is_flow=False):
    """Cue map (C, h, w) -> (C, base, base): the frame's centre crop if the map has the frame's
    aspect (normalised flow rescaled to the crop); a square map is taken as base-aligned."""
    _, h, w = x.shape
    H, W = frame_hw
    if abs(h / w - H / W) < 1e-2 and h != w:
        c = min(h, w)
        x = x[:, (h - c) // 2:(h - c) // 2 + c, (w - c) // 2:(w - c) // 2 + c]
        if is_flow:
            x = x * torch.tensor([w / c, h / c]).view(2, 1, 1)
    return F.interpolate(x[None], size=(base, base), mode="bilinear", align_corners=False)[0]


def _downsample(x, size):
    """(C, R, R) -> (C, size, size): the mean over each k x k block when R = k size (the exact
    cue of a low-resolution pixel is the mean over the render pixels it covers), else an
    antialiased bilinear resize."""
    R = x.shape[-1]
    if R % size == 0:
        return F.avg_pool2d(x[None], R // size)[0] if R > size else x
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def _square(img, side):
    """(H, W, 3) uint8 -> PIL image side x side: the centre square of the frame, resized (PIL
    bicubic, antialiased). Cut first, so a huge or extreme-aspect frame costs nothing."""
    im = Image.fromarray(np.asarray(img, dtype=np.uint8))
    w, h = im.size
    c = min(w, h)
    l, t = (w - c) // 2, (h - c) // 2
    im = im.crop((l, t, l + c, t + c))
    return im if c == side else im.resize((side, side), Image.BICUBIC)


def _to_tensor(im):
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255  # (3, H, W)


class SyntheticVideos:
    """`n` SyntheticScenes (video i: seed + i) rendered at `size` on demand, an LRU of `cache`
    videos (each DataLoader worker holds its own; ~15 MB per 12-frame 224^2 video, ~0.4 s of
    CPU to render one. With shuffling, cache >= n avoids re-rendering)."""

    def __init__(self, n=8, frames=12, size=224, seed=0, cache=8):
        self.n, self.T, self.size, self.seed, self.cache = n, frames, size, seed, cache
        self._lru = OrderedDict()

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i not in self._lru:
            self._lru[i] = SyntheticScenes(self.seed + i, frames=self.T, size=self.size)
            while len(self._lru) > self.cache:
                self._lru.popitem(last=False)
        self._lru.move_to_end(i)
        return self._lru[i]


def _label_rgb(path, pal):
    """A label PNG (indexed or grey ids, or colours) -> (h, w, 3) uint8, or an error naming it."""
    try:
        with Image.open(path) as im:
            ids = np.asarray(im) if im.mode in ("P", "L", "I", "I;16") else np.asarray(im.convert("RGB"))
    except Exception as e:
        raise ValueError(f"data.py: cannot read label map {path}: {type(e).__name__}: {e}") from None
    return ids if ids.ndim == 3 else pal[ids.astype(np.int64) % 256]


def preview(root, out=None, rows=4, video=None, tile_height=160):
    """One PNG grid of a DAVIS-layout root (a written synthetic set, or real frames with Cues/):
    rows = frames spread over time (cycling over the videos), columns = RGB, depth, flow to the
    next frame, instances, classes, normals, every tile tile_height px high. A column with no
    file at all is left out and said; out defaults to the temporary folder, never the dataset.
    Returns (the picture's path, notes for the user)."""
    root, vf = Path(root), VideoFolder(root)
    out = Path(out) if out else Path(tempfile.gettempdir()) / f"preview-{root.resolve().name or 'data'}.png"
    if video is not None and video not in vf.videos:
        raise ValueError(f"data.py: no video {video!r} in {vf.image_dir}")
    vids = [video] if video else vf.videos
    ts = np.linspace(0, min(len(vf.frames(v)) for v in vids) - 2, rows).round().astype(int)
    pal = np.array(_palette(), np.uint8).reshape(256, 3)
    names = ["RGB", "depth", "flow t->t+1", "instances", "classes", "normals"]
    tiles = []                                                  # rows of (h, w, 3) uint8 or None
    for r, t in enumerate(ts):
        video = vids[r % len(vids)]
        path = vf.frames(video)[t]
        row = [vf.load(path)]
        cue = root / "Cues" / video / f"{path.stem}.npz"
        c = read_npz(cue) if cue.is_file() else None
        row.append(_depth_rgb(1 / np.maximum(cue_array(cue, c, "disparity"), 1e-6)) if c else None)
        row.append(flow_to_rgb(cue_array(cue, c, "flow_next")) if c and "flow_next" in c else None)
        for sub in ("Annotations/480p", "Classes"):
            p = root / sub / video / f"{path.stem}.png"
            row.append(_label_rgb(p, pal) if p.is_file() else None)
        p = root / "Normals" / video / f"{path.stem}.npz"
        n = read_npz(p, "normals file").get("normals") if p.is_file() else None
        if n is not None and (n.ndim != 3 or n.shape[-1] != 3 or n.dtype.kind != "f"):
            raise ValueError(f"data.py: normals file {p}: 'normals' is {n.dtype} {n.shape}, expected float (h, w, 3)")
        row.append(((np.clip(n.astype(np.float32), -1, 1) * [1, -1, -1] + 1) * 127.5).astype(np.uint8)
                   if n is not None else None)
        tiles.append(row)
    keep = [c for c in range(len(names)) if any(row[c] is not None for row in tiles)]
    notes = []
    if 1 not in keep:
        notes.append(f"no cue files in {root / 'Cues'} for these frames: no depth or flow shown; "
                     f"make them with `python cues.py --data {root}`")
    elif any(row[1] is None for row in tiles):
        notes.append(f"{sum(row[1] is None for row in tiles)} of {rows} frames have no cue file (grey tiles); "
                     f"complete the cache with `python cues.py --data {root}`")
    if set(range(3, 6)) - set(keep):
        notes.append("no " + ", ".join(names[c] for c in range(3, 6) if c not in keep) + " files: columns left out")
    h0, w0 = tiles[0][0].shape[:2]
    th, tw = tile_height, min(2 * tile_height, round(tile_height * w0 / h0))
    gap, title = 4, 18
    canvas = np.full((title + rows * (th + gap), len(keep) * (tw + gap), 3), 255, np.uint8)
    for r, row in enumerate(tiles):
        for k, c in enumerate(keep):
            a = row[c] if row[c] is not None else np.full((th, tw, 3), 128, np.uint8)
            a = np.asarray(Image.fromarray(a).resize((tw, th), Image.NEAREST if c in (3, 4) else Image.BILINEAR))
            canvas[title + r * (th + gap):title + r * (th + gap) + th, k * (tw + gap):k * (tw + gap) + tw] = a
    im = Image.fromarray(canvas)
    draw = ImageDraw.Draw(im)
    for k, c in enumerate(keep):
        draw.text((k * (tw + gap) + 4, 3), names[c], fill=(0, 0, 0))
    runs.save_picture(im, out, "--out")
    return out, notes


def _make_synthetic(ap, a):
    """Write a synthetic set into a new or empty folder; a folder that already holds the same
    set (its synthetic.json, written last, equal) is left as it is: the quick start reruns."""
    d, want = Path(a.make_synthetic), dict(videos=a.videos, frames=a.frames, size=a.size, seed=a.seed,
                                           cue_noise=a.cue_noise)
    if d.exists() and not d.is_dir():
        ap.error(f"--make-synthetic {d} is a file; give a folder")
    if d.is_dir() and any(d.iterdir()):
        try:
            have = json.loads((d / "synthetic.json").read_text())
        except (OSError, ValueError):
            have = None
        frames = len(list(d.glob("JPEGImages/480p/*/*.jpg"))) + len(list(d.glob("Cues/*/*.npz")))
        if have == want and frames == 2 * a.videos * a.frames:
            print(f"data.py: {d} already holds this synthetic set ({d / 'synthetic.json'}); nothing written")
            return
        if isinstance(have, dict) and have != want:
            why = "holds another synthetic set (" + "; ".join(f"--{k.replace('_', '-')} {have.get(k)}, not {want[k]}" for k in want
                                                         if have.get(k) != want[k]) + ")"
        else:
            why = "is not empty and holds no finished synthetic set (no synthetic.json, or files missing)"
        ap.error(f"--make-synthetic {d} {why}; give a new or empty folder")
    print(json.dumps(want))
    names = write_synthetic(d, a.videos, a.frames, a.size, a.seed, a.cue_noise)
    print(f"wrote {len(names)} videos to {d}")


def main(argv=None):
    ap = argparse.ArgumentParser(description="LILA data: write / preview synthetic dynamic 3D scenes")
    act = ap.add_mutually_exclusive_group(required=True)
    act.add_argument("--make-synthetic", metavar="DIR", help="write the DAVIS layout + Cues/ Normals/ Classes/ to DIR "
                     "(a new or empty folder, or one that holds the same set already)")
    act.add_argument("--preview", metavar="DIR", help="draw frames, depth, flow, masks, classes, normals of DIR")
    ap.add_argument("--out", help="--preview: the picture to write (default: preview-<DIR name>.png in the "
                    "temporary folder, never inside the dataset)")
    g = ap.add_argument_group("synthetic scenes")
    g.add_argument("--videos", type=int, default=4, help="number of videos (default 4)")
    g.add_argument("--frames", type=int, default=12, help="frames per video (default 12)")
    g.add_argument("--size", type=int, default=224, help="square frame side in pixels (default 224 = the paper's base)")
    g.add_argument("--seed", type=int, default=0, help="video i uses seed + i (default 0)")
    g.add_argument("--cue-noise", type=float, default=0.0, help="cue corruption level, 0 = exact cues (default 0; 1 = strong)")
    a = ap.parse_args(argv)
    if min(a.videos, a.frames - 1, a.size - 15) < 1 or not 0 <= a.cue_noise < math.inf or a.seed < 0:
        ap.error("need --videos >= 1, --frames >= 2, --size >= 16, a finite --cue-noise >= 0, --seed >= 0")
    if 24 * a.frames * a.size ** 2 > 4e9:   # one video's renders (~24 bytes a pixel) stay in memory
        ap.error(f"--frames {a.frames} at --size {a.size} would need {24 * a.frames * a.size ** 2 / 1e9:.0f} GB "
                 "of memory per video (at most 4 GB)")
    if a.make_synthetic:
        return _make_synthetic(ap, a)
    if a.out and (os.path.isdir(a.out) or not os.path.isdir(os.path.dirname(os.path.abspath(a.out)))):
        ap.error(f"--out {a.out}: give a .png file in an existing folder")
    out, notes = preview(a.preview, a.out)
    for n in notes:
        print(f"data.py: warning: {n}", file=sys.stderr)
    print(f"wrote {out} ({Image.open(out).size[0]} x {Image.open(out).size[1]} px)")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(runs.cli("data.py", main, oom="--size or --frames"))
