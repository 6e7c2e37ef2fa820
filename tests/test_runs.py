"""runs.py: stops from outside (a real process group sent SIGTERM, SIGHUP, Ctrl-C twice), kill -9
and an immediate --resume, the whole message of a cue-network failure, the thread plan, the
run folder's lock and leftovers."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny", "--weights", "none", "--batch", "2", "--workers", "2",
        "--synthetic-videos", "2", "--synthetic-frames", "6", "--size", "56", "--base", "56",
        "--log-every", "1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def train(args, **kw):
    return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], env=ENV,
                          capture_output=True, text=True, timeout=300, **kw)


# train.py whose main process sends a signal to its own process group twice, inside the loss of
# step AT (1, 2, ...): a scheduler's stop and its repeat, or Ctrl-C twice from a terminal, at a
# fixed moment of a step, so no test depends on how long a step or a save takes.
SIGNAL_IN_STEP = """
import os, runpy, sys
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
import incontext
loss, calls = incontext.incontext_loss, []
def signalled(*a, **kw):
    calls.append(1)
    if len(calls) == int(os.environ["AT"]):
        for _ in range(2):
            os.kill(0, int(os.environ["SIGNAL"]))   # pid 0: the whole group; handled at once
    return loss(*a, **kw)
incontext.incontext_loss = signalled
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class Group:
    """train.py started in its own process group (as a scheduler or `timeout` starts it); the
    group is killed on exit, so a test leaves no worker behind. twice_at (signal, step): the
    run signals its group twice inside that step (SIGNAL_IN_STEP)."""

    def __init__(self, args, twice_at=None):
        cmd, env = [sys.executable, os.path.join(REPO, "train.py"), *args], ENV
        if twice_at:
            cmd.insert(1, "-c"), cmd.insert(2, SIGNAL_IN_STEP)
            env = dict(ENV, SIGNAL=str(int(twice_at[0])), AT=str(twice_at[1]))
        self.p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True)

    def wait_for(self, path, lines=1, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline and self.p.poll() is None:
            if os.path.exists(path) and (not lines or open(path).read().count("\n") >= lines):
                return
            time.sleep(0.02)
        raise AssertionError(f"{path} not written: {self.p.communicate()[1][-2000:]}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.p.wait()


def ckpt_step(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=lambda s: s.name)
def test_sigterm_to_the_process_group_saves_the_current_step(tmp_path, sig):
    # as `timeout`, SLURM or docker stop do: the workers die of it too, and their end must not
    # crash the step being finished; a second SIGTERM (a second scancel) changes nothing.
    # SIGUSR1: SLURM's warning before a pre-emption (sbatch --signal=USR1@120) saves the same.
    out, name = str(tmp_path / "t"), sig.name
    with Group(TINY + ["--steps", "500", "--save-every", "1000", "--out", out], (sig, 3)) as g:
        err = g.p.communicate(timeout=120)[1]
    assert g.p.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err and "killed by signal" not in err
    step, last = ckpt_step(out), err.strip().splitlines()[-1]
    assert step == 3 and err.count(f"{name}: already stopping after this step") == 1
    assert f"stopped by {name} at step {step};" in last and last.endswith("--resume")
    r = train(TINY + ["--steps", str(step + 1), "--save-every", "1000", "--out", out, "--resume"])
    assert r.returncode == 0 and f"done: step {step + 1}" in r.stdout, r.stderr[-2000:]


def test_a_repeated_sigterm_after_the_last_line_says_nothing(own_signal_handlers, capfd):
    # a scheduler's second SIGTERM may come while the stopped run exits: the line saying how to
    # resume must stay the last
    stop = runs.StopOnSignal()
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)          # during the step: "already stopping"
    stop.end("train.py: stopped by SIGTERM at step 3; ... --resume")
    os.kill(os.getpid(), signal.SIGTERM)          # after the last line: nothing
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--resume") and sum("already stopping" in x for x in err) == 1


def test_a_second_ctrl_c_quits_with_status_130(tmp_path):
    out = str(tmp_path / "c")      # the terminal sends Ctrl-C to the group, twice in step 3
    with Group(TINY + ["--steps", "500", "--save-every", "1", "--out", out], (signal.SIGINT, 3)) as g:
        err = g.p.communicate(timeout=120)[1]
    assert g.p.returncode == 130, err[-2000:]
    assert "\ntrain.py: interrupted; the last checkpoint is kept" in err
    assert "Traceback" not in err and not os.path.exists(os.path.join(out, "ckpt.pt.tmp"))
    assert ckpt_step(out) == 2                     # quit at once: step 3 is not finished


def test_kill_9_then_an_immediate_resume_is_not_refused(tmp_path):
    # the killed run's DataLoader workers outlive it by seconds; they must not hold the lock
    out = str(tmp_path / "k")
    with Group(TINY + ["--steps", "500", "--save-every", "1", "--out", out]) as g:
        g.wait_for(os.path.join(out, "ckpt.pt"), lines=0)
        os.killpg(g.p.pid, signal.SIGSTOP)         # stopped, the workers live until killed below
        os.kill(g.p.pid, signal.SIGKILL)
        g.p.wait()
        folder = runs.RunFolder(out)
        folder.acquire(resume=True)                # what --resume does first, at once
        os.killpg(g.p.pid, 0)                      # ... while its workers live (else: raises)
        folder.release()
        step = ckpt_step(out)
        r = train(TINY + ["--steps", str(step + 1), "--out", out, "--resume"])   # no sleep
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"done: step {step + 1}" in r.stdout


def test_a_cue_network_failure_is_printed_in_full_with_the_other_way(tmp_path):
    import data
    root = tmp_path / "vids"
    data.write_synthetic(str(root), videos=1, frames=3, size=56, seed=0)
    shutil.rmtree(root / "Cues")                      # frames only: --cues auto picks hub
    stand_in = tmp_path / "site" / "torchvision"    # torchvision present or not, it fails here
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text("raise ImportError('stand-in: no torchvision')\n")
    r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *TINY, "--workers", "0",
                        "--data", str(root), "--steps", "1", "--out", str(tmp_path / "o")],
                       env=dict(ENV, PYTHONPATH=str(tmp_path / "site")), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    err = r.stderr[r.stderr.index("train.py: error: cues.py:"):]
    assert "pip install torchvision" in err                           # cues.py's second line
    assert "--cues auto chose hub" in err and f"python cues.py --data {root}" in err


