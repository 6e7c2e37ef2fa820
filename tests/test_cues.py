"""Tests for cues.py: the real pre/post-processing driven by small stand-in networks, the
depth conversion, flow confidence on exact synthetic flows, the SD cue, the cue cache.
Run: python -m pytest -q tests/test_cues.py
"""
import errno
import importlib
import os
import shutil
import subprocess
import sys
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import cues  # noqa: E402
from cues import (DepthCue, FlowCue, disparity_to_depth, flow_confidence,  # noqa: E402
                  forward_backward_error, sd_channels, sd_cue, write_cue_cache)

REPO = os.path.join(os.path.dirname(__file__), "..")


class StandInRAFT(nn.Module):
    """RAFT's call signature: net(img1, img2) in [-1, 1] -> list of (B, 2, H, W) pixel flows.
    Records its inputs. Flow = (k_u + red channel of img1, k_v) pixels, so an unpadding error
    moves the content; a coarse first iterate checks that the last one is used."""

    def __init__(self, k=(3.0, -2.0), fail_after=None):
        super().__init__()
        self.k, self.calls, self.inputs, self.fail_after = k, 0, [], fail_after

    def forward(self, img1, img2):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("stand-in interrupted")
        self.calls += 1
        self.inputs.append((img1.clone(), img2.clone()))
        B, _, H, W = img1.shape
        u = self.k[0] + img1[:, :1] + 0.5 * img2[:, 1:2]
        v = torch.full_like(u, self.k[1])
        last = torch.cat([u, v], dim=1)                                # (B, 2, H, W)
        return [torch.zeros_like(last), last]


class StandInMiDaS(nn.Module):
    """MiDaS-like: (B, 3, h, w) -> (B, h, w) positive, records its input."""

    def __init__(self, fail_after=None):
        super().__init__()
        self.calls, self.inputs, self.fail_after = 0, [], fail_after

    def forward(self, x):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("stand-in interrupted")
        self.calls += 1
        self.inputs.append(x.clone())
        return 1.0 + x.mean(dim=1).abs()                                # (B, h, w)


# --- flow ---

