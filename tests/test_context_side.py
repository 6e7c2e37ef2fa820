"""The context side of a step, and LILA.features at sizes that need a resize, against slow,
obvious references: plain per-pixel loops on tiny views of a synthetic scene whose depth and flow
are exact.

- A pair (data.PairDataset): the context view is frame t+Δ seen through the context's own grid
  grid_c; its base frame and base cues are frame t+Δ's (the scene's, mirrored with the pair).
- Its cues (train.step_cues): the context's flow (the negated backward flow), depth, flow
  confidence (backward-forward consistency at t+Δ) and depth validity are frame t+Δ's maps read
  at grid_c, the query's are frame t's read at grid_q; one z-scoring for both views.
- The loss (train.lila_loss): the context's confidence decides what W* is fitted on, the
  query's what is scored.
- LILA.features: resized so the sides are multiples of the patch (and the short side is
  short_side), run, resized back: against that done by hand.

Run: python -m pytest -q tests/test_context_side.py
"""
import math

import numpy as np
import pytest
import torch

import data
import incontext
import model
import train

S, R, FRAMES, SEED = 14, 28, 6, 3        # view side; render = base side (2 S); frames; scene seed
ARGS = ["--preset", "tiny", "--weights", "none", "--size", str(S), "--base", str(R), "--no-sd",
        "--synthetic-videos", "1", "--synthetic-frames", str(FRAMES), "--synthetic-seed", str(SEED)]
# cues.py's constants: the flow confidence's temperature (official conf_temp 0.05); the quantile
# that scales a disparity map and the far cut relative to it (ours, cues.disparity_to_depth)
TAU, Q, FAR = 0.05, 0.95, 0.02


def read(m, x, y):
    """Bilinear read of a map m (C, H, W) at the normalised point (x, y) (grid_sample units:
    pixel i's centre at (i + 0.5) * 2 / W - 1), the point clamped to the outermost centres."""
    C, H, W = m.shape
    px = min(max((x + 1) * W / 2 - 0.5, 0.0), W - 1.0)
    py = min(max((y + 1) * H / 2 - 0.5, 0.0), H - 1.0)
    x0, y0 = min(int(px), W - 2), min(int(py), H - 2)
    fx, fy = px - x0, py - y0
    return ((1 - fx) * (1 - fy) * m[:, y0, x0] + fx * (1 - fy) * m[:, y0, x0 + 1]
            + (1 - fx) * fy * m[:, y0 + 1, x0] + fx * fy * m[:, y0 + 1, x0 + 1])


def centre(i, n):
    return (i + 0.5) * 2 / n - 1


def through(grid, m):
    """The map m (C, H, W) read at every pixel of a view's grid (S, S, 2): (C, S, S)."""
    g = grid.double().numpy()
    return np.array([[read(m, *g[i, j]) for j in range(g.shape[1])]
                     for i in range(g.shape[0])]).transpose(2, 0, 1)


def confidence(out, back):
    """1 where a base pixel followed by `out` and back by `back` (read where it landed) returns
    within tau ln 2 of where it started (forward-backward consistency), else 0. (1, H, W)."""
    _, H, W = out.shape
    conf = np.zeros((1, H, W))
    for i in range(H):
        for j in range(W):
            f = out[:, i, j]
            e = math.hypot(*(f + read(back, centre(j, W) + f[0], centre(i, H) + f[1])))
            conf[0, i, j] = math.exp(-e / TAU) > 0.5
    return conf


def depth_and_valid(disp):
    """Relative inverse depth (1, H, W) -> (log depth, valid): scaled by its Q-quantile, far
    pixels (below FAR of it) invalid and clamped there."""
    d = disp / np.quantile(disp[disp > 0], Q)
    return np.log1p(1 / np.maximum(d, FAR)), (d > FAR).astype(float)


