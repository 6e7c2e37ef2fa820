"""Evaluation of frozen pixel features: VOS (k-NN propagation, one-shot linear probe), surface
normals, semantic segmentation, PCA pictures. LILA paper, section "Experiments" (DESIGN.md
section 3); every probe reads features from a trained decoder (--ckpt PATH), an untrained
seeded decoder (--ckpt none) or the frozen encoder alone (--features encoder).

Shapes: T frames, H x W image, h x w feature grid (short side --grid), D feature dim,
C labels (background + objects, or classes), K context frames, N pixels, s query tile side.

Deviations (all documented, all flags):
- k-NN propagation follows DINO's eval_video_segmentation.py (context = first frame +
  7 latest soft predictions, 25x25 window, top-5, softmax(cos / 0.1), bilinear upsampling,
  per-channel min-max "norm_mask", argmax) but computes each query only against its own
  window, query tile by query tile; the dense all-to-all affinity is never built.
  Soft labels are upsampled straight to the annotation size (DINO: x patch size, then nearest).
- davis_jf reproduces davis2017-evaluation (semi-supervised). Where the official script
  exits (a prediction without the highest object id) the missing object counts as empty.
  The official reader turns 255 into background *before* the void test, so its void mask
  is always empty: void="background" (default) reproduces that; void="ignore" applies the
  void path of db_eval_iou / f_measure.
- normals / semseg / vos-lp: a linear 1x1 probe on frozen features (no DPT probe head).

Commands:
  python probe.py vos-knn --data DAVIS --ckpt runs/x/ckpt.pt --out out/knn
  python probe.py vos-lp  --data DAVIS --features encoder --out out/lp
  python probe.py normals --data ROOT [--train-data ROOT2] --ckpt none --out out/n
  python probe.py semseg  --data ROOT --out out/s
  python probe.py pca --frames DAVIS/JPEGImages/480p/bear --out out/pca
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

VOID = 255  # DAVIS / segmentation "void" or "ignore" label


def fail(msg):
    """Clear error for the user, never a traceback from deep inside."""
    sys.exit(f"probe.py: error: {msg}")


# --- method: the DAVIS-2017 metric (davis2017-evaluation, davis2017/metrics.py) ---

def seg2bmap(seg):
    """1-pixel boundary map of binary masks (..., H, W) bool, as _seg2bmap: a pixel is a boundary
    if it differs from its right (e), lower (s) or lower-right (se) neighbour (0 outside)."""
    e, s, se = torch.zeros_like(seg), torch.zeros_like(seg), torch.zeros_like(seg)
    e[..., :, :-1] = seg[..., :, 1:]
    s[..., :-1, :] = seg[..., 1:, :]
    se[..., :-1, :-1] = seg[..., 1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[..., -1, :] = seg[..., -1, :] ^ e[..., -1, :]
    b[..., :, -1] = seg[..., :, -1] ^ s[..., :, -1]
    b[..., -1, -1] = False
    return b


def disk_dilate(b, radius):
    """Binary dilation of (N, H, W) bool by skimage's disk(radius) (x^2 + y^2 <= r^2), pixels
    outside the image ignored (cv2.dilate's border), as a convolution with the disk kernel."""
    r = int(radius)
    yy, xx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    kernel = ((xx ** 2 + yy ** 2) <= r * r).float()[None, None]      # (1, 1, 2r+1, 2r+1)
    hits = F.conv2d(b.float()[:, None], kernel, padding=r)            # (N, 1, H, W) counts
    return hits[:, 0] > 0.5


def frame_jf(pred, gt, void, bound_th=0.008):
    """Per-frame J and F of binary masks pred, gt, void (N, H, W) bool -> two (N,) float64.
    J = |P & G| / |P | G| over non-void pixels (1 when the union is empty). F = harmonic mean of
    boundary precision / recall, tolerance ceil(bound_th * image diagonal) (bound_th=0.008)."""
    valid = ~void
    inter = (pred & gt & valid).sum((-2, -1)).double()
    union = ((pred | gt) & valid).sum((-2, -1)).double()
    j = torch.where(union == 0, torch.ones_like(union), inter / union.clamp(min=1))
    bound_pix = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*pred.shape[-2:]))
    fg_b, gt_b = seg2bmap(pred & valid), seg2bmap(gt & valid)         # (N, H, W)
    n_fg, n_gt = fg_b.sum((-2, -1)).double(), gt_b.sum((-2, -1)).double()
    fg_match = (fg_b & disk_dilate(gt_b, bound_pix)).sum((-2, -1)).double()
    gt_match = (gt_b & disk_dilate(fg_b, bound_pix)).sum((-2, -1)).double()
    prec = torch.where(n_fg == 0, torch.ones_like(n_fg), fg_match / n_fg.clamp(min=1))
    rec = torch.where(n_gt == 0, torch.ones_like(n_gt), gt_match / n_gt.clamp(min=1))
    f = torch.where(prec + rec == 0, torch.zeros_like(prec), 2 * prec * rec / (prec + rec).clamp(min=1e-300))
    return j, f