def test_user_message_keeps_every_line_and_unwraps_worker_errors():
    msg = "cues.py: cannot load RAFT.\nTo provide it:\n  - online: ...\n  - or --hub-dir DIR"
    assert runs.user_message(RuntimeError(msg)) == msg
    wrapped = ("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most "
               "recent call last):\n  File \"data.py\", line 3, in load\n    raise ValueError(m)\n"
               "ValueError: data.py: a.npz is damaged\nrewrite it with cues.py")
    assert runs.user_message(ValueError(wrapped)) == "data.py: a.npz is damaged\nrewrite it with cues.py"
    oom = runs.user_message(RuntimeError("DataLoader worker (pid 123) is killed by signal: Killed. "))
    assert oom.startswith("DataLoader worker (pid 123) is killed") and "--workers" in oom
    assert runs.user_message(RuntimeError("shape mismatch\nin data.py: line 3")) is None   # a bug
    assert runs.user_message(KeyError("x.py: no")) is None


@pytest.mark.parametrize("cores, workers, omp, processes, plan", [
    (16, 4, None, 1, (12, 1)),     # the main process gets the cores the workers leave
    (2, 4, None, 1, (1, 1)),       # more workers than cores: one main thread, never zero
    (8, 0, None, 1, (8, 1)),
    (8, 2, None, 4, (1, 1)),       # torchrun: four local processes share the cores
    (8, 2, "3", 1, (3, 1)),        # the user's OMP_NUM_THREADS is kept
    (8, 2, "x", 1, (6, 1)),        # ... unless it is no number
])
def test_the_thread_plan_never_oversubscribes_the_cores(cores, workers, omp, processes, plan):
    main, per_worker, why = runs.thread_plan(cores, workers, omp, processes)
    assert (main, per_worker) == plan
    assert ("OMP_NUM_THREADS" in why) == (omp == "3")
    if omp != "3":
        assert main == 1 or (main + workers * per_worker) * processes <= cores


