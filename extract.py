"""extract.py: LILA's pixel features of your own images and videos, written to files, and PCA
pictures and videos of them; streamed, in bounded memory.

INPUT is an image, a folder of images (the frames of one video), a folder of such folders
(several videos: DAVIS's JPEGImages/480p, YouTube-VOS's JPEGImages), or a video file (.mp4 .mov
.avi .webm, decoded with PyAV: `pip install av`; frame folders need Pillow only). Every folder
that holds images is one sequence, every video file one sequence, named by its path under INPUT.

    DIR/manifest.json                 the settings, the checkpoint's sha256, every frame's source,
                                      files and shapes, the frames skipped (and why)
    DIR/decoder/<seq>/<frame>.npy     (D, H', W') float16: LILA.features of the frame, every
                                      --stride pixels (--features decoder, full)
    DIR/encoder/<seq>/<frame>.npy     (E, h, w) float16: the encoder's last tapped grid, one
                                      LayerNormed vector per patch (--features encoder, full)
    DIR/pca/<seq>/<frame>.png         frame | encoder PCA | decoder PCA (--pca)
    DIR/pca/<seq>.mp4 (.webp)         the sequence's pictures as a video, ONE PCA basis per
                                      sequence, so a surface keeps its colour (mp4 with PyAV,
                                      else an animated WebP through Pillow)

Why float16: features are LayerNormed (zero mean, unit variance over D), so float16's 11-bit
mantissa keeps them to ~1e-3 relative, far below what a probe resolves, at half the disk and
read time (a 1920x1080 frame: 0.53 GB instead of 1.06 GB at D = 128).

The repo's pictures of features live here too: the one PCA (fit_pca, pca_rgb), which
probe.py's picture uses, and FeaturePicture, train.py's feats_<step>.png of a fixed pair.

Nothing here is new method: the numbers are LILA.features' (model.py), with the decoder's
full-resolution head computed in bands of rows (model.decoder_bands), so a 4K frame needs a few
GB. Frames are read, batched (same size, --batch-pixels), computed and written a batch at a
time; memory does not grow with the number of frames. A rerun continues where it stopped
(finished files are kept; other settings on the same --out are refused); files are written
atomically; Ctrl-C / SIGTERM stop after the current batch with a consistent manifest; an
unreadable frame is named, counted in the manifest and skipped.

Shapes: B frames in a batch, H x W frame, H' x W' = ceil(H / stride) x ceil(W / stride) (or the
--size frame), h x w patch grid, D decoder feature dim, E encoder width.

Run:  python extract.py DAVIS/JPEGImages/480p --ckpt runs/lila/ckpt.pt --out feats --pca
      python extract.py clip.mp4 --ckpt none --preset tiny --weights none --out /tmp/x --pca-only
Use:  for name, f in extract.features(lila, [("a", Image.open("a.jpg"))]): f["decoder"]  # (D, H, W)
Tests: tests/test_extract.py; speed and memory: python bench.py extract
"""
import argparse
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

import model
from evaldata import natural_key
from runs import (RunFolder, StopOnSignal, UserError, cli, save_file, save_picture, set_threads,
                  write_error)

IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXT = (".mp4", ".mov", ".avi", ".webm", ".mkv")
KINDS = {"decoder": ("decoder",), "encoder": ("encoder",), "full": ("encoder", "decoder")}
BATCH_PIXELS = 1920 * 1080   # frames of one batch on a GPU: one full-HD frame, or ~5 at 854x480;
                             # a CPU takes one at a time (4 frames of 854x480 together: 1.3x slower each)
BAND_PIXELS = 2 ** 15        # decoder_bands: pixels of a band of rows (~40 rows at 854 px): the
                             # fastest on a CPU, 1.4-1.6x the one-piece head (model.decoder_bands)
GAP, LABEL = 4, 14           # PCA pictures: white px between columns, px of the title row
MANIFEST_EVERY_S = 30        # inside a sequence, the manifest is rewritten at most this often


