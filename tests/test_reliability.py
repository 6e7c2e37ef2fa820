"""What a user or a scheduler does to a run, across the tools: inputs checked before step 1,
files that must agree, skipped items said, output paths, torchrun settings, closed streams,
memory and messages true in their state. Subprocess runs are tiny (seconds each)."""
import errno
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import data
import runs
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny", "--weights", "none", "--batch", "2", "--workers", "0",
        "--synthetic-videos", "2", "--synthetic-frames", "6", "--size", "56", "--base", "56",
        "--log-every", "1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def davis(tmp_path_factory):
    """A DAVIS-layout root of 3 synthetic videos; the last one cut to 2 frames (unscorable)."""
    root = tmp_path_factory.mktemp("davis")
    names = data.write_synthetic(str(root), videos=3, frames=6, size=56, seed=0)
    for sub, ext in (("JPEGImages", ".jpg"), ("Annotations", ".png")):
        folder = root / sub / "480p" / names[-1]
        for f in sorted(os.listdir(folder))[2:]:
            os.remove(folder / f)
    return root, names


def test_a_damaged_val_mask_is_found_before_step_1(davis, tmp_path):
    root, names = davis
    bad = tmp_path / "davis"
    subprocess.run(["cp", "-r", str(root), str(bad)], check=True)
    mask = bad / "Annotations" / "480p" / names[0] / sorted(os.listdir(bad / "Annotations" / "480p" / names[0]))[3]
    mask.write_bytes(b"not a png")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=re.escape(str(mask))):
        train.main(TINY + ["--steps", "3", "--val", str(bad), "--val-videos", "3", "--out", str(out)])
    assert not (out / "config.json").exists() and not (out / "log.jsonl").exists()   # nothing ran


def test_an_error_mid_run_saves_the_steps_since_the_last_checkpoint(tmp_path, monkeypatch):
    real, calls = train.lila_loss, []

    def fails_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("data.py: frame 7 of video x is damaged")
        return real(*a, **k)
    monkeypatch.setattr(train, "lila_loss", fails_at_step_3)
    out = tmp_path / "run"
    with pytest.raises(runs.UserError, match=r"frame 7(.|\n)*steps up to 2 are saved"):
        train.main(TINY + ["--steps", "5", "--save-every", "10", "--out", str(out)])
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2
    monkeypatch.undo()
    train.main(TINY + ["--steps", "3", "--save-every", "10", "--out", str(out), "--resume"])
    assert [json.loads(x)["step"] for x in open(out / "log.jsonl")] == [1, 2, 3]


def test_out_of_memory_in_a_step_names_the_settings_and_keeps_the_steps(tmp_path, monkeypatch):
    real, calls = train.lila_loss, []

    def oom_at_step_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(*a, **k)
    monkeypatch.setattr(train, "lila_loss", oom_at_step_2)
    with pytest.raises(runs.UserError, match=r"out of memory .*lower --batch(.|\n)*steps up to 1 are saved"):
        train.main(TINY + ["--steps", "3", "--save-every", "10", "--out", str(tmp_path / "run")])
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 1


def test_a_stop_between_best_pt_and_ckpt_pt_leaves_them_agreeing(davis, tmp_path, monkeypatch):
    """A kill after the first of the two files of a new best: every best score recorded is one
    that best.pt holds, a resume knows it, and a kill -9's best.pt.tmp is removed."""
    root, _ = davis
    out = tmp_path / "run"
    val = ["--val", str(root), "--val-videos", "2", "--val-every", "1", "--out", str(out)]
    real, writes = train.atomic_save, []

    def killed_at_the_second_write(obj, path, *a):
        writes.append(path)
        if len(writes) == 2:
            raise KeyboardInterrupt
        return real(obj, path, *a)
    monkeypatch.setattr(train, "atomic_save", killed_at_the_second_write)
    with pytest.raises(KeyboardInterrupt):
        train.main(TINY + ["--steps", "2"] + val)
    monkeypatch.undo()
    best = torch.load(out / "best.pt", weights_only=True)["best_val_jf"] if (out / "best.pt").exists() else None
    if (out / "ckpt.pt").exists():
        assert best is not None and torch.load(out / "ckpt.pt", weights_only=True)["best_val_jf"] <= best
    (out / "best.pt.tmp").write_bytes(b"a kill -9 mid-write")
    train.main(TINY + ["--steps", "2", "--resume"] + val)
    ck, b = (torch.load(out / n, weights_only=True) for n in ("ckpt.pt", "best.pt"))
    jf = [json.loads(x)["val_jf"] for x in open(out / "log.jsonl")]
    assert ck["best_val_jf"] == b["best_val_jf"] == max(jf + [best])
    assert not (out / "best.pt.tmp").exists()


def test_an_unscored_val_sequence_is_counted_and_said(davis, tmp_path, capsys):
    root, names = davis
    out = tmp_path / "run"
    train.main(TINY + ["--steps", "1", "--val", str(root), "--val-videos", "3", "--out", str(out)])
    rows = [json.loads(x) for x in open(out / "log.jsonl")]
    assert rows[-1]["val_not_scored"] == {names[-1]: "under 3 frames"}
    assert f"over 2 of 3 sequences; not scored: {names[-1]}" in capsys.readouterr().err


