"""Tests for incontext.py: ridge by Cholesky against float64 least squares, gradients,
recovery of exact linear cues, the L1 + edge loss against a slow loop, confidence masking,
degenerate and half-precision inputs, the ERM ablation.
Run: python -m pytest -q tests/test_incontext.py"""
import pytest
import torch
import torch.nn.functional as F

import incontext as ic


def _ridge_reference(X, Y, w, lam):
    """Slow, obvious reference: float64 least squares of the augmented system
    [sqrt(w/N) X; sqrt(lam) I] W = [sqrt(w/N) Y; 0], one batch element at a time."""
    out = []
    for x, y, c in zip(X.double(), Y.double(), w.double()):
        N, P = x.shape
        s = (c / N).sqrt()[:, None]
        A = torch.cat([s * x, lam ** 0.5 * torch.eye(P, dtype=torch.float64)])
        b = torch.cat([s * y, torch.zeros(P, y.shape[1], dtype=torch.float64)])
        out.append(torch.linalg.lstsq(A, b, driver="gelsd").solution)
    return torch.stack(out)


def _problem(B=3, N=200, P=9, K=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, N, P, generator=g, dtype=dtype)
    Y = torch.randn(B, N, K, generator=g, dtype=dtype)
    w = torch.rand(B, N, generator=g, dtype=dtype) * (torch.rand(B, N, generator=g) > 0.3)
    return X, Y, w


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("solver", ["cholesky", "lu", "lstsq"])
def test_ridge_equals_float64_lstsq_of_augmented_system(solver):
    X, Y, w = _problem()
    ref = _ridge_reference(X, Y, w, lam=0.1)
    W = ic.ridge_solve(X, Y, w, lam=0.1, solver=solver)
    assert W.shape == (3, 9, 4) and W.dtype == torch.float32
    assert _rel(W, ref) < 1e-5
    W64 = ic.ridge_solve(X.double(), Y.double(), w.double(), lam=0.1, solver=solver)
    assert W64.dtype == torch.float64 and _rel(W64, ref) < 1e-10


def test_ridge_residual_is_orthogonal_to_weighted_features():
    # Stationarity of the objective: X^T C (X W - Y) / N + lam W = 0.
    X, Y, w = _problem(dtype=torch.float64)
    W = ic.ridge_solve(X, Y, w, lam=0.1)
    N = X.shape[1]
    grad = X.transpose(1, 2) @ (w[..., None] * (X @ W - Y)) / N + 0.1 * W
    assert grad.abs().max() < 1e-12


def test_ridge_gradcheck_float64():
    X, Y, w = _problem(B=2, N=12, P=4, K=3, dtype=torch.float64)
    w = w + 0.1                                        # keep sqrt-free smoothness in w
    args = (X.requires_grad_(), Y.requires_grad_(), w.requires_grad_())
    assert torch.autograd.gradcheck(lambda x, y, c: ic.ridge_solve(x, y, c, lam=0.1), args)


def test_incontext_loss_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    B, D, K, H = 1, 3, 3, 8
    fc = torch.randn(B, D, H, H, generator=g, dtype=torch.float64, requires_grad=True)
    fq = torch.randn(B, D, H, H, generator=g, dtype=torch.float64, requires_grad=True)
    cc, cq = torch.randn(2, B, K, H, H, generator=g, dtype=torch.float64)
    conf = (torch.rand(B, 2, H, H, generator=g) > 0.3).double()
    fn = lambda a, b: ic.incontext_loss(b, a, cq, cc, conf, conf, pool=4)[0]
    assert torch.autograd.gradcheck(fn, (fc, fq))