# ------------------------------------------------------------------ PCA: features as colours
def fit_pca(feats, n=3, samples=200_000, seed=0, clip=0.01):
    """The first n principal components of the rows of feats (N, D), on a seeded sample of at
    most `samples` rows: centre, SVD; and each component's colour range, its clip and 1 - clip
    quantiles on that sample (a few extreme pixels must not wash the others out).
    -> dict(mean (D,), basis (D, n), lo (n,), hi (n,), explained (n,) fractions of variance)."""
    feats = feats.float()
    if feats.shape[0] > samples:
        g = torch.Generator().manual_seed(seed)
        feats = feats[torch.randperm(feats.shape[0], generator=g)[:samples]]   # (samples, D)
    mean = feats.mean(0)                                                      # (D,)
    _, s, v = torch.linalg.svd(feats - mean, full_matrices=False)            # rows of v: components
    k = min(n, v.shape[0])                                                   # fewer rows than n: pad
    v = v[:k] * v[:k].gather(1, v[:k].abs().argmax(1, keepdim=True)).sign()  # a fixed sign: its largest entry > 0
    basis = F.pad(v.T, (0, n - k))                                           # (D, n)
    y = (feats - mean) @ basis                                               # (samples, n)
    lo, hi = torch.quantile(y, torch.tensor([clip, 1 - clip]), dim=0)        # (n,), (n,)
    explained = F.pad(s[:k] ** 2 / (s ** 2).sum().clamp(min=1e-12), (0, n - k))
    return dict(mean=mean, basis=basis, lo=lo, hi=hi, explained=explained)


def pca_rgb(feats, pca):
    """feats (..., D, H, W) -> (..., H, W, n) uint8: the projection on fit_pca's basis, lo..hi
    to 0..255. (f - mean) basis = f basis - mean basis: no centred copy of the features."""
    y = torch.einsum("...dhw,dk->...hwk", feats.float(), pca["basis"]) - pca["mean"] @ pca["basis"]
    y = (y - pca["lo"]) / (pca["hi"] - pca["lo"]).clamp(min=1e-6)             # (..., H, W, n)
    return (y.clamp(0, 1) * 255).byte()


# ------------------------------------------------------------------ features of a stream of frames
def feature_size(H, W, size=None):
    """(H, W) of the features of an H x W frame: the frame's, or short side `size`."""
    scale = 1.0 if size is None else size / min(H, W)
    return max(1, round(H * scale)), max(1, round(W * scale))


@torch.no_grad()
def features(lila, frames, kinds=("decoder",), size=None, stride=1, batch_pixels=None,
             band_pixels=BAND_PIXELS):
    """(name, {kind: float16 CPU tensor}) for each (name, image) of the iterable `frames`, in
    order, a batch at a time (consecutive frames of one size, at most batch_pixels together;
    default: BATCH_PIXELS on a GPU, one frame on a CPU).
    image: whatever LILA.features takes (PIL, numpy (H, W[, 3]), tensor (3, H, W)).
    "decoder": (D, H', W'): LILA.features(image) (or at short side `size`), every `stride`
    pixels, computed in bands of rows (model.decoder_bands); "encoder": (E, h, w), the last
    tapped grid. The CLI writes what this yields."""
    patch = lila.patch                                                      # 14 DINOv2, 16 DINOv3
    dev = next(lila.decoder.parameters()).device
    batch_pixels = batch_pixels or (BATCH_PIXELS if dev.type == "cuda" else 1)
    group = []
    for name, image in frames:
        x, _ = model.image_batch(image)                                      # (1, 3, H, W) in [0, 1]
        if group and (x.shape != group[0][1].shape or (len(group) + 1) * x[0, 0].numel() > batch_pixels):
            yield from _batch(lila, group, kinds, size, stride, band_pixels, patch, dev)
            group = []
        group.append((name, x))
    if group:
        yield from _batch(lila, group, kinds, size, stride, band_pixels, patch, dev)


def _batch(lila, group, kinds, size, stride, band_pixels, patch, dev):
    x = torch.cat([im for _, im in group])                                   # (B, 3, H, W)
    out_size = feature_size(*x.shape[-2:], size)
    run_size = tuple(max(patch, round(s / patch) * patch) for s in out_size)  # as LILA.features
    x = F.interpolate(x.to(dev), size=run_size, mode="bilinear", align_corners=False)  # as LILA.features
    grids = lila.encode(x)                                                   # 4 x (B, E, h, w)
    out = {}
    if "encoder" in kinds:
        out["encoder"] = grids[-1].half().cpu()                              # (B, E, h, w)
    if "decoder" in kinds:
        h, w = (math.ceil(s / stride) for s in out_size)
        out["decoder"] = torch.empty(x.shape[0], lila.decoder.out_dim, h, w, dtype=torch.float16)
        for row, band in model.decoder_bands(lila.decoder, grids, run_size, out_size, stride, band_pixels):
            out["decoder"][:, :, row:row + band.shape[2]] = band           # (B, D, rows, W'): one copy
    for i, (name, _) in enumerate(group):
        yield name, {k: v[i] for k, v in out.items()}