def scene_maps(sc, t, flip):
    """Frame t of the scene as a pair shows it: render (3, R, R) in [0, 1] and inverse depth
    (1, R, R), mirrored with the pair."""
    img, disp = sc.frames[t].transpose(2, 0, 1) / 255, 1 / sc.depth[t][None]
    return (img[..., ::-1], disp[..., ::-1]) if flip else (img, disp)


def scene_flow(sc, t, t2, flip):
    """The scene's flow t -> t2 (2, R, R), normalised; a mirrored pair moves the other way."""
    f = sc.flow(t, t2).transpose(2, 0, 1) * 2 / R
    return f[..., ::-1] * np.array([-1.0, 1.0])[:, None, None] if flip else f


@pytest.fixture(scope="module")
def pairs():
    args = train.get_args(ARGS)
    ds = train.make_dataset(args)
    items = [ds[i] for i in range(8)]
    assert {bool(it["flip"]) for it in items} == {False, True}          # both kinds of pair
    return args, items, data.SyntheticScenes(SEED, frames=FRAMES, size=R)


def frame_of(sc, base, flip):
    """Which frame of the scene a base frame (3, R, R) is."""
    return [t for t in range(FRAMES)
            if np.abs(scene_maps(sc, t, flip)[0] - base.numpy()).max() < 1e-6]


def test_a_pairs_context_is_frame_t_plus_delta_through_its_own_grid(pairs):
    _, items, sc = pairs
    for it in items:
        flip = bool(it["flip"])
        (t,), (t2,) = frame_of(sc, it["frames"][0], flip), frame_of(sc, it["frames"][1], flip)
        assert t2 == t + int(it["delta"]) > t
        # the base cues of the context's frame are the scene's exact ones at t + delta
        _, disp2 = scene_maps(sc, t2, flip)
        np.testing.assert_allclose(it["disparity"][1].numpy(), disp2, rtol=1e-5)
        np.testing.assert_allclose(it["flow_bwd"].numpy(), scene_flow(sc, t2, t, flip), atol=1e-5)
        np.testing.assert_allclose(it["flow_fwd"].numpy(), scene_flow(sc, t, t2, flip), atol=1e-5)
        # the context view is frame t + delta where grid_c says, the query view frame t where
        # grid_q says (the views are antialiased cuts: a bilinear read is close, not equal)
        for view, grid, frame in ((1, "grid_c", t2), (0, "grid_q", t)):
            ref = through(it[grid], scene_maps(sc, frame, flip)[0])
            assert np.abs(it["views"][view].numpy() - ref).mean() < 0.03, (view, frame)


