"""Tests of probe.py: the DAVIS J&F metric against a slow literal reference of the official
definitions (davis2017-evaluation: davis2017/metrics.py, evaluation.py, davis.py), the k-NN
rule and its tiled fast path against a pixel-by-pixel reference (lila/eval_vosknn.py: replicate
padding, sources summed), every subcommand end to end on a tiny synthetic set with a tiny
random model, and every bad input ending in one clear line (or a counted skip)."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import extract  # noqa: E402
import probe  # noqa: E402
import runs  # noqa: E402


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
    """Pixel by pixel, from the words: the candidates of query pixel (y, x) are the context
    positions (k, y + dy, x + dx), |dy|, |dx| <= radius, coordinates clamped into the image
    (replicate padding); the topk highest cosines vote with weights softmax(cos / T)."""
    D, h, w = query.shape
    K, C = labels.shape[:2]
    out = torch.zeros(C, h, w, dtype=torch.float64)
    clamp = lambda v, n: min(max(v, 0), n - 1)  # noqa: E731
    for y in range(h):
        for x in range(w):
            cands = [(k, clamp(y + dy, h), clamp(x + dx, w)) for k in range(K)
                     for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
            cos = torch.tensor([float(query[:, y, x].double() @ ctx[k, :, yy, xx].double()) for k, yy, xx in cands])
            val, idx = cos.topk(topk)
            wgt = torch.softmax(val / temperature, 0)
            for wi, i in zip(wgt, idx.tolist()):
                k, yy, xx = cands[i]
                out[:, y, x] += wi * labels[k, :, yy, xx].double()
    return out.float()


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


# --- k-NN propagation ---

def test_the_rule_and_its_tiled_fast_path_are_the_pixel_by_pixel_definition():
    g = torch.Generator().manual_seed(5)
    D, h, w, K, C = 6, 7, 9, 3, 4
    q = F.normalize(torch.randn(D, h, w, generator=g), dim=0)
    ctx = F.normalize(torch.randn(K, D, h, w, generator=g), dim=1)
    lab = torch.softmax(torch.randn(K, C, h, w, generator=g), 1)
    want = ref_knn_step(q, ctx, lab, 2, 5, 0.1)
    assert torch.allclose(probe.knn_rule(q, ctx, lab, radius=2, topk=5, temperature=0.1), want, atol=1e-5)
    for tile in (1, 3, 4, 16):
        assert torch.allclose(probe.knn_step(q, ctx, lab, radius=2, topk=5, temperature=0.1, tile=tile), want, atol=1e-5)


def test_local_window_propagation_equals_the_official_unfold_formulation():
    g = torch.Generator().manual_seed(0)
    T, D, h, w, C = 6, 16, 13, 17, 3
    feats = F.normalize(torch.randn(T, D, h, w, generator=g), dim=1)
    first = F.one_hot(torch.randint(0, C, (h, w), generator=g), C).permute(2, 0, 1).float()
    kw = dict(n_context=3, radius=3, topk=5, temperature=0.1)
    local = probe.propagate(feats, first, tile=4, **kw)
    dense = probe.propagate(feats, first, step=probe.knn_rule, **kw)
    assert torch.allclose(local, dense, atol=1e-5)
    assert all(torch.equal(probe.soft_to_labels(a, (26, 34)), probe.soft_to_labels(b, (26, 34)))
               for a, b in zip(local, dense))


def test_window_is_replicate_padded_at_the_border():
    # a key identical to the corner query exists only outside the image under replication:
    # with one candidate (top-1), the corner takes the border pixel's label through padding.
    D, h, w = 4, 6, 6
    q = F.normalize(torch.randn(D, h, w, generator=torch.Generator().manual_seed(3)), dim=0)
    ctx = q[None].clone()
    lab = torch.zeros(1, 2, h, w)
    lab[0, 1] = 1.0
    out = probe.knn_step(q, ctx, lab, radius=2, topk=3, temperature=1e-3, tile=4)
    ref = probe.knn_rule(q, ctx, lab, 2, 3, 1e-3)
    assert torch.allclose(out, ref, atol=1e-5)


def test_full_propagation_sums_the_sources_and_shares_the_context():
    g = torch.Generator().manual_seed(1)
    T, h, w, C = 7, 9, 11, 3
    enc = F.normalize(torch.randn(T, 8, h, w, generator=g), dim=1)
    dec = F.normalize(torch.randn(T, 5, h, w, generator=g), dim=1)
    first = F.one_hot(torch.randint(0, C, (h, w), generator=g), C).permute(2, 0, 1).float()
    kw = dict(radius=2, topk=4, temperature=0.1)
    soft = probe.propagate([enc, dec], first, n_context=2, **kw)
    for t in range(1, T):    # frame t = sum over sources of one step on the same context labels
        ids = sorted({0, t - 2, t - 1} - {-1})                 # frame 0 and the 2 latest frames
        ctx = soft[ids]
        want = probe.knn_rule(enc[t], enc[ids], ctx, 2, 4, 0.1) + probe.knn_rule(dec[t], dec[ids], ctx, 2, 4, 0.1)
        assert torch.allclose(soft[t], want, atol=1e-5)


def test_static_video_propagation_reproduces_first_mask():
    g = torch.Generator().manual_seed(1)
    D, h, w, C = 32, 20, 24, 4
    f = F.normalize(torch.randn(D, h, w, generator=g), dim=1)
    labels = torch.randint(0, C, (h, w), generator=g)
    soft = probe.propagate(f.expand(10, -1, -1, -1), F.one_hot(labels, C).permute(2, 0, 1).float())
    for s in soft:
        assert torch.equal(probe.soft_to_labels(s, (h, w)), labels)


def test_davis_frames_and_grid_follow_the_official_resizing():
    import evaldata
    assert evaldata.patch_hw(480, 854, 476) == (476, 840)            # PatchResample
    assert evaldata.patch_hw(854, 480, 476) == (840, 476)
    assert probe.grid_hw(476, 840, 60) == (60, 105)                    # _rescale_grid: int()
    assert probe.grid_hw(34, 60, 60) == (60, 105)                      # the encoder grid agrees


# --- end to end on a tiny synthetic set (in process: no interpreter start per run) ---

@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    import data
    root = tmp_path_factory.mktemp("synth")
    data.write_synthetic(root, videos=3, frames=4, size=112, seed=0)
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A checkpoint as train.py writes it (config + decoder), of a tiny random model."""
    import model
    cfg = {"backbone": "dinov2_vits14", "weights": "none", "preset": "tiny", "seed": 0}
    lila = model.build_lila(**cfg)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    torch.save({"decoder": lila.decoder.state_dict(), "config": cfg, "step": 1}, path)
    return str(path)