# --- plumbing ---------------------------------------------------------------------------------
# ------------------------------------------------------------------ inputs: sequences and frames
def find_sequences(root):
    """INPUT -> [(sequence name, source)]: source a list of image paths or a video file path.
    A file is one sequence; a folder: each folder under it that holds images, each video file."""
    root = os.path.normpath(root)
    if not os.path.exists(root):
        raise UserError(f"INPUT {root}: no such file or folder")
    low = root.lower()
    if os.path.isfile(root):
        if low.endswith(IMAGE_EXT):
            return [("", [root])]
        if low.endswith(VIDEO_EXT):
            return [(os.path.splitext(os.path.basename(root))[0], root)]
        raise UserError(f"INPUT {root}: not an image ({' '.join(IMAGE_EXT)}) nor a video "
                        f"({' '.join(VIDEO_EXT)})")
    seqs = []
    for folder, dirs, files in os.walk(root):
        dirs.sort(key=natural_key)
        rel = os.path.relpath(folder, root)
        rel = "" if rel == "." else rel
        images = sorted((f for f in files if f.lower().endswith(IMAGE_EXT)), key=natural_key)
        if images:
            seqs.append((rel, [os.path.join(folder, f) for f in images]))
        seqs += [(os.path.join(rel, os.path.splitext(f)[0]), os.path.join(folder, f))
                 for f in sorted(files, key=natural_key) if f.lower().endswith(VIDEO_EXT)]
    if not seqs:
        raise UserError(f"INPUT {root}: a folder without images ({' '.join(IMAGE_EXT)}) or "
                        f"videos ({' '.join(VIDEO_EXT)}), also in its subfolders")
    return seqs


def import_av(path):
    try:
        import av
    except ImportError:
        raise UserError(f"INPUT {path}: video files are read with PyAV: pip install av (or pass "
                        f"a folder of its frames)") from None
    return av


def frame_names(source):
    """The frame names of a sequence (file stems; frame numbers 000000... of a video)."""
    if isinstance(source, list):
        stems = [os.path.splitext(os.path.basename(p))[0] for p in source]
        twice = {s for s in stems if stems.count(s) > 1}                    # a.jpg and a.png
        return [os.path.basename(p) if s in twice else s for p, s in zip(source, stems)]
    with import_av(source).open(source) as c:
        if not c.streams.video:
            return []
        stream = c.streams.video[0]        # no frame count in the header (.webm): count packets
        n = stream.frames or sum(1 for packet in c.demux(stream) if packet.size)
        return [f"{i:06d}" for i in range(n)]


def read_frames(source, skipped, wanted=None):
    """(name, (H, W, 3) uint8) of each readable frame of `source` whose name is in `wanted`
    (all if None); an unreadable one is recorded in `skipped` (name -> why) and left out."""
    if isinstance(source, list):
        for name, path in zip(frame_names(source), source):
            if wanted is None or name in wanted:
                try:
                    with Image.open(path) as im:
                        im.load()                                 # decodes fully: truncated files fail
                        yield name, np.asarray(im.convert("RGB"))
                except Exception as e:  # noqa: BLE001 - any unreadable frame is skipped, named
                    skipped[name] = f"{path}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        return
    av = import_av(source)
    try:
        with av.open(source) as c:
            for i, frame in enumerate(c.decode(video=0)):
                name = f"{i:06d}"
                if wanted is None or name in wanted:
                    yield name, frame.to_ndarray(format="rgb24")
    except av.FFmpegError as e:
        skipped["(rest of the video)"] = f"{source}: {type(e).__name__}: {e}"


def video_fps(source, default):
    if isinstance(source, list):
        return default
    with import_av(source).open(source) as c:
        rate = c.streams.video[0].average_rate
        return float(rate) if rate else default


