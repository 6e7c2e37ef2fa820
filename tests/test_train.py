"""train.py end to end: smoke run, exact resume, SIGKILL resume, overfit one batch, torchrun,
non-finite loss, and the on-the-fly cue path (--cues hub) with stand-in networks."""
import inspect
import functools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

import data
import extract
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny", "--weights", "none", "--batch", "2", "--workers", "0",
        "--synthetic-videos", "2", "--synthetic-frames", "6", "--size", "56", "--base", "56",
        "--log-every", "1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run(args, **kw):
    return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], env=ENV,
                          capture_output=True, text=True, timeout=300, **kw)


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(out, "log.jsonl")))}


def test_smoke_run_writes_checkpoint_log_config_and_picture(tmp_path):
    out = str(tmp_path / "run")
    r = run(TINY + ["--steps", "3", "--save-every", "2", "--out", out])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "done: step 3" in r.stdout
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["step"] == 3 and ck["config"]["preset"] == "tiny" and ck["config"]["seed"] == 0
    assert sorted(losses(out)) == [1, 2, 3]
    assert os.path.isfile(os.path.join(out, "feats_0000002.png"))
    assert json.load(open(os.path.join(out, "config.json")))["steps"] == 3
    # An existing run is never overwritten by accident.
    r = run(TINY + ["--steps", "3", "--out", out])
    assert r.returncode != 0 and "--resume" in r.stderr


def test_resume_equals_uninterrupted_run(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    torch.set_num_threads(1)
    train.main(TINY + ["--steps", "4", "--save-every", "2", "--out", a])
    train.main(TINY + ["--steps", "2", "--save-every", "2", "--out", b])
    train.main(TINY + ["--steps", "4", "--save-every", "2", "--out", b, "--resume"])
    la, lb = losses(a), losses(b)
    assert sorted(lb) == [1, 2, 3, 4]
    for s in la:
        assert lb[s] == pytest.approx(la[s], rel=1e-4, abs=1e-6), (s, la, lb)
    wa = torch.load(os.path.join(a, "ckpt.pt"), weights_only=True)["decoder"]
    wb = torch.load(os.path.join(b, "ckpt.pt"), weights_only=True)["decoder"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    # Other method settings cannot be resumed into an existing run.
    with pytest.raises(train.UserError, match="other settings"):
        train.main(TINY + ["--steps", "6", "--out", b, "--resume", "--lr", "5e-4"])


def test_sigkill_at_any_moment_resumes_cleanly(tmp_path):
    out = str(tmp_path / "k")
    p = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *TINY, "--steps",
                          "200", "--save-every", "1", "--out", out], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = os.path.join(out, "ckpt.pt")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(ckpt) and len(losses(out)) >= 3):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)  # checkpoints are written every step: often mid-write
    p.wait()
    step = torch.load(ckpt, weights_only=True)["step"]  # never a corrupt checkpoint
    assert step >= 2
    r = run(TINY + ["--steps", str(step + 2), "--save-every", "1", "--out", out, "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(ckpt, weights_only=True)["step"] == step + 2
    assert sorted(losses(out)) == list(range(1, step + 3))  # log rewound to the checkpoint


def test_overfit_one_batch_halves_the_incontext_loss():
    torch.manual_seed(0)
    args = train.get_args(TINY + ["--size", "56", "--lr", "3e-3", "--no-pamr"])  # PAMR: not the point, slow
    ds = train.make_dataset(args)
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    import model
    lila = model.build_lila(args.backbone, "none", "tiny", seed=0)
    opt = torch.optim.AdamW([p for p in lila.parameters() if p.requires_grad], lr=args.lr)
    first = None
    for it in range(60):
        loss, _, _ = train.lila_step(batch, lila, args, sd_gen=torch.Generator().manual_seed(0))
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = float(loss.detach())
    assert last < 0.5 * first, (first, last)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# train.main under torchrun, and each rank's decoder weights written out at the end.
DDP_WORKER = """
import os, sys
import torch
sys.path.insert(0, {repo!r})
import model, train
built, real = [], model.build_lila
model.build_lila = lambda *a, **k: built.append(real(*a, **k)) or built[-1]
class AdamW(torch.optim.AdamW):          # eps 1e-3: see close() in the test
    def __init__(self, *a, **k):
        super().__init__(*a, **k, eps=1e-3)
torch.optim.AdamW = AdamW
train.main(sys.argv[1:])
torch.save(built[-1].decoder.state_dict(), os.path.join({out!r}, "rank%s.pt" % os.environ["RANK"]))
"""


def test_ddp_on_two_processes_is_the_one_process_step_and_stops_and_resumes(tmp_path, monkeypatch):
    """torchrun, 2 CPU processes (gloo), 2 pairs each: 2 steps, stop, resume for a third in
    micro-batches (the first chunk without gradient sync). Each rank sees other pairs, so only
    averaged gradients keep the two decoders equal; and the decoder equals that of ONE process
    on the same 4 pairs a step (the whole batch's SD subsets, z-scoring and loss normalisers),
    up to float round-off, after the plain steps and after the micro-batched one."""
    out, one = tmp_path / "ddp", str(tmp_path / "one")
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER.format(repo=REPO, out=str(tmp_path)))

    def torchrun(*extra):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                            str(worker), *TINY, "--batch", "4", "--out", str(out), *extra],
                           env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    import model
    init = model.build_lila("dinov2_vits14", "none", "tiny", seed=0).decoder.state_dict()

    def close(ddp, ref):
        """|ddp - ref| / |ref - init| over all weights: 5e-5 to 8e-5 measured (round-off); 0.024
        to 0.35 with the z-scoring or the gradient sum left per process. Both runs use AdamW
        with eps 1e-3 (torch's 1e-8): Adam's first steps move a weight by about lr whatever its
        gradient's size, so a gradient at round-off level whose sign differs between the two
        runs (another BLAS kernel, another batch split) would move by 2 lr and hide the test's
        signal (1.1e-3 measured with torch 2.14's kernels); eps 1e-3 keeps such moves tiny."""
        norm = lambda w: sum(float(x.square().sum()) for x in w) ** 0.5  # noqa: E731
        diff = norm(ddp[k] - ref[k] for k in ref) / norm(ref[k] - init[k] for k in ref)
        assert diff < 1e-3, diff
    torch.set_num_threads(1)
    monkeypatch.setattr(torch.optim, "AdamW", functools.partial(torch.optim.AdamW, eps=1e-3))  # as the workers
    weights = lambda: torch.load(os.path.join(one, "ckpt.pt"), weights_only=True)["decoder"]  # noqa: E731
    torchrun("--steps", "2")
    first = torch.load(tmp_path / "rank0.pt", weights_only=True)
    train.main(TINY + ["--batch", "4", "--steps", "2", "--out", one])
    close(first, weights())
    r = torchrun("--steps", "3", "--resume", "--micro-batch", "1")
    assert "2 process(es)" in r.stdout and "done: step 3" in r.stdout
    w0, w1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    assert saved["step"] == 3 and sorted(losses(str(out))) == [1, 2, 3]
    for k in w0:
        assert torch.equal(w0[k], w1[k]) and torch.equal(w0[k], saved["decoder"][k]), k
    assert any(not torch.equal(first[k], w0[k]) for k in w0)          # the third step trained
    train.main(TINY + ["--batch", "4", "--steps", "3", "--out", one, "--resume"])
    close(w0, weights())
    for s, loss in losses(one).items():                # the logs: the whole batch's loss
        assert losses(str(out))[s] == pytest.approx(loss, rel=1e-5), s


