"""experiments.py: the rows are valid train.py / probe.py command lines, finished work is never
redone, an interrupted run resumes, and the table is the mean ± std of the finished seeds."""
import json
import os
import statistics
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import experiments  # noqa: E402
import probe  # noqa: E402
import train  # noqa: E402


def test_every_row_is_a_valid_command_line():
    for row, (train_flags, model_flags) in experiments.ROWS.items():
        if train_flags is not None:
            args = train.get_args(["--preset", "tiny", "--weights", "none"] + train_flags)
            assert args.size == 112 and args.batch == 8, row
        for cmd, flags, *_ in experiments.PROBES.values():
            probe.parse_args([cmd, "--data", os.path.dirname(__file__), "--size", "112"]
                             + (model_flags or []) + flags)
    # the flags do what the row names say
    a = train.get_args(["--no-flow", "--no-sd"] + experiments.ROWS["depth-only"][0])
    assert a.no_flow and a.no_sd and not a.no_depth
    a = train.get_args(experiments.ROWS["flow-only"][0])
    assert a.no_depth and a.no_sd and not a.no_flow
    assert train.get_args(experiments.ROWS["noise-1.0"][0]).cue_noise == 1.0
    assert train.get_args(experiments.ROWS["erm"][0]).erm


def fake_results(out, row, seed, vals):
    for name, (_, _, key, *_) in experiments.PROBES.items():
        if name in vals:
            d = os.path.join(out, row, f"seed{seed}", f"probe_{name}")
            os.makedirs(d, exist_ok=True)
            json.dump({"metrics": {key: vals[name]}}, open(os.path.join(d, "results.json"), "w"))


def args_for(out, **kw):
    a = experiments.argparse.Namespace(rows=["untrained", "lila"], seeds=[0, 1, 2], steps=10,
                                       lr=1e-3, out=str(out), eval_data=str(out / "eval"))
    vars(a).update(kw)
    return a


def test_table_is_mean_and_std_of_finished_seeds(tmp_path, capsys):
    fake_results(tmp_path, "lila", 0, dict(vos=0.5, normals=30.0, semseg=40.0))
    fake_results(tmp_path, "lila", 1, dict(vos=0.7, normals=20.0, semseg=50.0))
    fake_results(tmp_path, "lila", 2, dict(vos=0.9, normals=25.0))       # semseg missing: unfinished
    json.dump({"train": 120.0}, open(tmp_path / "lila" / "seed0" / "times.json", "w"))
    experiments.print_table(args_for(tmp_path))
    table = json.load(open(tmp_path / "table.json"))
    assert table["lila"]["seeds"] == [0, 1] and table["lila"]["vos"] == [0.5, 0.7]
    assert table["untrained"]["seeds"] == []
    line = [l for l in open(tmp_path / "table.md") if "LILA" in l][0]
    sd = statistics.stdev([0.5, 0.7])
    assert f"0.600 ± {sd:.3f}" in line and "25.0 ± 7.1" in line and "| 2 | 2.0 |" in line
    assert "untrained decoder | — | — | — | 0 | — |" in open(tmp_path / "table.md").read()