# ------------------------------------------------------------------ outputs: atomic files, the manifest
def atomic_write(path, write):
    """runs.save_file into a folder made first: a kill leaves the old file or the new one; a
    failed write (a full disk) leaves no temporary file and is one line naming the file."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as e:
        raise write_error(path, e, "every file written before is kept",
                          "run the same command again to continue") from None
    save_file(path, write, kept="every file written before is kept",
              then="run the same command again to continue")


def save_npy(path, array):
    atomic_write(path, lambda f: np.save(f, array))


def save_png(path, array):
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


class Manifest:
    """DIR/manifest.json: the settings of the run (a rerun with others is refused) and, per
    sequence, its frames' files and shapes and the frames skipped."""

    def __init__(self, out, settings):
        self.path, self.out = os.path.join(out, "manifest.json"), out
        self.data = dict(settings=settings, dtype="float16", sequences={})
        if os.path.exists(self.path):
            try:
                saved = json.load(open(self.path))
                old = saved["settings"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UserError(f"--out {out}: cannot read {self.path} ({type(e).__name__}: {e}); "
                                f"move it away or pass another --out") from None
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            if diff:
                raise UserError(f"--out {out} was written with other settings (saved, now): {diff}; "
                                f"rerun with the saved ones to continue it, or pass another --out")
            self.data = saved
        elif os.path.isdir(out) and [n for n in os.listdir(out) if n not in (".lock", "manifest.json.tmp")]:
            raise UserError(f"--out {out} is not empty and holds no manifest.json; pass a new or "
                            f"empty folder")

    def sequence(self, name, source):
        return self.data["sequences"].setdefault(name or ".", dict(
            source=source if isinstance(source, str) else os.path.dirname(source[0]), frames={},
            skipped={}, done=False))

    def save(self):
        self.saved = time.monotonic()
        seqs = self.data["sequences"].values()
        self.data["frames_written"] = sum(len(s["frames"]) for s in seqs)
        self.data["frames_skipped"] = sum(len(s["skipped"]) for s in seqs)
        atomic_write(self.path, lambda f: f.write(json.dumps(self.data, indent=1).encode()))


def feature_path(out, kind, seq, frame):
    return os.path.join(out, kind, seq, frame + ".npy")


# ------------------------------------------------------------------ PCA pictures and videos
class FeaturePicture:
    """Frames t and t+Δ of a fixed pair beside their features, mapped to RGB by a PCA whose
    basis (and colour range) is fitted once, at the first picture, and kept (also across
    --resume, in the checkpoint): the colours of feats_*.png are comparable over training."""

    def __init__(self, pair, state=None):
        self.frames = pair["frames"]                                    # (2, 3, Hb, Wb)
        self.size = pair["views"].shape[-1]
        self.state = state                                              # mean, basis, lo, hi

    def save(self, lila, path, step, device):
        S = self.size
        x = F.interpolate(self.frames.to(device), size=(S, S), mode="bilinear", align_corners=False)
        with torch.no_grad():
            _, feats = lila(x)                                          # (2, D, S, S)
        feats = feats.float().cpu()
        if self.state is None:                                          # on every pixel of both
            f = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])   # (2 S², D)
            self.state = dict(fit_pca(f, 3, samples=len(f)), step=step)
        rgb = pca_rgb(feats, self.state).numpy()                        # (2, S, S, 3)
        img = (x.permute(0, 2, 3, 1).cpu().numpy() * 255).astype(np.uint8)  # (2, S, S, 3)
        cells = [("frame t", img[0]), ("frame t+dt", img[1]),           # ASCII: PIL's font has no Greek
                 (f"features t (step {step})", rgb[0]), ("features t+dt", rgb[1])]
        save_picture(Image.fromarray(labelled_row(cells, (S, S))), path)


