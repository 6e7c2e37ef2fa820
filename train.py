"""Train LILA: the method first, then the loop written out, then the plumbing.

Paper: "Featurising Pixels from Dynamic 3D Scenes with Linear In-Context Learners"
(Araslanov et al., CVPR 2026), section 3 and the training details of section 4; official
code: lila/train_lila.py, lila/lila/dpt_lila.py (TrainLILA.forward_cross).

One step, for B frame pairs (t, t+Δ), each of one video:
  views     query q: a crop of frame t (own flip); context c: a crop of frame min(t+Δ, T-1)
            of the T-frame video; a shared flip mirrors both frames first (data.py)
  cues      g: flow and depth of the base frames warped into each view and z-scored, plus the
            self-distillation (SD) cue of the encoder grid (cues.py, pamr.py)
  features  f = decoder(encoder(view)): the DINOv2 encoder frozen, the DPT decoder trains
  loss      W* = ridge fit of g_c on f_c (closed form), L = L1(f_q W*, g_q) + γ edge
            (incontext.py); the gradient reaches f_q directly and f_c through W*.

Shapes: B pairs, S view side (224 paper, 112 tiny), Hb base-frame side (--base: 224 paper,
the view side tiny), E encoder width,
h x w patch grid, D pixel-feature width, K cue channels (2 flow + 1 depth + 32 SD = 35),
Cm masked cue channels ([flow-x, flow-y, depth]). Deviations: README, "Differences".

Run:
  python train.py --preset tiny --weights none        # CPU, synthetic scenes: 6 min, 2 cores
  python train.py --data ytvos/                       # one GPU, YouTube-VOS, RAFT + MiDaS
  python train.py --data ytvos/ --micro-batch 8       # the same steps in chunks: less memory
  python train.py --data ytvos/ --val davis/          # + DAVIS val J&F while training, best.pt
  torchrun --nproc_per_node 4 train.py --data ytvos/  # 4 GPUs, the same steps (DDP; GUIDE.md)
  python train.py step-picture --ckpt runs/lila/ckpt.pt --out step.png   # one step, drawn
Ctrl-C (or SIGTERM, SIGHUP, SIGUSR1) saves a checkpoint at the current step; add --resume.
"""
import argparse
import contextlib
import datetime
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
import torch.nn as nn
from tqdm import tqdm

import data
import model
import cues as cuelib
import incontext
import runs
from extract import FeaturePicture
from runs import (RunFolder, StopOnSignal, UserError, atomic_save, out_of_memory,
                  rng_state, set_rng_state, set_threads, user_message, write_error)


# -----------------------------------------------------------------------------------------
# The method: from a batch of frame pairs to the LILA loss.

def zscore(q, c, eps=1e-3, world=1):
    """One cue of the query and of the context view, (B, C, S, S) each, z-scored with ONE
    scalar mean and std over the batch, both views and all channels: (x - mean) / (eps + std)
    (official dpt_lila.py RFFEncoder.seed / renorm, eps 1e-3). world: processes that share the
    batch (torchrun); the mean and std are then the whole batch's (`whole_std_mean`).
    One scalar per cue: flow (image units) and depth (log units) come out on one scale, so the
    L1 weighs them alike, and flow-x : flow-y keeps its ratio (the direction of motion).
    Shared by both views: W* is fitted on the context and read on the query, so a value must
    mean the same in both; a mean and std per view would shift and stretch one view's cue
    against the other's, and the map fitted on one would be wrong on the other."""
    std, mean = whole_std_mean(torch.cat([c, q]), world)               # scalars
    return (q - mean) / (eps + std), (c - mean) / (eps + std)


def step_cues(batch, args, flow_cue=None, depth_cue=None, sd_gen=None, ranks=(0, 1)):
    """What a step learns from, for the WHOLE batch (also in micro-batches) and without
    gradient. batch (data.PairDataset): views (B, 2, 3, S, S) [query of frame t, context of
    frame min(t+Δ, T-1)]; frames (B, 2, 3, Hb, Wb) the base frames (Hb, Wb: the --base side,
    224 in the paper preset, the view side in the tiny one); grid_q, grid_c (B, S, S, 2).
    ranks (rank, world): this process holds rows rank, rank + world, ... of a batch shared by
    `world` processes (torchrun); the SD subsets and the z-scoring are the whole batch's.
    Returns img_q, img_c (B, 3, S, S); the z-scored flow and depth cue_q, cue_c (B, Cm, S, S)
    and their confidences conf_q, conf_c (B, Cm, S, S); the SD channels of each pair (B, C);
    the K cue names; shares (confident query pixels) and spread (std before z-scoring): logged."""
    img_q, img_c = batch["views"][:, 0], batch["views"][:, 1]          # (B, 3, S, S)
    f_t, f_t2 = batch["frames"][:, 0], batch["frames"][:, 1]            # (B, 3, Hb, Wb)
    grid_q, grid_c = batch["grid_q"], batch["grid_c"]                   # (B, S, S, 2)
    # Flow and depth on the BASE frames (never on the crops), then warped into each view. The
    # cue networks run in float32 even inside the step's autocast, so on-the-fly cues equal
    # the cached ones (cues.py).
    with torch.no_grad(), torch.autocast(img_q.device.type, enabled=False):
        if args.cues == "hub":
            flow_fwd, flow_bwd = flow_cue(f_t, f_t2)                   # (B, 2, Hb, Wb) each
            disp_t, disp_t2 = depth_cue(torch.cat([f_t, f_t2])).chunk(2)  # (B, 1, Hb, Wb) each
        else:
            flow_fwd, flow_bwd = batch["flow_fwd"], batch["flow_bwd"]
            disp_t, disp_t2 = batch["disparity"][:, 0], batch["disparity"][:, 1]
        conf_t = cuelib.flow_confidence(flow_fwd, flow_bwd)             # (B, 1, Hb, Wb)
        conf_t2 = cuelib.flow_confidence(flow_bwd, flow_fwd)            # (B, 1, Hb, Wb)
        depth, valid = cuelib.disparity_to_depth(torch.cat([disp_t, disp_t2]))
        depth_t, depth_t2 = depth.chunk(2)                              # (B, 1, Hb, Wb)
        valid_t, valid_t2 = valid.chunk(2)
        # Query = frame t with its FORWARD flow; context = frame t+Δ with its NEGATED backward
        # flow: a point's two values then say the same ("where this point is heading", t -> t+Δ),
        # so one linear map reads both views. Warping copies values: a view's OWN flip or zoom
        # leaves them alone, as the cue networks never saw the crop (data.warp); the pair's
        # SHARED flip, done before on frames and cues, mirrors the motion (data.hflip_cues).
        flow_q, flow_c = data.warp(flow_fwd, grid_q), data.warp(-flow_bwd, grid_c)  # (B, 2, S, S)
        depth_q, depth_c = data.warp(depth_t, grid_q), data.warp(depth_t2, grid_c)  # (B, 1, S, S)
        fconf_q, fconf_c = data.warp(conf_t, grid_q), data.warp(conf_t2, grid_c)
        dval_q, dval_c = data.warp(valid_t, grid_q), data.warp(valid_t2, grid_c)

        cue_q, cue_c, conf_q, conf_c, names, spread = [], [], [], [], [], {}
        if not args.no_flow:                         # masked channels first, one conf each
            spread["flow"] = float(torch.cat([flow_c, flow_q]).std())
            q, c = zscore(flow_q, flow_c, world=ranks[1])
            cue_q.append(q), cue_c.append(c), names.extend(["flow_x", "flow_y"])
            conf_q.extend([fconf_q, fconf_q]), conf_c.extend([fconf_c, fconf_c])
        if not args.no_depth:
            spread["depth"] = float(torch.cat([depth_c, depth_q]).std())
            q, c = zscore(depth_q, depth_c, world=ranks[1])
            cue_q.append(q), cue_c.append(c), names.append("depth")
            conf_q.append(dval_q), conf_c.append(dval_c)
        B, E = img_q.shape[0], model.BACKBONES[args.backbone].embed_dim
        # SD: a random subset of the encoder's channels PER PAIR (official random_subset), the
        # same for both views of the pair; drawn for the whole batch, this process's rows kept.
        rank, world = ranks
        sd_channels = (None if args.no_sd else cuelib.sd_channels(
            E, args.sd_channels, sd_gen, batch=B * world)[rank::world])  # (B, C)
        names.extend([] if args.no_sd else ["sd"] * args.sd_channels)
        empty = img_q.new_zeros(B, 0, *img_q.shape[-2:])
        cat = lambda maps: torch.cat(maps, 1) if maps else empty  # noqa: E731
        shares = {n: float((k > 0).float().mean()) for n, k in (("flow", fconf_q), ("depth", dval_q))
                  if not getattr(args, f"no_{n}")}
    return dict(img_q=img_q, img_c=img_c, cue_q=cat(cue_q), cue_c=cat(cue_c),  # (B, Cm, S, S)
                conf_q=cat(conf_q), conf_c=cat(conf_c), sd_channels=sd_channels, names=names,
                shares=shares, spread=spread)


