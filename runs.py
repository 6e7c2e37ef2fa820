"""The run folder of train.py: one owner, atomic checkpoints, a resumable log, a clean stop.

Nothing here is LILA; it is what makes a long training run safe to start, stop and resume:
- `RunFolder`: --out belongs to one run at a time (a lock the kernel releases even on kill -9,
  never held by forked DataLoader workers); a fresh run needs an empty folder, --resume needs
  the same config; log.jsonl is rewound to the checkpoint's step and a line cut off by a kill
  is dropped.
- `atomic_save`: a checkpoint is written to a temporary file, synced, then renamed, so a kill
  at any moment leaves the old or the new file, never a half-written one; a full disk leaves
  the old one and says so.
- `StopOnSignal`: Ctrl-C (SIGINT), SIGTERM, SIGHUP or SIGUSR1 (SLURM's --signal warning before
  a pre-emption), also sent to the whole process group as schedulers do, lets the current
  step finish, then train.py saves a checkpoint and prints how to resume.
- `set_threads`: torch threads of the main process and of the DataLoader workers that do not
  oversubscribe the cores.
- `UserError`, `user_message`, `cli`: every command-line tool's one error path: what a user
  can fix (a file, a flag, memory) ends as its whole message, never a traceback; a Ctrl-C says
  what is kept; `guard_streams`: a closed stdout or stderr (`| head -1`) ends nothing.
- `save_file`, `save_picture`: every file the repo writes (checkpoints too), atomically; a bad
  path or a full disk is one line naming it, and no partial file is left.

The run folder is train.py's; the error path and the writers are every tool's. Tests:
tests/test_train.py (kill, resume, bad folders, signals), tests/test_runs.py (process-group
signals, kill -9 and an immediate resume, threads), tests/test_reliability.py (inputs before
step 1, best.pt and ckpt.pt, output paths, torchrun settings, closed streams, memory).
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
from PIL import Image


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
        return (f"{lines[0].strip()} Running out of memory is the usual cause (dmesg names it): "
                f"try fewer --workers or a smaller --batch")
    if out_of_memory(e):
        return f"out of memory ({lines[0][:160]})"
    if isinstance(e, OSError) and e.filename is not None:   # the OS names the file: say it
        also = f" -> {e.filename2}" if e.filename2 is not None else ""
        return f"{e.filename}{also}: {e.strerror or e}"
    if isinstance(e, OSError) and e.errno is not None:   # the system's, on a path not wrapped here
        return f"{e.strerror or e} (the system names no file: {type(e).__name__}, errno {e.errno})"
    return None


def out_of_memory(e):
    """True for an allocation that failed: torch's (CPU or CUDA) or Python's own."""
    return (isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError)))
            or (isinstance(e, RuntimeError) and re.search(r"out of memory|DefaultCPUAllocator: "
                                                          r"can't allocate", str(e)) is not None))


class _Stream:
    """sys.stdout or sys.stderr that outlives its reader: when a write fails (`| head -1`, a
    closed terminal, a log collector gone), its descriptor is pointed at /dev/null and the
    program goes on, its files kept; no BrokenPipeError, not even at exit."""

    def __init__(self, stream):
        self._stream = stream

    def _gone(self):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, self._stream.fileno())   # also what the buffer still holds goes there, at exit too
        os.close(null)

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError:
            self._gone()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except OSError:
            self._gone()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def guard_streams():
    """Standard streams that cannot end a run. One closed when Python started (sys.stdout or
    sys.stderr is None) is opened anew: stderr on stdout when that is open, else on /dev/null;
    its number, when still free, is taken too, so that no file opened later gets it and with it
    the messages of C code. Then writes that fail are dropped (_Stream)."""
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        if stream is None:
            to = sys.stdout.fileno() if name == "stderr" and sys.stdout is not None else None
            new = os.dup(to) if to is not None else os.open(os.devnull, os.O_WRONLY)
            try:
                os.fstat(fd)            # taken by a file opened since the start: leave it
            except OSError:
                os.dup2(new, fd)
            stream = open(new, "w", buffering=1, errors="backslashreplace")
        if not isinstance(stream, _Stream):
            setattr(sys, name, _Stream(stream))


def cli(prog, main, code=1, strip=(), oom="", interrupted=None, explain=None, status=False):
    """Every command-line tool's entry point, `sys.exit(runs.cli("x.py", main))`: main() with the
    streams guarded (guard_streams); what the user can fix printed as "PROG: error: <the whole
    message>", never a traceback; a real bug keeps its traceback. -> the exit status: main()'s
    return value with status=True, else 0; `code` after an error, 130 after a Ctrl-C. strip:
    library prefixes not repeated after PROG (PROG's own never is); oom: the settings to lower
    when memory runs out; interrupted(): what a Ctrl-C leaves (what is kept); explain(msg):
    more about an error."""
    guard_streams()
    try:
        result = main()
        return result if status else 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{'; ' + interrupted() if interrupted else ''}", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as e:      # noqa: BLE001 - the user's errors in full, bugs with a traceback
        msg = user_message(e)
        if msg is None:
            raise
        if out_of_memory(e) and oom:
            msg += f": lower {oom}"
        msg = explain(msg) if explain else msg
        for name in (prog,) + tuple(strip):
            msg = msg[len(name) + 2:] if msg.startswith(name + ": ") else msg
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return code


def write_error(path, e, kept="the previous checkpoint, if any, is intact", then="resume with --resume"):
    """The one-line UserError for a file that could not be written: its path, why, and the free
    space there when the disk is full (most often)."""
    full = not isinstance(e, OSError) or e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    why = ((e.strerror or str(e)) if isinstance(e, OSError) and (e.strerror or str(e))
           else "a short write: is the disk full?")
    try:
        free = f"; {shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**20:.1f} MiB free there"
    except OSError:
        free = ""
    return UserError(f"cannot write {path} ({why}{free if full else ''}); {kept}. "
                     f"{'Free some space' if full else 'Fix that'} and {then}")


def save_file(path, write, flag="--out", kept="nothing else was changed", then="run again"):
    """Every file the repo writes, atomically: write(f) fills path + ".tmp", which is synced,
    renamed to `path`, and the folder synced: a kill (or a power cut) at any moment leaves the
    old or the new file, never a half-written one. A missing folder, a folder given as the
    file, a full disk: one UserError naming the path (`flag`: the setting that named it), and
    no temporary file left. torch's zip writer reports a short write as a RuntimeError around
    the OS's error; what interrupts the writer (a Ctrl-C, a DataLoader worker's death) is raised
    as itself."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: there is no folder {folder}")
    tmp, outer = f"{path}.tmp", sys.exc_info()[1]   # outer: our caller's, not our cause
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())    # the bytes on disk before the name points at them
        os.replace(tmp, path)
        sync_folder(path)
    except BaseException as e:      # also a Ctrl-C: no partial file
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, RuntimeError) and e.__context__ not in (None, outer):
            e = e.__context__       # torch's writer wraps what its file write raised
        if isinstance(e, OSError) or re.search("inline_container|PytorchStreamWriter", str(e)):
            raise write_error(path, e, kept, then) from None
        raise e
    return path


