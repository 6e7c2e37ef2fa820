"""extract.py: the files equal lila.features; the banded head equals the one-piece decoder; one
PCA basis per video and one video frame per input frame; a kill or a stop, then a rerun, gives
an uninterrupted run's files; frame folders, nested folders, video files; bad inputs named."""
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import extract
import hubconf
import model
import runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--ckpt", "none", "--preset", "tiny", "--weights", "none", "--device", "cpu"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def frames(folder, n, size=(45, 61), seed=0, start=0):
    """n random RGB frames H x W = size, named start.jpg ... (PNG: no JPEG loss in the check)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(start, start + n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return folder


def run(*args):
    """extract.main in this process -> its exit code."""
    with pytest.raises(SystemExit) as e:
        extract.main([str(a) for a in args])
    return e.value.code


def error_line(capsys, *args):
    """extract.main in this process, which must fail (exit status 1) -> its last stderr line."""
    capsys.readouterr()
    assert run(*args) == 1
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def lila():
    return hubconf.lila_vits14(ckpt="none", weights="none", preset="tiny")


def test_written_features_equal_lila_features(lila, tmp_path):
    src = frames(tmp_path / "in", 3)
    open(src / "7.png", "w").write("not an image")                  # damaged: named, counted, skipped
    for stride, batch in ((1, None), (3, 10 ** 6)):                 # a frame at a time (a CPU's default), 3 together
        out = tmp_path / f"out{stride}"
        more = ["--batch-pixels", batch] if batch else []
        assert run(src, "--out", out, "--stride", stride, "--features", "full", *more, *TINY) == 0
        m = json.load(open(out / "manifest.json"))
        seq = m["sequences"]["."]
        assert list(seq["frames"]) == ["0", "1", "2"] and "7.png" in seq["skipped"]["7"]
        assert m["frames_written"] == 3 and m["frames_skipped"] == 1
        for name, entry in seq["frames"].items():
            img = np.array(Image.open(src / f"{name}.png"))
            ref = lila.features(img)[:, ::stride, ::stride]            # (D, H', W')
            got = np.load(out / entry["decoder"])
            assert got.dtype == np.float16 and list(got.shape) == entry["decoder_shape"] == list(ref.shape)
            torch.testing.assert_close(torch.from_numpy(got).float(), ref, atol=4e-3, rtol=2e-3)
            x = F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255, (42, 56),
                              mode="bilinear", align_corners=False)
            enc = lila.encode(x, lila.taps[-1:])[0][0]                  # (E, h, w)
            torch.testing.assert_close(torch.from_numpy(np.load(out / entry["encoder"])).float(), enc,
                                       atol=4e-3, rtol=2e-3)


@pytest.mark.parametrize("size, out_size", [((56, 70), (45, 61)), ((98, 42), (98, 42)), ((28, 84), (31, 90))])
def test_banded_head_equals_the_one_piece_decoder(size, out_size):
    torch.manual_seed(0)
    cfg = model.decoder_config("dinov2_vits14", "tiny")
    dec = model.DPTDecoder(384, **cfg).eval()
    grids = [torch.randn(2, 384, size[0] // 14, size[1] // 14) for _ in range(4)]
    with torch.no_grad():
        ref = F.interpolate(dec(grids, size), out_size, mode="bilinear", align_corners=False)
        for band_pixels in (1, 5 * 90, 10 ** 9):                       # 1 row, a few rows, one piece
            for stride in (1, 2, 3):
                parts = list(model.decoder_bands(dec, grids, size, out_size, stride, band_pixels))
                got = torch.cat([p for _, p in parts], 2)
                assert [r for r, _ in parts] == list(np.cumsum([0] + [p.shape[2] for _, p in parts[:-1]]))
                torch.testing.assert_close(got, ref[:, :, ::stride, ::stride], atol=2e-5, rtol=1e-5)


def test_channel_layer_norm_is_the_layer_norm_of_every_pixel():
    y = torch.randn(2, 32, 5, 7) * 3 + 1
    for x in (y, y.contiguous(memory_format=torch.channels_last)):
        ref = torch.empty_like(y)
        for b, i, j in np.ndindex(2, 5, 7):                             # pixel by pixel, in float64
            v = x[b, :, i, j].double()
            ref[b, :, i, j] = ((v - v.mean()) / (v.var(unbiased=False) + 1e-5).sqrt()).float()
        torch.testing.assert_close(model.ChannelLayerNorm(32, elementwise_affine=False)(x), ref)


def test_fit_pca_finds_the_top_eigenvectors_of_the_covariance():
    x = torch.randn(5000, 6) * torch.tensor([5.0, 3, 2, 0.5, 0.3, 0.1]) @ torch.linalg.qr(torch.randn(6, 6))[0]
    pca = extract.fit_pca(x + 7, 3, samples=5000)
    cov = np.cov((x + 7).numpy().T)
    val, vec = np.linalg.eigh(cov)                                         # ascending
    cos = np.abs(vec[:, ::-1][:, :3].T @ pca["basis"].numpy().astype(np.float64))
    np.testing.assert_allclose(np.diag(cos), 1, atol=1e-4)
    np.testing.assert_allclose(pca["explained"].numpy(), val[::-1][:3] / val.sum(), rtol=1e-3)
    rgb = extract.pca_rgb((x + 7).T.reshape(6, 50, 100), pca)              # (50, 100, 3)
    y = ((x + 7 - pca["mean"]) @ pca["basis"] - pca["lo"]) / (pca["hi"] - pca["lo"])
    assert np.abs(rgb.reshape(-1, 3).int().numpy() - (y.clamp(0, 1) * 255).numpy()).max() <= 1


def optional(name):
    """An optional package: where CI is set (.ci/run installs av) a missing one fails the test;
    elsewhere (a set-up without the optional packages) it skips it."""
    return importlib.import_module(name) if os.environ.get("CI") else pytest.importorskip(name)


def video_frames(path):
    av = optional("av")
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_pca_video_has_one_frame_per_frame_and_one_basis_per_video(tmp_path, monkeypatch):
    optional("av")                                                      # the mp4, then without it
    frames(tmp_path / "in/a", 3, seed=1)
    frames(tmp_path / "in/b", 2, seed=2)
    out = tmp_path / "out"
    assert run(tmp_path / "in", "--out", out, "--pca", "--pca-samples", 10 ** 5, *TINY) == 0
    m = json.load(open(out / "manifest.json"))
    for seq, n in (("a", 3), ("b", 2)):
        entry = m["sequences"][seq]
        assert entry["pca_video"] == f"pca/{seq}.mp4" and len(video_frames(out / entry["pca_video"])) == n
        feats = [torch.from_numpy(np.load(out / f["decoder"])).float() for f in entry["frames"].values()]
        every = torch.cat([f.flatten(1).T for f in feats])               # (all pixels of the video, D)
        pca = extract.fit_pca(every, 3, samples=len(every))              # one basis: all the video's pixels
        for name, f in zip(entry["frames"], feats):
            png = np.asarray(Image.open(out / "pca" / seq / f"{name}.png"))
            assert png.shape == (extract.LABEL + 45, 2 * 61 + extract.GAP, 3)
            want = extract.pca_rgb(f, pca).numpy()
            assert np.abs(png[extract.LABEL:, 61 + extract.GAP:].astype(int) - want).max() <= 1
    monkeypatch.setitem(sys.modules, "av", None)                       # no PyAV: animated WebP
    assert run(tmp_path / "in/a", "--out", tmp_path / "webp", "--pca-only", *TINY) == 0
    m = json.load(open(tmp_path / "webp/manifest.json"))
    assert Image.open(tmp_path / "webp" / m["sequences"]["."]["pca_video"]).n_frames == 3
    assert not os.path.exists(tmp_path / "webp/decoder")                # --pca-only: no features kept


def test_nested_folders_and_a_video_file(lila, tmp_path):
    av = optional("av")
    frames(tmp_path / "in/cats/one", 2)
    frames(tmp_path / "in/dogs", 1, seed=3)
    rng = np.random.default_rng(4)
    with av.open(str(tmp_path / "in/clip.mp4"), "w") as c:              # 3 frames, 64 x 48
        s = c.add_stream("libx264", rate=5)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for _ in range(3):
            c.mux(s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))))
        c.mux(s.encode(None))
    out = tmp_path / "out"
    assert run(tmp_path / "in", "--out", out, *TINY) == 0
    seqs = json.load(open(out / "manifest.json"))["sequences"]
    assert {k: list(v["frames"]) for k, v in seqs.items()} == {
        "cats/one": ["0", "1"], "clip": ["000000", "000001", "000002"], "dogs": ["0"]}
    for name, img in zip(seqs["clip"]["frames"], video_frames(tmp_path / "in/clip.mp4")):
        got = np.load(out / seqs["clip"]["frames"][name]["decoder"])
        torch.testing.assert_close(torch.from_numpy(got).float(), lila.features(img), atol=4e-3, rtol=2e-3)


def start(args):
    return subprocess.Popen([sys.executable, os.path.join(REPO, "extract.py"), *map(str, args)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_files(folder, n, proc, timeout=120):
    t0 = time.time()
    while len([f for f in os.listdir(folder)] if os.path.isdir(folder) else []) < n:
        assert proc.poll() is None and time.time() - t0 < timeout, proc.communicate()
        time.sleep(0.05)


def test_kill_or_stop_then_rerun_gives_the_files_of_an_uninterrupted_run(tmp_path, monkeypatch):
    # The runs in this process take the subprocesses' one thread: byte-equal files need the
    # same float sums (torch's threads split them differently).
    monkeypatch.setenv("OMP_NUM_THREADS", ENV["OMP_NUM_THREADS"])       # extract.py keeps it
    threads = torch.get_num_threads()
    try:
        kill_or_stop_then_rerun(tmp_path)
    finally:
        torch.set_num_threads(threads)


def kill_or_stop_then_rerun(tmp_path):
    src = frames(tmp_path / "in", 12, size=(28, 42))
    args = [src, "--pca", "--batch-pixels", 1, *TINY]                  # one frame per batch
    assert run(*args, "--out", tmp_path / "whole") == 0
    for how in (signal.SIGKILL, signal.SIGTERM):
        out = tmp_path / how.name
        p = start([*args, "--out", out])
        wait_for_files(out / "decoder", 3, p)
        p.send_signal(signal.SIGSTOP)           # frozen first: the count below cannot race
        assert len(os.listdir(out / "decoder")) < 12, "stopped too late to test anything"
        p.send_signal(how), p.send_signal(signal.SIGCONT)
        _, err = p.communicate(timeout=60)
        written = sorted(os.listdir(out / "decoder"))
        if how == signal.SIGTERM:                                       # a clean stop: a manifest that
            assert p.returncode == 128 + signal.SIGTERM and "Continue with the same command" in err
            m = json.load(open(out / "manifest.json"))                  # lists what is on disk
            assert sorted(f + ".npy" for f in m["sequences"]["."]["frames"]) == written
        assert run(*args, "--out", out) == 0
        for folder, dirs, files in os.walk(tmp_path / "whole"):
            rel = os.path.relpath(folder, tmp_path / "whole")
            assert sorted(os.listdir(out / rel)) == sorted(dirs + files)
            for f in files:
                if not f.endswith(".mp4"):                               # mp4: encoder metadata
                    assert open(os.path.join(folder, f), "rb").read() == open(out / rel / f, "rb").read(), f


def test_bad_inputs_are_one_line_naming_them(tmp_path, capsys):
    src = frames(tmp_path / "in", 1)
    (tmp_path / "empty").mkdir()
    open(tmp_path / "file", "w").write("x")
    cases = [((tmp_path / "nothing", "--out", tmp_path / "o1"), "INPUT .*nothing: no such file"),
             ((tmp_path / "empty", "--out", tmp_path / "o2"), "INPUT .*empty: a folder without images"),
             ((src, "--out", tmp_path / "file/sub"), "--out .*file/sub: cannot create"),
             ((tmp_path / "file", "--out", tmp_path / "o3"), "INPUT .*file: not an image .* nor a video")]
    for args, message in cases:
        assert re.match(f"extract.py: error: {message}", error_line(capsys, *args, *TINY))
    assert run(src, "--out", tmp_path / "o4", *TINY) == 0
    assert re.match(r"extract.py: error: --out .*o4 was written with other settings .*'stride': \(1, 2\)",
                    error_line(capsys, src, "--out", tmp_path / "o4", "--stride", 2, *TINY))


def test_a_video_without_pyav_says_what_to_install(tmp_path):
    open(tmp_path / "clip.mp4", "wb").write(b"\0" * 100)
    code = ("import sys; sys.modules['av'] = None; import extract; "
            f"extract.main([{str(tmp_path / 'clip.mp4')!r}, '--out', {str(tmp_path / 'o')!r}, "
            + ", ".join(repr(a) for a in TINY) + "])")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        f"extract.py: error: INPUT {tmp_path / 'clip.mp4'}: video files are read with PyAV: pip "
        f"install av (or pass a folder of its frames)")


def test_a_second_run_on_the_same_out_is_refused_naming_the_holder(tmp_path):
    src = frames(tmp_path / "in", 1)
    holder = runs.RunFolder(str(tmp_path / "out"), "extract.py")
    holder.acquire()                                     # a first run, still going
    try:
        p = subprocess.run([sys.executable, os.path.join(REPO, "extract.py"), str(src), "--out",
                            str(tmp_path / "out"), *map(str, TINY)], env=ENV, capture_output=True,
                           text=True, timeout=120)
    finally:
        holder.release()
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "is in use by another extract.py run" in p.stderr.strip().splitlines()[-1]
    assert run(src, "--out", tmp_path / "out", *TINY) == 0              # free again: it runs