def test_micro_batches_give_the_whole_batchs_gradients_and_losses(tmp_path):
    """A step of 4 pairs in chunks of 1 and of 3 (+1): the cues z-scored over the whole batch,
    the loss normalised by its counts, so the summed losses, parts and accumulated gradients
    equal the one-pass step's; with --erm too (its head's gradients included)."""
    import incontext
    import model
    base = TINY + ["--batch", "4", "--synthetic-videos", "3"]
    ds = train.make_dataset(train.get_args(base))
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    lila = model.build_lila("dinov2_vits14", "none", "tiny", seed=0).train()
    torch.manual_seed(0)
    head = incontext.ERMHead(lila.decoder.out_dim, 35)

    def step(micro, erm):
        args = train.get_args(base + ["--micro-batch", str(micro)] + (["--erm"] if erm else []))
        cues = train.step_cues(batch, args, sd_gen=torch.Generator().manual_seed(0))
        chunks, norms = train.micro_batches(cues, args)
        assert len(chunks) == {0: 1, 1: 4, 3: 2}[micro]
        params = list(lila.decoder.parameters()) + (list(head.parameters()) if erm else [])
        for p in params:
            p.grad = None
        loss, parts = 0.0, {}
        for chunk in chunks:
            chunk_loss, chunk_parts = train.lila_loss(train.features_and_sd(chunk, lila, args), args,
                                                      head if erm else None, norms)
            chunk_loss.backward()
            loss, parts = loss + chunk_loss.detach(), {k: parts.get(k, 0) + x for k, x in chunk_parts.items()}
        return loss, parts, [p.grad.clone() for p in params]
    for erm in (False, True):
        loss, parts, grads = step(0, erm)
        for micro in (1, 3):
            loss_m, parts_m, grads_m = step(micro, erm)
            torch.testing.assert_close(loss_m, loss, rtol=1e-5, atol=1e-7)
            for k in parts:
                torch.testing.assert_close(parts_m[k], parts[k], rtol=1e-5, atol=1e-7, msg=k)
            for g_m, g in zip(grads_m, grads):
                torch.testing.assert_close(g_m, g, rtol=1e-3, atol=1e-4 * float(g.abs().max()))
    # train.py itself: the logged losses of a first step, whole and in chunks of 1.
    logs = []
    for micro in ("0", "1"):
        out = str(tmp_path / f"m{micro}")
        train.main(base + ["--steps", "1", "--micro-batch", micro, "--out", out])
        logs.append(json.loads(open(os.path.join(out, "log.jsonl")).readline()))
    for k in ("loss", "l1", "edge", "l1_flow_x", "l1_flow_y", "l1_depth", "l1_sd"):
        assert logs[1][k] == pytest.approx(logs[0][k], rel=1e-5, abs=1e-7), k


