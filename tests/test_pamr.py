"""Tests of pamr.py: the fast `pamr` against the definition `pamr_reference` (float64), the
definition against a per-pixel loop, the cascade against the official `refine`, invariants.

The definition (pamr.pamr_reference) follows the official PAMR (lila/lila/pamr.py, after
Araslanov & Roth 2020) literally: bilinear resizing with align_corners=True, every shifted copy
stacked, torch's unbiased std over the 9 |dilations| window values, 1e-5 + sigma * std, softmax
over the 8 |dilations| neighbours. The reference cascade chains it over LILA's fixed stages
(official lila/lila/dpt_lila.py, TrainLILA: 56^2 x 20, 112^2 x 10, native x 5).
Run: python -m pytest -q tests/test_pamr.py
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import pamr


def reference_pamr(image, mask, dilations, iters, sigma, eps=1e-5, size=None):
    """The definition in float64, after resizing in the inputs' own dtype (float32 for a float32
    input, as the official code): float32 rounding of a resized guide moves the affinities by
    up to ~1e-4 (they divide by sigma * std), far more than the PAMR arithmetic's own."""
    size = tuple(image.shape[-2:]) if size is None else size
    x = F.interpolate(image, size=size, mode="bilinear", align_corners=True).double()
    m = F.interpolate(mask, size=size, mode="bilinear", align_corners=True).double()
    return pamr.pamr_reference(x, m, dilations, iters, sigma, eps)


