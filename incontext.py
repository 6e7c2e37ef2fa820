"""The linear in-context loss of LILA (ridge regression by Cholesky, masked L1 + edge loss).

Paper: "Featurising Pixels from Dynamic 3D Scenes with Linear In-Context Learners",
Araslanov et al., CVPR 2026, section "Linear in-context learning" (DESIGN.md section 2).

The decoder is trained so that ONE linear map, fitted in closed form on a *context* frame
to predict its noisy cues (flow, depth, self-distillation), also predicts the cues of a
*query* frame of the same video:

    W* = argmin_W (1/N) sum_n c_n ||x_n^T W - y_n||^2 + lam ||W||^2                 (ridge)
       = (X^T C X / N + lam I)^-1  X^T C Y / N                         (normal equations)
    g_hat = X_q W*                                         (prediction on the full query)
    L = masked L1(g_hat, g_q) + gamma * edge(g_hat, g_q)                            (loss)
    edge = | |grad g_hat| - |grad g_q| | * (1 - exp(-|grad g_q| / sigma)),  grad in x and y

Shapes: B batch, D feature channels (128 for ViT-S), P = D + 1 (bias column), H x W a view
(224^2), K cue channels (2 flow + 1 depth + 32 SD = 35), N = pool^2 context samples (1024),
Cc confidence channels (e.g. flow forward-backward check and depth validity).

Deviations and choices (official code: torch.linalg.solve, i.e. LU):
- Cholesky (`cholesky_ex` + `cholesky_solve`) instead of LU: the system is symmetric positive
  definite (lam > 0). If float32 round-off ever breaks positive definiteness (only with
  un-normalised, huge features) a small diagonal jitter relative to the matrix scale is added
  to the failed batch elements and the factorisation repeated; this never fires for the
  LayerNorm'd features of the loss. `solver="lu" | "lstsq"` exist for the benchmark/tests.
- The ridge system is always formed and solved in float32 (float64 if an input is float64),
  also under autocast: see the comment in `ridge_solve`.
- The loss applies a LayerNorm (no affine) over channels itself, so the features it sees
  are unit-scale whatever the decoder outputs (model.py's final LayerNorm has a learnable
  affine, so this is not a no-op). Cost: on CPU at paper size (B = 32) the loss's fwd+bwd is
  ~11 s, ~2/3 of it the full-resolution LayerNorms and prediction, ~1/3 the L1 + edge terms;
  the ridge solve itself is ~0.3 % (bench: python /work/bench_parts/incontext.py).
- The masked means are normalised by the mask sums over the whole batch (0 if the mask is empty).
- ERM ablation (`ERMHead`, `erm_loss`): no in-context step, a learned 1x1 conv predicts the
  cues of each frame (both frames) with the same L1 + edge terms.

Run the tests: `python -m pytest -q tests/test_incontext.py`.
Use in train.py (the ERM flag; the head's parameters must join the optimizer):
    head = ERMHead(D, K).to(device) if args.erm else None     # + head.parameters() in AdamW
    if args.erm: loss, parts = erm_loss(head, f_c, f_q, cue_c, cue_q, conf_c, conf_q)
    else:        loss, parts = incontext_loss(f_c, f_q, cue_c, cue_q, conf_c, conf_q)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


# --- plumbing: input checks with clear messages ---

def _fail(fn, msg):
    raise ValueError(f"incontext.py: {fn}: {msg}")


def _check_maps(fn, feat_ctx, feat_q, cue_ctx, cue_q, conf_ctx, conf_q, n_masked):
    """Shapes: feat (B, D, H, W), cue (B, K, H, W), conf (B, Cc, H, W) or None, per view."""
    named = dict(feat_ctx=feat_ctx, feat_q=feat_q, cue_ctx=cue_ctx, cue_q=cue_q,
                 conf_ctx=conf_ctx, conf_q=conf_q)
    for name, t in named.items():
        if t is not None and (not torch.is_tensor(t) or t.ndim != 4):
            _fail(fn, f"{name} must be a 4-d tensor (B, C, H, W), got "
                      f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    B, D = feat_ctx.shape[:2]
    K = cue_ctx.shape[1]
    if feat_q.shape[:2] != (B, D):
        _fail(fn, f"feat_q {tuple(feat_q.shape)} must match feat_ctx {tuple(feat_ctx.shape)} in B, D")
    if cue_q.shape[:2] != (B, K) or cue_ctx.shape[0] != B:
        _fail(fn, f"cue_ctx {tuple(cue_ctx.shape)} and cue_q {tuple(cue_q.shape)} must share B={B}, K")
    for view, feat, cue, conf in (("ctx", feat_ctx, cue_ctx, conf_ctx), ("q", feat_q, cue_q, conf_q)):
        if cue.shape[-2:] != feat.shape[-2:]:
            _fail(fn, f"cue_{view} {tuple(cue.shape)} and feat_{view} {tuple(feat.shape)} differ in H, W")
        if conf is not None and (conf.shape[0] != B or conf.shape[-2:] != feat.shape[-2:]):
            _fail(fn, f"conf_{view} {tuple(conf.shape)} must be (B={B}, Cc, H, W) like feat_{view}")
    if not 0 <= n_masked <= K:
        _fail(fn, f"n_masked={n_masked} must lie in [0, K={K}]")


# --- method ---

def ridge_solve(X, Y, w, lam=0.1, solver="cholesky", jitter=1e-5, retries=3):
    """Weighted ridge regression, batched:  W* = (X^T C X / N + lam I)^-1 X^T C Y / N.

    X (B, N, P), Y (B, N, K), w (B, N) >= 0 (the diagonal of C), lam > 0 (paper: 0.1).
    Returns W* (B, P, K), differentiable with respect to X and Y (and w).
    The 1/N (not 1/sum(w)) follows the paper's objective (1/N) sum_n c_n ||x_n^T W - y_n||^2
    + lam ||W||^2: unconfident samples also weaken the data term relative to lam, and
    all-zero weights give W* = 0 instead of a division by zero.
    solver: "cholesky" (ours), "lu" (torch.linalg.solve, the official code), "lstsq" (the
    augmented system [sqrt(w/N) X; sqrt(lam) I] W = [sqrt(w/N) Y; 0]); the last two are
    here for the benchmark and the tests. jitter/retries: see the Cholesky fallback below.
    """
    if X.ndim != 3 or Y.ndim != 3 or w.ndim != 2 or Y.shape[:2] != X.shape[:2] \
            or w.shape != X.shape[:2]:
        _fail("ridge_solve", f"expected X (B, N, P), Y (B, N, K), w (B, N); got "
                             f"{tuple(X.shape)}, {tuple(Y.shape)}, {tuple(w.shape)}")
    if not lam > 0:
        _fail("ridge_solve", f"lam must be > 0 (the system is then positive definite), got {lam}")
    # Precision. Under autocast the products below would run in fp16/bf16: a Gram entry is a
    # sum of N = 1024 products, fp16 overflows at 65504 and bf16 keeps 8 mantissa bits, so
    # the round-off (~N * 4e-3 relative) can exceed lam and make the matrix indefinite. So we
    # leave autocast and work in float32 (eps 6e-8). For the loss's LayerNorm'd features
    # ||x_n||^2 = D + 1, the eigenvalues of A lie in [lam, lam + D + 1], a condition number
    # <= 1 + (D + 1) / lam ~ 1.3e3: float32 then loses < 1e-4 relative and is plenty.
    # float64 is needed only when the condition number nears 1 / eps32 ~ 1e7, e.g. raw
    # features with ||x||^2 / lam > 1e6: pass float64 inputs and everything runs in float64.
    # The system is tiny (P x P = 129^2, 1 GFLOP for B = 32), so this costs nothing.
    dtype = torch.float64 if torch.float64 in (X.dtype, Y.dtype, w.dtype) else torch.float32
    with torch.autocast(X.device.type, enabled=False):
        X, Y, w = X.to(dtype), Y.to(dtype), w.to(dtype)
        B, N, P = X.shape
        eye = torch.eye(P, dtype=dtype, device=X.device)                 # (P, P)
        if solver == "lstsq":
            s = (w / N).clamp_min(0).sqrt().unsqueeze(-1)                # (B, N, 1)
            Xa = torch.cat([s * X, lam ** 0.5 * eye.expand(B, P, P)], 1)  # (B, N + P, P)
            Ya = torch.cat([s * Y, Y.new_zeros(B, P, Y.shape[2])], 1)   # (B, N + P, K)
            return torch.linalg.lstsq(Xa, Ya).solution                   # (B, P, K)
        Xw = X * (w / N).unsqueeze(-1)                                   # (B, N, P)  C X / N
        A = Xw.transpose(1, 2) @ X + lam * eye                           # (B, P, P)  X^T C X / N + lam I
        b = Xw.transpose(1, 2) @ Y                                       # (B, P, K)  X^T C Y / N
        if solver == "lu":
            return torch.linalg.solve(A, b)                              # (B, P, K)
        if solver != "cholesky":
            _fail("ridge_solve", f"solver must be 'cholesky', 'lu' or 'lstsq', got {solver!r}")
        L, info = torch.linalg.cholesky_ex(A)                            # (B, P, P) lower
        # Fallback, only if needed: info > 0 marks batch elements whose float32 factorisation
        # broke down (A is SPD in exact arithmetic, so only round-off does this: huge,
        # duplicated columns). Add jitter * (largest diagonal entry) * I to those elements,
        # x10 per retry. The check is one host sync per call (the training loop syncs per
        # step anyway for its non-finite-loss check).
        for attempt in range(retries):
            failed = info > 0                                            # (B,)
            if not bool(failed.any()):
                break
            scale = A.diagonal(dim1=1, dim2=2).amax(-1) * jitter * 10 ** attempt   # (B,)
            A = A + (scale * failed)[:, None, None] * eye                # (B, P, P)
            L, info = torch.linalg.cholesky_ex(A)
        if bool((info > 0).any()):
            _fail("ridge_solve", "Cholesky failed even with jitter; are X, Y, w finite? "
                                 f"(max |X| = {X.abs().max().item():.3g})")
        return torch.cholesky_solve(b, L)                                # (B, P, K)


def layer_norm_channels(feat):
    """Per-pixel LayerNorm over channels, no affine (the paper's LayerNorm'd features).
    feat (B, D, H, W) -> (B, D, H, W)."""
    return F.layer_norm(feat.movedim(1, -1), feat.shape[1:2]).movedim(-1, 1)


def confidence(conf, threshold=0.5):
    """Per-pixel confidence: product of the confidence channels, zeroed below `threshold`
    (paper: 0.5). conf (B, Cc, H, W) or None (all confident) -> (B, 1, H, W) or None."""
    if conf is None:
        return None
    c = conf.prod(dim=1, keepdim=True)                                   # (B, 1, H, W)
    return c * (c >= threshold)                                          # (B, 1, H, W)


def _masked_mean(x, m):
    """Sum(m * x) / sum(m) over everything (0 if the mask is empty); m None means all ones.
    x (B, C, H, W), m (B, 1, H, W) or None."""
    if m is None:
        return x.mean()
    den = m.sum() * x.shape[1]
    return (m * x).sum() / torch.where(den > 0, den, torch.ones_like(den))


def _abs_grads(x):
    """Absolute forward differences in x and y: (B, C, H, W-1) and (B, C, H-1, W)."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs(), (x[..., 1:, :] - x[..., :-1, :]).abs()


