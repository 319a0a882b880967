"""Batch-vectorised pretext transforms after the SwinUNETR pretraining (Tang et al., CVPR 2022; reference code:
Project-MONAI/research-contributions, SwinUNETR/Pretrain/utils/ops.py, `rot_rand`, `aug_rand`, `patch_rand_drop`):
quarter-turn rotation and two cutout variants, `cutout(variant=...)`.

* "reference" (the default, `reference_cutout`): the reference's distribution. Per view two passes of boxes, each
  pass drawing boxes until its own U(0, max_drop) share of the voxels is covered (overlaps counted); the first fills
  with Gaussian noise min-max scaled to [0, 1] over each box, the second (when the drawn partner is not the view
  itself) copies the same regions of another crop of the same view batch. At 96^3 with 4 crops per batch (the
  reference's 2 volumes x 2 crops per GPU): masked fraction mean ~0.22, sd ~0.10, 5-95 % range ~0.04-0.39; hole
  noise sd ~0.15; ~43 % of hole voxels hold crop content. tests/test_cutout_reference.py measures it against a loop
  re-implementation of the reference.
* "swinssl_v1" (`cutout_v1`, swinssl's first variant): one pass of rounds until a fixed max_drop is reached, uniform
  [0, 1) noise, each box from the partner with a fixed probability (masked fraction nearly constant).

Both take `copies`: the batch is `copies` stacked views of the same crops ([view 1 of crops 0..n-1; view 2 ...]).
A hole is never filled from the view's own twin (the other view of its crop), which would hand the contrastive task
a shortcut (matching content in both views); with one crop per batch there is no other crop, so holes get noise only.

On purpose unlike the reference:

* Rotation plane: we turn (by default) the axial (Y, X) plane of our (Z, Y, X) crops; the reference turns dims (2, 3)
  of its RAS (X, Y, Z) tensors, a sagittal turn. PET voxels are 4.07 x 4.07 mm in plane and 3 mm between slices:
  turning the axial plane maps equal spacings onto each other, while a sagittal turn would stretch anatomy by ~36 %
  and let the rotation head read the turn from the anisotropy. `pretext.rotation_dims` selects another plane.
* reference_cutout draws one Gaussian field per call and scales it per box, instead of fresh noise per box: a
  voxel shows only its last box's noise, so each visible box still holds i.i.d. N(0, 1) values min-max scaled over
  the whole box, as in the reference.

All functions take a (B, C, D, H, W) batch and work on any device and floating dtype. Randomness comes
only from the optional `generator`: numbers are drawn on the generator's device (x's device when no
generator is given, using the global RNG) and then moved to x's device, so a CPU generator also works for
CUDA inputs and the same seed reproduces the same result. For speed on GPU pass a generator created on
x's device.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

CutoutVariant = Literal["reference", "swinssl_v1"]


def uniform_draws(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """float32 uniform [0, 1) numbers drawn from `generator` (on its device), returned on `device`."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def normal_draws(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """float32 standard normal numbers drawn from `generator` (on its device), returned on `device`."""
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source).to(device)


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


# ------------------------------------------------------------------------------------------------------ cutout


def cutout(
    x: Tensor,
    generator: torch.Generator | None = None,
    variant: CutoutVariant = "reference",
    copies: int = 1,
    min_side: float = 0.05,
    max_side: float = 0.25,
    max_drop: float = 0.3,
    max_boxes: int = 100,
    cross_sample_prob: float = 0.3,
) -> tuple[Tensor, Tensor]:
    """`reference_cutout` (variant "reference") or `cutout_v1` ("swinssl_v1", which alone reads `max_boxes` and
    `cross_sample_prob`); returns (x_cut (B, C, D, H, W), hole_mask (B, 1, D, H, W) bool)."""
    if variant == "reference":
        return reference_cutout(x, generator, copies, min_side, max_side, max_drop)
    if variant == "swinssl_v1":
        return cutout_v1(x, generator, copies, min_side, max_side, max_drop, max_boxes, cross_sample_prob)
    raise ValueError(f"unknown cutout variant {variant!r}; valid: 'reference', 'swinssl_v1'")


def _check(x: Tensor, copies: int, min_side: float, max_side: float) -> int:
    """Validate the common arguments; returns n, the number of crops (samples per view)."""
    if x.ndim != 5:
        raise ValueError(f"expected (B, C, D, H, W), got shape {tuple(x.shape)}")
    if not 0 < min_side <= max_side <= 1:
        raise ValueError(f"need 0 < min_side <= max_side <= 1, got {min_side}, {max_side}")
    if copies < 1 or x.shape[0] % copies:
        raise ValueError(f"copies={copies} must divide the batch size {x.shape[0]}")
    return x.shape[0] // copies


def _reference_bounds(size: int, min_side: float, max_side: float) -> tuple[int, int, int]:
    """(lo, hi, starts) on an axis of `size` voxels as the reference draws a box: side uniform in [lo, hi] with
    lo = floor(min_side * size), hi = floor(max_side * size) - 1 (its randint excludes the upper end), start uniform
    in [0, starts) with starts = size - floor(min_side * size), the box clipped at the far border. Clamped to sides
    >= 1 and hi >= lo, where the reference would draw empty boxes or raise."""
    tol = math.floor(min_side * size + 1e-9)
    lo = min(max(1, tol), size)
    hi = max(lo, min(math.floor(max_side * size + 1e-9) - 1, size))
    return lo, hi, max(1, size - tol)


def _draw_boxes(target: Tensor, bounds: list[tuple[int, int, int]], spatial: tuple[int, ...],
                generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    """One reference pass of boxes for every sample: boxes until their summed volume reaches `target` voxels.

    The reference's `while total < target` loop, run for all samples at once in chunks of rounds: box r of a sample is
    kept while the volume of its boxes before r (clipped at the border, overlaps counted) is below the target, so a
    sample with a target > 0 keeps at least one box; chunks are drawn until every sample is done.

    Returns (sample (M,) long, start (M, 3), end (M, 3) long) of the kept boxes, each sample's in drawing order.
    """
    batch, device = target.shape[0], target.device
    lo, hi, starts = (torch.tensor(v, device=device) for v in zip(*bounds))  # (3,) each
    size = torch.tensor(spatial, device=device)
    typical = math.prod((b[0] + b[1]) / 2 for b in bounds)  # rounds per chunk: enough for most targets at once
    chunk = int(min(64, max(1, math.ceil(float(target.max()) / typical))))
    total = torch.zeros(batch, dtype=torch.long, device=device)
    kept_boxes = []
    while bool((total < target).any()):
        draw = uniform_draws((chunk, batch, 6), generator, device)
        side = lo + (draw[..., :3] * (hi - lo + 1)).long().clamp(max=hi - lo)  # (K, B, 3)
        start = (draw[..., 3:] * starts).long().clamp(max=starts - 1)
        end = torch.minimum(start + side, size)
        volume = (end - start).prod(-1)  # (K, B)
        drawn = total + volume.cumsum(0)
        kept = (drawn - volume) < target  # (K, B)
        sample = torch.arange(batch, device=device).expand(chunk, batch)
        kept_boxes.append((sample[kept], start[kept], end[kept]))  # row-major: rounds stay in order per sample
        total = drawn[-1]
    if not kept_boxes:
        empty = torch.zeros((0, 3), dtype=torch.long, device=device)
        return empty[:, 0], empty, empty
    return tuple(torch.cat(parts) for parts in zip(*kept_boxes))  # type: ignore[return-value]


def _box_voxels(start: Tensor, end: Tensor, spatial: tuple[int, ...], window: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Flat voxel indices of M boxes, each padded to `window` (the largest box side per axis): (M, prod(window)) long,
    and which of them lie in the box, same shape bool (padding points at a real voxel and is marked False)."""
    index, inside = torch.zeros((), dtype=torch.long, device=start.device), torch.ones((), dtype=torch.bool,
                                                                                          device=start.device)
    for a, (size, width) in enumerate(zip(spatial, window)):
        coord = start[:, a, None] + torch.arange(width, device=start.device)  # (M, width)
        shape = [1, 1, 1]
        shape[a] = width
        inside = inside & (coord < end[:, a, None]).view(-1, *shape)
        index = index * size + coord.clamp(max=size - 1).view(-1, *shape)
    return index.flatten(1), inside.expand(index.shape).flatten(1)


