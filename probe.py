"""probe.py: the evaluation of LILA (Araslanov et al., CVPR 2026, "Experiments"): frozen
features scored by probes, as the official lila/eval_*.py, so that a GPU user with the weights
and datasets can reproduce the published tables.

The method, top to bottom:
  knn_rule      what k-NN propagation says a pixel's label is (DAVIS-2017 video object
                segmentation): the softmax-weighted labels of its 5 most similar positions
                within a 25 x 25 window of frame 0 and of the 7 latest frames (T = 0.1, on a
                feature grid of short side 60)
  propagate     that rule applied frame after frame, each prediction the next frames' context
  knn_step      the same numbers, less memory: the windows of a tile of queries at once
  davis_jf      J (region IoU), F (boundary F-measure) and J&F, as davis2017-evaluation
Below `# --- plumbing ---`: features, the per-sequence loops, the one-shot linear probe
(lp_sequence, eval_vos.py), the trainer's validation (davis_val), PCA pictures, the CLI.

Every probe reads the frozen encoder's last tapped layer (a LayerNormed h x w patch grid), the
decoder's pixel features, or both, and sums the two predictions (alpha_enc = alpha_dec = 1):
`--features full` is the paper's "+ LILA" row (the default with a trained --ckpt), `--features
encoder` its "DINOv2" row (the default with --ckpt none).

  vos-knn   DAVIS-2017 k-NN label propagation (eval_vosknn.py)
  vos-lp    DAVIS-2017 one-shot linear probe (eval_vos.py)
  normals   NYUv2 surface normals (eval_norml.py)          \
  semseg    COCO-Stuff-27, ADE20K (eval_seg.py)              > dense_probes.py
  zeroshot  COCO-Stuff, 15 unseen classes (eval_openseg.py) /
  pca       PCA pictures of the features of a folder of frames
Dataset layouts: evaldata.py. Differences from the official evaluation: GUIDE.md.

Shapes: T frames, H x W image, h x w feature grid, D feature dim, C labels (background +
objects, or classes), K context frames, s query tile side.

Commands (the GPU runbook, with times and the published numbers: GUIDE.md):
  python probe.py vos-knn  --data DAVIS --ckpt runs/x/ckpt.pt --out out/knn
  python probe.py normals  --data NYU --ckpt runs/x/ckpt.pt --out out/normals
  python probe.py zeroshot --data COCOSTUFF --text-embeddings coco_clip.npy --out out/zs
  python probe.py pca --frames DAVIS/JPEGImages/480p/bear --out out/pca
"""
import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

import evaldata
import extract
import dense_probes
import model
import runs

VOID = 255  # DAVIS / segmentation "void" or "ignore" label


# --- method: k-NN label propagation over local windows (official eval_vosknn.py) ---

def knn_rule(query, ctx, labels, radius=12, topk=5, temperature=0.1):
    """The definition. query (D, h, w) and ctx (K, D, h, w) L2-normalised features of frame t
    and of its K context frames, labels (K, C, h, w) the context's soft labels -> (C, h, w).
    A query pixel p's candidates are the positions q within +-radius rows and columns of p in
    each context frame (radius 12: a 25 x 25 window, eval.yaml attn_window; replicate-padded
    at the borders), scored by the cosine s(q) = f_t(p) . f_k(q). Its topk best N(p) vote:
        label_t(p) = sum_{q in N(p)} softmax_q(s(q) / T) label_k(q)     (topk 5, T = 0.1)
    Why a window: objects move little between frames, and far-away look-alikes stay out. Why
    the top 5 and a low T: a few confident matches decide, not an average over the window.
    This is the official unfold formulation; it holds every window of every pixel at once."""
    D, h, w = query.shape
    K, C = labels.shape[:2]
    win = 2 * radius + 1

    def windows(x):                                                    # (K, ch, h, w) -> (K, ch, win*win, h*w)
        return F.unfold(F.pad(x, (radius,) * 4, mode="replicate"), win).view(K, x.shape[1], win * win, h * w)
    keys, labs = windows(ctx), windows(labels)                         # (K, D | C, win^2, h*w)
    sim = torch.einsum("dn,kdjn->nkj", query.flatten(1), keys).reshape(h * w, K * win * win)  # cosines
    val, idx = sim.topk(topk, dim=1)                                   # (h*w, topk) the neighbours N(p)
    lab = labs.permute(3, 0, 2, 1).reshape(h * w, K * win * win, C)    # (h*w, K*win^2, C)
    lab = torch.gather(lab, 1, idx[..., None].expand(-1, -1, C))       # (h*w, topk, C)
    wgt = torch.softmax(val / temperature, dim=1)                      # (h*w, topk)
    return (wgt[..., None] * lab).sum(1).T.reshape(C, h, w)


def propagate(feats, first, n_context=7, step=None, progress=False, **step_kw):
    """The rule over a video. Frame 0's labels are given (first (C, h, w), soft); frame t's
    context is frame 0 and the n_context latest frames (7: eval.yaml context_size), with their
    predicted labels, so each prediction feeds the next frames. feats: one (T, D, h, w)
    L2-normalised tensor, or a list of them (feature sources, e.g. encoder and decoder; any
    device) -> (T, C, h, w). With several sources each propagates the shared context labels
    and the outputs are summed (alpha 1 each): the sum is frame t's prediction and later
    frames' context (official _predict_with_knn). step: knn_step (default) or knn_rule."""
    step = step or knn_step
    sources = [feats] if torch.is_tensor(feats) else list(feats)
    soft = [first]
    for t in tqdm(range(1, sources[0].shape[0]), desc="propagate", leave=False, disable=not progress):
        ids = [0] + list(range(max(1, t - n_context), t))              # frame 0 + the latest n_context
        ctx = torch.stack([soft[i] for i in ids])                      # (K, C, h, w)
        soft.append(sum(step(f[t].to(first.device), f[ids].to(first.device), ctx, **step_kw) for f in sources))
    return torch.stack(soft)