def _linear_scene(B=2, D=16, K=5, H=32, seed=0, cell=4):
    """Features of two views and cues that are exactly one linear map of the features (plus
    bias), shared by both views. Features are smooth (constant on cell x cell
    blocks) like a decoder's, so pooling keeps their variance and lam = 0.1 shrinks little."""
    g = torch.Generator().manual_seed(seed)
    fc, fq = torch.randn(2, B, D, H // cell, H // cell, generator=g).repeat_interleave(
        cell, -1).repeat_interleave(cell, -2)
    Wt, bt = torch.randn(D, K, generator=g), torch.randn(K, generator=g)
    cue = lambda f: torch.einsum("bdhw,dk->bkhw", f, Wt) + bt[:, None, None]
    return fc, fq, cue(fc), cue(fq), Wt, bt


def test_exact_linear_cues_are_recovered():
    fc, fq, cc, cq, _, _ = _linear_scene()
    conf = torch.ones(2, 2, 32, 32)
    loss, parts = ic.incontext_loss(fq, fc, cq, cc, conf, conf, pool=8, lam=1e-6)
    assert loss.item() < 1e-3 and parts["edge"].item() < 1e-3
    # With the paper's lam = 0.1 the shrinkage costs a little, but far less than random cues.
    loss_lam, _ = ic.incontext_loss(fq, fc, cq, cc, conf, conf, pool=8)
    loss_rand, _ = ic.incontext_loss(fq, fc, torch.randn_like(cq), cc, conf, conf, pool=8)
    assert loss_lam.item() < 0.3 * loss_rand.item()


def _slow_cue_loss(pred, target, mask, gamma, sigma, cutoff=0.0):
    """Loops over every element: the L1 over the valid (channel, pixel) elements plus gamma
    times the edge terms L_x + L_y, each the mean over its valid differences (official
    dpt_lila.py flow_loss[full_conf > 0].mean() and flow_boundary_loss). Channel k < Cm is
    valid where mask[:, k] > cutoff, the others everywhere."""
    B, K, H, W = pred.shape
    valid = lambda b, k, i, j: k >= mask.shape[1] or mask[b, k, i, j] > cutoff  # noqa: E731
    num = den = 0.0
    sums = {(0, 1): [0.0, 0], (1, 0): [0.0, 0]}
    for b in range(B):
        for k in range(K):
            for i in range(H):
                for j in range(W):
                    if valid(b, k, i, j):
                        num, den = num + abs(pred[b, k, i, j] - target[b, k, i, j]), den + 1
                    for di, dj in sums:
                        if i + di >= H or j + dj >= W or not (valid(b, k, i, j) and valid(b, k, i + di, j + dj)):
                            continue
                        gp = abs(pred[b, k, i + di, j + dj] - pred[b, k, i, j])
                        gt = abs(target[b, k, i + di, j + dj] - target[b, k, i, j])
                        sums[(di, dj)][0] += (1 - torch.exp(-gt / sigma)) * abs(gp - gt)
                        sums[(di, dj)][1] += 1
    l1 = num / den
    edge = sum(e / n for e, n in sums.values())
    return l1 + gamma * edge, l1, edge


def test_cue_loss_matches_slow_loops():
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(2, 2, 4, 5, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 2, 5, 5, generator=g, dtype=torch.float64) * (torch.rand(2, 2, 5, 5, generator=g) > 0.4)
    loss, parts = ic.cue_loss(pred, target, mask, gamma=0.7, sigma=0.3)
    ref_loss, ref_l1, ref_edge = _slow_cue_loss(pred, target, mask, 0.7, 0.3)
    assert abs(loss.item() - float(ref_loss)) < 1e-10
    assert abs(parts["l1"].item() - float(ref_l1)) < 1e-10
    assert abs(parts["edge"].item() - float(ref_edge)) < 1e-10
    # each channel's L1 over its own valid pixels
    m0 = mask[:, 0] > 0
    assert abs(parts["l1_channels"][0].item() - (pred - target)[:, 0][m0].abs().mean().item()) < 1e-10
    assert abs(parts["l1_channels"][3].item() - (pred - target)[:, 3].abs().mean().item()) < 1e-10


