"""The run folder of train.py: one owner, atomic checkpoints, a resumable log, a clean stop.

Nothing here is LILA; it is what makes a long training run safe to start, stop and resume:
- `RunFolder`: --out belongs to one run at a time (a lock the kernel releases even on kill -9,
  never held by forked DataLoader workers); a fresh run needs an empty folder, --resume needs
  the same config; log.jsonl is rewound to the checkpoint's step and a line cut off by a kill
  is dropped.
- `atomic_save`: a checkpoint is written to a temporary file, synced, then renamed, so a kill
  at any moment leaves the old or the new file, never a half-written one; a full disk leaves
  the old one and says so.
- `StopOnSignal`: Ctrl-C (SIGINT), SIGTERM or SIGHUP, also sent to the whole process group as
  schedulers do, lets the current step finish, then train.py saves a checkpoint and prints how
  to resume.
- `set_threads`: torch threads of the main process and of the DataLoader workers that do not
  oversubscribe the cores.
- `FeaturePicture`: the picture of a fixed pair's features written at every checkpoint, with
  one PCA basis fitted at the first picture, so colours are comparable over training.
- `UserError`, `user_message`: the errors a user can fix end as their whole message, never a
  traceback.
- `step_picture` (a lecture's slide of one step, from a checkpoint or a random decoder):
  python runs.py step-picture --ckpt runs/lila/ckpt.pt --out step.png

Used by train.py only; tests: tests/test_train.py (kill, resume, bad folders, signals) and
tests/test_runs.py (process-group signals, kill -9 and an immediate resume, threads).
"""
import errno
import fcntl
import json
import os
import random
import re
import shutil
import signal
import socket
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw


class UserError(Exception):
    """Something the user can fix (a path, a file, a flag): its message is printed, no traceback."""


def user_message(e):
    """The whole message of an error the user caused, or None for a real bug. Library code in
    this repo starts such messages with its file name ("data.py: ..."); every line counts
    (cues.py's say what to install and how to provide a network). An error raised in a
    DataLoader worker arrives wrapped, its original message after the worker's traceback."""
    if isinstance(e, UserError):
        return str(e)
    if not isinstance(e, (OSError, ValueError, RuntimeError)):
        return None
    lines = str(e).strip().split("\n")
    for i, line in enumerate(lines):
        m = re.match(r"^(?:\w+Error: )?(\w+\.py[: ].*)$", line.strip())
        if m and (i == 0 or re.match(r"\w+Error: ", line)):   # the message, or a wrapped one
            return "\n".join([m.group(1)] + lines[i + 1:])
    m = re.match(r"DataLoader worker \(pid.*?\) (is killed by|exited unexpectedly)", lines[0])
    if m:   # a worker killed from outside, not by a stop (those end the run cleanly)
        return (f"{lines[0].strip()} The last checkpoint is kept. Running out of memory is the "
                f"usual cause (dmesg names it): try fewer --workers or a smaller --batch, then --resume")
    return None


def write_error(path, e, kept="the previous checkpoint, if any, is intact", then="resume with --resume"):
    """The one-line UserError for a file that could not be written (a full disk, most often)."""
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path)) or ".").free
    why = e.strerror if isinstance(e, OSError) and e.strerror else "a short write: is the disk full?"
    return UserError(f"cannot write {path} ({why}; {free / 2**20:.1f} MiB free there); {kept}. "
                     f"Free some space and {then}")


def atomic_save(obj, path):
    """torch.save to a temporary file, fsync, then rename: a kill at any moment leaves either
    the old or the new file, never a half-written one. A full disk leaves the old file and no
    temporary one, and is reported as such (torch's zip writer reports a short write as a
    RuntimeError, the OS as an OSError). What interrupts the writer (a second Ctrl-C, a
    DataLoader worker's death) is raised as itself, not as the writer's RuntimeError."""
    tmp, outer = path + ".tmp", sys.exc_info()[1]   # outer: our caller's, not our cause
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:      # also a Ctrl-C: no .tmp is left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, RuntimeError) and e.__context__ not in (None, outer):
            e = e.__context__       # torch's writer wraps what its file write raised
        if isinstance(e, OSError) or re.search("inline_container|PytorchStreamWriter", str(e)):
            raise write_error(path, e) from None
        raise e


