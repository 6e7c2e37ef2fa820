"""Data for LILA: video folders, the cue cache reader, frame pairs and their two views.

Paper: Araslanov et al., "Featurising Pixels from Dynamic 3D Scenes with Linear In-Context
Learners", CVPR 2026, section 3 (training pairs); official code: lila/dataload.py (YTVOS).

Parts, top to bottom:
  VideoFolder       YouTube-VOS / DAVIS frame folders (frames in natural order: 2.jpg < 10.jpg);
  load_cues         the cue cache ROOT/Cues/<video>/<frame>.npz (written by cues.py, or by
                    scenes.write_synthetic with exact cues), checked value by value;
  PairSampler, crop_grid, cut_view, warp, hflip_cues
                    the method part (see the banner): a pair's two views and their grids;
  PairDataset       torch Dataset of pairs from a VideoFolder (with or without Cues/) or from
                    synthetic videos rendered on the fly (scenes.py; PairDataset.synthetic).
  preview + CLI     write / look at synthetic data.

Shapes: S view side, Hb = Wb = base side (the cue resolution: 224, or the view side for the
tiny preset), hi the side of the sharp base frame the views are cut from (480 for real video,
the render size for synthetic video); grids (S, S, 2) in grid_sample convention (x, y in
[-1, 1], align_corners=False) mapping view pixels to base-frame positions, the same for
every resolution of the base frame. Flow maps (2, Hb, Wb) in normalised units (u 2/W, v 2/H).

Choices and deviations from the official code:
  * The shared flip mirrors the frames and their cue maps before anything else (flow-x
    negated: it is the flow of the mirrored video, as if the cue networks saw the flipped
    frames, as in the official code). A view's own flip and the crop's zoom re-lay the cue
    maps out but never change their values (warp), as in the official code.
  * Frame t is uniform in 0..T-2 so that t+Δ is always another frame (official: 0..T-1 and
    clamped, so the last frame pairs with itself).
  * Synthetic videos are rendered at twice the view side (not 480): the smallest query crop
    (30 % of the area) still has more render pixels than view pixels, at a quarter of the
    cost and memory of 480 px; their exact cues are block means at the cue resolution.
  * Bad data: an unreadable frame or cue file is an error naming it; PairDataset logs it,
    counts it in `.skipped` and moves on to another pair (at most `retries` times in a row).
    Empty, one-frame and duplicate-name videos are skipped (counted, logged) when a
    VideoFolder is built; `verify=True` also opens every frame header there.
  * Cue maps whose aspect equals the frame's get the frame's centre crop; other (square)
    maps are taken as already computed on the base frame.

Commands:  python data.py --make-synthetic /tmp/s [--videos 4 --frames 12 --size 224]
           python data.py --preview /tmp/s
Tests: python -m pytest -q tests/test_data.py
"""
import argparse
import logging
import os
import re
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

# The synthetic scenes (scenes.py): what PairDataset renders on the fly and the CLI writes.
from scenes import (SyntheticScenes, corrupt_disparity, corrupt_flow, write_synthetic,  # noqa: F401
                    flow_to_rgb, _atomic, _depth_rgb, _palette)

log = logging.getLogger("data")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# --------------------------------------------------------------------------- video folders
LAYOUTS = ("JPEGImages/480p/<video>/ (DAVIS)", "JPEGImages/<video>/ (YouTube-VOS)",
           "train_all_frames/JPEGImages/<video>/", "train/JPEGImages/<video>/")


