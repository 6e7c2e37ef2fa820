"""The linear in-context loss of LILA (ridge regression by Cholesky, L1 + edge loss).

Paper: "Featurising Pixels from Dynamic 3D Scenes with Linear In-Context Learners",
Araslanov et al., CVPR 2026, section 3 ("Linear in-context learning"); official code:
lila/lila/dpt_lila.py (solve_weighted_ridge_regression, forward_cross, flow_boundary_loss).

The decoder is trained so that ONE linear map, fitted in closed form on a *context* frame
to predict its noisy cues (flow, depth, self-distillation), also predicts the cues of a
*query* frame of the same video:

    W* = argmin_W (1/N) sum_n c_n ||x_n^T W - y_n||^2 + lam ||W||^2                 (ridge)
       = (X^T C X / N + lam I)^-1  X^T C Y / N                         (normal equations)
    g_hat = X_q W*                                         (prediction on the full query)
    L = L1(g_hat, g_q) + gamma * (L_x + L_y)                                        (loss)
    L_x = mean | |dx g_hat| - |dx g_q| | * (1 - exp(-|dx g_q| / sigma)),  L_y the same in y

x_n = [f_n, 1]: the decoder's features (already LayerNormed by the decoder, model.py) with a
constant 1 for the bias, average-pooled to 32 x 32 on the context; c_n the product of the
pooled confidence channels, zeroed below 0.5. In the loss every flow/depth channel counts only
where its own confidence is positive; the SD channels count everywhere.

Shapes: B batch, D feature channels (128 for ViT-S), P = D + 1 (bias column), H x W a view
(224^2), K cue channels (2 flow + 1 depth + 32 SD = 35), N = pool^2 context samples (1024),
Cm confidence channels, one per masked cue channel ([flow, flow, depth-valid]).

Deviations from the official code:
- Cholesky (`cholesky_ex` + `cholesky_solve`) instead of LU (`torch.linalg.solve`): the system
  is symmetric positive definite (lam > 0). If float32 round-off ever breaks positive
  definiteness (only with un-normalised, huge features) a small diagonal jitter relative to the
  matrix scale is added to the failed batch elements and the factorisation repeated.
  `solver="lu" | "lstsq"` exist for the benchmark and the tests; on a CPU Cholesky and LU cost
  the same (python bench.py incontext).
- The ridge system is always formed and solved in float32 (float64 if an input is float64),
  also under autocast: see the comment in `ridge_solve`.
- ERM ablation (`ERMHead`, `erm_loss`), the paper's baseline without the in-context step: a
  learned 1x1 conv predicts the cues of each frame (both frames) with the same loss. The
  official release has no code for it.

Run the tests: `python -m pytest -q tests/test_incontext.py`.
Use in train.py (the ERM flag; the head's parameters must join the optimizer):
    head = ERMHead(D, K).to(device) if args.erm else None     # + head.parameters() in AdamW
    if args.erm: loss, parts = erm_loss(head, f_q, f_c, cue_q, cue_c, conf_q, conf_c)
    else:        loss, parts = incontext_loss(f_q, f_c, cue_q, cue_c, conf_q, conf_c)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


# --- plumbing: input checks with clear messages ---

def _fail(fn, msg):
    raise ValueError(f"incontext.py: {fn}: {msg}")


def _check_maps(fn, feat_q, feat_c, cue_q, cue_c, conf_q, conf_c):
    """Shapes: feat (B, D, H, W), cue (B, K, H, W), conf (B, Cm, H, W) with Cm <= K or None."""
    named = dict(feat_q=feat_q, feat_c=feat_c, cue_q=cue_q, cue_c=cue_c,
                 conf_q=conf_q, conf_c=conf_c)
    for name, t in named.items():
        if t is not None and (not torch.is_tensor(t) or t.ndim != 4):
            _fail(fn, f"{name} must be a 4-d tensor (B, C, H, W), got "
                      f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    B, D = feat_c.shape[:2]
    K = cue_c.shape[1]
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
    # leave autocast and work in float32 (eps 6e-8). For LayerNormed features (unit gain)
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


def ridge_weight(conf, size, lstsq_cutoff=0.5):
    """Per-sample ridge weight c_n: the product of the confidence channels, average-pooled to
    `size`, zeroed below `lstsq_cutoff` (official configs/train_ytvos.yaml: lstsq_cutoff 0.5;
    dpt_lila.py pools each channel, multiplies them, then zeroes < 0.5).
    conf (B, Cc, H, W) or None (all confident) -> (B, N) with N = size[0] * size[1]."""
    c = F.adaptive_avg_pool2d(conf, size).prod(1).flatten(1)            # (B, N)
    return c * (c >= lstsq_cutoff)


def _valid(mask, K, conf_cutoff):
    """Per-channel validity (B, K, H, W) bool: the first Cm channels where their confidence
    (B, Cm, H, W) exceeds conf_cutoff, the other K - Cm channels (SD) everywhere."""
    B, Cm, H, W = mask.shape
    ok = mask > conf_cutoff                                              # (B, Cm, H, W)
    return torch.cat([ok, ok.new_ones(B, K - Cm, H, W)], 1)             # (B, K, H, W)


def _abs_grads(x):
    """Absolute forward differences in x and y: (B, C, H, W-1) and (B, C, H-1, W)."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs(), (x[..., 1:, :] - x[..., :-1, :]).abs()


