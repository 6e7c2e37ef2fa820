"""The linear in-context loss of LILA: a ridge map fitted on the context, scored on the query.

Paper: "Featurising Pixels from Dynamic 3D Scenes with Linear In-Context Learners",
Araslanov et al., CVPR 2026, section 3 ("Linear in-context learning"); official code:
lila/lila/dpt_lila.py (forward_cross, solve_weighted_ridge_regression, flow_boundary_loss).

The decoder is trained so that ONE linear map, fitted in closed form on a *context* view to
predict its noisy cues (flow, depth, self-distillation), also predicts the cues of a *query*
view of the same video:

    W* = argmin_W (1/N) sum_n c_n ||x_n^T W - y_n||^2 + lam ||W||^2       (ridge_map)
       = (X^T C X / N + lam I)^-1  X^T C Y / N                               (ridge_solve)
    g_hat = X_q W*                                                           (apply_map)
    L = L1(g_hat, g_q) + gamma * (L_x + L_y)                                 (cue_loss)

x_n = [f_n, 1]: the decoder's (LayerNormed) features with a 1 for the bias, average-pooled to
32 x 32 on the context; c_n the product of the pooled confidences, zeroed below 0.5.

Shapes: B batch, D feature channels (128 for ViT-S), P = D + 1 (bias column), H x W a view
(224^2 in the paper preset, 112^2 in the tiny one), K cue channels (2 flow + 1 depth + 32 SD = 35), N = pool^2 context samples (1024),
Cm confidence channels, one per masked cue channel ([flow, flow, depth-valid]).
Deviations from the official code: README, "Differences".
Tests: python -m pytest -q tests/test_incontext.py ; speed: python bench.py incontext
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def ridge_map(feat_c, cue_c, conf_c=None, pool=32, lam=0.1, lstsq_cutoff=0.5,
              solver="cholesky"):
    """The in-context step: W* (B, P, K), the ridge map that reads the context's cues off its
    features. feat_c (B, D, H, W), cue_c (B, K, H, W), conf_c (B, Cm, H, W) or None.

    The fit uses pool x pool averages (N = 1024 samples, official `lowres`): pooling is linear,
    so a cue that is a linear function of the per-pixel features stays one after it, and the
    system is tiny whatever the view size. Official defaults: pool 32, lam (ridge) 0.1,
    lstsq_cutoff 0.5 (configs/train_ytvos.yaml).
    Why closed form, not gradient steps: the loss must score the features through the BEST
    linear map for this context, not through how far an inner optimiser got from its start;
    the ridge optimum is one small (P x P) solve per pair, exact, cheap and differentiable."""
    _check_ridge_map(feat_c, cue_c)
    B = feat_c.shape[0]
    size = tuple(min(pool, side) for side in feat_c.shape[-2:])         # pool x pool
    X = F.adaptive_avg_pool2d(feat_c, size).flatten(2).transpose(1, 2)   # (B, N, D)
    X = torch.cat([X, torch.ones_like(X[..., :1])], -1)                  # (B, N, P)  x_n = [f_n, 1]
    Y = F.adaptive_avg_pool2d(cue_c, size).flatten(2).transpose(1, 2)    # (B, N, K)  y_n
    if conf_c is None or conf_c.shape[1] == 0:
        c = X.new_ones(B, X.shape[1])                                    # (B, N)  all confident
    else:
        c = ridge_weight(conf_c.to(X.dtype), size, lstsq_cutoff)         # (B, N)  c_n
    return ridge_solve(X, Y, c, lam=lam, solver=solver)                  # (B, P, K)  W*


def ridge_weight(conf, size, lstsq_cutoff=0.5):
    """c_n: the confidence channels average-pooled to `size`, multiplied, zeroed below
    lstsq_cutoff (official forward_cross: pool, prod, `< 0.5 = 0`): a sample is fitted only
    where most of its cell is confident in every cue. conf (B, Cm, H, W) -> (B, N)."""
    c = F.adaptive_avg_pool2d(conf, size).prod(1).flatten(1)             # (B, N)
    return c * (c >= lstsq_cutoff)


def ridge_solve(X, Y, c, lam=0.1, solver="cholesky", jitter=1e-5, retries=3):
    """W* = (X^T C X / N + lam I)^-1 X^T C Y / N, C = diag(c_n); X (B, N, P), Y (B, N, K), c (B, N).

    1/N, not 1/sum(c), as the objective (1/N) sum_n c_n ||x_n^T W - y_n||^2 + lam ||W||^2:
    unconfident samples also weaken the data term against lam, and c = 0 gives W* = 0.
    Differentiable in X, Y, c. Cholesky (official: LU; `solver` "lu" | "lstsq" for the bench
    and the tests); float32 even under autocast (see `_ridge_dtype`)."""
    _check_ridge_solve(X, Y, c, lam)
    dtype = _ridge_dtype(X, Y, c)
    with torch.autocast(X.device.type, enabled=False):
        X, Y, c = X.to(dtype), Y.to(dtype), c.to(dtype)
        if solver == "lstsq":
            return _ridge_lstsq(X, Y, c, lam)                            # (B, P, K)
        N, P = X.shape[1:]
        Xc = X * (c / N).unsqueeze(-1)                                   # (B, N, P)  C X / N
        A = Xc.transpose(1, 2) @ X + lam * torch.eye(P, dtype=dtype, device=X.device)  # (B, P, P)
        b = Xc.transpose(1, 2) @ Y                                       # (B, P, K)  X^T C Y / N
        return _solve_spd(A, b, solver, jitter, retries)                 # (B, P, K)  A^-1 b


def apply_map(feat_q, W):
    """g_hat = X_q W* at full resolution: feat_q (B, D, H, W), W (B, P, K) -> (B, K, H, W).
    The bias row is added on its own, so the (B, P, H, W) [f, 1] is never built."""
    _check_apply_map(feat_q, W)
    D = feat_q.shape[1]
    xq = feat_q.to(torch.promote_types(feat_q.dtype, W.dtype))           # (B, D, H, W)
    return torch.einsum("bdhw,bdk->bkhw", xq, W[:, :D]) + W[:, D, :, None, None]  # (B, K, H, W)


def cue_loss(pred, target, mask=None, gamma=1.0, sigma=0.1, edge=True, conf_cutoff=0.0,
             norms=None):
    """L = L1 + gamma * (L_x + L_y) over the valid elements (official forward_cross and
    flow_boundary_loss; gamma = w_edge 1, sigma = sigma_edge 0.1):

        L1  = mean over valid (k, p) of |pred_k(p) - target_k(p)|
        L_x = mean over valid x-differences of (1 - exp(-|dx target| / sigma)) * | |dx pred| - |dx target| |
        L_y   the same in y;  a difference is valid where both of its pixels are.

    Why the edge term: a boundary smeared over a few pixels costs the L1 little (few pixels,
    small errors). L_x compares gradient magnitudes: it asks for a jump of the target's size
    where the target jumps (values and sign are the L1's job), so the features must place
    boundaries to the pixel; the weight counts it only there. On z-scored flow and depth (unit
    std) 1 - exp(-|d| / 0.1) is 0.1 for a step of 0.01 std, 0.63 at 0.1 and 0.95 at 0.3: slopes
    and noise barely count, boundaries fully (an SD channel, of a unit 32-vector, has RMS 0.18).
    pred, target (B, K, H, W); mask (B, Cm, H, W) the confidence of the first Cm channels,
    valid where > conf_cutoff (official 0.0: any confidence); the other K - Cm (SD) channels
    are valid everywhere; None: all valid.
    norms: `loss_norms` of the whole batch when this is a chunk of it (micro-batches: the
    chunks' losses and parts then sum to the whole batch's); None: this batch's own.
    Returns (loss, parts): "l1", "edge" and "l1_channels" (K,) (each channel's L1), detached.
    """
    B, K, H, W = pred.shape
    mask = pred.new_ones(B, 0, H, W) if mask is None else mask
    n = loss_norms(mask, K, H, W, conf_cutoff) if norms is None else _check_norms(norms, K)
    n = {k: v.clamp(min=1) for k, v in n.items()}                        # nothing valid: 0
    valid = _valid(mask, K, conf_cutoff)                                 # (B, K, H, W)
    err = (pred - target).abs() * valid                                  # (B, K, H, W)
    l1 = err.sum() / n["l1"]
    per_channel = err.detach().sum((0, 2, 3)) / n["l1_channels"]         # (K,)
    edge_term = pred.new_zeros(())
    if edge:
        for dp, dt, v, nv in zip(_abs_grads(pred), _abs_grads(target), _valid_pairs(valid),
                                 (n["edge_x"], n["edge_y"])):
            weight = 1 - torch.exp(-dt / sigma)                          # ~1 on target edges
            edge_term = edge_term + (weight * (dp - dt).abs() * v).sum() / nv   # L_x + L_y
    loss = l1 + gamma * edge_term if edge else l1
    return loss, {"l1": l1.detach(), "edge": edge_term.detach(), "l1_channels": per_channel}


def incontext_loss(feat_q, feat_c, cue_q, cue_c, conf_q=None, conf_c=None, pool=32,
                   lam=0.1, gamma=1.0, sigma=0.1, edge=True, lstsq_cutoff=0.5, conf_cutoff=0.0,
                   solver="cholesky", norms=None):
    """The linear in-context loss: W* = ridge_map(context), g_hat = apply_map(query, W*),
    cue_loss(g_hat, query's cues). feat (B, D, H, W), cue (B, K, H, W), conf (B, Cm, H, W).

    Why it trains the features, and whose: nothing is detached (nor in the official
    forward_cross; only the encoder and the cues are computed without gradients). W* is a
    differentiable function of the context's features (autograd goes through the solve), so
    the loss reaches both views: the query's features, to be readable by the context's map,
    and the context's, so that the map read off them holds on the query. Both come from the
    one decoder, which learns features from which one linear map per video explains the cues
    of any view; with W* detached the context's features would get no gradient at all.
    Official defaults: pool 32, lam 0.1, gamma 1, sigma 0.1, lstsq_cutoff 0.5, conf_cutoff 0.
    Returns (loss, parts) as cue_loss."""
    _check_maps("incontext_loss", feat_q, feat_c, cue_q, cue_c, conf_q, conf_c)
    W = ridge_map(feat_c, cue_c, conf_c, pool, lam, lstsq_cutoff, solver)  # (B, P, K)  W*
    pred = apply_map(feat_q, W)                                          # (B, K, H, W)  g_hat
    return cue_loss(pred, cue_q, conf_q, gamma, sigma, edge, conf_cutoff, norms)


# --- the ERM ablation (ours: the official release has no code for it) ---

class ERMHead(nn.Module):
    """A learned 1x1 conv D -> K shared by all videos: the paper's "ERM" baseline.
    Why the in-context map beats it (DAVIS J&F, LP / kNN: ERM 63.2 / 61.1, LILA 68.6 / 73.9):
    a pair's flow depends on how this camera and these objects moved, its depth on this
    scene's scale and its SD cue on the channels drawn for it, none of them a function of one
    frame's appearance; a fixed head can only learn their average. A map fitted on the context
    absorbs what belongs to the pair, and the features only have to make the cues linearly
    readable: which pixels move together, the layout in depth.
    feat (B, D, H, W) -> (B, K, H, W)."""

    def __init__(self, dim, n_cues):
        super().__init__()
        self.proj = nn.Conv2d(dim, n_cues, kernel_size=1)                # W and bias, learned

    def forward(self, feat):
        return self.proj(feat)                                           # (B, K, H, W)


def erm_loss(head, feat_q, feat_c, cue_q, cue_c, conf_q=None, conf_c=None, gamma=1.0,
             sigma=0.1, edge=True, conf_cutoff=0.0, norms=None, **ridge_kw):
    """The same cue_loss on both views' `head` predictions, the mean of the two. The keywords
    of incontext_loss are accepted (the ridge ones unused), so the flag only swaps the
    function; norms: (loss_norms of the queries, of the contexts) or None."""
    _check_maps("erm_loss", feat_q, feat_c, cue_q, cue_c, conf_q, conf_c)
    norms_q, norms_c = (None, None) if norms is None else norms
    losses = [cue_loss(head(f), g, m, gamma, sigma, edge, conf_cutoff, n)
              for f, g, m, n in ((feat_q, cue_q, conf_q, norms_q), (feat_c, cue_c, conf_c, norms_c))]
    loss = (losses[0][0] + losses[1][0]) / 2
    parts = {k: (losses[0][1][k] + losses[1][1][k]) / 2 for k in losses[0][1]}
    return loss, parts


# --- plumbing: masks and counts, the solvers, the precision rule, the input checks --------

def _valid(mask, K, conf_cutoff):
    """Per-channel validity (B, K, H, W) bool: the first Cm channels where their confidence
    (B, Cm, H, W) exceeds conf_cutoff, the other K - Cm channels (SD) everywhere."""
    B, Cm, H, W = mask.shape
    ok = mask > conf_cutoff                                              # (B, Cm, H, W)
    return torch.cat([ok, ok.new_ones(B, K - Cm, H, W)], 1)             # (B, K, H, W)


def _valid_pairs(valid):
    """Valid x- and y-differences: both pixels valid. (B, K, H, W-1), (B, K, H-1, W)."""
    return valid[..., :, 1:] & valid[..., :, :-1], valid[..., 1:, :] & valid[..., :-1, :]


def _abs_grads(x):
    """Absolute forward differences in x and y: (B, C, H, W-1) and (B, C, H-1, W)."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs(), (x[..., 1:, :] - x[..., :-1, :]).abs()


def loss_norms(conf_q, K, H, W, conf_cutoff=0.0, batch=None):
    """The counts cue_loss divides by, for a whole batch: dict of "l1" (valid elements),
    "l1_channels" (K,) (valid pixels per channel), "edge_x", "edge_y" (valid differences),
    int64 tensors on conf_q's device. Passed as `norms=` to the loss of each chunk of the
    batch (micro-batches), the chunks' losses and parts sum to the whole batch's.
    conf_q (B, Cm, H, W) as cue_loss's mask, or None with batch=B (all valid)."""
    if conf_q is None:
        if batch is None:
            _fail("loss_norms", "conf_q None needs batch=B (the number of pairs)")
        conf_q = torch.ones(batch, 0, H, W)
    if conf_q.ndim != 4 or tuple(conf_q.shape[-2:]) != (H, W) or conf_q.shape[1] > K:
        _fail("loss_norms", f"conf_q {tuple(conf_q.shape)} must be (B, Cm <= K={K}, H={H}, W={W})")
    valid = _valid(conf_q, K, conf_cutoff)                               # (B, K, H, W)
    vx, vy = _valid_pairs(valid)
    return {"l1": valid.sum(), "l1_channels": valid.sum((0, 2, 3)),     # (), (K,)
            "edge_x": vx.sum(), "edge_y": vy.sum()}


def _ridge_dtype(X, Y, c):
    """float32, or float64 if an input is. Never fp16/bf16, so the ridge leaves autocast: a
    Gram entry sums N = 1024 products, fp16 overflows at 65504 and bf16's round-off
    (~N * 4e-3 relative) can exceed lam and make A indefinite. For LayerNormed features
    ||x_n||^2 = D + 1, A's eigenvalues lie in [lam, lam + D + 1] (condition <= ~1.3e3), and
    float32 loses < 1e-4 relative; pass float64 for raw features with ||x||^2 / lam > 1e6."""
    return torch.float64 if torch.float64 in (X.dtype, Y.dtype, c.dtype) else torch.float32


def _ridge_lstsq(X, Y, c, lam):
    """The same W* as least squares of [sqrt(c/N) X; sqrt(lam) I] W = [sqrt(c/N) Y; 0]."""
    B, N, P = X.shape
    s = (c / N).clamp_min(0).sqrt().unsqueeze(-1)                        # (B, N, 1)
    eye = torch.eye(P, dtype=X.dtype, device=X.device).expand(B, P, P)
    Xa = torch.cat([s * X, lam ** 0.5 * eye], 1)                         # (B, N + P, P)
    Ya = torch.cat([s * Y, Y.new_zeros(B, P, Y.shape[2])], 1)           # (B, N + P, K)
    return torch.linalg.lstsq(Xa, Ya).solution                           # (B, P, K)


def _solve_spd(A, b, solver, jitter, retries):
    """A^-1 b for symmetric positive definite A (B, P, P): Cholesky, or LU (the official
    torch.linalg.solve). Cholesky only fails through float32 round-off (huge, duplicated
    columns): those batch elements get jitter * (largest diagonal entry) * I added, x10 per
    retry. One host sync per call (the training loop syncs per step anyway)."""
    if solver == "lu":
        return torch.linalg.solve(A, b)                                  # (B, P, K)
    if solver != "cholesky":
        _fail("ridge_solve", f"solver must be 'cholesky', 'lu' or 'lstsq', got {solver!r}")
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    L, info = torch.linalg.cholesky_ex(A)                                # (B, P, P) lower
    for attempt in range(retries):
        failed = info > 0                                                # (B,)
        if not bool(failed.any()):
            break
        scale = A.diagonal(dim1=1, dim2=2).amax(-1) * jitter * 10 ** attempt   # (B,)
        A = A + (scale * failed)[:, None, None] * eye                    # (B, P, P)
        L, info = torch.linalg.cholesky_ex(A)
    if bool((info > 0).any()):
        _fail("ridge_solve", "Cholesky failed even with jitter; are X, Y, c finite? "
                             f"(max |A| = {A.abs().max().item():.3g})")
    return torch.cholesky_solve(b, L)                                    # (B, P, K)


def _fail(fn, msg):
    raise ValueError(f"incontext.py: {fn}: {msg}")


def _check_norms(norms, K):
    if tuple(norms["l1_channels"].shape) != (K,):
        _fail("cue_loss", f"norms are for {tuple(norms['l1_channels'].shape)} channels, not K={K}")
    return norms


def _check_ridge_solve(X, Y, c, lam):
    if X.ndim != 3 or Y.ndim != 3 or c.ndim != 2 or Y.shape[:2] != X.shape[:2] \
            or c.shape != X.shape[:2]:
        _fail("ridge_solve", f"expected X (B, N, P), Y (B, N, K), c (B, N); got "
                             f"{tuple(X.shape)}, {tuple(Y.shape)}, {tuple(c.shape)}")
    if not lam > 0:
        _fail("ridge_solve", f"lam must be > 0 (the system is then positive definite), got {lam}")


def _check_ridge_map(feat_c, cue_c):
    if feat_c.ndim != 4 or cue_c.ndim != 4 or cue_c.shape[0] != feat_c.shape[0] \
            or cue_c.shape[-2:] != feat_c.shape[-2:]:
        _fail("ridge_map", f"feat_c {tuple(feat_c.shape)} and cue_c {tuple(cue_c.shape)} must "
                           "be (B, D, H, W) and (B, K, H, W)")


def _check_apply_map(feat_q, W):
    if feat_q.ndim != 4 or W.ndim != 3 or W.shape[:2] != (feat_q.shape[0], feat_q.shape[1] + 1):
        _fail("apply_map", f"feat_q {tuple(feat_q.shape)} (B, D, H, W) needs W (B, D + 1, K), "
                           f"got {tuple(W.shape)}")


def _check_maps(fn, feat_q, feat_c, cue_q, cue_c, conf_q, conf_c):
    """Shapes: feat (B, D, H, W), cue (B, K, H, W), conf (B, Cm, H, W) with Cm <= K or None."""
    named = dict(feat_q=feat_q, feat_c=feat_c, cue_q=cue_q, cue_c=cue_c, conf_q=conf_q, conf_c=conf_c)
    for name, t in named.items():
        if t is not None and (not torch.is_tensor(t) or t.ndim != 4):
            _fail(fn, f"{name} must be a 4-d tensor (B, C, H, W), got "
                      f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    (B, D), K = feat_c.shape[:2], cue_c.shape[1]
    if feat_q.shape[:2] != (B, D):
        _fail(fn, f"feat_q {tuple(feat_q.shape)} must match feat_c {tuple(feat_c.shape)} in B, D")
    if cue_q.shape[:2] != (B, K) or cue_c.shape[0] != B:
        _fail(fn, f"cue_c {tuple(cue_c.shape)} and cue_q {tuple(cue_q.shape)} must share B={B}, K")
    for view, feat, cue, conf in (("q", feat_q, cue_q, conf_q), ("c", feat_c, cue_c, conf_c)):
        if cue.shape[-2:] != feat.shape[-2:]:
            _fail(fn, f"cue_{view} {tuple(cue.shape)} and feat_{view} {tuple(feat.shape)} differ in H, W")
        if conf is not None and (conf.shape[0] != B or conf.shape[1] > K or conf.shape[-2:] != feat.shape[-2:]):
            _fail(fn, f"conf_{view} {tuple(conf.shape)} must be (B={B}, Cm <= K={K}, H, W) like feat_{view}: "
                      "one confidence channel per masked cue channel")