TINY = ["--size", "112", "--device", "cpu"]
NONE = ["--ckpt", "none", "--preset", "tiny", "--weights", "none"] + TINY
QUICK = {"normals": ["--epochs", "1", "--batch", "4", "--repeat", "1"], "semseg": ["--epochs", "1", "--batch", "4"],
         "fast": ["--protocol", "fast", "--probe-steps", "30", "--pixels", "256"]}


def run(*argv):
    """probe.main in this process -> (metrics, results.json, stdout)."""
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        m = probe.main([str(a) for a in argv])
    out = argv[list(argv).index("--out") + 1]
    return m, json.load(open(os.path.join(out, "results.json"))), buf.getvalue()


@pytest.mark.parametrize("cmd,extra,keys", [
    ("vos-knn", ["--grid", "28"], ["J", "F", "JF"]),
    ("vos-lp", ["--lp-steps", "20"], ["J", "F", "JF"]),
    ("normals", QUICK["normals"], ["rmse", "under_11.25", "under_22.5", "under_30"]),
    ("normals", QUICK["fast"], ["rmse", "under_30"]),
    ("semseg", QUICK["semseg"], ["miou", "pixel_acc"]),
    ("semseg", QUICK["fast"], ["miou", "pixel_acc"]),
])
def test_probe_with_a_checkpoint_reads_both_sources_and_writes_results(synth, ckpt, tmp_path, cmd, extra, keys):
    m, res, out = run(cmd, "--data", synth, "--ckpt", ckpt, *TINY, *extra, "--out", tmp_path)
    assert all(math.isfinite(m[k]) for k in keys) and res["metrics"][keys[0]] == m[keys[0]]
    cfg = res["config"]
    assert cfg["features"] == "full" and cfg["preset"] == "tiny" and cfg["weights"] == "none"
    assert out.count("config:") == 1 and '"preset": "tiny"' in out and '"paper"' not in out
    if cmd == "vos-knn":
        im = Image.open(tmp_path / "synth0000" / "00003.png")
        assert im.mode == "P" and im.size == (112, 112)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_encoder_is_the_baseline_without_a_checkpoint(synth, tmp_path):
    m, res, _ = run("vos-knn", "--data", synth, *NONE, "--grid", "14", "--out", tmp_path)
    assert res["config"]["features"] == "encoder" and 0 <= m["JF"] <= 1


def test_zeroshot_on_random_text_embeddings_reports_seen_unseen_and_harmonic(synth, tmp_path):
    text = tmp_path / "text.npy"
    np.save(text, np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32))
    m, res, _ = run("zeroshot", "--data", synth, *NONE, "--features", "full", "--text-embeddings", text,
                    "--unseen", "2", *QUICK["semseg"], "--out", tmp_path / "o")
    s, u, hm = m["miou_seen"], m["miou_unseen"], m["miou_harmonic"]
    assert all(math.isfinite(v) and 0 <= v <= 100 for v in (s, u, hm))
    assert hm == pytest.approx(2 * s * u / (s + u) if s + u else 0.0)