def loss_norms(conf_q, K, H, W, conf_cutoff=0.0, batch=None):
    """The element counts that `cue_loss` divides by, for a whole batch: a dict of "l1" (valid
    elements), "l1_channels" (K,) (valid pixels per channel), "edge_x", "edge_y" (valid x / y
    differences), int64 tensors on conf_q's device. Computed once on the whole batch and
    passed as `norms=` to the loss of each chunk (micro-batch), the chunks' losses and parts
    SUM to the whole batch's. conf_q (B, Cm, H, W) as cue_loss's mask, or None with `batch`."""
    if conf_q is None:
        if batch is None:
            _fail("loss_norms", "conf_q None needs batch=B (the number of pairs)")
        conf_q = torch.ones(batch, 0, H, W)
    if conf_q.ndim != 4 or tuple(conf_q.shape[-2:]) != (H, W) or conf_q.shape[1] > K:
        _fail("loss_norms", f"conf_q {tuple(conf_q.shape)} must be (B, Cm <= K={K}, H={H}, W={W})")
    valid = _valid(conf_q, K, conf_cutoff)                               # (B, K, H, W)
    return {"l1": valid.sum(), "l1_channels": valid.sum((0, 2, 3)),     # (), (K,)
            "edge_x": (valid[..., :, 1:] & valid[..., :, :-1]).sum(),
            "edge_y": (valid[..., 1:, :] & valid[..., :-1, :]).sum()}


