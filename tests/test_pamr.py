"""Tests of pamr.py: parity with a slow float64 stack-everything PAMR, and invariants.

The reference below follows the official PAMR (Araslanov & Roth 2020, visinf/1-stage-wseg,
models/mods/pamr.py) literally: it stacks every shifted copy, takes torch's unbiased std
over the 9 * |dilations| window values and softmaxes over the 8 * |dilations| neighbours.
Run: python -m pytest -q tests/test_pamr.py
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import pamr


def reference_pamr(image, mask, dilations, iters, sigma, eps=1e-8):
    """Slow, obvious PAMR in float64: stack all shifted copies (B, X, n, H, W)."""
    x, m = image.double(), mask.double()
    B, K, H, W = x.shape
    m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=True)
    window = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    ring = [o for o in window if o != (0, 0)]

    def stack(t, offsets):
        p = max(dilations)
        tp = F.pad(t, [p] * 4, mode="replicate")
        return torch.stack([tp[..., p + dy:p + dy + H, p + dx:p + dx + W] for dy, dx in offsets], 2)

    std = stack(x, window).std(dim=2, keepdim=True)                        # (B, K, 1, H, W)
    logit = -(x.unsqueeze(2) - stack(x, ring)).abs() / (eps + sigma * std)  # (B, K, P, H, W)
    aff = logit.mean(dim=1).softmax(dim=1).unsqueeze(1)                     # (B, 1, P, H, W)
    for _ in range(iters):
        m = (stack(m, ring) * aff).sum(dim=2)                               # (B, C, H, W)
    return m


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


def test_cascade_output_shape_finite_and_single_stage_equals_pamr():
    image = _rand(3, 3, 42, 56, seed=8)                        # not square, not 224
    mask = torch.randn(3, 5, 3, 4, generator=torch.Generator().manual_seed(9))
    out = pamr.pamr_cascade(image, mask)                       # stages scale to 42/224, 56/224
    assert out.shape == (3, 5, 42, 56) and torch.isfinite(out).all()
    one = pamr.pamr_cascade(image, mask, stages=((224, 3),), sigma=0.1)
    assert torch.allclose(one, pamr.pamr(image, mask, (1, 3, 5), 3, 0.1), atol=1e-7)
    coarse = pamr.pamr_cascade(image, mask, stages=((112, 2),))  # ends below output size
    assert coarse.shape == (3, 5, 42, 56) and torch.isfinite(coarse).all()


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
