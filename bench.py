"""Speed and memory benchmarks of the LILA repo, one function per benchmark, CPU.

Run:   python bench.py [NAME ...] [--quick] [--threads N]
       NAME in data model incontext pamr probe cues step gpu extract (default: all, in that order);
       --quick: small batches, ~35 s on 2 idle cores (5 min at load 6: see Threads).

What each benchmark measures (every line prints the sizes it ran at; "lean" is our code,
"reference" the straightforward formulation of the official code, both measured side by side
in the same run on the same inputs):
- data       data.py: render time of one SyntheticScenes video (12 frames, 224^2), exact flow +
             occlusion of a frame pair, and one PairDataset.synthetic item from a cached video.
- model      model.py: forward time of LILA (ViT-S/14 + DPT decoder, random weights: speed does
             not depend on them) for the tiny and paper decoders at 224^2, and the encoder alone.
- incontext  incontext.py: forward + backward of the in-context loss at the paper's sizes
             (B=32 pairs, D=128, K=35 cues, 224^2, N=32^2=1024 context samples) with the ridge
             solved by Cholesky (ours), torch.linalg.solve (LU, the official code) and
             torch.linalg.lstsq; the ridge solve alone; the loss's share of a training step.
- pamr       pamr.py: time and peak memory of one pamr call (224^2 stage: 5 iterations,
             dilations {1,3,5}, C=32) lean vs the gather-everything formulation that stacks all
             P=24 shifted copies (official code), and of pamr_cascade for the SD cue at paper
             size (B=64 views); both must give the same output.
- probe      probe.py: k-NN label propagation over local windows (probe.knn_step) vs the
             official formulation (lila/eval_vosknn.py: replicate-padded windows unfolded for
             every query) on a 30x54 grid (D=64, 20 frames, 3 labels; the official one needs
             ~16 GB at DAVIS's 60x107, D=128): frames/s, peak memory, identical labels.
- cues       cues.py: the per-batch cue work inside the training loop (flow confidence, depth
             conversion, SD cue with and without the PAMR cascade), B=8 pairs at 224^2.
- step       train.py: one training step split into its parts, as shares of the step:
             data (PairDataset items, synthetic scenes, cached videos), cues (flow_confidence +
             disparity_to_depth + warps + z-scoring), encoder, decoder forward, SD + PAMR,
             in-context loss forward+backward, decoder backward, optimizer step; at the tiny
             preset (112^2 views, 8 pairs) and the paper preset (224^2 views, 4 pairs on CPU
             instead of the paper's 32, so absolute times are 1/8 of a paper step), plus the
             whole step as train.py runs it (lila_step + backward + AdamW).
- gpu        train.py on CUDA (on a CPU it says so and measures nothing): the paper preset's
             step at 32 pairs, pairs/s and peak memory (torch.cuda.max_memory_allocated) in fp32
             and bf16 autocast, with and without torch.compile of the decoder, the largest batch
             that fits in one pass, the step's parts, RAFT with random weights if torchvision
             is installed. Random weights, synthetic scenes, no downloads; a few minutes.
- extract    extract.py: frames/s and peak memory of extract.features (the head in bands of rows,
             float16 out) against lila.features(max_pixels=None) on the same random frame, for
             854x480 and 1920x1080, tiny and paper decoders, --stride 1 and 4 (ViT-S/14, one
             cold call on one frame per fresh process, random weights); extract.features alone
             on a 3840x2160 frame: tiny (~7 min on one core, most of it the attention over 42k
             tokens) and paper with the attention's output replaced by v (its memory, ~15 min).

How: every time is the best of a few runs after one warm-up; variants of one comparison are
run interleaved, so drifting load on the shared machine hits all alike. Peak memory is measured
in a fresh subprocess per variant (torch's CPU allocations are invisible to tracemalloc, and a
process's peak RSS only grows): peak RSS minus RSS just before the call, output included.
Threads: torch's default (all cores) unless OMP_NUM_THREADS or --threads is set; the load
average is printed, compare numbers only at a low load: on a loaded 2-core box, code made of
many short parallel kernels (the lean PAMR, hence SD + PAMR in `step`) loses far more to
OpenMP threads waiting for a descheduled sibling than big memory-bound ops do (the gather
PAMR, the unfolded k-NN); --threads 1 gives steadier ratios there.

Shape legend: B batch (pairs or views), D pixel-feature width, K cue channels, E encoder width,
h x w patch grid, S view side, N context samples, C mask / label channels, P PAMR neighbours.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import cues
import data
import incontext
import model
import pamr
import probe
import runs
import train


# -----------------------------------------------------------------------------------------
# Shared helpers: timing, memory, subprocess workers.

def best_times(fns, repeats):
    """Best wall time (s) of each function in `fns` (name -> fn): one warm-up each, then
    `repeats` interleaved rounds."""
    for fn in fns.values():
        fn()                                                    # warm-up: allocations, kernels
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def best_time(fn, repeats):
    return best_times({"fn": fn}, repeats)["fn"]


def once(fn):
    """Wall time (s) of a single call, no warm-up (for cold costs such as rendering)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def proc_bytes(path, key):
    """A kB field of /proc/self/status or /proc/meminfo in bytes. VmHWM is the peak resident
    set; not ru_maxrss, which Linux carries over fork + exec from a (big) parent process."""
    with open(path) as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))