def loop_pamr(image, mask, dilations, iters, sigma, eps=1e-5):
    """One pixel at a time, python floats: the definition read off the module docstring."""
    B, K, H, W = image.shape
    at = lambda t, b, k, y, x: float(t[b, k, min(max(y, 0), H - 1), min(max(x, 0), W - 1)])  # noqa: E731
    win = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    ring = [o for o in win if o != (0, 0)]
    aff = {}
    for b in range(B):
        for y in range(H):
            for x in range(W):
                logit = [0.0] * len(ring)
                for k in range(K):
                    vals = [at(image, b, k, y + dy, x + dx) for dy, dx in win]
                    mu = sum(vals) / len(vals)
                    std = (sum((v - mu) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
                    for j, (dy, dx) in enumerate(ring):
                        d = abs(at(image, b, k, y, x) - at(image, b, k, y + dy, x + dx))
                        logit[j] -= d / (eps + sigma * std) / K
                top = max(logit)
                e = [2.718281828459045 ** (v - top) for v in logit]
                aff[b, y, x] = [v / sum(e) for v in e]
    m = mask.double().clone()
    for _ in range(iters):
        new = torch.zeros_like(m)
        for b in range(B):
            for c in range(m.shape[1]):
                for y in range(H):
                    for x in range(W):
                        new[b, c, y, x] = sum(a * at(m, b, c, y + dy, x + dx)
                                              for a, (dy, dx) in zip(aff[b, y, x], ring))
        m = new
    return m


def test_the_definition_equals_a_per_pixel_loop():
    image = _rand(1, 2, 6, 7, seed=31).double()
    mask = _rand(1, 2, 6, 7, seed=32).double()
    for dil, iters, sigma in (((1, 3), 2, 0.05), ((1,), 1, 0.3)):
        ref = loop_pamr(image, mask, dil, iters, sigma)
        assert (pamr.pamr_reference(image, mask, dil, iters, sigma) - ref).abs().max() < 1e-12
    assert (pamr.pamr_reference(image, mask, (1,), 1, 0.5) - ref).abs().max() > 1e-4   # sigma


def reference_cascade(image, mask, stages, dilations=(1, 3, 5), sigma=0.05):
    """The official `refine`: each stage gets the full-resolution guide and the last mask."""
    for size, iters in stages:
        size = None if size is None else (size, size)
        mask = reference_pamr(image, mask, dilations, iters, sigma, size=size)
    return mask


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("B, K, C, H, W, h, w, dilations, iters, sigma", [
    (2, 3, 4, 17, 23, 5, 6, (1, 3, 5), 7, 0.05),          # LILA dilations, odd sizes, upsampling
    (1, 1, 1, 9, 7, 9, 7, (1,), 3, 0.1),                 # single channel, same size mask
    (3, 2, 5, 30, 31, 8, 8, (1, 2, 4, 8, 12, 24), 4, 0.1),  # official PAMR dilations > image/2
    (2, 3, 3, 4, 5, 2, 2, (1, 3, 5), 10, 0.05),          # image smaller than the largest ring
    (2, 3, 6, 20, 20, 31, 29, (2, 3), 5, 0.2),           # mask larger than the guide
])
def test_pamr_equals_float64_stacked_reference(B, K, C, H, W, h, w, dilations, iters, sigma):
    image = _rand(B, K, H, W, seed=1)
    mask = torch.randn(B, C, h, w, generator=torch.Generator().manual_seed(2))
    out = pamr.pamr(image, mask, dilations, iters, sigma)
    assert out.shape == (B, C, H, W) and out.dtype == torch.float32
    ref = reference_pamr(image, mask, dilations, iters, sigma)
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_local_std_is_unbiased_window_std_even_with_a_large_offset():
    # the window includes the centre once per dilation (27 values for {1,3,5});
    # a +1000 offset would break an uncentred float32 sum-of-squares formula
    image = _rand(2, 3, 13, 11, seed=3)
    dil = (1, 3, 5)
    window = [(dy * d, dx * d) for d in dil for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    p = max(dil)
    xp = F.pad(image.double(), [p] * 4, mode="replicate")
    ref = torch.stack([xp[..., p + dy:p + dy + 13, p + dx:p + dx + 11] for dy, dx in window], 2).std(2)
    got = pamr.local_std(image + 1000.0, dil)
    assert (got.double() - ref).abs().max().item() < 1e-3       # float32 at 1000: ~1e-4 grid
    got = pamr.local_std(image.float(), dil)
    assert (got.double() - ref).abs().max().item() < 1e-6
    out = pamr.pamr(image + 1000.0, _rand(2, 2, 4, 4, seed=4), dil, 3)
    ref_out = reference_pamr(image + 1000.0, _rand(2, 2, 4, 4, seed=4), dil, 3, 0.05)
    assert (out.double() - ref_out).abs().max().item() < 1e-3


def test_mask_summing_to_one_over_channels_still_does():
    image = _rand(2, 3, 25, 19, seed=5)
    mask = torch.randn(2, 6, 7, 5, generator=torch.Generator().manual_seed(6)).softmax(dim=1)
    out = pamr.pamr(image, mask, (1, 3, 5), 10)
    assert (out.sum(dim=1) - 1).abs().max().item() < 1e-5
    assert out.min().item() >= 0


def test_constant_guide_gives_uniform_weights_and_plain_neighbour_average():
    dil = (1, 2)
    image = torch.full((2, 3, 12, 10), 0.3)
    aff = pamr.pamr_affinity(image, dil)
    assert aff.shape == (2, 16, 12, 10)
    assert (aff - 1 / 16).abs().max().item() < 1e-7
    mask = _rand(2, 4, 12, 10, seed=7)
    # plain average of the 8 ring neighbours per dilation, replicate border, via conv2d
    ring = torch.ones(3, 3)
    ring[1, 1] = 0
    avg = 0
    for d in dil:
        mp = F.pad(mask.reshape(8, 1, 12, 10), [d] * 4, mode="replicate")
        avg = avg + F.conv2d(mp, ring.view(1, 1, 3, 3), dilation=d).reshape(2, 4, 12, 10)
    avg = avg / 16
    out = pamr.pamr(image, mask, dil, iters=1)
    assert (out - avg).abs().max().item() < 1e-6


def test_strong_vertical_edge_stops_leakage_where_a_box_blur_leaks():
    H = W = 24
    image = torch.zeros(1, 3, H, W)
    image[..., W // 2:] = 1.0                                  # vertical edge at column 12
    mask = torch.zeros(1, 1, H, W)
    mask[..., :W // 2] = 1.0                                   # object = left half
    refined = pamr.pamr(image, mask, (1, 3, 5), iters=10)
    blurred = pamr.pamr(torch.zeros_like(image), mask, (1, 3, 5), iters=10)  # same support, uniform
    assert refined[..., W // 2:].max().item() < 1e-6           # nothing crosses the edge
    assert refined[..., :W // 2].min().item() > 1 - 1e-6
    assert blurred[..., W // 2:].max().item() > 0.2            # the blur leaks over it


def test_tiny_contrast_guide_gives_near_uniform_weights_with_official_eps():
    # eps = 1e-5 (official lila/lila/pamr.py) dominates sigma * std ~ 5e-8 here: the weights
    # are nearly uniform; with the 2020 PAMR's eps = 1e-8 the same guide is an edge map
    image = 0.5 + 1e-6 * _rand(2, 3, 12, 12, seed=10)
    aff = pamr.pamr_affinity(image)                            # defaults: LILA, eps 1e-5
    assert (aff - 1 / 24).abs().max().item() < 2e-3
    sharp = pamr.pamr_affinity(image, eps=1e-8)
    assert (sharp - 1 / 24).abs().max().item() > 0.05


@pytest.mark.parametrize("size", [(9, 13), 16, None])
def test_one_stage_resizes_guide_and_mask_bilinearly_with_align_corners(size):
    image = _rand(2, 3, 21, 17, seed=11)
    mask = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(12))
    out = pamr.pamr(image, mask, (1, 3, 5), 4, 0.05, size=size)
    ref_size = (size, size) if isinstance(size, int) else size
    ref = reference_pamr(image, mask, (1, 3, 5), 4, 0.05, size=ref_size)
    assert out.shape == ref.shape == (2, 3) + (ref_size or (21, 17))
    assert (out.double() - ref).abs().max().item() < 1e-5
    # in float64 end to end the two formulations agree to rounding
    out64 = pamr.pamr(image.double(), mask.double(), (1, 3, 5), 4, 0.05, size=size)
    ref64 = reference_pamr(image.double(), mask.double(), (1, 3, 5), 4, 0.05, size=ref_size)
    assert out64.dtype == torch.float64 and (out64 - ref64).abs().max().item() < 1e-10


@pytest.mark.parametrize("H, W", [(112, 112), (40, 30), (224, 224)])
def test_cascade_runs_fixed_56_112_native_stages_as_the_official_refine(H, W, monkeypatch):
    # The stage sizes do not scale with the view: a 112^2 view runs 56, 112, 112 (an
    # output-scaled cascade would run 28, 56, 112), a 40 x 30 view 56^2, 112^2, 40 x 30.
    B, C = (2, 3) if H < 200 else (1, 1)
    image = _rand(B, 3, H, W, seed=13)
    mask = torch.randn(B, C, max(H // 14, 2), max(W // 14, 2),
                       generator=torch.Generator().manual_seed(14))
    seen, propagate = [], pamr.propagate
    monkeypatch.setattr(pamr, "propagate", lambda m, a, d, it: seen.append(
        (tuple(m.shape[-2:]), it)) or propagate(m, a, d, it))
    out = pamr.pamr_cascade(image, mask)
    assert seen == [((56, 56), 20), ((112, 112), 10), ((H, W), 5)]
    assert out.shape == (B, C, H, W) and out.dtype == torch.float32
    ref = reference_cascade(image, mask, ((56, 20), (112, 10), (None, 5)))
    assert (out.double() - ref).abs().max().item() < 1e-5
    if H < 200:                                # float64 end to end: equal to rounding
        out64 = pamr.pamr_cascade(image.double(), mask.double())
        ref64 = reference_cascade(image.double(), mask.double(), ((56, 20), (112, 10), (None, 5)))
        assert (out64 - ref64).abs().max().item() < 1e-10


def test_cascade_custom_stages_and_single_native_stage_equals_pamr():
    image = _rand(3, 3, 42, 56, seed=8)                        # not square
    mask = torch.randn(3, 5, 3, 4, generator=torch.Generator().manual_seed(9))
    one = pamr.pamr_cascade(image, mask, stages=((None, 3),), sigma=0.1)
    assert torch.allclose(one, pamr.pamr(image, mask, (1, 3, 5), 3, 0.1), atol=1e-7)
    coarse = pamr.pamr_cascade(image, mask, stages=((28, 2),))  # ends below the guide's size
    ref = F.interpolate(reference_cascade(image, mask, ((28, 2),)), size=(42, 56),
                        mode="bilinear", align_corners=True)
    assert coarse.shape == (3, 5, 42, 56)
    assert (coarse.double() - ref).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="pamr.py.*stage size"):
        pamr.pamr_cascade(image, mask, stages=((0, 2),))


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if torch.is_tensor(t):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_neighbour_stack_is_ever_materialised():
    B, K, C, H, W, dil = 2, 3, 8, 20, 20, (1, 3, 5)
    P, p = 8 * len(dil), max(dil)
    with _LargestTensor() as probe:
        pamr.pamr(_rand(B, K, H, W), _rand(B, C, 5, 5), dil, 3)
    # the biggest allowed: the (B, P, H, W) affinities or a padded (B, C, H+2p, W+2p) mask
    assert probe.largest <= max(B * P * H * W, B * C * (H + 2 * p) * (W + 2 * p))
    assert probe.largest < B * C * P * H * W // 4


def test_no_gradient_and_clear_errors():
    image = _rand(1, 3, 8, 8).requires_grad_()
    mask = _rand(1, 2, 4, 4).requires_grad_()
    assert not pamr.pamr(image, mask).requires_grad
    with pytest.raises(ValueError, match="pamr.py.*image"):
        pamr.pamr(_rand(3, 8, 8), mask)
    with pytest.raises(ValueError, match="pamr.py.*batch"):
        pamr.pamr(_rand(2, 3, 8, 8), mask)
    with pytest.raises(ValueError, match="pamr.py.*dilations"):
        pamr.pamr(image, mask, dilations=(0, 1))


# --- the official constants are the defaults ----------------------------------------------

def _defaults(fn):
    import inspect
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_every_default_is_lilas():
    # official lila/lila/dpt_lila.py TrainLILA: PAMR(20, [1,3,5], (56, 56)), PAMR(10, [1,3,5],
    # (112, 112)), PAMR(5, [1,3,5], None), sigma = configs/train_ytvos.yaml pamr.sigma 0.05;
    # official lila/lila/pamr.py: eps 1e-5 (1e-5 + sigma * std). One stage's iters default:
    # the 2020 PAMR's 10 (the cascade always passes its own).
    assert pamr.LILA_STAGES == ((56, 20), (112, 10), (None, 5))
    lila = dict(dilations=(1, 3, 5), sigma=0.05, eps=1e-5)
    assert _defaults(pamr.pamr) == dict(lila, iters=10, size=None)
    assert _defaults(pamr.pamr_affinity) == lila
    assert _defaults(pamr.pamr_cascade) == dict(lila, stages=pamr.LILA_STAGES)


def test_default_cascade_is_the_official_refine_with_its_constants_written_out():
    # the reference with every constant spelled out, so a default drifting in pamr.py (and
    # not in the reference's own defaults) fails here
    image = _rand(1, 3, 60, 60, seed=21)
    mask = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(22))
    ref = mask
    for size, iters in (((56, 56), 20), ((112, 112), 10), (None, 5)):
        ref = reference_pamr(image, ref, (1, 3, 5), iters, 0.05, eps=1e-5, size=size)
    out = pamr.pamr_cascade(image, mask)
    assert (out.double() - ref).abs().max().item() < 1e-5
    assert (pamr.pamr_cascade(image, mask, sigma=0.1).double() - ref).abs().max().item() > 1e-3
