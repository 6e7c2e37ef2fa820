"""PAMR, pixel-adaptive mask refinement, and LILA's coarse-to-fine PAMR cascade.

PAMR (Araslanov & Roth, "Single-Stage Semantic Segmentation from Image Labels", CVPR 2020)
refines a coarse map with a guide image. Every pixel p looks at the 8 neighbours p + delta of
a 3x3 ring dilated by d, for each d in `dilations` (R = 8 |dilations| neighbours):

    logit_delta(p) = mean_k -|I_k(p) - I_k(p + delta)| / (eps + sigma * std_k(p))
    a_delta(p)     = softmax over the R neighbours of logit_delta(p)
    m(p)          <- sum_delta a_delta(p) m(p + delta)          (`iters` times, a fixed)

std_k(p): the unbiased std of guide channel k over the 9 |dilations| window values (each
dilated 3x3 window with its centre). A neighbour across a colour edge is many local stds away
and gets almost no weight, so values spread within regions and stop at the image's edges.

Why in LILA (paper section 3, the self-distillation cue): the SD cue is made of encoder
channels on the 16 x 16 patch grid, one value per 14 px patch. Upsampled bilinearly it is a
blur whose edges fall wherever the patch grid happens to lie; PAMR, guided by the view's RGB,
upsamples it edge-aware to pixel accuracy, so the cue changes where the image changes. LILA
runs it coarse to fine with fixed stage sizes (official dpt_lila.py TrainLILA): 56^2 x 20
iterations, 112^2 x 10, the view's own size x 5; at 56^2 one step of the widest ring is 20 px
of a 224^2 view, more than a patch, and the finer stages sharpen. Dilations {1, 3, 5}, sigma
0.05 (configs/train_ytvos.yaml pamr.sigma), eps 1e-5 (official lila/lila/pamr.py).

Shapes: B batch, G guide channels (3: RGB), C mask channels (32 for SD), H x W guide / stage
size, h x w mask size, R = 8 |dilations| neighbours.
Deviations from the official code: README, "Differences".
Tests: python -m pytest -q tests/test_pamr.py ; speed and memory: python bench.py pamr
"""
import torch
import torch.nn.functional as F