def knn_step(query, ctx, labels, radius=12, topk=5, temperature=0.1, tile=8):
    """knn_rule's numbers with less memory (same labels up to float ties; `python bench.py
    probe`). knn_rule holds every pixel's window, (h w) x K x (2r+1)^2 cosines and the unfolded
    keys; here queries go in s x s tiles, and a tile's keys are the (s + 2r)^2 block around it,
    each query masked to its own window. Arguments and result as knn_rule; tile: s (speed only)."""
    D, h, w = query.shape
    K, C = ctx.shape[0], labels.shape[1]
    s, r, S = tile, radius, tile + 2 * radius
    nty, ntx = -(-h // s), -(-w // s)
    ph, pw = nty * s - h, ntx * s - w
    q = F.pad(query, (0, pw, 0, ph))                                   # (D, nty*s, ntx*s), extra queries dropped
    pad = (r, r + pw, r, r + ph)
    kf = F.pad(ctx, pad, mode="replicate")                             # (K, D, h+2r+ph, w+2r+pw)
    kl = F.pad(labels, pad, mode="replicate")                          # (K, C, ...)
    # window mask inside one tile: key (ky, kx) of the block is within +-r of query (qy, qx)
    d = torch.arange(S, device=query.device)[None, :] - torch.arange(s, device=query.device)[:, None]
    win = (d >= 0) & (d <= 2 * r)                                      # (s, S)
    win = (win[:, None, :, None] & win[None, :, None, :]).reshape(1, s * s, 1, S * S)  # same for all K
    out = torch.empty(C, nty * s, ntx * s, device=query.device)
    for ty in range(nty):
        rows = slice(ty * s, ty * s + S)
        qt = q[:, ty * s:(ty + 1) * s].unfold(2, s, s)                 # (D, s, ntx, s)
        qt = qt.permute(2, 1, 3, 0).reshape(ntx, s * s, D)             # (ntx, s*s, D)
        kt = kf[:, :, rows].unfold(3, S, s)                            # (K, D, S, ntx, S)
        kt = kt.permute(3, 0, 2, 4, 1).reshape(ntx, K * S * S, D)      # (ntx, K*S*S, D)
        lt = kl[:, :, rows].unfold(3, S, s)                            # (K, C, S, ntx, S)
        lt = lt.permute(3, 0, 2, 4, 1).reshape(ntx, K * S * S, C)      # (ntx, K*S*S, C)
        sim = torch.bmm(qt, kt.transpose(1, 2)).view(ntx, s * s, K, S * S)
        sim = sim.masked_fill(~win, float("-inf")).view(ntx, s * s, K * S * S)
        val, idx = sim.topk(topk, dim=-1)                              # (ntx, s*s, k)
        wgt = torch.softmax(val / temperature, dim=-1)                 # (ntx, s*s, k)
        lab = torch.gather(lt[:, None].expand(-1, s * s, -1, -1), 2,
                           idx[..., None].expand(-1, -1, -1, C))       # (ntx, s*s, k, C)
        pred = (wgt[..., None] * lab).sum(2).view(ntx, s, s, C)        # (ntx, s, s, C)
        out[:, ty * s:(ty + 1) * s] = pred.permute(3, 1, 0, 2).reshape(C, s, ntx * s)
    return out[:, :h, :w]


def soft_to_labels(soft, size, norm_mask=False):
    """soft (C, h, w) -> (H, W) int labels: bilinear upsampling, argmax (official). norm_mask:
    DINO's per-channel min-max to [0, 1] first (eval_video_segmentation.py; not LILA's)."""
    up = F.interpolate(soft[None], size=size, mode="bilinear", align_corners=False)[0]  # (C, H, W)
    if norm_mask:
        lo, hi = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
        up = torch.where(hi > 0, (up - lo) / (hi - lo).clamp(min=1e-12), up)
    return up.argmax(0)


def grid_hw(H, W, short):
    """Feature grid of an H x W input: short side `short`, the other int(side * short /
    short_in) (official eval_vosknn._rescale_grid)."""
    return (short, int(W * short / H)) if H < W else (int(H * short / W), short)


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


# --- plumbing ---

def fail(msg):
    """Bad input the user can fix: cli() prints the whole message, without a traceback."""
    raise ValueError(f"probe.py: {msg}")


# --- plumbing: model and features ---

def read_checkpoint(args):
    """Model keyword arguments from --ckpt (a train.py or an official LILA checkpoint, read by
    hubconf.read_lila_checkpoint) or from the flags; the checkpoint's config; the checkpoint."""
    if args.ckpt == "none":
        return dict(backbone=args.backbone, weights=args.weights or "hub", preset=args.preset, seed=args.seed), None, None
    import hubconf
    try:
        ck = hubconf.read_lila_checkpoint(args.ckpt)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        fail(f"--ckpt {args.ckpt}: {str(e).replace('hubconf.py: ', '', 1)} (--ckpt none: an untrained decoder)")
    kw = dict(ck["build"])
    if args.weights and args.weights != kw["weights"]:
        print(f"note: --weights {args.weights} overrides the checkpoint's {kw['weights']}")
        kw["weights"] = args.weights
    return kw, ck["config"], ck


def build_model(kw, ck, device):
    """LILA on `device`: untrained (ck None) or the checkpoint's, strictly loaded by hubconf."""
    import hubconf
    import model as lila_model
    try:
        lila = (lila_model.build_lila(**kw) if ck is None else
                hubconf.load_lila(ck, kw["weights"], kw["preset"], kw["seed"]))
    except (ValueError, RuntimeError, FileNotFoundError, KeyError) as e:
        fail(f"cannot build the model {kw}: {e}")
    return lila.to(device).eval()


@torch.no_grad()
def encode(lila, img, features):
    """img (B, 3, H, W) in [0, 1] -> (encoder grid (B, E, h, w) or None, decoder (B, D, H, W) or
    None): the last tapped layer (LayerNormed) and the pixel features, as --features asks."""
    if features == "encoder":
        return lila.encode(img, taps=lila.taps[-1:])[0].float(), None
    enc, dec = lila(img)
    return (enc.float() if features == "full" else None), dec.float()


def load_frames(paths):
    """(T, H, W, 3) uint8 of a sequence; frames of another size are an error naming the file."""
    out = []
    for p in paths:
        out.append(evaldata.load_image(p))
        if out[-1].shape != out[0].shape:
            fail(f"{p}: frame is {out[-1].shape[1]}x{out[-1].shape[0]}, but {paths[0]} is "
                 f"{out[0].shape[1]}x{out[0].shape[0]} (frames of a sequence must share one size)")
    return np.stack(out)


def to_input(frames, size, patch):
    """(T, H, W, 3) uint8 -> (T, 3, H', W') float [0, 1] at short side `size`, sides multiples of
    the encoder's `patch`, bilinear without antialiasing (official PatchResample)."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    return F.interpolate(x, evaldata.patch_hw(*frames.shape[1:3], size, patch), mode="bilinear", align_corners=False)


def batches(x, args, desc):
    """Mini-batches of --encode-batch frames on the device, with a progress bar."""
    for i in tqdm(range(0, x.shape[0], args.encode_batch), desc=desc, leave=False, disable=not args.progress):
        yield x[i:i + args.encode_batch].to(args.device)


def write_indexed(path, labels, palette):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette(palette or [c for i in range(256) for c in ((i * 67) % 256, (i * 151) % 256, (i * 199) % 256)])
    try:
        im.save(path, format="PNG")
    except OSError as e:                     # a full disk: named, no partial mask left
        if os.path.exists(path):
            os.remove(path)
        raise runs.write_error(path, e, "the masks written before it are kept", "run the probe again") from None


# --- VOS: DAVIS-2017 (and DAVIS-2016) ---

def read_mask(path, shape=None):
    """(H, W) int64 object ids and kind ('indexed' | 'binary' 0/255); wrong kinds or sizes fail."""
    m, kind, pal = evaldata.read_label_png(path, binary=True)   # DAVIS-2016 0/255 too
    if shape is not None and m.shape != shape:
        fail(f"{path}: mask is {m.shape[1]}x{m.shape[0]}, but the sequence's first mask is {shape[1]}x{shape[0]}")
    return m, kind, pal


def prepare_vos(args):
    """Sequences; every first-frame mask must exist and be readable, and one must hold an
    object, before any work."""
    seqs, vf = evaldata.davis_sequences(args.data)
    if not seqs:
        fail(f"--data {args.data}: its ImageSets list names no sequence")
    empty = 0
    for seq in seqs:
        p = evaldata.davis_annotation(args.data, seq, vf.frames(seq)[0])
        if not os.path.isfile(p):
            fail(f"sequence {seq}: no first-frame mask {p} (expected DAVIS: Annotations/480p/<seq>/<frame>.png)")
        m = read_mask(p)[0]
        empty += int(np.where(m == VOID, 0, m).max() == 0)
    if empty == len(seqs):
        fail(f"--data {args.data}: no object in any first-frame mask ({empty} sequences; objects are "
             "ids 1..N of an indexed PNG, or 255 in a 0/255 DAVIS-2016 mask)")
    return seqs, vf


def knn_sequence(args, lila, x, first, n_cls):
    """Soft labels of frames 1..T-1 propagated from the first mask -> list of (H, W) labels."""
    gh, gw = grid_hw(*x.shape[-2:], args.grid)
    src = {}
    for b in batches(x, args, "features"):
        for name, f in zip(("encoder", "decoder"), encode(lila, b, args.features)):
            if f is not None:   # (B, D, gh, gw), kept on the CPU: a long sequence fits in memory
                f = F.interpolate(f, (gh, gw), mode="bilinear", align_corners=False)
                src.setdefault(name, []).append(F.normalize(f, dim=1).cpu())
    onehot = F.one_hot(torch.from_numpy(first), n_cls).permute(2, 0, 1).float()[None]  # (1, C, H, W)
    small = F.interpolate(onehot, (gh, gw), mode="bilinear", align_corners=False)[0]   # (C, gh, gw)
    soft = propagate([torch.cat(v) for v in src.values()], small.to(args.device), n_context=args.context,
                     radius=args.radius, topk=args.topk, temperature=args.temperature, tile=args.tile,
                     progress=args.progress)
    return [soft_to_labels(s, first.shape, args.norm_mask).cpu().numpy() for s in soft[1:]]


def lp_sequence(args, lila, x, first, n_cls):
    """A LinearHead (1x1 + 1x1) fitted on frame 0's mask, applied to frames 1..T-1."""
    enc0, dec0 = encode(lila, x[:1].to(args.device), args.features)
    torch.manual_seed(args.seed)
    head = dense_probes.LinearHead(enc0.shape[1] if enc0 is not None else 0,
                                   dec0.shape[1] if dec0 is not None else 0, n_cls).to(args.device)
    adam = torch.optim.Adam if args.lp_optimizer == "adam" else torch.optim.AdamW  # adam: the trainer's check
    opt = adam(head.parameters(), lr=args.lp_lr, weight_decay=args.lp_weight_decay)
    y = torch.from_numpy(first)[None].to(args.device)                  # (1, H, W)
    for _ in tqdm(range(args.lp_steps), desc="fit", leave=False, disable=not args.progress):  # frame 0 only
        loss = F.cross_entropy(head(enc0, dec0, first.shape), y)
        opt.zero_grad(), loss.backward(), opt.step()
    out = []
    with torch.no_grad():
        for b in batches(x[1:], args, "predict"):
            enc, dec = encode(lila, b, args.features)
            out += [p.cpu().numpy() for p in head(enc, dec, first.shape).argmax(1)]
    return out


def square_view(rgb, masks, side):
    """The official trainer's validation view (dataload.VideoDataset, SmallestMaxSize +
    CenterCrop): short side `side` (frames bilinear, masks nearest), the centre side x side."""
    H, W = rgb.shape[1:3]
    hw = grid_hw(H, W, side)
    x = F.interpolate(torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255, hw, mode="bilinear",
                      align_corners=False)                             # (T, 3, *hw)
    m = F.interpolate(torch.from_numpy(np.stack(masks))[:, None].float(), hw, mode="nearest")[:, 0]
    top, left = (hw[0] - side) // 2, (hw[1] - side) // 2
    return x[..., top:top + side, left:left + side], m[:, top:top + side, left:left + side].long().numpy()


def vos_sequence(args, lila, vf, seq, square=None):
    """One DAVIS sequence -> (frame paths, predicted (H, W) label maps with the first mask first,
    ground-truth maps or None, palette, mask kind). square: the trainer's square view instead of
    the short side args.size."""
    frames = vf.frames(seq)
    paths = [evaldata.davis_annotation(args.data, seq, fp) for fp in frames]
    first, kind, pal = read_mask(paths[0])
    first = np.where(first == VOID, 0, first)                          # (H, W), void -> background
    rgb = load_frames(frames)                                          # (T, H, W, 3)
    if rgb.shape[1:3] != first.shape:
        fail(f"{paths[0]}: mask is {first.shape[1]}x{first.shape[0]} but frame {frames[0]} is {rgb.shape[2]}x{rgb.shape[1]}")
    complete = all(os.path.isfile(p) for p in paths)                   # DAVIS test sets: first frame only
    gt = [first] + [read_mask(p, first.shape)[0] for p in paths[1:]] if complete else None
    if square:
        x, m = square_view(rgb, gt or [first], square)
        first, gt = m[0], list(m) if gt else None
    else:
        x = to_input(rgb, args.size, lila.patch)                       # (T, 3, H', W')
    run = knn_sequence if args.cmd == "vos-knn" else lp_sequence
    pred = [first] + run(args, lila, x, first, int(first.max()) + 1)
    return frames, pred, gt, pal, kind


def run_vos(args, lila, plan):
    """vos-knn / vos-lp over the DAVIS sequences; writes OUT/<seq>/<frame>.png; J, F, J&F."""
    seqs, vf = plan
    preds, gts, kinds, t_prop, n_frames = {}, {}, set(), 0.0, 0
    skipped = {"two_frames": 0, "no_object": 0, "later_masks_missing": 0}
    bar = tqdm(seqs, desc=args.cmd, unit="seq", disable=not args.progress)   # on stderr, also without a tty
    for seq in bar:
        bar.set_postfix_str(seq)
        t0 = time.time()
        frames, pred, gt, pal, kind = vos_sequence(args, lila, vf, seq)
        t_prop += time.time() - t0
        n_frames += len(frames) - 1
        kinds.add(kind)
        for fp, p in zip(frames, pred):
            write_indexed(os.path.join(args.out, seq, Path(fp).stem + ".png"), p, pal)
        why = ("later_masks_missing" if gt is None else "two_frames" if len(frames) < 3
               else "no_object" if pred[0].max() == 0 else None)
        if why:
            skipped[why] += 1
            print(f"{seq}: not scored ({why.replace('_', ' ')}; J&F scores frames 1..T-2 of the first mask's objects)")
        else:
            preds[seq], gts[seq] = pred, gt
    if "binary" in kinds:
        print("masks: 0/255 grayscale (DAVIS-2016): one object per sequence")
    metrics = davis_jf(preds, gts, void=args.void) if gts else {}
    metrics.update(sequences=len(seqs), scored=len(gts), objects=sum(int(g[0].max()) for g in gts.values()),
                   masks="binary (DAVIS-2016)" if "binary" in kinds else "indexed (DAVIS-2017)",
                   not_scored=sum(skipped.values()), skipped=skipped,     # the count on the summary line
                   frames_per_s=n_frames / max(t_prop, 1e-9))
    return metrics


# The 6 DAVIS-2017 val sequences the official trainer scores every epoch (configs/train_ytvos.yaml eval_vos)
TRAIN_VAL_SEQUENCES = ("bike-packing", "india", "dog", "motocross-jump", "shooting", "horsejump-high")


def davis_val_plan(root, videos=6, kind="lp", size=None, device="cpu", progress=False, **flags):
    """What davis_val scores, checked before any work (train.py calls it before step 1): the
    settings, the sequences picked, and those that cannot be scored, {name: why}. Every frame
    and mask of a picked sequence is opened and every mask read: a damaged or missing file is
    an error naming it now, not at the first validation. Arguments: davis_val's."""
    cmd = {"lp": "vos-lp", "knn": "vos-knn"}.get(kind) or fail(f"davis_val: kind {kind!r}: lp | knn")
    if not os.path.isdir(root) or not (isinstance(videos, int) and videos >= 1):
        fail(f"davis_val: {root}: no such folder" if not os.path.isdir(root) else f"davis_val: videos {videos}: >= 1")
    try:
        args = parse_args([cmd, "--data", str(root), "--device", str(device), "--features", "decoder"])
    except SystemExit:                      # argparse already printed why; the caller gets an error
        fail(f"davis_val: cannot evaluate on {root} with device {device}")
    args.progress, args.size = progress, size or 224
    if kind == "lp":
        args.lp_optimizer, args.lp_lr = "adam", 3e-4                  # EvalVOS.fit: Adam(lr 3e-4, wd 1e-4)
    for k, v in flags.items():
        if not hasattr(args, k):
            fail(f"davis_val: unknown setting {k}")
        setattr(args, k, v)
    seqs, vf = prepare_vos(args)
    official = [s for s in TRAIN_VAL_SEQUENCES if s in seqs]
    pick = (official if len(official) == len(TRAIN_VAL_SEQUENCES) else seqs)[:videos]
    unscored = {}
    for seq in pick:
        frames = vf.frames(seq)
        paths = [evaldata.davis_annotation(args.data, seq, fp) for fp in frames]
        first = read_mask(paths[0])[0]
        for fp in frames:                   # the header only: a frame's size, cheaply
            try:
                with Image.open(fp) as im:
                    wh = im.size
            except (OSError, ValueError) as e:
                fail(f"{fp}: not a readable picture ({e})")
            if wh != first.shape[::-1]:
                fail(f"{fp}: frame is {wh[0]}x{wh[1]}, but its first mask {paths[0]} is "
                     f"{first.shape[1]}x{first.shape[0]}")
        if not all(os.path.isfile(p) for p in paths):
            unscored[seq] = "later masks missing"
        elif len(frames) < 3:
            unscored[seq] = "under 3 frames"
        else:
            for p in paths[1:]:
                read_mask(p, first.shape)
            if np.where(first == VOID, 0, first).max() == 0:
                unscored[seq] = "no object in the first mask"
    if len(unscored) == len(pick):
        fail(f"davis_val: --val {root}: none of {pick} can be scored ({unscored}; each needs >= 3 "
             "frames, every mask, and an object in its first mask)")
    return dict(args=args, vf=vf, pick=pick, unscored=unscored)


def davis_val(lila, root, videos=6, kind="lp", size=None, device="cpu", progress=False, plan=None, **flags):
    """DAVIS-2017 val J&F of a decoder-only probe, for validation during training, through the
    code of `probe.py vos-lp | vos-knn`. kind "lp" is the official trainer's check (train_lila.py
    EvalVOS): a 1x1 probe on the decoder fitted on frame 0 by 2000 full-batch Adam steps (lr 3e-4,
    L2 1e-4), on 224 x 224 centre views (size=None: 224) of the 6 sequences of
    TRAIN_VAL_SEQUENCES when the root has them (else the first `videos` of its val list); "knn"
    propagates with vos-knn's defaults on the same views. flags: any other probe.py setting
    (e.g. lp_steps=20); plan: davis_val_plan's, made once. -> dict(jf, j, f, sequences=[scored
    names], unscored={name: why}): a sequence that cannot be scored is left out of the mean and
    named there."""
    plan = plan or davis_val_plan(root, videos, kind, size, device, progress, **flags)
    args, vf, unscored = plan["args"], plan["vf"], dict(plan["unscored"])
    was = lila.training
    lila.eval()
    try:
        preds, gts = {}, {}
        for seq in tqdm([s for s in plan["pick"] if s not in unscored], desc=f"val {kind}",
                        leave=False, disable=not progress):
            frames, pred, gt, _, _ = vos_sequence(args, lila, vf, seq, square=args.size)
            if pred[0].max() > 0:
                preds[seq], gts[seq] = pred, gt
            else:                           # the centre view can crop the object away
                unscored[seq] = "no object in the first mask's centre view"
    finally:
        lila.train(was)
    if not gts:
        fail(f"davis_val: --val {root}: none of {plan['pick']} can be scored ({unscored})")
    m = davis_jf(preds, gts)
    return dict(jf=m["JF"], j=m["J"], f=m["F"], sequences=sorted(gts), unscored=unscored)


# --- PCA pictures ---

def prepare_pca(args):
    if not os.path.isdir(args.frames):
        fail(f"--frames {args.frames}: no such folder")
    names = sorted((n for n in os.listdir(args.frames) if n.lower().endswith((".jpg", ".jpeg", ".png"))),
                   key=evaldata.natural_key)                      # 2.jpg before 10.jpg
    if not names:
        fail(f"--frames {args.frames}: no .jpg/.png frames")
    pick = np.linspace(0, len(names) - 1, min(args.max_frames, len(names))).round().astype(int)
    return [os.path.join(args.frames, names[i]) for i in pick]


@torch.no_grad()
def run_pca(args, lila, paths):
    """One PNG: the frames on top, below them one row per feature source (encoder grid,
    decoder), each the first 3 principal components (fitted on all frames) as RGB; rows
    labelled on the left, extract.GAP white px between frames and between rows."""
    rgb = load_frames(paths)
    x = to_input(rgb, args.size, lila.patch)                            # (T, 3, H, W)
    T, _, H, W = x.shape
    src = {}
    for b in batches(x, args, "features"):
        for name, f in zip(("encoder", "decoder"), encode(lila, b, args.features)):
            if f is not None:
                src.setdefault(name, []).append(f.cpu())
    rows, ev = [[np.asarray(Image.fromarray(r).resize((W, H), Image.BILINEAR)) for r in rgb]], {}
    for name, f in src.items():
        f = torch.cat(f)                                                 # (T, D, h, w)
        pca = extract.fit_pca(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), 3, args.pca_samples, args.seed)
        img = extract.pca_rgb(f, pca).permute(0, 3, 1, 2).float()       # (T, 3, h, w) in 0..255
        img = F.interpolate(img, (H, W), mode="bilinear", align_corners=False)  # (T, 3, H, W)
        rows.append(list(img.round().byte().permute(0, 2, 3, 1).numpy()))   # T x (H, W, 3)
        ev[name] = [round(e, 4) for e in pca["explained"].tolist()]
    labels, gap, left = ["frames"] + [f"{n} PCA" for n in src], extract.GAP, PCA_LABEL_W
    canvas = Image.new("RGB", (left + T * (W + gap) - gap, len(rows) * (H + gap) - gap), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, row) in enumerate(zip(labels, rows)):       # ASCII labels: PIL's built-in font
        draw.text((2, r * (H + gap) + 2), label, fill=(0, 0, 0))
        for t, cell in enumerate(row):
            canvas.paste(Image.fromarray(cell), (left + t * (W + gap), r * (H + gap)))
    path = os.path.join(args.out, "pca.png")
    os.makedirs(args.out, exist_ok=True)
    runs.save_picture(canvas, path)
    return {"frames": T, "png": path, "rows": ["frames"] + list(src), "explained_variance": ev}