def cue_loss(pred, target, mask=None, n_masked=3, gamma=1.0, sigma=0.1, edge=True):
    """L = masked L1(pred, target) + gamma * edge loss, per channel, averaged over channels.

    pred, target (B, K, H, W); mask (B, 1, H, W) confidence of the target view (or None).
    The first `n_masked` channels (flow 2 + depth 1) use the mask; the rest (SD) do not.
    edge = | |grad pred| - |grad target| | * (1 - exp(-|grad target| / sigma)) over x and y
    differences (a difference is masked unless both its pixels are confident).
    Paper defaults: gamma = 1, sigma = 0.1. Returns (loss, parts of detached tensors).
    """
    K = pred.shape[1]
    groups = [(slice(0, n_masked), mask), (slice(n_masked, K), None)]   # (flow+depth, SD)
    l1, edge_term, parts = 0.0, 0.0, {}
    for (sl, m), name in zip(groups, ("l1_flow_depth", "l1_sd")):
        p, t = pred[:, sl], target[:, sl]                                # (B, k, H, W)
        share = p.shape[1] / K                                           # channels of this group
        if share == 0:
            parts[name] = pred.new_zeros(()).detach()
            continue
        g = _masked_mean((p - t).abs(), m)
        parts[name] = g.detach()
        l1 = l1 + share * g
        if edge:
            mx = my = None
            if m is not None:
                mx, my = m[..., :, 1:] * m[..., :, :-1], m[..., 1:, :] * m[..., :-1, :]
            for dp, dt, md in zip(_abs_grads(p), _abs_grads(t), (mx, my)):
                weight = 1 - torch.exp(-dt / sigma)                      # ~1 on target edges
                edge_term = edge_term + share / 2 * _masked_mean(weight * (dp - dt).abs(), md)
    loss = l1 + gamma * edge_term if edge else l1
    parts["l1"] = l1.detach()
    parts["edge"] = torch.as_tensor(edge_term).detach()
    return loss, parts