def test_official_protocol_resumes_from_its_state(synth, tmp_path):
    args = ["semseg", "--data", synth, *NONE, "--head", "linear", "--batch", "4", "--out", tmp_path]
    run(*args, "--epochs", "1")
    m, _, out = run(*args, "--epochs", "2")
    assert "resuming" in out and [h["epoch"] for h in m["history"]] == [1, 2]
    with pytest.raises(ValueError, match=r"other settings .*'probe_lr': \(0.001, 0.1\)"):   # refused, saying which
        run(*args, "--epochs", "3", "--probe-lr", "0.1")


def test_pca_orders_frames_numerically_and_shows_both_sources(ckpt, tmp_path):
    d = tmp_path / "frames"
    d.mkdir()
    for i in range(12):                                  # 0.jpg ... 11.jpg, frame i is grey 20 i
        Image.fromarray(np.full((56, 56, 3), 20 * i, np.uint8)).save(d / f"{i}.jpg")
    m, _, _ = run("pca", "--frames", d, "--ckpt", ckpt, *TINY, "--size", "56", "--max-frames", "2", "--out", tmp_path / "o")
    png = np.asarray(Image.open(m["png"]))
    left, gap = probe.PCA_LABEL_W, extract.GAP            # labels on the left, gaps between cells
    assert png.shape[:2] == (3 * 56 + 2 * gap, left + 2 * 56 + gap) and m["rows"] == ["frames", "encoder", "decoder"]
    assert abs(int(png[28, left + 56 + gap + 28, 0]) - 220) <= 3   # the last frame is 11.jpg, not 9.jpg
    assert (png[:, left + 56:left + 56 + gap] == 255).all()        # a white gap between the frames
    assert (png[56:56 + gap, left:] == 255).all()                  # and between the rows
    assert png[:56, :left].min() < 128                              # the row's label is drawn
    assert all(np.isfinite(v).all() for v in m["explained_variance"].values())


def davis2016(synth, root):
    """The synthetic set as DAVIS-2016: object 1 as a 0/255 grey mask, ImageSets/480p/val.txt."""
    shutil.copytree(synth / "JPEGImages", root / "JPEGImages")
    lines = []
    for seq in sorted(os.listdir(synth / "Annotations/480p")):
        os.makedirs(root / "Annotations/480p" / seq)
        for f in sorted(os.listdir(synth / "Annotations/480p" / seq)):
            m = np.asarray(Image.open(synth / "Annotations/480p" / seq / f)) == 1
            Image.fromarray((m * 255).astype(np.uint8), mode="L").save(root / "Annotations/480p" / seq / f)
            lines.append(f"/JPEGImages/480p/{seq}/{f[:-4]}.jpg /Annotations/480p/{seq}/{f}")
    os.makedirs(root / "ImageSets/480p")
    (root / "ImageSets/480p/val.txt").write_text("\n".join(lines) + "\n")


def test_davis2016_binary_masks_are_one_object_per_sequence(synth, tmp_path):
    davis2016(synth, tmp_path / "d16")
    m, _, out = run("vos-knn", "--data", tmp_path / "d16", *NONE, "--grid", "14", "--out", tmp_path / "o")
    assert m["objects"] == m["scored"] == 3 and m["masks"].startswith("binary") and "DAVIS-2016" in out
    assert 0 <= m["JF"] <= 1


# --- every default is the official one (lila/configs/eval.yaml, eval_*.py, probes/*.py) ---

def defaults(fn):
    import inspect
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


# command -> the resolved settings of `probe.py CMD --data ROOT` (the official values, each cited)
OFFICIAL_CLI = {
    "vos-knn": dict(size=476,            # eval_vosknn.eval_sequence: PatchResample(..., 476)
                    grid=60, context=7,  # eval.yaml vos_knn: feat_grid_size 60, context_size 7
                    radius=12, topk=5,   # attn_window 25 = 2 * 12 + 1, num_nn 5
                    temperature=0.1,     # temp 0.1
                    norm_mask=0, void="background",   # no DINO min-max; davis_eval: 255 -> 0
                    features="encoder", ckpt="none", backbone="dinov2_vits14", preset="paper"),
    "vos-lp": dict(size=476,             # deviation kept: eval.yaml resize_input_size 224 (GUIDE)
                   lp_steps=2000, lp_lr=5e-4, lp_weight_decay=1e-4,   # eval.yaml vos: AdamW
                   lp_optimizer="adamw", features="encoder"),
    "normals": dict(size=504, train_size=448,   # eval_norml.py: NormalsDataset 448 train / 504 val
                    head="conv",                 # LinearCat(kernel_size=5) on the decoder
                    epochs=10, batch=96, probe_lr=1e-3,   # eval.yaml eval: num_epochs, batch_size, lr
                    probe_weight_decay=1e-2,     # AdamW(lr=...) without weight_decay: torch's 1e-2
                    protocol="official", repeat=None, micro_batch=0),
    "semseg": dict(size=224, train_size=224, head="attention",   # SegDataset 224 crops, AttentionProbe
                   epochs=10, batch=96, probe_lr=1e-3, probe_weight_decay=1e-2),
    "zeroshot": dict(size=224, train_size=224, head="zeroshot", epochs=10, batch=96, probe_lr=1e-3,
                     probe_weight_decay=1e-5),   # eval_openseg.py: AdamW(weight_decay=eval.weight_decay)
    "pca": dict(size=476, max_frames=8, pca_samples=200000),
}


