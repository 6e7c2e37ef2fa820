"""dense_probes.py: the trainable dense probes of probe.py (surface normals, semantic and
zero-shot segmentation): heads, losses, metrics and the two training protocols.

LILA (Araslanov et al., CVPR 2026) scores frozen features with light probes that read BOTH the
encoder's last tapped layer (a LayerNormed h x w patch grid) and the decoder's pixel features,
and sum their predictions (official lila/probes/*.py, alpha_enc = alpha_dec = 1). A head built
with enc_dim=0 (or dec_dim=0) reads one source only: that is `--features decoder` (encoder).

  LinearHead     1x1 conv on the encoder grid + k x k conv on the decoder features, each
                 upsampled bilinearly, summed (probes/linear.py LinearCat). Normals: k = 5;
                 the VOS linear probe and `--head linear`: k = 1.
  AttentionHead  semantic segmentation (probes/attention.py AttentionProbe): a 1x1 conv on
                 the encoder + C learnable class queries cross-attending (8 heads) over
                 ReLU(decoder) pooled x4; logits = full-resolution ReLU(decoder) . queries.
  ZeroShotHead   zero-shot segmentation (probes/linear.py LinearZeroShot): BatchNorm + 1x1
                 projection of the encoder, 1x1 projection of the decoder, each to the text
                 width and L2-normalised, cosine to frozen CLIP text embeddings, summed,
                 times exp(logit scale) (init ln 100).

Protocols: `train_official` (eval_norml.py, eval_seg.py, eval_openseg.py): AdamW on augmented
crops, an evaluation after each epoch, the best epoch reported; resumable from
OUT/probe_state.pt. `train_fast`: features of whole frames computed once, a LinearHead fitted
on sampled pixels (a quick check on synthetic scenes, not the paper's protocol).

Shapes: B batch, E encoder width, D decoder width, h x w patch grid, S x S crop, C classes,
N sampled pixels. Metrics (official metrics.py): normals per image (RMSE of the angular
error, % under 11.25 / 22.5 / 30 degrees; averaged over images), segmentation from one
confusion matrix (IoU over the classes present in the ground truth).

Deviations from the official loops (each kept for a reason, see GUIDE.md): BatchNorm of the
zero-shot head is in eval mode while scoring (official: train mode, batch statistics);
images without one valid normal are skipped and counted (official: scored as 0); evaluation
keeps the last partial batch (official normals: drop_last); an optional --micro-batch splits
a step's images with exactly the same loss normalisation.
"""
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import evaldata
import runs

VOID = evaldata.VOID


def up(x, size):
    """Bilinear resize (align_corners=False) to `size`, skipped when already there."""
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size, mode="bilinear", align_corners=False)


# --- method: the probe heads ---

