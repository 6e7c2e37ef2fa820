"""Train LILA: the training loop, written out top to bottom.

Paper: "Featurising Pixels from Dynamic 3D Scenes with Linear In-Context Learners"
(Araslanov et al., CVPR 2026), section 3 (method) and the training details of section 4.

One step, for a batch of B frame pairs (t, t+Δ) of the same video:
  1. two views per pair: the *query* view is a random crop of frame t, the *context* view a
     crop of frame t+Δ (data.py gives the base frames and the crop grids);
  2. cues on the base frames (RAFT flow + MiDaS depth on the fly, the cue cache, or the
     exact cues of the synthetic scenes), warped into each view with its grid;
  3. the frozen DINOv2 encoder and the trainable DPT decoder give pixel features of both views
     (model.py); the self-distillation cue is made from the encoder grid (cues.py, PAMR);
  4. the linear in-context loss (incontext.py): a ridge map fitted on the context view's
     features -> cues, applied to the query view's features, L1 + edge loss against the
     query's cues. Only the decoder learns.

Shapes: B pairs, S view side (224 paper, 112 tiny), Hb base-frame side, E encoder width,
D pixel-feature width, K cue channels (2 flow + 1 depth + 32 SD = 35).

Differences from the official code: a horizontal flip negates flow-x (the official code
forgets it); the ridge system is solved by Cholesky instead of LU; flow and depth are
z-scored with confidence-weighted batch statistics.

Run:
  python train.py --preset tiny --weights none        # CPU, synthetic scenes, minutes
  python train.py --data ytvos/                       # one GPU, YouTube-VOS, RAFT + MiDaS
  torchrun --nproc_per_node 4 train.py --data ytvos/  # several GPUs (gradients all-reduced)
"""
import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
import model
import cues as cuelib
import incontext