@pytest.mark.parametrize("cmd", list(OFFICIAL_CLI))
def test_every_cli_default_is_the_official_value(cmd, synth, tmp_path):
    a = probe.parse_args([cmd, "--frames", str(tmp_path)] if cmd == "pca" else [cmd, "--data", str(synth)])
    assert {k: getattr(a, k) for k in OFFICIAL_CLI[cmd]} == OFFICIAL_CLI[cmd]
    ck = probe.parse_args([cmd, "--data", str(synth), "--ckpt", "x.pt"]) if cmd != "pca" else None
    assert ck is None or ck.features == "full"        # alpha_enc = alpha_dec = 1: both sources summed


def test_every_method_default_is_the_official_value():
    assert defaults(probe.knn_rule) == dict(radius=12, topk=5, temperature=0.1)
    assert defaults(probe.knn_step) == dict(radius=12, topk=5, temperature=0.1, tile=8)
    assert defaults(probe.propagate) == dict(n_context=7, step=None, progress=False)
    assert defaults(probe.frame_jf) == dict(bound_th=0.008)                  # davis2017 db_eval_boundary
    assert defaults(probe.davis_jf) == dict(bound_th=0.008, void="background", chunk=16)
    assert defaults(probe.soft_to_labels) == dict(norm_mask=False)
    assert defaults(probe.davis_val) == dict(videos=6, kind="lp", size=None, device="cpu", progress=False, plan=None)
    assert probe.TRAIN_VAL_SEQUENCES == ("bike-packing", "india", "dog", "motocross-jump", "shooting",
                                         "horsejump-high")               # configs/train_ytvos.yaml eval_vos
    assert probe.grid_hw(480, 854, 60) == (60, 106) and probe.grid_hw(854, 480, 60) == (106, 60)


# --- davis_val: validation during training, through the vos-lp / vos-knn code ---

@pytest.fixture(scope="module")
def tiny_lila():
    import model
    return model.build_lila(backbone="dinov2_vits14", weights="none", preset="tiny", seed=0)


def test_davis_val_knn_is_the_vos_knn_number_on_the_same_sequences(synth, tiny_lila, tmp_path):
    m, _, _ = run("vos-knn", "--data", synth, *NONE, "--features", "decoder", "--grid", "28", "--out", tmp_path)
    tiny_lila.train()
    v = probe.davis_val(tiny_lila, synth, videos=3, kind="knn", size=112, grid=28)
    assert v["sequences"] == ["synth0000", "synth0001", "synth0002"] and tiny_lila.training   # mode restored
    assert (v["jf"], v["j"], v["f"]) == (m["JF"], m["J"], m["F"])   # square 112 views = the CLI's 112 frames
    assert probe.davis_val(tiny_lila, synth, videos=2, kind="knn", size=112, grid=28)["sequences"] == \
        ["synth0000", "synth0001"]


def test_davis_val_lp_is_the_official_trainers_check(synth, tiny_lila, monkeypatch):
    seen = {}
    real = probe.lp_sequence

    def spy(args, lila, x, first, n_cls):
        seen.update(shape=tuple(x.shape[-2:]), opt=args.lp_optimizer, lr=args.lp_lr, wd=args.lp_weight_decay,
                    steps=args.lp_steps, features=args.features)
        return real(args, lila, x, first, n_cls)
    monkeypatch.setattr(probe, "lp_sequence", spy)
    v = probe.davis_val(tiny_lila, synth, videos=1, kind="lp", lp_steps=5)
    assert v["sequences"] == ["synth0000"] and 0 <= v["jf"] <= 1
    # train_lila.py EvalVOS: decoder only, Adam lr 3e-4 wd 1e-4, on 224 x 224 views (VideoDataset tf_A)
    assert seen == dict(shape=(224, 224), opt="adam", lr=3e-4, wd=1e-4, steps=5, features="decoder")
    assert probe.parse_args(["vos-lp", "--data", str(synth)]).lp_steps == 2000
    with pytest.raises(ValueError, match="unknown setting"):
        probe.davis_val(tiny_lila, synth, kind="lp", lp_stpes=5)