def sequence_pca(paths, samples, seed):
    """One basis for a sequence: about samples / T pixels of each of its T frames' feature
    files (a fixed sample, seeded by `seed` and the frame's index), fit_pca on them together."""
    per, rows = -(-samples // len(paths)), []
    for t, path in enumerate(paths):
        a = np.load(path, mmap_mode="r")                                     # (C, H', W') float16
        flat = a.reshape(a.shape[0], -1)                                     # (C, H' W')
        idx = np.sort(np.random.default_rng((seed, t)).permutation(flat.shape[1])[:per])
        rows.append(torch.from_numpy(np.ascontiguousarray(flat[:, idx].T)))  # (per, C)
    return fit_pca(torch.cat(rows), 3, samples, seed)


def labelled_row(cells, size):
    """[(label, (h, w, 3) uint8 image)] side by side at size (h', w') (bilinear), GAP white px
    apart, each label above its image. -> (LABEL + h', ..., 3) uint8."""
    h, w = size
    cells = [(label, np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR))) for label, im in cells]
    canvas = Image.new("RGB", (len(cells) * (w + GAP) - GAP, LABEL + h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, im) in enumerate(cells):                  # ASCII labels: PIL's built-in font
        canvas.paste(Image.fromarray(im), (i * (w + GAP), LABEL))
        draw.text((i * (w + GAP) + 2, 1), label, fill=(0, 0, 0))
    return np.asarray(canvas)


def pca_picture(frame, columns, title, size):
    """frame (H, W, 3) uint8 titled `title`, then the PCA images {label: (h, w, 3) uint8}."""
    return labelled_row([(title, frame)] + [(label, im.numpy()) for label, im in columns.items()], size)


def project_file(path, pca, band_rows=64):
    """pca_rgb of a (C, H', W') .npy file, a band of rows at a time (no float32 copy of it all)."""
    a = np.load(path, mmap_mode="r")
    return torch.cat([pca_rgb(torch.from_numpy(np.array(a[:, r:r + band_rows])), pca)
                      for r in range(0, a.shape[1], band_rows)])             # (H', W', 3)


def write_video(path_noext, pictures, fps):
    """The pictures ((H, W, 3) uint8, one size) as path.mp4 with PyAV, else as path.webp
    (animated, through Pillow). Returns the path written."""
    try:
        import av
    except ImportError:
        av = None
    if av is None:
        def write(f):
            frames = (Image.fromarray(p) for p in pictures)
            first = next(frames)
            first.save(f, format="WEBP", save_all=True, append_images=frames,
                       duration=round(1000 / fps), loop=0, quality=90)
        atomic_write(path_noext + ".webp", write)
        return path_noext + ".webp"

    def write(f):
        with av.open(f, "w", format="mp4") as c:
            stream = None
            for p in pictures:
                if stream is None:                              # yuv420p: even sides
                    stream = c.add_stream("libx264", rate=round(fps) or 1)
                    stream.height, stream.width = p.shape[0] + p.shape[0] % 2, p.shape[1] + p.shape[1] % 2
                    stream.pix_fmt, stream.options = "yuv420p", {"crf": "18"}
                p = np.pad(p, ((0, stream.height - p.shape[0]), (0, stream.width - p.shape[1]), (0, 0)),
                           constant_values=255)
                c.mux(stream.encode(av.VideoFrame.from_ndarray(p, format="rgb24")))
            c.mux(stream.encode(None))
    atomic_write(path_noext + ".mp4", write)
    return path_noext + ".mp4"


def sequence_pictures(args, entry, seq, source, kinds):
    """The PCA pictures of one finished sequence, and its video (more than one frame)."""
    names = list(entry["frames"])
    pcas = {k: sequence_pca([os.path.join(args.out, entry["frames"][n][k]) for n in names],
                            args.pca_samples, args.seed) for k in kinds}
    entry["pca_explained_variance"] = {k: [round(float(e), 4) for e in p["explained"]] for k, p in pcas.items()}
    folder = os.path.join(args.out, "pca", seq)
    pngs = []
    for name, frame in read_frames(source, {}, set(names)):
        cols = {f"{k} PCA": project_file(os.path.join(args.out, entry["frames"][name][k]), pcas[k]) for k in kinds}
        size = tuple(math.ceil(s / args.stride) for s in feature_size(*frame.shape[:2], args.size))
        pngs.append(os.path.join(folder, name + ".png"))
        save_png(pngs[-1], pca_picture(frame, cols, f"frame {os.path.join(seq, name)}", size))
    entry["pca_pictures"] = os.path.relpath(folder, args.out)
    if len(pngs) > 1:
        base = os.path.join(args.out, "pca", seq or os.path.basename(os.path.normpath(args.input)))
        size = Image.open(pngs[0]).size
        pictures = (np.asarray(Image.open(p).convert("RGB").resize(size)) for p in pngs)
        entry["pca_video"] = os.path.relpath(write_video(base, pictures, video_fps(source, args.fps)), args.out)


# ------------------------------------------------------------------ command line
def get_args(argv=None):
    p = argparse.ArgumentParser(prog="extract.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="an image, a folder of frames, a folder of such folders, or a "
                   f"video file ({' '.join(VIDEO_EXT)}, needs PyAV)")
    p.add_argument("--ckpt", required=True, help="a train.py or official LILA checkpoint (path or "
                   "http(s) URL, as hubconf.py takes), or none: an untrained decoder")
    p.add_argument("--out", required=True, help="output folder: manifest.json, decoder/, encoder/, pca/; "
                   "rerun the same command to continue it")
    g = p.add_argument_group("features")
    g.add_argument("--features", choices=list(KINDS), default="decoder", help="decoder: LILA's "
                   "pixel features (what lila.features returns); encoder: the last tapped patch "
                   "grid; full: both (default decoder)")
    g.add_argument("--size", type=int, default=None, help="short side of the features, px "
                   "(default: the frame's own size)")
    g.add_argument("--stride", type=int, default=1, help="keep the features of every STRIDE-th "
                   "pixel in each direction (default 1: all)")
    g.add_argument("--batch-pixels", type=int, default=None, help="frames computed together, "
                   "in pixels (default: one 1920x1080 frame's on a GPU, one frame on a CPU)")
    g.add_argument("--band-pixels", type=int, default=BAND_PIXELS, help="pixels of a band of rows "
                   "of the decoder's full-resolution head (memory vs overhead; default 2^15)")
    g = p.add_argument_group("PCA pictures")
    g.add_argument("--pca", action="store_true", help="also write PCA pictures and a PCA video "
                   "per sequence (one basis per sequence)")
    g.add_argument("--pca-only", action="store_true", help="--pca, and delete the features of a "
                   "sequence once its pictures are written (a quick look; the manifest keeps "
                   "their shapes)")
    g.add_argument("--pca-samples", type=int, default=200_000, help="pixels of a sequence the "
                   "PCA is fitted on (default 200000)")
    g.add_argument("--fps", type=float, default=10.0, help="frame rate of the video of a frame "
                   "folder (a video file keeps its own; default 10)")
    g = p.add_argument_group("model (defaults: the checkpoint's)")
    g.add_argument("--backbone", default=None, help=f"one of {list(model.BACKBONES)} (--ckpt none: "
                   f"default dinov2_vits14)")
    g.add_argument("--weights", default=None, help="encoder weights: hub, a .pth path, none")
    g.add_argument("--preset", default=None, help=f"decoder size, one of {list(model.PRESETS)} "
                   f"(--ckpt none: default paper)")
    g.add_argument("--seed", type=int, default=0, help="seed of an untrained decoder and of the "
                   "PCA pixel sample (default 0)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    a = p.parse_args(argv)
    for flag, v in (("--size", a.size), ("--stride", a.stride), ("--batch-pixels", a.batch_pixels),
                    ("--band-pixels", a.band_pixels), ("--pca-samples", a.pca_samples), ("--fps", a.fps)):
        if v is not None and not v > 0:
            p.error(f"{flag} {v} must be positive")
    a.pca = a.pca or a.pca_only
    return a


def load_model(a):
    """(LILA, what it was built from: backbone, weights, preset, seed and the checkpoint's
    sha256), as hubconf builds it from --ckpt ("none": as hubconf.lila_vits14(ckpt="none"))."""
    import hubconf
    try:
        if a.ckpt == "none":
            build = dict(backbone=a.backbone or "dinov2_vits14", weights=a.weights or "hub",
                         preset=a.preset or "paper", seed=a.seed)
            lila, digest = model.build_lila(**build), None
        else:
            ck = hubconf.read_lila_checkpoint(a.ckpt)
            if a.backbone and a.backbone != ck["build"]["backbone"]:
                raise UserError(f"--ckpt {a.ckpt} holds a {ck['build']['backbone']} decoder, not "
                                f"--backbone {a.backbone}")
            build = {**ck["build"], **{k: v for k, v in (("weights", a.weights), ("preset", a.preset))
                                       if v is not None}}
            lila, digest = hubconf.load_lila(ck, a.weights, a.preset), model.file_sha256(ck["path"])
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        raise UserError(f"--ckpt {a.ckpt}: {' '.join(str(e).split())}") from None
    dev = a.device if a.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return lila.to(dev).eval(), dict(build, ckpt_sha256=digest)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f"--device {a.device}: {str(e).splitlines()[0]}") from None


def run(a):
    seqs = find_sequences(a.input)
    folder = RunFolder(a.out, "extract.py")     # one run per --out: a second is refused
    folder.acquire()
    try:
        return extract_all(a, seqs)
    finally:
        folder.release()


def extract_all(a, seqs):
    if not os.access(a.out, os.W_OK):
        raise UserError(f"--out {a.out}: not writable")
    lila, built = load_model(a)
    kinds = KINDS[a.features]
    settings = dict(input=os.path.abspath(a.input), ckpt=a.ckpt, **built, features=a.features,
                    size=a.size, stride=a.stride, pca=a.pca, pca_only=a.pca_only,
                    pca_samples=a.pca_samples)
    manifest = Manifest(a.out, settings)
    manifest.save()
    print(f"extract.py: {len(seqs)} sequence(s) -> {a.out}; device "
          f"{next(lila.decoder.parameters()).device}, {set_threads(0)}; {json.dumps(settings)}",
          file=sys.stderr)
    stop = StopOnSignal()
    names_of = [frame_names(source) for _, source in seqs]          # a video's: one demux
    bar = tqdm(total=sum(map(len, names_of)), unit="frame", dynamic_ncols=True, file=sys.stderr)
    for i, ((seq, source), names) in enumerate(zip(seqs, names_of)):
        entry = manifest.sequence(seq, source)
        bar.set_postfix_str(f"sequence {i + 1}/{len(seqs)} {seq}")
        if entry["done"]:
            bar.update(len(names))
            continue
        entry["skipped"] = {}                                         # tried again
        todo = set()
        for n in names:                                               # written before: kept
            files = {k: feature_path(a.out, k, seq, n) for k in kinds}
            if all(os.path.exists(p) for p in files.values()):
                entry["frames"][n] = frame_entry(a.out, files)
            else:
                todo.add(n)
        bar.update(len(names) - len(todo))
        frames = read_frames(source, entry["skipped"], todo) if todo else iter(())
        for name, feats in features(lila, frames, kinds, a.size, a.stride, a.batch_pixels, a.band_pixels):
            files = {k: feature_path(a.out, k, seq, name) for k in kinds}
            for k, f in feats.items():
                save_npy(files[k], f.numpy())
            entry["frames"][name] = frame_entry(a.out, files)
            bar.update(1)
            if stop.name:
                break
            if time.monotonic() - manifest.saved > MANIFEST_EVERY_S:   # a long video: kept current
                manifest.save()
        entry["frames"] = {n: entry["frames"][n] for n in names if n in entry["frames"]}  # in order
        bar.update(len(entry["skipped"]) * (not stop.name))
        if not stop.name:
            if a.pca and entry["frames"]:
                sequence_pictures(a, entry, seq, source, kinds)
            if a.pca_only:
                for f in entry["frames"].values():
                    for k in kinds:
                        os.remove(os.path.join(a.out, f[k]))
                        try:                                          # and its folders, once empty
                            os.removedirs(os.path.dirname(os.path.join(a.out, f.pop(k))))
                        except OSError:
                            pass
            entry["done"] = True
        manifest.save()
        if stop.name:
            bar.close()
            print(f"extract.py: stopped by {stop.name}; {manifest.data['frames_written']} frames are "
                  f"written and listed in {manifest.path}. Continue with the same command.",
                  file=sys.stderr)
            return 128 + getattr(signal, stop.name)
    bar.close()
    d = manifest.data
    print(f"extract.py: {d['frames_written']} frames written, {d['frames_skipped']} skipped "
          f"(unreadable, listed in {manifest.path})", file=sys.stderr)
    return 0


def frame_entry(out, files):
    """The manifest's line of a frame: each file, relative to --out, and its shape."""
    entry = {}
    for k, p in files.items():
        entry[k], entry[k + "_shape"] = os.path.relpath(p, out), list(np.load(p, mmap_mode="r").shape)
    return entry


def main(argv=None):
    """The command line through the repo's one error path (runs.cli); exits with its status."""
    sys.exit(cli("extract.py", lambda: run(get_args(argv)), status=True,
                 oom="--batch-pixels or --band-pixels",
                 interrupted=lambda: "every finished file is kept. Continue with the same command."))


if __name__ == "__main__":
    main()
