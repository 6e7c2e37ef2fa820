"""The evidence table: does LILA learn what the paper claims, on synthetic dynamic scenes?

Pretrained DINOv2 weights and real datasets cannot be downloaded where this repo is built and
tested, so the proof that the method is implemented right is this experiment: train on
synthetic videos of one seed range, evaluate on synthetic videos of another, and compare LILA
with its baselines and ablations, 3 seeds each, mean ± std.

Every row is one train.py run (or none) followed by three probe.py runs, all as subprocesses
with the exact command lines printed, so each number can be rerun by hand:

  rows       untrained decoder | encoder alone | ERM | LILA | LILA without PAMR | without the
             edge loss | with cue noise 0.5 and 1.0 | depth only | flow only | depth + flow
             without SD | without cropping
  training   tiny preset, random frozen ViT-S/14 (--weights none, seeded by --seed), 112² views,
             8 pairs a step, 200 AdamW steps at lr 1e-3 (the paper's 1e-4 is for 100k steps),
             synthetic videos 0..63 rendered on the fly with exact (or --cue-noise) cues
  evaluation 12 held-out synthetic videos, seeds 10000..10011, at 112²:
             vos-knn J&F (28² grid), normals RMSE and semseg mIoU (linear probes fitted on the
             first 8 videos, scored on the last 4, AdamW lr 1e-2)

Run:
  python experiments.py --jobs 2             # everything: ~2 h on 2 CPU cores (GUIDE.md)
  python experiments.py --rows lila erm --seeds 0 --jobs 1
  python experiments.py --table              # only print the table of what has finished
  python experiments.py --curves runs/evidence/no-sd/seed0 OTHER_RUN --png curves.png
                                             # per-cue L1 over training, from log.jsonl

A finished run or probe (its run/ckpt.pt at the last step, its results.json) is never redone, and an
interrupted training resumes from its checkpoint, so the command can be rerun until it is done.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, ImageDraw

import data
import runs

# name -> (train.py flags, or None for an untrained model; probe.py flags without a checkpoint)
ROWS = {
    "untrained": (None, ["--features", "decoder"]),
    "encoder": (None, ["--features", "encoder"]),
    "erm": (["--erm"], None),
    "lila": ([], None),
    "no-pamr": (["--no-pamr"], None),
    "no-edge": (["--no-edge"], None),
    "noise-0.5": (["--cue-noise", "0.5"], None),
    "noise-1.0": (["--cue-noise", "1.0"], None),
    "depth-only": (["--no-flow", "--no-sd"], None),
    "flow-only": (["--no-depth", "--no-sd"], None),
    "no-sd": (["--no-sd"], None),         # depth + flow only
    "no-crop": (["--no-crop"], None),     # the paper's ablation table has it too
}
LABELS = {
    "untrained": "untrained decoder", "encoder": "encoder alone (upsampled)", "erm": "ERM (no in-context step)",
    "lila": "**LILA** (depth + flow + SD)", "no-pamr": "LILA without PAMR", "no-edge": "LILA without the edge loss",
    "noise-0.5": "LILA, cue noise 0.5", "noise-1.0": "LILA, cue noise 1.0 (strong)",
    "depth-only": "LILA, depth only", "flow-only": "LILA, flow only",
    "no-sd": "LILA, depth + flow (no SD)", "no-crop": "LILA without cropping",
}
# probe name -> (probe.py command, its flags, metric key in results.json, column label)
PROBES = {
    "vos": ("vos-knn", ["--grid", "28"], "JF", "J&F ↑"),
    "normals": ("normals", ["--protocol", "fast", "--val-videos", "4", "--probe-lr", "1e-2"], "rmse",
                "normals RMSE ° ↓"),
    "semseg": ("semseg", ["--protocol", "fast", "--val-videos", "4", "--probe-lr", "1e-2"], "miou",
               "semseg mIoU % ↑"),
}
# Trained rows are probed on the decoder's features (what LILA trains). These rows are also
# probed the way the paper evaluates: encoder + decoder predictions summed (--features full),
# shown as an extra line of the table.
FULL = {"lila": "LILA, encoder + decoder (the paper's evaluation)"}
# Dense probes: the fast protocol of probe.py (1x1 linear probes on sampled pixels of whole
# frames; the official protocol trains on augmented crops for 10 epochs, 10+ min a run on a
# CPU), at lr 1e-2, not the default 1e-3: with D=32 features, 1000 AdamW steps at 1e-3 underfit.
EVAL_SEED, EVAL_VIDEOS, SIZE = 10000, 12, 112   # held-out seeds; training uses 0..63
HERE = os.path.dirname(os.path.abspath(__file__))  # train.py and probe.py live beside this file


def run(cmd, log_path):
    """Run one command line, its output appended to log_path; returns wall seconds."""
    line = " ".join(cmd)
    print(f"$ {line}", flush=True)
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"$ {line}\n")
        log.flush()
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode:
        raise RuntimeError(f"failed ({r.returncode}): {line}\n  see {log_path}")
    return time.time() - t0


def read_json(path):
    """A JSON object from path, or one error naming the file (a damaged or foreign file)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"{path} is damaged ({type(e).__name__}: {e}); delete it to redo that step") from None
    if not isinstance(obj, dict):
        raise RuntimeError(f"{path} is not a JSON object (a {type(obj).__name__}); delete it to redo that step")
    return obj