def ring_offsets(dilations):
    """The R = 8 |dilations| neighbour offsets (dy, dx): the dilated 3x3 rings, centre excluded."""
    return [(dy * d, dx * d) for d in dilations
            for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def window_offsets(dilations):
    """The 9 |dilations| offsets of the local std: each dilated 3x3 window, centre included."""
    return [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def neighbours(x, offsets):
    """x(p + o) for every offset o, replicate border: (B, X, H, W) -> (B, X, len(offsets), H, W)."""
    H, W = x.shape[-2:]
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    xp = F.pad(x, [pad] * 4, mode="replicate")                 # (B, X, H + 2 pad, W + 2 pad)
    return torch.stack([xp[..., pad + dy:pad + dy + H, pad + dx:pad + dx + W]
                        for dy, dx in offsets], 2)             # (B, X, n, H, W)


@torch.no_grad()
def pamr_reference(image, mask, dilations=(1, 3, 5), iters=10, sigma=0.05, eps=1e-5, size=None):
    """PAMR as its definition (module docstring), every shifted copy stacked as the official
    module does. One stage: the guide and the mask are first resized to `size` (None: the
    guide's own; an int: a square; (h, w)), bilinear with align_corners=True (official).
    image (B, G, H0, W0), mask (B, C, h, w) -> (B, C, H, W) in their dtype. `pamr` gives the
    same numbers with a fraction of the memory (a (B, C, R, H, W) stack is 9.9 GB for B = 64,
    C = 32 at 224^2); this one is the readable reference the tests hold it to."""
    H, W = _stage_size(size, *image.shape[-2:])
    guide, m = _resize(image, (H, W)), _resize(mask, (H, W))   # (B, G, H, W), (B, C, H, W)
    ring = ring_offsets(dilations)
    std = neighbours(guide, window_offsets(dilations)).std(2, keepdim=True)  # (B, G, 1, H, W)
    logit = -(guide.unsqueeze(2) - neighbours(guide, ring)).abs() / (eps + sigma * std)  # (B, G, R, H, W)
    aff = logit.mean(1, keepdim=True).softmax(2)               # (B, 1, R, H, W)  a_delta(p)
    for _ in range(iters):
        m = (neighbours(m, ring) * aff).sum(2)                 # (B, C, H, W)  sum a m(p + delta)
    return m


# LILA's cascade (official dpt_lila.py TrainLILA.__init__): (stage size, iterations); None = the
# guide's own size.
LILA_STAGES = ((56, 20), (112, 10), (None, 5))


@torch.no_grad()
def pamr_cascade(image, mask, stages=LILA_STAGES, dilations=(1, 3, 5), sigma=0.05, eps=1e-5):
    """LILA's coarse-to-fine PAMR (official `TrainLILA.refine`): one `pamr` stage per (size,
    iters), each on the previous stage's output, each resizing the full-resolution guide
    itself. The sizes are fixed, not scaled with the view: a 224^2 view runs 56, 112, 224; a
    112^2 view 56, 112, 112; a non-square view the square 56 and 112 stages first.
    image (B, G, H, W), mask (B, C, h, w) -> (B, C, H, W) (a last stage that is not H x W, only
    with custom stages, is resized to it)."""
    _check_inputs(image, mask, dilations, 0)
    if len(stages) == 0:
        raise ValueError("pamr.py: pamr_cascade needs at least one (size, iters) stage")
    for size, iters in stages:   # `pamr`: `pamr_reference`'s numbers in less memory (tested equal)
        mask = pamr(image, mask, dilations, iters, sigma, eps, size=size)  # (B, C, hs, ws)
    return _resize(mask, tuple(image.shape[-2:]))                         # (B, C, H, W)


# --- plumbing: the same numbers, less memory --------------------------------------------------
# `pamr` computes what `pamr_reference` does without any (B, C, R, H, W) or (B, G, R, H, W)
# stack: the affinities (B, R, H, W) once, then each propagation step accumulates one shifted
# slice of a padded mask at a time into a preallocated buffer, one cache-sized chunk of
# (images x channels) at a time through all iterations; the local std the same way, two-pass.
# float32 under any autocast (official: CUDA float16). Measured: `python bench.py pamr`.

# ~2^18 floats per chunk (4 channels of a 224^2 image) kept the two padded buffers in the CPU
# cache and was the fastest on a 2-core Xeon (1.3x over whole images): a speed knob.
_CHUNK_ELEMS = 2 ** 18


@torch.no_grad()
def pamr(image, mask, dilations=(1, 3, 5), iters=10, sigma=0.05, eps=1e-5, size=None):
    """One PAMR stage, the fast evaluation of `pamr_reference` (same arguments, same numbers
    to float32 rounding). Returns (B, C, hs, ws) in float32 (float64 if an input is), even
    inside an autocast region. iters: the 2020 PAMR's 10; the cascade passes its own."""
    _check_inputs(image, mask, dilations, iters)
    dtype = torch.promote_types(torch.promote_types(image.dtype, mask.dtype), torch.float32)
    hs, ws = _stage_size(size, *image.shape[-2:])
    with torch.autocast(image.device.type, enabled=False):
        guide = _resize(image.to(dtype), (hs, ws))                        # (B, G, hs, ws)
        m = _resize(mask.to(dtype), (hs, ws))                             # (B, C, hs, ws)
        if m is mask:
            m = m.clone()                      # propagate() overwrites it: never the caller's
        aff = pamr_affinity(guide, dilations, sigma, eps)                 # (B, R, hs, ws)
        return propagate(m.contiguous(), aff, dilations, iters)           # (B, C, hs, ws)


@torch.no_grad()
def pamr_affinity(image, dilations=(1, 3, 5), sigma=0.05, eps=1e-5):
    """The affinities a (B, R, H, W), summing to 1 over R, one shifted slice at a time.
    eps matters where the guide is nearly flat: with std ~ eps / sigma or less the weights
    fall back towards a plain neighbour average (the 2020 PAMR used 1e-8)."""
    x = image.to(torch.promote_types(image.dtype, torch.float32))   # float32 (or float64)
    x = x - x.mean(dim=(2, 3), keepdim=True)   # centring changes no difference, helps rounding
    B, G, H, W = x.shape
    pad = max(dilations)
    denom = local_std(x, dilations).mul_(sigma).add_(eps)      # (B, G, H, W)
    xp = F.pad(x, [pad] * 4, mode="replicate")                 # (B, G, H + 2 pad, W + 2 pad)
    logits = x.new_empty(B, 8 * len(dilations), H, W)          # (B, R, H, W)
    tmp = torch.empty_like(x)                                  # (B, G, H, W) scratch
    for j, (dy, dx) in enumerate(ring_offsets(dilations)):
        torch.sub(x, _shifted(xp, pad, dy, dx, H, W), out=tmp).abs_().div_(denom)
        logits[:, j] = tmp.sum(dim=1)                          # (B, H, W)
    logits.mul_(-1.0 / G)                                      # -mean over guide channels
    logits -= logits.amax(dim=1, keepdim=True)                 # softmax over R, in place
    logits.exp_()
    logits /= logits.sum(dim=1, keepdim=True)
    return logits                                              # (B, R, H, W)


@torch.no_grad()
def local_std(image, dilations):
    """Unbiased std over the window_offsets values, as `neighbours(...).std(2)`, by two passes
    of running sums (mean, then squared deviations). image (B, G, H, W) -> (B, G, H, W)."""
    B, G, H, W = image.shape
    pad = max(dilations)
    offsets = window_offsets(dilations)
    xp = F.pad(image, [pad] * 4, mode="replicate")             # (B, G, H + 2 pad, W + 2 pad)
    mean = torch.zeros_like(image)                             # (B, G, H, W)
    for dy, dx in offsets:
        mean += _shifted(xp, pad, dy, dx, H, W)
    mean /= len(offsets)
    var = torch.zeros_like(image)                              # (B, G, H, W)
    tmp = torch.empty_like(image)                              # (B, G, H, W) scratch
    for dy, dx in offsets:
        torch.sub(_shifted(xp, pad, dy, dx, H, W), mean, out=tmp)
        var.addcmul_(tmp, tmp)
    return var.div_(len(offsets) - 1).sqrt_()                  # two-pass: var >= 0


@torch.no_grad()
def propagate(mask, aff, dilations, iters):
    """`iters` steps of m(p) <- sum_delta a_delta(p) m(p + delta), replicate border, in place.
    mask (B, C, H, W), aff (B, R, H, W) -> mask. Two padded ping-pong buffers per (images x
    channels) chunk; each step accumulates acc += a_delta * m_delta one slice at a time."""
    B, C, H, W = mask.shape
    pad = max(dilations)
    offsets = ring_offsets(dilations)
    c_step = min(C, max(1, _CHUNK_ELEMS // (H * W)))          # channels per chunk
    b_step = max(1, _CHUNK_ELEMS // (c_step * H * W))          # images per chunk
    for b0 in range(0, B, b_step):
        a = aff[b0:b0 + b_step]                                # (b, R, H, W)
        for c0 in range(0, C, c_step):
            part = mask[b0:b0 + b_step, c0:c0 + c_step]        # (b, c, H, W) view
            src = F.pad(part, [pad] * 4, mode="replicate")     # (b, c, H + 2 pad, W + 2 pad)
            dst = torch.empty_like(src)
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
    """Bilinear, align_corners=True, no antialiasing (official lila/lila/pamr.py, for guide
    and mask). Same size: returned as is (that interpolation is exact)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def _check_inputs(image, mask, dilations, iters):
    """Clear errors for bad arguments instead of a traceback from inside F.pad/conv."""
    if not (torch.is_tensor(image) and image.dim() == 4):
        raise ValueError(f"pamr.py: image must be a (B, G, H, W) tensor, got "
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