def test_set_threads_applies_the_plan(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        assert runs.set_threads(3) == "CPU threads 1 + 3 worker(s) x 1 (OMP_NUM_THREADS=1)"
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def own_signal_handlers():
    saved = {s: signal.getsignal(s) for s in (*runs.StopOnSignal.SIGNALS, signal.SIGCHLD)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)
    runs.StopOnSignal._torch_sigchld = None


def test_a_stop_quiets_worker_deaths_until_the_next_run(own_signal_handlers):
    errors = []
    signal.signal(signal.SIGCHLD, lambda *_: errors.append("worker died"))   # torch's, in effect
    stop = runs.StopOnSignal()
    os.kill(os.getpid(), signal.SIGHUP)           # a closed terminal: stop and save, like SIGTERM
    os.kill(os.getpid(), signal.SIGTERM)          # a second signal: no exception
    assert stop.name == "SIGHUP"
    os.kill(os.getpid(), signal.SIGCHLD)          # a worker killed by the same signal
    assert errors == []
    with pytest.raises(KeyboardInterrupt):        # a second Ctrl-C quits
        os.kill(os.getpid(), signal.SIGINT)
    runs.StopOnSignal()                           # the next run: torch's handler is back
    os.kill(os.getpid(), signal.SIGCHLD)
    assert errors == ["worker died"]
    runs.StopOnSignal.ignore_in_worker(0)         # workers leave Ctrl-C and SIGHUP to the main
    assert signal.getsignal(signal.SIGINT) == signal.getsignal(signal.SIGHUP) == signal.SIG_IGN


def test_the_lock_names_its_owner_and_is_not_held_by_forked_children(tmp_path):
    a = runs.RunFolder(str(tmp_path / "r"))
    a.acquire()
    with pytest.raises(runs.UserError, match=rf"pid {os.getpid()} on .* holds"):
        runs.RunFolder(a.path).acquire()
    ready, started = os.pipe()
    child = os.fork()                             # a DataLoader worker, say
    if child == 0:
        os.write(started, b"1")
        signal.pause()                            # alive until killed below
        os._exit(0)
    try:
        os.read(ready, 1)                         # the child runs (its fork hooks have run)
        a.lock.close()                            # the owner dies (the kernel closes its files)
        b = runs.RunFolder(a.path)
        b.acquire()                               # at once, while the child lives
        b.release()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_a_stale_lock_file_is_taken_and_a_file_system_without_locks_is_named(tmp_path, monkeypatch):
    out = tmp_path / "s"
    out.mkdir()
    (out / ".lock").write_text("pid 4242 on another-host")   # a crashed run's; no lock held
    f = runs.RunFolder(str(out))
    f.acquire()
    assert open(f.file(".lock")).read() == f"pid {os.getpid()} on {runs.socket.gethostname()}"
    f.release()
    assert not (out / ".lock").exists()

    def no_locks(*a):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(runs.fcntl, "flock", no_locks)
    with pytest.raises(runs.UserError, match="No locks available.*has no file locks"):
        runs.RunFolder(str(out)).acquire()


def test_a_full_disk_at_the_lock_leaves_no_lock_and_says_run_again(tmp_path, monkeypatch):
    def full():
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(runs.socket, "gethostname", full)
    f = runs.RunFolder(str(tmp_path / "f"))
    with pytest.raises(runs.UserError, match="No space left on device.*run again"):
        f.acquire()
    assert os.listdir(f.path) == []


def test_leftovers_of_a_kill_are_removed_and_a_run_without_checkpoint_says_resume(tmp_path):
    class Args:
        resume, steps = False, 10
    out = tmp_path / "l"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"lr": 1}))
    (out / "ckpt.pt.tmp").write_bytes(b"half")                  # killed in its first save
    (out / "feats_0000025.png.tmp.png").write_bytes(b"half")
    f = runs.RunFolder(str(out))
    with pytest.raises(runs.UserError, match="stopped before its first checkpoint.*--resume"):
        f.check(Args, {"lr": 1}, set())
    assert sorted(os.listdir(out)) == ["config.json"]
    Args.resume = True
    assert f.check(Args, {"lr": 1}, set()) is None               # resumes from step 0


def test_atomic_save_interrupted_keeps_the_old_file_and_raises_the_true_cause(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    runs.atomic_save({"step": 1}, path)

    class CtrlC:     # Ctrl-C in the middle of torch's zip writer, which wraps it in a RuntimeError
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, b):
            self.writes += 1
            if self.writes == 2:
                raise KeyboardInterrupt
            return self.f.write(b)
    save = torch.save
    monkeypatch.setattr(runs.torch, "save", lambda obj, f: save(obj, CtrlC(f)))
    with pytest.raises(KeyboardInterrupt):
        runs.atomic_save({"step": 2}, path)
    assert torch.load(path, weights_only=True)["step"] == 1 and os.listdir(tmp_path) == ["ckpt.pt"]
    CtrlC.write = lambda self, b: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(runs.UserError, match="No space left on device"):   # the OS's reason
        runs.atomic_save({"step": 2}, path)
    oom = "DataLoader worker (pid 7) is killed by signal: Killed."   # torch's SIGCHLD handler
    CtrlC.write = lambda self, b: (_ for _ in ()).throw(RuntimeError(oom))
    with pytest.raises(RuntimeError, match=r"worker \(pid 7\) is killed"):  # not "disk full"
        runs.atomic_save({"step": 2}, path)
    assert torch.load(path, weights_only=True)["step"] == 1 and os.listdir(tmp_path) == ["ckpt.pt"]