def davis_jf(preds, gts, bound_th=0.008, void="background", chunk=16):
    """DAVIS-2017 semi-supervised J, F, J&F. preds / gts: {sequence: [(H, W) int label map per
    frame, first included]}, 255 = void in gts. Objects are the ids 1..max of the first gt frame;
    each object's score is the mean over frames 1..T-2 (first and last excluded); J (F) is the
    mean over all objects of all sequences, JF = (J + F) / 2."""
    if void not in ("background", "ignore"):
        raise ValueError(f"davis_jf: void must be 'background' or 'ignore', got {void!r}")
    per_j, per_f = [], []
    for seq in sorted(gts):
        if seq not in preds:
            raise ValueError(f"davis_jf: no prediction for sequence {seq!r}")
        gt = torch.as_tensor(np.stack(gts[seq]).astype(np.int64))           # (T, H, W)
        pred = torch.as_tensor(np.stack(preds[seq]).astype(np.int64))       # (T, H, W)
        if gt.shape != pred.shape or gt.shape[0] < 3:
            raise ValueError(f"davis_jf: {seq}: pred {tuple(pred.shape)} vs gt {tuple(gt.shape)} "
                             "(same shape, at least 3 frames needed)")
        vmask = gt == VOID if void == "ignore" else torch.zeros_like(gt, dtype=torch.bool)
        gt = torch.where(gt == VOID, 0, gt)              # the official reader: 255 -> background
        n_obj = int(gt[0].max())
        gt, pred, vmask = gt[1:-1], pred[1:-1], vmask[1:-1]                  # (T-2, H, W)
        if int(pred.max()) > n_obj or int(pred.min()) < 0:
            raise ValueError(f"davis_jf: {seq}: predicted label {int(pred.max())} outside 0..{n_obj}")
        for k in range(1, n_obj + 1):
            js, fs = [], []
            for t0 in range(0, gt.shape[0], chunk):
                sl = slice(t0, t0 + chunk)
                j, f = frame_jf(pred[sl] == k, gt[sl] == k, vmask[sl], bound_th)
                js.append(j), fs.append(f)
            per_j.append(torch.cat(js).mean().item()), per_f.append(torch.cat(fs).mean().item())
    if not per_j:
        raise ValueError("davis_jf: no objects in the first frames of the ground truth")
    jm, fm = float(np.mean(per_j)), float(np.mean(per_f))
    return {"J": jm, "F": fm, "JF": (jm + fm) / 2}


# --- method: k-NN label propagation over local windows ---