# --- command line ---

PCA_LABEL_W = 84  # px left of pca.png's rows for their labels ("decoder PCA" in PIL's font)
DEFAULT_SIZE = {"vos-knn": 476, "vos-lp": 476, "pca": 476, "normals": 504, "semseg": 224, "zeroshot": 224}
TRAIN_SIZE = {"normals": 448, "semseg": 224, "zeroshot": 224}       # official crops
HEADS = {"normals": ("conv", "linear"), "semseg": ("attention", "linear"), "zeroshot": ("zeroshot",)}
WEIGHT_DECAY = {"normals": 1e-2, "semseg": 1e-2, "zeroshot": 1e-5}   # AdamW default / eval.yaml
COMMANDS = {  # subcommand -> (its line in `probe.py --help`, its description in `probe.py SUBCOMMAND --help`)
    "vos-knn": ("DAVIS-2017 k-NN label propagation (official eval_vosknn.py)",
                "Video object segmentation without training: frame after frame, each pixel takes the softmax-"
                "weighted labels of its most similar feature-grid positions in frame 0 and the latest predicted "
                "frames (knn_rule). Scored by J&F on the DAVIS-2017 validation videos; OUT/results.json."),
    "vos-lp": ("DAVIS-2017 one-shot linear probe (official eval_vos.py)",
               "Video object segmentation by a linear head fitted on each video's first frame and mask alone, "
               "then applied to the later frames. Scored by J&F on the DAVIS-2017 validation videos; "
               "OUT/results.json."),
    "normals": ("NYUv2 surface normals (official eval_norml.py)",
                "A probe on the frozen features trained to predict surface normals (official protocol: augmented "
                "crops, the best epoch; fast: a linear head on sampled pixels). Scored by the angular RMSE in "
                "degrees; OUT/results.json, resumable through OUT/probe_state.pt."),
    "semseg": ("semantic segmentation: COCO-Stuff-27, ADE20K (official eval_seg.py)",
               "A probe on the frozen features trained to label every pixel (official protocol: augmented crops, "
               "the best epoch; fast: a linear head on sampled pixels). Scored by mIoU; OUT/results.json, "
               "resumable through OUT/probe_state.pt."),
    "zeroshot": ("zero-shot COCO-Stuff, 15 unseen classes (official eval_openseg.py)",
                 "A probe mapping the frozen features to CLIP text embeddings, trained on the seen classes only. "
                 "Scored by the mIoU of the seen and of the unseen classes and their harmonic mean; "
                 "OUT/results.json, resumable through OUT/probe_state.pt."),
    "pca": ("PCA pictures of the features of a folder of frames",
            "One PNG in OUT: the frames on top, below them one row per feature source (encoder grid, decoder), "
            "each the first 3 principal components, fitted on all frames, as RGB."),
}
GROUP = {"vos-knn": "vos", "vos-lp": "vos", "pca": "pca"}   # a command's own group of FLAGS; else "dense probes"
ONLY = {  # flags for some commands of their group only; the others apply to every command of their group
    "--data": tuple(c for c in COMMANDS if c != "pca"), "--frames": ("pca",),
    **dict.fromkeys(("--grid", "--context", "--radius", "--topk", "--temperature", "--tile", "--norm-mask"), ("vos-knn",)),
    **dict.fromkeys(("--lp-steps", "--lp-lr", "--lp-weight-decay"), ("vos-lp",)),
    **dict.fromkeys(("--pixels", "--probe-steps", "--pixel-batch"), ("normals", "semseg")),   # fast protocol
    **dict.fromkeys(("--train-list", "--val-list", "--num-classes", "--reduce-zero-label"), ("semseg", "zeroshot")),
    **dict.fromkeys(("--text-embeddings", "--unseen"), ("zeroshot",)),
}
SHOWN = {"--size": DEFAULT_SIZE, "--train-size": TRAIN_SIZE, "--probe-weight-decay": WEIGHT_DECAY,
         "--head": {c: h[0] for c, h in HEADS.items()}}   # defaults resolved per command, shown in its help