def features_and_sd(cues, lila, args, decoder=None):
    """`step_cues` (or a chunk of them) + feats_q, feats_c (B, D, S, S) and the SD cue appended
    to cue_q, cue_c (B, K, S, S): both need the encoder. decoder: lila.decoder as it trains."""
    img = torch.cat([cues["img_q"], cues["img_c"]])                    # (2B, 3, S, S)
    grids = lila.encode(img)                                            # 4 x (2B, E, h, w), frozen
    feats = (decoder or lila.decoder)(grids, size=img.shape[-2:])       # (2B, D, S, S)
    feats_q, feats_c = feats.float().chunk(2)
    v = dict(cues, feats_q=feats_q, feats_c=feats_c)
    if not args.no_sd:
        # L2-normalised per pixel, not z-scored: only its direction means something (cues.py).
        ch = cues["sd_channels"].to(img.device)                         # (B, C)
        with torch.no_grad():
            sd = cuelib.sd_cue(grids[-1].float(), img, channels=torch.cat([ch, ch]),
                               use_pamr=not args.no_pamr)               # (2B, C, S, S)
        sd_q, sd_c = sd.chunk(2)
        v["cue_q"], v["cue_c"] = torch.cat([cues["cue_q"], sd_q], 1), torch.cat([cues["cue_c"], sd_c], 1)
    return v


def lila_loss(v, args, erm_head=None, norms=None):
    """The in-context loss (or, with --erm, the ablation without the in-context step).
    Why the closed-form W* trains the features: W* = (X_c^T C X_c / N + λI)^-1 X_c^T C Y_c / N is
    a differentiable function of the context features (nothing is detached, as in the official
    forward_cross), so the gradient reaches BOTH views: the query features directly through
    f_q W*, the context features through the solve. The decoder thus learns features on which
    a map fitted on one frame predicts the cues of another: that transfer is all that is scored.
    norms: the whole batch's element counts for a chunk of it (incontext.loss_norms). Returns
    (loss, parts): scalar tensors "l1", "edge" and each cue's L1 ("l1_sd": over its channels)."""
    kw = dict(lam=args.lam, gamma=args.gamma,
              edge=not args.no_edge)     # --no-edge skips the edge terms, not just their weight
    if norms is not None:
        kw["norms"] = norms
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