def test_non_finite_loss_stops_with_step_and_part(tmp_path, monkeypatch):
    def nan_loss(v, args, erm_head=None, norms=None):
        bad = v["feats_q"].sum() * float("nan")
        return bad, {"l1": bad.detach(), "edge": torch.tensor(0.0)}
    monkeypatch.setattr(train, "lila_loss", nan_loss)
    with pytest.raises(train.UserError, match=r"step 0: non-finite loss, l1"):
        train.main(TINY + ["--steps", "2", "--out", str(tmp_path / "nan")])
    assert not os.path.exists(tmp_path / "nan" / "ckpt.pt")


class ShiftFlow(nn.Module):
    """Stand-in RAFT: a constant 1-pixel flow to the right, as a list of iterates."""
    def forward(self, a, b):
        f = torch.zeros(a.shape[0], 2, *a.shape[-2:])
        f[:, 0] = 1.0
        return [f * 0.5, f]


class Brightness(nn.Module):
    """Stand-in MiDaS: 'disparity' = 1 + mean intensity, (B, h, w)."""
    def forward(self, x):
        return 1 + x.mean(1)


@pytest.mark.parametrize("extra", [[], ["--erm", "--no-pamr", "--no-edge", "--no-crop"]])
def test_hub_cues_and_ablations_run_on_a_video_folder(tmp_path, extra):
    root = tmp_path / "vids"
    data.write_synthetic(str(root), videos=2, frames=4, size=56, seed=3)
    out = str(tmp_path / "hub")
    train.main(TINY + ["--data", str(root), "--cues", "hub", "--steps", "2", "--out", out]
               + extra, cue_nets=(ShiftFlow(), Brightness()))
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["step"] == 2 and ck["config"]["cues"] == "hub"
    assert bool(ck["erm_head"]) == ("--erm" in extra)