FLAGS = [  # (group, flag, type, default, help); every paper setting is a flag with its default
    ("features", "--ckpt", str, "none", "train.py checkpoint, or 'none' = untrained decoder seeded by --seed"),
    ("features", "--features", str, None, "full (encoder + decoder, summed: the paper's '+ LILA' rows) | "
     "decoder | encoder (the last tapped layer: the 'DINOv2' rows). Default: full with --ckpt, encoder with --ckpt none"),
    ("features", "--weights", str, None, "encoder weights hub | none | PATH (default: the checkpoint's, else hub)"),
    ("features", "--backbone", str, "dinov2_vits14", "encoder without --ckpt (paper: dinov2_vits14)"),
    ("features", "--preset", str, "paper", "decoder preset without --ckpt (paper | tiny)"),
    ("features", "--seed", int, 0, "seeds the untrained decoder / encoder and the probes"),
    ("features", "--device", str, "cuda" if torch.cuda.is_available() else "cpu", "cpu | cuda"),
    ("features", "--size", int, None, "input short side (VOS, pca) or evaluation crop (dense), px, multiple of the patch (14 DINOv2, 16 DINOv3); "
     "official: VOS 476, normals 504, semseg / zeroshot 224"),
    ("features", "--encode-batch", int, 8, "frames per forward pass of the frozen model (memory only)"),
    ("data", "--data", str, None, "dataset root (layouts: evaldata.py); vos-*: DAVIS-2017 / DAVIS-2016"),
    ("data", "--frames", str, None, "pca: a folder of frames"),
    ("data", "--out", str, "out/probe", "output folder (results.json, PNGs, probe_state.pt)"),
    ("vos", "--grid", int, 60, "k-NN feature grid short side (paper 60)"),
    ("vos", "--context", int, 7, "latest predictions in the k-NN context, + the first frame (paper 7)"),
    ("vos", "--radius", int, 12, "k-NN neighbourhood radius in grid cells, 25x25 window (paper 12)"),
    ("vos", "--topk", int, 5, "neighbours kept over all context positions (paper 5)"),
    ("vos", "--temperature", float, 0.1, "softmax temperature on cosines (paper 0.1)"),
    ("vos", "--tile", int, 8, "query tile side of the local-window search (speed only)"),
    ("vos", "--norm-mask", int, 0, "1: DINO's per-channel min-max before argmax (official LILA: 0)"),
    ("vos", "--void", str, "background", "gt 255 in J&F: background (official) | ignore"),
    ("vos", "--lp-steps", int, 2000, "vos-lp AdamW full-batch steps on the first frame (paper 2000)"),
    ("vos", "--lp-lr", float, 5e-4, "vos-lp learning rate (paper 5e-4)"),
    ("vos", "--lp-weight-decay", float, 1e-4, "vos-lp weight decay (official eval.yaml 1e-4)"),
    ("dense probes", "--protocol", str, "official", "official: the paper's training on augmented crops, best "
     "epoch | fast: features of whole frames once, a linear head on sampled pixels (quick check)"),
    ("dense probes", "--head", str, None, "normals conv (1x1 enc + 5x5 dec, official) | linear; semseg "
     "attention (official) | linear; zeroshot: fixed. --protocol fast: linear"),
    ("dense probes", "--train-data", str, None, "video layout: root of the training frames (default: a split of --data)"),
    ("dense probes", "--val-videos", int, 1, "video layout without ImageSets/2017/train.txt: last N videos held out"),
    ("dense probes", "--train-list", str, None, "COCO-Stuff: image ids of the training split (.txt, or .npy of file names)"),
    ("dense probes", "--val-list", str, None, "COCO-Stuff: image ids of the evaluation split"),
    ("dense probes", "--epochs", int, 10, "official: epochs (paper 10)"),
    ("dense probes", "--batch", int, 96, "official: crops per AdamW step (paper 96); also the evaluation batch"),
    ("dense probes", "--micro-batch", int, 0, "official: split a step into micro-batches (memory; same loss; "
     "0 = whole batch; zeroshot's BatchNorm then sees micro-batch statistics)"),
    ("dense probes", "--train-size", int, None, "official: training crop side (paper: normals 448, semseg 224; "
     "default: --size when given)"),
    ("dense probes", "--repeat", int, None, "official: passes over the training set per epoch (official: normals 10, else 1)"),
    ("dense probes", "--workers", int, None, "DataLoader workers (default 4 on cuda, 0 on cpu)"),
    ("dense probes", "--save-every", int, 200, "official: steps between resumable saves of OUT/probe_state.pt"),
    ("dense probes", "--probe-lr", float, 1e-3, "AdamW learning rate (paper 1e-3)"),
    ("dense probes", "--probe-weight-decay", float, None, "AdamW weight decay (official: normals / semseg 1e-2, "
     "zeroshot 1e-5; fast: 1e-4)"),
    ("dense probes", "--pixels", int, 4096, "fast: training pixels sampled per frame"),
    ("dense probes", "--probe-steps", int, 1000, "fast: AdamW steps"),
    ("dense probes", "--pixel-batch", int, 16384, "fast: pixels per step (0 = all)"),
    ("dense probes", "--num-classes", int, 0, "semseg on the video layout: classes (0 = max label + 1)"),
    ("dense probes", "--text-embeddings", str, None, "zeroshot: (classes, 512) CLIP text embeddings .npy / .pt "
     "(default: computed with a CLIP package)"),
    ("dense probes", "--unseen", str, None, "zeroshot: comma-separated unseen class ids (COCO-Stuff: the 15 of SPNet)"),
    ("pca", "--max-frames", int, 8, "frames shown, evenly spaced"),
    ("pca", "--pca-samples", int, 200000, "pixels used to fit the PCA"),
]