def finished_step(ckpt, steps):
    """The step a train.py checkpoint reached, 0 without one; a run trained past --steps would
    mix two budgets in one table, so it is an error."""
    if not os.path.isfile(ckpt):
        return 0
    import torch
    try:
        done = int(torch.load(ckpt, map_location="cpu", weights_only=True)["step"])
    except Exception as e:  # noqa: BLE001 - a damaged file is named, whatever the damage
        raise RuntimeError(f"{ckpt} is damaged ({type(e).__name__}: {str(e)[:200]}); delete it to retrain "
                           "this run") from None
    if done > steps:
        raise RuntimeError(f"{ckpt} is at step {done}, past --steps {steps}: use another --out")
    return done


def one_run(row, seed, a):
    """Train (if the row trains) and probe one (row, seed); writes OUT/row/seedS/times.json."""
    train_flags, model_flags = ROWS[row]
    out = os.path.join(a.out, row, f"seed{seed}")
    os.makedirs(out, exist_ok=True)
    log, times_path = os.path.join(out, "commands.log"), os.path.join(out, "times.json")
    times = read_json(times_path) if os.path.isfile(times_path) else {}
    py = sys.executable
    if train_flags is not None:
        run_dir = os.path.join(out, "run")   # train.py's own folder (it must own it alone)
        ckpt = os.path.join(run_dir, "ckpt.pt")
        done = finished_step(ckpt, a.steps)
        # stopped before its first checkpoint: train.py left config.json, and resumes from step 0
        started = done or os.path.isfile(os.path.join(run_dir, "config.json"))
        if done < a.steps:  # not started (fresh run) or interrupted (--resume from ckpt.pt)
            # every run of the table differs from this command only in its row's flags
            cmd = [py, os.path.join(HERE, "train.py"), "--preset", "tiny", "--weights", "none",
                   "--steps", str(a.steps), "--batch", "8", "--lr", str(a.lr), "--seed", str(seed), "--workers", "1",
                   "--synthetic-seed", "0", "--synthetic-videos", "64", "--log-every", "20",
                   "--save-every", "50", "--out", run_dir] + train_flags + (["--resume"] if started else [])
            times["train"] = times.get("train", 0.0) + run(cmd, log)   # summed over resumes
        variants = {"": ["--ckpt", ckpt, "--features", "decoder"]}  # seeded encoder: from its config
        if row in FULL:
            variants["_full"] = ["--ckpt", ckpt, "--features", "full"]
    else:                           # the baselines: same seeded encoder, decoder never trained
        variants = {"": ["--ckpt", "none", "--preset", "tiny", "--weights", "none"] + model_flags}
    for suffix, model in variants.items():
        for name, (cmd_name, flags, _, _) in PROBES.items():
            res = os.path.join(out, f"probe_{name}{suffix}", "results.json")
            if not os.path.isfile(res):
                cmd = [py, os.path.join(HERE, "probe.py"), cmd_name, "--data", a.eval_data, "--size",
                       str(SIZE), "--seed", str(seed), "--out", os.path.dirname(res)] + model + flags
                times[name + suffix] = run(cmd, log)
    with open(times_path, "w") as f:
        json.dump(times, f)