def test_davis_val_picks_the_official_six_sequences_when_the_root_has_them(tmp_path, tiny_lila):
    import data
    root = tmp_path / "davis"
    names = data.write_synthetic(root, videos=7, frames=3, size=56, seed=0)
    order = ["aaa"] + list(probe.TRAIN_VAL_SEQUENCES)
    for sub in ("JPEGImages/480p", "Annotations/480p"):
        for old, new in zip(names, order):
            os.rename(root / sub / old, root / sub / new)
    (root / "ImageSets/2017/val.txt").write_text("\n".join(order) + "\n")
    v = probe.davis_val(tiny_lila, root, videos=2, kind="knn", size=56, grid=8)
    assert v["sequences"] == sorted(probe.TRAIN_VAL_SEQUENCES[:2])       # not "aaa", the first of val.txt


def test_square_view_is_the_official_short_side_resize_and_centre_crop():
    rgb = np.zeros((2, 48, 96, 3), np.uint8)
    rgb[:, :, 40:56] = 255                                    # a bright band in the middle
    masks = [np.zeros((48, 96), np.int64)] * 2
    masks[0][:, 40:56] = 1
    x, m = probe.square_view(rgb, masks, 24)                  # 48x96 -> 24x48 -> centre 24x24 (cols 12..35)
    assert x.shape == (2, 3, 24, 24) and m.shape == (2, 24, 24)
    assert m[0, 0].tolist() == [0] * 8 + [1] * 8 + [0] * 8 and x[0, 0, 0, 12] > 0.9 > x[0, 0, 0, 3]


# --- bad input: one clear line, or a counted skip ---

def copy_davis(synth, root):
    for sub in ("JPEGImages", "Annotations"):
        shutil.copytree(synth / sub, root / sub)
    return root


def test_missing_first_frame_mask_is_a_clear_error(synth, tmp_path):
    root = copy_davis(synth, tmp_path / "d")
    os.remove(root / "Annotations/480p/synth0001/00000.png")
    with pytest.raises(ValueError, match="no first-frame mask"):
        run("vos-knn", "--data", root, *NONE, "--grid", "14", "--out", tmp_path / "o")


def edit_davis(root, what):
    seq = root / "Annotations/480p/synth0001"
    if what == "rgb":                        # a colour-rendered mask
        Image.open(seq / "00000.png").convert("RGB").save(seq / "00000.png")
    elif what == "mask_size":                # a later mask of another size
        Image.open(seq / "00002.png").resize((56, 56), Image.NEAREST).save(seq / "00002.png")
    elif what == "frame_size":               # a later frame of another size
        p = root / "JPEGImages/480p/synth0001/00002.jpg"
        Image.open(p).resize((98, 98)).save(p)
    elif what == "no_object":                # every first mask empty
        for s in os.listdir(root / "Annotations/480p"):
            p = root / "Annotations/480p" / s / "00000.png"
            im = Image.open(p)
            im2 = Image.fromarray(np.zeros_like(np.asarray(im)), mode="P")
            im2.putpalette(im.getpalette())
            im2.save(p)


@pytest.mark.parametrize("what,message", [
    ("rgb", "colour mask"), ("mask_size", "mask is 56x56"), ("frame_size", "frame is 98x98"),
    ("no_object", "no object in any first-frame mask")])
def test_bad_davis_input_is_one_clear_error(synth, tmp_path, what, message):
    root = copy_davis(synth, tmp_path / "d")
    edit_davis(root, what)
    with pytest.raises(ValueError, match=message):
        run("vos-knn", "--data", root, *NONE, "--grid", "14", "--out", tmp_path / "o")


def test_two_frame_video_is_a_counted_skip(synth, tmp_path):
    root = copy_davis(synth, tmp_path / "d")
    for sub in ("JPEGImages", "Annotations"):
        for f in ("00002", "00003"):
            for p in (root / sub / "480p/synth0002").glob(f + ".*"):
                p.unlink()
    m, _, out = run("vos-knn", "--data", root, *NONE, "--grid", "14", "--out", tmp_path / "o")
    assert m["skipped"]["two_frames"] == 1 and m["scored"] == 2 and "synth0002: not scored" in out


def test_too_few_classes_for_the_labels_is_a_clear_error(synth, tmp_path):
    with pytest.raises(ValueError, match="label 3, but there are only 2 classes"):
        run("semseg", "--data", synth, *NONE, "--num-classes", "2", *QUICK["fast"], "--out", tmp_path)