def knn_step(query, ctx, labels, radius=12, topk=5, temperature=0.1, tile=8):
    """One propagation step. query (D, h, w), ctx (K, D, h, w) L2-normalised, labels (K, C, h, w)
    -> (C, h, w). For every query pixel: cosine to every context position within +-radius rows
    and columns in each of the K frames, the top-k over all of them, weights softmax(cos / T).
    Queries go in s x s tiles; a tile's keys are the (s + 2r)^2 block around it."""
    D, h, w = query.shape
    K, C = ctx.shape[0], labels.shape[1]
    s, r, S = tile, radius, tile + 2 * radius
    nty, ntx = -(-h // s), -(-w // s)
    ph, pw = nty * s - h, ntx * s - w
    q = F.pad(query, (0, pw, 0, ph))                                   # (D, nty*s, ntx*s)
    pad = (r, r + pw, r, r + ph)
    kf = F.pad(ctx, pad)                                               # (K, D, h+2r+ph, w+2r+pw)
    kl = F.pad(labels, pad)                                            # (K, C, ...)
    inside = F.pad(torch.ones(1, 1, h, w, device=query.device), pad)[0, 0] > 0
    # window mask inside one tile: key (ky, kx) of the block is within +-r of query (qy, qx)
    d = torch.arange(S, device=query.device)[None, :] - torch.arange(s, device=query.device)[:, None]
    win = (d >= 0) & (d <= 2 * r)                                      # (s, S)
    win = win[:, None, :, None] & win[None, :, None, :]                # (s, s, S, S)
    out = torch.empty(C, nty * s, ntx * s, device=query.device)
    for ty in range(nty):
        rows = slice(ty * s, ty * s + S)
        qt = q[:, ty * s:(ty + 1) * s].unfold(2, s, s)                 # (D, s, ntx, s)
        qt = qt.permute(2, 1, 3, 0).reshape(ntx, s * s, D)             # (ntx, s*s, D)
        kt = kf[:, :, rows].unfold(3, S, s)                            # (K, D, S, ntx, S)
        kt = kt.permute(3, 0, 2, 4, 1).reshape(ntx, K * S * S, D)      # (ntx, K*S*S, D)
        lt = kl[:, :, rows].unfold(3, S, s)                            # (K, C, S, ntx, S)
        lt = lt.permute(3, 0, 2, 4, 1).reshape(ntx, K * S * S, C)      # (ntx, K*S*S, C)
        ok = inside[rows].unfold(1, S, s).permute(1, 0, 2)             # (ntx, S, S)
        ok = win[None] & ok[:, None, None]                             # (ntx, s, s, S, S)
        ok = ok.reshape(ntx, s * s, 1, S * S)                          # same for all K frames
        sim = torch.bmm(qt, kt.transpose(1, 2)).view(ntx, s * s, K, S * S)
        sim = sim.masked_fill(~ok, float("-inf")).view(ntx, s * s, K * S * S)
        val, idx = sim.topk(topk, dim=-1)                              # (ntx, s*s, k)
        wgt = torch.softmax(val / temperature, dim=-1)                 # (ntx, s*s, k)
        lab = torch.gather(lt[:, None].expand(-1, s * s, -1, -1), 2,
                           idx[..., None].expand(-1, -1, -1, C))       # (ntx, s*s, k, C)
        pred = (wgt[..., None] * lab).sum(2).view(ntx, s, s, C)        # (ntx, s, s, C)
        out[:, ty * s:(ty + 1) * s] = pred.permute(3, 1, 0, 2).reshape(C, s, ntx * s)
    return out[:, :h, :w]


def propagate(feats, first, n_context=7, step=knn_step, **step_kw):
    """feats (T, D, h, w) L2-normalised, first (C, h, w) one-hot of frame 0 -> soft labels
    (T, C, h, w). Context of frame t: frame 0 (ground truth) + the n_context latest soft
    predictions, as DINO's queue."""
    soft = [first]
    for t in range(1, feats.shape[0]):
        ids = [0] + list(range(max(1, t - n_context), t))
        soft.append(step(feats[t], feats[ids], torch.stack([soft[i] for i in ids]), **step_kw))
    return torch.stack(soft)


def soft_to_labels(soft, size, norm_mask=True):
    """soft (C, h, w) -> (H, W) int labels: bilinear upsampling, optionally DINO's norm_mask
    (per-channel min-max to [0, 1] when the channel has positive mass), argmax."""
    up = F.interpolate(soft[None], size=size, mode="bilinear", align_corners=False)[0]  # (C, H, W)
    if norm_mask:
        lo, hi = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
        up = torch.where(hi > 0, (up - lo) / (hi - lo).clamp(min=1e-12), up)
    return up.argmax(0)


def fit_linear(x, y, n_out, loss_fn, steps, lr, weight_decay, batch=0, seed=0):
    """A 1x1-conv probe = a linear layer on pixels. x (N, D), y (N, ...) -> nn.Linear, AdamW,
    full batch (batch=0) or random mini-batches."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(x.shape[1], n_out).to(x.device)
    opt = torch.optim.AdamW(lin.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        sel = torch.randint(0, x.shape[0], (batch,), generator=g).to(x.device) if 0 < batch < x.shape[0] else slice(None)
        loss = loss_fn(lin(x[sel]), y[sel])
        opt.zero_grad(), loss.backward(), opt.step()
    return lin


def angular_error(pred, gt, eps=1e-6):
    """Angle (radians) between predicted (N, 3) (normalised here) and unit gt normals (N, 3)."""
    cos = (F.normalize(pred, dim=-1) * gt).sum(-1)
    return torch.acos(cos.clamp(-1 + eps, 1 - eps))


# --- plumbing: features ---

def build_model(args):
    """LILA from --ckpt (its config, decoder loaded strictly) or from the flags; returns (model,
    checkpoint config or None)."""
    import model as lila_model
    ck_cfg = None
    kw = dict(backbone=args.backbone, weights=args.weights or "hub", preset=args.preset, seed=args.seed)
    if args.ckpt != "none":
        if not os.path.isfile(args.ckpt):
            fail(f"--ckpt {args.ckpt}: no such file (use --ckpt none for an untrained decoder)")
        try:
            ck = torch.load(args.ckpt, map_location="cpu", weights_only=True)
            ck_cfg = dict(ck["config"])
            state = ck["decoder"]
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is a user error
            fail(f"--ckpt {args.ckpt}: not a LILA checkpoint ({type(e).__name__}: {e})")
        kw = dict(backbone=ck_cfg["backbone"], weights=ck_cfg["weights"], preset=ck_cfg["preset"],
                  seed=ck_cfg["seed"])
        if args.weights and args.weights != kw["weights"]:
            print(f"note: --weights {args.weights} overrides the checkpoint's {kw['weights']}")
            kw["weights"] = args.weights
    print(f"model: {kw} features={args.features} ckpt={args.ckpt}")
    try:
        lila = lila_model.build_lila(**kw)
        if ck_cfg is not None:
            lila.decoder.load_state_dict(state, strict=True)
    except (ValueError, RuntimeError, FileNotFoundError, KeyError) as e:
        fail(f"cannot build the model {kw}: {e}")
    return lila.to(args.device).eval(), ck_cfg


def load_rgb(path):
    """(H, W, 3) uint8 RGB with data.py's reader and its errors."""
    import data
    try:
        return data.VideoFolder.load(path)
    except ValueError as e:
        fail(str(e))


def load_png(path):
    try:
        with Image.open(path) as im:
            return np.array(im), im.getpalette()
    except Exception as e:  # noqa: BLE001
        fail(f"cannot read label map {path}: {e}")


def resize_shape(hw, short, mult=14):
    """(H, W) -> (H', W') with short side `short` and both sides multiples of `mult`."""
    scale = short / min(hw)
    return tuple(max(mult, int(round(v * scale / mult)) * mult) for v in hw)


@torch.no_grad()
def features(lila, rgb, args, grid=None, l2=False):
    """(H, W, 3) uint8 -> (D, H, W) features at --size short side, or (D, h, w) area-averaged
    to a grid with short side `grid`; L2-normalised per pixel if `l2` (k-NN)."""
    img = torch.tensor(rgb).permute(2, 0, 1).float().div(255)[None]     # (1, 3, H, W)
    img = F.interpolate(img, size=resize_shape(rgb.shape[:2], args.size), mode="bilinear",
                        align_corners=False, antialias=True).to(args.device)
    f = lila.encoder_features(img) if args.features == "encoder" else lila(img)[1]  # (1, D, H, W)
    if grid:
        f = F.adaptive_avg_pool2d(f, resize_shape(rgb.shape[:2], grid, mult=1))     # (1, D, h, w)
    if l2:
        f = F.normalize(f, dim=1)
    return f[0].float()


def davis_sequences(root):
    """Sequence names (ImageSets/2017/val.txt when present) and a data.VideoFolder."""
    import data
    try:
        vf = data.VideoFolder(root)
    except (FileNotFoundError, ValueError) as e:
        fail(f"--data {root}: {e}")
    lst = os.path.join(root, "ImageSets", "2017", "val.txt")
    seqs = [l.strip() for l in open(lst) if l.strip()] if os.path.isfile(lst) else vf.videos
    missing = [q for q in seqs if q not in vf.videos]
    if missing:
        fail(f"{lst}: sequences without frames in {vf.image_dir}: {missing[:5]}")
    return seqs, vf


def annotation(root, seq, frame):
    """Path of the DAVIS annotation of a frame path."""
    return os.path.join(root, "Annotations", "480p", seq, Path(frame).stem + ".png")


def write_indexed(path, labels, palette):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette(palette or [c for i in range(256) for c in ((i * 67) % 256, (i * 151) % 256, (i * 199) % 256)])
    im.save(path)


# --- plumbing: subcommands ---

def run_vos(args, lila):
    """vos-knn / vos-lp over the DAVIS sequences; writes OUT/<seq>/<frame>.png."""
    seqs, vf = davis_sequences(args.data)
    preds, gts, t_prop, n_frames = {}, {}, 0.0, 0
    for seq in seqs:  # fail before any work when a first-frame mask is missing
        if not os.path.isfile(annotation(args.data, seq, vf.frames(seq)[0])):
            fail(f"sequence {seq}: no first-frame mask {annotation(args.data, seq, vf.frames(seq)[0])}")
    for seq in seqs:
        frames = vf.frames(seq)
        paths = [annotation(args.data, seq, fp) for fp in frames]
        complete = all(os.path.isfile(p) for p in paths)  # DAVIS test sets: first frame only
        gt = [load_png(p)[0].astype(np.int64) for p in (paths if complete else paths[:1])]
        pal = load_png(paths[0])[1]
        first = np.where(gt[0] == VOID, 0, gt[0])                      # (H, W), void -> background
        rgb = [load_rgb(fp) for fp in frames]
        feats = torch.stack([features(lila, x, args, args.grid, args.cmd == "vos-knn") for x in rgb])
        h, w = feats.shape[-2:]
        n_cls = int(first.max()) + 1
        small = F.interpolate(torch.from_numpy(first)[None, None].float(), size=(h, w),
                              mode="nearest-exact")[0, 0].long()        # (h, w)
        t0 = time.time()
        if args.cmd == "vos-knn":
            onehot = F.one_hot(small, n_cls).permute(2, 0, 1).float().to(feats.device)  # (C, h, w)
            soft = propagate(feats, onehot, n_context=args.context, radius=args.radius, topk=args.topk,
                             temperature=args.temperature, tile=args.tile)           # (T, C, h, w)
            labels = [soft_to_labels(s, first.shape, args.norm_mask) for s in soft[1:]]
        else:
            x = feats[0].flatten(1).T                                   # (h*w, D)
            lin = fit_linear(x, small.flatten().to(x.device), n_cls, F.cross_entropy, args.lp_steps,
                             args.lp_lr, args.lp_weight_decay, seed=args.seed)
            with torch.no_grad():
                logits = lin(feats[1:].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)      # (T-1, C, h, w)
                logits = F.interpolate(logits, size=first.shape, mode="bilinear", align_corners=False)
            labels = list(logits.argmax(1))
        t_prop += time.time() - t0
        n_frames += len(frames) - 1
        pred = [first] + [l.cpu().numpy() for l in labels]
        for fp, p in zip(frames, pred):
            write_indexed(os.path.join(args.out, seq, Path(fp).stem + ".png"), p, pal)
        if complete:
            preds[seq], gts[seq] = pred, gt
        else:
            print(f"{seq}: later annotations missing, written but not scored")
    metrics = davis_jf(preds, gts, void=args.void) if gts else {}
    metrics.update(sequences=len(seqs), scored=len(gts), frames_per_s=n_frames / max(t_prop, 1e-9))
    return metrics


def dense_items(args, root, split):
    """(image, target) path pairs of a split ('train' | 'val' | 'all') of a video-layout root:
    JPEGImages/480p/<v>/<f>.jpg + Normals/<v>/<f>.npz or Classes/<v>/<f>.png (the synthetic layout;
    NYUv2, COCO-Stuff, ADE20K go in the same layout with v = a split folder, see README).
    Held out: the videos of ImageSets/2017/val.txt vs train.txt if it exists, else the last --val-videos."""
    seqs, vf = davis_sequences(root)
    tr = os.path.join(root, "ImageSets", "2017", "train.txt")
    if split == "train":
        seqs = [l.strip() for l in open(tr) if l.strip()] if os.path.isfile(tr) else vf.videos[:-args.val_videos]
    elif split == "val" and not os.path.isfile(tr):
        seqs = vf.videos[-args.val_videos:]
    if any(v not in vf.videos for v in seqs):
        fail(f"{tr}: sequences without frames: {[v for v in seqs if v not in vf.videos][:5]}")
    sub, ext = ("Normals", ".npz") if args.cmd == "normals" else ("Classes", ".png")
    return [(fp, os.path.join(root, sub, v, Path(fp).stem + ext)) for v in seqs for fp in vf.frames(v)]


def load_target(path, cmd, reduce_zero_label=False):
    """Normals (H, W, 3) float32 unit (zero vector = invalid) or classes (H, W) int64 (255 ignore)."""
    if not os.path.isfile(path):
        fail(f"missing target {path}")
    if cmd == "semseg":
        lab = load_png(path)[0].astype(np.int64)
        if reduce_zero_label:  # ADE20K: 0 = "other" -> ignore, 1..150 -> 0..149
            lab = np.where(lab == 0, VOID, lab - 1)
        return lab
    try:
        n = np.load(path)["normals"]
    except Exception as e:  # noqa: BLE001
        fail(f"cannot read normals {path}: {e}")
    n = np.asarray(n, np.float32)
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    return np.where(norm > 0.5, n / np.maximum(norm, 1e-6), 0.0).astype(np.float32)


def target_at(tgt, size, cmd):
    """Target resized (nearest) to the feature size -> (N, 3) or (N,) torch."""
    t = torch.from_numpy(tgt)
    t = t.permute(2, 0, 1)[None].float() if cmd == "normals" else t[None, None].float()
    t = F.interpolate(t, size=size, mode="nearest-exact")[0]
    return t.flatten(1).T if cmd == "normals" else t[0].flatten().long()


def run_dense(args, lila):
    """normals / semseg: fit a linear probe on pixels of the train frames, score the held-out ones."""
    train = dense_items(args, args.train_data or args.data, "all" if args.train_data else "train")
    val = dense_items(args, args.data, "all" if args.train_data else "val")
    if not train or not val:
        fail(f"--data {args.data}: need train and held-out frames (got {len(train)} / {len(val)})")
    g = torch.Generator().manual_seed(args.seed)
    xs, ys = [], []
    for ip, tp in train:
        f = features(lila, load_rgb(ip), args)                          # (D, H, W)
        y = target_at(load_target(tp, args.cmd, args.reduce_zero_label), f.shape[-2:], args.cmd)
        x = f.flatten(1).T                                              # (H*W, D)
        ok = (y.norm(dim=-1) > 0.5) if args.cmd == "normals" else (y != VOID)
        x, y = x[ok], y[ok]
        sel = torch.randperm(x.shape[0], generator=g)[:args.pixels]
        xs.append(x[sel]), ys.append(y[sel])
    x, y = torch.cat(xs), torch.cat(ys).to(args.device)                 # (N, D), (N, ...)
    if args.cmd == "normals":
        lin = fit_linear(x, y, 3, lambda p, t: angular_error(p, t).mean(), args.probe_steps,
                         args.probe_lr, args.probe_weight_decay, args.batch, args.seed)
    else:
        n_cls = args.num_classes or int(y.max()) + 1
        lin = fit_linear(x, y, n_cls, F.cross_entropy, args.probe_steps, args.probe_lr,
                         args.probe_weight_decay, args.batch, args.seed)
        conf = torch.zeros(n_cls, n_cls, dtype=torch.long)
    errs = []
    for ip, tp in val:
        tgt = load_target(tp, args.cmd, args.reduce_zero_label)
        with torch.no_grad():
            f = features(lila, load_rgb(ip), args)                      # (D, H, W)
            out = lin(f.permute(1, 2, 0)).permute(2, 0, 1)[None]        # (1, 3 or C, H, W)
            out = F.interpolate(out, size=tgt.shape[:2], mode="bilinear", align_corners=False)[0]
        if args.cmd == "normals":
            t = torch.from_numpy(tgt).flatten(0, 1)                     # (N, 3)
            ok = t.norm(dim=-1) > 0.5
            errs.append(angular_error(out.flatten(1).T.cpu()[ok], t[ok]))
        else:
            t = torch.from_numpy(tgt).flatten()
            p = out.argmax(0).flatten().cpu()
            ok = (t != VOID) & (t < n_cls)
            conf += torch.bincount(t[ok] * n_cls + p[ok], minlength=n_cls * n_cls).view(n_cls, n_cls)
    m = {"train_frames": len(train), "eval_frames": len(val)}
    if args.cmd == "normals":
        e = torch.rad2deg(torch.cat(errs).double())
        m.update(rmse=e.pow(2).mean().sqrt().item(), mean=e.mean().item(), median=e.median().item(),
                 **{f"under_{t}": 100 * (e < t).double().mean().item() for t in (11.25, 22.5, 30)})
    else:
        tp_, union = conf.diag().double(), (conf.sum(0) + conf.sum(1) - conf.diag()).double()
        present = union > 0
        m.update(miou=100 * (tp_[present] / union[present]).mean().item(),
                 pixel_acc=100 * (tp_.sum() / conf.sum().clamp(min=1)).item(), classes=int(present.sum()))
    return m


@torch.no_grad()
def run_pca(args, lila):
    """PCA of the features of a folder of frames to RGB (fitted once on all frames); one PNG with
    the frames on top and their feature pictures below."""
    if not os.path.isdir(args.frames):
        fail(f"--frames {args.frames}: no such folder")
    names = sorted(n for n in os.listdir(args.frames) if n.lower().endswith((".jpg", ".jpeg", ".png")))
    if not names:
        fail(f"--frames {args.frames}: no .jpg/.png frames")
    names = [names[i] for i in np.linspace(0, len(names) - 1, min(args.max_frames, len(names))).round().astype(int)]
    rgb = [load_rgb(os.path.join(args.frames, n)) for n in names]
    feats = torch.stack([features(lila, x, args) for x in rgb])          # (T, D, H, W)
    T, D, H, W = feats.shape
    x = feats.permute(0, 2, 3, 1).reshape(-1, D)                        # (T*H*W, D)
    sub = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(args.seed))[:args.pca_samples]]
    mean = sub.mean(0)
    _, s, v = torch.linalg.svd(sub - mean, full_matrices=False)        # v (D, D) rows = components
    proj = (x - mean) @ v[:3].T                                         # (T*H*W, 3)
    lo, hi = torch.quantile(proj[:: max(1, proj.shape[0] // 100000)], torch.tensor([0.01, 0.99]), dim=0)
    img = ((proj - lo) / (hi - lo).clamp(min=1e-6)).clamp(0, 1).view(T, H, W, 3)
    pics = (img * 255).byte().cpu().numpy()
    top = np.concatenate([np.asarray(Image.fromarray(r).resize((W, H), Image.BILINEAR)) for r in rgb], 1)
    path = os.path.join(args.out, "pca.png")
    os.makedirs(args.out, exist_ok=True)
    Image.fromarray(np.concatenate([top, np.concatenate(list(pics), 1)], 0)).save(path)
    ev = (s[:3] ** 2 / (s ** 2).sum()).tolist()
    return {"frames": T, "png": path, "explained_variance": [round(e, 4) for e in ev]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="LILA evaluation probes (DESIGN.md section 3)")
    p.add_argument("cmd", choices=["vos-knn", "vos-lp", "normals", "semseg", "pca"])
    flags = [  # (group, flag, type, default, help); every paper setting is a flag with its default
        ("features", "--ckpt", str, "none", "train.py checkpoint, or 'none' = untrained decoder seeded by --seed"),
        ("features", "--features", str, "decoder", "decoder | encoder (frozen last tap upsampled: the baseline)"),
        ("features", "--weights", str, None, "encoder weights hub | none | PATH (default: the checkpoint's, else hub)"),
        ("features", "--backbone", str, "dinov2_vits14", "encoder without --ckpt (paper: dinov2_vits14)"),
        ("features", "--preset", str, "paper", "decoder preset without --ckpt (paper | tiny)"),
        ("features", "--seed", int, 0, "seeds the untrained decoder / encoder and the probes"),
        ("features", "--device", str, "cuda" if torch.cuda.is_available() else "cpu", "cpu | cuda"),
        ("features", "--size", int, 476, "short side of the input frames in px, multiple of 14 (paper 476)"),
        ("data", "--data", str, None, "DAVIS-layout root (vos-*; normals / semseg evaluation)"),
        ("data", "--frames", str, None, "pca: a folder of frames"),
        ("data", "--out", str, "out/probe", "output folder (results.json, PNGs)"),
        ("vos", "--grid", int, 60, "feature grid short side (paper 60)"),
        ("vos", "--context", int, 7, "latest soft predictions in the context, + the first frame (paper 7)"),
        ("vos", "--radius", int, 12, "neighbourhood radius in grid cells, 25x25 window (paper 12)"),
        ("vos", "--topk", int, 5, "neighbours kept over all context positions (paper 5)"),
        ("vos", "--temperature", float, 0.1, "softmax temperature on cosines (paper 0.1)"),
        ("vos", "--tile", int, 8, "query tile side of the local-window search (speed only)"),
        ("vos", "--norm-mask", int, 1, "DINO's per-channel min-max before argmax (1 | 0)"),
        ("vos", "--void", str, "background", "gt 255 in J&F: background (official) | ignore"),
        ("vos", "--lp-steps", int, 2000, "vos-lp AdamW steps (paper 2000)"),
        ("vos", "--lp-lr", float, 5e-4, "vos-lp learning rate (paper 5e-4)"),
        ("vos", "--lp-weight-decay", float, 1e-2, "vos-lp weight decay (not stated; torch default)"),
        ("dense probes", "--train-data", str, None, "root of the training frames (default: a split of --data)"),
        ("dense probes", "--val-videos", int, 1, "video layout without ImageSets train.txt: last N videos held out"),
        ("dense probes", "--pixels", int, 4096, "training pixels sampled per frame"),
        ("dense probes", "--probe-steps", int, 1000, "AdamW steps"),
        ("dense probes", "--probe-lr", float, 1e-3, "learning rate"),
        ("dense probes", "--probe-weight-decay", float, 1e-4, "weight decay"),
        ("dense probes", "--batch", int, 16384, "pixels per step (0 = all)"),
        ("dense probes", "--num-classes", int, 0, "semseg classes (0 = max train label + 1; COCO-Stuff 27, ADE20K 150)"),
        ("pca", "--max-frames", int, 8, "frames shown, evenly spaced"),
        ("pca", "--pca-samples", int, 200000, "pixels used to fit the PCA"),
    ]
    groups = {}
    for grp, flag, typ, default, help_ in flags:
        groups.setdefault(grp, p.add_argument_group(grp)).add_argument(flag, type=typ, default=default, help=help_)
    groups["dense probes"].add_argument("--reduce-zero-label", action="store_true", help="ADE20K: 0 = ignore, k -> k-1")
    args = p.parse_args(argv)
    if args.features not in ("decoder", "encoder") or args.void not in ("background", "ignore"):
        p.error("--features must be decoder | encoder, --void background | ignore")
    if args.size % 14:
        p.error(f"--size {args.size} must be a multiple of 14")
    if args.cmd == "pca" and not args.frames:
        p.error("pca needs --frames DIR")
    if args.cmd != "pca" and not args.data:
        p.error(f"{args.cmd} needs --data ROOT")
    if args.data and not os.path.isdir(args.data):
        p.error(f"--data {args.data}: no such folder")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    print("config:", json.dumps(vars(args)))
    lila, ck_cfg = build_model(args)
    run = {"vos-knn": run_vos, "vos-lp": run_vos, "normals": run_dense, "semseg": run_dense, "pca": run_pca}
    metrics = run[args.cmd](args, lila)
    print(f"{args.cmd}: " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump({"metrics": metrics, "config": vars(args), "ckpt_config": ck_cfg}, fh, indent=1)


if __name__ == "__main__":
    main()