def collect(a):
    """{row: {probe: [values over finished seeds], "train_s": [...], "seeds": [...]}}; a row
    of FULL also gives "<row>+full" (its probes with --features full)."""
    table = {}
    for row, suffix in [(r, s) for r in a.rows for s in ([""] + (["_full"] if r in FULL else []))]:
        r = table.setdefault(row + suffix.replace("_", "+"), {"seeds": [], "train_s": []})
        for seed in a.seeds:
            out = os.path.join(a.out, row, f"seed{seed}")
            vals = {}
            for name, (_, _, key, _) in PROBES.items():
                res = os.path.join(out, f"probe_{name}{suffix}", "results.json")
                if os.path.isfile(res):
                    m = read_json(res).get("metrics")
                    if not isinstance(m, dict) or key not in m:
                        raise RuntimeError(f"{res}: no metrics.{key} (damaged or written by another program); "
                                           "delete it to rerun that probe")
                    vals[name] = m[key]         # None: the probe had no valid pixel to score
            if len(vals) < len(PROBES):
                continue  # this seed is not finished
            r["seeds"].append(seed)
            for k, v in vals.items():
                r.setdefault(k, []).append(v)
            t = os.path.join(out, "times.json")
            if ROWS[row][0] is not None and os.path.isfile(t):
                r["train_s"].append(read_json(t).get("train", float("nan")))
    return table


def fmt(vals, digits):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "—"
    m = statistics.mean(vals)
    if len(vals) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(vals):.{digits}f}"   # sample std (n - 1)


def print_table(a):
    """The markdown table of GUIDE.md, from whatever has finished; also OUT/table.md."""
    table = collect(a)
    head = "| features | " + " | ".join(p[3] for p in PROBES.values()) + " | seeds | train min/run |"
    lines = [head, "|" + "---|" * (len(PROBES) + 3)]
    for row, r in table.items():
        cells = [fmt(r.get("vos", []), 3), fmt(r.get("normals", []), 1), fmt(r.get("semseg", []), 1)]
        train = f"{statistics.mean(r['train_s']) / 60:.1f}" if r["train_s"] else "—"
        label = FULL[row[:-5]] if row.endswith("+full") else LABELS[row]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(r['seeds'])} | {train} |")
    text = "\n".join(lines)
    print(text)
    runs.save_file(os.path.join(a.out, "table.md"), lambda f: f.write((text + "\n").encode()))
    runs.save_file(os.path.join(a.out, "table.json"), lambda f: f.write(json.dumps(table, indent=1).encode()))


CUES = ("flow_x", "flow_y", "depth", "sd")          # the per-cue L1s train.py logs
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def read_log(path):
    """The rows of a train.py log.jsonl; a line cut off by a kill is skipped, anything else
    unreadable is one error naming the file and line."""
    rows = []
    with open(path) as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            if i == len(lines):                    # the last line, cut off mid-write
                continue
            raise SystemExit(f"experiments.py: {path}:{i} is not a JSON line; a damaged log") from None
        if row is not None:
            if not isinstance(row, dict):
                raise SystemExit(f"experiments.py: {path}:{i} is not a log row (a JSON {type(row).__name__})")
            rows.append(row)
    return rows