# -----------------------------------------------------------------------------------------
# Config: one argparse surface, grouped, paper defaults.

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="video root (YouTube-VOS or DAVIS layout); "
                   "default: synthetic dynamic scenes rendered on the fly (data.py)")
    g.add_argument("--cues", default="auto", choices=["auto", "hub", "files", "synthetic"],
                   help="where cues come from: RAFT+MiDaS via torch.hub on the fly, the cue "
                   "cache ROOT/Cues (python cues.py), or the exact synthetic cues. auto: "
                   "synthetic without --data, files if ROOT/Cues exists, else hub")
    g.add_argument("--synthetic-videos", type=int, default=64,
                   help="number of synthetic training videos (seeds synthetic-seed ...)")
    g.add_argument("--synthetic-seed", type=int, default=0, help="first synthetic video seed")
    g.add_argument("--synthetic-frames", type=int, default=12, help="frames per synthetic video")
    g.add_argument("--cue-noise", type=float, default=0.0,
                   help="corrupt synthetic cues like real networks err (0 = exact)")
    g.add_argument("--gap", type=int, default=5, help="max frame gap Δ (paper: 5)")
    g.add_argument("--size", type=int, default=None, help="view side in px, multiple of 14 "
                   "(paper preset 224, tiny 112)")
    g.add_argument("--base", type=int, default=None, help="base-frame side in px on which cues "
                   "are computed (paper 224, tiny 112)")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader worker processes")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="dinov2_vits14", choices=list(model.BACKBONES),
                   help="frozen DINOv2 encoder (paper: ViT-S/14)")
    g.add_argument("--weights", default="hub", help="encoder weights: hub (torch.hub cache in "
                   "TORCH_HOME), a local .pth path, or none (seeded random init, offline)")
    g.add_argument("--preset", default="paper", choices=list(model.PRESETS),
                   help="decoder widths and default sizes: paper (F=256, D=128, 224²) or "
                   "tiny (small decoder, 112², for CPUs)")
    g.add_argument("--flow-net", default="raft_small", help="RAFT variant for --cues hub")
    g.add_argument("--depth-net", default="MiDaS_small", help="MiDaS variant for --cues hub")
    g.add_argument("--hub-dir", default=None, help="local torch.hub repo dirs for --cues hub "
                   "(offline clusters); see cues.py")
    g = p.add_argument_group("method and ablations (paper defaults)")
    g.add_argument("--lam", type=float, default=0.1, help="ridge weight λ (paper 0.1)")
    g.add_argument("--gamma", type=float, default=1.0, help="edge-loss weight γ (paper 1)")
    g.add_argument("--sd-channels", type=int, default=32,
                   help="self-distillation cue channels (paper 32)")
    g.add_argument("--no-pamr", action="store_true", help="ablation: bilinear SD upsampling")
    g.add_argument("--no-edge", action="store_true",
                   help="ablation: L1 only, the edge terms are not computed")
    g.add_argument("--no-crop", action="store_true", help="ablation: full-frame views")
    g.add_argument("--erm", action="store_true", help="ablation: no in-context step, a learned "
                   "linear head predicts each frame's cues (paper's key comparison)")
    g.add_argument("--no-depth", action="store_true", help="ablation: drop the depth cue")
    g.add_argument("--no-flow", action="store_true", help="ablation: drop the flow cue")
    g.add_argument("--no-sd", action="store_true", help="ablation: drop the SD cue")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=100_000, help="training steps (paper 100k)")
    g.add_argument("--batch", type=int, default=None, help="frame pairs per step, all "
                   "processes together (paper preset 32, tiny 8)")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (paper 1e-4)")
    g.add_argument("--wd", type=float, default=1e-4, help="AdamW weight decay (paper 1e-4)")
    g.add_argument("--warmup", type=int, default=0, help="linear LR warm-up steps")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/lila", help="output dir: ckpt.pt, config.json, "
                   "log.jsonl, feature pictures")
    g.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--seed", type=int, default=0, help="seed of data order, crops, SD channels "
                   "and of the random encoder when --weights none")
    g.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    g.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints "
                   "and feature pictures")
    args = p.parse_args(argv)

    tiny = args.preset == "tiny"  # CPU preset: small decoder, 112² views, 8 pairs a step
    args.size = args.size or (112 if tiny else 224)
    args.batch = args.batch or (8 if tiny else 32)
    if args.base is None:   # cues are computed on base frames (DESIGN: 224²); tiny: view size
        args.base = args.size if tiny else 224
    if args.size % 14:
        p.error(f"--size {args.size} must be a multiple of 14 (ViT patch size)")
    if args.cues == "auto":
        args.cues = ("synthetic" if args.data is None else
                     "files" if os.path.isdir(os.path.join(args.data, "Cues")) else "hub")
    if args.cues == "synthetic" and args.data is not None:
        p.error("--cues synthetic renders its own scenes; drop --data or pick --cues files/hub")
    if args.cues in ("files", "hub") and args.data is None:
        p.error(f"--cues {args.cues} needs --data ROOT")
    if args.no_flow and args.no_depth and args.no_sd:
        p.error("--no-flow --no-depth --no-sd leaves no cue to learn from")
    return args


# -----------------------------------------------------------------------------------------
# Plumbing: files written atomically, RNG state, distributed set-up, a feature picture.