def test_one_run_skips_finished_work_and_resumes(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, log_path):  # record the command, write what it would have written
        calls.append(cmd)
        out = cmd[cmd.index("--out") + 1]
        if os.path.basename(cmd[1]) == "train.py":
            os.makedirs(out, exist_ok=True)
            torch.save({"step": int(cmd[cmd.index("--steps") + 1])}, os.path.join(out, "ckpt.pt"))
        else:
            os.makedirs(out, exist_ok=True)
            json.dump({"metrics": {}}, open(os.path.join(out, "results.json"), "w"))
        return 1.0

    monkeypatch.setattr(experiments, "run", fake_run)
    a = args_for(tmp_path)
    seed_dir = tmp_path / "no-edge" / "seed1"
    run_dir = seed_dir / "run"                                            # train.py's own folder
    run_dir.mkdir(parents=True)
    torch.save({"step": 4}, run_dir / "ckpt.pt")                          # interrupted at step 4
    experiments.one_run("no-edge", 1, a)
    assert [os.path.basename(c[1]) for c in calls] == ["train.py", "probe.py", "probe.py", "probe.py"]
    tr = calls[0]
    assert "--resume" in tr and "--no-edge" in tr and tr[tr.index("--seed") + 1] == "1"
    assert tr[tr.index("--out") + 1] == str(run_dir)
    assert all(c[c.index("--ckpt") + 1] == str(run_dir / "ckpt.pt") for c in calls[1:])
    assert all(c[c.index("--features") + 1] == "decoder" for c in calls[1:])
    assert json.load(open(seed_dir / "times.json"))["train"] == 1.0
    calls.clear()
    experiments.one_run("no-edge", 1, a)                                  # everything done
    assert calls == []
    experiments.one_run("lila", 0, a)             # also probed as the paper evaluates (full)
    feats = [c[c.index("--features") + 1] for c in calls if os.path.basename(c[1]) == "probe.py"]
    assert feats == ["decoder"] * 3 + ["full"] * 3
    fake_results(tmp_path, "lila", 1, dict(vos=0.5, normals=30.0, semseg=40.0))
    for name in experiments.PROBES:
        os.rename(tmp_path / "lila" / "seed1" / f"probe_{name}", tmp_path / "lila" / "seed1" / f"probe_{name}_full")
    table = experiments.collect(args_for(tmp_path, rows=["lila"], seeds=[1]))
    assert table["lila+full"]["vos"] == [0.5] and table["lila"]["seeds"] == []
    calls.clear()
    experiments.one_run("encoder", 0, a)                                  # no training row
    assert [os.path.basename(c[1]) for c in calls] == ["probe.py"] * 3
    assert all("--features" in c and c[c.index("--features") + 1] == "encoder" for c in calls)


def test_a_run_past_the_step_budget_is_refused(tmp_path):
    d = tmp_path / "lila" / "seed0" / "run"
    d.mkdir(parents=True)
    torch.save({"step": 600}, d / "ckpt.pt")
    with pytest.raises(RuntimeError, match="step 600, past --steps 10"):
        experiments.one_run("lila", 0, args_for(tmp_path))


def test_failed_command_names_its_log(tmp_path):
    with pytest.raises(RuntimeError, match="see .*commands.log"):
        experiments.run([sys.executable, "-c", "import sys; sys.exit(3)"], str(tmp_path / "commands.log"))
    assert "sys.exit(3)" in open(tmp_path / "commands.log").read()


def test_curves_draw_one_line_per_run_and_cue(tmp_path):
    runs = []
    for k, slope in enumerate((1.0, 0.5)):
        d = tmp_path / f"r{k}"
        d.mkdir()
        with open(d / "log.jsonl", "w") as f:
            for step in (10, 20, 30):
                f.write(json.dumps({"step": step, "l1_flow_x": 1 - slope * step / 100, "l1_depth": 0.5}) + "\n")
        runs.append(str(d))
    png = experiments.plot_curves(runs, str(tmp_path / "c.png"), ["a", "b"])
    from PIL import Image
    import numpy as np
    img = np.asarray(Image.open(png))
    for colour in experiments.COLOURS[:2]:                # both runs drawn
        assert (np.abs(img.astype(int) - colour).sum(-1) == 0).sum() > 100
    assert img.shape[1] > 2 * 260                          # two cue panels (flow-x, depth)


# --- reliability: a kill before the first checkpoint, damaged files, unscorable probes ---

def test_a_run_killed_before_its_first_checkpoint_is_resumed_not_refused(tmp_path, monkeypatch):
    run_dir = tmp_path / "lila" / "seed0" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")              # what train.py leaves before ckpt.pt
    calls = []
    monkeypatch.setattr(experiments, "run", lambda cmd, log: calls.append(cmd) or 0.0)
    experiments.one_run("lila", 0, args_for(tmp_path))
    assert "--resume" in calls[0] and os.path.basename(calls[0][1]) == "train.py"
    calls.clear()
    experiments.one_run("lila", 1, args_for(tmp_path))      # a folder never started: a fresh run
    assert "--resume" not in calls[0]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"config": {}}', ""])