def incontext_loss(feat_ctx, feat_q, cue_ctx, cue_q, conf_ctx=None, conf_q=None, n_masked=3,
                   pool=32, lam=0.1, gamma=1.0, sigma=0.1, edge=True, threshold=0.5,
                   solver="cholesky"):
    """The linear in-context loss (DESIGN.md "Linear in-context loss").

    feat_ctx, feat_q (B, D, H, W) decoder features of the context / query view;
    cue_ctx, cue_q (B, K, H, W) their cues, the first `n_masked` (flow 2 + depth 1) masked
    by confidence, the rest (SD) not; conf_ctx, conf_q (B, Cc, H, W) confidence channels
    (product, thresholded at `threshold`), or None. Paper defaults: pool 32 (N = 1024),
    lam 0.1, gamma 1, sigma 0.1, threshold 0.5.
    Returns (loss scalar, parts): "l1", "edge", "l1_flow_depth", "l1_sd" as detached tensors.
    """
    _check_maps("incontext_loss", feat_ctx, feat_q, cue_ctx, cue_q, conf_ctx, conf_q, n_masked)
    B, D, Hc, Wc = feat_ctx.shape
    size = (min(pool, Hc), min(pool, Wc))                                # pool x pool, N = 1024
    # Context: X_c = [LayerNorm(f), 1] pooled; pooling after the LayerNorm is linear, so a cue
    # that is a linear function of the per-pixel features stays one after pooling.
    xc = F.adaptive_avg_pool2d(layer_norm_channels(feat_ctx), size)      # (B, D, 32, 32)
    xc = xc.flatten(2).transpose(1, 2)                                   # (B, N, D)
    xc = torch.cat([xc, torch.ones_like(xc[..., :1])], -1)               # (B, N, P)  bias column
    yc = F.adaptive_avg_pool2d(cue_ctx, size).flatten(2).transpose(1, 2)  # (B, N, K)
    if conf_ctx is None:
        c = xc.new_ones(B, xc.shape[1])                                  # (B, N)
    else:
        c = F.adaptive_avg_pool2d(conf_ctx.prod(1, keepdim=True).to(xc.dtype), size)  # (B, 1, 32, 32)
        c = (c * (c >= threshold)).flatten(1)                            # (B, N)  zeroed < 0.5
    W = ridge_solve(xc, yc, c, lam=lam, solver=solver)                   # (B, P, K)  W*
    # Query: g_hat = X_q W* at full resolution; the bias row added separately, so the
    # (B, P, H, W) matrix with its column of ones is never built.
    xq = layer_norm_channels(feat_q)                                     # (B, D, H, W)
    xq = xq.to(torch.promote_types(xq.dtype, W.dtype))
    pred = torch.einsum("bdhw,bdk->bkhw", xq, W[:, :D]) + W[:, D, :, None, None]  # (B, K, H, W)
    mask = confidence(conf_q, threshold)                                 # (B, 1, H, W)
    return cue_loss(pred, cue_q, mask, n_masked, gamma, sigma, edge)