class LinearHead(nn.Module):
    """logits = up(conv_1x1(enc)) + up(conv_kxk(dec)): (B, E, h, w), (B, D, H, W) -> (B, C, *size)."""

    def __init__(self, enc_dim, dec_dim, n_out, dec_kernel=1):
        super().__init__()
        self.enc = nn.Conv2d(enc_dim, n_out, 1) if enc_dim else None
        self.dec = nn.Conv2d(dec_dim, n_out, dec_kernel, padding=dec_kernel // 2) if dec_dim else None

    def forward(self, enc, dec, size):
        out = 0
        if self.dec is not None:
            out = up(self.dec(dec), size)                                  # (B, C, *size)
        if self.enc is not None:
            out = out + up(self.enc(enc), size)                            # (B, C, *size)
        return out


class CrossAttention(nn.Module):
    """Multi-head attention of queries (B, Q, D) over tokens (B, N, D): bias-free q, k, v
    projections, softmax(q k^T / sqrt(D / heads)) v, output projection."""

    def __init__(self, dim, heads=8):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dense_probes.py: attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.proj = nn.Linear(dim, dim)

    def forward(self, query, tokens):
        B, Q, D = query.shape
        split = lambda x: x.view(B, x.shape[1], self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(self.q(query)), split(self.k(tokens)), split(self.v(tokens)))
        return self.proj(y.transpose(1, 2).reshape(B, Q, D))               # (B, Q, D)


class AttentionHead(nn.Module):
    """Encoder: 1x1 conv, upsampled. Decoder: x = ReLU(dec); C queries attend over x resized
    bilinearly to (H // downscale, W // downscale) (downscale=4, heads=8: official
    AttentionProbe); logits_c(p) = x(p) . y_c at full resolution. Summed."""

    def __init__(self, enc_dim, dec_dim, n_cls, heads=8, downscale=4):
        super().__init__()
        self.enc = nn.Conv2d(enc_dim, n_cls, 1) if enc_dim else None
        self.downscale = downscale
        if dec_dim:
            self.queries = nn.Parameter(torch.randn(1, n_cls, dec_dim))   # (1, C, D), official init
            self.attn = CrossAttention(dec_dim, heads)
        self.has_dec = bool(dec_dim)

    def forward(self, enc, dec, size):
        out = up(self.enc(enc), size) if self.enc is not None else 0      # (B, C, *size)
        if self.has_dec:
            x = F.relu(dec)                                                # (B, D, H, W)
            B, D, H, W = x.shape
            small = F.interpolate(x, (H // self.downscale, W // self.downscale), mode="bilinear", align_corners=False)
            y = self.attn(self.queries.expand(B, -1, -1), small.flatten(2).transpose(1, 2))  # (B, C, D)
            z = torch.einsum("bdn,bcd->bcn", x.flatten(2), y).view(B, -1, H, W)              # (B, C, H, W)
            out = out + up(z, size)
        return out


class ZeroShotHead(nn.Module):
    """logits = exp(s) * [cos(P_dec dec, t_c) + up(cos(P_enc BN(enc), t_c))], t_c the frozen
    L2-normalised text embedding of class c (C, T); s trainable, init ln(100)."""

    def __init__(self, enc_dim, dec_dim, text, logit_scale=math.log(100)):
        super().__init__()
        text = torch.as_tensor(text, dtype=torch.float32)
        self.register_buffer("text", F.normalize(text, dim=1))            # (C, T), never trained
        T = text.shape[1]
        self.enc = nn.Sequential(nn.BatchNorm2d(enc_dim), nn.Conv2d(enc_dim, T, 1, bias=False)) if enc_dim else None
        self.dec = nn.Conv2d(dec_dim, T, 1, bias=False) if dec_dim else None
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))

    def _cos(self, x, proj):
        return torch.einsum("bthw,ct->bchw", F.normalize(proj(x), dim=1), self.text)   # (B, C, h, w)

    def forward(self, enc, dec, size):
        out = up(self._cos(dec, self.dec), size) if self.dec is not None else 0
        if self.enc is not None:
            out = out + up(self._cos(enc, self.enc), size)
        return out * self.logit_scale.exp()


def build_head(kind, enc_dim, dec_dim, n_out, text=None):
    """'linear' (1x1 + 1x1), 'conv' (1x1 + 5x5, normals), 'attention', 'zeroshot'."""
    if kind == "attention":
        return AttentionHead(enc_dim, dec_dim, n_out)
    if kind == "zeroshot":
        return ZeroShotHead(enc_dim, dec_dim, text)
    return LinearHead(enc_dim, dec_dim, n_out, dec_kernel=5 if kind == "conv" else 1)


# --- method: losses (sums, normalised by whole-batch counts, so micro-batches add up) ---

def angular_error(pred, gt, eps=0.0):
    """Angle (radians) between pred and gt along dim 1 (cosine clamped to [-1 + eps, 1 - eps])."""
    return F.cosine_similarity(pred, gt, dim=1).clamp(-1 + eps, 1 - eps).acos()


def loss_sums(task, logits, tgt, seen=None, eps=1e-4):
    """Per-task loss terms summed over pixels: normals the angular error over valid pixels
    (eps 1e-4, official angular_loss), segmentation cross-entropy over labelled pixels, and
    for zero-shot also (sum of seen-class probabilities)^2 over ignored pixels."""
    if task == "normals":
        return {"main": angular_error(logits, tgt["normals"], eps)[tgt["valid"]].sum()}
    lab = tgt["labels"]
    out = {"main": F.cross_entropy(logits, lab, ignore_index=VOID, reduction="sum")}
    if task == "zeroshot" and (lab == VOID).any():
        p_seen = F.softmax(logits, 1)[:, seen].sum(1)                      # (B, S, S)
        out["neg"] = (p_seen[lab == VOID] ** 2).sum()
    return out


def batch_counts(task, tgt):
    if task == "normals":
        return {"main": int(tgt["valid"].sum())}
    return {"main": int((tgt["labels"] != VOID).sum()), "neg": int((tgt["labels"] == VOID).sum())}


def combine(task, sums, counts, ce_weight=0.1):
    """The batch loss: mean of the main term; zero-shot (official eval_openseg.py):
    0.1 * CE + mean over ignored pixels of p_seen^2 when the batch has ignored pixels."""
    loss = sums["main"] / max(counts["main"], 1)
    if task == "zeroshot" and counts["neg"] > 0:
        loss = ce_weight * loss + sums.get("neg", 0.0) / counts["neg"]
    return loss


# --- metrics ---

class Scores:
    """Accumulates normals (per image) or a confusion matrix; .result() -> dict of % / degrees."""

    def __init__(self, task, n_cls=None, unseen=(), thresholds=(11.25, 22.5, 30)):
        self.task, self.unseen, self.th = task, tuple(unseen), thresholds
        self.per_image, self.skipped = [], 0
        self.conf = torch.zeros(n_cls, n_cls, dtype=torch.long) if n_cls else None

    def add(self, out, tgt):
        """out (B, 3 or C, H, W) at the target size; tgt tensors of the batch."""
        if self.task == "normals":
            err = torch.rad2deg(angular_error(out.float(), tgt["normals"].float()))   # (B, H, W)
            for e, v in zip(err, tgt["valid"]):
                if not v.any():
                    self.skipped += 1
                    continue
                e = e[v].double()
                self.per_image.append([e.pow(2).mean().sqrt().item()] + [(e < t).double().mean().item() for t in self.th])
            return
        C, t, p = self.conf.shape[0], tgt["labels"].flatten().cpu(), out.argmax(1).flatten().cpu()
        ok = (t != VOID) & (t < C)
        self.conf += torch.bincount(t[ok] * C + p[ok], minlength=C * C).view(C, C)

    def result(self):
        if self.task == "normals":
            if not self.per_image:
                warn(f"no valid pixels: none of the {self.skipped} images has a valid normal; no score")
                return {"rmse": None, **{f"under_{t}": None for t in self.th}, "images": 0,
                        "skipped_no_valid": self.skipped, "note": "no valid pixels"}
            m = np.mean(self.per_image, 0)
            r = {"rmse": float(m[0]), **{f"under_{t}": 100 * float(v) for t, v in zip(self.th, m[1:])}}
            return {**r, "images": len(self.per_image), "skipped_no_valid": self.skipped}
        conf = self.conf.double()
        tp, gt, pred = conf.diag(), conf.sum(1), conf.sum(0)
        iou = tp / (gt + pred - tp).clamp(min=1)
        valid = gt > 0                                  # classes present in the ground truth
        mean = lambda m: 100 * iou[m].mean().item() if m.any() else None  # noqa: E731  no class: no score
        if not valid.any():
            warn("no valid pixels: every ground-truth label is void (255) or beyond the classes; no score")
        r = {"miou": mean(valid), "pixel_acc": 100 * (tp.sum() / conf.sum()).item() if valid.any() else None,
             "classes": int(valid.sum())}
        if self.task == "zeroshot":
            un = torch.zeros_like(valid)
            un[list(self.unseen)] = True
            s, u = mean(valid & ~un), mean(valid & un)
            for name, v in (("seen", s), ("unseen", u)):
                if v is None and valid.any():
                    warn(f"no {name} class in the ground truth: miou_{name} and miou_harmonic have no score")
            r.update(miou_seen=s, miou_unseen=u,
                     miou_harmonic=None if s is None or u is None else 2 * s * u / (s + u) if s + u > 0 else 0.0)
        return r


# Evaluation view of the official protocol: short side int(size * EVAL_SCALE), centre crop size
# (dataload.NormalsDataset val: Resize(int(504 * 1.1)) + CenterCrop(504); segmentation: 1.0).
EVAL_SCALE = {"normals": 1.1, "semseg": 1.0, "zeroshot": 1.0}
def warn(msg):
    print(f"dense_probes.py: warning: {msg}", file=sys.stderr)


BEST = {"normals": ("rmse", min), "semseg": ("miou", max), "zeroshot": ("miou_harmonic", max)}


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# --- plumbing: the official protocol ---

@torch.no_grad()
def evaluate(task, head, encode, ds, cfg, device):
    """Scores of `head` on the evaluation views (centre crops) of ds."""
    head.eval()
    sc = Scores(task, cfg["num_classes"], cfg.get("unseen", ()))
    views = evaldata.Views(ds, cfg["size"], False, range(len(ds)), eval_scale=cfg["eval_scale"])
    loader = torch.utils.data.DataLoader(views, batch_size=cfg["batch"], num_workers=cfg["workers"])
    for b in tqdm(loader, desc="eval", leave=False, disable=None):
        b = to_device(b, device)
        enc, dec = encode(b["image"])
        sc.add(head(enc, dec, b["image"].shape[-2:]), b)
    return sc.result()


def save_atomic(obj, path):
    runs.atomic_save(obj, path, "the previous state, if any, is intact",
                     "run the same probe again: it resumes there")


def train_official(task, head, encode, train_ds, val_ds, cfg, out, device, log=print):
    """The official loop: `epochs` epochs of AdamW steps over `batch` augmented crops (one
    epoch = len(train) * repeat views), an evaluation after each epoch, the best epoch
    (lowest RMSE / highest mIoU / highest harmonic mIoU) reported. The head, optimiser and
    position are saved atomically every `save_every` steps and after each epoch, and a rerun
    with the same settings resumes there."""
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=cfg["lr"], weight_decay=cfg["wd"])
    path = os.path.join(out, "probe_state.pt")
    epoch0, step0, history = 0, 0, []
    if os.path.isfile(path):
        try:
            st = torch.load(path, map_location="cpu", weights_only=True)
            saved, now = dict(st["signature"]), cfg["signature"]
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"dense_probes.py: cannot read {path} ({type(e).__name__}: {e}); delete it") from None
        differ = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now), key=str)
                  if saved.get(k) != now.get(k)}
        if differ:
            raise ValueError(f"dense_probes.py: {path} was written by a probe run with other settings "
                             f"(saved, now): {differ}; rerun with those to resume it, or use another "
                             f"--out or delete it")
        head.load_state_dict(st["head"]), opt.load_state_dict(st["opt"])
        epoch0, step0, history = st["epoch"], st["step"], st["history"]
        log(f"resuming from {path}: epoch {epoch0}, step {step0}")

    def save(epoch, step):
        os.makedirs(out, exist_ok=True)
        save_atomic({"signature": cfg["signature"], "head": head.state_dict(), "opt": opt.state_dict(),
                     "epoch": epoch, "step": step, "history": history}, path)

    n, B = len(train_ds) * train_ds.repeat, cfg["batch"]
    micro = cfg["micro_batch"] or B
    seen = [c for c in range(cfg["num_classes"] or 0) if c not in set(cfg.get("unseen", ()))]
    for epoch in range(epoch0, cfg["epochs"]):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg["seed"] * 7919 + epoch)).tolist()
        steps = -(-n // B)
        views = evaldata.Views(train_ds, cfg["train_size"], True, perm[step0 * B:], cfg["seed"], epoch)
        loader = torch.utils.data.DataLoader(views, batch_size=B, num_workers=cfg["workers"],
                                             pin_memory=device.type == "cuda")
        head.train()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg['epochs']}", initial=step0, total=steps, disable=None)
        for step, b in enumerate(bar, start=step0):
            b = to_device(b, device)
            counts = batch_counts(task, b)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for i in range(0, b["image"].shape[0], micro):            # same loss as one pass
                part = {k: v[i:i + micro] for k, v in b.items()}
                enc, dec = encode(part["image"])
                loss = combine(task, loss_sums(task, head(enc, dec, part["image"].shape[-2:]), part, seen), counts)
                if torch.is_tensor(loss) and loss.requires_grad:
                    loss.backward()
                total += float(loss.detach()) if torch.is_tensor(loss) else float(loss)
            if not math.isfinite(total):
                raise RuntimeError(f"dense_probes.py: non-finite probe loss at epoch {epoch + 1} step {step}")
            opt.step()
            bar.set_postfix(loss=f"{total:.4f}")
            if (step + 1) % cfg["save_every"] == 0 and step + 1 < steps:
                save(epoch, step + 1)
        step0 = 0
        m = evaluate(task, head, encode, val_ds, cfg, device)
        history.append({"epoch": epoch + 1, **m})
        log(f"epoch {epoch + 1}: " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in m.items() if isinstance(v, float) or v is None))
        save(epoch + 1, 0)
    key, pick = BEST[task]
    worst = math.inf if pick is min else -math.inf      # an epoch without a score is never the best
    best = pick(history, key=lambda h: h[key] if h[key] is not None and math.isfinite(h[key]) else worst)
    return {**best, "best_epoch": best["epoch"], "last": history[-1], "history": history}