# The lock files this process holds: closed in every forked child (a DataLoader worker), so that
# the lock ends with this process, not seconds later with its last worker (a flock belongs to
# the open file, which fork shares). Closing is not unlocking: the parent keeps its lock.
_HELD_LOCKS = set()


def _close_locks_in_child():
    for f in _HELD_LOCKS:
        f.close()
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_locks_in_child)


class RunFolder:
    """The --out folder, owned by one run at a time.

    A lock (fcntl.flock on OUT/.lock, released by the kernel when the process ends, even on
    kill -9; forked DataLoader workers close their copy at once, so an immediate --resume after
    a kill is not refused) stops a second run from writing into the same folder; .lock names
    the owner (pid and host). A fresh run needs an empty (or new) folder; --resume needs this
    run's config.json, and continues from ckpt.pt (or from step 0 if the run stopped before its
    first checkpoint). log.jsonl is rewound to the checkpoint's step; a line cut off by a kill
    is dropped, and temporary files a kill left are removed."""

    FILES = ("ckpt.pt", "config.json", "log.jsonl")
    TEMPORARY = ("ckpt.pt.tmp", "config.json.tmp", "log.jsonl.tmp")   # a kill mid-write leaves them

    def __init__(self, path):
        self.path, self.lock, self.pid = path, None, None

    def file(self, name):
        return os.path.join(self.path, name)

    def owner(self):
        """Who holds the lock, as its .lock says ("pid 123 on host"), or a guess."""
        try:
            with open(self.file(".lock")) as f:
                return f.read().strip() or "a run that is starting"
        except OSError:
            return "another run"

    def acquire(self, resume=False):
        """Create the folder (not for --resume: a missing folder is an error, not a new run)
        and take its lock, or say which run holds it."""
        if not self.path:
            raise UserError("--out is empty; give a folder")
        if resume and not os.path.isdir(self.path):
            raise UserError(f"--resume: there is no folder {self.path}")
        existed = os.path.isdir(self.path)
        try:
            os.makedirs(self.path, exist_ok=True)
            # "a": never truncate another run's lock; unbuffered: a failed write fails once
            lock = open(self.file(".lock"), "ab", buffering=0)
        except OSError as e:
            raise UserError(f"--out {self.path}: cannot {'write in' if existed else 'create'} "
                            f"the run folder ({e.strerror})") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # the lock file may have been removed by a run releasing it between our open and
            # flock: then we hold a lock on a deleted file, and must not go on
            if not os.path.exists(lock.name) or os.stat(lock.name).st_ino != os.fstat(lock.fileno()).st_ino:
                raise BlockingIOError
        except OSError as e:
            lock.close()
            if isinstance(e, BlockingIOError) or e.errno in (errno.EACCES, errno.EAGAIN):
                raise UserError(f"{self.path} is in use by another train.py run ({self.owner()} "
                                f"holds {self.file('.lock')}); wait for it to end, or pass "
                                f"another --out") from None
            raise UserError(f"--out {self.path}: cannot lock {self.file('.lock')} ({e.strerror}): "
                            f"its file system has no file locks; pass an --out on another "
                            f"disk") from None
        self.lock, self.pid = lock, os.getpid()
        _HELD_LOCKS.add(lock)
        try:
            lock.truncate(0)
            lock.write(f"pid {os.getpid()} on {socket.gethostname()}".encode())
        except OSError as e:
            self.release()
            raise write_error(self.file(".lock"), e, "nothing was changed",
                              "resume with --resume" if resume else "run again") from None

    def release(self):
        if self.lock is None:
            return
        if os.getpid() == self.pid:       # never in a forked child: the lock is its parent's
            try:    # remove, then unlock: a run that opened the old file sees it gone
                os.remove(self.file(".lock"))
            except OSError:
                pass
            self.lock.close()
        _HELD_LOCKS.discard(self.lock)
        self.lock = None

    def check(self, args, config, resumable):
        """-> the checkpoint dict to resume from, or None to start at step 0. Flags not in
        `resumable` must equal the saved run's."""
        ckpt_path = self.file("ckpt.pt")
        if os.path.isfile(self.file("config.json")):    # a train.py run: its leftovers are ours
            for name in os.listdir(self.path):
                if name in self.TEMPORARY or name.endswith(".tmp.png"):
                    os.remove(self.file(name))
        others = sorted(set(os.listdir(self.path)) - {".lock"}) if os.path.isdir(self.path) else []
        if not args.resume:
            if os.path.isfile(ckpt_path):
                raise UserError(f"{ckpt_path} exists: pass --resume to continue that run, or "
                                f"another --out")
            if "config.json" in others:
                raise UserError(f"--out {self.path} holds a train.py run stopped before its "
                                f"first checkpoint (config.json, no ckpt.pt): pass --resume to "
                                f"continue it from step 0, or another --out")
            if others:
                raise UserError(f"--out {self.path} is not empty ({', '.join(others[:4])}"
                                f"{' ...' if len(others) > 4 else ''}) and holds no run to "
                                f"resume; pass a new or empty folder")
            return None
        if not os.path.isfile(self.file("config.json")):
            raise UserError(f"--resume: {self.path} holds no train.py run (no config.json)")
        try:
            saved = json.load(open(self.file("config.json")))
        except (OSError, ValueError) as e:
            raise UserError(f"--resume: cannot read {self.file('config.json')} ({e})") from None
        if not isinstance(saved, dict):
            raise UserError(f"--resume: {self.file('config.json')} is not a train.py config "
                            f"(a JSON {type(saved).__name__}, not an object)")
        ckpt = None
        if os.path.isfile(ckpt_path):
            try:
                ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
                saved, step = ckpt["config"], int(ckpt["step"])
            except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
                raise UserError(f"--resume: {ckpt_path} is damaged or not a train.py checkpoint "
                                f"({type(e).__name__}: {str(e)[:120]}); restore it, or delete "
                                f"it to restart the run from step 0") from None
            if step >= args.steps:
                raise UserError(f"--resume: {ckpt_path} is at step {step}, the run is done "
                                f"(--steps {args.steps}); pass a larger --steps to go on")
        diff = {k: (saved.get(k), v) for k, v in config.items()
                if k not in resumable and saved.get(k) != v}
        if diff:
            shown = dict(list(diff.items())[:5])
            more = f" and {len(diff) - 5} more" if len(diff) > 5 else ""
            raise UserError(f"--resume: {self.path} was written with other settings "
                            f"(saved, now): {shown}{more}")
        return ckpt

    def rewind_log(self, step):
        """Keep the log lines of steps <= step (what the checkpoint has seen); drop any line a
        kill cut off. Returns the number of dropped damaged lines."""
        path, keep, bad = self.file("log.jsonl"), [], 0
        if not os.path.exists(path):
            return 0
        for line in open(path):
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                bad += 1
        try:
            with open(path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(path + ".tmp", path)
        except OSError as e:
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
            raise write_error(path, e, f"{path} is unchanged") from None
        return bad


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
            "python": random.getstate()[1]}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.seed(0)
    np.random.set_state(("MT19937", np.array(s["numpy"], dtype=np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(s["python"]), None))


def _say(text):
    """Print from a signal handler: os.write, since the handler may run inside another print
    (a buffered write entered twice raises), and stderr may be gone (SIGHUP)."""
    try:
        os.write(2, f"\n{text}\n".encode())
    except OSError:
        pass


class StopOnSignal:
    """Ctrl-C (SIGINT), SIGTERM or SIGHUP asks the loop to stop after the current step and save.

    Schedulers (SLURM, timeout, docker stop, systemd) and a closed terminal signal the whole
    process group, so the DataLoader workers die of it too, and torch's SIGCHLD handler would
    raise "worker killed by signal" anywhere in the step: once a stop is asked, a worker's end
    is no error (this step is the last; the loader shuts the workers down). A second Ctrl-C
    quits at once (the last checkpoint stays); a second SIGTERM or SIGHUP changes nothing.
    Workers ignore Ctrl-C and SIGHUP (`ignore_in_worker`: the terminal sends them to the group),
    so only the main process decides when to stop; they keep SIGTERM, which is how the
    DataLoader ends them."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    _torch_sigchld = None     # torch's SIGCHLD handler while a stop has put it aside

    def __init__(self):
        self.name = None
        if StopOnSignal._torch_sigchld is not None:       # an earlier run in this process stopped
            signal.signal(signal.SIGCHLD, StopOnSignal._torch_sigchld)
            StopOnSignal._torch_sigchld = None
        for s in self.SIGNALS:
            signal.signal(s, self)

    def __call__(self, signum, frame):
        name = signal.Signals(signum).name
        if self.name is None:
            self.name = name
            StopOnSignal._torch_sigchld = signal.getsignal(signal.SIGCHLD)
            signal.signal(signal.SIGCHLD, lambda *_: None)
            _say(f"{name}: stopping after this step and saving a checkpoint (Ctrl-C again to "
                 f"quit now)")
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            _say(f"{name}: already stopping after this step ({self.name})")

    @staticmethod
    def ignore_in_worker(_):
        """The DataLoader's worker_init_fn: Ctrl-C and SIGHUP are the main process's to handle;
        the torch threads of a worker: set_threads."""
        for s in (signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        torch.set_num_threads(_WORKER_THREADS)


_WORKER_THREADS = 1      # torch threads of each DataLoader worker (set_threads)


def thread_plan(cores, workers, omp=None, processes=1):
    """-> (torch threads of the main process, of each DataLoader worker, why). All threads of
    all processes together fit on the cores: more threads than cores make each op wait for the
    descheduled ones (a tiny step 5-10x slower on a loaded machine). A worker prepares one
    sample at a time (1 thread); the main process gets the cores left, shared with the other
    local processes of a torchrun. omp: OMP_NUM_THREADS, the user's choice, kept."""
    try:
        chosen = int(str(omp).split(",")[0])
    except ValueError:
        chosen = 0
    if chosen >= 1:
        return chosen, 1, f"OMP_NUM_THREADS={omp}"
    share = f"{cores} cores" + (f" / {processes} processes" if processes > 1 else "")
    return max(1, cores // max(1, processes) - workers), 1, share


def set_threads(workers):
    """Applies thread_plan to this process (each worker applies its own in ignore_in_worker)
    and returns the line train.py prints with the device."""
    global _WORKER_THREADS
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes = os.environ.get("LOCAL_WORLD_SIZE", "1")       # set by torchrun
    main, _WORKER_THREADS, why = thread_plan(cores, workers, os.environ.get("OMP_NUM_THREADS"),
                                             int(processes) if processes.isdigit() else 1)
    torch.set_num_threads(main)
    return f"CPU threads {main} + {workers} worker(s) x {_WORKER_THREADS} ({why})"


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
        f = feats.float().cpu().permute(0, 2, 3, 1).reshape(-1, feats.shape[1])  # (2 S², D)
        if self.state is None:
            mean = f.mean(0)
            _, _, V = torch.pca_lowrank(f - mean, q=3, center=False)   # (D, 3)
            y = (f - mean) @ V[:, :3]
            self.state = dict(mean=mean, basis=V[:, :3], lo=y.quantile(0.01, 0), hi=y.quantile(0.99, 0),
                              step=step)
        st = self.state
        y = (((f - st["mean"]) @ st["basis"] - st["lo"]) / (st["hi"] - st["lo"] + 1e-8)).clamp(0, 1)
        rgb = (y.reshape(2, S, S, 3) * 255).byte().numpy()
        img = (x.permute(0, 2, 3, 1).cpu().numpy() * 255).astype(np.uint8)  # (2, S, S, 3)
        row = np.concatenate([img[0], img[1], rgb[0], rgb[1]], axis=1)       # (S, 4S, 3)
        canvas = Image.new("RGB", (4 * S, S + 14), "white")
        canvas.paste(Image.fromarray(row), (0, 14))
        draw = ImageDraw.Draw(canvas)
        # ASCII labels: PIL's built-in font has no Greek letters
        for i, text in enumerate(["frame t", "frame t+dt", f"features t (step {step})", "features t+dt"]):
            draw.text((i * S + 2, 1), text, fill=(0, 0, 0))
        canvas.save(path + ".tmp.png")
        os.replace(path + ".tmp.png", path)




# --- the picture of one step, for a lecture: python runs.py step-picture ---

def _panel(x, lo, hi, counted=None):
    """A (C, S, S) map -> (S, S, 3) uint8, lo..hi to black..white: 2 channels = flow (hue: the
    direction, brightness: the speed up to hi), 1 = grey, 3 = RGB; blue where not `counted`."""
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
    loss counts it. Built by train.py's own step_cues and features_and_sd, incontext's
    ridge_map and apply_map. Extra flags are train.py's (the checkpoint's config otherwise)."""
    import argparse
    import incontext, model, train   # noqa: E401 - train.py imports this file
    p = argparse.ArgumentParser(prog="runs.py step-picture", description=step_picture.__doc__)
    p.add_argument("--ckpt", required=True, help="a train.py ckpt.pt, or none: a random decoder")
    p.add_argument("--out", default="step.png", help="the PNG to write")
    p.add_argument("--pair", type=int, default=0, help="index of the training pair")
    a, rest = p.parse_known_args(argv)
    try:
        ckpt = None if a.ckpt == "none" else torch.load(a.ckpt, map_location="cpu", weights_only=True)
        ckpt is None or (ckpt["config"], ckpt["decoder"], ckpt["step"])
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        p.error(f"--ckpt {a.ckpt} is no readable train.py checkpoint ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[0][:160]})")
    args = train.get_args(rest)
    given = {x.split("=")[0] for x in rest}
    for k, v in (ckpt["config"] if ckpt else {}).items():      # the run's, unless given here
        if "--" + k.replace("_", "-") not in given:
            setattr(args, k, v)
    dataset = train.make_dataset(args)
    if not 0 <= a.pair < len(dataset):
        p.error(f"--pair {a.pair} must lie in 0..{len(dataset) - 1} (the pairs of an epoch)")
    device = train.pick_device(args.device, 0)
    lila = model.build_lila(args.backbone, args.weights, args.preset, seed=args.seed)
    lila = lila.to(device).eval()
    if ckpt:
        lila.decoder.load_state_dict(ckpt["decoder"])
    batch = torch.utils.data.default_collate([dataset[a.pair]])
    batch = {k: x.to(device) if torch.is_tensor(x) else x for k, x in batch.items()}
    with torch.no_grad():
        cues = train.step_cues(batch, args, *train.make_cue_nets(args, device),
                               torch.Generator().manual_seed(args.seed))
        v = train.features_and_sd(cues, lila, args)
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
    canvas.save(a.out)
    print(f"runs.py: wrote {a.out} ({canvas.width} x {canvas.height} px): pair {a.pair}, "
          f"cues {', '.join(n for n, _ in rows)}")
    return canvas


if __name__ == "__main__":
    if sys.argv[1:2] != ["step-picture"]:
        sys.exit("usage: python runs.py step-picture --ckpt CKPT|none [--out step.png] "
                 "[--pair I] [train.py flags]")
    step_picture(sys.argv[2:])