def test_edge_loss_zero_when_equal_and_positive_otherwise():
    g = torch.Generator().manual_seed(3)
    target = torch.randn(2, 4, 16, 16, generator=g)
    _, parts = ic.cue_loss(target.clone(), target, None)
    assert parts["edge"].item() == 0 and parts["l1"].item() == 0
    _, parts = ic.cue_loss(target + 0.1 * torch.randn(target.shape, generator=g), target, None)
    assert parts["edge"].item() > 0
    _, parts = ic.cue_loss(F.avg_pool2d(target, 3, 1, 1), target, None)   # blurred edges
    assert parts["edge"].item() > 0
    loss_off, parts_off = ic.cue_loss(target * 0.5, target, None, edge=False)
    assert parts_off["edge"].item() == 0 and loss_off.item() == parts_off["l1"].item()


def _masked_scene(seed=4, B=2, D=8, K=6, H=32, pool=8):
    """Two views with K = 6 cue channels; the first 3 (flow-x, flow-y, depth) have their own
    confidence channel each: flow with pixel-level holes (shared by both flow channels), depth
    with other holes; the context confidence is constant on pooled cells."""
    g = torch.Generator().manual_seed(seed)
    fc, fq = torch.randn(2, B, D, H, H, generator=g)
    cc, cq = torch.randn(2, B, K, H, H, generator=g)
    flow, dep = (torch.rand(2, B, 1, H, H, generator=g) > 0.2).float()  # pixel-level holes
    conf_q = torch.cat([flow, flow, dep], 1)                             # (B, 3, H, W)
    cells = (torch.rand(B, 2, pool, pool, generator=g) > 0.2).float()    # whole pooled cells
    cells = F.interpolate(cells, size=(H, H), mode="nearest")
    conf_c = torch.cat([cells[:, :1], cells[:, :1], cells[:, 1:]], 1)
    return fc, fq, cc, cq, conf_c, conf_q


def test_each_cue_channel_is_masked_by_its_own_confidence():
    fc, fq, cc, cq, conf_c, conf_q = _masked_scene()
    base, parts = ic.incontext_loss(fq, fc, cq, cc, conf_q, conf_c, pool=8)
    cq2 = cq.clone()
    cq2[:, :3][conf_q == 0] = 1e3                        # flow/depth garbage where not confident
    bad_c = (conf_c.prod(1, keepdim=True) == 0).expand_as(cc)
    cc2 = cc.masked_fill(bad_c, -1e3)                    # context garbage, all channels
    loss, parts2 = ic.incontext_loss(fq, fc, cq2, cc2, conf_q, conf_c, pool=8)
    assert abs(loss.item() - base.item()) < 1e-5 * base.item()
    # Depth is NOT masked by the flow check (and flow not by depth validity): garbage in depth
    # where only the flow is unconfident changes the loss, and only the depth channel's L1.
    cq3 = cq.clone()
    cq3[:, 2:3][(conf_q[:, :1] == 0) & (conf_q[:, 2:3] > 0)] = 1e3
    loss3, parts3 = ic.incontext_loss(fq, fc, cq3, cc, conf_q, conf_c, pool=8)
    assert loss3.item() > 10 * base.item()
    torch.testing.assert_close(parts3["l1_channels"][:2], parts["l1_channels"][:2])
    assert parts3["l1_channels"][2] > 100 * parts["l1_channels"][2]
    # The same corruption with confidence ignored changes the loss a lot.
    loss_nomask, _ = ic.incontext_loss(fq, fc, cq2, cc2, None, None, pool=8)
    assert loss_nomask.item() > 10 * base.item()