# --- plumbing: the fast protocol (features once, pixels sampled) ---

def bilinear_taps(H, W, h, w, ys, xs):
    """Indices (N, 4) into a flattened h x w map and weights (N, 4) so that the map resized
    bilinearly (align_corners=False) to H x W reads sum(w * map[idx]) at pixels (ys, xs)."""
    def axis(p, n_out, n_in):
        s = ((p.double() + 0.5) * n_in / n_out - 0.5).clamp(min=0)
        i0 = s.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        return i0, i1, (s - i0).float()
    y0, y1, ly = axis(ys, H, h)
    x0, x1, lx = axis(xs, W, w)
    idx = torch.stack([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1], 1)   # (N, 4)
    wts = torch.stack([(1 - ly) * (1 - lx), (1 - ly) * lx, ly * (1 - lx), ly * lx], 1)
    return idx, wts


def frame_input(img, size, patch):
    """(H, W, 3) uint8 -> (1, 3, H', W') float [0, 1], short side `size`, sides multiples of `patch`."""
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()[None] / 255
    hw = evaldata.patch_hw(*img.shape[:2], size, patch)
    return F.interpolate(x, hw, mode="bilinear", align_corners=False, antialias=True)


def train_fast(task, head, encode, train_ds, val_ds, cfg, device):
    """LinearHead (1x1 + 1x1) on pixels: per training frame, features at short side `size`
    once, `pixels` labelled pixels sampled, AdamW for `steps` steps on `pixel_batch` pixels
    (0 = all); the encoder term is the 1x1 conv of the grid read bilinearly at each pixel,
    exactly the upsampled conv of the head. Scored on whole held-out frames."""
    g = torch.Generator().manual_seed(cfg["seed"])
    xd, yv, taps, grids, offset = [], [], [], [], 0
    for i in tqdm(range(len(train_ds)), desc="features", leave=False, disable=None):
        img, tgt = train_ds[i]
        enc, dec = encode(frame_input(img, cfg["size"], cfg["patch"]).to(device))
        H, W = evaldata.patch_hw(*img.shape[:2], cfg["size"], cfg["patch"])
        key = "normals" if task == "normals" else "labels"
        t = torch.from_numpy(np.ascontiguousarray(tgt[key])).float()
        t = t.permute(2, 0, 1) if task == "normals" else t[None]
        t = F.interpolate(t[None], (H, W), mode="nearest-exact")[0]       # (3 or 1, H, W)
        ok = F.interpolate(torch.from_numpy(tgt["valid"])[None, None].float(), (H, W), mode="nearest-exact")[0, 0] > 0 \
            if task == "normals" else t[0] != VOID
        pix = ok.flatten().nonzero()[:, 0]
        pix = pix[torch.randperm(len(pix), generator=g)[:cfg["pixels"]]]  # (n,)
        ys, xs = pix // W, pix % W
        yv.append(t.flatten(1)[:, pix].T if task == "normals" else t[0].flatten()[pix].long())
        if dec is not None:
            xd.append(dec[0].flatten(1)[:, pix.to(dec.device)].T.cpu())   # (n, D)
        if enc is not None:
            h, w = enc.shape[-2:]
            idx, wts = bilinear_taps(H, W, h, w, ys, xs)
            taps.append((idx + offset, wts))
            grids.append(enc[0].flatten(1).T.cpu())                        # (h*w, E)
            offset += h * w
    y = torch.cat(yv).to(device)
    xd = torch.cat(xd).to(device) if xd else None
    if grids:
        grid = torch.cat(grids).to(device)                                # (sum h*w, E)
        idx, wts = (torch.cat(a).to(device) for a in zip(*taps))          # (N, 4)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg["lr"], weight_decay=cfg["wd"])
    N, bs = len(y), cfg["pixel_batch"]
    for _ in tqdm(range(cfg["steps"]), desc="fit", leave=False, disable=None):
        sel = torch.randint(0, N, (bs,), generator=g).to(device) if 0 < bs < N else slice(None)
        out = 0
        if head.dec is not None:
            out = F.linear(xd[sel], head.dec.weight[:, :, 0, 0], head.dec.bias)       # (n, C)
        if head.enc is not None:
            m = F.linear(grid, head.enc.weight[:, :, 0, 0], head.enc.bias)            # (sum h*w, C)
            out = out + (m[idx[sel]] * wts[sel][..., None]).sum(1)                    # (n, C)
        loss = angular_error(out, y[sel], 1e-4).mean() if task == "normals" else F.cross_entropy(out, y[sel])
        opt.zero_grad(), loss.backward(), opt.step()
    sc = Scores(task, cfg["num_classes"])
    with torch.no_grad():
        for i in tqdm(range(len(val_ds)), desc="eval", leave=False, disable=None):
            img, tgt = val_ds[i]
            x = frame_input(img, cfg["size"], cfg["patch"]).to(device)
            enc, dec = encode(x)
            out = up(head(enc, dec, x.shape[-2:]), img.shape[:2]).cpu()                 # (1, 3 or C, H, W)
            sc.add(out, {k: torch.from_numpy(np.ascontiguousarray(v))[None] if k != "normals" else
                         torch.from_numpy(np.ascontiguousarray(v)).permute(2, 0, 1)[None] for k, v in tgt.items()})
    return {**sc.result(), "train_frames": len(train_ds), "eval_frames": len(val_ds)}