def atomic_save(obj, path):
    """torch.save to a temporary file, fsync, then rename: a kill at any moment leaves
    either the old or the new file, never a half-written one."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
            "python": random.getstate()[1]}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.seed(0)
    np.random.set_state(("MT19937", np.array(s["numpy"], dtype=np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(s["python"]), None))


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE; a plain `python train.py` is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def pick_device(name, rank):
    if name == "auto":
        name = f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def pca_rgb(feats):
    """(D, H, W) features -> (H, W, 3) uint8 picture of their first 3 principal components."""
    D, H, W = feats.shape
    x = feats.reshape(D, -1).T.float()                                  # (HW, D)
    x = x - x.mean(0)
    _, _, V = torch.pca_lowrank(x, q=3, center=False)
    y = x @ V[:, :3]                                                    # (HW, 3)
    lo, hi = y.quantile(0.01, dim=0), y.quantile(0.99, dim=0)
    y = ((y - lo) / (hi - lo + 1e-8)).clamp(0, 1)
    return (y.reshape(H, W, 3) * 255).byte().numpy()


class StepSampler(torch.utils.data.Sampler):
    """Yields dataset indices for steps start..steps-1, one reshuffle per epoch seeded by
    (seed, epoch): a resumed run sees exactly the pairs an uninterrupted run would. With
    several processes, rank r takes every world-th sample of each step's batch."""

    def __init__(self, n, batch, start, steps, seed, rank=0, world=1):
        self.n, self.batch, self.start, self.steps = n, batch, start, steps
        self.seed, self.rank, self.world = seed, rank, world

    def __iter__(self):
        perm, epoch = None, -1
        for k in range(self.start * self.batch, self.steps * self.batch):
            if k // self.n != epoch:
                epoch = k // self.n
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                perm = torch.randperm(self.n, generator=g)
            if k % self.world == self.rank:  # epoch * n + i: new crops for pair i each epoch
                yield epoch * self.n + int(perm[k % self.n])

    def __len__(self):
        return (self.steps - self.start) * self.batch // self.world


# -----------------------------------------------------------------------------------------
# --- method --- from a batch of base-frame pairs to the LILA loss.

def zscore(a, b, eps=1e-3):
    """Z-score two cue maps (B, C, S, S) of the context and the query with ONE scalar mean and
    std over the batch, both views and all channels (official dpt_lila.py RFFEncoder.seed /
    renorm: (x - mean) / (eps + std), eps 1e-3): the same affine map for both views, so a
    linear map fitted on one still reads the other."""
    both = torch.cat([a, b])
    std, mean = torch.std_mean(both)
    return (a - mean) / (eps + std), (b - mean) / (eps + std)


