"""Train LILA: the training loop, written out top to bottom.

Paper: "Featurising Pixels from Dynamic 3D Scenes with Linear In-Context Learners"
(Araslanov et al., CVPR 2026), section 3 (method) and the training details of section 4;
official code: lila/train_lila.py, lila/lila/dpt_lila.py (TrainLILA), lila/dataload.py.

One step, for a batch of B frame pairs (t, t+Δ) of the same video:
  1. two views per pair (data.py): the *query* view is a random crop of frame t, the *context*
     view a crop of frame t+Δ, both cut sharp from the 480 px base frames, with their grids;
  2. cues on the base frames at the cue resolution (RAFT flow + MiDaS depth on the fly, the cue
     cache, or the exact cues of the synthetic scenes), warped into each view with its grid;
  3. the frozen DINOv2 encoder and the trainable DPT decoder give pixel features of both views
     (model.py); the self-distillation cue is made from the encoder grid (cues.py, PAMR);
  4. the linear in-context loss (incontext.py): a ridge map fitted on the context view's
     features -> cues, applied to the query view's features, L1 + edge loss against the
     query's cues. Only the decoder learns.

Shapes: B pairs, S view side (224 paper, 112 tiny), Hb base-frame side, E encoder width,
D pixel-feature width, K cue channels (2 flow + 1 depth + 32 SD = 35).

Differences from the official code (README "Differences" lists them all): the ridge system is
solved by Cholesky instead of LU; the learning rate is constant (official: x0.99 every 10
epochs of 2000 steps, 5-10 % over the whole run); frame t is drawn from 0..T-2, so t+Δ is always
another frame (official: 0..T-1, clamped, so the last frame pairs with itself).

Run:
  python train.py --preset tiny --weights none        # CPU, synthetic scenes, ~4 min
  python train.py --data ytvos/                       # one GPU, YouTube-VOS, RAFT + MiDaS
  torchrun --nproc_per_node 4 train.py --data ytvos/  # several GPUs (gradients all-reduced)
Ctrl-C (or SIGTERM) saves a checkpoint at the current step; add --resume to continue.
"""
import argparse
import json
import math
import os
import random
import shlex
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import model
import cues as cuelib
import incontext
from runs import (FeaturePicture, RunFolder, StopOnSignal, UserError, atomic_save, rng_state,
                  set_rng_state, user_message, write_error)


# -----------------------------------------------------------------------------------------
# Config: one argparse surface, grouped, paper defaults.

# Per preset: the view side, pairs per step, and a run that fits the machine it is for.
# paper: the paper's 100k steps of 32 pairs at 224², AdamW 1e-4 (one GPU, about a day); tiny: a
# CPU run that finishes by itself in a few minutes (200 steps at 1e-3, the setting that the
# synthetic evidence of GUIDE.md measures) and checkpoints every ~30 s, so a stop loses little.
PRESET_RUN = {
    "paper": dict(size=224, batch=32, steps=100_000, lr=1e-4, save_every=1000),
    "tiny": dict(size=112, batch=8, steps=200, lr=1e-3, save_every=25),
}


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
                   help="corrupt synthetic cues like real networks err (0 = exact, 1 = strong)")
    g.add_argument("--gap", type=int, default=5, help="max frame gap Δ (paper: 5)")
    g.add_argument("--size", type=int, default=None, help="view side in px, multiple of 14 "
                   "(paper preset 224, tiny 112)")
    g.add_argument("--base", type=int, default=None, help="side in px of the base frames the "
                   "cues are computed on (paper 224, tiny: the view side)")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader worker processes (0: load in the main process)")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="dinov2_vits14", choices=list(model.BACKBONES),
                   help="frozen DINOv2 encoder (paper: ViT-S/14)")
    g.add_argument("--weights", default="hub", help="encoder weights: hub (torch.hub cache in "
                   "TORCH_HOME), a local .pth path, or none (seeded random init, offline)")
    g.add_argument("--preset", default="paper", choices=list(model.PRESETS),
                   help="decoder widths, view size and run length: paper (the paper's decoder, "
                   "224², 32 pairs, 100k steps) or tiny (small decoder, 112², 8 pairs, 200 "
                   "steps: a few minutes on a CPU)")
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
    g.add_argument("--steps", type=int, default=None, help="training steps (paper preset "
                   "100k as the paper, tiny 200)")
    g.add_argument("--batch", type=int, default=None, help="frame pairs per step, all "
                   "processes together (paper preset 32, tiny 8)")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate (paper preset "
                   "1e-4 as the paper; tiny 1e-3, for its 200 steps)")
    g.add_argument("--wd", type=float, default=1e-4, help="AdamW weight decay (paper 1e-4)")
    g.add_argument("--warmup", type=int, default=0, help="linear LR warm-up steps")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/lila", help="output folder, owned by this run: "
                   "ckpt.pt, config.json, log.jsonl, feature pictures")
    g.add_argument("--resume", action="store_true", help="continue the run in OUT")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--seed", type=int, default=0, help="seed of data order, crops, SD channels "
                   "and of the random encoder when --weights none")
    g.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    g.add_argument("--save-every", type=int, default=None, help="steps between checkpoints "
                   "and feature pictures (paper preset 1000, tiny 25)")
    args = p.parse_args(argv)
    for k, v in PRESET_RUN[args.preset].items():       # preset defaults for what was not given
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.base is None:   # cues on base frames: 224² (paper), the view side (tiny)
        args.base = args.size if args.preset == "tiny" else 224
    if args.cues == "auto":
        args.cues = ("synthetic" if args.data is None else
                     "files" if os.path.isdir(os.path.join(args.data, "Cues")) else "hub")
    check_args(p, args)
    return args