# --- plumbing: probe.py's normals / semseg / zeroshot commands ---

MAX_CLASSES = 1024   # no benchmark here has more than 182; beyond this a probe only costs memory


def fail(msg):
    raise ValueError(f"dense_probes.py: {msg}")


def open_split(args, root, split):
    unseen = args.unseen if args.cmd == "zeroshot" else None
    lst = args.train_list if split == "train" else args.val_list
    return evaldata.open_dense(root, args.cmd, split, args.val_videos, args.reduce_zero_label, lst, unseen)


def scan_labels(ds):
    """Largest label (255 aside) of a video-layout split and the file holding it."""
    top, where = -1, None
    for i in range(len(ds)):
        lab = ds[i][1]["labels"]
        m = int(lab[lab != VOID].max()) if (lab != VOID).any() else -1
        if m > top:
            top, where = m, ds.items[i][1]
    return top, where


def load_text_embeddings(args, names):
    """(C, T) float32 from --text-embeddings (.npy, or .pt as the official coco_embeddings.pt),
    else computed with CLIP ViT-B/32 from the class names and saved to OUT/text_embeddings.npy."""
    p = args.text_embeddings
    if p:
        if not os.path.isfile(p):
            fail(f"--text-embeddings {p}: no such file")
        try:
            t = np.load(p) if p.endswith(".npy") else torch.load(p, map_location="cpu", weights_only=True)
            t = np.asarray(t.float().numpy() if torch.is_tensor(t) else t, np.float32)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
            fail(f"--text-embeddings {p}: unreadable ({type(e).__name__}: {e})")
        if t.ndim != 2 or not np.isfinite(t).all():
            fail(f"--text-embeddings {p}: expected a finite (classes, width) array, got shape {t.shape}")
        if not 2 <= t.shape[0] <= MAX_CLASSES or not 1 <= t.shape[1] <= 4096:
            fail(f"--text-embeddings {p}: {t.shape[0]} classes of width {t.shape[1]}; expected 2..{MAX_CLASSES} "
                 "classes (COCO-Stuff: 182) of a CLIP width (512) up to 4096")
        return t
    if names is None:
        fail("zeroshot on this layout has no class names to embed: pass --text-embeddings FILE")
    t = evaldata.clip_text_embeddings(names, args.device)
    os.makedirs(args.out, exist_ok=True)
    runs.save_file(os.path.join(args.out, "text_embeddings.npy"), lambda f: np.save(f, t), "--out")
    return t