def save_picture(image, path, flag="--out"):
    """A PIL image to a file the user named (save_file); its format from the name's extension,
    which must be one PIL writes (.png, .jpg, ...)."""
    def write(f):
        fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
        if fmt is None or fmt not in Image.SAVE:
            raise UserError(f"{flag} {path}: name a picture file (.png, .jpg, ...); "
                            f"'{os.path.splitext(path)[1] or 'no extension'}' is no format to write")
        image.save(f, format=fmt)
    return save_file(path, write, flag)


def sync_folder(path):
    """fsync the folder holding `path`, so that a rename into it survives a power cut too (the
    new name is an entry of the folder, written back with the folder). Best effort: a file
    system that cannot sync a folder leaves the rename as durable as it makes it."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj, path, kept="the previous checkpoint, if any, is intact", then="resume with --resume"):
    """torch.save(obj) to `path` through save_file: a kill leaves the old or the new checkpoint;
    a full disk leaves the old one and no temporary file, and says so."""
    save_file(path, lambda f: torch.save(obj, f), kept=kept, then=then)


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

    def __init__(self, path, tool="train.py"):
        self.path, self.tool, self.lock, self.pid = path, tool, None, None

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
                raise UserError(f"{self.path} is in use by another {self.tool} run ({self.owner()} "
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
        `resumable` must equal the saved run's (two spellings of one path are one value). Sets
        self.best, the best val J&F so far: best.pt's, which is written before ckpt.pt, so that
        a stop between the two never leaves a best score that no file holds."""
        ckpt_path, self.best = self.file("ckpt.pt"), None
        if os.path.isfile(self.file("config.json")):    # a train.py run: its leftovers are ours
            for name in os.listdir(self.path):
                if name.endswith((".tmp", ".tmp.png")):   # save_file's, a kill mid-write (.tmp.png: older runs)
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
        if os.path.isfile(self.file("best.pt")):
            try:
                self.best = torch.load(self.file("best.pt"), map_location="cpu", weights_only=True,
                                       mmap=True)["best_val_jf"]
            except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
                raise UserError(f"--resume: {self.file('best.pt')} is damaged ({type(e).__name__}: "
                                f"{str(e)[:120]}); restore it, or delete it (the best score so far "
                                f"is then forgotten)") from None
        same = lambda a, b: a == b or (isinstance(a, str) and isinstance(b, str)  # noqa: E731
                                       and os.path.exists(a) and os.path.realpath(a) == os.path.realpath(b))
        diff = {k: (saved.get(k), v) for k, v in config.items()
                if k not in resumable and not same(saved.get(k), v)}
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
        save_file(path, lambda f: f.write("".join(keep).encode()), kept=f"{path} is unchanged",
                  then="resume with --resume")
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
    (a buffered write entered twice raises), and stderr may be gone (SIGHUP) or not on
    descriptor 2 (guard_streams)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):     # None, or a stand-in without a descriptor
        fd = 2
    try:
        os.write(fd, f"\n{text}\n".encode())
    except OSError:
        pass