def plot_curves(folders, png, labels=None, w=260, h=170, pad=34):
    """One panel per cue: its L1 on the query (log.jsonl "l1_<cue>") over the training steps
    of each run, drawn with PIL. folders: the runs' folders; labels: their legend names."""
    labels = labels or [os.path.normpath(r) for r in folders]
    logs = [read_log(os.path.join(r, "log.jsonl")) for r in folders]
    cues = [c for c in CUES if any(f"l1_{c}" in row for rows in logs for row in rows)]
    img = Image.new("RGB", (len(cues) * (w + pad) + pad, h + 2 * pad + 14 * len(folders)), "white")
    draw = ImageDraw.Draw(img)
    for i, cue in enumerate(cues):
        x0, y0 = pad + i * (w + pad), pad
        pts = [[(r["step"], r[f"l1_{cue}"]) for r in rows if f"l1_{cue}" in r and "step" in r] for rows in logs]
        steps = [s for p in pts for s, _ in p]
        vals = [v for p in pts for _, v in p]
        if not vals:
            continue
        smax, lo, hi = max(steps), min(vals), max(vals)
        hi = hi if hi > lo else lo + 1e-6
        draw.rectangle([x0, y0, x0 + w, y0 + h], outline=(0, 0, 0))
        draw.text((x0 + 4, y0 - 14), f"L1 {cue.replace('_', '-')}", fill=(0, 0, 0))
        draw.text((x0 - pad + 2, y0), f"{hi:.3g}", fill=(0, 0, 0))
        draw.text((x0 - pad + 2, y0 + h - 10), f"{lo:.3g}", fill=(0, 0, 0))
        draw.text((x0 + w - 30, y0 + h + 3), f"{smax}", fill=(0, 0, 0))
        draw.text((x0 + 2, y0 + h + 3), "step", fill=(0, 0, 0))
        for k, p in enumerate(pts):
            xy = [(x0 + w * s / smax, y0 + h - h * (v - lo) / (hi - lo)) for s, v in p]
            if len(xy) > 1:
                draw.line(xy, fill=COLOURS[k % len(COLOURS)], width=2)
    for k, label in enumerate(labels):
        y = h + 2 * pad - 6 + 14 * k
        draw.line([(pad, y + 6), (pad + 20, y + 6)], fill=COLOURS[k % len(COLOURS)], width=3)
        draw.text((pad + 26, y), label, fill=(0, 0, 0))
    runs.save_picture(img, png, "--png")
    return png


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="rows to run")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds per row")
    p.add_argument("--steps", type=int, default=200, help="training steps per run")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--out", default="runs/evidence", help="one folder per row and seed, table.md")
    p.add_argument("--jobs", type=int, default=1, help="runs at once; each gets "
                   "OMP_NUM_THREADS = cores // jobs (2 OpenMP threads on a busy core collapse)")
    p.add_argument("--table", action="store_true", help="only print the table of finished runs")
    p.add_argument("--curves", nargs="+", metavar="RUN", help="only draw the per-cue L1 curves "
                   "of these train.py run folders (their log.jsonl) into --png")
    p.add_argument("--labels", nargs="+", help="legend names of the --curves runs")
    p.add_argument("--png", default="curves.png", help="output picture of --curves")
    a = p.parse_args(argv)
    for flag, v in (("--jobs", a.jobs), ("--steps", a.steps)):
        if v < 1:
            p.error(f"{flag} {v}: must be >= 1")
    if not a.lr > 0 or a.lr != a.lr:
        p.error(f"--lr {a.lr}: must be > 0")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        p.error(f"--out {a.out} is a file; give a folder")
    if a.curves and not os.path.isdir(os.path.dirname(os.path.abspath(a.png))):
        p.error(f"--png {a.png}: no folder {os.path.dirname(os.path.abspath(a.png))}")
    if a.curves:
        missing = [r for r in a.curves if not os.path.isfile(os.path.join(r, "log.jsonl"))]
        if missing:
            p.error(f"--curves: no log.jsonl in {', '.join(missing)}")
        return print(plot_curves(a.curves, a.png, a.labels))
    os.makedirs(a.out, exist_ok=True)
    if a.table:
        try:
            return print_table(a)
        except RuntimeError as e:
            raise SystemExit(f"experiments.py: {e}") from None
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // a.jobs))
    a.eval_data = os.path.join(a.out, "eval")
    if not os.path.isfile(os.path.join(a.eval_data, "done.txt")):  # held-out videos, rendered once
        data.write_synthetic(a.eval_data, EVAL_VIDEOS, 12, SIZE, EVAL_SEED)
        open(os.path.join(a.eval_data, "done.txt"), "w").write(f"seeds {EVAL_SEED}..\n")
    # seed-major order: the first seed of every row finishes before the second seed starts
    tasks = [(row, seed) for seed in a.seeds for row in a.rows]
    t0 = time.time()
    with ThreadPoolExecutor(a.jobs) as pool:   # threads only wait on the subprocesses
        futures = [pool.submit(one_run, row, seed, a) for row, seed in tasks]
        try:
            for f in futures:
                f.result()
        except RuntimeError as e:   # a failed command: the running ones finish, no new one starts
            pool.shutdown(cancel_futures=True)
            raise SystemExit(f"experiments.py: {e}")
    print(f"\n{len(tasks)} runs in {(time.time() - t0) / 60:.1f} min wall, {a.jobs} at once\n")
    try:
        print_table(a)
    except RuntimeError as e:
        raise SystemExit(f"experiments.py: {e}") from None


if __name__ == "__main__":
    sys.exit(runs.cli("experiments.py", main, oom="--jobs"))