def bf16(device):
    """bf16 autocast on a GPU, float32 on a CPU. The cue networks and the ridge fit switch it
    off for themselves; the loss runs outside it."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def lila_step(batch, lila, args, flow_cue=None, depth_cue=None, sd_gen=None, decoder=None,
              erm_head=None):
    """One LILA step on a batch of pairs, up to the loss: the method without the plumbing.
    train.py runs exactly this on one process without --micro-batch; `shared_step` runs the
    same step in chunks and/or on several processes, with the same gradient.
    Returns (loss, parts, v): v holds the views, cues (B, K, S, S) and features (B, D, S, S)."""
    with bf16(batch["views"].device):
        cues = step_cues(batch, args, flow_cue, depth_cue, sd_gen)  # flow, depth: no gradient
        v = features_and_sd(cues, lila, args, decoder)               # f_q, f_c and the SD cue
    loss, parts = lila_loss(v, args, erm_head)   # W* on the context, L1 + edge on the query
    return loss, parts, v


# -----------------------------------------------------------------------------------------
# The loop.

def train(args, run, rank, world, cli, cue_nets=None, ready=None):
    """The run: set-up, the loop, checkpoints. cli: the command-line arguments (for the line
    that says how to resume); cue_nets: stand-ins for RAFT and MiDaS (tests); ready: what
    before_step_1 checked (the config, the checkpoint, the validation plan)."""
    device = pick_device(args.device, rank)
    cuda = device.type == "cuda"
    threads = set_threads(args.workers)        # CPU threads that fit the cores (runs.py)
    config, ckpt, val_plan = ready or before_step_1(args, run, rank, world)  # the checkpoint decides step, weights, optimizer, RNG
    start = ckpt["step"] if ckpt else 0
    torch.manual_seed(args.seed), np.random.seed(args.seed), random.seed(args.seed)

    # Data: the data order is a function of (seed, step), the same split on every rank.
    dataset = make_dataset(args)
    sampler = StepSampler(len(dataset), args.batch, start, args.steps, args.seed, rank, world)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch // world, sampler=sampler,
                                         num_workers=args.workers, pin_memory=cuda, drop_last=True,
                                         worker_init_fn=StopOnSignal.ignore_in_worker)
    flow_cue, depth_cue = make_cue_nets(args, device, cue_nets)

    # Model: frozen encoder + trainable decoder (+ the ERM head of the ablation).
    lila = model.build_lila(args.backbone, args.weights, args.preset, seed=args.seed).to(device)
    n_cues = (0 if args.no_flow else 2) + (0 if args.no_depth else 1) + (0 if args.no_sd else args.sd_channels)
    erm_head = incontext.ERMHead(lila.decoder.out_dim, n_cues).to(device) if args.erm else None
    trainable = Trainable(lila.decoder, erm_head)
    opt = torch.optim.AdamW(trainable.parameters(), lr=args.lr, weight_decay=args.wd)
    if ckpt:   # the decoder, the optimizer and the random streams go on where they stopped
        trainable.load_state_dict({f"{k}.{n}": x for k in ("decoder", "erm_head") for n, x in ckpt[k].items()})
        opt.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
    decoder = distributed(trainable, device, world)    # the decoder as it trains (DDP or itself)

    n_params = sum(p.numel() for p in trainable.parameters())
    out = RunOutput(run, args, config, rank, world, device, dataset, ckpt, start, n_params, threads, val_plan)
    stop = StopOnSignal()
    lila.train()  # the decoder trains; LILA keeps its frozen encoder in eval mode
    step, loss = start, torch.tensor(float("nan"))
    batches = iter(loader)
    try:
        if rank == 0 and ckpt is None and args.val is not None:
            out.validate_untrained(lila, trainable, opt, device)   # step 0: may be best.pt
        while step < args.steps and not agree(stop.name is not None, device, world):
            batch = next_batch(batches, stop)
            if batch is None:
                break
            # Everything random in a step is a function of (seed, step): exact resumes.
            sd_gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
            lr = args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr
            for group in opt.param_groups:
                group["lr"] = lr
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}

            # --- the step: the method's lila_step, or the same step in chunks / on N processes ---
            opt.zero_grad(set_to_none=True)
            check = lambda loss, parts: check_finite(step, loss, parts, out.ckpt_path, device, world)  # noqa: E731
            if world == 1 and args.micro_batch == 0:
                loss, parts, cues = lila_step(batch, lila, args, flow_cue, depth_cue, sd_gen,
                                              decoder, erm_head)
                check(loss, parts)
                loss.backward()
                loss = loss.detach()
            else:   # backward inside, chunk by chunk
                loss, parts, cues = shared_step(batch, lila, args, flow_cue, depth_cue, sd_gen,
                                                decoder, erm_head, check, (rank, world))
            opt.step()
            check_weights(step, trainable, args, out.ckpt_path, device, world)
            step += 1

            if rank == 0:
                val = out.validate(step, lila, device)            # DAVIS val J&F, when due
                out.after_step(step, loss, parts, cues, int(batch["skipped"].sum()), lr, val)
                if step % args.save_every == 0 or step == args.steps or val is not None:
                    out.save(step, lila, trainable, opt, device, val)
    except Exception as e:  # noqa: BLE001 - whatever ends the run mid-way: first save the steps since the last checkpoint
        err = out.rescue(e, step, lila, trainable, opt, device)
        if err is e:
            raise
        raise err from None
    finally:
        del batches   # shuts the DataLoader workers down now, also when an error ends the run
    return out.finish(step, loss, stop, cli, lila, trainable, opt, device)


def main(argv=None, cue_nets=None):
    """cue_nets: optional (flow_net, depth_net) stand-ins for --cues hub (tests inject them
    so the real pre- and post-processing of cues.py runs without downloads)."""
    cli = sys.argv[1:] if argv is None else list(argv)
    args = get_args(cli)
    rank, world = setup_distributed(args)
    run = RunFolder(args.out)
    try:
        try:    # every input of the run, before step 1: a failure on any rank ends them all here
            failed, ready = None, before_step_1(args, run, rank, world)
        except Exception as e:  # noqa: BLE001 - raised below, once the other ranks know
            failed = e
        first = first_failing(failed is not None, pick_device(args.device, rank), world)
        if first is not None:           # said once, by the first rank that failed
            raise failed if first == rank else SystemExit(1)
        return train(args, run, rank, world, cli, cue_nets, ready)
    finally:
        if rank == 0:
            run.release()
        if world > 1:
            dist.destroy_process_group()


# -----------------------------------------------------------------------------------------
# --- plumbing --- config, data and cue networks, micro-batches, processes, checks, run files.

# Per preset: the view side, pairs per step, and a run that fits the machine it is for.
# paper: the paper's 100k steps of 32 pairs at 224², AdamW 1e-4 (one GPU, about a day); tiny: a
# CPU run that finishes by itself in a few minutes (200 steps at 1e-3, the setting that the
# synthetic evidence of GUIDE.md measures) and checkpoints every ~30 s, so a stop loses little.
PRESET_RUN = {
    "paper": dict(size=224, batch=32, steps=100_000, lr=1e-4, save_every=1000, val_probe="lp",
                  val_every=2000, flow_net="raft_large", depth_net="DPT_Large"),
    "tiny": dict(size=112, batch=8, steps=200, lr=1e-3, save_every=25, val_probe="knn",
                 flow_net="raft_small", depth_net="MiDaS_small"),
}
# The cue networks: the paper's SEA-RAFT (M) and Depth-Anything-V2 ViT-L are not on torch.hub;
# the strongest that are: torchvision's raft_large and MiDaS 3.0 DPT_Large (MiDaS 3.1's
# DPT_BEiT_L_512 needs timm 0.6.13 and fails with the current timm). The small pair for tiny.

# Flags that may change between a run and its --resume; every other flag must match.
RESUMABLE = {"steps", "out", "resume", "device", "workers", "log_every", "save_every", "micro_batch",
             "val", "val_every", "val_videos", "val_probe"}      # validation may start or change later


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
    g.add_argument("--size", type=int, default=None, help="view side in px, a multiple of the "
                   "backbone's patch, 14 or 16 (paper preset 224, tiny 112: both fit either)")
    g.add_argument("--base", type=int, default=None, help="side in px of the base frames the "
                   "cues are computed on (paper 224, tiny: the view side)")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader worker processes (0: load in the main process)")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="dinov2_vits14", choices=list(model.BACKBONES),
                   help="frozen encoder: DINOv2 (_reg: with registers) or DINOv3 (paper: dinov2_vits14)")
    g.add_argument("--weights", default="hub", help="encoder weights: hub (torch.hub cache in "
                   "TORCH_HOME), a local .pth path, or none (seeded random init, offline)")
    g.add_argument("--preset", default="paper", choices=list(model.PRESETS),
                   help="decoder widths, view size and run length: paper (the paper's decoder, "
                   "224², 32 pairs, 100k steps) or tiny (small decoder, 112², 8 pairs, 200 "
                   "steps: a few minutes on a CPU)")
    g.add_argument("--flow-net", default=None, choices=cuelib.FLOW_NETS, help="RAFT variant "
                   "for --cues hub (paper preset raft_large; tiny raft_small; paper: SEA-RAFT M)")
    g.add_argument("--depth-net", default=None, choices=tuple(cuelib.MIDAS_PREPROCESS),
                   help="MiDaS variant for --cues hub (paper preset DPT_Large; tiny MiDaS_small; "
                   "paper: Depth-Anything-V2 ViT-L)")
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
    g.add_argument("--micro-batch", type=int, default=0, help="pairs per chunk of a step "
                   "(gradients accumulated, z-scoring and loss over the whole batch: the same "
                   "step in less memory); 0: the whole batch at once")
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
    g = p.add_argument_group("validation (the official trainer's: DAVIS-2017 val J&F, best checkpoint)")
    g.add_argument("--val", default=None, metavar="ROOT", help="DAVIS-layout root: score the "
                   "decoder during training (probe.py davis_val), log val_jf, keep best.pt")
    g.add_argument("--val-every", type=int, default=None, help="steps between validations, "
                   "and one before the first step (paper preset 2000: the official trainer's epoch; "
                   "tiny: --save-every)")
    g.add_argument("--val-videos", type=int, default=6, help="val sequences scored (official 6)")
    g.add_argument("--val-probe", default=None, choices=["lp", "knn"], help="lp: the official "
                   "one-shot linear probe (paper preset); knn: label propagation, no training (tiny)")
    args = p.parse_args(argv)
    for k, v in PRESET_RUN[args.preset].items():       # preset defaults for what was not given
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.val_every is None:                          # tiny: validate when saving
        args.val_every = args.save_every
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
    patch = model.BACKBONES[args.backbone].patch  # 14 DINOv2, 16 DINOv3
    rules = [
        (args.size > 0 and args.size % patch == 0, f"--size {args.size} must be a positive multiple of {patch} "
                                                   f"(the patch size of {args.backbone})"),
        (args.base >= 8, f"--base {args.base} must be at least 8 px"),
        (args.batch >= 1, f"--batch {args.batch} must be >= 1"),
        (args.micro_batch >= 0, f"--micro-batch {args.micro_batch} must be >= 0 (0: the whole batch at once)"),
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
        (args.val_every >= 1 and args.val_videos >= 1, f"--val-every {args.val_every} and --val-videos {args.val_videos} must be >= 1"),
        (args.val is None or os.path.isdir(args.val), f"--val {args.val}: there is no such folder (a DAVIS layout: JPEGImages/480p, Annotations/480p, ImageSets)"),
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
    # What the flags need at least, in host memory (cheap to know): refused with the numbers.
    # A step's inputs: per pair 2 views (3 x S²) and 2 base frames with their flow and depth
    # (~6 x Hb² each), float32; a synthetic video is rendered whole, ~24 bytes a pixel at 2S,
    # at least 2 of them kept per DataLoader process (data.PairDataset.synthetic).
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30     # GiB
    pairs = -(-args.batch // max(1, int(os.environ.get("WORLD_SIZE", "1") or 1)))
    step_gib = pairs * 4 * (2 * 3 * args.size ** 2 + 2 * 6 * args.base ** 2) / 2**30
    video_gib = (0 if args.cues != "synthetic" else
                 max(1, args.workers) * 2 * 24 * args.synthetic_frames * (2 * args.size) ** 2 / 2**30)
    if step_gib > ram:
        p.error(f"--batch {args.batch} at --size {args.size}, --base {args.base}: one step's inputs "
                f"alone take {step_gib:.1f} GiB, this machine has {ram:.1f} GiB; lower --batch or the sizes")
    if video_gib > ram:
        p.error(f"--synthetic-frames {args.synthetic_frames} at --size {args.size}: the rendered videos "
                f"take {video_gib:.1f} GiB, this machine has {ram:.1f} GiB; lower --synthetic-frames")
    if args.device != "auto":
        try:
            dev = torch.device(args.device)
        except RuntimeError as e:
            p.error(f"--device {args.device}: {e}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            p.error(f"--device {args.device}: this machine has no CUDA GPU (or torch is a CPU build); use --device cpu")


def make_dataset(args):
    """The frame-pair dataset of data.py for the chosen source of frames and cues."""
    common = dict(size=args.size, base=args.base, gap=args.gap, crop=not args.no_crop,
                  seed=args.seed)
    if args.cues == "synthetic":
        return data.PairDataset.synthetic(args.synthetic_videos, args.synthetic_frames,
                                          args.synthetic_seed, cue_noise=args.cue_noise, **common)
    folder = data.VideoFolder(args.data)
    return data.PairDataset(folder, with_cues=args.cues == "files", **common)


def make_cue_nets(args, device, cue_nets=None):
    """RAFT and MiDaS for --cues hub (cue_nets: stand-ins), else (None, None)."""
    if args.cues != "hub":
        return None, None
    nets = cue_nets or (None, None)
    return (cuelib.FlowCue(args.flow_net, hub_dir=args.hub_dir, net=nets[0]).to(device),
            cuelib.DepthCue(args.depth_net, hub_dir=args.hub_dir, net=nets[1]).to(device))


def shared_step(batch, lila, args, flow_cue, depth_cue, sd_gen, decoder, erm_head, check, ranks):
    """`lila_step` in --micro-batch chunks and/or as one of `world` processes (torchrun), with
    the gradient and losses of the one-process step on the whole batch (tests/test_train.py):
    the cues are the whole batch's (`step_cues` with ranks), every chunk's loss is divided by
    the whole batch's counts (all processes), so the chunks' losses sum to the whole batch's,
    and DDP's mean over processes is undone (x world): the summed gradient is the one-process
    gradient. Backward runs here; check(loss, parts) before each. Returns (loss, parts, cues)
    with loss and parts summed over the processes."""
    rank, world = ranks
    with bf16(batch["views"].device):
        cues = step_cues(batch, args, flow_cue, depth_cue, sd_gen, ranks)   # no gradient
    chunks, norms = micro_batches(cues, args, world)
    loss, parts = 0.0, {}
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1      # DDP averages the gradients once, after the last
        with (contextlib.nullcontext() if last or world == 1 else decoder.no_sync()):
            with bf16(batch["views"].device):
                v = features_and_sd(chunk, lila, args, decoder)         # (B', D, S, S) x 2
            chunk_loss, chunk_parts = lila_loss(v, args, erm_head, norms)   # fp32
            check(chunk_loss, chunk_parts)
            (chunk_loss * world).backward()     # DDP divides the sum over processes by world
        loss = loss + chunk_loss.detach()
        parts = {k: parts.get(k, 0.0) + x for k, x in chunk_parts.items()}
    total = all_sum([loss, *parts.values()], world)   # what the one process would log
    return total[0], dict(zip(parts, total[1:])), cues


def micro_batches(cues, args, world=1):
    """Chunks of --micro-batch pairs of a step's cues (one chunk: all of them) and the whole
    batch's normalisers (all processes), so that the chunks' losses of all processes sum to
    the whole batch's; else ([cues], None), the plain step."""
    B, n = cues["img_q"].shape[0], args.micro_batch
    n = B if n <= 0 else n
    if n >= B and world == 1:
        return [cues], None
    K, (H, W) = len(cues["names"]), cues["img_q"].shape[-2:]
    norms = [incontext.loss_norms(cues["conf_q"], K, H, W)]
    if args.erm:     # the ERM ablation scores both views, each with its own confidence
        norms.append(incontext.loss_norms(cues["conf_c"], K, H, W))
    norms = [dict(zip(d, all_sum(list(d.values()), world))) for d in norms]   # all processes
    norms = tuple(norms) if args.erm else norms[0]
    cut = lambda x: [x[i:i + n] for i in range(0, B, n)]  # noqa: E731
    split = {k: cut(x) for k, x in cues.items() if torch.is_tensor(x)}
    return [dict(cues, **{k: x[j] for k, x in split.items()}) for j in range(len(split["img_q"]))], norms


