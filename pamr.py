"""PAMR: pixel-adaptive mask refinement, and LILA's coarse-to-fine PAMR cascade.

What: PAMR (Araslanov & Roth, "Single-Stage Semantic Segmentation from Image Labels",
CVPR 2020) refines a coarse mask with a guide image. Every pixel p looks at the 8
neighbours p + delta of a 3x3 ring dilated by d, for each d in `dilations`
(P = 8 * |dilations| neighbours). From the guide it gets one affinity per neighbour,

    logit_delta(p) = mean_k  -|I_k(p) - I_k(p + delta)| / (eps + sigma * std_k(p))
    a_delta(p)     = softmax over the P neighbours of logit_delta(p)

where std_k(p) is the unbiased standard deviation of guide channel k over all
9 * |dilations| window values (each dilated 3x3 window, its centre included, so the
centre counts once per dilation). Then `iters` times:  m(p) <- sum_delta a_delta(p) m(p + delta).
Replicate padding at the image border. Affinities are computed once per call.

Where in LILA (paper section 3, self-distillation cue): the 32 encoder channels of the SD cue
are upsampled from the patch grid to pixels by `pamr_cascade`, guided by the view's RGB. As
the official code (lila/lila/dpt_lila.py, TrainLILA: PAMR(20, [1,3,5], (56, 56)),
PAMR(10, [1,3,5], (112, 112)), PAMR(5, [1,3,5], None); `refine` chains them), the stage
sizes are FIXED: 56 x 56 with 20 iterations, 112 x 112 with 10, then the guide's own size
with 5, whatever the view size (a 112^2 view runs 56, 112, 112; a 224^2 view 56, 112, 224).
Each stage resizes the full-resolution guide and the current mask to its size, both
bilinearly with align_corners=True and no antialiasing (official lila/lila/pamr.py, forward).
Dilations {1, 3, 5}, sigma 0.05 (official configs/train_ytvos.yaml pamr.sigma), eps 1e-5.

Shape legend: B batch, K guide channels (3 for RGB), C mask channels (32 for SD),
H x W guide size, h x w mask size, P = 8 * |dilations| neighbours.

Deviations from the official code (lila/lila/pamr.py, itself following visinf/1-stage-wseg
models/mods/pamr.py; read to check the formula, nothing copied):
- Same numbers, different evaluation. The official module stacks every shifted copy of the
  mask, a (B, C, P, H, W) tensor (9.9 GB for B=64, C=32, P=24, 224^2), per iteration. Here
  the affinities (B, P, H, W) are computed once and each propagation step accumulates one
  shifted slice of a padded mask at a time into a preallocated buffer, one cache-sized chunk
  of (images x channels) at a time through all iterations. The local std is accumulated the
  same way, two-pass (mean, then squared deviations) on a mean-centred guide. No
  (B, C, P, H, W) or (B, K, P, H, W) tensor ever exists. bench: `python bench.py pamr`.
- Precision: float32 always (float64 if an input is float64), under any autocast. The
  official forward is decorated with a CUDA float16 autocast, so on a GPU its neighbour
  gathers (conv2d), std and propagation (einsum) run in float16; on a CPU the official code
  is float32, like ours. float32 keeps the cue the same on every device.
- sigma, eps, the dilations and the iteration counts are arguments; the 2020 PAMR used
  sigma 0.1 and dilations {1, 2, 4, 8, 12, 24}; LILA's cascade uses 0.05 and {1, 3, 5}
  (our defaults).
- `pamr_cascade` resizes its result to the guide's size if the last stage is not the guide's
  own size (only for custom stages; LILA's last stage is native, so this never happens).

Run: python -m pytest -q tests/test_pamr.py ; python bench.py pamr
"""
import torch
import torch.nn.functional as F

# Work is split into chunks of (batch elements x mask channels), each propagated through
# all iterations on its own (PAMR treats every image and channel independently), so that
# a chunk's two padded buffers stay in the CPU cache. ~2^18 floats per chunk (4 channels
# of a 224^2 image) was the fastest on a 2-core Xeon (1.3x over whole images); a speed
# knob, not a method constant.
_CHUNK_ELEMS = 2 ** 18