def test_bad_data_root_is_a_clear_message_not_a_traceback(tmp_path):
    r = run(TINY + ["--data", str(tmp_path / "missing"), "--steps", "1",
                    "--out", str(tmp_path / "o")])
    assert r.returncode != 0
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_query_and_context_flow_cues_agree_on_the_same_3d_point(monkeypatch):
    """The plumbing the in-context loss relies on, end to end through lila_step: a query
    pixel's flow cue (forward flow of frame t) must equal, in sign and value, the flow cue of
    the context pixel its point moves to (the NEGATED backward flow of frame t+Δ), whatever
    the flips: one linear map reads both views. Negating flow-x on the query's own flip (as an
    earlier version did) breaks this for half the pairs; forgetting the negation of the
    backward flow breaks it for all."""
    seen = {}

    def spy(q, c, *a, **kw):                # lila_step z-scores the raw view-space flows here
        seen.setdefault("flow", (q, c))
        return zscore(q, c, *a, **kw)

    zscore = train.zscore
    monkeypatch.setattr(train, "zscore", spy)
    args = train.get_args(TINY + ["--no-sd", "--no-depth", "--synthetic-videos", "4",
                                  "--synthetic-frames", "8", "--size", "56", "--base", "56"])
    ds = train.make_dataset(args)
    items = [ds[i] for i in range(12)]
    batch = torch.utils.data.default_collate(items)
    for key in ("flip_q", "flip"):                                      # all kinds of pair
        assert batch[key].any() and not batch[key].all(), key
    import model
    lila = model.build_lila(args.backbone, "none", "tiny", seed=0)
    with torch.no_grad():
        _, _, v = train.lila_step(batch, lila, args)
    flow_q, flow_c = seen["flow"]                                       # (B, 2, S, S)
    conf_q, conf_c = v["conf_q"][:, :1], v["conf_c"][:, :1]             # (B, 1, S, S)
    for own in (False, True):
        errs, mags = [], []
        for b in range(len(items)):
            if bool(batch["flip_q"][b]) != own:
                continue
            gq, gc = batch["grid_q"][b].reshape(-1, 2), batch["grid_c"][b].reshape(-1, 2)  # (S², 2)
            fq, fc = flow_q[b].reshape(2, -1).T, flow_c[b].reshape(2, -1).T              # (S², 2)
            to = gq + fq                                   # where each query pixel's point goes
            d, p = torch.cdist(to, gc).min(1)              # nearest context pixel
            pix = (gc[1] - gc[0]).norm()                   # one context pixel, normalised units
            ok = (conf_q[b].flatten() > 0.5) & (conf_c[b].flatten()[p] > 0.5) & (d < pix)
            errs.append((fq[ok] - fc[p[ok]]).norm(dim=1))
            mags.append(fq[ok].norm(dim=1))
        err, mag = torch.cat(errs), torch.cat(mags)
        assert len(err) > 500 and mag.median() > 0.02, (own, len(err), mag.median())  # points that move
        assert err.median() < 0.1 * mag.median(), (own, err.median(), mag.median())


def test_no_edge_drops_the_edge_terms_and_keeps_the_l1():
    import incontext
    import model
    args = train.get_args(TINY + ["--size", "56"])
    ds = train.make_dataset(args)
    batch = torch.utils.data.default_collate([ds[0], ds[3]])
    lila = model.build_lila(args.backbone, "none", "tiny", seed=0)
    with torch.no_grad():
        _, _, v = train.lila_step(batch, lila, args, sd_gen=torch.Generator().manual_seed(0))
        for erm_flag in ([], ["--erm"]):
            a = train.get_args(TINY + ["--size", "56"] + erm_flag)
            b = train.get_args(TINY + ["--size", "56", "--no-edge"] + erm_flag)
            head = incontext.ERMHead(v["feats_q"].shape[1], v["cue_q"].shape[1]) if erm_flag else None
            full, parts = train.lila_loss(v, a, head)
            plain, parts_b = train.lila_loss(v, b, head)
            assert float(parts["edge"]) > 0 and float(parts_b["edge"]) == 0
            assert torch.allclose(plain, parts["l1"], atol=1e-6)
            assert torch.allclose(full, parts["l1"] + a.gamma * parts["edge"], atol=1e-6)