def all_sum(tensors, world):
    """Each tensor summed over the processes, in one all-reduce (one dtype); as is for one."""
    if world == 1:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    return [x.view_as(t) for x, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def whole_std_mean(x, world=1):
    """torch.std_mean(x) (unbiased) of the whole batch: with several processes, from the sum,
    sum of squares and count of all processes (in float64: no cancellation at millions of
    values), so that every process z-scores with the one-process statistics."""
    if world == 1:
        return torch.std_mean(x)
    x64 = x.double()
    s, ss, n = all_sum([x64.sum(), x64.square().sum(), x64.new_tensor(x.numel())], world)
    mean = s / n
    std = ((ss - n * mean ** 2) / (n - 1)).clamp(min=0).sqrt()
    return std.to(x.dtype), mean.to(x.dtype)


class Trainable(nn.Module):
    """What learns as one module, called as the decoder: the decoder and, with --erm, the ERM
    head (applied in incontext.erm_loss); DDP around it averages the gradients of both."""

    def __init__(self, decoder, erm_head=None):
        super().__init__()
        self.decoder, self.erm_head = decoder, erm_head or nn.Identity()

    def forward(self, grids, size):
        return self.decoder(grids, size=size)                         # (B, D, S, S)


def setup_distributed(args):
    """torchrun sets RANK/WORLD_SIZE; a plain `python train.py` is rank 0 of 1. What the
    process count must fit is checked first, from torchrun's environment alone, so that every
    rank decides alike before any collective operation: rank 0 says it, the others exit."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local, rank = int(os.environ.get("LOCAL_WORLD_SIZE", world)), int(os.environ.get("RANK", "0"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    problem = (f"--batch {args.batch} must be divisible by the {world} processes" if args.batch % world else
               f"--device {args.device} with {world} processes puts them all on one GPU; use --device "
               f"auto (each takes the GPU of its LOCAL_RANK)" if world > 1 and args.device.startswith("cuda") else
               f"{local} processes on this machine for its {gpus} GPUs; NCCL needs one GPU each: pass "
               f"--nproc_per_node {gpus} (or --device cpu)" if world > 1 and args.device == "auto" and 0 < gpus < local
               else None)
    if problem:
        raise UserError(problem) if rank == 0 else SystemExit(1)
    if world == 1:
        return 0, 1
    # Rank 0 validates and saves while the others wait in the next all-reduce: an hour, not
    # NCCL's default 10 minutes, before a wait counts as a hang.
    dist.init_process_group("nccl" if pick_device(args.device, rank).type == "cuda" else "gloo",
                            timeout=datetime.timedelta(hours=1))
    return dist.get_rank(), world


def pick_device(name, rank):
    if name == "auto":
        local = int(os.environ.get("LOCAL_RANK", rank))     # the GPU of this process on its machine
        name = f"cuda:{local % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def distributed(trainable, device, world):
    """DDP around what learns (bucketed all-reduce overlapped with the backward pass, rank 0's
    weights broadcast at the start); a single process trains the module itself."""
    if world == 1:
        return trainable
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(trainable, device_ids=ids)


def agree(flag, device, world):
    """True on every rank if it is true on any (a stop, a non-finite loss): the ranks must take
    the same branch, or the next collective operation would wait forever."""
    if world == 1:
        return bool(flag)
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t)
    return bool(t > 0)


def first_failing(flag, device, world):
    """The lowest rank on which `flag` is true, or None, known to every rank (one all-reduce)."""
    if world == 1:
        return 0 if flag else None
    t = torch.zeros(world, device=device)
    t[dist.get_rank()] = float(flag)
    dist.all_reduce(t)
    hit = t.nonzero()
    return int(hit[0]) if len(hit) else None


def before_step_1(args, run, rank, world):
    """Every input of a run checked before any work, on every rank alike (the process count:
    setup_distributed): the run folder (rank 0 owns it) and the resume rules, the --val root
    (each frame and mask of the sequences it scores: probe.davis_val_plan). -> (config, the
    checkpoint to resume or None, the validation plan or None)."""
    if rank == 0:
        run.acquire(args.resume)        # one run per folder; released on exit (and on kill)
    config = dict(vars(args))
    ckpt = run.check(args, config, RESUMABLE)
    val_plan = None
    if args.val is not None:
        import probe                    # only runs that validate need it
        val_plan = probe.davis_val_plan(args.val, videos=args.val_videos, kind=args.val_probe,
                                        size=args.size, device=pick_device(args.device, rank))
    return config, ckpt, val_plan


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


def next_batch(batches, stop):
    """The next batch, or None when a stop signal ended the DataLoader workers."""
    try:
        return next(batches)
    except Exception:       # a worker died because of the signal: stop as asked
        if stop.name is None:
            raise
        return None


def check_finite(step, loss, parts, ckpt_path, device, world):
    """A non-finite loss (or part) stops the run before the update, on every rank."""
    values = {"loss": loss.detach(), **parts}
    finite = torch.stack([torch.as_tensor(x, dtype=torch.float32, device=loss.device)
                          for x in values.values()]).isfinite().tolist()   # one sync, not one per part
    bad = [k for k, ok in zip(values, finite) if not ok]
    if agree(bool(bad), device, world):
        raise UserError(f"step {step}: non-finite {', '.join(bad) or 'loss on another process'} "
                        f"(loss {float(loss.detach())}); stopping before the update. A smaller "
                        f"--lr (or a --warmup) usually helps")


def check_weights(step, trainable, args, ckpt_path, device, world):
    """Weights made non-finite by an update are never saved."""
    ok = bool(torch.stack([p.isfinite().all() for p in trainable.parameters()]).all())
    if agree(not ok, device, world):
        raise UserError(f"step {step}: the update made the weights non-finite (--lr "
                        f"{args.lr}); stopping, that update is not saved")


def warn(message):
    """A warning on stderr that does not break the progress bar."""
    tqdm.write(message, file=sys.stderr)


class RunOutput:
    """What a run writes (rank 0 only): the start lines, config.json, the bar, log.jsonl rows
    and the interval's warnings, checkpoints and feature pictures, the last line."""

    def __init__(self, run, args, config, rank, world, device, dataset, ckpt, start, n_params, threads="",
                 val_plan=None):
        self.run, self.args, self.config, self.rank = run, args, config, rank
        self.ckpt_path = run.file("ckpt.pt")
        self.t0, self.last_log, self.saved = time.time(), start, start if ckpt else None
        self.last_start = start
        self.shares, self.spreads, self.skipped, self.skipped_all = [], [], 0, 0  # per interval
        self.best = getattr(run, "best", None)   # the best val J&F so far (best.pt's), or None
        self.val, self.val_plan, self.unscored = None, val_plan, {}
        if rank != 0:
            return
        # Everything is checked and built: only now the config (the one used) and the run files.
        print(f"device {device}, precision {'bf16 autocast' if device.type == 'cuda' else 'fp32'}, "
              f"{world} process(es), {threads}")
        print("config " + json.dumps(config))
        print(f"{len(dataset)} videos per epoch, {n_params / 1e6:.2f}M trainable parameters, "
              f"steps {start} -> {args.steps}")
        if run.rewind_log(start):
            print(f"{run.file('log.jsonl')}: dropped a damaged line (a run killed mid-write)")
        kept, then = (("the previous checkpoint, if any, is intact", "resume with --resume")
                      if args.resume else ("nothing was written", "run again"))
        runs.save_file(run.file("config.json"),
                       lambda f: f.write(json.dumps(config, indent=1).encode()), kept=kept, then=then)
        self.log = open(run.file("log.jsonl"), "a")
        self.picture = FeaturePicture(dataset[0], ckpt.get("picture") if ckpt else None)
        self.bar = tqdm(total=args.steps, initial=start, dynamic_ncols=True)

    def validate(self, step, lila, device):
        """The DAVIS val J&F of the decoder now (--val, every --val-every steps), else None."""
        a = self.args
        if a.val is None or not (step % a.val_every == 0 or step == a.steps):
            return None
        import probe                                    # only runs that validate need it
        r = probe.davis_val(lila, a.val, videos=a.val_videos, kind=a.val_probe, size=a.size,
                            device=device, plan=self.val_plan)
        self.val, self.unscored = r["jf"], r["unscored"]
        if self.unscored:      # left out of the mean: said with the number, every time
            warn(f"train.py: warning: step {step}: val J&F {self.val:.4f} over {len(r['sequences'])} "
                 f"of {len(r['sequences']) + len(self.unscored)} sequences; not scored: "
                 + ", ".join(f"{k} ({why})" for k, why in self.unscored.items()))
        return self.val

    def validate_untrained(self, lila, trainable, opt, device):
        """Before the first step, as the official trainer (Lightning's sanity check runs its
        validation hook, which also saves the best checkpoint): the untrained decoder's val J&F
        as step 0 in log.jsonl, ckpt.pt and best.pt; a run that only gets worse keeps it."""
        val = self.validate(0, lila, device)
        try:
            self.log.write(json.dumps({"step": 0, "val_jf": val, "val_not_scored": self.unscored}) + "\n")
            self.log.flush()
        except OSError as e:
            raise write_error(self.log.name, e, "nothing was trained yet") from None
        self.save(0, lila, trainable, opt, device, val, picture=False)

    def after_step(self, step, loss, parts, cues, skipped, lr, val=None):
        """The bar; every --log-every steps (and at a validation) a log.jsonl row and the
        interval's warnings."""
        self.shares.append(cues["shares"]), self.spreads.append(cues["spread"])
        self.skipped += skipped                         # pairs that failed to load, replaced
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{float(loss):.4f}", **({} if self.val is None else {"val_jf": f"{self.val:.3f}"}))
        if not (step % self.args.log_every == 0 or step == self.args.steps or val is not None):
            return
        dt, steps = time.time() - self.t0, f"steps {self.last_log + 1}-{step}"
        conf = {f"conf_{k}": float(np.mean([s[k] for s in self.shares])) for k in self.shares[-1]}
        row = {"step": step, "loss": float(loss), **{k: float(x) for k, x in parts.items()},
               **conf, "skipped_pairs": self.skipped, "lr": lr, "seconds": round(dt, 3),
               "pairs_per_s": round((step - self.last_log) * self.args.batch / max(dt, 1e-9), 2),
               **({} if val is None else {"val_jf": val, "val_not_scored": self.unscored})}
        try:
            self.log.write(json.dumps(row) + "\n")
            self.log.flush()
        except OSError as e:
            raise write_error(self.log.name, e, f"the last checkpoint {self.ckpt_path} is intact "
                              f"(a line cut off is dropped on resume)") from None
        # A broken cue cache shows here: a cue that teaches nothing.
        for k, x in conf.items():
            if x < 0.1:  # healthy cues: most pixels; broken ones: almost none
                warn(f"train.py: warning: {steps}: only {100 * x:.2f} % of the query pixels "
                     f"have a confident {k[5:]} cue; check the cues (python data.py --preview ROOT)")
        for k in self.spreads[-1]:
            if max(sp[k] for sp in self.spreads) < 1e-6:   # e.g. one disparity everywhere
                warn(f"train.py: warning: {steps}: the {k} cue is constant in every batch, so it "
                     f"teaches nothing; check the cues (python data.py --preview ROOT)")
        if self.skipped:
            warn(f"train.py: warning: {steps}: {self.skipped} pairs failed to load and were "
                 f"replaced (the messages above name them)")
        self.t0, self.last_log, self.shares, self.spreads = time.time(), step, [], []
        self.skipped_all, self.skipped = self.skipped_all + self.skipped, 0

    def save(self, step, lila, trainable, opt, device, val=None, picture=True):
        """At a new best val J&F best.pt, then ckpt.pt (the same checkpoint, each atomic); then
        the feature picture of this step. The best value is in both; best.pt first, as a resume
        takes it from there (RunFolder.check): a stop between the two leaves the new best in
        best.pt and the previous step in ckpt.pt, never a best score that no file holds."""
        better = val is not None and (self.best is None or val > self.best)
        ckpt = {"decoder": trainable.decoder.state_dict(), "erm_head": trainable.erm_head.state_dict(),
                "optimizer": opt.state_dict(), "step": step, "rng": rng_state(),
                "config": self.config, "picture": self.picture.state,
                "best_val_jf": val if better else self.best}
        if better:
            atomic_save(ckpt, self.run.file("best.pt"))
            self.best = val
        atomic_save(ckpt, self.ckpt_path)
        self.saved = step
        if not picture:
            return
        path = self.run.file(f"feats_{step:07d}.png")
        try:
            self.picture.save(lila, path, step, device)
        except OSError as e:
            raise write_error(path, e, f"the checkpoint of step {step} is saved") from None

    def kept(self):
        """What a resume would start from, said truly in every state."""
        if self.saved is not None:
            return f"the last checkpoint {self.ckpt_path} (step {self.saved}) is kept"
        return "no checkpoint was written yet (--resume starts the run again at step 0)"

    def rescue(self, e, step, lila, trainable, opt, device):
        """An error ends the run mid-way (a damaged file, memory, a full disk, a bug): the steps
        since the last checkpoint are saved first, unless an update made the weights
        non-finite, and the error says what is kept. -> the error to raise: the user's with
        that added to its message; a bug itself, after a line saying it."""
        if self.rank != 0 or not hasattr(self, "log"):
            return e
        note = None
        last = self.saved if self.saved is not None else self.last_start
        if step > last and all(bool(p.isfinite().all()) for p in trainable.parameters()):
            try:
                self.save(step, lila, trainable, opt, device, picture=False)
                note = f"the steps up to {step} are saved in {self.ckpt_path}"
            except Exception as why:  # noqa: BLE001 - e.g. the same full disk: the older file stays
                note = f"saving step {step} failed too ({user_message(why) or why}); {self.kept()}"
        note = note or self.kept()
        msg = user_message(e)
        if msg is None:
            warn(f"train.py: {note}")
            return e
        if out_of_memory(e):
            msg += ": lower --batch (or set --micro-batch) or --size"
        return UserError(f"{msg}\n{note}; continue with --resume")

    def finish(self, step, loss, stop, cli, lila, trainable, opt, device):
        """The last line: done, or stopped by a signal (checkpoint saved, how to resume)."""
        if self.rank == 0:
            self.bar.close()
        if stop.name is not None:
            if self.rank == 0:
                self.save(step, lila, trainable, opt, device, picture=False)
                again = shlex.join(["python", "train.py"] + [a for a in cli if a != "--resume"]
                                   + ["--resume"])
                stop.end(f"train.py: stopped by {stop.name} at step {step}; checkpoint "
                         f"{self.ckpt_path}. Continue with: {again}")
            raise SystemExit(128 + getattr(signal, stop.name))
        if self.rank == 0:
            n = self.skipped_all + self.skipped
            replaced = f", {n} pairs replaced (failed to load)" if n else ""
            print(f"done: step {step}, loss {float(loss):.4f}, checkpoint {self.ckpt_path}{replaced}")
        return step


# --- the picture of one step, for a lecture: python train.py step-picture ---

def _panel(x, lo, hi, counted=None):
    """A (C, S, S) map -> (S, S, 3) uint8, lo..hi to black..white: 2 channels = flow (hue: the
    direction, brightness: the speed up to hi), 1 = grey, 3 = RGB; blue where not `counted`."""
    from PIL import Image
    if x.shape[0] == 2:
        hue = (torch.atan2(x[1], x[0]) / (2 * np.pi)) % 1                   # (S, S)
        hsv = torch.stack([hue, torch.ones_like(hue), (x.norm(dim=0) / hi).clamp(0, 1)], -1)
        rgb = np.asarray(Image.fromarray((hsv * 255).byte().numpy(), "HSV").convert("RGB"))
    else:
        y = ((x - lo) / (hi - lo + 1e-8)).clamp(0, 1).expand(3, -1, -1)     # (3, S, S)
        rgb = (y.permute(1, 2, 0) * 255).byte().numpy()                     # (S, S, 3)
    return rgb if counted is None else np.where(counted.numpy()[..., None], rgb, np.uint8([0, 0, 128]))


def step_picture(argv=None):
    """One training pair as one step sees it: the query and context views; then per cue (flow,
    depth, SD channels 1-3 as RGB) the context's cue, which W* is fitted on, the query's cue
    (the target), W* applied to the query's features (the prediction) and |error| where the
    loss counts it. Built by this file's step_cues and features_and_sd, incontext's ridge_map
    and apply_map. Extra flags are train.py's (the checkpoint's config otherwise)."""
    from PIL import Image, ImageDraw
    p = argparse.ArgumentParser(prog="train.py step-picture", description=step_picture.__doc__)
    p.add_argument("--ckpt", required=True, help="a train.py ckpt.pt, or none: a random decoder")
    p.add_argument("--out", default="step.png", help="the PNG to write")
    p.add_argument("--pair", type=int, default=0, help="index of the training pair")
    a, rest = p.parse_known_args(sys.argv[2:] if argv is None else argv)   # after step-picture
    try:
        ckpt = None if a.ckpt == "none" else torch.load(a.ckpt, map_location="cpu", weights_only=True)
        ckpt is None or (ckpt["config"], ckpt["decoder"], ckpt["step"])
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        p.error(f"--ckpt {a.ckpt} is no readable train.py checkpoint ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[0][:160]})")
    args = get_args(rest)
    given = {x.split("=")[0] for x in rest}
    for k, v in (ckpt["config"] if ckpt else {}).items():      # the run's, unless given here
        if "--" + k.replace("_", "-") not in given:
            setattr(args, k, v)
    dataset = make_dataset(args)
    if not 0 <= a.pair < len(dataset):
        p.error(f"--pair {a.pair} must lie in 0..{len(dataset) - 1} (the pairs of an epoch)")
    device = pick_device(args.device, 0)
    lila = model.build_lila(args.backbone, args.weights, args.preset, seed=args.seed)
    lila = lila.to(device).eval()
    if ckpt:
        lila.decoder.load_state_dict(ckpt["decoder"])
    batch = torch.utils.data.default_collate([dataset[a.pair]])
    batch = {k: x.to(device) if torch.is_tensor(x) else x for k, x in batch.items()}
    with torch.no_grad():
        cues = step_cues(batch, args, *make_cue_nets(args, device),
                         torch.Generator().manual_seed(args.seed))
        v = features_and_sd(cues, lila, args)
        W = incontext.ridge_map(v["feats_c"], v["cue_c"], v["conf_c"], lam=args.lam)  # (1, P, K)
        pred = incontext.apply_map(v["feats_q"], W)[0].float().cpu()           # (K, S, S)
    cue_q, cue_c, conf_q = (v[k][0].float().cpu() for k in ("cue_q", "cue_c", "conf_q"))
    S, names = cue_q.shape[-1], v["names"]
    rows = [(n, idx) for n in ("flow", "depth", "sd")
            if (idx := [i for i, m in enumerate(names) if m.startswith(n)][:3])]
    img = lambda x: (x[0].permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)  # noqa: E731
    cells = [[(img(v["img_q"]), "query view (frame t)"), (img(v["img_c"]), "context view (t+dt)"),
              (None, "W* = argmin_W 1/N sum_n c_n |x_n W - y_n|^2\n        + lam |W|^2, on the "
                     "context:\n  x_n [features, 1], y_n cues, c_n\n  confidence, n over 32x32 "
                     "cells\nprediction = [features_q, 1] W*"),
              (None, f"pair {a.pair}, step {ckpt['step'] if ckpt else '0 (random decoder)'}\n"
                     f"lam {args.lam}, {len(names)} cues")]]
    for name, idx in rows:
        c, q, g = cue_c[idx], cue_q[idx], pred[idx]                            # (C, S, S)
        if name == "flow":      # one speed scale for the three; the error: the vector's length
            lo, hi, err = 0.0, float(torch.stack([c, q, g]).norm(dim=1).max()), (g - q).norm(dim=0)
        else:                   # the target's range; the error: the mean over the channels
            lo, hi, err = float(q.min()), float(q.max()), (g - q).abs().mean(0)  # (S, S)
        counted = (conf_q[idx[0]] > 0 if idx[0] < len(conf_q)                  # SD: everywhere
                   else torch.ones_like(err, dtype=torch.bool))
        cells.append([(_panel(c, lo, hi), f"{name}: context (fit W*)"),
                      (_panel(q, lo, hi), f"{name}: query (target)"),
                      (_panel(g, lo, hi), f"{name}: W* on query"),
                      (_panel(err[None], 0.0, hi - lo, counted),
                       f"|error| {float(err[counted].mean()):.3f} (blue: not counted)")])
    zoom = max(1, 224 // S)                                   # readable labels at any view size
    P = S * zoom
    canvas = Image.new("RGB", (4 * P, len(cells) * (P + 14)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(cells):                           # ASCII labels: PIL's built-in font
        for col, (pixels, label) in enumerate(row):
            if pixels is not None:
                cell = Image.fromarray(pixels).resize((P, P), Image.NEAREST)
                canvas.paste(cell, (col * P, r * (P + 14) + 14))
            draw.text((col * P + 2, r * (P + 14) + 1), label, fill=(0, 0, 0))
    runs.save_picture(canvas, a.out)      # atomic; a bad path or a full disk: one line
    print(f"train.py: wrote {a.out} ({canvas.width} x {canvas.height} px): pair {a.pair}, "
          f"cues {', '.join(n for n, _ in rows)}")
    return canvas


def interrupted():
    """The line of a second Ctrl-C (quit now), true in each state of the run folder."""
    out = get_args(sys.argv[1:]).out
    if os.path.isfile(os.path.join(out, "ckpt.pt")):
        return f"the last checkpoint is kept ({os.path.join(out, 'ckpt.pt')}; add --resume to continue)"
    if os.path.isfile(os.path.join(out, "config.json")):
        return f"no checkpoint was written yet: --resume starts the run in {out} again at step 0"
    return "stopped before the run started; nothing was written"


def explain(msg):
    """More to an error's message: a cue network that failed, why hub and the other way."""
    a = get_args(sys.argv[1:]) if msg.startswith("cues.py:") else None
    if a is not None and a.cues == "hub":
        auto = "--cues" not in [x.split("=")[0] for x in sys.argv]
        msg += (f"\n--cues {'auto chose hub' if auto else 'hub'} (RAFT and MiDaS during "
                f"training){': there is no cue cache ' + os.path.join(a.data, 'Cues') if auto else ''}. "
                f"The other way needs no cue network here: write the cache once where they "
                f"run (`python cues.py --data {a.data}`), then train on it (--cues files)")
    return msg


if __name__ == "__main__":
    if sys.argv[1:2] == ["step-picture"]:   # python train.py step-picture --ckpt CKPT|none ...
        sys.exit(runs.cli("train.py", step_picture))
    sys.exit(runs.cli("train.py", main, oom="--batch (or set --micro-batch) or --size",
                      interrupted=interrupted, explain=explain))