def prepare(args):
    """The train and evaluation splits, the number of classes and the text embeddings of a
    probe.py dense command; every dataset problem is found here, before the model is built."""
    if args.train_data:
        train, val = open_split(args, args.train_data, "all"), open_split(args, args.data, "all")
        if not isinstance(train, evaldata.VideoDense):
            fail("--train-data applies to the video layout only (the real datasets bring their splits)")
    else:
        train, val = open_split(args, args.data, "train"), open_split(args, args.data, "val")
    if (args.train_list or args.val_list) and not isinstance(train, evaldata.CocoStuff):
        fail(f"--train-list / --val-list name COCO-Stuff images; {train.layout} brings its own splits")
    if not len(train) or not len(val):
        fail(f"--data {args.data}: need training and held-out frames (got {len(train)} / {len(val)}; "
             "video layout: ImageSets/2017/train.txt, or --val-videos N below the number of videos)")
    if isinstance(train, evaldata.VideoDense):
        train.repeat = evaldata.NYU.repeat if args.cmd == "normals" else 1   # an epoch as NYU's: ten passes
        train.hide = train.unseen if args.cmd == "zeroshot" else ()   # unseen: ignored in training
    text, n_cls = None, 3
    if args.cmd == "zeroshot":
        text = load_text_embeddings(args, train.names)
        n_cls = text.shape[0]
        if not train.unseen:
            fail("zeroshot on the video layout needs --unseen IDS (the held-out class ids)")
        if max(train.unseen) >= n_cls or min(train.unseen) < 0:
            fail(f"--unseen {','.join(map(str, train.unseen))}: ids must be classes 0..{n_cls - 1} of the text embeddings")
        if train.num_classes and train.num_classes != n_cls:
            fail(f"--text-embeddings has {n_cls} rows, {train.layout} has {train.num_classes} classes")
    elif args.cmd == "semseg":
        n_cls = train.num_classes
        if n_cls and args.num_classes not in (0, n_cls):
            fail(f"--num-classes {args.num_classes}: {train.layout} has {n_cls} classes")
    if args.cmd != "normals" and isinstance(train, evaldata.VideoDense):
        top, where = max(scan_labels(train), scan_labels(val), key=lambda r: r[0])
        n_cls = n_cls or args.num_classes or top + 1
        if top >= n_cls:
            fail(f"{where}: label {top}, but there are only {n_cls} classes (--num-classes or the text embeddings)")
        if n_cls < 2:
            fail(f"--data {args.data}: a single class (every label is 0)")
    return dict(train=train, val=val, num_classes=n_cls, text=text, unseen=tuple(train.unseen or ()))