@pytest.mark.parametrize("flags,message", [
    (["--tile", "0"], "--tile 0"), (["--topk", "0"], "--topk 0"), (["--size", "0"], "--size 0"),
    (["--size", "100"], "--size 100: must be a positive multiple of 14"), (["--temperature", "0"], "--temperature 0.0"),
    (["--temperature", "nan"], "--temperature nan"), (["--radius", "-1"], "--radius -1"),
    (["--grid", "0"], "--grid 0"), (["--val-videos", "-1"], "--val-videos -1"),
    (["--topk", "10", "--radius", "1"], "--topk 10: above the 9 candidates"), (["--epochs", "0"], "--epochs 0"),
    (["--features", "both"], "--features both"), (["--probe-lr", "-1"], "--probe-lr -1.0"),
])
def test_flags_are_range_checked_up_front(synth, flags, message, capsys):
    with pytest.raises(SystemExit):
        probe.parse_args(["vos-knn", "--data", str(synth)] + flags)
    assert f"probe.py: error: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--max-frames", "0"], "--max-frames 0"), (["--pca-samples", "1"], "--pca-samples 1"),
    (["--pca-samples", "0"], "--pca-samples 0")])
def test_pca_flags_are_range_checked(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        probe.parse_args(["pca", "--frames", str(tmp_path)] + flags)
    assert f"probe.py: error: {message}" in capsys.readouterr().err


def test_out_that_is_a_file_is_refused_before_the_probe_runs(synth, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    for out, message in ((tmp_path / "f", "is a file"), (tmp_path / "f" / "sub" / "dir", "cannot create the folder")):
        with pytest.raises(SystemExit):
            probe.parse_args(["vos-knn", "--data", str(synth), "--out", str(out)])
        assert message in capsys.readouterr().err
    probe.parse_args(["vos-knn", "--data", str(synth), "--out", str(tmp_path / "new" / "o")])
    assert not (tmp_path / "new").exists()               # checking the flags creates nothing


def test_train_data_equal_to_data_is_refused(synth, capsys):
    with pytest.raises(SystemExit):
        probe.parse_args(["normals", "--data", str(synth), "--train-data", str(synth) + "/"])
    assert "scored on its training frames" in capsys.readouterr().err


def test_cli_error_is_one_line_without_traceback(synth, tmp_path):
    root = copy_davis(synth, tmp_path / "d")
    edit_davis(root, "rgb")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "probe.py"), "vos-knn", "--data", str(root),
                        *NONE, "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120,
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("probe.py: error: ") and "colour mask" in r.stderr


def test_no_file_or_help_cites_an_internal_document(capsys):
    for f in ("probe.py", "evaldata.py", "dense_probes.py"):
        assert "DESIGN" not in open(os.path.join(ROOT, f)).read(), f
    with pytest.raises(SystemExit):
        probe.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--features" in out and "DESIGN" not in out


# --- results never lost or stale; no silent wrong numbers; bounds; the whole message ---

def test_a_second_probe_on_a_folder_in_use_is_refused_with_the_whole_message(synth, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); f.write('pid 1 on elsewhere'); f.flush(); "
                               "print('held', flush=True); time.sleep(60)", str(out / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runs.UserError, match="in use by another probe.py run"):
            run("vos-knn", "--data", synth, *NONE, "--grid", "14", "--out", out)
        r = subprocess.run([sys.executable, os.path.join(ROOT, "probe.py"), "vos-knn", "--data", str(synth), *NONE,
                            "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert "in use by another probe.py run" in r.stderr and "pass another --out" in r.stderr   # both lines
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "results.json").exists()


def test_an_earlier_probes_files_are_kept_together_in_a_subfolder(synth, tmp_path):
    m1, _, _ = run("vos-knn", "--data", synth, *NONE, "--grid", "14", "--out", tmp_path)
    seq = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())[0]
    masks1 = {p.name: p.read_bytes() for p in (tmp_path / seq).iterdir()}
    m2, res, out = run("vos-knn", "--data", synth, *NONE, "--grid", "14", "--topk", "3", "--out", tmp_path)
    kept = json.load(open(tmp_path / "earlier.1" / "results.json"))
    assert kept["metrics"]["JF"] == m1["JF"] and kept["config"]["topk"] == 5 and res["config"]["topk"] == 3
    assert {p.name: p.read_bytes() for p in (tmp_path / "earlier.1" / seq).iterdir()} == masks1   # its masks too
    assert "kept together in" in out and "earlier.1" in out


def test_a_checkpoint_rewritten_at_the_same_path_does_not_resume_the_old_probe(synth, ckpt, tmp_path):
    import model
    path = tmp_path / "ckpt.pt"
    shutil.copy(ckpt, path)
    args = ["semseg", "--data", synth, "--ckpt", path, *TINY, "--features", "decoder", "--head", "linear",
            "--batch", "4", "--out", tmp_path / "o"]
    run(*args, "--epochs", "1")
    other = model.build_lila(backbone="dinov2_vits14", weights="none", preset="tiny", seed=1)   # retrained
    torch.save({"decoder": other.decoder.state_dict(), "config": torch.load(path)["config"], "step": 2}, path)
    with pytest.raises(ValueError, match="other settings .*'ckpt_sha256'"):
        run(*args, "--epochs", "2")
    kept = tmp_path / "o" / "earlier.1" / "results.json"       # the first probe's, kept together
    assert json.load(open(kept))["config"]["ckpt_sha256"] == probe.model.file_sha256(ckpt)


@pytest.mark.parametrize("flags,message", [
    (["--grid", "5000"], "--grid 5000: at most 256"), (["--radius", "100"], "--radius 100: at most 32"),
    (["--num-classes", "100000"], "--num-classes 100000: at most 1024"), (["--size", "14014"], "--size 14014: at most 2016"),
    (["--context", "1000"], "--context 1000: at most 64"), (["--epochs", "100000"], "--epochs 100000: at most 1000"),
])
def test_settings_far_beyond_sense_are_refused_with_the_limit_and_why(synth, flags, message, capsys):
    with pytest.raises(SystemExit):
        probe.parse_args(["vos-knn", "--data", str(synth)] + flags)
    err = capsys.readouterr().err
    assert f"probe.py: error: {message} (" in err


def test_a_split_larger_than_the_data_is_refused_not_sliced(synth, tmp_path):
    with pytest.raises(ValueError, match="--val-videos 5: .* has 3 videos"):
        run("semseg", "--data", synth, *NONE, *QUICK["fast"], "--val-videos", "5", "--out", tmp_path)


def test_vos_knn_shows_a_progress_bar_per_sequence_without_a_terminal(synth, tmp_path, capfd):
    run("vos-knn", "--data", synth, *NONE, "--grid", "14", "--out", tmp_path)
    err = capfd.readouterr().err
    assert "vos-knn: 100%" in err and "3/3" in err and "synth0002" in err


def test_every_line_of_an_error_is_printed(monkeypatch, capsys):
    def boom(argv=None):
        raise ValueError("probe.py: first line\nsecond line: what to do")
    monkeypatch.setattr(probe, "main", boom)
    with pytest.raises(SystemExit) as e:
        probe.cli([])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "first line\nsecond line: what to do" in err


@pytest.mark.parametrize("rows,unseen,message", [
    (5000, "2", "5000 classes of width 16; expected 2..1024"), (4, "-1", "--unseen -1: ids must be classes 0..3")])
def test_zeroshot_text_embeddings_and_unseen_ids_are_bounded(synth, tmp_path, rows, unseen, message):
    text = tmp_path / "text.npy"
    np.save(text, np.ones((rows, 16), np.float32))
    with pytest.raises(ValueError, match=message):
        run("zeroshot", "--data", synth, *NONE, "--text-embeddings", text, "--unseen", unseen, "--out", tmp_path / "o")


def test_davis_val_on_bad_input_raises_an_error_not_system_exit(tiny_lila, tmp_path, synth):
    for root, kw, message in ((tmp_path / "nope", {}, "no such folder"), (synth, dict(videos=0), "videos 0"),
                              (synth, dict(kind="svm"), "kind 'svm'")):
        with pytest.raises(ValueError, match=message):
            probe.davis_val(tiny_lila, root, **kw)


def test_an_empty_sequence_list_is_one_clear_error(synth, tmp_path):
    root = copy_davis(synth, tmp_path / "d")
    os.makedirs(root / "ImageSets/2017")
    (root / "ImageSets/2017/val.txt").write_text("\n")
    with pytest.raises(ValueError, match="names no sequence"):
        run("vos-knn", "--data", root, *NONE, "--out", tmp_path / "o")


def test_image_lists_are_checked_and_refused_where_they_do_not_apply(synth, tmp_path, capsys):
    for flag in ("--train-list", "--val-list", "--text-embeddings"):
        with pytest.raises(SystemExit):
            probe.parse_args(["semseg", "--data", str(synth), flag, str(tmp_path / "none.txt")])
        assert f"{flag} {tmp_path / 'none.txt'}: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        probe.parse_args(["semseg", "--data", str(synth), "--out", " "])
    assert "--out is empty" in capsys.readouterr().err
    (tmp_path / "ids.txt").write_text("synth0000\n")
    with pytest.raises(ValueError, match="--train-list / --val-list name COCO-Stuff images"):
        run("semseg", "--data", synth, *NONE, *QUICK["fast"], "--train-list", tmp_path / "ids.txt", "--out", tmp_path / "o")


def test_a_full_disk_at_results_json_is_one_error_and_leaves_no_tmp(synth, tmp_path, monkeypatch):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(probe.runs.os, "fsync", full)     # the disk fills while results.json is written
    with pytest.raises(probe.runs.UserError, match=r"cannot write .*results.json \(No space left on device.*; the metrics"):
        run("vos-knn", "--data", synth, *NONE, "--grid", "14", "--out", tmp_path)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_an_os_error_is_one_line_naming_the_file(monkeypatch, capsys):
    def denied(argv=None):
        raise PermissionError(13, "Permission denied", "/data/out/seq/00001.png")
    monkeypatch.setattr(probe, "main", denied)
    with pytest.raises(SystemExit):
        probe.cli([])
    assert capsys.readouterr().err.strip() == "probe.py: error: /data/out/seq/00001.png: Permission denied"


def test_each_subcommand_has_its_own_help_with_its_options_and_defaults(capsys):
    helps = {}
    for cmd in ("vos-knn", "normals"):
        with pytest.raises(SystemExit):
            probe.parse_args([cmd, "--help"])
        helps[cmd] = " ".join(capsys.readouterr().out.split())   # argparse wraps lines
    knn, normals = helps["vos-knn"], helps["normals"]
    assert knn != normals
    assert probe.COMMANDS["vos-knn"][1].split(":")[0] in knn and "Scored by the angular RMSE" in normals
    assert "--grid GRID k-NN feature grid short side (paper 60) (default: 60)" in knn and "--grid" not in normals
    assert "(default: 476)" in knn and "--epochs" not in knn and "--lp-steps" not in knn
    assert "--epochs EPOCHS official: epochs (paper 10) (default: 10)" in normals and "(default: 504)" in normals
    assert "--head HEAD" in normals and "(default: conv)" in normals and "--text-embeddings" not in normals
    # flags of other subcommands are still accepted, as before
    assert probe.parse_args(["vos-knn", "--data", os.path.dirname(__file__), "--epochs", "3"]).epochs == 3


def test_an_unscored_sequence_is_counted_on_the_line_that_reports_jf(synth, tmp_path):
    root = tmp_path / "davis"
    shutil.copytree(synth, root)
    seq = sorted(os.listdir(root / "JPEGImages" / "480p"))[-1]
    for sub in ("JPEGImages", "Annotations"):          # the last sequence: 2 frames, not scored
        for f in sorted(os.listdir(root / sub / "480p" / seq))[2:]:
            os.remove(root / sub / "480p" / seq / f)
    m, res, out = run("vos-knn", "--data", root, *NONE, "--grid", "14", "--out", tmp_path / "o")
    line = [x for x in out.splitlines() if x.startswith("vos-knn: ")][0]
    assert f"scored {m['scored']}" in line and "not_scored 1" in line and res["metrics"]["not_scored"] == 1


def test_the_probe_state_resumes_for_another_spelling_of_the_data_folder(synth, tmp_path):
    args = [*NONE, "--head", "linear", "--batch", "4", "--out", tmp_path]
    run("semseg", "--data", synth, *args, "--epochs", "1")
    m, _, out = run("semseg", "--data", f"{synth}{os.sep}", *args, "--epochs", "2")   # `data/` is `data`
    assert "resuming" in out and [h["epoch"] for h in m["history"]] == [1, 2]


def test_a_full_disk_under_a_probe_names_the_file(synth, tmp_path, monkeypatch, capsys):
    import errno
    from PIL import Image

    def full(self, fp, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(SystemExit) as e:
        probe.cli(["vos-knn", "--data", str(synth), *NONE, "--grid", "14", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.startswith(f"probe.py: error: cannot write {tmp_path}{os.sep}") \
        and ".png (No space left on device" in err


def test_the_probe_state_is_keyed_by_input_contents_and_the_heads_shape(synth, tmp_path):
    """Rewritten in place, same names: text embeddings (zeroshot) and class maps that add a
    class (semseg: a head of another shape). Each is refused naming what differs."""
    text = tmp_path / "text.npy"
    np.save(text, np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32))
    zs = ["zeroshot", "--data", synth, *NONE, "--text-embeddings", text, "--unseen", "2",
          *QUICK["semseg"], "--out", tmp_path / "zs"]
    run(*zs)
    np.save(text, np.random.default_rng(1).normal(size=(4, 16)).astype(np.float32))
    with pytest.raises(ValueError, match="other settings .*'inputs_sha256'"):
        run(*zs[:-2], "--epochs", "2", "--out", tmp_path / "zs")
    root = tmp_path / "data"
    shutil.copytree(synth, root)
    ss = ["semseg", "--data", root, *NONE, "--head", "linear", "--batch", "4", "--out", tmp_path / "ss"]
    run(*ss, "--epochs", "1")
    from PIL import Image
    png = sorted((root / "Classes").rglob("*.png"))[0]
    with Image.open(png) as im:
        ids, pal = np.array(im), im.getpalette()
    ids[0, 0] = ids.max() + 3                                  # a new class: a wider head
    out = Image.fromarray(ids.astype(np.uint8), mode="P")
    out.putpalette(pal)
    out.save(png)
    with pytest.raises(ValueError, match="other settings .*'num_classes'"):
        run(*ss, "--epochs", "2")