def measured_call(fn, calls=1):
    """(seconds of the last of `calls` calls, peak extra bytes over all of them, output);
    meaningful in a fresh process only. calls=2: the time of a warm call (what each frame of a
    stream gets: oneDNN builds its kernels for each new shape on the first)."""
    base = proc_bytes("/proc/self/status", "VmRSS")
    with torch.no_grad():
        for _ in range(calls):
            t0 = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - t0
    return seconds, proc_bytes("/proc/self/status", "VmHWM") - base, out


def run_worker(kind, *args, out_path="-", calls=1):
    """Run WORKERS[kind](*args) `calls` times in a fresh `python bench.py --worker ...` process;
    returns (seconds of the last call, peak extra bytes). The output tensor is saved to out_path
    unless "-"."""
    cmd = [sys.executable, os.path.abspath(__file__), "--calls", str(calls), "--worker", kind,
           out_path, *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    if res.returncode != 0:
        raise RuntimeError(f"bench.py: worker {kind} {args} failed:\n{res.stderr[-2000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    return r["seconds"], r["peak"]


def header(name, text):
    print(f"\n== {name}: {text} | threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")


# -----------------------------------------------------------------------------------------
# data.py

def bench_data(repeats=3):
    header("data", f"synthetic scenes, 12 frames 224^2, best of {repeats}")
    t = min(once(lambda s=s: data.SyntheticScenes(s, frames=12, size=224)) for s in range(repeats))
    print(f"  SyntheticScenes render, 12 frames 224^2:  {t * 1e3:7.0f} ms")
    sc = data.SyntheticScenes(0)
    t = best_time(lambda: (sc.flow(0, 5), sc.occluded(0, 5)), repeats)
    print(f"  flow(0, 5) + occluded(0, 5) 224^2:         {t * 1e3:7.1f} ms")
    ds = data.PairDataset.synthetic(videos=2, frames=12, scene_seed=0, base=224)
    ds[0]                                                       # renders video 0, cached after
    print(f"  PairDataset.synthetic item (cached video): {best_time(lambda: ds[3], repeats) * 1e3:7.1f} ms")


# -----------------------------------------------------------------------------------------
# model.py

def bench_model(size=224, batches=(1, 8), repeats=3):
    header("model", f"LILA forward, ViT-S/14 random weights, {size}^2, best of {repeats}")
    for preset in ("tiny", "paper"):
        lila = model.build_lila("dinov2_vits14", weights="none", preset=preset, seed=0).eval()
        n_dec = sum(p.numel() for p in lila.decoder.parameters())
        for b in batches:
            img = torch.rand(b, 3, size, size)                  # (B, 3, S, S)
            with torch.no_grad():
                t = best_times({"all": lambda: lila(img), "enc": lambda: lila.encode(img)}, repeats)
            print(f"  {preset:5s} (decoder {n_dec / 1e6:5.2f}M) batch {b}: forward {t['all']:6.3f} s "
                  f"({t['all'] / b * 1e3:5.0f} ms/img), of which encoder {t['enc']:6.3f} s")


# -----------------------------------------------------------------------------------------
# incontext.py

SOLVERS = ("cholesky", "lu", "lstsq")   # ours, torch.linalg.solve (official), lstsq


def bench_incontext(batch=32, size=224, dim=128, n_cues=35, pool=32, repeats=2, step_batch=2):
    header("incontext", f"B={batch} D={dim} K={n_cues} {size}^2 N={pool * pool}, best of {repeats}")
    torch.manual_seed(0)
    fc = torch.randn(batch, dim, size, size, requires_grad=True)          # (B, D, S, S)
    fq = torch.randn(batch, dim, size, size, requires_grad=True)          # (B, D, S, S)
    cc, cq = torch.randn(2, batch, n_cues, size, size)                    # (B, K, S, S) each
    conf = (torch.rand(batch, 2, size, size) > 0.1).float()               # (B, 2, S, S)

    def loss_step(solver):
        def run():
            fc.grad = fq.grad = None
            loss, _ = incontext.incontext_loss(fq, fc, cq, cc, conf, conf, solver=solver)
            loss.backward()
        return run
    loss_t = best_times({s: loss_step(s) for s in SOLVERS}, repeats)
    del fc, fq, cc, cq, conf

    X = torch.randn(batch, pool * pool, dim + 1, requires_grad=True)       # (B, N, P)
    Y = torch.randn(batch, pool * pool, n_cues)                           # (B, N, K)
    w = (torch.rand(batch, pool * pool) > 0.1).float()                    # (B, N)

    def ridge_step(solver):
        def run():
            X.grad = None
            incontext.ridge_solve(X, Y, w, solver=solver).square().sum().backward()
        return run
    ridge_t = best_times({s: ridge_step(s) for s in SOLVERS}, 10 * repeats)
    for s in SOLVERS:
        print(f"  {s:8s}  loss fwd+bwd {loss_t[s]:7.3f} s ({loss_t[s] / loss_t['cholesky']:.2f}x)"
              f"   ridge alone fwd+bwd {1e3 * ridge_t[s]:7.2f} ms ({ridge_t[s] / ridge_t['cholesky']:.2f}x)")

    # Share of a step: LILA fwd+bwd of both views, measured on step_batch pairs, scaled to batch.
    lila = model.build_lila("dinov2_vits14", weights="none", preset="paper", seed=0).train()
    img = torch.rand(2 * step_batch, 3, size, size)                       # (2b, 3, S, S)

    def model_step():
        lila.decoder.zero_grad(set_to_none=True)
        lila(img)[1].square().mean().backward()
    t_model = best_time(model_step, repeats) * batch / step_batch
    total = t_model + loss_t["cholesky"]
    print(f"  training step ~ {total:.2f} s (LILA fwd+bwd {t_model:.2f} s, scaled from {step_batch} "
          f"pairs + loss {loss_t['cholesky']:.2f} s): loss share {100 * loss_t['cholesky'] / total:.1f} %")


# -----------------------------------------------------------------------------------------
# pamr.py

# LILA's 224^2 stage (official lila/dpt_lila.py TrainLILA): dilations {1,3,5}, sigma 0.05, 5 iterations.
DILATIONS, SIGMA, ITERS_224 = (1, 3, 5), 0.05, 5
PATCH_GRID = 16                         # 224 / 14: the ViT-S/14 grid the SD cue starts from


def pamr_inputs(batch, channels, size, seed=0):
    """A smooth random guide (B, 3, S, S) and an SD-like mask (B, C, 16, 16)."""
    g = torch.Generator().manual_seed(seed)
    image = F.interpolate(torch.rand(batch, 3, size // 8, size // 8, generator=g),
                          size=(size, size), mode="bilinear", align_corners=False)
    image = image + 0.05 * torch.rand(batch, 3, size, size, generator=g)   # (B, 3, S, S)
    mask = torch.randn(batch, channels, PATCH_GRID, PATCH_GRID, generator=g)
    return image, mask


def pamr_worker(variant, batch, channels, size):
    image, mask = pamr_inputs(int(batch), int(channels), int(size))
    return {"lean": lambda: pamr.pamr(image, mask, DILATIONS, ITERS_224, SIGMA),
            "gather": lambda: pamr.pamr_reference(image, mask, DILATIONS, ITERS_224, SIGMA),
            "cascade": lambda: pamr.pamr_cascade(image, mask, dilations=DILATIONS, sigma=SIGMA)}[variant]


def bench_pamr(batch=64, channels=32, size=224, gather_batch=16):
    """gather_batch: batch of the lean-vs-gather comparison. The gather peak is about
    2 x B x C x P x H x W floats (~20 GB at B=64), too much for a shared 23 GB box, so it runs
    at B=16 by default (both scale linearly in B) and is extrapolated to B=64."""
    header("pamr", f"dilations {DILATIONS}, sigma {SIGMA}, {ITERS_224} iterations, C={channels}, "
                   f"{size}^2, mask from {PATCH_GRID}^2")
    need = 2 * gather_batch * channels * 8 * len(DILATIONS) * size * size * 4
    free = proc_bytes("/proc/meminfo", "MemAvailable")
    if need > 0.7 * free:
        raise RuntimeError(f"bench pamr: gather at B={gather_batch} needs ~{need / 2**30:.1f} GiB, "
                           f"only {free / 2**30:.1f} GiB available")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {v: os.path.join(tmp, v + ".pt") for v in ("lean", "gather")}
        r = {v: run_worker("pamr", v, gather_batch, channels, size, out_path=p) for v, p in paths.items()}
        diff = (torch.load(paths["lean"]) - torch.load(paths["gather"])).abs().max().item()
    (tl, ml), (tg, mg) = r["lean"], r["gather"]
    print(f"  one pamr call, B={gather_batch}: lean {tl:6.2f} s {ml / 2**20:6.0f} MiB | gather {tg:6.2f} s "
          f"{mg / 2**20:6.0f} MiB | speed x{tg / tl:.1f}, memory x{mg / ml:.1f}, max |diff| {diff:.1e}")
    if gather_batch != batch:
        tb, mb = run_worker("pamr", "lean", batch, channels, size)
        print(f"  one pamr call, B={batch}: lean {tb:6.2f} s {mb / 2**20:6.0f} MiB (gather ~{tg * batch / gather_batch:.0f} s, "
              f"~{mg * batch / gather_batch / 2**30:.1f} GiB extrapolated linearly from B={gather_batch})")
    tc, mc = run_worker("pamr", "cascade", batch, channels, size)
    print(f"  pamr_cascade (SD cue), B={batch}: {tc:6.2f} s, {mc / 2**20:6.0f} MiB peak extra "
          f"({tc / batch * 1e3:.0f} ms per view)")


# -----------------------------------------------------------------------------------------
# probe.py

def unfold_knn_step(query, ctx, labels, radius=12, topk=5, temperature=0.1):
    """The reference: the official formulation (lila/eval_vosknn.py): keys and labels padded by
    replication, every (2r+1)^2 window unfolded, cosine of each query to all K (2r+1)^2 window
    entries, top-k, softmax(cos / T). Its memory grows as K D (2r+1)^2 h w."""
    D, h, w = query.shape
    K, C = labels.shape[:2]
    win = 2 * radius + 1

    def unfold(x):                                                          # (K, X, win^2, hw)
        return F.unfold(F.pad(x, (radius,) * 4, mode="replicate"), win).view(K, x.shape[1], win * win, h * w)
    sim = torch.einsum("dn,kdjn->nkj", query.flatten(1), unfold(ctx)).reshape(h * w, -1)
    val, idx = sim.topk(topk, dim=1)                                        # (hw, k)
    lab = unfold(labels).permute(3, 0, 2, 1).reshape(h * w, -1, C)         # (hw, K win^2, C)
    lab = torch.gather(lab, 1, idx[..., None].expand(-1, -1, C))            # (hw, k, C)
    return (torch.softmax(val / temperature, 1)[..., None] * lab).sum(1).T.reshape(C, h, w)


def probe_case(T=20, D=64, h=30, w=54, C=3, seed=0):
    """Smooth random L2-normalised features (T, D, h, w) and a blocky one-hot first mask."""
    g = torch.Generator().manual_seed(seed)
    f = F.interpolate(torch.randn(T, D, h // 4, w // 4, generator=g), size=(h, w), mode="bilinear")
    f = F.normalize(f + 0.3 * torch.randn(T, D, h, w, generator=g), dim=1)  # (T, D, h, w)
    first = F.one_hot(torch.randint(0, C, (h // 10, w // 10), generator=g), C).permute(2, 0, 1).float()
    return f, F.interpolate(first[None], size=(h, w), mode="nearest")[0]    # (C, h, w)


def probe_worker(kind, frames):
    feats, first = probe_case(T=int(frames))
    step = unfold_knn_step if kind == "unfold" else probe.knn_step
    return lambda: probe.propagate(feats, first, step=step)


def bench_probe(frames=20):
    header("probe", f"k-NN propagation, 30x54 grid, D=64, {frames} frames, context 1+7, "
                    f"25x25 window, top-5 (the official formulation needs ~16 GB at 60x107, D=128)")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {k: os.path.join(tmp, k + ".pt") for k in ("local", "unfold")}
        r = {k: run_worker("probe", k, frames, out_path=p) for k, p in paths.items()}
        soft = {k: torch.load(p) for k, p in paths.items()}                 # (T, C, h, w)
    labels = {k: torch.stack([probe.soft_to_labels(s, (480, 854)) for s in v[1:]]) for k, v in soft.items()}
    fps = {k: (frames - 1) / r[k][0] for k in r}
    for k in r:
        print(f"  {k:5s}: {fps[k]:7.2f} frames/s, peak +{r[k][1] / 2**20:6.0f} MiB")
    diff = (labels["local"] != labels["unfold"]).sum().item()
    print(f"  local is {fps['local'] / fps['unfold']:.1f}x faster, {r['unfold'][1] / max(r['local'][1], 1):.0f}x "
          f"less peak memory; labels at 480x854 differ at {diff} of {labels['local'].numel()} pixels; "
          f"soft max |diff| {(soft['local'] - soft['unfold']).abs().max().item():.1e}")


# -----------------------------------------------------------------------------------------
# extract.py

def extract_worker(kind, preset, H, W, stride, frames=1):
    """`frames` random H x W frames through lila.features ("features") or extract.features
    ("extract"; "extract-no-attention": with each attention's output replaced by v, which keeps
    every tensor's size: the memory of a 4K frame without the CPU's ~40 min of attention, whose
    own kernel (flash) adds ~20 MB)."""
    import extract
    if kind == "extract-no-attention":
        model.F.scaled_dot_product_attention = lambda q, k, v: v
    lila = model.build_lila("dinov2_vits14", "none", preset).eval()
    rng = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 256, (int(H), int(W), 3), generator=rng, dtype=torch.uint8).numpy()
            for _ in range(int(frames))]
    if kind == "features":
        return lambda: [lila.features(im, max_pixels=None)[:, ::int(stride), ::int(stride)].sum().item()
                        for im in imgs]
    return lambda: [f["decoder"].sum().item() for _, f in      # in float16: a .float() would
                    extract.features(lila, enumerate(imgs), stride=int(stride))]  # add a copy to the peak


def bench_extract(sizes=((480, 854), (1080, 1920)), presets=("tiny", "paper"), strides=(1, 4),
                  big=(2160, 3840)):
    header("extract", "one random frame per fresh process, ViT-S/14 random weights, the time of "
                      "a second (warm) call; peak: RSS above the built model's; lila.features holds "
                      "float32 (D, H, W), extract float16")
    print(f"  {'frame':>9s} {'decoder':7s} {'stride':>6s} | {'lila.features':>24s} | {'extract.features':>24s} | speed")
    for H, W in sizes:
        for preset in presets:
            for stride in strides:
                ref = run_worker("extract", "features", preset, H, W, stride, calls=2)
                new = run_worker("extract", "extract", preset, H, W, stride, calls=2)
                cell = lambda r: f"{1 / r[0]:7.3f} frames/s {r[1] / 2**30:6.2f} GB"  # noqa: E731
                print(f"  {W:4d}x{H:<4d} {preset:7s} {stride:6d} | {cell(ref)} | {cell(new)} | "
                      f"x{ref[0] / new[0]:.2f}", flush=True)
    for preset, kind in (("tiny", "extract"), ("paper", "extract-no-attention")) if big else ():
        t, peak = run_worker("extract", kind, preset, *big, 1)
        how = ", attention replaced by v" if kind != "extract" else ""
        print(f"  {big[1]}x{big[0]} {preset} extract.features{how}: {t:.0f} s/frame, peak +{peak / 2**30:.2f} GB")


# -----------------------------------------------------------------------------------------
# cues.py

def bench_cues(batch=8, size=224, enc_dim=384, grid=16, repeats=3):
    header("cues", f"B={batch}, {size}^2, SD from E={enc_dim} {grid}^2, best of {repeats}")
    g = torch.Generator().manual_seed(0)
    fwd = (torch.rand(batch, 2, size, size, generator=g) - 0.5) * 0.2      # (B, 2, S, S)
    disp = torch.rand(batch, 1, size, size, generator=g) + 0.01            # (B, 1, S, S)
    enc = torch.randn(batch, enc_dim, grid, grid, generator=g)             # (B, E, h, w)
    img = torch.rand(batch, 3, size, size, generator=g)                    # (B, 3, S, S)
    ch = cues.sd_channels(enc_dim, 32, g)
    t = best_times({"flow_confidence": lambda: cues.flow_confidence(fwd, -fwd),
                    "disparity_to_depth": lambda: cues.disparity_to_depth(disp),
                    "sd_cue (no PAMR)": lambda: cues.sd_cue(enc, img, channels=ch, use_pamr=False)},
                   repeats)
    t["sd_cue (PAMR cascade)"] = best_time(lambda: cues.sd_cue(enc, img, channels=ch), 1)
    for k, v in t.items():
        print(f"  {k:22s} {v * 1e3:8.1f} ms")


# -----------------------------------------------------------------------------------------
# train.py: one step, part by part

class Sections:
    """Accumulates wall time per named section: `with sec("encoder"): ...`; sync (e.g.
    torch.cuda.synchronize) is called at both ends, so asynchronous GPU work is counted."""

    def __init__(self, sync=None):
        self.t, self.sync = {}, sync or (lambda: None)

    @contextmanager
    def __call__(self, name):
        self.sync()
        t0 = time.perf_counter()
        yield
        self.sync()
        self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0


def step_parts(lila, opt, dataset, idx, args, sd_gen, device="cpu", sync=None, bf16=False):
    """One training step of train.py, its pieces called directly and timed (same maths as
    train.lila_step + backward + AdamW, with all cues on); bf16: the
    encoder, decoder and SD cue under bf16 autocast, as train.py on a GPU."""
    sec = Sections(sync)
    amp = lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    with sec("data"):
        batch = torch.utils.data.default_collate([dataset[i] for i in idx])
        batch = {k: v.to(device) for k, v in batch.items()}
    with sec("cues"), torch.no_grad():
        img = torch.cat([batch["views"][:, 0], batch["views"][:, 1]])      # (2B, 3, S, S)
        gq, gc = batch["grid_q"], batch["grid_c"]                          # (B, S, S, 2)
        ffw, fbw = batch["flow_fwd"], batch["flow_bwd"]
        conf_t, conf_t2 = cues.flow_confidence(ffw, fbw), cues.flow_confidence(fbw, ffw)
        depth, valid = cues.disparity_to_depth(batch["disparity"].transpose(0, 1).flatten(0, 1))
        (d_t, d_t2), (v_t, v_t2) = depth.chunk(2), valid.chunk(2)           # (B, 1, Hb, Wb)
        flow_q, flow_c = train.zscore(data.warp(ffw, gq), data.warp(-fbw, gc))
        dep_q, dep_c = train.zscore(data.warp(d_t, gq), data.warp(d_t2, gc))
        fq, fc = data.warp(conf_t, gq), data.warp(conf_t2, gc)
        conf_q = torch.cat([fq, fq, data.warp(v_t, gq)], 1)                # (B, 3, S, S)
        conf_c = torch.cat([fc, fc, data.warp(v_t2, gc)], 1)
    with sec("encoder"), amp():
        grids = lila.encode(img)                                           # 4 x (2B, E, h, w)
    with sec("decoder fwd"), amp():
        feats = lila.decoder(grids, size=img.shape[-2:]).float()           # (2B, D, S, S)
    with sec("SD + PAMR"), torch.no_grad(), amp():
        B = img.shape[0] // 2
        ch = cues.sd_channels(grids[-1].shape[1], args.sd_channels, sd_gen, batch=B).to(img.device)  # (B, C)
        sd_q, sd_c = cues.sd_cue(grids[-1].float(), img, channels=torch.cat([ch, ch])).chunk(2)  # (B, C, S, S)
    with sec("in-context loss fwd+bwd"):
        leaf = feats.detach().requires_grad_()                             # loss bwd stops here
        f_q, f_c = leaf.chunk(2)
        loss, _ = incontext.incontext_loss(f_q, f_c, torch.cat([flow_q, dep_q, sd_q], 1),
                                           torch.cat([flow_c, dep_c, sd_c], 1), conf_q, conf_c,
                                           lam=args.lam, gamma=args.gamma)
        loss.backward()
    with sec("decoder bwd"):
        feats.backward(leaf.grad)
    with sec("optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)
    return sec.t


def train_step(lila, opt, dataset, idx, args, sd_gen):
    """The same step as train.py runs it (its own functions), for a cross-check of the total."""
    batch = torch.utils.data.default_collate([dataset[i] for i in idx])
    loss, _, _ = train.lila_step(batch, lila, args, sd_gen=sd_gen)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def bench_step(configs=(("tiny", 112, 8), ("paper", 224, 4)), repeats=2):
    for preset, size, pairs in configs:
        header("step", f"preset {preset}, {size}^2 views, {pairs} pairs (CPU; paper: 32), "
                       f"synthetic scenes, random encoder, best of {repeats} after 1 warm-up")
        args = train.get_args(["--preset", preset, "--weights", "none", "--size", str(size),
                               "--base", str(size), "--batch", str(pairs), "--synthetic-videos", "2"])
        dataset = train.make_dataset(args)
        lila = model.build_lila(args.backbone, args.weights, args.preset, seed=args.seed).train()
        opt = torch.optim.AdamW([p for p in lila.parameters() if p.requires_grad],
                                lr=args.lr, weight_decay=args.wd)
        gen = torch.Generator().manual_seed(0)
        render = once(lambda: [dataset[0], dataset[len(dataset) - 1]]) / 2  # renders both videos
        batches = [[(k * pairs + j) % len(dataset) for j in range(pairs)] for k in range(repeats + 1)]
        runs = [step_parts(lila, opt, dataset, idx, args, gen) for idx in batches]
        best = {k: min(r[k] for r in runs[1:]) for k in runs[0]}           # runs[0]: warm-up
        total = sum(best.values())
        for k, v in best.items():
            print(f"  {k:24s} {v:7.3f} s  {100 * v / total:5.1f} %")
        whole = min(once(lambda idx=idx: train_step(lila, opt, dataset, idx, args, gen))
                    for idx in batches[1:])
        print(f"  {'sum of parts':24s} {total:7.3f} s   whole step as train.py runs it: {whole:.3f} s "
              f"({pairs / whole:.1f} pairs/s); one synthetic video renders in {render:.2f} s "
              f"(cached, {args.synthetic_frames - 1} pairs each; DataLoader workers overlap data)")


# -----------------------------------------------------------------------------------------
# train.py on a GPU: the paper preset's step, fp32 against bf16 autocast, compiled or not

def bench_gpu(batch=32, repeats=3, max_batch=512):
    """The paper preset's training step on CUDA (random weights, synthetic scenes, no
    downloads): pairs/s and peak memory (torch.cuda.max_memory_allocated) in fp32 and under
    bf16 autocast (as train.py), with and without torch.compile of the decoder; the step's
    parts; the largest batch that fits in one pass (bf16). One table, a few minutes."""
    if not torch.cuda.is_available():
        print("\nbench.py gpu: needs a CUDA GPU (torch.cuda.is_available() is False here); "
              "nothing measured")
        return
    dev = torch.device("cuda")
    header("gpu", f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, paper preset, "
                  f"224^2 views, {batch} pairs, random weights, best of {repeats} after 1 warm-up")
    args = train.get_args(["--preset", "paper", "--weights", "none", "--batch", str(batch),
                           "--synthetic-videos", "2", "--device", "cuda"])
    dataset = train.make_dataset(args)
    lila = model.build_lila(args.backbone, args.weights, args.preset, seed=args.seed).to(dev).train()
    opt = torch.optim.AdamW(lila.decoder.parameters(), lr=args.lr, weight_decay=args.wd)
    cpu_batches = {}

    def on_gpu(pairs):                           # a batch of `pairs` pairs, collated once
        if pairs not in cpu_batches:
            idx = [j % len(dataset) for j in range(pairs)]
            cpu_batches[pairs] = torch.utils.data.default_collate([dataset[i] for i in idx])
        return {k: v.to(dev, non_blocking=True) for k, v in cpu_batches[pairs].items()}

    def step(pairs, bf16, decoder):              # train.py's step, its own functions
        b, gen = on_gpu(pairs), torch.Generator().manual_seed(0)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            v = train.features_and_sd(train.step_cues(b, args, sd_gen=gen), lila, args, decoder)
        loss, _ = train.lila_loss(v, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def measure(pairs, bf16, decoder, n=repeats):
        step(pairs, bf16, decoder)                                   # warm-up (and compile)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        best = float("inf")
        for _ in range(n):
            t0 = time.perf_counter()
            step(pairs, bf16, decoder)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best, torch.cuda.max_memory_allocated(dev) / 2**30

    print(f"  {'variant':30s} {'step':>8s} {'pairs/s':>8s} {'peak GiB':>9s}")
    compiled = None
    for bf16 in (False, True):
        for compile_ in (False, True):
            name = f"{'bf16 autocast' if bf16 else 'fp32'}{', compiled decoder' if compile_ else ''}"
            try:
                if compile_ and compiled is None:
                    compiled = torch.compile(lila.decoder)
                t, peak = measure(batch, bf16, compiled if compile_ else None)
                print(f"  {name:30s} {t:7.3f}s {batch / t:8.1f} {peak:9.2f}")
            except Exception as e:  # noqa: BLE001 - a variant that fails is a row, not the end
                print(f"  {name:30s} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
            torch.cuda.empty_cache()
    # The largest batch in one pass (bf16, not compiled): doubling until out of memory.
    fits, pairs = batch, batch * 2
    while pairs <= max_batch:
        try:
            t, peak = measure(pairs, True, None, n=1)
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        print(f"  {'bf16 autocast, ' + str(pairs) + ' pairs':30s} {t:7.3f}s {pairs / t:8.1f} {peak:9.2f}")
        fits, pairs = pairs, pairs * 2
    print(f"  largest batch tried that fits in one pass: {fits} pairs (tried up to {min(pairs, max_batch)}); "
          f"beyond: --micro-batch")
    # The step's parts (bf16 autocast as train.py; each part synchronised, so it costs more in all).
    sync = torch.cuda.synchronize
    idx = list(range(batch))
    runs = [step_parts(lila, opt, dataset, [i % len(dataset) for i in idx], args,
                       torch.Generator().manual_seed(0), device=dev, sync=sync, bf16=True)
            for _ in range(repeats + 1)]
    best = {k: min(r[k] for r in runs[1:]) for k in runs[0] if k != "data"}
    total = sum(best.values())
    for k, v in best.items():
        print(f"  {k:30s} {v:7.3f}s {100 * v / total:5.1f} %")
    try:
        import torchvision                       # RAFT with random weights, if torchvision is here
        net = torchvision.models.optical_flow.raft_small(weights=None)
        flow = cues.FlowCue(net=net).to(dev)
        b = on_gpu(batch)
        f_t, f_t2 = b["frames"][:, 0], b["frames"][:, 1]
        t = best_time(lambda: (flow(f_t, f_t2), sync()), repeats)
        print(f"  {'RAFT small (--cues hub)':30s} {t:7.3f}s  both directions, {batch} pairs at "
              f"{f_t.shape[-1]}^2; MiDaS: not measured (its code comes from torch.hub)")
    except ImportError:
        print("  RAFT / MiDaS (--cues hub): not measured (no torchvision here); the cue cache avoids them")


# -----------------------------------------------------------------------------------------
# Command line

BENCHES = {"data": bench_data, "model": bench_model, "incontext": bench_incontext,
           "pamr": bench_pamr, "probe": bench_probe, "cues": bench_cues, "step": bench_step,
           "gpu": bench_gpu, "extract": bench_extract}
QUICK = {"data": dict(repeats=1), "model": dict(batches=(1,), repeats=1),
         "incontext": dict(batch=2, repeats=1, step_batch=1),
         "pamr": dict(batch=4, gather_batch=2), "probe": dict(frames=4),
         "cues": dict(batch=2, repeats=1),
         "step": dict(configs=(("tiny", 112, 2), ("paper", 224, 1)), repeats=1),
         "gpu": dict(repeats=1, max_batch=64),
         "extract": dict(sizes=((480, 854),), presets=("tiny",), strides=(1,), big=None)}
WORKERS = {"pamr": pamr_worker, "probe": probe_worker, "extract": extract_worker}


def main(argv=None):
    p = argparse.ArgumentParser(description="LILA benchmarks (CPU): speed, memory, step breakdown.")
    p.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run, from {list(BENCHES)} "
                   "(default: all, in that order)")
    p.add_argument("--quick", action="store_true", help="small batches: the whole run in ~3 min on 2 cores")
    p.add_argument("--threads", type=int, default=0, help="torch threads here and in the "
                   "workers (0: torch's default, all cores); 1 gives steadier numbers on a busy box")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)  # internal: KIND OUT ARGS...
    p.add_argument("--calls", type=int, default=1, help=argparse.SUPPRESS)  # internal: the worker's
    a = p.parse_args(argv)
    if a.threads > 0:     # workers read OMP_NUM_THREADS at start-up
        torch.set_num_threads(a.threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(a.threads)
    if a.worker:          # a fresh process for one memory-measured call (see run_worker)
        kind, out_path, *args = a.worker
        seconds, peak, out = measured_call(WORKERS[kind](*args), a.calls)
        if out_path != "-":
            torch.save(out, out_path)
        print(json.dumps({"seconds": seconds, "peak": peak}))
        return
    unknown = [n for n in a.names if n not in BENCHES]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
    names = a.names or list(BENCHES)
    print(f"bench.py {' '.join(names)}{' --quick' if a.quick else ''}: torch {torch.__version__}, "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} threads, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"load average {os.getloadavg()[0]:.1f}")
    t0 = time.perf_counter()
    for n in names:
        BENCHES[n](**(QUICK[n] if a.quick else {}))
    print(f"\nbench.py done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    sys.exit(runs.cli("bench.py", main, oom="the sizes (try --quick)"))