def _paint(boxes: tuple[Tensor, Tensor, Tensor], batch: int, spatial: tuple[int, ...], window: tuple[int, ...],
           field: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Rasterise `_draw_boxes`' boxes: label (B, N) long, the last box (its row in `boxes`) covering each voxel, -1
    none; and low, high (M,): the minimum and maximum of `field` (B, C, N) over each whole box and all channels."""
    sample, start, end = boxes
    voxels = math.prod(spatial)
    index, inside = _box_voxels(start, end, spatial, window)  # (M, V) each
    index += sample[:, None] * voxels  # into the flattened (B * N) batch
    label = torch.full((batch * voxels,), -1, dtype=torch.long, device=start.device)
    order = torch.arange(sample.shape[0], device=start.device)[:, None]  # later rows are later boxes of a sample
    label.scatter_reduce_(0, index.flatten(), torch.where(inside, order, -1).flatten(), "amax")
    low = high = torch.zeros(0, device=start.device)
    if field is not None:
        lows, highs = [], []
        for channel in field.unbind(1):  # (B, N): 1-D takes are much faster than a 2-D advanced index
            values = channel.take(index)  # (M, V)
            lows.append(torch.where(inside, values, math.inf).amin(1))
            highs.append(torch.where(inside, values, -math.inf).amax(1))
        low, high = torch.stack(lows).amin(0), torch.stack(highs).amax(0)
    return label.view(batch, voxels), low, high


def reference_cutout(
    x: Tensor,
    generator: torch.Generator | None = None,
    copies: int = 1,
    min_side: float = 0.05,
    max_side: float = 0.25,
    max_drop: float = 0.3,
) -> tuple[Tensor, Tensor]:
    """The reference's cutout (`aug_rand`), vectorised; `copies` views of n crops, partners within a view.

    For view sample i (crop c of its view batch), as the reference does it:

    1. noise pass: boxes until U(0, max_drop) x voxels are covered (overlaps counted); box sides integer, uniform in
       [floor(min_side S), floor(max_side S) - 1], starts uniform in [0, S - floor(min_side S)), clipped at the far
       border; each box filled, over all channels, with N(0, 1) noise min-max scaled to [0, 1] over the box;
    2. partner pass: j drawn uniformly among the n crops; if j != c, a second, independent pass of boxes copies the
       same regions of crop j of the *same view batch* (so never the view's twin). As in the reference's in-place
       loop, a partner earlier in the batch (j < c) is read after its own cutout, a later one before it.

    With n = 1 (one crop per batch) there is no partner pass, only noise.

    Args:
        x: (B, C, D, H, W) batch, B = copies * n, any floating dtype and device.
        generator: source of all randomness (None: global RNG of x's device).
        copies: views of each crop stacked along the batch (1, or 2 for the contrastive pair).
        min_side, max_side: box side range as fractions of each axis, 0 < min_side <= max_side <= 1.
        max_drop: each pass covers a U(0, max_drop) share of the voxels (plus the overshoot of its last box).

    Returns:
        (x_cut (B, C, D, H, W) same dtype/device as x, hole_mask (B, 1, D, H, W) bool, True where either pass put
        a box).
    """
    n = _check(x, copies, min_side, max_side)
    batch, device, spatial = x.shape[0], x.device, tuple(x.shape[2:])
    voxels = math.prod(spatial)
    bounds = [_reference_bounds(s, min_side, max_side) for s in spatial]
    draws = uniform_draws((3, batch), generator, device)  # noise target, partner target, partner crop
    crop = torch.arange(batch, device=device) % n
    other = (draws[2] * n).long().clamp(max=n - 1)  # (B,) partner crop index in the same view batch
    has_partner = other != crop
    targets = draws[:2].double() * (max_drop * voxels)
    field = normal_draws((batch, x.shape[1], voxels), generator, device)  # (B, C, N)

    window = tuple(b[1] for b in bounds)
    label, low, high = _paint(_draw_boxes(targets[0], bounds, spatial, generator), batch, spatial, window, field)
    noisy = (label >= 0)[:, None]  # (B, 1, N)
    out = x.flatten(2).clone()  # written in place below; never a view of x
    if low.numel():
        scale = (high - low).clamp(min=torch.finfo(torch.float32).tiny)  # a 1-voxel 1-channel box: 0, not 0 / 0
        pick = label.clamp(min=0)
        noise = (field - low.take(pick)[:, None]) / scale.take(pick)[:, None]  # (B, C, N)
        out = torch.where(noisy, noise.to(x.dtype), out)

    partner_boxes = _draw_boxes(torch.where(has_partner, targets[1], 0.0), bounds, spatial, generator)
    partner_label, _, _ = _paint(partner_boxes, batch, spatial, window)
    copied = (partner_label >= 0)[:, None]  # (B, 1, N)
    source = torch.arange(batch, device=device) - crop + other  # (B,) same view, crop `other`
    flat = x.flatten(2)
    for c in range(n):  # crop order matters: the reference reads earlier crops after their own cutout
        rows = torch.arange(c, batch, n, device=device)
        earlier = (other[rows] < c).view(-1, 1, 1)
        content = torch.where(earlier, out[source[rows]], flat[source[rows]])
        out[rows] = torch.where(copied[rows], content, out[rows])
    return out.view_as(x), (noisy | copied).view(batch, 1, *spatial)


# ---------------------------------------------------------------------------------------------- swinssl_v1


def _side_bounds(size: int, min_side: float, max_side: float) -> tuple[int, int]:
    """Integer box side range [lo, hi] in voxels whose fractions of `size` lie in [min_side, max_side].

    lo = ceil(min_side * size), hi = floor(max_side * size), clamped to [1, size] with hi >= lo (so on a
    very short axis the box may exceed max_side rather than vanish).
    """
    lo = min(max(1, math.ceil(min_side * size - 1e-9)), size)
    hi = max(lo, min(math.floor(max_side * size + 1e-9), size))
    return lo, hi


def cutout_v1(
    x: Tensor,
    generator: torch.Generator | None = None,
    copies: int = 1,
    min_side: float = 0.05,
    max_side: float = 0.25,
    max_drop: float = 0.3,
    max_boxes: int = 16,
    cross_sample_prob: float = 0.3,
) -> tuple[Tensor, Tensor]:
    """swinssl's first cutout: boxes until a fixed fraction is dropped, uniform noise or a partner's content.

    Per round (at most `max_boxes` rounds) one box is drawn for every sample at once: each side an
    integer number of voxels, uniform in [ceil(min_side * S), floor(max_side * S)] for an axis of size S,
    the box placed uniformly so that it lies inside the crop. A sample keeps its box only while its
    dropped fraction (overlaps counted once) is still < `max_drop`, so the final fraction is below
    `max_drop` plus one box's volume. Rounds stop early once no sample is still below `max_drop`.

    Each kept box is filled, over all channels, either with uniform [0, 1) noise (inputs are normalised to
    [0, 1]) or, with probability `cross_sample_prob`, with the same region of the *uncut* partner sample
    (x rolled by one along the batch: sample b takes from sample b - 1). Where that partner is the sample's twin
    (another view of the same crop: with one crop, n = 1) or the sample itself (B = 1), noise instead. Where boxes
    overlap the later box's filling wins.

    Note: with the defaults one box averages about 0.5 % of the volume, so 16 boxes drop ~7 % and
    `max_drop` rarely binds; raise `max_boxes` (about 100) to reach ~30 % as in the reference recipe.

    Args:
        x: (B, C, D, H, W) batch, any floating dtype and device.
        generator: source of all randomness (None: global RNG of x's device).
        copies: views of each crop stacked along the batch, B = copies * n (1, or 2 for the contrastive pair).
        min_side, max_side: box side range as fractions of each axis, 0 < min_side <= max_side <= 1.
        max_drop: stop adding boxes to a sample once this fraction of its voxels is dropped.
        max_boxes: maximum number of box rounds.
        cross_sample_prob: probability that a box is filled from the partner sample instead of noise.

    Returns:
        (x_cut (B, C, D, H, W) same dtype/device as x, hole_mask (B, 1, D, H, W) bool, True on every
        dropped voxel).
    """
    n = _check(x, copies, min_side, max_side)
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
    crop = torch.arange(batch, device=device) % n
    distinct = crop.roll(1) != crop  # (B,) the rolled partner is another crop, not this view's twin or itself
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
        from_partner = (draw[:, 6] < cross_sample_prob) & distinct  # (B,)
        code = torch.where(from_partner, 2, 1).to(torch.uint8)[:, None, None, None, None]  # (B, 1, 1, 1, 1)
        source = torch.where(box, code, source)
        dropped |= box

    partner = x.roll(1, dims=0)  # used only where `distinct`
    x_cut = torch.where(source == 1, noise, torch.where(source == 2, partner, x))
    return x_cut, dropped