POSITIVE, NONNEG = (lambda v: v is None or v > 0, "> 0"), (lambda v: v is None or v >= 0, ">= 0")
RANGES = {  # flag -> (ok, what it must be); None = resolved later
    **{k: POSITIVE for k in ("size", "train_size")},  # and whole patches of the backbone: fit_patch
    **{k: POSITIVE for k in ("encode_batch", "grid", "topk", "temperature", "tile", "lp_steps", "lp_lr", "epochs",
                             "batch", "repeat", "save_every", "probe_lr", "pixels", "probe_steps", "max_frames")},
    **{k: NONNEG for k in ("context", "radius", "lp_weight_decay", "val_videos", "micro_batch", "workers",
                           "probe_weight_decay", "pixel_batch", "num_classes")},
    "norm_mask": (lambda v: v in (0, 1), "0 or 1"), "pca_samples": (lambda v: v >= 3, ">= 3 (three components)"),
}
UPPER = {  # flag -> (largest value that can be right, why): beyond it a probe runs for hours into many GB
    "size": (2016, "4x the official 504; an input side costs its square in memory"), "train_size": (2016, "as --size"),
    "grid": (256, "4x the paper's 60; k-NN time and memory grow with its square"),
    "radius": (32, "a 65x65 window, 7x the paper's 25x25; the cost grows with its square"),
    "context": (64, "9x the paper's 7 frames"), "tile": (64, "speed only; larger tiles only cost memory"),
    "topk": (1000, "the paper keeps 5"), "encode_batch": (1024, "frames per forward pass"),
    "num_classes": (1024, "no benchmark here has more than 182 classes"), "lp_steps": (100000, "the paper's 2000 x 50"),
    "epochs": (1000, "the paper's 10 x 100"), "batch": (4096, "the paper's 96 x 40"), "probe_steps": (1000000, "fast protocol"),
    "pixels": (1000000, "more pixels than a 1000x1000 frame"), "max_frames": (64, "one row of a picture"),
    "pca_samples": (10000000, "a 3-component PCA is settled long before"), "workers": (64, "DataLoader processes"),
}