@pytest.mark.parametrize("name, message", [
    ("missing/pic.png", "there is no folder"), ("pic", "name a picture file"),
    ("folder", "is a folder"), ("pic.png", r"No space left on device.*MiB free there"),
])
def test_a_picture_path_that_cannot_be_written_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch, name, message):
    from PIL import Image
    (tmp_path / "folder").mkdir()
    if name == "pic.png":
        def full(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(runs.os, "fsync", full)
    with pytest.raises(runs.UserError, match=message):
        runs.save_picture(Image.new("RGB", (8, 8)), str(tmp_path / name))
    assert sorted(os.listdir(tmp_path)) == ["folder"]


def test_a_full_disk_under_the_data_preview_names_the_picture(davis, tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    pic = tmp_path / "p.png"
    with pytest.raises(runs.UserError, match=f"cannot write {pic}"):
        data.main(["--preview", str(davis[0]), "--out", str(pic)])
    assert os.listdir(tmp_path) == []


def test_a_full_disk_under_make_synthetic_names_the_file_and_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    status = runs.cli("data.py", lambda: data.main(["--make-synthetic", str(tmp_path / "s"), "--videos",
                                                   "1", "--frames", "2", "--size", "32"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and err[-1].startswith("data.py: error: ") and str(tmp_path / "s") in err[-1]
    assert "No space left on device" in err[-1] and "Traceback" not in "\n".join(err)
    leftovers = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".tmp")]
    assert leftovers == [], leftovers


def test_every_cli_says_a_users_error_in_one_line():
    """Each tool's main goes through runs.cli: an error naming a file is one line."""
    for tool in ("train.py", "probe.py", "data.py", "cues.py", "experiments.py", "bench.py"):
        code = (f"import sys; sys.argv = ['{tool}']; import runs\n"
                f"def boom(*a, **k): raise FileNotFoundError(2, 'No such file or directory', '/gone/weights.pth')\n"
                f"runs.guard_streams = lambda: None\n"
                f"import {tool[:-3]} as m\n"
                f"m.main = boom\n"
                f"exec(compile(open('{tool}').read().split('if __name__ == \"__main__\":')[1].replace('\\n    ', '\\n'), '{tool}', 'exec'), vars(m))")
        r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "Traceback" not in r.stderr, (tool, r.stderr[-1500:])
        assert r.stderr.strip().splitlines()[-1] == f"{tool}: error: /gone/weights.pth: No such file or directory", tool


def test_a_batch_the_processes_do_not_divide_is_one_line_from_one_rank(tmp_path):
    from test_train import free_port
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                        os.path.join(REPO, "train.py"), *TINY, "--batch", "3", "--steps", "1",
                        "--out", str(tmp_path / "ddp")], env=ENV, capture_output=True, text=True, timeout=300)
    said = (r.stdout + r.stderr).count("train.py: error: --batch 3 must be divisible by the 2 processes")
    assert r.returncode != 0 and said == 1, r.stdout + r.stderr[-3000:]
    assert "Traceback" not in r.stderr.split("torch/distributed/elastic")[0]   # none from the ranks
    assert not (tmp_path / "ddp").exists()


def test_a_closed_stdout_or_stderr_ends_no_tool_and_keeps_its_files(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    from PIL import Image
    for i in range(2):
        Image.new("RGB", (56, 56), (40 * i, 80, 120)).save(frames / f"{i}.jpg")
    p = subprocess.Popen([sys.executable, os.path.join(REPO, "probe.py"), "pca", "--frames", str(frames),
                          "--ckpt", "none", "--preset", "tiny", "--weights", "none", "--size", "56",
                          "--device", "cpu", "--out", str(tmp_path / "pca")],
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()                  # `| head -0`: the reader is gone before the first line
    err = p.stderr.read()
    assert p.wait(timeout=300) == 0 and "Traceback" not in err and "Broken pipe" not in err, err[-2000:]
    assert (tmp_path / "pca" / "results.json").exists() and (tmp_path / "pca" / "pca.png").exists()
    out = tmp_path / "run"            # stderr closed at the start (`2>&-`): the run still trains
    r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *TINY, "--steps", "1", "--out", str(out)],
                       env=ENV, stdout=subprocess.PIPE, text=True, timeout=300, preexec_fn=lambda: os.close(2))
    assert r.returncode == 0 and "done: step 1" in r.stdout
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 1


def test_a_second_ctrl_c_says_what_is_kept_in_each_state(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["train.py", "--out", str(out)])
    assert "nothing was written" in train.interrupted()
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert "no checkpoint was written yet" in train.interrupted()
    (out / "ckpt.pt").write_bytes(b"")
    assert "the last checkpoint is kept" in train.interrupted()
    msg = runs.user_message(RuntimeError("DataLoader worker (pid 7) is killed by signal: Killed."))
    assert "checkpoint" not in msg          # it cannot know; train.py's rescue says what is kept


@pytest.mark.parametrize("flags, message", [
    (["--batch", "20000000"], r"one step's inputs alone take \d+\.\d GiB, this machine has"),
    (["--synthetic-frames", "10000000"], r"the rendered videos take \d+\.\d GiB, this machine has"),
])
def test_settings_beyond_the_machines_memory_are_refused_with_the_numbers(flags, message, capsys):
    with pytest.raises(SystemExit):
        train.get_args(TINY + flags)
    assert re.search(message, capsys.readouterr().err)