@pytest.mark.parametrize("H,W", [(37, 53), (24, 31), (16, 16)])
def test_flow_cue_constant_k_pixels_gives_2k_over_W_and_undoes_padding(H, W):
    torch.manual_seed(0)
    img1, img2 = torch.rand(2, 3, H, W), torch.rand(2, 3, H, W)
    net = StandInRAFT(k=(3.0, -2.0))
    fwd, bwd = FlowCue(net=net)(img1, img2)
    assert fwd.shape == bwd.shape == (2, 2, H, W)
    assert net.calls == 1                                               # both directions, one call
    a, b = net.inputs[0]
    assert a.shape[0] == 4 and a.shape[-2] % 8 == 0 and a.shape[-1] % 8 == 0
    assert a.min() >= -1 and a.max() <= 1 and a.min() < -0.9 and a.max() > 0.9
    # slow obvious reference: the stand-in's pixel flow on the unpadded images, then * 2 / W
    ref_u_f = (3.0 + (2 * img1[:, 0] - 1) + 0.5 * (2 * img2[:, 1] - 1)) * 2 / W
    ref_u_b = (3.0 + (2 * img2[:, 0] - 1) + 0.5 * (2 * img1[:, 1] - 1)) * 2 / W
    torch.testing.assert_close(fwd[:, 0], ref_u_f, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(bwd[:, 0], ref_u_b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fwd[:, 1], torch.full((2, H, W), -2.0 * 2 / H))


def test_flow_cue_padding_replicates_the_border():
    img = torch.rand(1, 3, 13, 21)
    net = StandInRAFT()
    FlowCue(net=net)(img, img)
    a = net.inputs[0][0]                                                # (2, 3, 16, 24)
    top, left = (16 - 13) // 2, (24 - 21) // 2
    torch.testing.assert_close(a[:1, :, top:top + 13, left:left + 21], img * 2 - 1)
    torch.testing.assert_close(a[:1, :, 0, left:left + 21], img[:, :, 0] * 2 - 1)
    torch.testing.assert_close(a[:1, :, -1, -1], img[:, :, -1, -1] * 2 - 1)


def slow_flow_confidence(f, b, tau):
    """Per-pixel loop: pixel centre p, target q = p + f(p) in pixels, bilinear with clamping.
    Returns (confidence, error e), each (1, 1, H, W)."""
    _, _, H, W = f.shape
    out, err = torch.zeros(1, 1, H, W), torch.zeros(1, 1, H, W)
    for y in range(H):
        for x in range(W):
            qx = min(max(x + f[0, 0, y, x].item() * W / 2, 0.0), W - 1.0)
            qy = min(max(y + f[0, 1, y, x].item() * H / 2, 0.0), H - 1.0)
            x0, y0 = int(np.floor(qx)), int(np.floor(qy))
            x1, y1 = min(x0 + 1, W - 1), min(y0 + 1, H - 1)
            ax, ay = qx - x0, qy - y0
            s = ((1 - ax) * (1 - ay) * b[0, :, y0, x0] + ax * (1 - ay) * b[0, :, y0, x1]
                 + (1 - ax) * ay * b[0, :, y1, x0] + ax * ay * b[0, :, y1, x1])
            e = (f[0, :, y, x] + s).norm().item()
            out[0, 0, y, x], err[0, 0, y, x] = float(np.exp(-e / tau) > 0.5), e
    return out, err


def test_flow_confidence_matches_slow_pixel_loop():
    g = torch.Generator().manual_seed(1)
    f = (torch.rand(1, 2, 9, 11, generator=g) - 0.5) * 0.6
    b = -f + (torch.rand(1, 2, 9, 11, generator=g) - 0.5) * 0.15
    c = flow_confidence(f, b, tau=0.05)
    ref, ref_err = slow_flow_confidence(f, b, 0.05)
    assert c.shape == (1, 1, 9, 11)
    assert 0 < c.sum() < c.numel()                                      # the test can discriminate
    assert (c == ref).float().mean() >= 0.98                            # ties at the threshold aside
    torch.testing.assert_close(forward_backward_error(f, b), ref_err, atol=1e-5, rtol=0)


def official_style_error(f, b):
    """The official func_utils.py flow_sample + compute_uniconf error, written out: integer
    pixel-index grid, displacement = normalised flow * H / 2 for BOTH components, grid
    normalised with align_corners=True, bilinear, border padding."""
    _, _, H, W = f.shape
    yy, xx = torch.meshgrid(torch.arange(H, dtype=f.dtype), torch.arange(W, dtype=f.dtype),
                            indexing="ij")
    px, py = xx + f[:, 0] * H / 2, yy + f[:, 1] * H / 2                 # (B, H, W) pixels
    grid = torch.stack([2 * px / (W - 1) - 1, 2 * py / (H - 1) - 1], dim=-1)
    at = F.grid_sample(b, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return (f + at).norm(dim=1, keepdim=True)                           # (B, 1, H, W)


def test_forward_backward_error_equals_the_official_sampling_on_square_maps():
    g = torch.Generator().manual_seed(7)
    f = (torch.rand(3, 2, 24, 24, generator=g) - 0.5) * 0.8             # lands off-image too
    b = -f.flip(-1) + (torch.rand(3, 2, 24, 24, generator=g) - 0.5) * 0.2
    ours, theirs = forward_backward_error(f, b), official_style_error(f, b)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    conf, official = flow_confidence(f, b, 0.05), (torch.exp(-theirs / 0.05) > 0.5).float()
    assert 0 < official.sum() < official.numel()                        # the test can discriminate
    assert (conf != official).sum() <= 2                                # rounding ties at 0.5 aside


def test_flow_confidence_on_exact_synthetic_flows_and_corrupted_region():
    from data import SyntheticScenes
    video = SyntheticScenes(seed=4, frames=6, size=64)
    video = video[0] if not hasattr(video, "flow") else video
    H, W = video.frames.shape[1:3]
    to_t = lambda a: cues.pixels_to_normalised(torch.from_numpy(a).permute(2, 0, 1)[None].float())
    # gap 5 (the paper's largest): flows up to ~16 px, so skipping the warp would fail (~64 %)
    fwd, bwd = to_t(video.flow(0, 5)), to_t(video.flow(5, 0))           # (1, 2, H, W)
    visible = ~torch.from_numpy(video.occluded(0, 5))
    conf = flow_confidence(fwd, bwd)[0, 0].bool()
    assert conf[visible].float().mean() >= 0.95
    # corrupt the backward flow in a square of frame 2: pixels of frame 1 landing there fail
    bad = bwd.clone()
    bad[:, :, 16:48, 16:48] += 0.5
    conf_bad = flow_confidence(fwd, bad)[0, 0].bool()
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    tx, ty = xs + fwd[0, 0] * W / 2, ys + fwd[0, 1] * H / 2              # landing points, pixels
    inside = (tx > 18) & (tx < 45) & (ty > 18) & (ty < 45) & visible
    assert inside.sum() > 100
    assert conf_bad[inside].float().mean() < 0.05


# --- depth ---

def test_midas_input_size_follows_the_official_resize_rule():
    # hand-computed from intel-isl/MiDaS Resize.get_size (keep_aspect_ratio, multiple of 32)
    assert cues.midas_input_size(224, 224, 256, "upper_bound") == (256, 256)
    assert cues.midas_input_size(480, 854, 256, "upper_bound") == (128, 256)   # 143.9 -> 128
    assert cues.midas_input_size(480, 854, 384, "minimal") == (384, 672)       # 683.2 -> 672
    assert cues.midas_input_size(224, 224, 384, "minimal") == (384, 384)
    # |1 - 384/320| == |1 - 384/480| exactly: a tie, where get_size fits the height
    assert cues.midas_input_size(320, 480, 384, "minimal") == (384, 576)
    assert cues.midas_input_size(480, 320, 384, "minimal") == (384, 256)


@pytest.mark.parametrize("name", ["MiDaS_small", "DPT_Hybrid"])
def test_depth_cue_preprocesses_to_multiples_of_32_normalised_and_resizes_back(name):
    img = torch.rand(2, 3, 45, 67)
    net = StandInMiDaS()
    disp = DepthCue(name, net=net)(img)
    assert disp.shape == (2, 1, 45, 67) and (disp > 0).all()
    x = net.inputs[0]
    assert x.shape[-2] % 32 == 0 and x.shape[-1] % 32 == 0
    side, method, mean, std = cues.MIDAS_PREPROCESS[name]
    assert tuple(x.shape[-2:]) == cues.midas_input_size(45, 67, side, method)
    raw = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    ref = F.interpolate(img, size=x.shape[-2:], mode="bicubic", align_corners=False)
    torch.testing.assert_close(raw, ref, atol=1e-5, rtol=1e-5)
    # value range: black and white map to (0 - mean) / std and (1 - mean) / std per channel
    DepthCue(name, net=net)(torch.cat([torch.zeros(1, 3, 45, 67), torch.ones(1, 3, 45, 67)]))
    lo, hi = net.inputs[-1][0].amin(dim=(1, 2)), net.inputs[-1][1].amax(dim=(1, 2))
    torch.testing.assert_close(lo, -torch.tensor(mean) / torch.tensor(std))
    torch.testing.assert_close(hi, (1 - torch.tensor(mean)) / torch.tensor(std))


class ConvRAFT(nn.Module):
    """RAFT's call signature with a conv, which a CPU bf16 autocast runs in bf16."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 2, 3, padding=1)

    def forward(self, a, b):
        return [self.conv(torch.cat([a, b], dim=1)) * 10]


class ConvMiDaS(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x):
        return self.conv(x).squeeze(1).abs() + 1


def test_cue_networks_run_in_float32_inside_a_bf16_autocast():
    torch.manual_seed(0)
    img1, img2 = torch.rand(2, 3, 24, 32), torch.rand(2, 3, 24, 32)
    flow_cue, depth_cue = FlowCue(net=ConvRAFT()), DepthCue(net=ConvMiDaS())
    x = torch.rand(2, 6, 24, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        raw = flow_cue.net.conv(x)                      # the stand-in alone IS changed by autocast
        fwd_a, bwd_a = flow_cue(img1, img2)
        disp_a = depth_cue(img1)
        sd_a = sd_cue(torch.randn(2, 8, 2, 3, generator=torch.Generator().manual_seed(1)), img1,
                      n_channels=4, generator=torch.Generator().manual_seed(2))
    assert raw.dtype == torch.bfloat16
    assert (raw.float() - flow_cue.net.conv(x)).abs().max() > 1e-4
    fwd, bwd = flow_cue(img1, img2)
    sd = sd_cue(torch.randn(2, 8, 2, 3, generator=torch.Generator().manual_seed(1)), img1,
                n_channels=4, generator=torch.Generator().manual_seed(2))
    for a, b in ((fwd_a, fwd), (bwd_a, bwd), (disp_a, depth_cue(img1)), (sd_a, sd)):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    # half-precision inputs are computed in float32 too
    torch.testing.assert_close(depth_cue(img1.bfloat16()), depth_cue(img1.bfloat16().float()))


def test_disparity_to_depth_monotonic_bounded_scale_invariant_far_masked():
    disp = torch.linspace(0.0, 2.0, 400).view(1, 1, 20, 20)
    depth, valid = disparity_to_depth(disp)
    d, v = depth.flatten(), valid.flatten().bool()
    assert (d[1:] <= d[:-1]).all() and (d[1:][v[1:]] < d[:-1][v[1:]]).all()
    assert depth.min() >= 0 and depth.max() <= np.log1p(1 / 0.02) + 1e-5
    assert not v[0] and v[-1]                                           # zero disparity = far
    depth7, valid7 = disparity_to_depth(7 * disp)
    torch.testing.assert_close(depth7, depth)
    assert torch.equal(valid7, valid)
    # per image: a second image at another scale gives the same result
    both, _ = disparity_to_depth(torch.cat([disp, 1e-3 * disp]))
    torch.testing.assert_close(both[1:], depth, rtol=1e-4, atol=1e-5)


def test_disparity_to_depth_on_synthetic_metres_orders_like_true_depth():
    from data import SyntheticScenes
    video = SyntheticScenes(seed=5, frames=2, size=48)
    video = video[0] if not hasattr(video, "flow") else video
    z = torch.from_numpy(video.depth[0]).view(1, 1, 48, 48)
    depth, valid = disparity_to_depth(1.0 / z)
    assert torch.isfinite(depth).all() and valid.mean() > 0.5
    a, b = z[valid.bool()], depth[valid.bool()]
    order = torch.argsort(a)
    assert (b[order][1:] >= b[order][:-1] - 1e-6).all()                 # same order as metres


# --- self-distillation cue ---

def test_sd_cue_shapes_unit_norm_and_shared_channels():
    g = torch.Generator().manual_seed(0)
    enc = torch.randn(2, 40, 4, 4, generator=g)
    img = torch.rand(2, 3, 56, 56, generator=g)
    ch = sd_channels(40, 8, torch.Generator().manual_seed(1))
    out = sd_cue(enc, img, n_channels=8, channels=ch)
    assert out.shape == (2, 8, 56, 56)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, 56, 56))
    # same generator seed -> the same channel subset; the cue uses exactly those channels
    again = sd_cue(enc, img, n_channels=8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, again)
    ref = F.normalize(cues.pamr_cascade(img, enc[:, ch]), dim=1)
    torch.testing.assert_close(out, ref)
    # no-PAMR ablation: plain bilinear upsampling of the same channels
    flat = sd_cue(enc, img, channels=ch, use_pamr=False)
    ref = F.normalize(F.interpolate(enc[:, ch], size=(56, 56), mode="bilinear",
                                    align_corners=False), dim=1)
    torch.testing.assert_close(flat, ref)
    assert not torch.allclose(flat, out)


def test_sd_channels_per_pair_rows_are_successive_draws():
    rows = sd_channels(40, 8, torch.Generator().manual_seed(3), batch=5)
    assert rows.shape == (5, 8)
    g = torch.Generator().manual_seed(3)
    for b in range(5):
        assert torch.equal(rows[b], sd_channels(40, 8, g))
        assert len(set(rows[b].tolist())) == 8                          # a subset: no repeats
    assert len({tuple(r.tolist()) for r in rows}) == 5                  # different per pair
    with pytest.raises(ValueError, match="cues.py"):
        sd_channels(4, 8, batch=2)


@pytest.mark.parametrize("use_pamr", [True, False])
def test_sd_cue_per_element_channels_equal_each_element_alone(use_pamr):
    g = torch.Generator().manual_seed(4)
    B, E = 3, 24
    enc = torch.randn(B, E, 3, 3, generator=g)
    img = torch.rand(B, 3, 42, 42, generator=g)
    ch = sd_channels(E, 6, g, batch=B)                                  # (B, 6)
    out = sd_cue(enc, img, channels=ch, use_pamr=use_pamr)
    assert out.shape == (B, 6, 42, 42)
    for b in range(B):
        alone = sd_cue(enc[b:b + 1], img[b:b + 1], channels=ch[b], use_pamr=use_pamr)
        torch.testing.assert_close(out[b:b + 1], alone, atol=1e-6, rtol=0)
        # and it really is that element's channels: another subset gives another cue
        assert not torch.allclose(alone, sd_cue(enc[b:b + 1], img[b:b + 1],
                                                channels=ch[(b + 1) % B], use_pamr=use_pamr))
    with pytest.raises(ValueError, match="cues.py.*channels"):
        sd_cue(enc, img, channels=ch[:2])


# --- the cue cache ---

def _synthetic_root(tmp_path, name):
    from data import write_synthetic
    root = str(tmp_path / name)
    write_synthetic(root, videos=2, frames=5, size=32, seed=0)
    shutil.rmtree(os.path.join(root, "Cues"), ignore_errors=True)
    return root


def _read_cache(root):
    out = {}
    for dirpath, _, files in os.walk(os.path.join(root, "Cues")):
        for fname in files:
            path = os.path.join(dirpath, fname)
            with np.load(path) as z:
                out[os.path.relpath(path, root)] = {k: z[k] for k in z.files}
    return out


def test_cache_writer_interrupted_and_restarted_matches_uninterrupted(tmp_path):
    ref_root = _synthetic_root(tmp_path, "a")
    stats = write_cue_cache(ref_root, FlowCue(net=StandInRAFT()), DepthCue(net=StandInMiDaS()),
                            size=32, batch=2, progress=False)
    ref = _read_cache(ref_root)
    assert stats == {"written": 10, "skipped": 0, "failed_videos": 0} and len(ref) == 10
    video0 = sorted(os.listdir(os.path.join(ref_root, "Cues")))[0]
    first = ref[os.path.join("Cues", video0, "00000.npz")]
    assert set(first) == {"disparity", "flow_next"} and first["disparity"].shape == (32, 32)
    assert first["disparity"].dtype == np.float16 and first["flow_next"].shape == (32, 32, 2)
    ends = [k for k in ref if k.endswith("00004.npz")]
    assert all(set(ref[k]) == {"disparity", "flow_prev"} for k in ends) and len(ends) == 2
    assert all(np.allclose(v["flow_prev"][..., 1], -2.0) for k, v in ref.items() if "flow_prev" in v)

    root = _synthetic_root(tmp_path, "b")
    with pytest.raises(KeyboardInterrupt):
        write_cue_cache(root, FlowCue(net=StandInRAFT(fail_after=3)), DepthCue(net=StandInMiDaS()),
                        size=32, batch=2, progress=False)
    partial = _read_cache(root)
    assert 0 < len(partial) < 10
    video = sorted(os.listdir(os.path.join(root, "Cues")))[-1]
    open(os.path.join(root, "Cues", video, "00004.npz.tmp"), "wb").write(b"garbage")  # leftover
    flow_net = StandInRAFT()
    stats = write_cue_cache(root, FlowCue(net=flow_net), DepthCue(net=StandInMiDaS()),
                            size=32, batch=2, progress=False)
    assert stats == {"written": 10 - len(partial), "skipped": len(partial), "failed_videos": 0}
    got = _read_cache(root)
    assert set(got) == set(ref)
    for k in ref:
        assert set(got[k]) == set(ref[k])
        for name in ref[k]:
            np.testing.assert_array_equal(got[k][name], ref[k][name])
    # data.py reads the files back: flow_fwd 1 -> 2 in normalised units (v = -2 px constant)
    from data import load_cues
    c = load_cues(root, video0, 1, 2)
    torch.testing.assert_close(c["flow_fwd"][1], torch.full((32, 32), -2.0 * 2 / 32), atol=2e-3, rtol=0)
    assert c["disparity_i"].shape == (1, 32, 32)
    again = StandInRAFT()
    assert write_cue_cache(root, FlowCue(net=again), DepthCue(net=StandInMiDaS()), size=32,
                           progress=False) == {"written": 0, "skipped": 10, "failed_videos": 0}
    assert again.calls == 0


def test_cache_writer_counts_a_video_with_an_unreadable_frame_and_goes_on(tmp_path):
    root = _synthetic_root(tmp_path, "c")
    bad = os.path.join(root, "JPEGImages", "480p", sorted(os.listdir(os.path.join(root, "JPEGImages", "480p")))[0], "00003.jpg")
    open(bad, "wb").write(b"not a jpeg")
    stats = write_cue_cache(root, FlowCue(net=StandInRAFT()), DepthCue(net=StandInMiDaS()),
                            size=32, batch=2, progress=False)
    assert stats["failed_videos"] == 1 and stats["written"] == 5 + 2    # the other video complete


def test_cache_base_frames_are_the_pair_datasets_base_frames(tmp_path):
    from PIL import Image
    from data import PairDataset, VideoFolder
    d = tmp_path / "JPEGImages" / "480p" / "v"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for t in range(2):  # non-square frames: the centre crop matters
        Image.fromarray(rng.integers(0, 255, (30, 52, 3), dtype=np.uint8)).save(d / f"{t:05d}.png")
    folder = VideoFolder(str(tmp_path))
    item = PairDataset(folder, size=28, base=28)[0]
    ours = cues.base_frame(folder.load(folder.frames("v")[0]), 28)
    if bool(item.get("flip", False)):          # the pair's shared flip comes after the base frame
        ours = ours.flip(-1)
    torch.testing.assert_close(ours, item["frames"][0])


# --- loading errors: a message saying how to provide the networks ---

def test_missing_internet_gives_a_message_with_torch_home_and_hub_dir(monkeypatch):
    monkeypatch.setattr(cues, "_import_problem", lambda name: None)

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "load", offline)
    for make in (lambda: FlowCue("raft_small"), lambda: DepthCue("MiDaS_small")):
        with pytest.raises(cues.CueLoadError) as err:
            make()
        msg = str(err.value)
        assert "TORCH_HOME" in msg and "--hub-dir" in msg and "name resolution" in msg


def test_missing_packages_say_pip_install(monkeypatch):
    monkeypatch.setattr(cues, "_import_problem", lambda name: "ModuleNotFoundError: no " + name)
    with pytest.raises(cues.CueLoadError, match="pip install torchvision"):
        FlowCue("raft_large")
    with pytest.raises(cues.CueLoadError, match="pip install timm"):
        DepthCue("DPT_Large")
    monkeypatch.setattr(cues, "_import_problem", lambda name: None)
    monkeypatch.setattr(torch.hub, "load", lambda *a, **k: pytest.fail("must not reach the hub"))
    with pytest.raises(cues.CueLoadError, match="hubconf.py"):
        FlowCue("raft_small", source="local", hub_dir=str(os.devnull))
    with pytest.raises(cues.CueLoadError, match="unknown flow network"):
        FlowCue("raft_tiny")


def test_cli_without_torchvision_prints_a_message_not_a_traceback(tmp_path):
    root = _synthetic_root(tmp_path, "d")      # a valid folder: the network check comes next
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "th"))
    # a fake package dir that hides torchvision even where it is installed
    fake = tmp_path / "fake"
    (fake / "torchvision").mkdir(parents=True)
    (fake / "torchvision" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env["PYTHONPATH"] = os.pathsep.join([str(fake), REPO])
    r = subprocess.run([sys.executable, os.path.join(REPO, "cues.py"), "--data", root,
                        "--device", "cpu"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "torchvision" in r.stderr, r.stderr
    assert r.stderr.startswith("cues.py: error: ")
    # and a folder that does not exist, through the real entry point
    r = subprocess.run([sys.executable, os.path.join(REPO, "cues.py"), "--data",
                        str(tmp_path / "nope"), "--device", "cpu"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"cues.py: error: the dataset folder "
                                             f"{str(tmp_path / 'nope')!r} does not exist"]


# --- the CLI in-process: user errors end as "cues.py: error: ...", bugs keep a traceback ---

@pytest.fixture
def stand_in_hub(monkeypatch):
    """The CLI's real loading path with stand-in networks instead of a download."""
    loaded = []

    def hub_load(kind, name, source, hub_dir, needs, **kwargs):
        loaded.append(kind)
        return StandInRAFT() if kind == "flow" else StandInMiDaS()
    monkeypatch.setattr(cues, "_hub_load", hub_load)
    return loaded


def _run_cli(capsys, *argv):
    status = cues.cli(["--device", "cpu", "--size", "128", "--batch", "2", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err


def test_cli_writes_the_cache_with_stand_in_networks(tmp_path, capsys, stand_in_hub):
    root = _synthetic_root(tmp_path, "ok")
    status, err = _run_cli(capsys, "--data", root)
    assert status == 0 and "error" not in err and stand_in_hub == ["flow", "depth"]
    assert len(_read_cache(root)) == 10
    assert not [f for _, _, fs in os.walk(os.path.join(root, "Cues")) for f in fs
                if not f.endswith(".npz")]                               # no probe, no .tmp left


@pytest.mark.parametrize("layout, expect", [
    ("missing", "does not exist"),
    ("file", "is not a folder"),
    ("empty", "no video folders under"),
    ("flat", "no videos with >= 2 frames"),                              # frames, no video folders
    ("one_frame", "no videos with >= 2 frames"),
])
def test_cli_bad_dataset_folder_is_one_error_line(tmp_path, capsys, stand_in_hub, layout, expect):
    root = tmp_path / "root"
    if layout == "file":
        root.write_text("not a folder")
    elif layout != "missing":
        root.mkdir()
        if layout in ("flat", "one_frame"):
            d = root / "JPEGImages" / ("v" if layout == "one_frame" else "")
            d.mkdir(parents=True, exist_ok=True)
            for t in range(2 if layout == "flat" else 1):
                (d / f"{t:05d}.jpg").write_bytes(b"x")
    status, err = _run_cli(capsys, "--data", str(root))
    assert status == 2 and stand_in_hub == []                           # failed before loading
    assert err.startswith("cues.py: error: ") and expect in err and len(err.splitlines()) == 1


def test_cli_cues_path_that_is_a_file_or_not_writable(tmp_path, capsys, stand_in_hub, monkeypatch):
    root = _synthetic_root(tmp_path, "w")
    cues_dir = os.path.join(root, "Cues")
    open(cues_dir, "w").write("a file where the folder should be")
    status, err = _run_cli(capsys, "--data", root)
    assert status == 2 and "is not a folder" in err and stand_in_hub == []
    os.remove(cues_dir)

    # a folder without write permission (simulated: tests may run as root, who may write anyway)
    def no_permission(path, *args, **kwargs):
        if str(path).startswith(cues_dir):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return open(path, *args, **kwargs)
    monkeypatch.setattr(cues, "open", no_permission, raising=False)
    status, err = _run_cli(capsys, "--data", root)
    assert status == 2 and stand_in_hub == []
    assert err.startswith("cues.py: error: cannot write ") and "Permission denied" in err
    assert "must be writable" in err and len(err.splitlines()) == 1


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root may write into a read-only folder")
def test_cli_read_only_cues_folder_for_real(tmp_path, capsys, stand_in_hub):
    root = _synthetic_root(tmp_path, "ro")
    os.makedirs(os.path.join(root, "Cues"))
    os.chmod(os.path.join(root, "Cues"), 0o500)
    try:
        status, err = _run_cli(capsys, "--data", root)
    finally:
        os.chmod(os.path.join(root, "Cues"), 0o700)
    assert status == 2 and "must be writable" in err


def test_cli_disk_full_removes_the_partial_file_and_keeps_finished_ones(tmp_path, capsys,
                                                                         stand_in_hub, monkeypatch):
    root = _synthetic_root(tmp_path, "full")
    real, calls = cues._write_npz, []

    def fills_up(f, arrays):
        calls.append(1)
        if len(calls) <= 3:
            return real(f, arrays)
        f.write(b"half a file")                                         # what a full disk leaves
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(cues, "_write_npz", fills_up)
    status, err = _run_cli(capsys, "--data", root)
    last = err.strip().splitlines()[-1]                                 # after the progress bar
    assert status == 2 and err.count("cues.py: error") == 1
    assert last.startswith("cues.py: error: disk full while writing ") and ".npz.tmp" in last
    files = [f for _, _, fs in os.walk(os.path.join(root, "Cues")) for f in fs]
    assert sorted(files) == ["00000.npz", "00001.npz", "00002.npz"]     # no .tmp, 3 complete
    monkeypatch.setattr(cues, "_write_npz", real)                       # space freed: resume
    status, err = _run_cli(capsys, "--data", root)
    assert status == 0 and len(_read_cache(root)) == 10


def test_cli_network_that_cannot_be_loaded_offline(tmp_path, capsys, monkeypatch):
    root = _synthetic_root(tmp_path, "off")
    monkeypatch.setattr(cues, "_import_problem", lambda name: None)

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "load", offline)
    status, err = _run_cli(capsys, "--data", root)
    assert status == 2 and err.startswith("cues.py: error: could not load flow network")
    assert "TORCH_HOME" in err


def test_cli_bad_flag_values_and_real_bugs(tmp_path, capsys, stand_in_hub, monkeypatch):
    root = _synthetic_root(tmp_path, "bug")
    for argv, expect in ((["--batch", "0"], "--batch"), (["--size", "16"], "--size"),
                         (["--device", "nonsense"], "--device")):
        with pytest.raises(SystemExit) as ex:
            _run_cli(capsys, "--data", root, *argv)
        assert ex.value.code == 2 and expect in capsys.readouterr().err
    # a bug (or an error that does not come from this repo) keeps its traceback
    for bug in (TypeError("a bug"), RuntimeError("CUDA error: an illegal memory access"),
                OSError("not ours")):
        def broken(*args, _bug=bug, **kwargs):
            raise _bug
        monkeypatch.setattr(cues, "write_cue_cache", broken)
        with pytest.raises(type(bug)):
            cues.cli(["--data", root, "--device", "cpu"])


# --- the paper's / official constants are the defaults ------------------------------------

def _defaults(fn):
    import inspect
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_every_method_default_is_pinned():
    # official configs/train_ytvos.yaml: conf_temp 0.05, num_fts 32
    assert _defaults(flow_confidence) == {"tau": 0.05}
    assert _defaults(sd_channels) == {"n_channels": 32, "generator": None, "batch": None}
    assert _defaults(sd_cue) == {"n_channels": 32, "generator": None, "channels": None,
                                 "use_pamr": True}
    # ours (README Differences): the quantile depth conversion, RAFT small / MiDaS small
    assert _defaults(disparity_to_depth) == {"q": 0.95, "far": 0.02}
    assert _defaults(FlowCue.__init__)["name"] == "raft_small"
    assert _defaults(FlowCue.__init__)["multiple"] == 8                 # RAFT works at 1/8
    assert _defaults(DepthCue.__init__)["name"] == "MiDaS_small"
    assert _defaults(cues.midas_input_size) == {"multiple": 32}          # MiDaS Resize
    assert _defaults(write_cue_cache)["size"] == 224                    # the paper's 224^2 frames


@pytest.mark.parametrize("err_px, confident", [(3.8, True), (3.95, False)])
def test_default_confidence_threshold_is_3_9_pixels_at_224(err_px, confident):
    # exp(-e / 0.05) > 0.5  <=>  e < 0.05 ln 2 = 0.0347 normalised = 3.88 px at W = 224
    f = torch.zeros(1, 2, 224, 224)
    b = torch.zeros(1, 2, 224, 224)
    b[:, 0] = err_px * 2 / 224                                          # a constant x error
    assert bool(flow_confidence(f, b).all()) is confident
    assert not bool(flow_confidence(f, b, tau=0.01).any())              # the test can fail


# --- the cue cache at scale: shards ---------------------------------------------------------

def test_shards_are_disjoint_and_cover_all_videos():
    videos = [f"v{k:03d}" for k in range(23)][::-1]                     # any order
    for n in (1, 2, 3, 5, 23, 30):
        shards = [cues.shard_videos(videos, (i, n)) for i in range(n)]
        flat = [v for s in shards for v in s]
        assert sorted(flat) == sorted(videos) and len(flat) == len(set(flat))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1       # balanced
    assert cues.shard_videos(videos) == videos
    for bad in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="cues.py: a shard"):
            cues.shard_videos(videos, bad)


def test_sharded_writers_together_write_exactly_the_unsharded_cache(tmp_path):
    from data import write_synthetic
    roots = {}
    for name in ("whole", "sharded"):
        roots[name] = str(tmp_path / name)
        write_synthetic(roots[name], videos=3, frames=3, size=32, seed=1)
        shutil.rmtree(os.path.join(roots[name], "Cues"), ignore_errors=True)
    nets = lambda: (FlowCue(net=StandInRAFT()), DepthCue(net=StandInMiDaS()))  # noqa: E731
    write_cue_cache(roots["whole"], *nets(), size=32, progress=False)
    seen = set()
    for i in range(2):
        before = set(_read_cache(roots["sharded"]))
        stats = write_cue_cache(roots["sharded"], *nets(), size=32, progress=False, shard=(i, 2))
        new = set(_read_cache(roots["sharded"])) - before
        assert stats["written"] == len(new) > 0 and not {os.path.dirname(k) for k in new} & seen
        seen |= {os.path.dirname(k) for k in new}                       # whole videos, disjoint
    whole, sharded = _read_cache(roots["whole"]), _read_cache(roots["sharded"])
    assert set(whole) == set(sharded) and len(whole) == 9
    for k in whole:
        for name in whole[k]:
            np.testing.assert_array_equal(whole[k][name], sharded[k][name])
    # resumable per shard: a rerun of shard 1 writes nothing
    assert write_cue_cache(roots["sharded"], *nets(), size=32, progress=False,
                           shard=(1, 2))["written"] == 0


@pytest.mark.parametrize("argv, env", [(["--shard", "2/2"], {}), (["--shard", "a/b"], {}),
                                       (["--shard", "1/0"], {}), (["--shard=-1/2"], {}),
                                       (["--shard", "1"], {}), ([], {"RANK": "3", "WORLD_SIZE": "2"})])
def test_a_bad_shard_is_one_clear_error(tmp_path, capsys, stand_in_hub, monkeypatch, argv, env):
    root = _synthetic_root(tmp_path, "bad-shard")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as ex:
        _run_cli(capsys, "--data", root, *argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert ex.value.code == 2 and "Traceback" not in "\n".join(err) and stand_in_hub == []
    assert err[-1].startswith("cues.py: error: ") and "i/n with 0 <= i < n" in err[-1]
    assert ("RANK/WORLD_SIZE" if env else "--shard") in err[-1]


def test_torchrun_ranks_pick_their_shard_and_the_done_line_gives_frames_per_second(
        tmp_path, capsys, stand_in_hub, monkeypatch):
    root = _synthetic_root(tmp_path, "ranks")                           # 2 videos, 5 frames each
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    status = cues.cli(["--device", "cpu", "--size", "128", "--batch", "2", "--data", root])
    out = capsys.readouterr().out
    videos = sorted(os.listdir(os.path.join(root, "JPEGImages", "480p")))
    assert status == 0 and sorted(os.listdir(os.path.join(root, "Cues"))) == [videos[1]]
    assert "cues shard 1/2: wrote 5 files in" in out and "frames/s" in out


# --- every user error prints its whole message, and a load failure says what to do -----------

def _hub_raising(err):
    def load(*args, **kwargs):
        raise err
    return load


@pytest.mark.parametrize("case, expect", [
    ("offline", ["TORCH_HOME", "--hub-dir", "name resolution"]),
    ("corrupt weights", ["PytorchStreamReader", "deleted, then run again"]),
    ("hub code broken", ["AttributeError", "not written for"]),
    ("no package", ["pip install torchvision"]),
    ("local clone missing", ["hubconf.py", "git clone https://github.com/pytorch/vision"]),
    ("no dataset", ["does not exist"]),
    ("cues is a file", ["is not a folder"]),
])
def test_every_error_path_prints_its_whole_message(tmp_path, capsys, monkeypatch, case, expect):
    root = _synthetic_root(tmp_path, "err")
    argv = ["--device", "cpu", "--size", "128", "--data", root]
    monkeypatch.setattr(cues, "_import_problem", lambda name: None)
    if case == "offline":
        monkeypatch.setattr(torch.hub, "load", _hub_raising(URLError("[Errno -3] Temporary failure in name resolution")))
    elif case == "corrupt weights":
        monkeypatch.setattr(torch.hub, "load", _hub_raising(RuntimeError(
            "PytorchStreamReader failed reading zip archive: failed finding central directory")))
    elif case == "hub code broken":
        monkeypatch.setattr(torch.hub, "load", _hub_raising(AttributeError("module 'timm' has no attribute 'x'")))
    elif case == "no package":
        monkeypatch.setattr(cues, "_import_problem", lambda name: "ModuleNotFoundError: no " + name)
    elif case == "local clone missing":
        argv += ["--hub-dir", str(tmp_path / "clones")]
    elif case == "no dataset":
        argv[-1] = str(tmp_path / "nope")
    elif case == "cues is a file":
        shutil.rmtree(os.path.join(root, "Cues"), ignore_errors=True)
        open(os.path.join(root, "Cues"), "w").close()
    with pytest.raises((OSError, ValueError, RuntimeError)) as raised:
        cues.main(argv)
    msg = str(raised.value)
    assert msg.startswith("cues.py: ") and all(e in msg for e in expect), msg
    capsys.readouterr()
    assert cues.cli(argv) == 2
    assert capsys.readouterr().err == "cues.py: error: " + msg[len("cues.py: "):] + "\n"
    if case in ("offline", "corrupt weights", "hub code broken", "local clone missing"):
        assert msg.count("\n") >= 3                                    # the how-to lines too


# --- the real torchvision RAFT, loaded offline from a torch.hub cache laid out as a user's -----

def _optional(name):
    """An optional package's module: where CI is set (.ci/run installs torchvision, timm and av)
    a missing one fails the test; elsewhere it skips it."""
    return importlib.import_module(name) if os.environ.get("CI") else pytest.importorskip(name)


def slow_raft_reference(net, img1, img2, weights, multiple=8):
    """torchvision's RAFT called by hand, one pair at a time: its own preset (weights.transforms(),
    [0, 1] -> [-1, 1]); replicate padding split as RAFT's InputPadder (the odd row / column at the
    bottom / right), done by clamped indices; the last iterate cropped back; u * 2 / W, v * 2 / H.
    img1, img2 (B, 3, H, W) in [0, 1] -> (B, 2, H, W) flow 1 -> 2 in normalised units."""
    H, W = img1.shape[-2:]
    ph, pw = -H % multiple, -W % multiple
    rows = (torch.arange(H + ph) - ph // 2).clamp(0, H - 1)            # (H8,) source row per row
    cols = (torch.arange(W + pw) - pw // 2).clamp(0, W - 1)            # (W8,)
    out = []
    for a, b in zip(img1, img2):
        a, b = weights.transforms()(a[None], b[None])                  # (1, 3, H, W) in [-1, 1]
        flow = net(a[:, :, rows][..., cols], b[:, :, rows][..., cols])[-1][0]  # (2, H8, W8) pixels
        flow = flow[:, ph // 2:ph // 2 + H, pw // 2:pw // 2 + W]       # (2, H, W)
        out.append(torch.stack([flow[0] * 2 / W, flow[1] * 2 / H]))
    return torch.stack(out)                                             # (B, 2, H, W)


def test_flow_cue_runs_torchvision_raft_from_a_local_hub_offline_as_the_network_by_hand(
        tmp_path, monkeypatch):
    tv_flow = _optional("torchvision.models.optical_flow")
    # pytorch/vision's repo root as torch.hub sees it: a hubconf.py exposing torchvision's RAFTs.
    hub_dir = tmp_path / "vision"
    hub_dir.mkdir()
    (hub_dir / "hubconf.py").write_text(
        "from torchvision.models.optical_flow import raft_large, raft_small  # noqa: F401\n")
    # weights="DEFAULT" (Raft_Small_Weights.C_T_V2) is read from $TORCH_HOME/hub/checkpoints/<the
    # URL's file name>. torch.hub.load_state_dict_from_url checks the hash in that name only when
    # it downloads (torch/hub.py: check_hash is used inside `if not os.path.exists(cached_file)`),
    # so a random-init state dict under the name loads as the released file would.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda url, *a, **k: pytest.fail(f"downloaded {url}"))
    weights = tv_flow.Raft_Small_Weights.DEFAULT
    assert weights == tv_flow.Raft_Small_Weights.C_T_V2
    ckpt = tmp_path / "th" / "hub" / "checkpoints" / os.path.basename(weights.url)
    ckpt.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(tv_flow.raft_small().state_dict(), ckpt)

    cue = FlowCue("raft_small", source="local", hub_dir=str(hub_dir))
    saved = torch.load(ckpt)
    assert all(torch.equal(v, saved[k]) for k, v in cue.net.state_dict().items())

    # 123 x 133 pads to 128 x 136 (2 + 3 rows, 1 + 2 columns); 128 is the smallest side
    # torchvision's RAFT takes (its correlation pyramid needs 16 cells at 1/8 resolution).
    torch.manual_seed(1)
    img1, img2 = torch.rand(2, 3, 123, 133), torch.rand(2, 3, 123, 133)
    fwd, bwd = cue(img1, img2)
    assert fwd.shape == bwd.shape == (2, 2, 123, 133) and fwd.dtype == torch.float32
    net = tv_flow.raft_small().eval()
    net.load_state_dict(saved)
    with torch.no_grad():
        ref_fwd = slow_raft_reference(net, img1, img2, weights)
        ref_bwd = slow_raft_reference(net, img2, img1, weights)
    assert ref_fwd.std() > 1e-2                      # a flow that varies: a shift or scale shows
    torch.testing.assert_close(fwd, ref_fwd, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bwd, ref_bwd, atol=1e-5, rtol=1e-4)


def test_a_base_side_torchvisions_raft_cannot_take_is_refused_up_front(tmp_path, capsys):
    # RAFT needs 16 cells at 1/8 resolution: 127 px would fail inside the network.
    with pytest.raises(SystemExit) as stop:
        cues.cli(["--device", "cpu", "--size", "127", "--data", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err[-1].startswith("cues.py: error: --size must be at least 128")