def run(args, encode, plan):
    """Fit the head on the training split and score the held-out split; encode(img) -> (enc or
    None, dec or None) for (B, 3, H, W) images in [0, 1] on args.device."""
    train, val, task, device = plan["train"], plan["val"], args.cmd, torch.device(args.device)
    enc, dec = encode(torch.zeros(1, 3, 2 * args.patch, 2 * args.patch, device=device))  # the two widths
    E, D = (enc.shape[1] if enc is not None else 0), (dec.shape[1] if dec is not None else 0)
    torch.manual_seed(args.seed)
    head = build_head(args.head, E, D, plan["num_classes"], plan["text"]).to(device)
    if args.protocol == "fast":
        cfg = dict(size=args.size, patch=args.patch, pixels=args.pixels, steps=args.probe_steps, pixel_batch=args.pixel_batch,
                   lr=args.probe_lr, wd=args.probe_weight_decay, seed=args.seed, num_classes=plan["num_classes"])
        return train_fast(task, head, encode, train, val, cfg, device)
    train.repeat = args.repeat or train.repeat
    sig = {k: getattr(args, k) for k in ("cmd", "features", "head", "val_videos", "ckpt_sha256", "weights",
                                         "weights_sha256", "inputs_sha256", "backbone", "preset", "probe_lr",
                                         "probe_weight_decay", "batch", "size", "train_size", "seed", "unseen",
                                         "reduce_zero_label")}
    # folders by what they are (`data/` and `data` are one), files by content (probe.py), and
    # the head's shape as resolved: a state saved for another shape is never loaded
    sig.update({k: getattr(args, k) and os.path.realpath(getattr(args, k)) for k in ("data", "train_data")},
               num_classes=plan["num_classes"], widths=[E, D])
    cfg = dict(epochs=args.epochs, batch=args.batch, micro_batch=args.micro_batch, lr=args.probe_lr,
               wd=args.probe_weight_decay, seed=args.seed, workers=args.workers, train_size=args.train_size,
               size=args.size, eval_scale=EVAL_SCALE[task], num_classes=plan["num_classes"],
               unseen=plan["unseen"], save_every=args.save_every, signature={**sig, "repeat": train.repeat})
    m = train_official(task, head, encode, train, val, cfg, args.out, device)
    return {**m, "train_frames": len(train), "eval_frames": len(val), "layout": train.layout}