def check_args(p, args):
    """Every flag's range, before anything runs: one line (argparse's p.error) per problem."""
    finite = lambda x: math.isfinite(x)  # noqa: E731
    rules = [
        (args.size > 0 and args.size % 14 == 0, f"--size {args.size} must be a positive multiple of 14 (ViT patch size)"),
        (args.base >= 8, f"--base {args.base} must be at least 8 px"),
        (args.batch >= 1, f"--batch {args.batch} must be >= 1"),
        (args.steps >= 1, f"--steps {args.steps} must be >= 1"),
        (finite(args.lr) and args.lr > 0, f"--lr {args.lr} must be a finite number > 0"),
        (finite(args.wd) and args.wd >= 0, f"--wd {args.wd} must be a finite number >= 0"),
        (args.warmup >= 0, f"--warmup {args.warmup} must be >= 0"),
        (finite(args.lam) and args.lam > 0, f"--lam {args.lam} must be a finite number > 0"),
        (finite(args.gamma) and args.gamma >= 0, f"--gamma {args.gamma} must be a finite number >= 0"),
        (finite(args.cue_noise) and args.cue_noise >= 0, f"--cue-noise {args.cue_noise} must be >= 0"),
        (args.gap >= 1, f"--gap {args.gap} must be >= 1 (frames between the two of a pair)"),
        (args.log_every >= 1, f"--log-every {args.log_every} must be >= 1"),
        (args.save_every >= 1, f"--save-every {args.save_every} must be >= 1"),
        (args.workers >= 0, f"--workers {args.workers} must be >= 0"),
        (0 <= args.seed < 2**32, f"--seed {args.seed} must lie in 0..2**32-1"),
        (args.synthetic_videos >= 1, f"--synthetic-videos {args.synthetic_videos} must be >= 1"),
        (args.synthetic_frames >= 2, f"--synthetic-frames {args.synthetic_frames} must be >= 2"),
        (1 <= args.sd_channels <= model.BACKBONES[args.backbone].embed_dim,
         f"--sd-channels {args.sd_channels} must lie in 1..{model.BACKBONES[args.backbone].embed_dim} "
         f"(the width of {args.backbone})"),
        (not (args.no_flow and args.no_depth and args.no_sd), "--no-flow --no-depth --no-sd leaves no cue to learn from"),
        (not (args.cues == "synthetic" and args.data is not None),
         "--cues synthetic renders its own scenes; drop --data or pick --cues files/hub"),
        (not (args.cues in ("files", "hub") and args.data is None), f"--cues {args.cues} needs --data ROOT"),
        (not (args.cues == "files" and args.data and not os.path.isdir(os.path.join(args.data, "Cues"))),
         f"--cues files: there is no cue cache {os.path.join(args.data or '', 'Cues')}; write it with "
         f"`python cues.py --data {args.data}` or use --cues hub"),
        (not os.path.isfile(args.out), f"--out {args.out} is a file; give a folder"),
    ]
    for ok, msg in rules:
        if not ok:
            p.error(msg)
    if args.device != "auto":
        try:
            dev = torch.device(args.device)
        except RuntimeError as e:
            p.error(f"--device {args.device}: {e}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            p.error(f"--device {args.device}: this machine has no CUDA GPU (or torch is a CPU build); use --device cpu")


# -----------------------------------------------------------------------------------------
# Plumbing: distributed set-up, the step sampler (the run folder, checkpoints, signals and
# pictures are in runs.py).

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
            if k % self.world == self.rank:  # epoch * n + i: new frames and crops each epoch
                yield epoch * self.n + int(perm[k % self.n])

    def __len__(self):
        return (self.steps - self.start) * self.batch // self.world


def warn(message):
    """A warning on stderr that does not break the progress bar."""
    tqdm.write(message, file=sys.stderr)


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
    spread = {}   # each cue's std over the batch before z-scoring: 0 means it teaches nothing
    with torch.no_grad():
        if not args.no_flow:
            spread["flow"] = float(torch.cat([flow_c, flow_q]).std())
            a, b = zscore(flow_c, flow_q)
            cc.append(a), cq.append(b), names.extend(["flow_x", "flow_y"])
            kc.extend([fconf_c, fconf_c]), kq.extend([fconf_q, fconf_q])  # one per flow channel
        if not args.no_depth:
            spread["depth"] = float(torch.cat([depth_c, depth_q]).std())
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
        out = dict(shares=shares, spread=spread, feats_q=feats_q, feats_c=feats_c, img_q=img_q, img_c=img_c,
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
        loss, parts = incontext.erm_loss(erm_head, v["feats_q"], v["feats_c"], v["cue_q"],
                                         v["cue_c"], v["conf_q"], v["conf_c"], **kw)
    else:
        loss, parts = incontext.incontext_loss(v["feats_q"], v["feats_c"], v["cue_q"], v["cue_c"],
                                               v["conf_q"], v["conf_c"], **kw)
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
                                          args.synthetic_seed, cue_noise=args.cue_noise, **common)
    folder = data.VideoFolder(args.data)
    return data.PairDataset(folder, with_cues=args.cues == "files", **common)


def main(argv=None, cue_nets=None):
    """cue_nets: optional (flow_net, depth_net) stand-ins for --cues hub (tests inject them
    so the real pre- and post-processing of cues.py runs without downloads)."""
    cli = sys.argv[1:] if argv is None else list(argv)
    args = get_args(cli)
    rank, world = setup_distributed()
    if args.batch % world:
        raise UserError(f"--batch {args.batch} must be divisible by the {world} processes")
    run = RunFolder(args.out)
    if rank == 0:
        run.acquire(args.resume)        # one run per folder; released on exit (and on kill)
    try:
        return train(args, run, rank, world, cli, cue_nets)
    finally:
        if rank == 0:
            run.release()
        if world > 1:
            dist.destroy_process_group()


def train(args, run, rank, world, cli, cue_nets=None):
    """The run itself: set-up, the loop, checkpoints. cli: the command-line arguments (for the
    line that says how to resume)."""
    device = pick_device(args.device, rank)
    cuda = device.type == "cuda"
    config = dict(vars(args))
    ckpt = run.check(args, config, RESUMABLE)  # the checkpoint decides step, weights, optimizer, RNG
    start = ckpt["step"] if ckpt else 0
    ckpt_path = run.file("ckpt.pt")
    torch.manual_seed(args.seed), np.random.seed(args.seed), random.seed(args.seed)

    # Data: a deterministic sampler, so the data order is a function of (seed, step).
    dataset = make_dataset(args)
    sampler = StepSampler(len(dataset), args.batch, start, args.steps, args.seed, rank, world)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch // world,
                                         sampler=sampler, num_workers=args.workers,
                                         pin_memory=cuda, drop_last=True,
                                         worker_init_fn=StopOnSignal.ignore_in_worker)
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

    # Everything is checked and built: only now the config (the one used) and the run files.
    if rank == 0:
        print(f"device {device}, precision {'bf16 autocast' if cuda else 'fp32'}, "
              f"{world} process(es)")
        print("config " + json.dumps(config))
        print(f"{len(dataset)} videos per epoch, {sum(p.numel() for p in params) / 1e6:.2f}M "
              f"trainable parameters, steps {start} -> {args.steps}")
        if run.rewind_log(start):
            print(f"{run.file('log.jsonl')}: dropped a damaged line (a run killed mid-write)")
        try:
            with open(run.file("config.json") + ".tmp", "w") as f:
                json.dump(config, f, indent=1)
            os.replace(run.file("config.json") + ".tmp", run.file("config.json"))
        except OSError as e:
            raise write_error(run.file("config.json"), e) from None
        log = open(run.file("log.jsonl"), "a")
        picture = FeaturePicture(dataset[0], ckpt.get("picture") if ckpt else None)

    def save(step):
        atomic_save({"decoder": lila.decoder.state_dict(), "optimizer": opt.state_dict(),
                     "erm_head": erm_head.state_dict() if erm_head is not None else {},
                     "step": step, "rng": rng_state(), "config": config,
                     "picture": picture.state}, ckpt_path)

    stop = StopOnSignal()

    def stopping():             # every process must agree, or the next all_reduce would hang
        flag = torch.tensor(float(stop.name is not None), device=device)
        if world > 1:
            dist.all_reduce(flag)
        return bool(flag > 0)

    lila.train()  # the decoder trains; LILA keeps its frozen encoder in eval mode
    bar = tqdm(total=args.steps, initial=start, disable=rank != 0, dynamic_ncols=True)
    t0, step, last_log, loss = time.time(), start, start, torch.tensor(float("nan"))
    shares, spreads, skipped, skipped_all = [], [], 0, 0   # per log interval (skipped_all: run)
    batches = iter(loader)
    try:
        while step < args.steps and not stopping():
            try:
                batch = next(batches)
            except Exception:       # a worker died because of the signal: stop as asked
                if stop.name is None:
                    raise
                break
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
                raise UserError(f"step {step}: non-finite {', '.join(bad)} (loss "
                                f"{float(loss.detach())}); stopping, nothing saved. Last checkpoint: "
                                f"{ckpt_path}. A smaller --lr (or a --warmup) usually helps")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:  # average gradients over processes (what DDP does, spelled out)
                for p in params:
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world
            opt.step()
            if not bool(torch.stack([p.isfinite().all() for p in params]).all()):
                raise UserError(f"step {step}: the update made the weights non-finite (--lr "
                                f"{args.lr}); stopping, nothing saved. Last checkpoint: {ckpt_path}")
            step += 1
            loss = loss.detach()
            shares.append(v["shares"]), spreads.append(v["spread"])
            skipped += int(batch["skipped"].sum())       # pairs that failed to load, replaced

            if rank == 0:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss):.4f}")
                if step % args.log_every == 0 or step == args.steps:
                    dt = time.time() - t0
                    conf = {f"conf_{k}": float(np.mean([s[k] for s in shares])) for k in shares[-1]}
                    row = {"step": step, "loss": float(loss), **{k: float(x) for k, x in parts.items()},
                           **conf, "skipped_pairs": skipped, "lr": lr, "seconds": round(dt, 3),
                           "pairs_per_s": round((step - last_log) * args.batch / max(dt, 1e-9), 2)}
                    try:
                        log.write(json.dumps(row) + "\n")
                        log.flush()
                    except OSError as e:
                        raise write_error(log.name, e, f"the last checkpoint {ckpt_path} is intact "
                                          f"(a line cut off is dropped on resume)") from None
                    # A broken cue cache shows here: a cue that teaches nothing.
                    for k, x in conf.items():
                        if x < 0.1:  # healthy cues: most pixels; broken ones: almost none
                            warn(f"train.py: warning: steps {last_log + 1}-{step}: only "
                                 f"{100 * x:.2f} % of the query pixels have a confident "
                                 f"{k[5:]} cue; check the cues (python data.py --preview)")
                    for k in spreads[-1]:
                        if max(sp[k] for sp in spreads) < 1e-6:   # e.g. one disparity everywhere
                            warn(f"train.py: warning: steps {last_log + 1}-{step}: the {k} "
                                 f"cue is constant in every batch, so it teaches nothing; "
                                 f"check the cues (python data.py --preview)")
                    if skipped:
                        warn(f"train.py: warning: steps {last_log + 1}-{step}: {skipped} pairs "
                             f"failed to load and were replaced (the messages above name them)")
                    t0, last_log, shares, spreads = time.time(), step, [], []
                    skipped_all, skipped = skipped_all + skipped, 0
                if step % args.save_every == 0 or step == args.steps:
                    save(step)
                    try:
                        picture.save(lila, run.file(f"feats_{step:07d}.png"), step, device)
                    except OSError as e:
                        raise write_error(run.file(f"feats_{step:07d}.png"), e,
                                          f"the checkpoint of step {step} is saved") from None
    finally:
        del batches   # shuts the DataLoader workers down now, also when an error ends the run
    bar.close()
    if stop.name is not None:
        if rank == 0:
            save(step)
            again = shlex.join(["python", "train.py"] + [a for a in cli if a != "--resume"]
                               + ["--resume"])
            print(f"train.py: stopped by {stop.name} at step {step}; checkpoint {ckpt_path}. "
                  f"Continue with: {again}", file=sys.stderr)
        raise SystemExit(128 + getattr(signal, stop.name))
    if rank == 0:
        replaced = f", {skipped_all + skipped} pairs replaced (failed to load)" if skipped_all + skipped else ""
        print(f"done: step {step}, loss {float(loss):.4f}, checkpoint {ckpt_path}{replaced}")
    return step


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:   # a second Ctrl-C: quit now, the last checkpoint stays
        sys.exit("train.py: interrupted; the last checkpoint is kept (add --resume to continue)")
    except Exception as e:      # noqa: BLE001 - the user's errors in one line, bugs in full
        msg = user_message(e)
        if msg is None:
            raise
        sys.exit(f"train.py: error: {msg}")