def views_and_cues(batch, lila, args, flow_cue=None, depth_cue=None, sd_gen=None):
    """A batch of pairs -> the two views' features, cue maps and confidences.

    batch (data.PairDataset): views (B, 2, 3, S, S) query view of frame t and context view of
    frame t+Δ; frames (B, 2, 3, Hb, Wb) the base frames at the cue resolution; grid_q/grid_c.
    Returns a dict with feats_q/feats_c (B, D, S, S), cue_q/cue_c (B, K, S, S), conf_q/conf_c
    (B, Cm, S, S) the confidence of each masked cue channel ([flow, flow, depth-valid]; SD
    channels need none), the views, and the names of the K cue channels.
    """
    img_q, img_c = batch["views"][:, 0], batch["views"][:, 1]          # (B, 3, S, S)
    f_t, f_t2 = batch["frames"][:, 0], batch["frames"][:, 1]            # (B, 3, Hb, Wb)
    gq, gc = batch["grid_q"], batch["grid_c"]                           # (B, S, S, 2)

    # Flow and depth on the BASE frames (never on the crops), then warped into each view. The
    # cue networks run in float32 even inside the step's autocast, so on-the-fly cues equal
    # the cached ones (cues.py).
    with torch.no_grad(), torch.autocast(img_q.device.type, enabled=False):
        if args.cues == "hub":
            flow_fwd, flow_bwd = flow_cue(f_t, f_t2)                   # (B, 2, Hb, Wb) each
            disp = depth_cue(torch.cat([f_t, f_t2]))                   # (2B, 1, Hb, Wb)
            disp_t, disp_t2 = disp.chunk(2)
        else:
            flow_fwd, flow_bwd = batch["flow_fwd"], batch["flow_bwd"]
            disp_t, disp_t2 = batch["disparity"][:, 0], batch["disparity"][:, 1]
        conf_t = cuelib.flow_confidence(flow_fwd, flow_bwd)             # (B, 1, Hb, Wb)
        conf_t2 = cuelib.flow_confidence(flow_bwd, flow_fwd)            # (B, 1, Hb, Wb)
        depth, valid = cuelib.disparity_to_depth(torch.cat([disp_t, disp_t2]))
        depth_t, depth_t2 = depth.chunk(2)                              # (B, 1, Hb, Wb)
        valid_t, valid_t2 = valid.chunk(2)
        # --- method ---
        # Query = frame t with the forward flow; context = frame t+Δ with the NEGATED
        # backward flow: both then say "where this point is heading", one map reads both.
        # Warping copies values: a view's own flip or zoom never changes them (data.warp).
        flow_q, flow_c = data.warp(flow_fwd, gq), data.warp(-flow_bwd, gc)  # (B, 2, S, S)
        depth_q, depth_c = data.warp(depth_t, gq), data.warp(depth_t2, gc)  # (B, 1, S, S)
        fconf_q, fconf_c = data.warp(conf_t, gq), data.warp(conf_t2, gc)
        dval_q, dval_c = data.warp(valid_t, gq), data.warp(valid_t2, gc)

    # Features of both views in one pass (the encoder is frozen, the decoder trains).
    enc, feats = lila(torch.cat([img_q, img_c]))                       # (2B,E,h,w) (2B,D,S,S)
    feats_q, feats_c = feats.float().chunk(2)

    cq, cc, kq, kc, names = [], [], [], [], []   # cues and confidences, masked channels first
    with torch.no_grad():
        if not args.no_flow:
            a, b = zscore(flow_c, flow_q)
            cc.append(a), cq.append(b), names.extend(["flow_x", "flow_y"])
            kc.extend([fconf_c, fconf_c]), kq.extend([fconf_q, fconf_q])  # one per flow channel
        if not args.no_depth:
            a, b = zscore(depth_c, depth_q)
            cc.append(a), cq.append(b), names.append("depth")
            kc.append(dval_c), kq.append(dval_q)
        if not args.no_sd:
            # A random subset of the encoder's channels PER PAIR (official random_subset), the
            # same subset for both views of the pair, upsampled by PAMR, L2-normalised.
            E, B = enc.shape[1], img_q.shape[0]
            ch = cuelib.sd_channels(E, args.sd_channels, sd_gen, batch=B).to(enc.device)  # (B, C)
            sd = cuelib.sd_cue(enc.float(), torch.cat([img_q, img_c]), channels=torch.cat([ch, ch]),
                               use_pamr=not args.no_pamr)               # (2B, C, S, S)
            a, b = sd.chunk(2)
            cq.append(a), cc.append(b), names.extend(["sd"] * args.sd_channels)
        empty = img_q.new_zeros(img_q.shape[0], 0, *img_q.shape[-2:])
        # The share of query pixels each masked cue may teach from (for the log).
        shares = {n: float((k > 0).float().mean()) for n, k in
                  (("flow", fconf_q), ("depth", dval_q)) if not getattr(args, f"no_{n}")}
        out = dict(shares=shares, feats_q=feats_q, feats_c=feats_c, img_q=img_q, img_c=img_c,
                   cue_q=torch.cat(cq, 1), cue_c=torch.cat(cc, 1),      # (B, K, S, S)
                   conf_q=torch.cat(kq, 1) if kq else empty,            # (B, Cm, S, S)
                   conf_c=torch.cat(kc, 1) if kc else empty, names=names)
    return out


def lila_loss(v, args, erm_head=None):
    """The in-context loss (or, with --erm, the ablation without the in-context step).
    Returns (loss, parts): parts holds scalar tensors "l1", "edge", and the L1 of each cue
    ("l1_flow_x", "l1_flow_y", "l1_depth", "l1_sd": the mean over the SD channels)."""
    kw = dict(lam=args.lam, gamma=args.gamma,
              edge=not args.no_edge)     # --no-edge skips the edge terms, not just their weight
    if args.erm:
        loss, parts = incontext.erm_loss(erm_head, v["feats_c"], v["feats_q"], v["cue_c"],
                                         v["cue_q"], v["conf_c"], v["conf_q"], **kw)
    else:
        loss, parts = incontext.incontext_loss(v["feats_c"], v["feats_q"], v["cue_c"], v["cue_q"],
                                               v["conf_c"], v["conf_q"], **kw)
    per_channel = parts.pop("l1_channels")                              # (K,)
    for name in dict.fromkeys(v["names"]):
        idx = [i for i, n in enumerate(v["names"]) if n == name]
        parts[f"l1_{name}"] = per_channel[idx].mean()
    return loss, parts