class StopOnSignal:
    """Ctrl-C (SIGINT), SIGTERM, SIGHUP or SIGUSR1 asks the loop to stop after the current step
    and save. SIGUSR1 is what SLURM sends ahead of a pre-emption or the time limit when asked
    (`sbatch --signal=USR1@120`), so the run saves before the SIGTERM and SIGKILL that follow.

    Schedulers (SLURM, timeout, docker stop, systemd) and a closed terminal signal the whole
    process group, so the DataLoader workers die of it too, and torch's SIGCHLD handler would
    raise "worker killed by signal" anywhere in the step: once a stop is asked, a worker's end
    is no error (this step is the last; the loader shuts the workers down). A second Ctrl-C
    quits at once (the last checkpoint stays); a second SIGTERM, SIGHUP or SIGUSR1 changes
    nothing. Workers ignore Ctrl-C, SIGHUP and SIGUSR1 (`ignore_in_worker`: a terminal or a
    scheduler sends them to the group; SIGUSR1 would kill a worker by default),
    so only the main process decides when to stop; they keep SIGTERM, which is how the
    DataLoader ends them."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)
    _torch_sigchld = None     # torch's SIGCHLD handler while a stop has put it aside

    def __init__(self):
        self.name, self.ended = None, False
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
        elif not self.ended:        # after the run's last line, a repeat says nothing (`end`)
            _say(f"{name}: already stopping after this step ({self.name})")

    def end(self, line):
        """Print a stopped run's last line (its checkpoint, how to resume). A SIGTERM or SIGHUP
        repeated after it says nothing, so that it stays the last line whenever the repeat
        comes (a scheduler's second SIGTERM may arrive while the process exits)."""
        self.ended = True
        print(line, file=sys.stderr, flush=True)

    @staticmethod
    def ignore_in_worker(_):
        """The DataLoader's worker_init_fn: Ctrl-C, SIGHUP and SIGUSR1 are the main process's to
        handle; the torch threads of a worker: set_threads."""
        for s in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
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
