"""What a run does over time, watched from outside train.py's loop: what is drawn afresh each
step (the pairs, the SD channel subsets) and drawn again identically on --resume, the warm-up's
learning rate as the optimizer sees it, which checkpoint is kept as best when the validation
score dips or ties, and writes that survive a power cut (fsync before the rename).

Run: python -m pytest -q tests/test_schedule.py
"""
import json
import os

import numpy as np
import pytest
import torch

import cues
import incontext
import runs
import scenes
import train

TINY = ["--preset", "tiny", "--weights", "none", "--batch", "2", "--workers", "0",
        "--synthetic-videos", "2", "--synthetic-frames", "6", "--size", "56", "--base", "56",
        "--log-every", "1", "--lr", "1e-3", "--warmup", "2"]


def record_steps(monkeypatch, argv):
    """train.main(argv) in this process -> one dict per optimizer step: lr (what AdamW applies),
    sd (the SD channel subsets given to sd_cue, one row per view of each pair) and cue_q, cue_c
    (the cue maps the loss receives: which pairs, crops and flips the step drew)."""
    steps, seen = [], {}
    sd_cue, loss, opt_step = cues.sd_cue, incontext.incontext_loss, torch.optim.AdamW.step

    def spy_sd(*a, channels=None, **kw):
        seen["sd"] = channels.clone()
        return sd_cue(*a, channels=channels, **kw)

    def spy_loss(feat_q, feat_c, cue_q, cue_c, *a, **kw):
        seen["cue_q"], seen["cue_c"] = cue_q.detach().clone(), cue_c.detach().clone()
        return loss(feat_q, feat_c, cue_q, cue_c, *a, **kw)

    def spy_step(self, *a, **kw):
        steps.append(dict(seen, lr=self.param_groups[0]["lr"]))
        return opt_step(self, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(cues, "sd_cue", spy_sd)
        m.setattr(incontext, "incontext_loss", spy_loss)
        m.setattr(torch.optim.AdamW, "step", spy_step)
        train.main(argv)
    return steps


@pytest.fixture(scope="module")
def runs_a_b(tmp_path_factory):
    """A: 3 steps at once; B: 1 step, then --resume to 3."""
    mp, tmp = pytest.MonkeyPatch(), tmp_path_factory.mktemp("schedule")
    try:
        a = record_steps(mp, TINY + ["--steps", "3", "--out", str(tmp / "a")])
        b = record_steps(mp, TINY + ["--steps", "1", "--out", str(tmp / "b")])
        b += record_steps(mp, TINY + ["--steps", "3", "--out", str(tmp / "b"), "--resume"])
    finally:
        mp.undo()
    return a, b


def pairs(step):
    """The step's pairs, each as its flow and depth maps of both views (B, 2, 3, S, S)."""
    return torch.stack([step["cue_q"][:, :3], step["cue_c"][:, :3]], 1)


def own_scale(x):
    """Each pair's flow and depth standardised on their own: a pair then looks the same in any
    batch (the step's z-scoring is the batch's)."""
    def norm(c):                                                        # (B, 2, C, S, S)
        return (c - c.mean((1, 2, 3, 4), keepdim=True)) / c.std((1, 2, 3, 4), keepdim=True)
    return torch.cat([norm(x[:, :, :2]), norm(x[:, :, 2:])], 2)


def rows(x):
    return {tuple(r) for r in x.tolist()}


def test_pairs_and_sd_subsets_are_drawn_afresh_each_step_and_identically_on_resume(runs_a_b):
    a, b = runs_a_b
    assert len(a) == len(b) == 3
    for s in range(2):
        now, then = own_scale(pairs(a[s])), own_scale(pairs(a[s + 1]))
        for p in now:                       # no pair of a step is seen again in the next one
            assert all((p - q).abs().max() > 1e-3 for q in then), s
        assert rows(a[s]["sd"]).isdisjoint(rows(a[s + 1]["sd"])), s     # new subsets each step
    for s in range(3):
        B = len(a[s]["sd"]) // 2
        assert len(rows(a[s]["sd"][:B])) == B                           # one subset per pair ...
        assert torch.equal(a[s]["sd"][:B], a[s]["sd"][B:])              # ... shared by its views
        # resumed at step 1, B draws what A drew: the same pairs, crops, flips and subsets
        assert torch.equal(a[s]["sd"], b[s]["sd"]), s
        torch.testing.assert_close(pairs(a[s]), pairs(b[s]), rtol=0, atol=1e-6)


def test_the_warmup_ramps_the_applied_lr_from_the_first_step_then_holds_it(runs_a_b):
    # lr(step) = lr * min(1, (step + 1) / warmup), step counted from 0: the first step already
    # learns (lr / warmup, not 0), step warmup - 1 reaches lr and it stays; a resume continues.
    a, b = runs_a_b
    lr, warmup = 1e-3, 2
    want = [lr / warmup, lr, lr]                              # steps 0, 1 = warmup - 1, warmup
    assert [s["lr"] for s in a] == pytest.approx(want, rel=1e-9)
    assert [s["lr"] for s in b] == pytest.approx(want, rel=1e-9)


def test_the_best_checkpoint_is_the_first_best_score_through_dips_and_ties(tmp_path, monkeypatch):
    """The official rule (lila/train_lila.py on_validation_epoch_end: `if JF > self.best_val`,
    strictly greater): a dip keeps the earlier best.pt, a tie keeps the earlier one too."""
    import probe
    scores = iter([0.2, 0.5, 0.4, 0.5, 0.1, 0.1])           # up, a dip, a tie with the best

    def scripted(*a, **kw):
        return dict(jf=next(scores), j=0.0, f=0.0, sequences=["s"], unscored={})
    monkeypatch.setattr(probe, "davis_val", scripted)
    scenes.write_synthetic(str(tmp_path / "davis"), videos=1, frames=3, size=28)  # a DAVIS layout
    out = tmp_path / "v"
    train.main(TINY + ["--steps", "3", "--val", str(tmp_path / "davis"), "--val-every", "1",
                       "--out", str(out)])
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    jf = [(r["step"], r["val_jf"]) for r in log if "val_jf" in r]
    assert [v for _, v in jf][:4] == [0.2, 0.5, 0.4, 0.5]     # the dip and the tie were scored
    first_best = next(s for s, v in jf if v == max(v for _, v in jf))
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["step"] == first_best and best["best_val_jf"] == 0.5
    assert torch.load(out / "ckpt.pt", weights_only=True)["best_val_jf"] == 0.5


# --- durable writes: the file's bytes are synced before the rename that publishes it ---

@pytest.fixture
def syncs(monkeypatch):
    """Every os.fsync and os.replace from now on, in order: ("fsync", inode) and ("replace",
    inode of the file renamed, inode of the folder it lands in)."""
    calls, fsync, replace = [], os.fsync, os.replace

    def spy_fsync(fd):
        calls.append(("fsync", os.fstat(fd).st_ino))
        return fsync(fd)

    def spy_replace(src, dst):
        folder = os.path.dirname(os.path.abspath(dst))
        calls.append(("replace", os.stat(src).st_ino, os.stat(folder).st_ino))
        return replace(src, dst)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    return calls


def assert_synced_before_renamed(calls, folder=False):
    """Each rename comes after an fsync of that very file (since the previous rename) and, with
    `folder`, is followed by an fsync of the folder (before the next rename)."""
    at = [i for i, c in enumerate(calls) if c[0] == "replace"]
    assert at, "nothing was written"
    for k, i in enumerate(at):
        before = calls[(at[k - 1] + 1 if k else 0):i]
        after = calls[i + 1:at[k + 1] if k + 1 < len(at) else None]
        assert ("fsync", calls[i][1]) in before, (calls, i)
        assert not folder or ("fsync", calls[i][2]) in after, (calls, i)


def test_atomic_save_syncs_the_file_then_renames_then_syncs_the_folder(tmp_path, syncs):
    path = str(tmp_path / "ckpt.pt")
    runs.atomic_save({"step": 1}, path)
    runs.atomic_save({"step": 2}, path)                      # over an existing file too
    assert_synced_before_renamed(syncs, folder=True)
    assert torch.load(path, weights_only=True)["step"] == 2 and os.listdir(tmp_path) == ["ckpt.pt"]


def test_the_cue_cache_and_the_synthetic_videos_are_synced_before_the_rename(tmp_path, syncs):
    cues._save_atomic(str(tmp_path / "c.npz"), {"flow": np.zeros((2, 4, 4), np.float32)})
    assert_synced_before_renamed(syncs)
    syncs.clear()
    scenes.write_synthetic(str(tmp_path / "s"), videos=1, frames=2, size=16, seed=0)  # data.py's
    assert_synced_before_renamed(syncs)
    assert sum(c[0] == "replace" for c in syncs) >= 8        # frames, labels, cues, the json


def test_a_file_the_user_names_is_synced_before_the_rename(tmp_path, syncs):
    # probe.py's results.json and pictures go through runs.save_file
    runs.save_file(str(tmp_path / "results.json"), lambda f: f.write(b"{}"))
    assert_synced_before_renamed(syncs)