# -----------------------------------------------------------------------------------------
# The loop.

# Flags that may change between a run and its --resume; every other flag must match.
RESUMABLE = {"steps", "out", "resume", "device", "workers", "log_every", "save_every"}


def make_dataset(args):
    """The frame-pair dataset of data.py for the chosen source of frames and cues."""
    common = dict(size=args.size, base=args.base, gap=args.gap, crop=not args.no_crop,
                  seed=args.seed)
    if args.cues == "synthetic":
        return data.PairDataset.synthetic(args.synthetic_videos, args.synthetic_frames,
                                          args.synthetic_seed, cue_noise=args.cue_noise,
                                          cache=args.synthetic_videos, **common)
    folder = data.VideoFolder(args.data)
    return data.PairDataset(folder, with_cues=args.cues == "files", **common)


def feature_picture(lila, pair, path, device):
    """Frames t, t+Δ of a fixed pair beside their features (one PCA for both: shared colours)."""
    frames = pair["frames"].to(device)                                  # (2, 3, Hb, Wb)
    S = pair["grid_q"].shape[0]
    x = F.interpolate(frames, size=(S, S), mode="bilinear", align_corners=False)
    with torch.no_grad():
        _, feats = lila(x)                                              # (2, D, S, S)
    rgb = pca_rgb(torch.cat(list(feats.float().cpu()), dim=2))          # (S, 2S, 3)
    img = (x.permute(0, 2, 3, 1).cpu().numpy() * 255).astype(np.uint8)  # (2, S, S, 3)
    row = np.concatenate([img[0], img[1], rgb], axis=1)                 # (S, 4S, 3)
    Image.fromarray(row).save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