def cue_loss(pred, target, mask=None, gamma=1.0, sigma=0.1, edge=True, conf_cutoff=0.0,
             norms=None):
    """L = L1 + gamma * (L_x + L_y), the official loss (dpt_lila.py forward_cross and
    flow_boundary_loss), over the valid elements of every cue channel:

        L1  = mean over valid (k, p) of |pred_k(p) - target_k(p)|
        L_x = mean over valid x-differences of (1 - exp(-|dx target| / sigma)) * | |dx pred| - |dx target| |
        L_y   the same in y;  a difference is valid where both of its pixels are.

    pred, target (B, K, H, W). mask (B, Cm, H, W): the confidence of the first Cm cue channels,
    each channel its own (flow-x and flow-y: the forward-backward check, depth: its validity);
    a channel element is valid where its confidence > conf_cutoff (official conf_cutoff 0.0:
    any confidence at all, e.g. half-confident pixels that bilinear warping creates). The other
    K - Cm channels (SD) are valid everywhere. mask None: all valid.
    Paper / official defaults: gamma (w_edge) 1, sigma (sigma_edge) 0.1.
    norms: `loss_norms` of the whole batch when this is one chunk of it (the means become
    sums over the chunk divided by the whole batch's counts); None: this batch's own.
    Returns (loss, parts): "l1", "edge" scalars and "l1_channels" (K,), the L1 of each channel
    over its valid pixels, all detached (for the log: a cue that does not learn shows there).
    """
    B, K, H, W = pred.shape
    if mask is None:
        mask = pred.new_ones(B, 0, H, W)
    if norms is None:
        norms = loss_norms(mask, K, H, W, conf_cutoff)
    elif tuple(norms["l1_channels"].shape) != (K,):
        _fail("cue_loss", f"norms are for {tuple(norms['l1_channels'].shape)} channels, the cues have {K}")
    n = {k: v.clamp(min=1) for k, v in norms.items()}                   # no valid element: 0
    valid = _valid(mask, K, conf_cutoff)                                 # (B, K, H, W)
    err = (pred - target).abs()                                          # (B, K, H, W)
    l1 = (err * valid).sum() / n["l1"]
    with torch.no_grad():
        per_channel = (err * valid).sum((0, 2, 3)) / n["l1_channels"]   # (K,)
    edge_term = pred.new_zeros(())
    if edge:
        vx = valid[..., :, 1:] & valid[..., :, :-1]                     # (B, K, H, W-1)
        vy = valid[..., 1:, :] & valid[..., :-1, :]                     # (B, K, H-1, W)
        for dp, dt, v, nv in zip(_abs_grads(pred), _abs_grads(target), (vx, vy),
                                 (n["edge_x"], n["edge_y"])):
            weight = 1 - torch.exp(-dt / sigma)                          # ~1 on target edges
            edge_term = edge_term + (weight * (dp - dt).abs() * v).sum() / nv   # L_x + L_y
    loss = l1 + gamma * edge_term if edge else l1
    return loss, {"l1": l1.detach(), "edge": edge_term.detach(), "l1_channels": per_channel}


def ridge_map(feat_c, cue_c, conf_c=None, pool=32, lam=0.1, lstsq_cutoff=0.5,
              solver="cholesky"):
    """The in-context step: W* (B, D + 1, K), the ridge map fitted on the context view.

    X_c = [f, 1] average-pooled to pool x pool (N = 1024 samples; pooling is linear, so a cue
    that is a linear function of the per-pixel features stays one after it), Y_c the cues
    pooled the same way, c_n = `ridge_weight` (the product of the pooled confidences, zeroed
    < lstsq_cutoff), then W* = (X^T C X / N + lam I)^-1 X^T C Y / N (`ridge_solve`).
    feat_c (B, D, H, W), cue_c (B, K, H, W), conf_c (B, Cc, H, W) or None (all confident).
    Paper / official defaults: pool 32, lam 0.1, lstsq_cutoff 0.5."""
    if feat_c.ndim != 4 or cue_c.ndim != 4 or cue_c.shape[0] != feat_c.shape[0] \
            or cue_c.shape[-2:] != feat_c.shape[-2:]:
        _fail("ridge_map", f"feat_c {tuple(feat_c.shape)} and cue_c {tuple(cue_c.shape)} must be "
                           "(B, D, H, W) and (B, K, H, W)")
    B, D, Hc, Wc = feat_c.shape
    size = (min(pool, Hc), min(pool, Wc))                                # pool x pool, N = 1024
    xc = F.adaptive_avg_pool2d(feat_c, size)                             # (B, D, 32, 32)
    xc = xc.flatten(2).transpose(1, 2)                                   # (B, N, D)
    xc = torch.cat([xc, torch.ones_like(xc[..., :1])], -1)               # (B, N, P)  bias column
    yc = F.adaptive_avg_pool2d(cue_c, size).flatten(2).transpose(1, 2)  # (B, N, K)
    if conf_c is None or conf_c.shape[1] == 0:
        c = xc.new_ones(B, xc.shape[1])                                  # (B, N)
    else:
        c = ridge_weight(conf_c.to(xc.dtype), size, lstsq_cutoff)      # (B, N)  zeroed < 0.5
    return ridge_solve(xc, yc, c, lam=lam, solver=solver)                # (B, P, K)  W*