def _check_inputs(image, mask, dilations, iters):
    """Clear errors for bad arguments instead of a traceback from inside F.pad/conv."""
    if not (torch.is_tensor(image) and image.dim() == 4):
        raise ValueError(f"pamr.py: image must be a (B, K, H, W) tensor, got "
                         f"{getattr(image, 'shape', type(image))}")
    if not (torch.is_tensor(mask) and mask.dim() == 4):
        raise ValueError(f"pamr.py: mask must be a (B, C, h, w) tensor, got "
                         f"{getattr(mask, 'shape', type(mask))}")
    if image.shape[0] != mask.shape[0]:
        raise ValueError(f"pamr.py: image and mask batch differ: {image.shape[0]} vs {mask.shape[0]}")
    if not image.is_floating_point() or not mask.is_floating_point():
        raise ValueError("pamr.py: image and mask must be floating point tensors")
    if len(dilations) == 0 or any(int(d) != d or d < 1 for d in dilations):
        raise ValueError(f"pamr.py: dilations must be positive integers, got {dilations}")
    if int(iters) != iters or iters < 0:
        raise ValueError(f"pamr.py: iters must be a non-negative integer, got {iters}")


def ring_offsets(dilations):
    """The P = 8 * |dilations| neighbour offsets (dy, dx): the dilated 3x3 ring, centre excluded."""
    return [(dy * d, dx * d) for d in dilations
            for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _window_offsets(dilations):
    """The 9 * |dilations| window offsets of the local std (centre included once per dilation)."""
    return [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def _shifted(padded, pad, dy, dx, H, W):
    """View of a replicate-padded (.., H + 2 pad, W + 2 pad) map holding x(p + (dy, dx)) at p."""
    return padded[..., pad + dy:pad + dy + H, pad + dx:pad + dx + W]   # (.., H, W) view


def _fill_border(buf, pad):
    """Replicate padding in place: copy the edge rows/columns of the interior outwards."""
    if pad == 0:
        return
    buf[..., :pad, :] = buf[..., pad:pad + 1, :]            # top rows
    buf[..., -pad:, :] = buf[..., -pad - 1:-pad, :]         # bottom rows
    buf[..., :, :pad] = buf[..., :, pad:pad + 1]            # left columns (incl. corners)
    buf[..., :, -pad:] = buf[..., :, -pad - 1:-pad]         # right columns


# --- method -------------------------------------------------------------------------------

@torch.no_grad()
def local_std(image, dilations):
    """Unbiased std of each guide channel over the 9 * |dilations| window values.

    std_k(p) = sqrt( sum_j (I_k(p + o_j) - mu_k(p))^2 / (n - 1) ),  n = 9 * |dilations|,
    as `x.std(2)` over the stacked window in the official code. Two passes of running sums
    (mean, then squared deviations), one shifted slice at a time; no (B, K, n, H, W) stack.
    image: (B, K, H, W) float32 -> (B, K, H, W).
    """
    B, K, H, W = image.shape
    pad = max(dilations)
    offsets = _window_offsets(dilations)
    n = len(offsets)
    xp = F.pad(image, [pad] * 4, mode="replicate")             # (B, K, H + 2 pad, W + 2 pad)
    mean = torch.zeros_like(image)                             # (B, K, H, W)
    for dy, dx in offsets:
        mean += _shifted(xp, pad, dy, dx, H, W)
    mean /= n
    var = torch.zeros_like(image)                              # (B, K, H, W)
    tmp = torch.empty_like(image)                              # (B, K, H, W) scratch
    for dy, dx in offsets:
        torch.sub(_shifted(xp, pad, dy, dx, H, W), mean, out=tmp)
        var.addcmul_(tmp, tmp)
    return var.div_(n - 1).sqrt_()                             # two-pass: var >= 0


@torch.no_grad()
def pamr_affinity(image, dilations=(1, 3, 5), sigma=0.05, eps=1e-5):
    """Affinities a (B, P, H, W), P = 8 * |dilations|, summing to 1 over P (see module doc).

    logit_delta(p) = mean_k -|I_k(p) - I_k(p + delta)| / (eps + sigma * std_k(p)); softmax
    over delta. sigma: LILA 0.05 (2020 PAMR 0.1); eps: 1e-5 as official lila/lila/pamr.py
    (the 2020 PAMR used 1e-8). eps matters where the guide is nearly flat: with std ~ eps /
    sigma or less, the affinities fall back towards a plain average of the neighbours.
    """
    x = image.to(torch.promote_types(image.dtype, torch.float32))   # float32 (or float64)
    x = x - x.mean(dim=(2, 3), keepdim=True)   # centring changes no difference, helps rounding
    B, K, H, W = x.shape
    pad = max(dilations)
    offsets = ring_offsets(dilations)
    denom = local_std(x, dilations).mul_(sigma).add_(eps)      # (B, K, H, W)
    xp = F.pad(x, [pad] * 4, mode="replicate")                 # (B, K, H + 2 pad, W + 2 pad)
    logits = x.new_empty(B, len(offsets), H, W)                # (B, P, H, W)
    tmp = torch.empty_like(x)                                  # (B, K, H, W) scratch
    for j, (dy, dx) in enumerate(offsets):
        torch.sub(x, _shifted(xp, pad, dy, dx, H, W), out=tmp).abs_().div_(denom)
        logits[:, j] = tmp.sum(dim=1)                          # (B, H, W)
    logits.mul_(-1.0 / K)                                      # -mean over guide channels
    # softmax over the P neighbours, in place (the logits buffer becomes the affinities)
    logits -= logits.amax(dim=1, keepdim=True)
    logits.exp_()
    logits /= logits.sum(dim=1, keepdim=True)
    return logits                                              # (B, P, H, W)


@torch.no_grad()
def propagate(mask, aff, dilations, iters):
    """`iters` steps of m(p) <- sum_delta a_delta(p) m(p + delta), replicate border.

    mask: (B, C, H, W), aff: (B, P, H, W) -> the mask, overwritten in place with the result
    (saves a B x C x H x W buffer; `pamr` passes a tensor it owns). Two padded ping-pong
    buffers per (images x channels) chunk; each step accumulates one shifted slice at a time
    (acc += a_delta * m_delta), so no (B, C, P, H, W) stack is ever formed.
    """
    B, C, H, W = mask.shape
    pad = max(dilations)
    offsets = ring_offsets(dilations)
    c_step = min(C, max(1, _CHUNK_ELEMS // (H * W)))          # channels per chunk
    b_step = max(1, _CHUNK_ELEMS // (c_step * H * W))          # images per chunk
    for b0 in range(0, B, b_step):
        a = aff[b0:b0 + b_step]                                # (b, P, H, W)
        for c0 in range(0, C, c_step):
            part = mask[b0:b0 + b_step, c0:c0 + c_step]        # (b, c, H, W) view
            src = F.pad(part, [pad] * 4, mode="replicate")     # (b, c, H + 2 pad, W + 2 pad)
            dst = torch.empty_like(src)                        # (b, c, H + 2 pad, W + 2 pad)
            for _ in range(iters):
                acc = _shifted(dst, pad, 0, 0, H, W)           # (b, c, H, W) interior view
                for j, (dy, dx) in enumerate(offsets):
                    m_delta = _shifted(src, pad, dy, dx, H, W)  # (b, c, H, W) view
                    a_delta = a[:, j:j + 1]                    # (b, 1, H, W) broadcast over c
                    if j == 0:
                        torch.mul(m_delta, a_delta, out=acc)
                    else:
                        acc.addcmul_(m_delta, a_delta)
                _fill_border(dst, pad)
                src, dst = dst, src
            part.copy_(_shifted(src, pad, 0, 0, H, W))         # result back into the mask
    return mask                                                # (B, C, H, W)


def _stage_size(size, H, W):
    """A stage size: None = the guide's own (H, W), an int = a square, or an (h, w) pair."""
    if size is None:
        return H, W
    hs, ws = (size, size) if isinstance(size, int) else tuple(size)
    if int(hs) != hs or int(ws) != ws or hs < 1 or ws < 1:
        raise ValueError(f"pamr.py: a stage size must be None, a positive int or an (h, w) "
                         f"pair of positive ints, got {size!r}")
    return int(hs), int(ws)


def _resize(x, size):
    """Bilinear, align_corners=True, no antialiasing: how official lila/lila/pamr.py resizes
    both the guide and the mask. Same size: returned as is (that interpolation is exact)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


@torch.no_grad()
def pamr(image, mask, dilations=(1, 3, 5), iters=10, sigma=0.05, eps=1e-5, size=None):
    """Refine `mask` with the guide `image` (Araslanov & Roth 2020, see module docstring).

    One PAMR stage as the official module PAMR(iters, dilations, size, sigma): the guide and
    the mask are first resized to `size` (None: the guide's own H x W; an int: a square;
    or (h, w)), both bilinearly with align_corners=True, then the affinities are computed
    from the resized guide and the mask is propagated `iters` times.
    image: (B, K, H, W) guide; mask: (B, C, h, w) -> (B, C, hs, ws) in float32 (float64 if
    an input is float64), computed in full precision even inside an autocast region.
    dilations {1,3,5}, sigma 0.05, eps 1e-5: LILA; iters: set per stage by the cascade.
    """
    _check_inputs(image, mask, dilations, iters)
    dtype = torch.promote_types(torch.promote_types(image.dtype, mask.dtype), torch.float32)
    hs, ws = _stage_size(size, *image.shape[-2:])
    with torch.autocast(image.device.type, enabled=False):
        guide = _resize(image.to(dtype), (hs, ws))                        # (B, K, hs, ws)
        m = _resize(mask.to(dtype), (hs, ws))                             # (B, C, hs, ws)
        if m is mask:
            m = m.clone()                      # propagate() overwrites it: never the caller's
        aff = pamr_affinity(guide, dilations, sigma, eps)                 # (B, P, hs, ws)
        return propagate(m.contiguous(), aff, dilations, iters)           # (B, C, hs, ws)


# LILA's cascade (official lila/lila/dpt_lila.py, TrainLILA.__init__): (stage size, iterations);
# None = the guide's own size.
LILA_STAGES = ((56, 20), (112, 10), (None, 5))


@torch.no_grad()
def pamr_cascade(image, mask, stages=LILA_STAGES, dilations=(1, 3, 5), sigma=0.05, eps=1e-5):
    """LILA's coarse-to-fine PAMR (official `TrainLILA.refine`): for each (size, iters)
    stage, `pamr(image, mask, ..., size=size)`, the mask being the previous stage's output
    and the guide always the full-resolution `image` (each stage resizes it itself).

    Stage sizes are fixed, not scaled with the image: the default runs 56 x 56 (20 iterations),
    112 x 112 (10), then H x W (5), for any H x W (a non-square view also goes through the
    square 56 and 112 stages, as the official code).
    image: (B, K, H, W) guide; mask: (B, C, h, w) -> (B, C, H, W) (a last stage that is not
    H x W is resized to it, bilinear, align_corners=True).
    Defaults: LILA (LILA_STAGES, dilations {1,3,5}, sigma 0.05, eps 1e-5).
    """
    _check_inputs(image, mask, dilations, 0)
    if len(stages) == 0:
        raise ValueError("pamr.py: pamr_cascade needs at least one (size, iters) stage")
    H, W = image.shape[-2:]
    for size, iters in stages:
        mask = pamr(image, mask, dilations, iters, sigma, eps, size=size)  # (B, C, hs, ws)
    return _resize(mask, (H, W))                                          # (B, C, H, W)