def test_table_on_a_damaged_results_file_is_one_error_naming_it(tmp_path, content, capsys):
    fake_results(tmp_path, "lila", 0, dict(vos=0.5, normals=30.0, semseg=40.0))
    bad = tmp_path / "lila" / "seed0" / "probe_vos" / "results.json"
    bad.write_text(content)
    with pytest.raises(SystemExit) as e:
        experiments.main(["--table", "--out", str(tmp_path), "--rows", "lila"])
    assert str(bad) in str(e.value) and str(e.value).startswith("experiments.py: ")


def test_damaged_checkpoint_and_times_are_one_error_naming_them(tmp_path):
    d = tmp_path / "lila" / "seed0" / "run"
    d.mkdir(parents=True)
    (d / "ckpt.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(RuntimeError, match="ckpt.pt is damaged"):
        experiments.one_run("lila", 0, args_for(tmp_path))
    (d / "ckpt.pt").unlink()
    (tmp_path / "lila" / "seed0" / "times.json").write_text("{")
    with pytest.raises(RuntimeError, match="times.json is damaged"):
        experiments.one_run("lila", 0, args_for(tmp_path))


def test_a_probe_without_valid_pixels_is_a_dash_not_a_zero(tmp_path):
    fake_results(tmp_path, "lila", 0, dict(vos=0.5, normals=30.0, semseg=None))
    experiments.print_table(args_for(tmp_path, rows=["lila"], seeds=[0]))
    line = [l for l in open(tmp_path / "table.md") if "LILA" in l][0]
    assert "| 0.500 | 30.0 | — | 1 |" in line


def test_curves_on_a_damaged_log_name_the_file_and_line(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    (d / "log.jsonl").write_text('{"step": 1, "l1_depth": 0.5}\nnot json\n{"step": 2, "l1_depth": 0.4}\n')
    with pytest.raises(SystemExit, match="log.jsonl:2 is not a JSON line"):
        experiments.plot_curves([str(d)], str(tmp_path / "c.png"))
    (d / "log.jsonl").write_text('{"step": 1, "l1_depth": 0.5}\n{"step": 2, "l1_de')     # cut off by a kill
    assert os.path.isfile(experiments.plot_curves([str(d)], str(tmp_path / "c.png")))


def test_a_failed_command_prints_the_whole_message(tmp_path, monkeypatch, capsys):
    def boom(row, seed, a):
        raise RuntimeError("failed (3): python train.py ...\n  see commands.log")
    monkeypatch.setattr(experiments, "one_run", boom)
    monkeypatch.setattr(experiments.data, "write_synthetic", lambda *a, **k: None)
    os.makedirs(tmp_path / "eval")
    with pytest.raises(SystemExit) as e:
        experiments.main(["--out", str(tmp_path), "--rows", "lila", "--seeds", "0"])
    assert "failed (3)" in str(e.value) and "see commands.log" in str(e.value)


@pytest.mark.parametrize("flags,message", [(["--jobs", "0"], "--jobs 0"), (["--steps", "0"], "--steps 0"),
                                           (["--lr", "nan"], "--lr nan"), (["--lr", "-1"], "--lr -1.0")])
def test_bad_flags_are_one_line(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        experiments.main(flags + ["--out", str(tmp_path)])
    assert message in capsys.readouterr().err


def test_out_that_is_a_file_and_png_in_a_missing_folder_are_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit):
        experiments.main(["--table", "--out", str(tmp_path / "f")])
    assert "is a file" in capsys.readouterr().err
    d = tmp_path / "r"
    d.mkdir()
    (d / "log.jsonl").write_text('{"step": 1, "l1_depth": 0.5}\n')
    with pytest.raises(SystemExit):
        experiments.main(["--curves", str(d), "--png", str(tmp_path / "no" / "c.png")])
    assert "no folder" in capsys.readouterr().err
