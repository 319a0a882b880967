"""Batch-vectorised pretext transforms: quarter-turn rotation and cutout, after the SwinUNETR pretraining (Tang et al.,
CVPR 2022; Project-MONAI/research-contributions, SwinUNETR/Pretrain/utils/ops.py): one plane of quarter turns per
sample, boxes of 5-25 % sides until ~30 % of the crop is dropped, filled with noise or another sample's content.

All functions take a (B, C, D, H, W) batch and work on any device and floating dtype. Randomness comes
only from the optional `generator`: numbers are drawn on the generator's device (x's device when no
generator is given, using the global RNG) and then moved to x's device, so a CPU generator also works for
CUDA inputs and the same seed reproduces the same result. For speed on GPU pass a generator created on
x's device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def uniform_draws(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """float32 uniform [0, 1) numbers drawn from `generator` (on its device), returned on `device`."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def _rotation_dims(x: Tensor, dims: tuple[int, int]) -> tuple[int, int]:
    """Normalise `dims` to non-negative spatial axes (not batch, not channel) of equal size."""
    if len(dims) != 2:
        raise ValueError(f"dims must name two axes, got {dims}")
    a, b = (d % x.ndim for d in dims)
    if a == b or min(a, b) < 2:
        raise ValueError(f"dims {dims} must be two distinct spatial axes of a (B, C, ...) tensor of ndim {x.ndim}")
    if x.shape[a] != x.shape[b]:
        raise ValueError(
            f"quarter-turn rotation in dims {dims} needs equal sizes, got {x.shape[a]} and {x.shape[b]} "
            f"(shape {tuple(x.shape)})"
        )
    return a, b


def rotate_quarter(x: Tensor, k: Tensor, dims: tuple[int, int] = (-2, -1)) -> Tensor:
    """Rotate sample b of `x` by k[b] quarter turns in the plane `dims` (all channels together).

    Args:
        x: (B, C, D, H, W) batch (any (B, C, ...) tensor works).
        k: (B,) integer quarter-turn counts; taken modulo 4, so `rotate_quarter(rotate_quarter(x, k), -k)`
            recovers x exactly. The direction is torch.rot90's: from the first axis of `dims` towards
            the second.
        dims: the rotation plane, two spatial axes of equal size (ValueError otherwise).

    Returns:
        Tensor of x's shape, dtype and device: out[b] == torch.rot90(x[b:b+1], k[b], dims)[0]. Built by
        one torch.rot90 per k-group, index-put into the output (differentiable).
    """
    a, b = _rotation_dims(x, dims)
    if k.shape != x.shape[:1]:
        raise ValueError(f"k must have shape ({x.shape[0]},), got {tuple(k.shape)}")
    quarter = k.to(device=x.device, dtype=torch.long).remainder(4)  # (B,)
    out = torch.empty_like(x)
    for turns in range(4):
        index = torch.nonzero(quarter == turns).squeeze(1)  # (n_turns,)
        if index.numel():
            out.index_put_((index,), torch.rot90(x.index_select(0, index), turns, (a, b)))
    return out


def random_rotation(
    x: Tensor, generator: torch.Generator | None = None, dims: tuple[int, int] = (-2, -1)
) -> tuple[Tensor, Tensor]:
    """Rotate every sample by an independent uniformly drawn k in {0, 1, 2, 3} quarter turns.

    Args:
        x: (B, C, D, H, W) batch; the two `dims` axes must be equal in size.
        generator: source of randomness (None: global RNG of x's device).
        dims: rotation plane.

    Returns:
        (rotated (B, C, D, H, W), k (B,) long on x's device), the rotation-task labels.
    """
    _rotation_dims(x, dims)
    k = (uniform_draws((x.shape[0],), generator, x.device) * 4).long().clamp_(max=3)  # (B,)
    return rotate_quarter(x, k, dims), k


def _side_bounds(size: int, min_side: float, max_side: float) -> tuple[int, int]:
    """Integer box side range [lo, hi] in voxels whose fractions of `size` lie in [min_side, max_side].

    lo = ceil(min_side * size), hi = floor(max_side * size), clamped to [1, size] with hi >= lo (so on a
    very short axis the box may exceed max_side rather than vanish).
    """
    lo = min(max(1, math.ceil(min_side * size - 1e-9)), size)
    hi = max(lo, min(math.floor(max_side * size + 1e-9), size))
    return lo, hi