def test_sd_channels_are_not_masked():
    fc, fq, cc, cq, conf_c, conf_q = _masked_scene()
    base, parts = ic.incontext_loss(fq, fc, cq, cc, conf_q, conf_c, pool=8)
    bad_q = (conf_q.prod(1, keepdim=True) == 0).expand(-1, 3, -1, -1)
    cq2 = cq.clone()
    cq2[:, 3:][bad_q] = 1e3                              # SD channels (3..5) corrupted
    loss, parts2 = ic.incontext_loss(fq, fc, cq2, cc, conf_q, conf_c, pool=8)
    assert loss.item() > 10 * base.item()
    torch.testing.assert_close(parts2["l1_channels"][:3], parts["l1_channels"][:3])


def _finite_grads(loss, *tensors):
    grads = torch.autograd.grad(loss, tensors)
    return torch.isfinite(loss).item() and all(torch.isfinite(g).all().item() for g in grads)


@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e4, 1e6])
def test_ridge_degenerate_columns_and_scales_stay_finite(scale):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(2, 128, 6, generator=g) * scale
    X = torch.cat([base, base, torch.full_like(base[..., :1], scale)], -1)  # duplicated + constant
    X.requires_grad_()
    Y = torch.randn(2, 128, 3, generator=g, requires_grad=True)
    for w in (torch.rand(2, 128, generator=g), torch.zeros(2, 128)):
        W = ic.ridge_solve(X, Y, w)
        assert torch.isfinite(W).all()
        assert _finite_grads(W.square().sum() + (X @ W).abs().sum(), X, Y)
    assert ic.ridge_solve(X, Y, torch.zeros(2, 128)).abs().max() == 0   # no data: W* = 0


def test_incontext_loss_degenerate_inputs_stay_finite():
    g = torch.Generator().manual_seed(6)
    B, D, K, H = 2, 8, 5, 16
    cues = torch.randn(2, B, K, H, H, generator=g)
    cases = {
        "zero confidence": (torch.randn(B, D, H, H, generator=g), torch.zeros(B, 2, H, H)),
        "constant features": (torch.ones(B, D, H, H), torch.ones(B, 2, H, H)),
        "duplicated channels": (torch.randn(B, 1, H, H, generator=g).expand(B, D, H, H) *
                                torch.arange(1.0, D + 1)[None, :, None, None], torch.ones(B, 2, H, H)),
        "huge scale": (1e6 * torch.randn(B, D, H, H, generator=g), torch.ones(B, 2, H, H)),
        "tiny scale": (1e-8 * torch.randn(B, D, H, H, generator=g), torch.ones(B, 2, H, H)),
    }
    for name, (feat, conf) in cases.items():
        fc, fq = feat.clone().requires_grad_(), feat.flip(-1).clone().requires_grad_()
        loss, _ = ic.incontext_loss(fq, fc, cues[1], cues[0], conf, conf, pool=8)
        assert _finite_grads(loss, fc, fq), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_under_autocast_is_finite_and_close(dtype):
    fc, fq, cc, cq, conf_c, conf_q = _masked_scene(seed=7)
    ref, _ = ic.incontext_loss(fq, fc, cq, cc, conf_q, conf_c, pool=8)
    fc, fq = fc.to(dtype).requires_grad_(), fq.to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        loss, _ = ic.incontext_loss(fq, fc, cq.to(dtype), cc.to(dtype), conf_q, conf_c, pool=8)
        W = ic.ridge_solve(fc.flatten(2).transpose(1, 2), cc.flatten(2).transpose(1, 2).to(dtype),
                           torch.ones(2, 32 * 32, dtype=dtype))
    assert W.dtype == torch.float32                      # the ridge system left autocast
    assert _finite_grads(loss, fc, fq)
    assert abs(loss.item() - ref.item()) < 0.05 * ref.item()