def parse_args(argv=None):
    """Flags, every numeric one range-checked and every default resolved before any work. Each
    subcommand's help shows what it does and its own options with their defaults; every subcommand
    accepts every flag, as before (those of other subcommands are ignored)."""
    common = " ".join(f for g, f, *_ in FLAGS if g == "features")
    p = argparse.ArgumentParser(prog="probe.py", description="LILA evaluation probes (the official protocol)",
                                epilog=f"`python probe.py SUBCOMMAND --help`: what it does, its options and their "
                                       f"defaults. Every subcommand takes {common} --out.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND", title="subcommands")
    for cmd, (line, text) in COMMANDS.items():
        s = sub.add_parser(cmd, help=line, description=text)
        groups = {}
        for grp, flag, typ, default, help_ in FLAGS + [("dense probes", "--reduce-zero-label", None, False,
                                                        "video layout: label 0 = ignore, k -> k-1 (ADE20K's convention)")]:
            mine = cmd in ONLY[flag] if flag in ONLY else grp in ("features", "data", GROUP.get(cmd, "dense probes"))
            shown = SHOWN.get(flag, {}).get(cmd, default)
            help_ = (help_ + ("" if shown is None or shown is False else f" (default: {shown})")) if mine else argparse.SUPPRESS
            kw = dict(action="store_true") if typ is None else dict(type=typ, default=default)
            groups.setdefault(grp, s.add_argument_group(grp)).add_argument(flag, help=help_, **kw)
    a = p.parse_args(argv)
    for name, (ok, what) in RANGES.items():
        v = getattr(a, name)
        if (isinstance(v, float) and not math.isfinite(v)) or not ok(v):
            p.error(f"--{name.replace('_', '-')} {v}: must be {what}")
    for name, (top, why) in UPPER.items():
        if getattr(a, name) is not None and getattr(a, name) > top:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)}: at most {top} ({why})")
    if a.topk > (2 * a.radius + 1) ** 2:
        p.error(f"--topk {a.topk}: above the {(2 * a.radius + 1) ** 2} candidates of one context frame's "
                f"{2 * a.radius + 1}x{2 * a.radius + 1} window (--radius {a.radius})")
    for flag, v, choices in (("--features", a.features, ("full", "decoder", "encoder", None)),
                             ("--void", a.void, ("background", "ignore")),
                             ("--protocol", a.protocol, ("official", "fast"))):
        if v not in choices:
            p.error(f"{flag} {v}: choose from {' | '.join(c for c in choices if c)}")
    if a.device != "cpu" and not (a.device.startswith("cuda") and torch.cuda.is_available()):
        p.error(f"--device {a.device}: " + ("no CUDA device here" if a.device.startswith("cuda") else "cpu | cuda"))
    if a.cmd == "pca" and not a.frames:
        p.error("pca needs --frames DIR")
    if a.cmd != "pca" and not a.data:
        p.error(f"{a.cmd} needs --data ROOT")
    for flag, v in (("--data", a.data), ("--train-data", a.train_data)):
        if v and not os.path.isdir(v):
            p.error(f"{flag} {v}: no such folder")
    for flag, v in (("--train-list", a.train_list), ("--val-list", a.val_list), ("--text-embeddings", a.text_embeddings)):
        if v and not os.path.isfile(v):
            p.error(f"{flag} {v}: no such file")
    if not a.out.strip():
        p.error("--out is empty; give a folder")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        p.error(f"--out {a.out} is a file; give a folder")
    up = os.path.dirname(os.path.abspath(a.out))   # found now, not after the probe has run
    while not os.path.exists(up):
        up = os.path.dirname(up)
    if not os.path.isdir(up):
        p.error(f"--out {a.out}: cannot create the folder ({up} is a file)")
    if a.train_data and os.path.realpath(a.train_data) == os.path.realpath(a.data):
        p.error(f"--train-data {a.train_data} is --data: the probe would be scored on its training frames")
    try:
        a.unseen = tuple(int(c) for c in a.unseen.split(",")) if a.unseen else None
    except ValueError:
        p.error(f"--unseen {a.unseen}: expected comma-separated class ids, e.g. 20,24,32")
    # resolved defaults (the official protocol's, per command)
    a.features = a.features or ("full" if a.ckpt != "none" else "encoder")
    a.progress, a.lp_optimizer = True, "adamw"     # davis_val: quiet; the official trainer's Adam
    a.ckpt_sha256 = a.weights_sha256 = None         # the checkpoint's content: main() reads it
    size_given = a.size is not None
    a.sides_given = {k for k in ("size", "train_size") if getattr(a, k) is not None}
    a.size = a.size or DEFAULT_SIZE[a.cmd]
    if a.cmd in HEADS:
        a.train_size = a.train_size or (a.size if size_given else TRAIN_SIZE[a.cmd])
        allowed = ("linear",) if a.protocol == "fast" else HEADS[a.cmd]
        a.head = a.head or allowed[0]
        if a.head not in allowed:
            p.error(f"--head {a.head}: {a.cmd} with --protocol {a.protocol} takes {' | '.join(allowed)}")
        if a.cmd == "zeroshot" and a.protocol == "fast":
            p.error("zeroshot runs the official protocol only")
        if a.probe_weight_decay is None:
            a.probe_weight_decay = 1e-4 if a.protocol == "fast" else WEIGHT_DECAY[a.cmd]
        if a.workers is None:
            a.workers = 4 if a.device.startswith("cuda") else 0
    if a.ckpt == "none" and a.backbone in model.BACKBONES:  # a checkpoint's backbone: run_probe
        fit_patch(a, p.error)
    return a