# --- ablation: ERM (no in-context step) ---

class ERMHead(nn.Module):
    """A learned linear map (1x1 conv, D -> K) from LayerNorm'd features to cues, shared
    across all videos: the paper's "ERM" baseline (DAVIS LP/kNN 63.2/61.1 vs 68.6/73.9).
    feat (B, D, H, W) -> (B, K, H, W)."""

    def __init__(self, dim, n_cues):
        super().__init__()
        self.proj = nn.Conv2d(dim, n_cues, kernel_size=1)                # W and bias, learned

    def forward(self, feat):
        return self.proj(layer_norm_channels(feat))                      # (B, K, H, W)


def erm_loss(head, feat_ctx, feat_q, cue_ctx, cue_q, conf_ctx=None, conf_q=None, n_masked=3,
             pool=None, lam=None, gamma=1.0, sigma=0.1, edge=True, threshold=0.5, solver=None):
    """ERM ablation: predict each frame's cues with `head` and apply the same masked L1 +
    gamma * edge loss to both frames (each with its own confidence); the mean of the two.
    Same shapes, keywords and defaults as `incontext_loss`, so the flag only swaps the
    function; `pool`, `lam`, `solver` belong to the ridge step and are ignored here.
    Returns (loss, parts)."""
    _check_maps("erm_loss", feat_ctx, feat_q, cue_ctx, cue_q, conf_ctx, conf_q, n_masked)
    losses = [cue_loss(head(f), g, confidence(m, threshold), n_masked, gamma, sigma, edge)
              for f, g, m in ((feat_ctx, cue_ctx, conf_ctx), (feat_q, cue_q, conf_q))]
    loss = (losses[0][0] + losses[1][0]) / 2
    parts = {k: (losses[0][1][k] + losses[1][1][k]) / 2 for k in losses[0][1]}
    return loss, parts