def test_erm_head_with_true_map_has_zero_loss_and_trains():
    fc, fq, cc, cq, Wt, bt = _linear_scene()
    head = ic.ERMHead(16, 5)
    conf = torch.ones(2, 2, 32, 32)
    loss0, _ = ic.erm_loss(head, fq, fc, cq, cc, conf, conf)
    loss0.backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())
    with torch.no_grad():                                # the true linear map is a perfect head
        head.proj.weight.copy_(Wt.t()[:, :, None, None])
        head.proj.bias.copy_(bt)
    loss, parts = ic.erm_loss(head, fq, fc, cq, cc, conf, conf)
    assert loss.item() < 1e-5 < loss0.item() and set(parts) >= {"l1", "edge"}
    # One flag away: the ERM loss takes every keyword of incontext_loss.
    kw = dict(pool=8, lam=0.1, gamma=0.0, sigma=0.1, edge=True, lstsq_cutoff=0.5, conf_cutoff=0.0,
              solver="cholesky")
    assert torch.isfinite(ic.erm_loss(head, fq, fc, cq, cc, conf, conf, **kw)[0])
    assert torch.isfinite(ic.incontext_loss(fq, fc, cq, cc, conf, conf, **kw)[0])


def test_bad_shapes_raise_clear_errors():
    f, g, c = torch.randn(2, 8, 16, 16), torch.randn(2, 5, 16, 16), torch.ones(2, 1, 16, 16)
    with pytest.raises(ValueError, match="incontext.py: incontext_loss: cue_q"):
        ic.incontext_loss(f, f, g[:, :, :8], g, c, c)
    with pytest.raises(ValueError, match="incontext.py: incontext_loss: conf_q"):
        ic.incontext_loss(f, f, g, g, torch.ones(2, 6, 16, 16), c)
    with pytest.raises(ValueError, match="incontext.py: ridge_solve"):
        ic.ridge_solve(torch.randn(2, 10, 3), torch.randn(2, 9, 1), torch.ones(2, 10))
    with pytest.raises(ValueError, match="lam must be > 0"):
        ic.ridge_solve(torch.randn(2, 10, 3), torch.randn(2, 10, 1), torch.ones(2, 10), lam=0)