def test_ctrl_c_saves_the_current_step_and_resume_continues_the_log(tmp_path):
    out = str(tmp_path / "c")
    p = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *TINY, "--workers", "1",
                          "--steps", "500", "--save-every", "1000", "--out", out], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and len(open(log).readlines()) >= 3):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)                       # no checkpoint yet: --save-every 1000
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "--resume" in err.strip().splitlines()[-1]
    step = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"]
    assert step >= 3 and os.path.isfile(os.path.join(out, "config.json"))
    r = run(TINY + ["--steps", str(step + 2), "--save-every", "1000", "--out", out, "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(losses(out)) == list(range(1, step + 3))  # continuous, no step twice
    assert not os.path.exists(os.path.join(out, ".lock"))  # released on exit


def test_a_run_owns_its_folder(tmp_path):
    import runs
    busy = runs.RunFolder(str(tmp_path / "busy"))
    busy.acquire()                                       # another run holds the folder
    with pytest.raises(train.UserError, match="in use by another train.py run"):
        train.main(TINY + ["--steps", "1", "--out", busy.path])
    busy.release()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    (other / "log.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(train.UserError, match="not empty"):
        train.main(TINY + ["--steps", "1", "--out", str(other)])
    assert (other / "log.jsonl").read_text() == '{"step": 1}\n'   # nothing of it touched
    assert not (other / "config.json").exists()
    with pytest.raises(train.UserError, match="no train.py run"):
        train.main(TINY + ["--steps", "1", "--out", str(other), "--resume"])
    (other / "config.json").write_text("[1, 2]")           # JSON, but not a config
    with pytest.raises(train.UserError, match="not a train.py config"):
        train.main(TINY + ["--steps", "1", "--out", str(other), "--resume"])
    with pytest.raises(train.UserError, match="there is no folder"):   # and none is made
        train.main(TINY + ["--steps", "1", "--out", str(tmp_path / "none"), "--resume"])
    assert not (tmp_path / "none").exists()
    for out, message in ((str(other / "notes.txt" / "sub"), "cannot create the run folder"),
                         ("", "--out is empty")):
        with pytest.raises(train.UserError, match=message):
            train.main(TINY + ["--steps", "1", "--out", out])


def test_a_lock_released_between_open_and_flock_is_not_taken(tmp_path, monkeypatch):
    # run A releases (removes .lock) just after run B opened it: B's flock then succeeds on a
    # deleted file, which a third run could not see; B must refuse
    import runs
    b = runs.RunFolder(str(tmp_path / "r"))
    real = runs.fcntl.flock

    def flock_after_release(f, how):
        os.remove(f.name)
        return real(f, how)
    monkeypatch.setattr(runs.fcntl, "flock", flock_after_release)
    with pytest.raises(train.UserError, match="in use by another train.py run"):
        b.acquire()


def test_damaged_run_files_are_named_or_recovered(tmp_path):
    out = str(tmp_path / "d")
    train.main(TINY + ["--steps", "2", "--save-every", "1", "--out", out])
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write('{"step": 3, "lo')                       # a line cut off by a kill
    train.main(TINY + ["--steps", "3", "--save-every", "1", "--out", out, "--resume"])
    assert sorted(losses(out)) == [1, 2, 3]
    ckpt = os.path.join(out, "ckpt.pt")
    for junk in (b"", b"not a checkpoint", open(ckpt, "rb").read()[:100]):
        open(ckpt, "wb").write(junk)
        with pytest.raises(train.UserError, match="ckpt.pt is damaged"):
            train.main(TINY + ["--steps", "5", "--out", out, "--resume"])


@pytest.mark.parametrize("error, message", [
    (OSError(28, "No space left on device"), "No space left on device"),            # the OS
    (RuntimeError("[enforce fail at inline_container.cc] unexpected pos"), "disk full"),  # torch's zip writer
])
def test_a_full_disk_keeps_the_old_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch, error, message):
    import runs
    out = str(tmp_path / "f")
    train.main(TINY + ["--steps", "1", "--out", out, "--workers", "1"])
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()

    def full(obj, f):
        f.write(b"partial")
        raise error
    monkeypatch.setattr(runs.torch, "save", full)
    with pytest.raises(train.UserError, match=message):            # and it returns: no hang
        train.main(TINY + ["--steps", "2", "--out", out, "--resume", "--workers", "1"])
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before
    assert not os.path.exists(os.path.join(out, "ckpt.pt.tmp"))


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    step = torch.optim.AdamW.step

    def poison(self, *a, **k):
        out = step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", poison)
    with pytest.raises(train.UserError, match="step 0: the update made the weights non-finite"):
        train.main(TINY + ["--steps", "2", "--save-every", "1", "--out", str(tmp_path / "w")])
    assert not os.path.exists(tmp_path / "w" / "ckpt.pt")


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--warmup", "-5"], "--warmup"), (["--steps", "0"], "--steps"), (["--size", "0"], "--size"),
    (["--size", "-14"], "--size"), (["--size", "50"], "multiple of 14"), (["--batch", "0"], "--batch"),
    (["--log-every", "0"], "--log-every"), (["--save-every", "0"], "--save-every"),
    (["--gap", "0"], "--gap"), (["--sd-channels", "999"], "1..384"), (["--device", "cuda"], "no CUDA"),
    (["--data", "/nonexistent", "--cues", "files"], "no cue cache"), (["--cue-noise", "-1"], "--cue-noise"),
    (["--seed", "-1"], "--seed"), (["--seed", str(2**32)], "--seed"),
])
def test_every_numeric_flag_is_range_checked_up_front(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.get_args(TINY + flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_out_that_is_a_file_and_a_broken_cue_cache_are_one_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = run(TINY + ["--steps", "1", "--out", str(f)])
    assert r.returncode == 2 and "is a file" in r.stderr and "Traceback" not in r.stderr
    root = tmp_path / "vids"
    data.write_synthetic(str(root), videos=1, frames=3, size=56, seed=3)
    for p in (root / "Cues").rglob("*.npz"):             # NaN disparity everywhere
        np.savez(p, disparity=np.full((56, 56), np.nan, np.float16), flow_next=np.zeros((56, 56, 2)),
                 flow_prev=np.zeros((56, 56, 2)))
    r = run(TINY + ["--data", str(root), "--steps", "1", "--workers", "1", "--out", str(tmp_path / "o")])
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert last.startswith("train.py: error: data.py: 11 pairs in a row failed") and "NaN" in last


def test_a_full_disk_while_logging_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "g")
    train.main(TINY + ["--steps", "1", "--out", out])
    real_open = open

    def full_log(path, mode="r", *a, **k):    # log.jsonl opens, but its writes hit a full disk
        f = real_open(path, mode, *a, **k)
        if str(path).endswith("log.jsonl") and "a" in mode:
            def write(_):
                raise OSError(28, "No space left on device")
            f.write = write
        return f
    monkeypatch.setattr("builtins.open", full_log)
    with pytest.raises(train.UserError, match=r"cannot write .*log.jsonl \(No space left on device.*ckpt.pt is intact"):
        train.main(TINY + ["--steps", "3", "--out", out, "--resume"])
    monkeypatch.undo()     # the step trained since the checkpoint is saved on the way out
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 2
    assert not os.path.exists(os.path.join(out, ".lock"))


def test_replaced_pairs_are_counted_in_the_log(tmp_path, capsys):
    root = tmp_path / "vids"
    data.write_synthetic(str(root), videos=2, frames=3, size=56, seed=3)
    bad = sorted((root / "Cues").rglob("*.npz"))[0]
    bad.write_bytes(b"truncated")                          # every pair with this frame fails
    out = str(tmp_path / "o")
    train.main(TINY + ["--data", str(root), "--steps", "6", "--log-every", "3", "--out", out])
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    n = sum(r["skipped_pairs"] for r in rows)
    assert n > 0 and all(isinstance(r["skipped_pairs"], int) for r in rows)
    printed = capsys.readouterr()
    assert f"{n} pairs replaced" in printed.out and "failed to load and were replaced" in printed.err


def test_a_constant_cue_is_warned_about(tmp_path, capsys):
    root = tmp_path / "vids"
    data.write_synthetic(str(root), videos=1, frames=3, size=56, seed=3)
    for p in (root / "Cues").rglob("*.npz"):             # one disparity everywhere: valid, useless
        c = dict(np.load(p))
        c["disparity"] = np.ones_like(c["disparity"])
        np.savez(p, **c)
    train.main(TINY + ["--data", str(root), "--steps", "2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "the depth cue is constant in every batch" in err and "flow cue is constant" not in err


def test_feature_pictures_keep_one_pca_basis(tmp_path):
    out = str(tmp_path / "p")
    train.main(TINY + ["--steps", "2", "--save-every", "1", "--out", out])
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["picture"]
    assert state["step"] == 1                            # fitted at the first picture, then kept
    from PIL import Image
    a, b = (Image.open(os.path.join(out, f"feats_000000{s}.png")) for s in (1, 2))
    assert a.size == b.size and a.size[0] == 4 * 56 + 3 * extract.GAP    # four views, GAP apart


def test_a_cue_that_is_almost_never_confident_is_warned_about(tmp_path, capsys):
    root = tmp_path / "vids"
    data.write_synthetic(str(root), videos=1, frames=3, size=56, seed=3)
    rng = np.random.default_rng(0)
    for p in (root / "Cues").rglob("*.npz"):             # flow both ways inconsistent: unconfident
        c = dict(np.load(p))
        for k in ("flow_next", "flow_prev"):
            if k in c:
                c[k] = rng.uniform(-8, 8, c[k].shape).astype(np.float16)
        np.savez(p, **c)
    train.main(TINY + ["--data", str(root), "--steps", "2", "--out", str(tmp_path / "o")])
    out = capsys.readouterr()
    assert "confident flow cue" in out.out + out.err and "confident depth" not in out.out + out.err


def test_presets_carry_run_lengths_that_fit_them():
    tiny, paper = train.get_args(["--preset", "tiny"]), train.get_args([])
    assert (tiny.steps, tiny.save_every, tiny.size, tiny.batch, tiny.lr) == (200, 25, 112, 8, 1e-3)
    assert (paper.steps, paper.save_every, paper.size, paper.batch, paper.lr) == (100_000, 1000, 224, 32, 1e-4)
    assert train.get_args(["--preset", "tiny", "--steps", "7", "--lr", "2e-4"]).steps == 7  # flags win


# -----------------------------------------------------------------------------------------
# The paper's values, pinned: a default that drifts fails here, not in a month's training.

# Official lila/configs/train_ytvos.yaml (opt, model, train_loader, train_dataset) and
# lila/train_lila.py (Trainer(max_epochs=50, limit_train_batches=2000): 100k steps, no warm-up).
PAPER = dict(lr=1e-4, wd=1e-4, batch=32, steps=100_000, warmup=0,   # opt.lr/weight_decay, loader
             lam=0.1,              # model.ridge
             gamma=1.0,            # model.w_edge
             sd_channels=32,       # model.num_fts
             gap=5,                # train_dataset.T: Δ in 1..5
             size=224, base=224,   # crop_w_tf: 224² views; base crops resized to 224²
             backbone="dinov2_vits14", preset="paper", micro_batch=0,
             val_videos=6,         # train_ytvos.yaml eval_vos: 6 DAVIS val sequences
             val_probe="lp",       # train_lila.py EvalVOS: a one-shot linear probe
             val_every=2000,       # train_lila.py: validation every epoch (limit_train_batches)
             flow_net="raft_large", depth_net="DPT_Large")  # the strongest on torch.hub
ABLATIONS = ("no_pamr", "no_edge", "no_crop", "erm", "no_depth", "no_flow", "no_sd")


def test_every_method_default_is_the_papers():
    paper, tiny = train.get_args([]), train.get_args(["--preset", "tiny"])
    for k, v in PAPER.items():
        assert getattr(paper, k) == v, (k, getattr(paper, k), v)
    for k in ABLATIONS:                                   # the method as published by default
        assert getattr(paper, k) is False and getattr(tiny, k) is False, k
    # The tiny preset shrinks the run (views, pairs, steps, lr), never the method.
    assert (tiny.size, tiny.base, tiny.batch, tiny.steps, tiny.lr) == (112, 112, 8, 200, 1e-3)
    assert (tiny.val_probe, tiny.val_every, tiny.flow_net, tiny.depth_net) == ("knn", 25, "raft_small", "MiDaS_small")
    for k in ("wd", "warmup", "lam", "gamma", "sd_channels", "gap", "backbone", "micro_batch"):
        assert getattr(tiny, k) == PAPER[k], k
    # The crops train.py asks data.py for: query area in [0.3, 1] with its own flip, context a
    # fixed 0.8 of the area (YTVOS crop_range [0.3, 1.0], mask_ratio 0.8, aspect [1, 1]).
    s = train.make_dataset(train.get_args(["--preset", "tiny", "--synthetic-videos", "1"])).sampler
    assert (s.query_area, s.ctx_area, s.gap, s.crop) == ((0.3, 1.0), 0.8, 5, True)
    # Z-scoring: (x - mean) / (1e-3 + std), official RFFEncoder.renorm.
    assert inspect.signature(train.zscore).parameters["eps"].default == 1e-3


def test_the_loss_gets_the_papers_constants(monkeypatch):
    """train.py passes lam, gamma and the edge switch; everything else (sigma, pool, the two
    confidence cut-offs) is incontext.py's default, which must be the official value."""
    import incontext
    seen = {}

    def spy(*a, **kw):
        seen.update(kw)
        return torch.zeros(()), {"l1_channels": torch.zeros(3)}
    monkeypatch.setattr(incontext, "incontext_loss", spy)
    v = dict(feats_q=None, feats_c=None, cue_q=None, cue_c=None, conf_q=None, conf_c=None,
             names=["flow_x", "flow_y", "depth"])
    train.lila_loss(v, train.get_args([]))
    assert seen == dict(lam=0.1, gamma=1.0, edge=True), seen
    monkeypatch.undo()
    d = {k: p.default for k, p in inspect.signature(incontext.incontext_loss).parameters.items()}
    # model.sigma_edge 0.1, lstsq_cutoff 0.5, conf_cutoff 0.0; forward_cross: lowres 32 x 32.
    assert (d["sigma"], d["pool"], d["lstsq_cutoff"], d["conf_cutoff"]) == (0.1, 32, 0.5, 0.0)


def test_zscoring_is_one_affine_map_shared_by_both_views():
    """The flow (and the depth) cue of the query and of the context are z-scored with ONE mean
    and std over the batch and both views (official RFFEncoder.seed on the concatenation of
    both): a map fitted on the context then reads the query. Reference: the raw view-space
    cues, warped here, and std_mean over both; a per-view normalisation fails."""
    args = train.get_args(TINY + ["--no-sd", "--synthetic-videos", "3"])
    ds = train.make_dataset(args)
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    import cues
    import model
    lila = model.build_lila(args.backbone, "none", "tiny", seed=0)
    with torch.no_grad():
        _, _, v = train.lila_step(batch, lila, args)
    gq, gc = batch["grid_q"], batch["grid_c"]
    depth, _ = cues.disparity_to_depth(batch["disparity"].transpose(0, 1).flatten(0, 1))
    d_t, d_t2 = depth.chunk(2)
    raw = {"flow": (data.warp(batch["flow_fwd"], gq), data.warp(-batch["flow_bwd"], gc)),
           "depth": (data.warp(d_t, gq), data.warp(d_t2, gc))}
    got = {"flow": (v["cue_q"][:, :2], v["cue_c"][:, :2]), "depth": (v["cue_q"][:, 2:3], v["cue_c"][:, 2:3])}
    for k, (q, c) in raw.items():
        std, mean = torch.std_mean(torch.cat([q, c]))
        assert abs(float(q.mean() - c.mean())) > 0.05 * float(std), k   # the views differ: a real test
        for want, have in zip(((q - mean) / (1e-3 + std), (c - mean) / (1e-3 + std)), got[k]):
            torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4, msg=k)


def test_validation_logs_val_jf_and_keeps_the_best_checkpoint_across_a_resume(tmp_path):
    """--val on a tiny synthetic DAVIS folder: val_jf in log.jsonl before the first step (step 0,
    the untrained decoder, as the official trainer) and at every validation, best.pt
    the checkpoint of the best J&F (its value stored, also in ckpt.pt), kept by a resume."""
    root = tmp_path / "davis"
    data.write_synthetic(str(root), videos=2, frames=6, size=112, seed=0)   # data.py --make-synthetic
    out = str(tmp_path / "v")
    val = ["--val", str(root), "--val-every", "2", "--val-videos", "2", "--out", out]
    train.main(TINY + ["--steps", "3", "--log-every", "5"] + val)
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    jf = {r["step"]: r["val_jf"] for r in rows if "val_jf" in r}
    assert sorted(jf) == [0, 2, 3] and all(0 <= x <= 1 for x in jf.values())   # 0, every 2 + the last
    best = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    last = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert best["best_val_jf"] == last["best_val_jf"] == max(jf.values())
    assert best["step"] == max(jf, key=lambda s: (jf[s], -s))              # the first best step
    # A resume knows the best so far: best.pt changes only for a better J&F.
    before = open(os.path.join(out, "best.pt"), "rb").read()
    train.main(TINY + ["--steps", "4", "--log-every", "5", "--resume"] + val)
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    jf4 = [r["val_jf"] for r in rows if r["step"] == 4][0]
    best4 = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    assert best4["best_val_jf"] == max(max(jf.values()), jf4)
    assert (open(os.path.join(out, "best.pt"), "rb").read() == before) == (jf4 <= max(jf.values()))
    with pytest.raises(SystemExit):
        train.get_args(TINY + ["--val", str(tmp_path / "missing")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU it measures instead")
def test_bench_gpu_on_a_cpu_says_it_needs_cuda():
    r = subprocess.run([sys.executable, os.path.join(REPO, "bench.py"), "gpu"], env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "needs a CUDA GPU" in r.stdout, r.stdout + r.stderr[-2000:]


def test_the_step_picture_shows_the_prediction_beside_the_target(tmp_path):
    out = str(tmp_path / "step.png")
    canvas = train.step_picture(["--ckpt", "none", "--out", out, "--preset", "tiny", "--weights",
                                "none", "--size", "56", "--base", "56", "--synthetic-videos", "1",
                                "--synthetic-frames", "6", "--workers", "0"])
    from PIL import Image
    png = np.asarray(Image.open(out).convert("RGB")).astype(int)
    P = 224                                       # 56 px views drawn 4x for readable labels
    assert png.shape == (4 * (P + 14), 4 * P, 3) and canvas.size == (4 * P, 4 * (P + 14))
    for row in (1, 2, 3):                         # flow, depth, SD
        cell = lambda col: png[row * (P + 14) + 14:(row + 1) * (P + 14), col * P:(col + 1) * P]  # noqa: E731
        target, prediction = cell(1), cell(2)
        assert np.abs(target - prediction).mean() > 1 and prediction.std() > 0


def test_the_step_picture_names_a_bad_checkpoint_or_pair(tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    r = run(["step-picture", "--ckpt", str(tmp_path / "junk.pt")])     # the command itself
    assert r.returncode == 2 and "train.py step-picture: error: --ckpt" in r.stderr, r.stderr
    assert "no readable train.py checkpoint" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(SystemExit):
        train.step_picture(["--ckpt", "none", "--weights", "none", "--pair", "64"])
    assert "--pair 64 must lie in 0..63" in capsys.readouterr().err