def apply_map(feat_q, W):
    """g_hat = X_q W* at full resolution: feat_q (B, D, H, W), W (B, D + 1, K) -> (B, K, H, W).
    The bias row is added separately, so the (B, D + 1, H, W) [f, 1] is never built."""
    D = feat_q.shape[1]
    if feat_q.ndim != 4 or W.ndim != 3 or W.shape[:2] != (feat_q.shape[0], D + 1):
        _fail("apply_map", f"feat_q {tuple(feat_q.shape)} (B, D, H, W) needs W (B, D + 1, K), "
                           f"got {tuple(W.shape)}")
    xq = feat_q.to(torch.promote_types(feat_q.dtype, W.dtype))           # (B, D, H, W)
    return torch.einsum("bdhw,bdk->bkhw", xq, W[:, :D]) + W[:, D, :, None, None]  # (B, K, H, W)


def incontext_loss(feat_q, feat_c, cue_q, cue_c, conf_q=None, conf_c=None, pool=32,
                   lam=0.1, gamma=1.0, sigma=0.1, edge=True, lstsq_cutoff=0.5, conf_cutoff=0.0,
                   solver="cholesky", norms=None):
    """The linear in-context loss (paper section 3; official dpt_lila.py forward_cross).

    feat_c, feat_q (B, D, H, W) decoder features of the context / query view;
    cue_c, cue_q (B, K, H, W) their cues; conf_c, conf_q (B, Cm, H, W) the confidence of
    the first Cm cue channels, one channel each (e.g. [flow, flow, depth-valid]), the other
    K - Cm channels (SD) need none; or None (all confident).
    Context: W* = `ridge_map` (pool x pool averages, weights zeroed < lstsq_cutoff).
    Query: g_hat = `apply_map` (X_q W* at full resolution), then `cue_loss` (L1 + gamma *
    edge, each channel masked by its own confidence > conf_cutoff; norms: see cue_loss).
    Paper / official defaults: pool 32, lam 0.1, gamma 1, sigma 0.1, lstsq_cutoff 0.5,
    conf_cutoff 0.0. Returns (loss scalar, parts) as cue_loss.
    """
    _check_maps("incontext_loss", feat_q, feat_c, cue_q, cue_c, conf_q, conf_c)
    W = ridge_map(feat_c, cue_c, conf_c, pool, lam, lstsq_cutoff, solver)  # (B, P, K)  W*
    pred = apply_map(feat_q, W)                                          # (B, K, H, W)
    return cue_loss(pred, cue_q, conf_q, gamma, sigma, edge, conf_cutoff, norms)


# --- ablation: ERM (no in-context step) ---

class ERMHead(nn.Module):
    """A learned linear map (1x1 conv, D -> K) from the decoder's features to cues, shared
    across all videos: the paper's "ERM" baseline (DAVIS LP/kNN 63.2/61.1 vs 68.6/73.9).
    feat (B, D, H, W) -> (B, K, H, W)."""

    def __init__(self, dim, n_cues):
        super().__init__()
        self.proj = nn.Conv2d(dim, n_cues, kernel_size=1)                # W and bias, learned

    def forward(self, feat):
        return self.proj(feat)                                           # (B, K, H, W)


def erm_loss(head, feat_q, feat_c, cue_q, cue_c, conf_q=None, conf_c=None, gamma=1.0,
             sigma=0.1, edge=True, conf_cutoff=0.0, norms=None, **ridge_kw):
    """ERM ablation: predict each frame's cues with `head` and apply the same L1 + gamma * edge
    loss (`cue_loss`) to both frames, each with its own confidence; the mean of the two.
    Same shapes and keywords as `incontext_loss`, so the flag only swaps the function; the
    ridge step's keywords (pool, lam, lstsq_cutoff, solver) are accepted and unused.
    norms: (loss_norms of the queries, loss_norms of the contexts) of the whole batch, or None.
    Returns (loss, parts)."""
    _check_maps("erm_loss", feat_q, feat_c, cue_q, cue_c, conf_q, conf_c)
    norms_q, norms_c = (None, None) if norms is None else norms
    losses = [cue_loss(head(f), g, m, gamma, sigma, edge, conf_cutoff, n)
              for f, g, m, n in ((feat_q, cue_q, conf_q, norms_q), (feat_c, cue_c, conf_c, norms_c))]
    loss = (losses[0][0] + losses[1][0]) / 2
    parts = {k: (losses[0][1][k] + losses[1][1][k]) / 2 for k in losses[0][1]}
    return loss, parts