def fit_patch(a, error):
    """--size and --train-size in whole patches of a.backbone (14 px DINOv2, 16 DINOv3): a value
    given that is not is an error; a default (the official sizes are for patch 14) is rounded
    to the nearest multiple."""
    patch = model.BACKBONES[a.backbone].patch
    for name in ("size", "train_size"):
        v = getattr(a, name, None)
        if v is None or v % patch == 0:
            continue
        if name in a.sides_given:
            error(f"--{name.replace('_', '-')} {v}: must be a positive multiple of {patch} (the patch of {a.backbone})")
        setattr(a, name, max(patch, round(v / patch) * patch))


def summary(metrics):
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                     if isinstance(v, (int, float, str)))


def keep_previous(out):
    """What an earlier probe wrote in OUT (results.json, pictures, predicted masks) is never
    replaced by this one's: it moves, all together, to OUT/earlier.N/ (N the first free number),
    and the move is said. probe_state.pt stays: a dense probe resumes from it (with the same
    settings only)."""
    names = sorted(n for n in os.listdir(out) if n not in (".lock", "probe_state.pt")
                   and not re.fullmatch(r"earlier\.\d+", n))
    if not names:
        return
    n = 1
    while os.path.exists(os.path.join(out, f"earlier.{n}")):
        n += 1
    dest = os.path.join(out, f"earlier.{n}")
    try:
        os.makedirs(dest)
        for name in names:
            os.replace(os.path.join(out, name), os.path.join(dest, name))
    except OSError as e:
        fail(f"--out {out}: cannot keep the earlier probe's files in {dest} ({e.strerror or e}); "
             "pass another --out")
    print(f"note: {out} held an earlier probe's files ({', '.join(names[:4])}"
          f"{' ...' if len(names) > 4 else ''}): kept together in {dest}")


