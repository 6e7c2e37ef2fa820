"""Tests of dense_probes.py: each head against a slow, obvious loop reference on tiny inputs,
a full head equal to the sum of its encoder-only and decoder-only halves, micro-batches giving
the loss and gradient of one pass, the metrics against hand-computed values, and the fast
protocol's bilinear reading of the encoder grid equal to upsampling it."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import dense_probes as dp  # noqa: E402


# --- slow references, written from the definitions ---

def ref_resize(x, H, W):
    """Bilinear resize of (C, h, w), align_corners=False, one output pixel at a time: source
    coordinate (p + 0.5) * in / out - 0.5 (at least 0), its two neighbours, linear weights."""
    C, h, w = x.shape
    out = torch.zeros(C, H, W, dtype=torch.float64)
    for Y in range(H):
        for X in range(W):
            sy, sx = max((Y + 0.5) * h / H - 0.5, 0.0), max((X + 0.5) * w / W - 0.5, 0.0)
            y0, x0 = min(int(sy), h - 1), min(int(sx), w - 1)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            ly, lx = sy - y0, sx - x0
            out[:, Y, X] = ((1 - ly) * (1 - lx) * x[:, y0, x0] + (1 - ly) * lx * x[:, y0, x1]
                            + ly * (1 - lx) * x[:, y1, x0] + ly * lx * x[:, y1, x1])
    return out


def ref_conv(x, weight, bias):
    """Zero-padded 'same' convolution of (C_in, h, w) by (C_out, C_in, k, k), pixel by pixel."""
    C_out, _, k, _ = weight.shape
    _, h, w = x.shape
    r = k // 2
    out = torch.zeros(C_out, h, w, dtype=torch.float64)
    for y in range(h):
        for xx in range(w):
            acc = bias.double().clone() if bias is not None else torch.zeros(C_out, dtype=torch.float64)
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    if 0 <= y + dy < h and 0 <= xx + dx < w:
                        acc += weight[:, :, dy + r, dx + r].double() @ x[:, y + dy, xx + dx].double()
            out[:, y, xx] = acc
    return out


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- heads ---

@pytest.mark.parametrize("kernel,size", [(5, (6, 9)), (1, (7, 10))])
def test_linear_head_matches_convolution_loops(kernel, size):
    torch.manual_seed(0)
    E, D, C = 3, 4, 2
    enc, dec = rand(1, E, 2, 3, seed=1), rand(1, D, 6, 9, seed=2)
    head = dp.LinearHead(E, D, C, dec_kernel=kernel)
    got = head(enc, dec, size)[0].double()
    want = (ref_resize(ref_conv(enc[0], head.enc.weight, head.enc.bias), *size)
            + ref_resize(ref_conv(dec[0], head.dec.weight, head.dec.bias), *size))
    assert torch.allclose(got, want, atol=1e-5)


def test_attention_head_matches_per_class_per_head_loops():
    torch.manual_seed(0)
    E, D, C, heads = 3, 16, 3, 8
    enc, dec = rand(1, E, 2, 2, seed=1), rand(1, D, 8, 8, seed=2)
    head = dp.AttentionHead(E, D, C, heads=heads, downscale=4)
    got = head(enc, dec, (8, 8))[0].double()
    x = F.relu(dec[0]).double()                                        # (D, 8, 8)
    tokens = ref_resize(x, 2, 2).flatten(1).T                          # (4, D): pooled x4
    W = lambda lin: lin.weight.double()  # noqa: E731
    dh = D // heads
    want = ref_resize(ref_conv(enc[0], head.enc.weight, head.enc.bias), 8, 8)
    for c in range(C):
        q = W(head.attn.q) @ head.queries[0, c].double()
        k, v = tokens @ W(head.attn.k).T, tokens @ W(head.attn.v).T     # (4, D)
        mixed = torch.zeros(D, dtype=torch.float64)
        for h in range(heads):
            sl = slice(h * dh, (h + 1) * dh)
            a = torch.softmax(k[:, sl] @ q[sl] / math.sqrt(dh), 0)      # (4,)
            mixed[sl] = a @ v[:, sl]
        y = W(head.attn.proj) @ mixed + head.attn.proj.bias.double()    # (D,) the attended query
        want[c] += torch.einsum("dhw,d->hw", x, y)
    assert torch.allclose(got, want, atol=1e-4)


def test_zeroshot_head_matches_per_pixel_cosines():
    torch.manual_seed(0)
    E, D, T, C = 3, 4, 5, 3
    enc, dec, text = rand(1, E, 2, 2, seed=1), rand(1, D, 4, 4, seed=2), rand(C, T, seed=3)
    head = dp.ZeroShotHead(E, D, text).eval()
    bn = head.enc[0]
    bn.running_mean.copy_(rand(E, seed=4)), bn.running_var.copy_(rand(E, seed=5).abs() + 0.5)
    got = head(enc, dec, (4, 4))[0].double()
    t = F.normalize(text.double(), dim=1)
    def cos(x, weight):                                                 # (C_in, h, w) -> (C, h, w)
        p = ref_conv(x, weight, None)
        return torch.einsum("thw,ct->chw", p / p.norm(dim=0, keepdim=True), t)
    e = (enc[0].double() - bn.running_mean.double()[:, None, None]) / torch.sqrt(bn.running_var.double() + bn.eps)[:, None, None]
    e = e * bn.weight.double()[:, None, None] + bn.bias.double()[:, None, None]
    want = 100.0 * (cos(dec[0], head.dec.weight) + ref_resize(cos(e, head.enc[1].weight), 4, 4))
    assert torch.allclose(got, want, atol=1e-3)


@pytest.mark.parametrize("kind", ["linear", "conv", "attention", "zeroshot"])
def test_full_head_is_the_sum_of_its_encoder_and_decoder_halves(kind):
    torch.manual_seed(0)
    E, D, C = 6, 8, 4
    text = rand(C, 5, seed=9)
    full = dp.build_head(kind, E, D, C, text).eval()
    halves = [dp.build_head(kind, E, 0, C, text).eval(), dp.build_head(kind, 0, D, C, text).eval()]
    state = full.state_dict()
    for h in halves:                            # the halves take the full head's parameters
        h.load_state_dict({k: state[k] for k in h.state_dict()})
    enc, dec = rand(2, E, 3, 3, seed=1), rand(2, D, 12, 12, seed=2)
    with torch.no_grad():
        whole = full(enc, dec, (12, 12))
        parts = halves[0](enc, None, (12, 12)) + halves[1](None, dec, (12, 12))
    assert torch.allclose(whole, parts, atol=1e-5)


# --- losses and metrics ---

@pytest.mark.parametrize("task", ["normals", "semseg", "zeroshot"])
def test_micro_batches_give_the_loss_and_gradient_of_one_pass(task):
    torch.manual_seed(0)
    B, C = 4, 3 if task == "normals" else 5
    head = dp.LinearHead(3, 4, C)
    enc, dec = rand(B, 3, 2, 2, seed=1), rand(B, 4, 6, 6, seed=2)
    g = torch.Generator().manual_seed(3)
    if task == "normals":
        tgt = {"normals": F.normalize(rand(B, 3, 6, 6, seed=4), dim=1), "valid": torch.rand(B, 6, 6, generator=g) > 0.3}
    else:
        lab = torch.randint(0, C, (B, 6, 6), generator=g)
        tgt = {"labels": torch.where(torch.rand(B, 6, 6, generator=g) < 0.3, 255, lab)}
    seen = [0, 1, 3]
    counts = dp.batch_counts(task, tgt)
    grads = []
    for micro in (B, 1):
        head.zero_grad()
        total = 0.0
        for i in range(0, B, micro):
            part = {k: v[i:i + micro] for k, v in tgt.items()}
            loss = dp.combine(task, dp.loss_sums(task, head(enc[i:i + micro], dec[i:i + micro], (6, 6)), part, seen), counts)
            loss.backward()
            total += float(loss.detach())
        grads.append((total, [p.grad.clone() for p in head.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))


def test_zeroshot_loss_weights_cross_entropy_by_a_tenth_when_pixels_are_ignored():
    logits = rand(1, 3, 2, 2, seed=1)
    lab = torch.tensor([[[0, 1], [255, 2]]])
    seen = [0, 1]
    sums, counts = dp.loss_sums("zeroshot", logits, {"labels": lab}, seen), dp.batch_counts("zeroshot", {"labels": lab})
    ce = F.cross_entropy(logits, lab, ignore_index=255)
    p_seen = F.softmax(logits, 1)[0, :2, 1, 0].sum()
    assert float(dp.combine("zeroshot", sums, counts)) == pytest.approx(float(0.1 * ce + p_seen ** 2), rel=1e-5)


def test_segmentation_scores_count_only_classes_in_the_ground_truth():
    sc = dp.Scores("zeroshot", 4, unseen=(2,))
    gt = torch.tensor([[[0, 0, 1, 2]]])                  # class 3 is never in the ground truth
    pred = torch.tensor([[[0, 3, 1, 1]]])                # ... but predicted once
    sc.add(F.one_hot(pred, 4).permute(0, 3, 1, 2).float(), {"labels": gt})
    r = sc.result()
    iou = {0: 1 / 2, 1: 1 / 2, 2: 0.0}                   # tp / (gt + pred - tp)
    assert r["miou"] == pytest.approx(100 * sum(iou.values()) / 3) and r["classes"] == 3
    assert r["miou_seen"] == pytest.approx(50.0) and r["miou_unseen"] == 0.0 and r["miou_harmonic"] == 0.0
    assert r["pixel_acc"] == pytest.approx(50.0)


def test_normals_scores_are_per_image_means_and_skip_images_without_valid_pixels():
    sc = dp.Scores("normals")
    gt = torch.zeros(3, 3, 2, 2)
    gt[:, 2] = 1.0                                       # every normal faces the camera (z)
    pred = gt.clone()
    pred[1] = 0
    pred[1, 0] = 1.0                                     # image 1: 90 degrees off everywhere
    valid = torch.ones(3, 2, 2, dtype=torch.bool)
    valid[2] = False                                     # image 2: nothing to score
    sc.add(pred, {"normals": gt, "valid": valid})
    r = sc.result()
    assert r["rmse"] == pytest.approx(45.0, abs=1e-3) and r["under_30"] == pytest.approx(50.0)
    assert r["images"] == 2 and r["skipped_no_valid"] == 1


def test_bilinear_taps_read_the_upsampled_map():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(3, 4, 5, generator=g)                # (C, h, w)
    H, W = 14, 17
    up = F.interpolate(m[None], (H, W), mode="bilinear", align_corners=False)[0]
    ys, xs = torch.randint(0, H, (50,), generator=g), torch.randint(0, W, (50,), generator=g)
    idx, wts = dp.bilinear_taps(H, W, 4, 5, ys, xs)
    got = (m.flatten(1).T[idx] * wts[..., None]).sum(1)  # (50, C)
    assert torch.allclose(got, up[:, ys, xs].T, atol=1e-5)


def test_every_method_default_is_the_official_value():
    import inspect
    d = lambda fn: {k: p.default for k, p in inspect.signature(fn).parameters.items()  # noqa: E731
                    if p.default is not p.empty}
    assert d(dp.AttentionHead.__init__) == dict(heads=8, downscale=4)   # AttentionProbe, CrossAttention
    assert d(dp.CrossAttention.__init__) == dict(heads=8)
    assert d(dp.ZeroShotHead.__init__) == dict(logit_scale=pytest.approx(4.6052, abs=1e-4))  # ln 100
    assert d(dp.LinearHead.__init__) == dict(dec_kernel=1)             # the VOS probe: kernel_size=1
    assert dp.build_head("conv", 4, 4, 3).dec.kernel_size == (5, 5)    # normals: LinearCat default 5
    assert dp.build_head("conv", 4, 4, 3).dec.padding == (2, 2)
    assert d(dp.loss_sums) == dict(seen=None, eps=1e-4)                # angular_loss eps
    assert d(dp.combine) == dict(ce_weight=0.1)                        # eval_openseg: 0.1 * CE + neg
    assert d(dp.Scores.__init__) == dict(n_cls=None, unseen=(), thresholds=(11.25, 22.5, 30))
    assert dp.EVAL_SCALE == {"normals": 1.1, "semseg": 1.0, "zeroshot": 1.0}
    assert dp.BEST == {"normals": ("rmse", min), "semseg": ("miou", max), "zeroshot": ("miou_harmonic", max)}
    head = dp.AttentionHead(4, 16, 3)
    assert head.attn.q.bias is None and head.attn.proj.bias is not None         # qkv_bias=False
    zs = dp.ZeroShotHead(4, 6, torch.randn(3, 8))
    assert isinstance(zs.enc[0], torch.nn.BatchNorm2d) and zs.dec.bias is None and zs.enc[1].bias is None


def test_an_evaluation_without_valid_pixels_has_no_score_not_zero(capsys):
    sc = dp.Scores("semseg", 3)
    sc.add(torch.randn(1, 3, 2, 2), {"labels": torch.full((1, 2, 2), 255)})   # every label void
    r = sc.result()
    assert r["miou"] is None and r["pixel_acc"] is None and r["classes"] == 0
    assert "no valid pixels" in capsys.readouterr().err
    zs = dp.Scores("zeroshot", 3, unseen=(2,))
    zs.add(F.one_hot(torch.tensor([[[0, 1]]]), 3).permute(0, 3, 1, 2).float(), {"labels": torch.tensor([[[0, 1]]])})
    r = zs.result()                                      # no unseen class in the ground truth
    assert r["miou_seen"] == 100.0 and r["miou_unseen"] is None and r["miou_harmonic"] is None
    assert "no unseen class" in capsys.readouterr().err
    nm = dp.Scores("normals")
    nm.add(torch.randn(1, 3, 2, 2), {"normals": torch.randn(1, 3, 2, 2), "valid": torch.zeros(1, 2, 2, dtype=torch.bool)})
    r = nm.result()
    assert r["rmse"] is None and r["images"] == 0 and "no valid pixels" in capsys.readouterr().err