def test_ridge_weight_is_the_pooled_product_zeroed_below_half_and_the_query_mask_any_confidence():
    # Two channels of 0.7 are each confident, but their product 0.49 < 0.5 is not.
    conf = torch.tensor([0.7, 0.7, 1.0, 0.6]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    assert ic.ridge_weight(conf[:, :2], (1, 1)).max() == 0
    assert ic.ridge_weight(conf[:, 2:], (2, 2)).allclose(torch.full((1, 4), 0.6))
    # pooled first, multiplied second: (mean 0.5) * (mean 1) = 0.5 -> kept
    half = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(1, 1, 2, 2)
    assert ic.ridge_weight(torch.cat([half, torch.ones_like(half)], 1), (1, 1)).item() == 0.5
    # In the query, any positive confidence counts (official conf_cutoff 0): a pixel at 0.1
    # confidence is in the loss, a pixel at 0 is not.
    fc, fq, cc, cq, conf_c, conf_q = _masked_scene(seed=8)
    soft_q = conf_q * 0.1
    base, _ = ic.incontext_loss(fq, fc, cq, cc, soft_q, conf_c, pool=8)
    cq2 = cq.clone()
    cq2[:, :3][conf_q > 0] += 1.0
    assert ic.incontext_loss(fq, fc, cq2, cc, soft_q, conf_c, pool=8)[0] > base + 0.01
    cq3 = cq.clone()
    cq3[:, :3][conf_q == 0] = 1e3
    assert abs(ic.incontext_loss(fq, fc, cq3, cc, soft_q, conf_c, pool=8)[0].item() - base.item()) < 1e-5


# --- the paper's / official constants are the defaults -----------------------------------

# Official configs/train_ytvos.yaml `model`: ridge 0.1, w_edge 1.0, sigma_edge 0.1,
# conf_cutoff 0.0, lstsq_cutoff 0.5; dpt_lila.py forward_cross pools the context to 32 x 32.
OFFICIAL = dict(pool=32, lam=0.1, gamma=1.0, sigma=0.1, edge=True, lstsq_cutoff=0.5,
                conf_cutoff=0.0, solver="cholesky")


def _defaults(fn):
    import inspect
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("name", ["incontext_loss", "cue_loss", "erm_loss", "ridge_solve",
                                  "ridge_weight", "ridge_map", "loss_norms"])
def test_every_method_default_is_the_official_value(name):
    d = _defaults(getattr(ic, name))
    shared = {k: v for k, v in OFFICIAL.items() if k in d}
    assert shared and {k: d[k] for k in shared} == shared


def _official_loss(fq, fc, cq, cc, conf_q, conf_c):
    """The official forward_cross written out with its constants (nothing passed in): LayerNormed
    features are taken as given, [f, 1], 32 x 32 adaptive pooling of the context, the product of
    the pooled confidences zeroed < 0.5, W* = (X^T C X / N + 0.1 I)^-1 X^T C Y / N (LU), the
    L1 over full_conf > 0 and flow_boundary_loss with sigma 0.1, weight 1."""
    one = lambda x: torch.cat([x, torch.ones_like(x[:, :1])], 1)
    bnd = lambda x: F.adaptive_avg_pool2d(x, (32, 32)).flatten(-2).movedim(1, -1)
    X, Y, c = bnd(one(fc)).double(), bnd(cc).double(), bnd(conf_c).double().prod(-1, keepdim=True)
    c[c < 0.5] = 0
    N, P = X.shape[1:]
    A = (X * c).transpose(1, 2) @ X / N + 0.1 * torch.eye(P, dtype=X.dtype)
    W = torch.linalg.solve(A, (X * c).transpose(1, 2) @ Y / N)
    pred = torch.einsum("bchw,bcd->bdhw", one(fq).double(), W)
    full = torch.cat([conf_q, torch.ones_like(cq[:, conf_q.shape[1]:])], 1)
    l1 = (pred - cq)[full > 0].abs().mean()
    gx = lambda x: (x[..., :-1] - x[..., 1:]).abs()
    gy = lambda x: (x[..., :-1, :] - x[..., 1:, :]).abs()
    edge = 0
    for g, v in ((gx, (full[..., :-1] > 0) & (full[..., 1:] > 0)),
                 (gy, (full[..., :-1, :] > 0) & (full[..., 1:, :] > 0))):
        edge = edge + ((1 - torch.exp(-g(cq) / 0.1)) * (g(pred) - g(cq)).abs())[v].mean()
    return l1 + 1.0 * edge


def test_default_loss_is_the_official_forward_cross_with_its_constants():
    # 64 x 64 views: pooling to 32 differs from any other pool size; smooth confidences with
    # values around 0.5 so that the 0.5 cutoff and the conf > 0 test both bite.
    g = torch.Generator().manual_seed(11)
    B, D, K, H = 2, 6, 5, 64
    smooth = lambda *s: F.interpolate(torch.randn(*s, 16, 16, generator=g), size=(H, H), mode="bicubic")
    fc, fq = smooth(B, D), smooth(B, D)                                # (B, D, H, W) each
    Wt = torch.randn(D, K, generator=g)
    cc, cq = [torch.einsum("bdhw,dk->bkhw", f, Wt) + 0.3 * torch.randn(B, K, H, H, generator=g)
              for f in (fc, fq)]                                        # (B, K, H, W) each
    conf = F.interpolate(torch.rand(2, B, 3, 8, 8, generator=g).flatten(0, 1), size=(H, H),
                         mode="bilinear").view(2, B, 3, H, H)
    conf_q, conf_c = (conf[0] - 0.2).clamp(min=0), conf[1]          # zeros and small values
    ours, _ = ic.incontext_loss(fq, fc, cq, cc, conf_q, conf_c)       # every default
    ref = _official_loss(fq, fc, cq, cc, conf_q, conf_c)
    assert abs(ours.item() - ref.item()) < 1e-5 * ref.item()
    # the test can fail: each constant changed alone moves the loss
    for kw in (dict(pool=16), dict(lam=0.2), dict(gamma=0.5), dict(sigma=0.2),
               dict(lstsq_cutoff=0.4), dict(conf_cutoff=0.2)):
        other, _ = ic.incontext_loss(fq, fc, cq, cc, conf_q, conf_c, **kw)
        assert abs(other.item() - ref.item()) > 1e-4 * ref.item(), kw


# --- micro-batches: the chunks' losses sum to the whole batch's ---------------------------

@pytest.mark.parametrize("erm", [False, True])
def test_chunks_with_whole_batch_norms_sum_to_the_whole_batch_loss_and_gradients(erm):
    fc, fq, cc, cq, conf_c, conf_q = _masked_scene(seed=9, B=5)
    fc, fq, cc, cq, conf_c, conf_q = (t.double() for t in (fc, fq, cc, cq, conf_c, conf_q))
    conf_q[3, :2] = 0                                    # a pair with no confident flow at all
    K, H, W = cq.shape[1:]
    head = ic.ERMHead(fc.shape[1], K).double()

    def loss_of(sl, norms=None):
        f_q, f_c = fq[sl].detach().requires_grad_(), fc[sl].detach().requires_grad_()
        args = (f_q, f_c, cq[sl], cc[sl], conf_q[sl], conf_c[sl])
        kw = dict(pool=8, norms=norms)
        loss, parts = ic.erm_loss(head, *args, **kw) if erm else ic.incontext_loss(*args, **kw)
        loss.backward()
        return loss, parts, f_q.grad, f_c.grad

    whole = loss_of(slice(None))
    norms = ic.loss_norms(conf_q, K, H, W)
    if erm:
        norms = (norms, ic.loss_norms(conf_c, K, H, W))
    chunks = [loss_of(slice(a, b), norms) for a, b in ((0, 2), (2, 3), (3, 5))]
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    close(sum(c[0] for c in chunks), whole[0])
    for k in ("l1", "edge", "l1_channels"):
        close(sum(c[1][k] for c in chunks), whole[1][k])
    close(torch.cat([c[2] for c in chunks]), whole[2])   # gradients of the query features
    close(torch.cat([c[3] for c in chunks]), whole[3])   # and of the context features
    # without the whole batch's norms each chunk is its own mean: the sum is not the loss
    alone = sum(loss_of(slice(a, b))[0] for a, b in ((0, 2), (2, 3), (3, 5)))
    assert abs(alone.item() - whole[0].item()) > 0.5 * whole[0].item()


def test_loss_norms_counts_and_ridge_map_apply_map_are_the_loss():
    fc, fq, cc, cq, conf_c, conf_q = _masked_scene(seed=10)
    K, H, W = cq.shape[1:]
    n = ic.loss_norms(conf_q, K, H, W)
    valid = torch.cat([conf_q > 0, torch.ones_like(cq[:, 3:], dtype=torch.bool)], 1)
    assert n["l1"] == valid.sum() and torch.equal(n["l1_channels"], valid.sum((0, 2, 3)))
    assert n["edge_x"] == (valid[..., 1:] & valid[..., :-1]).sum()
    assert ic.loss_norms(None, K, H, W, batch=2)["l1"] == 2 * K * H * W
    with pytest.raises(ValueError, match="incontext.py: loss_norms.*batch"):
        ic.loss_norms(None, K, H, W)
    W_ = ic.ridge_map(fc, cc, conf_c, pool=8)
    assert W_.shape == (2, fc.shape[1] + 1, K)
    loss, _ = ic.cue_loss(ic.apply_map(fq, W_), cq, conf_q)
    torch.testing.assert_close(loss, ic.incontext_loss(fq, fc, cq, cc, conf_q, conf_c, pool=8)[0])
    with pytest.raises(ValueError, match="incontext.py: apply_map"):
        ic.apply_map(fq, W_[:, 1:])