def main(argv=None, cue_nets=None):
    """cue_nets: optional (flow_net, depth_net) stand-ins for --cues hub (tests inject them
    so the real pre- and post-processing of cues.py runs without downloads)."""
    args = get_args(argv)
    rank, world = setup_distributed()
    device = pick_device(args.device, rank)
    cuda = device.type == "cuda"
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be divisible by the {world} processes")
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    config = dict(vars(args))
    if rank == 0:
        print(f"device {device}, precision {'bf16 autocast' if cuda else 'fp32'}, "
              f"{world} process(es)")
        print("config " + json.dumps(config, indent=1))

    # Resume: the checkpoint decides the step, the weights, the optimizer and the RNG.
    ckpt = None
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise SystemExit(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        diff = {k: (ckpt["config"].get(k), v) for k, v in config.items()
                if k not in RESUMABLE and ckpt["config"].get(k) != v}
        if diff:
            raise SystemExit(f"--resume: {ckpt_path} was written with other settings "
                             f"(checkpoint, now): {diff}")
    elif os.path.isfile(ckpt_path):
        raise SystemExit(f"{ckpt_path} exists: pass --resume to continue it, or another --out")
    torch.manual_seed(args.seed), np.random.seed(args.seed), random.seed(args.seed)
    start = ckpt["step"] if ckpt else 0

    # Data: a deterministic sampler, so the data order is a function of (seed, step).
    dataset = make_dataset(args)
    sampler = StepSampler(len(dataset), args.batch, start, args.steps, args.seed, rank, world)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch // world,
                                         sampler=sampler, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         persistent_workers=False)
    flow_cue = depth_cue = None
    if args.cues == "hub":
        nets = cue_nets or (None, None)
        flow_cue = cuelib.FlowCue(args.flow_net, hub_dir=args.hub_dir, net=nets[0]).to(device)
        depth_cue = cuelib.DepthCue(args.depth_net, hub_dir=args.hub_dir,
                                    net=nets[1]).to(device)

    # Model: frozen encoder + trainable decoder (+ the ERM head for the ablation).
    lila = model.build_lila(args.backbone, args.weights, args.preset, seed=args.seed).to(device)
    n_cues = (0 if args.no_flow else 2) + (0 if args.no_depth else 1) + \
             (0 if args.no_sd else args.sd_channels)
    erm_head = incontext.ERMHead(lila.decoder.out_dim, n_cues).to(device) if args.erm else None
    params = [p for p in lila.parameters() if p.requires_grad]
    params += list(erm_head.parameters()) if erm_head is not None else []
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.wd)
    if ckpt:
        lila.decoder.load_state_dict(ckpt["decoder"])
        if erm_head is not None:
            erm_head.load_state_dict(ckpt["erm_head"])
        opt.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
    if rank == 0:
        n_train = sum(p.numel() for p in params)
        print(f"{len(dataset)} pairs per epoch, {n_train / 1e6:.2f}M trainable parameters, "
              f"steps {start} -> {args.steps}")
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        log_path = os.path.join(args.out, "log.jsonl")
        if os.path.exists(log_path):  # keep only the steps the checkpoint has seen
            keep = [l for l in open(log_path) if l.strip() and json.loads(l)["step"] <= start]
            with open(log_path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(log_path + ".tmp", log_path)
        log = open(log_path, "a")
        val_pair = dataset[0]

    def save(step):
        atomic_save({"decoder": lila.decoder.state_dict(), "optimizer": opt.state_dict(),
                     "erm_head": erm_head.state_dict() if erm_head is not None else {},
                     "step": step, "rng": rng_state(), "config": config}, ckpt_path)

    lila.train()  # the decoder trains; LILA keeps its frozen encoder in eval mode
    bar = tqdm(total=args.steps, initial=start, disable=rank != 0, dynamic_ncols=True)
    t0, step, last_log, loss = time.time(), start, start, torch.tensor(float("nan"))
    for batch in loader:
        # Everything random in a step is a function of (seed, step): exact resumes.
        sd_gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr
        for group in opt.param_groups:
            group["lr"] = lr
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}

        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            v = views_and_cues(batch, lila, args, flow_cue, depth_cue, sd_gen)
        loss, parts = lila_loss(v, args, erm_head)                     # fp32

        bad = [k for k, x in {"loss": loss.detach(), **parts}.items()
               if not math.isfinite(float(x))]
        if bad:
            raise SystemExit(f"step {step}: non-finite {', '.join(bad)} "
                             f"(loss {float(loss.detach())}); stopping. Last checkpoint: {ckpt_path}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:  # average gradients over processes (what DDP does, spelled out)
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        opt.step()
        step += 1
        loss = loss.detach()

        if rank == 0:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.4f}")
            if step % args.log_every == 0 or step == args.steps:
                dt = time.time() - t0
                row = {"step": step, "loss": float(loss),
                       **{k: float(x) for k, x in parts.items()},
                       **{f"conf_{k}": x for k, x in v["shares"].items()}, "lr": lr,
                       "seconds": round(dt, 3),
                       "pairs_per_s": round((step - last_log) * args.batch / max(dt, 1e-9), 2)}
                log.write(json.dumps(row) + "\n")
                log.flush()
                t0, last_log = time.time(), step
            if step % args.save_every == 0 or step == args.steps:
                save(step)
                feature_picture(lila, val_pair, os.path.join(args.out, f"feats_{step:07d}.png"),
                                device)
    bar.close()
    if rank == 0:
        print(f"done: step {step}, loss {float(loss):.4f}, checkpoint {ckpt_path}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        # Bad input (a wrong path, missing weights offline, an unreadable file) already has a
        # message naming what is wrong: print it without the traceback. Anything else is a bug
        # and keeps its traceback.
        if isinstance(e, FileNotFoundError) or str(e).split(":")[0].split()[0].endswith(".py"):
            sys.exit(f"train.py: {e}")
        raise