def cutout(
    x: Tensor,
    generator: torch.Generator | None = None,
    min_side: float = 0.05,
    max_side: float = 0.25,
    max_drop: float = 0.3,
    max_boxes: int = 16,
    cross_sample_prob: float = 0.3,
) -> tuple[Tensor, Tensor]:
    """Drop random boxes from every sample, filling them with noise or with another sample's content.

    Per round (at most `max_boxes` rounds) one box is drawn for every sample at once: each side an
    integer number of voxels, uniform in [ceil(min_side * S), floor(max_side * S)] for an axis of size S,
    the box placed uniformly so that it lies inside the crop. A sample keeps its box only while its
    dropped fraction (overlaps counted once) is still < `max_drop`, so the final fraction is below
    `max_drop` plus one box's volume. Rounds stop early once no sample is still below `max_drop`.

    Each kept box is filled, over all channels, either with uniform [0, 1) noise (inputs are normalised to
    [0, 1]) or, with probability `cross_sample_prob`, with the same region of the *uncut* partner sample
    (x rolled by one along the batch: sample b takes from sample b - 1). With B = 1 partners are replaced
    by noise. Where boxes overlap the later box's filling wins.

    Note: with the defaults one box averages about 0.5 % of the volume, so 16 boxes drop ~7 % and
    `max_drop` rarely binds; raise `max_boxes` (about 100) to reach ~30 % as in the reference recipe.

    Args:
        x: (B, C, D, H, W) batch, any floating dtype and device.
        generator: source of all randomness (None: global RNG of x's device).
        min_side, max_side: box side range as fractions of each axis, 0 < min_side <= max_side <= 1.
        max_drop: stop adding boxes to a sample once this fraction of its voxels is dropped.
        max_boxes: maximum number of box rounds.
        cross_sample_prob: probability that a box is filled from the partner sample instead of noise.

    Returns:
        (x_cut (B, C, D, H, W) same dtype/device as x, hole_mask (B, 1, D, H, W) bool, True on every
        dropped voxel).
    """
    if x.ndim != 5:
        raise ValueError(f"expected (B, C, D, H, W), got shape {tuple(x.shape)}")
    if not 0 < min_side <= max_side <= 1:
        raise ValueError(f"need 0 < min_side <= max_side <= 1, got {min_side}, {max_side}")
    if max_boxes < 0 or not 0 <= cross_sample_prob <= 1:
        raise ValueError(f"invalid max_boxes={max_boxes} or cross_sample_prob={cross_sample_prob}")
    batch, device = x.shape[0], x.device
    spatial = tuple(x.shape[2:])  # (D, H, W)
    voxels = math.prod(spatial)
    bounds = [_side_bounds(s, min_side, max_side) for s in spatial]
    lo = torch.tensor([b[0] for b in bounds], device=device)  # (3,)
    span = torch.tensor([b[1] - b[0] for b in bounds], device=device)  # (3,)
    size = torch.tensor(spatial, device=device)  # (3,)

    # Every random number up front (the generator state after the call does not depend on early stops).
    draws = uniform_draws((max_boxes, batch, 7), generator, device)  # per round/sample: 3 sides, 3 starts, 1 source
    noise = uniform_draws(tuple(x.shape), generator, device).to(x.dtype)  # (B, C, D, H, W)

    coords = [torch.arange(s, device=device) for s in spatial]
    source = torch.zeros((batch, 1, *spatial), dtype=torch.uint8, device=device)  # 0 keep, 1 noise, 2 partner
    dropped = torch.zeros((batch, 1, *spatial), dtype=torch.bool, device=device)  # source != 0
    threshold = max_drop * voxels
    for draw in draws:  # draw: (B, 7)
        active = dropped.flatten(1).sum(1).to(torch.float32) < threshold  # (B,)
        if not bool(active.any()):
            break
        side = lo + (draw[:, :3] * (span + 1)).long().clamp(max=span)  # (B, 3) in [lo, hi]
        start = (draw[:, 3:6] * (size - side + 1)).long().clamp(max=size - side)  # (B, 3) in [0, S - side]
        inside = [
            (c[None, :] >= start[:, a, None]) & (c[None, :] < (start + side)[:, a, None]) for a, c in enumerate(coords)
        ]  # 3 x (B, S_a)
        inside[0] &= active[:, None]  # finished samples get an empty box
        box = (inside[0][:, :, None, None] & inside[1][:, None, :, None]) & inside[2][:, None, None, :]  # (B, D, H, W)
        box = box.unsqueeze(1)  # (B, 1, D, H, W)
        from_partner = (draw[:, 6] < cross_sample_prob) & (batch > 1)  # (B,)
        code = torch.where(from_partner, 2, 1).to(torch.uint8)[:, None, None, None, None]  # (B, 1, 1, 1, 1)
        source = torch.where(box, code, source)
        dropped |= box

    partner = x.roll(1, dims=0) if batch > 1 else noise
    x_cut = torch.where(source == 1, noise, torch.where(source == 2, partner, x))
    return x_cut, dropped