def main(argv=None):
    args = parse_args(argv)
    folder = runs.RunFolder(args.out, "probe.py")   # one probe per --out: a second is refused
    folder.acquire()
    try:
        return run_probe(args)
    finally:
        folder.release()


def run_probe(args):
    kw, ck_cfg, state = read_checkpoint(args)
    # The probe state (dense_probes' resume) is keyed by the content of every input file (a
    # checkpoint given as a URL: its downloaded copy), not by its name
    args.backbone, args.preset, args.weights = kw["backbone"], kw["preset"], kw["weights"]  # --ckpt decides
    if args.backbone in model.BACKBONES:
        fit_patch(args, fail)
        args.patch = model.BACKBONES[args.backbone].patch  # dense_probes: inputs of whole patches
    files = {"ckpt": state["path"] if state else None, "weights": args.weights, "train_list": args.train_list,
             "val_list": args.val_list, "text_embeddings": args.text_embeddings}
    args.ckpt_sha256 = model.file_sha256(files["ckpt"]) if files["ckpt"] else None
    args.weights_sha256 = model.file_sha256(args.weights) if os.path.isfile(args.weights) else None
    args.inputs_sha256 = {k: model.file_sha256(p) for k, p in files.items()
                          if k not in ("ckpt", "weights") and p and os.path.isfile(p)}
    prepare = {"vos-knn": prepare_vos, "vos-lp": prepare_vos, "pca": prepare_pca}.get(args.cmd, dense_probes.prepare)
    plan = prepare(args)                                # dataset checks before the model is built
    groups = {"features", "data", {"vos-knn": "vos", "vos-lp": "vos", "pca": "pca"}.get(args.cmd, "dense probes")}
    keep = {f[1][2:].replace("-", "_") for f in FLAGS if f[0] in groups} | {"cmd", "reduce_zero_label", "ckpt_sha256"}
    config = {**{k: v for k, v in vars(args).items() if k in keep}, "model_seed": kw["seed"]}
    print("config:", json.dumps(config))                # the configuration actually used, once
    torch.manual_seed(args.seed)
    lila = build_model(kw, state, args.device)
    keep_previous(args.out)             # every input is checked: now this probe may write
    if args.cmd in ("normals", "semseg", "zeroshot"):
        metrics = dense_probes.run(args, lambda img: encode(lila, img, args.features), plan)
    else:
        metrics = {"vos-knn": run_vos, "vos-lp": run_vos, "pca": run_pca}[args.cmd](args, lila, plan)
    print(f"{args.cmd}: {summary(metrics)}")
    path = os.path.join(args.out, "results.json")
    result = {"metrics": metrics, "config": config, "ckpt_config": ck_cfg}
    runs.save_file(path, lambda f: f.write(json.dumps(result, indent=1).encode()), "results",
                   "the metrics printed above are this run's", "rerun to keep them")
    return metrics


def cli(argv=None):
    """main() through the repo's one error path (runs.cli): bad input as one message (the
    whole of it, every line), no traceback, status 2; a closed stdout ends nothing."""
    sys.exit(runs.cli("probe.py", lambda: main(argv), code=2, strip=("evaldata.py", "dense_probes.py"),
             oom="--encode-batch, --size, --grid or --batch",
             interrupted=lambda: "what it wrote so far is in --out (a dense probe resumes from "
                                 "probe_state.pt: run it again with the same settings)"))


if __name__ == "__main__":
    cli()
