"""Tests of probe.py: the DAVIS J&F metric against a slow literal reference of the official
definitions (davis2017-evaluation: davis2017/metrics.py, evaluation.py, davis.py), local-window
k-NN propagation against the dense formulation of DINO's eval_video_segmentation.py, the
one-shot linear probe, and every subcommand end to end on a tiny synthetic set."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import probe  # noqa: E402


# --- slow references, written from the definitions ---

def ref_boundary(seg):
    """Pixel (y, x) is a boundary if it differs from its right, lower or lower-right neighbour
    (outside = 0); in the last row only the right neighbour counts, in the last column only the
    lower one, and the bottom-right pixel is never a boundary (davis2017 _seg2bmap)."""
    h, w = seg.shape
    get = lambda y, x: bool(seg[y, x]) if y < h and x < w else False  # noqa: E731
    b = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            v = get(y, x)
            if y == h - 1 and x == w - 1:
                b[y, x] = False
            elif y == h - 1:
                b[y, x] = v != get(y, x + 1)
            elif x == w - 1:
                b[y, x] = v != get(y + 1, x)
            else:
                b[y, x] = v != get(y, x + 1) or v != get(y + 1, x) or v != get(y + 1, x + 1)
    return b


def ref_dilate(b, r):
    """Every pixel within Euclidean distance r (dy^2 + dx^2 <= r^2) of a set pixel."""
    out = np.zeros_like(b)
    for y, x in zip(*np.nonzero(b)):
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                if dy * dy + dx * dx <= r * r and 0 <= y + dy < b.shape[0] and 0 <= x + dx < b.shape[1]:
                    out[y + dy, x + dx] = True
    return out


def ref_frame(pred, gt, void, bound_th):
    inter, union = np.sum(pred & gt & ~void), np.sum((pred | gt) & ~void)
    j = 1.0 if union == 0 else inter / union
    r = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.sqrt(pred.shape[0] ** 2 + pred.shape[1] ** 2)))
    fb, gb = ref_boundary(pred & ~void), ref_boundary(gt & ~void)
    n_fg, n_gt = fb.sum(), gb.sum()
    if n_fg == 0 and n_gt > 0:
        p, rc = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        p, rc = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        p, rc = 1.0, 1.0
    else:
        p, rc = np.sum(fb & ref_dilate(gb, r)) / n_fg, np.sum(gb & ref_dilate(fb, r)) / n_gt
    f = 0.0 if p + rc == 0 else 2 * p * rc / (p + rc)
    return j, f


def ref_davis(preds, gts, bound_th=0.008, void="background"):
    """The official semi-supervised pipeline: 255 -> 0 on reading (so its void mask is empty),
    objects 1..max(first gt frame), frames 1..T-2, per-object mean, mean over all objects."""
    js, fs = [], []
    for seq in sorted(gts):
        for k in range(1, int(np.where(gts[seq][0] == 255, 0, gts[seq][0]).max()) + 1):
            jk, fk = [], []
            for t in range(1, len(gts[seq]) - 1):
                g = gts[seq][t]
                vd = (g == 255) if void == "ignore" else np.zeros(g.shape, bool)
                j, f = ref_frame(preds[seq][t] == k, np.where(g == 255, 0, g) == k, vd, bound_th)
                jk.append(j), fk.append(f)
            js.append(np.mean(jk)), fs.append(np.mean(fk))
    return {"J": np.mean(js), "F": np.mean(fs), "JF": (np.mean(js) + np.mean(fs)) / 2}


def ref_knn_step(query, ctx, labels, radius, topk, temperature, tile=None):
    """DINO's dense formulation: exp(cos / T) to every position of every context frame, times
    the neighbourhood mask, keep values >= the k-th largest per query, normalise, mix labels."""
    D, h, w = query.shape
    K, C = labels.shape[:2]
    q = query.flatten(1).T                                              # (hw, D)
    aff = torch.exp(torch.einsum("nd,kdm->knm", q, ctx.flatten(2)) / temperature)  # (K, hw, hw)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    yy, xx = yy.flatten(), xx.flatten()
    mask = ((yy[:, None] - yy[None]).abs() <= radius) & ((xx[:, None] - xx[None]).abs() <= radius)
    aff = (aff * mask).transpose(2, 1).reshape(K * h * w, h * w)        # (K*hw keys, hw queries)
    kth = aff.topk(topk, dim=0).values.min(0).values
    aff[aff < kth] = 0
    aff = aff / aff.sum(0, keepdim=True)
    segs = labels.flatten(2).transpose(2, 1).reshape(-1, C).T           # (C, K*hw)
    return (segs @ aff).view(C, h, w)


def blobs(rng, t, h, w, n_obj, void=False):
    """(t, h, w) label maps of moving random rectangles (+ optional 255 void stripes)."""
    out = np.zeros((t, h, w), np.int64)
    for k in range(1, n_obj + 1):
        y0, x0, hh, ww = rng.integers(0, h // 2), rng.integers(0, w // 2), rng.integers(3, h // 2), rng.integers(3, w // 2)
        for i in range(t):
            dy, dx = rng.integers(-2, 3, 2)
            out[i, max(0, y0 + dy):y0 + dy + hh, max(0, x0 + dx):x0 + dx + ww] = k
    if void:
        out[:, :, rng.integers(0, w)] = 255
    return out


# --- davis_jf ---

@pytest.mark.parametrize("void", ["background", "ignore"])
@pytest.mark.parametrize("bound_th", [0.008, 3])
def test_davis_jf_matches_literal_reference_on_random_sequences(void, bound_th):
    rng = np.random.default_rng(0)
    gts, preds = {}, {}
    for s, (h, w, n) in enumerate([(23, 31, 2), (40, 52, 3)]):
        g = blobs(rng, 5, h, w, n, void=True)
        p = np.where(rng.random(g.shape) < 0.1, rng.integers(0, n + 1, g.shape), np.where(g == 255, 0, g))
        gts[f"s{s}"], preds[f"s{s}"] = list(g), list(p)
    got, want = probe.davis_jf(preds, gts, bound_th=bound_th, void=void), ref_davis(preds, gts, bound_th, void)
    for key in ("J", "F", "JF"):
        assert abs(got[key] - want[key]) < 1e-6, (key, got[key], want[key])


def test_davis_jf_davis_size_frame_uses_radius_8():
    rng = np.random.default_rng(1)
    g = blobs(rng, 3, 480, 854, 1) * 0
    g[:, 100:300, 200:500] = 1
    p = g.copy()
    p[1, 100:300, 200:509] = 1  # right edge 9 px off: outside ceil(0.008 * 979.6) = 8 ...
    q = g.copy()
    q[1, 100:300, 200:508] = 1  # ... 8 px off: inside
    f_out = probe.davis_jf({"a": list(p)}, {"a": list(g)})["F"]
    f_in = probe.davis_jf({"a": list(q)}, {"a": list(g)})["F"]
    assert f_in == 1.0 and f_out < 1.0


def test_davis_jf_perfect_prediction_is_one():
    g = blobs(np.random.default_rng(2), 6, 30, 40, 3)
    assert probe.davis_jf({"a": list(g)}, {"a": list(g)}) == {"J": 1.0, "F": 1.0, "JF": 1.0}


def test_davis_jf_object_absent_in_gt_and_pred_counts_as_one_and_missed_object_as_zero():
    g = np.zeros((4, 20, 20), np.int64)
    g[:, 5:10, 5:10] = 1
    g[1, 5:10, 5:10] = 0   # object gone in frame 1 (gt), also gone in the prediction: J = F = 1
    p = g.copy()
    p[2] = 0               # object missed in frame 2: J = F = 0
    r = probe.davis_jf({"a": list(p)}, {"a": list(g)})
    assert r["J"] == pytest.approx(0.5) and r["F"] == pytest.approx(0.5)
    assert r == pytest.approx(ref_davis({"a": list(p)}, {"a": list(g)}))


def test_davis_jf_ignores_first_and_last_frame_and_void_modes_differ():
    g = np.zeros((3, 20, 20), np.int64)
    g[:, 4:12, 4:12] = 1
    p = np.zeros_like(g)
    p[1] = g[1]            # frames 0 and 2 wrong but not scored
    assert probe.davis_jf({"a": list(p)}, {"a": list(g)})["JF"] == 1.0
    g[1, 4:12, 12:16] = 255  # void band next to the object, predicted as object
    p[1, 4:12, 4:16] = 1
    bg, ig = probe.davis_jf({"a": list(p)}, {"a": list(g)}), probe.davis_jf({"a": list(p)}, {"a": list(g)}, void="ignore")
    assert bg["J"] == pytest.approx(64 / 96) and ig["J"] == 1.0   # official: void = background


def test_davis_jf_rejects_unknown_labels_and_short_sequences():
    g = np.zeros((3, 8, 8), np.int64)
    g[:, 2:4, 2:4] = 1
    with pytest.raises(ValueError, match="outside"):
        probe.davis_jf({"a": list(g * 2)}, {"a": list(g)})
    with pytest.raises(ValueError, match="3 frames"):
        probe.davis_jf({"a": list(g[:2])}, {"a": list(g[:2])})


# --- k-NN propagation and the linear probe ---

def test_local_window_propagation_equals_dense_formulation():
    g = torch.Generator().manual_seed(0)
    T, D, h, w, C = 6, 16, 13, 17, 3
    feats = F.normalize(torch.randn(T, D, h, w, generator=g), dim=1)
    first = F.one_hot(torch.randint(0, C, (h, w), generator=g), C).permute(2, 0, 1).float()
    kw = dict(n_context=3, radius=3, topk=5, temperature=0.1)
    local = probe.propagate(feats, first, tile=4, **kw)
    dense = probe.propagate(feats, first, step=ref_knn_step, **kw)
    assert torch.allclose(local, dense, atol=1e-5)
    assert all(torch.equal(probe.soft_to_labels(a, (26, 34)), probe.soft_to_labels(b, (26, 34)))
               for a, b in zip(local, dense))


def test_static_video_propagation_reproduces_first_mask():
    g = torch.Generator().manual_seed(1)
    D, h, w, C = 32, 20, 24, 4
    f = F.normalize(torch.randn(D, h, w, generator=g), dim=1)
    labels = torch.randint(0, C, (h, w), generator=g)
    soft = probe.propagate(f.expand(10, -1, -1, -1), F.one_hot(labels, C).permute(2, 0, 1).float())
    for s in soft:
        assert torch.equal(probe.soft_to_labels(s, (h, w)), labels)


def test_linear_probe_fits_a_mask_that_is_linear_in_the_features():
    g = torch.Generator().manual_seed(2)
    C, D = 3, 16
    embed = torch.randn(C, D, generator=g)                              # one direction per label
    y = torch.randint(0, C, (2000,), generator=g)                       # (N,) mask of the first frame
    x = embed[y] + 0.3 * torch.randn(2000, D, generator=g)              # (N, D): mask = argmax(x @ embed^T)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny problem: threads only add overhead
    try:
        lin = probe.fit_linear(x, y, C, F.cross_entropy, steps=500, lr=5e-3, weight_decay=1e-2)
    finally:
        torch.set_num_threads(n_threads)
    x2 = embed[y] + 0.3 * torch.randn(2000, D, generator=g)             # a "later frame", new noise
    assert torch.equal(lin(x).argmax(1), y) and (lin(x2).argmax(1) == y).float().mean() > 0.99


# --- end to end on a tiny synthetic set ---

@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    import data
    root = tmp_path_factory.mktemp("synth")
    data.write_synthetic(root, videos=3, frames=4, size=112, seed=0)
    return root


COMMON = ["--preset", "tiny", "--weights", "none", "--size", "112", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny problems on a shared 2-core machine


def run_probe(*argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, "probe.py"), *argv, *COMMON], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=ENV)


@pytest.mark.parametrize("cmd,extra,keys", [
    ("vos-knn", ["--grid", "28"], ["J", "F", "JF"]),
    ("normals", ["--probe-steps", "60", "--pixels", "512"], ["rmse", "under_11.25", "under_30"]),
    ("semseg", ["--probe-steps", "60", "--pixels", "512"], ["miou", "pixel_acc"]),
    ("pca", [], ["explained_variance"]),
])
def test_subcommand_runs_end_to_end_and_writes_results(synth, tmp_path, cmd, extra, keys):
    src = ["--frames", str(synth / "JPEGImages/480p/synth0000")] if cmd == "pca" else ["--data", str(synth)]
    out = run_probe(cmd, *src, *extra, "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.load(open(tmp_path / "results.json"))
    assert all(np.isfinite(res["metrics"][k]).all() for k in keys) and res["config"]["cmd"] == cmd
    if cmd == "vos-knn":
        from PIL import Image
        im = Image.open(tmp_path / "synth0000" / "00003.png")
        assert im.mode == "P" and im.size == (112, 112)
    if cmd == "pca":
        assert (tmp_path / "pca.png").is_file()


def test_missing_first_frame_mask_is_a_clear_error(synth, tmp_path):
    import shutil
    root = tmp_path / "d"
    shutil.copytree(synth / "JPEGImages", root / "JPEGImages")
    shutil.copytree(synth / "Annotations", root / "Annotations")
    os.remove(root / "Annotations/480p/synth0001/00000.png")
    out = run_probe("vos-knn", "--data", str(root), "--grid", "14", "--out", str(tmp_path / "o"))
    assert out.returncode != 0 and "no first-frame mask" in out.stderr and "Traceback" not in out.stderr