def natural_key(path):
    """Sort key of a frame path: digit runs compare as numbers, so 2.jpg < 10.jpg
    (zero-padded names sort as before)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", Path(path).name)]


class VideoFolder:
    """Frame folders of real video. The first existing layout in LAYOUTS is used.
    `.videos` sorted names, `.frames(v)` paths in natural order (see natural_key), `.load(path)`
    (H, W, 3) uint8 RGB, `.cues_dir` (ROOT/Cues or None), `.skipped` dict of counted skips."""

    def __init__(self, root, verify=False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.py: video root {self.root} does not exist (expected one of: ROOT/" + ", ROOT/".join(LAYOUTS) + ")")
        cands = [self.root / "JPEGImages/480p", self.root / "JPEGImages",
                 self.root / "train_all_frames/JPEGImages", self.root / "train/JPEGImages"]
        self.image_dir = next((c for c in cands if c.is_dir()), None)
        if self.image_dir is None:
            raise FileNotFoundError(f"data.py: no video folders under {self.root}: looked for ROOT/" + ", ROOT/".join(LAYOUTS))
        self.skipped = {"empty": 0, "one_frame": 0, "unreadable_or_mixed_sizes": 0, "duplicate_frame_names": 0}
        self._frames = {}
        for d in sorted(p for p in self.image_dir.iterdir() if p.is_dir()):
            fr = sorted((p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS), key=natural_key)
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
                f"videos lack cue files (e.g. {d.parent / v}/{lack[0]}.npz); complete it with "
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


def _check_cue(path, key, a, shape):
    """data.py: a cue array must have the documented shape and plausible, finite values."""
    want = "(h, w)" if key == "disparity" else "(h, w, 2)"
    if a.ndim != (2 if key == "disparity" else 3) or (key != "disparity" and a.shape[-1] != 2) \
            or (shape is not None and a.shape != shape):
        raise ValueError(f"data.py: cue file {path}: '{key}' has shape {a.shape}, expected {want}"
                         + (f" = {shape}" if shape is not None else ""))
    if not np.isfinite(a).all():
        raise ValueError(f"data.py: cue file {path}: '{key}' holds {int((~np.isfinite(a)).sum())} NaN/inf values")
    if key == "disparity" and not (a > 0).mean() >= 0.25:  # sky may be <= 0, not most of a frame
        raise ValueError(f"data.py: cue file {path}: 'disparity' is positive on only {100 * (a > 0).mean():.0f} % of "
                         "the pixels (expected relative inverse depth: larger = nearer, > 0)")
    if key != "disparity" and np.abs(a).max() > 2 * max(a.shape[:2]):
        raise ValueError(f"data.py: cue file {path}: '{key}' reaches {np.abs(a).max():.3g} px, more than twice "
                         f"the map size {a.shape[:2]} (flow is stored in pixels of the map)")


def load_cues(root, video, i, j, names=None):
    """Cues of frames i and j from ROOT/Cues/<video>/<name>.npz. `names` are the frame stems
    (default: the npz files in natural order). Flow i->j chains flow_next (flow_prev if j < i):
    f_{i->k+1}(x) = f_{i->k}(x) + f_{k->k+1}(x + f_{i->k}(x)) (bilinear). Returns float32
    torch dict(flow_fwd (2, h, w), flow_bwd (2, h, w) normalised, disparity_i/j (1, h, w)).
    A missing, unreadable or implausible file is an error naming it (_check_cue)."""
    d = Path(root) / "Cues" / video
    names = names or [p.stem for p in sorted(d.glob("*.npz"), key=natural_key)]
    cache = {}

    def get(k, key, shape=None):
        path = d / f"{names[k]}.npz"
        if k not in cache:
            if not path.is_file():
                raise FileNotFoundError(f"data.py: missing cue file {path}")
            try:
                with np.load(path, allow_pickle=False) as z:
                    cache[k] = {name: z[name] for name in z.files}
            except Exception as e:
                raise ValueError(f"data.py: cannot read cue file {path} ({type(e).__name__}: {e})") from None
        if key not in cache[k]:
            raise ValueError(f"data.py: cue file {path} has no '{key}' (has {sorted(cache[k])})")
        a = np.asarray(cache[k][key], np.float32)
        _check_cue(path, key, a, shape)
        return torch.from_numpy(a)

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


# --------------------------------------------------------------------------- method: frame pairs
HI_RES = 480  # side of the square base frame the views are cut from (official dataload.py: Resize(480), CenterCrop(480))


class PairSampler:
    """The views of one frame pair (official dataload.py YTVOS + configs/train_ytvos.yaml):
    delta ~ U{1..gap} (gap 5); one shared horizontal flip of both frames (p = 0.5, applied by the
    dataset to the frames and their cue maps); the query view is a random square crop of
    query_area (a fraction of the area, uniform in [0.3, 1]) at a random position with its own
    flip (p = 0.5); the context view a square crop of ctx_area = 0.8 at a random position, never
    flipped on its own. Crops are integer pixel boxes (top, left, side) of the hi x hi base
    frame, as torchvision's RandomResizedCrop.get_params (ratio 1) draws them.
    sample(generator) -> dict(box_q, box_c, grid_q, grid_c (size, size, 2), flip, flip_q, delta).
    crop=False (ablation): both views are the whole base frame (flips kept)."""

    def __init__(self, size=224, hi=HI_RES, gap=5, crop=True, query_area=(0.3, 1.0), ctx_area=0.8):
        self.size, self.hi, self.gap, self.crop = size, hi, gap, crop
        self.query_area, self.ctx_area = query_area, ctx_area

    def _box(self, area, g):
        side = min(self.hi, max(1, round(np.sqrt(area) * self.hi))) if self.crop else self.hi
        top, left = (int(torch.randint(0, self.hi - side + 1, (1,), generator=g)) for _ in range(2))
        return top, left, side

    def sample(self, g):
        shared, own = (torch.rand(2, generator=g) < 0.5).tolist()
        delta = int(torch.randint(1, self.gap + 1, (1,), generator=g))
        lo, hi = self.query_area
        box_q = self._box(lo + (hi - lo) * float(torch.rand(1, generator=g)), g)
        box_c = self._box(self.ctx_area, g)
        return dict(box_q=box_q, box_c=box_c, grid_q=crop_grid(box_q, self.hi, self.size, own),
                    grid_c=crop_grid(box_c, self.hi, self.size, False), flip=shared, flip_q=own, delta=delta)


def crop_grid(box, hi, size, flip=False):
    """The grid_sample grid (size, size, 2) (x, y in [-1, 1], align_corners=False) that maps each
    pixel of a view to its position in the base frame: the view shows the box (top, left, side)
    of an hi x hi frame, mirrored if `flip`. The grid is in the base frame's normalised units,
    so it reads any cue map of the same frame, whatever its resolution."""
    top, left, side = box
    u = (torch.arange(size, dtype=torch.float64) + 0.5) / size        # view pixel centres in (0, 1)
    xs = 2 * (left + side * (u.flip(0) if flip else u)) / hi - 1      # a flipped view reads the box mirrored
    ys = 2 * (top + side * u) / hi - 1
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], -1).float()  # (size, size, 2) x, y


def cut_view(frame, box, size, flip=False):
    """frame (C, hi, hi) -> the view (C, size, size): the box cut out and resized with
    antialiasing (official: torchvision resized_crop(..., antialias=True)), mirrored if `flip`.
    Sharp even for small crops: the box is cut from the high-resolution frame, not from the
    cue-resolution one."""
    top, left, side = box
    x = frame[None, :, top:top + side, left:left + side]                # (1, C, side, side)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                      antialias=side > size)[0]                         # (C, size, size)
    return x.flip(-1) if flip else x


def warp(x, grid):
    """x (B, C, Hb, Wb), a map on the base frame -> (B, C, S, S) in the view (bilinear,
    align_corners=False, border). Values are copied, never changed: flow keeps the base
    frame's normalised units whatever the crop's zoom or the view's own flip, so that one
    linear map reads the query and the context alike (the official code does the same)."""
    grid = grid if grid.dim() == 4 else grid[None].expand(len(x), -1, -1, -1)  # (B, S, S, 2)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def hflip_cues(cues):
    """The cue maps of a mirrored frame pair: every map mirrored, and flow-x negated, because
    in the mirrored video things move the other way (the shared flip, as if the cue networks had
    seen the flipped frames). cues: dict of (..., C, H, W) tensors with keys flow_* and others."""
    out = {}
    for k, v in cues.items():
        v = v.flip(-1)
        if k.startswith("flow"):
            v = torch.cat([-v[..., :1, :, :], v[..., 1:, :, :]], -3)
        out[k] = v
    return out


# --------------------------------------------------------------------------- datasets
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


def base_frames(img, base, hi=HI_RES):
    """(H, W, 3) uint8 -> (hi-res (3, hi, hi), cue-res (3, base, base)) float in [0, 1]: the
    base frame of the pair (the frame's centre square at 480 x 480, official dataload.py), and
    that frame resized to the cue resolution (PIL bicubic). Views are cut from the first; cues
    are computed on the second (cues.py writes its cache on exactly these frames)."""
    sq = _square(img, hi)
    return _to_tensor(sq), _to_tensor(sq if base == hi else sq.resize((base, base), Image.BICUBIC))


def base_frame(img, base, hi=HI_RES):
    """The cue-resolution base frame (3, base, base) of `base_frames`."""
    return base_frames(img, base, hi)[1]


def _cue_to_base(x, frame_hw, base, is_flow=False):
    """Cue map (C, h, w) -> (C, base, base): the frame's centre crop if the map has the frame's
    aspect (normalised flow rescaled to the crop), else the map is taken as base-aligned."""
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


class PairDataset(torch.utils.data.Dataset):
    """Frame pairs with their two views (official dataload.py YTVOS, see PairSampler).

    Item i: video i % len(self) (every video equally often, however long it is), then frame t
    uniform in 0..T-2 and t2 = min(t + delta, T - 1); everything seeded by (seed, i). i may
    exceed len(self): train.py numbers samples across epochs, so each epoch draws fresh frames,
    crops and flips. Returns float tensors:
      views (2, 3, S, S)     the query view (of frame t) and the context view (of frame t2),
                             cut from the hi-res base frames (sharp) and resized to S
      frames (2, 3, Hb, Wb)  both base frames at the cue resolution (Hb = Wb = base)
      grid_q, grid_c (S, S, 2), flip, flip_q, delta (see PairSampler; the shared flip is
                             already applied to frames, views and cues)
      flow_fwd, flow_bwd (2, Hb, Wb) normalised, disparity (2, 1, Hb, Wb)   (if with_cues)
      skipped ()             how many pairs failed to load before this one (0 normally)
    Sources: a VideoFolder (cues from ROOT/Cues if with_cues, else none: the trainer computes
    them), or SyntheticVideos (exact cues, rendered at their own size, which acts as the hi-res
    base; cue_noise as in write_synthetic). A pair that fails to load is logged, counted in
    .skipped and replaced by another one (at most `retries` times)."""

    def __init__(self, source, size=224, base=224, gap=5, crop=True, seed=0, cue_noise=0.0, with_cues=True, retries=10):
        self.source, self.size, self.base, self.seed = source, size, base, seed
        self.cue_noise, self.retries, self.with_cues = cue_noise, retries, with_cues
        self.synthetic = isinstance(source, SyntheticVideos)
        self.hi = source.size if self.synthetic else HI_RES
        if self.synthetic and source.size < base:
            raise ValueError(f"data.py: synthetic videos are rendered at {source.size}, below the cue resolution {base}")
        self.sampler = PairSampler(size=size, hi=self.hi, gap=gap, crop=crop)
        self.lengths = [source.T] * len(source) if self.synthetic else [len(source.frames(v)) for v in source.videos]
        if not self.synthetic and with_cues and source.cues_dir is not None:
            source.check_cues()
        self.skipped = 0

    @classmethod
    def synthetic(cls, videos=8, frames=12, scene_seed=0, base=224, size=224, render=None, cache=None,
                  cache_bytes=1e9, **kw):
        """Pairs from `videos` synthetic videos rendered on the fly (video i: scene_seed + i,
        as in write_synthetic) at `render` px (default 2 * size: the smallest query crop, 30 % of
        the area, then still has more render pixels than view pixels, so no view is ever
        upsampled, as with the 480 px base of real video). cache: videos kept rendered per
        DataLoader worker (default: all that fit in cache_bytes, ~24 bytes a pixel: all 64 of
        the tiny preset, 17 of the paper preset's 448 px renders). The pair seed `seed` (in kw)
        defaults to scene_seed."""
        kw.setdefault("seed", scene_seed)
        render = render or 2 * size
        if cache is None:
            cache = int(min(videos, max(2, cache_bytes // (24 * frames * render ** 2))))
        return cls(SyntheticVideos(videos, frames, render, scene_seed, cache), base=base, size=size, **kw)

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
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

    def _item(self, key):
        v = key % len(self.lengths)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + key)
        s = self.sampler.sample(g)
        T = self.lengths[v]
        t = int(torch.randint(0, T - 1, (1,), generator=g))
        t2 = min(t + s["delta"], T - 1)
        hi, cues = self._frames_and_cues(v, t, t2, key)                 # (2, 3, hi, hi), dict
        if s["flip"]:                                                   # the shared flip
            hi, cues = hi.flip(-1), hflip_cues(cues)
        views = torch.stack([cut_view(hi[0], s["box_q"], self.size, s["flip_q"]),
                             cut_view(hi[1], s["box_c"], self.size)])   # (2, 3, S, S)
        return dict(views=views, grid_q=s["grid_q"], grid_c=s["grid_c"], flip=torch.tensor(s["flip"]),
                    flip_q=torch.tensor(s["flip_q"]), delta=torch.tensor(t2 - t), **cues)

    def _frames_and_cues(self, v, t, t2, key):
        """The two hi-res base frames (2, 3, hi, hi) and a dict with the cue-resolution frames
        (2, 3, base, base) and, if with_cues, the cue maps of the pair (unflipped)."""
        if self.synthetic:
            sc = self.source[v]
            hi = torch.from_numpy(sc.frames[[t, t2]]).permute(0, 3, 1, 2).float() / 255  # (2, 3, R, R)
            out = dict(frames=torch.stack([_downsample(x, self.base) for x in hi]))
            if self.with_cues:
                out.update(self._synthetic_cues(sc, t, t2, key))
            return hi, out
        name, src = self.source.videos[v], self.source
        paths = [src.frames(name)[t], src.frames(name)[t2]]
        imgs = [src.load(p) for p in paths]
        if imgs[0].shape != imgs[1].shape:
            raise ValueError(f"data.py: mixed frame sizes in video {name}: {paths[0]} {imgs[0].shape[:2]} vs {paths[1]} {imgs[1].shape[:2]}")
        pairs = [base_frames(im, self.base, self.hi) for im in imgs]
        out = dict(frames=torch.stack([p[1] for p in pairs]))          # (2, 3, Hb, Wb)
        if src.cues_dir is not None and self.with_cues:
            c = load_cues(src.root, name, t, t2, names=[p.stem for p in src.frames(name)])
            hw = imgs[0].shape[:2]
            out["flow_fwd"] = _cue_to_base(c["flow_fwd"], hw, self.base, True)
            out["flow_bwd"] = _cue_to_base(c["flow_bwd"], hw, self.base, True)
            out["disparity"] = torch.stack([_cue_to_base(c["disparity_i"], hw, self.base),
                                            _cue_to_base(c["disparity_j"], hw, self.base)])
        return torch.stack([p[0] for p in pairs]), out

    def _synthetic_cues(self, sc, t, t2, key):
        """Exact flow (both ways) and disparity at the render size, downsampled to the cue
        resolution, then corrupted there (cue_noise, seeded by (seed, key)) like write_synthetic."""
        rng = np.random.default_rng([self.seed, key])
        b, R = self.base, sc.S
        fl = []
        for a, c in ((t, t2), (t2, t)):
            f = _downsample(torch.from_numpy(sc.flow(a, c)).permute(2, 0, 1), b) * (b / R)  # (2, b, b) px
            f = corrupt_flow(f.permute(1, 2, 0).numpy(), self.cue_noise, rng)
            fl.append(torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1) * (2 / b))  # normalised
        dp = [torch.from_numpy(corrupt_disparity(_downsample(torch.from_numpy(1 / sc.depth[a])[None], b)[0].numpy(),
                                                 self.cue_noise, rng))[None] for a in (t, t2)]
        return dict(flow_fwd=fl[0], flow_bwd=fl[1], disparity=torch.stack(dp))  # (2,b,b) x2, (2,1,b,b)


# --------------------------------------------------------------------------- preview + CLI
def preview(root, rows=4, video=None):
    """One PNG grid from a written synthetic (or any DAVIS + Cues) root: rows = frames,
    columns = RGB, depth, flow to the next frame, instances, classes, normals."""
    root = Path(root)
    vf = VideoFolder(root)
    vids = [video] if video else vf.videos  # rows cycle over the videos, frames spread in time
    ts = np.linspace(0, min(len(vf.frames(v)) for v in vids) - 2, rows).round().astype(int)
    pal = np.array(_palette(), np.uint8).reshape(256, 3)
    cols = ["RGB", "depth", "flow t->t+1", "instances", "classes", "normals"]
    tiles = []
    for r, t in enumerate(ts):
        video = vids[r % len(vids)]
        stem = vf.frames(video)[t].stem
        img = vf.load(vf.frames(video)[t])
        h, w = img.shape[:2]
        blank = np.full_like(img, 128)
        row = [img]
        cue = root / "Cues" / video / f"{stem}.npz"
        if cue.is_file():
            c = np.load(cue)
            row += [_depth_rgb(1 / np.maximum(c["disparity"].astype(np.float32), 1e-6)),
                    flow_to_rgb(c["flow_next"].astype(np.float32)) if "flow_next" in c else blank]
        else:
            row += [blank, blank]
        for sub in ("Annotations/480p", "Classes"):
            p = root / sub / video / f"{stem}.png"
            row.append(pal[np.asarray(Image.open(p))] if p.is_file() else blank)
        p = root / "Normals" / video / f"{stem}.npz"
        row.append(((np.load(p)["normals"].astype(np.float32) * [1, -1, -1] + 1) * 127.5).astype(np.uint8) if p.is_file() else blank)
        tiles.append(row)
    gap, title = 4, 18
    canvas = np.full((title + rows * (h + gap), len(cols) * (w + gap), 3), 255, np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            canvas[title + r * (h + gap):title + r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tile
    im = Image.fromarray(canvas)
    draw = ImageDraw.Draw(im)
    for c, name in enumerate(cols):
        draw.text((c * (w + gap) + 4, 3), name, fill=(0, 0, 0))
    out = root / "preview.png"
    _atomic(out, lambda p: im.save(p, format="PNG"))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="LILA data: write / preview synthetic dynamic 3D scenes")
    act = ap.add_mutually_exclusive_group(required=True)
    act.add_argument("--make-synthetic", metavar="DIR", help="write the DAVIS layout + Cues/ Normals/ Classes/ to DIR")
    act.add_argument("--preview", metavar="DIR", help="write DIR/preview.png (frames, depth, flow, masks, classes, normals)")
    g = ap.add_argument_group("synthetic scenes")
    g.add_argument("--videos", type=int, default=4, help="number of videos (default 4)")
    g.add_argument("--frames", type=int, default=12, help="frames per video (default 12)")
    g.add_argument("--size", type=int, default=224, help="square frame side in pixels (default 224 = the paper's base)")
    g.add_argument("--seed", type=int, default=0, help="video i uses seed + i (default 0)")
    g.add_argument("--cue-noise", type=float, default=0.0, help="cue corruption level, 0 = exact cues (default 0; 1 = strong)")
    a = ap.parse_args(argv)
    if min(a.videos, a.frames - 1, a.size - 15) < 1 or a.cue_noise < 0:
        ap.error("need --videos >= 1, --frames >= 2, --size >= 16, --cue-noise >= 0")
    if a.make_synthetic:
        # a fresh folder only: writing over another set would mix its frames and lists with ours
        if os.path.isdir(a.make_synthetic) and os.listdir(a.make_synthetic):
            ap.error(f"--make-synthetic {a.make_synthetic} is not empty; give a new or empty folder")
        if os.path.exists(a.make_synthetic) and not os.path.isdir(a.make_synthetic):
            ap.error(f"--make-synthetic {a.make_synthetic} is a file; give a folder")
        print(vars(a))
        names = write_synthetic(a.make_synthetic, a.videos, a.frames, a.size, a.seed, a.cue_noise)
        print(f"wrote {len(names)} videos to {a.make_synthetic}")
    else:
        print(preview(a.preview))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        main()
    except (OSError, ValueError) as e:   # a path or file the user gave: one line, no traceback
        msg = str(e) if str(e).startswith("data.py") else f"data.py: {e}"
        sys.exit(f"data.py: error: {msg.split(': ', 1)[1]}")