def test_step_cues_read_each_views_own_frame_at_its_own_grid(pairs):
    args, items, _ = pairs
    items = [dict(it, disparity=it["disparity"].clone()) for it in items]
    for it in items:       # no disparity (sky, say): the left third of frame t, the top of t+Δ
        it["disparity"][0, :, :, : R // 3] = 0
        it["disparity"][1, :, : R // 3, :] = 0
    batch = torch.utils.data.default_collate(items)
    with torch.no_grad():
        got = train.step_cues(batch, args)
    assert got["names"] == ["flow_x", "flow_y", "depth"]
    raw = {"q": [], "c": []}
    for b, it in enumerate(items):
        fwd, bwd = it["flow_fwd"].double().numpy(), it["flow_bwd"].double().numpy()
        views = {"q": (it["grid_q"], fwd, confidence(fwd, bwd), it["disparity"][0]),
                 "c": (it["grid_c"], -bwd, confidence(bwd, fwd), it["disparity"][1])}
        for v, (grid, flow, conf, disp) in views.items():
            depth, valid = depth_and_valid(disp.double().numpy())
            want_conf = through(grid, np.concatenate([conf, conf, valid]))
            np.testing.assert_allclose(got[f"conf_{v}"][b].numpy(), want_conf, atol=1e-5, err_msg=v)
            raw[v].append(through(grid, np.concatenate([flow, depth])))          # (3, S, S)
    # The cues are those maps up to ONE affine map per cue, shared by both views (z-scoring).
    for name, ch in (("flow", slice(0, 2)), ("depth", slice(2, 3))):
        ref = np.concatenate([np.stack(raw["q"])[:, ch], np.stack(raw["c"])[:, ch]]).ravel()
        have = torch.cat([got["cue_q"][:, ch], got["cue_c"][:, ch]]).double().numpy().ravel()
        A = np.stack([ref, np.ones_like(ref)], 1)
        (scale, shift), *_ = np.linalg.lstsq(A, have, rcond=None)
        assert scale > 0 and np.abs(scale * ref + shift - have).max() < 1e-4 * have.std(), name


@pytest.mark.parametrize("erm", [False, True])
def test_the_context_confidence_decides_the_fit_and_the_query_confidence_the_score(erm):
    """Cues changed where their view's confidence is 0 change nothing; where it is 1 they do."""
    g = torch.Generator().manual_seed(0)
    args = train.get_args(["--preset", "tiny", "--weights", "none"] + (["--erm"] if erm else []))
    D, K, N = 8, 3, 32                         # N = the ridge's pool: one sample per pixel
    feats = torch.randn(2, 1, D, N, N, generator=g)
    cue = torch.einsum("vbdhw,dk->vbkhw", feats, torch.randn(D, K, generator=g))
    cue = cue + 0.3 * torch.randn(cue.shape, generator=g)                   # (2, 1, K, N, N)
    conf = torch.ones(2, 1, K, N, N)
    conf[1, ..., :, : N // 2] = 0              # context: left half not confident
    conf[0, ..., : N // 2, :] = 0              # query: top half not confident
    v = dict(feats_q=feats[0], feats_c=feats[1], cue_q=cue[0], cue_c=cue[1], conf_q=conf[0],
             conf_c=conf[1], names=["flow_x", "flow_y", "depth"])
    head = incontext.ERMHead(D, K) if erm else None
    loss = lambda **kw: float(train.lila_loss(dict(v, **kw), args, head)[0].detach())  # noqa: E731
    base = loss()
    noise = 10 * torch.randn(1, K, N, N, generator=g)
    for view in ("q", "c"):
        off = conf[0 if view == "q" else 1] == 0
        unseen = loss(**{f"cue_{view}": v[f"cue_{view}"] + noise * off})
        seen = loss(**{f"cue_{view}": v[f"cue_{view}"] + noise * ~off})
        assert unseen == pytest.approx(base, rel=1e-5, abs=1e-6), view
        assert abs(seen - base) > 0.05 * base, view


def resize(a, h, w):
    """(C, H, W) -> (C, h, w): each output pixel centre mapped back to the input (half-pixel
    centres) and read bilinearly, no antialiasing."""
    C, H, W = a.shape
    return np.array([[read(a, centre(j, w), centre(i, h)) for j in range(w)]
                     for i in range(h)]).transpose(2, 0, 1)


@pytest.mark.parametrize("hw, short_side, run", [
    ((37, 50), 28, (28, 42)),       # short side 37 -> 28, long side 50 * 28 / 37 = 37.8 -> 42
    ((50, 37), 28, (42, 28)),       # the same, portrait
    ((30, 45), None, (28, 42)),     # no short_side: each side to the nearest multiple of 14
])
def test_features_at_a_size_that_needs_a_resize_equal_resize_run_resize_back(hw, short_side, run):
    lila = model.build_lila("dinov2_vits14", "none", "tiny", seed=0).eval()
    img = torch.rand(3, *hw, generator=torch.Generator().manual_seed(1))
    got = lila.features(img, short_side=short_side)
    x = torch.from_numpy(resize(img.double().numpy(), *run)).float()
    with torch.no_grad():
        _, feats = lila(x[None])                                        # (1, D, *run)
    want = resize(feats[0].double().numpy(), *hw)
    assert got.shape == (lila.decoder.out_dim, *hw)
    np.testing.assert_allclose(got.numpy(), want, atol=2e-4, rtol=0)
