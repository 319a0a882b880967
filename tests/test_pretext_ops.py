"""Batch pretext transforms: quarter-turn rotation labels, the two cutout variants' boxes and fillings (the default
"reference" one against the SwinUNETR pretraining's statistics: tests/test_cutout_reference.py), and that no view is
filled from its own twin (the batch_size=1 shortcut)."""

from __future__ import annotations

import math

import pytest
import torch

from swinssl.config import PretrainConfig, load_config
from swinssl.tasks.pretext_ops import cutout, cutout_v1, random_rotation, rotate_quarter
from swinssl.tasks.pretrain import PretrainTask


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------- rotation


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_rotating_back_by_minus_k_recovers_input(k):
    x = torch.randn(3, 2, 4, 6, 6, generator=_gen(k))
    turns = torch.full((3,), k)
    rotated = rotate_quarter(x, turns)
    assert torch.equal(rotate_quarter(rotated, -turns), x)
    assert (k == 0) == torch.equal(rotated, x)


def test_asymmetric_marker_lands_where_rot90_puts_it():
    # 4 x 4 plane, marker at (h, w) = (0, 1); torch.rot90 turns from h towards w:
    # k=1: out[i, j] = in[j, 3 - i] -> (2, 0); k=2: out[i, j] = in[3 - i, 3 - j] -> (3, 2); k=3: in[3 - j, i] -> (1, 3)
    expected = {0: (0, 1), 1: (2, 0), 2: (3, 2), 3: (1, 3)}
    x = torch.zeros(4, 2, 3, 4, 4)
    x[:, :, 1, 0, 1] = 1.0
    x[:, 1] *= 2.0  # channels distinguishable: both must move together
    out = rotate_quarter(x, torch.tensor([0, 1, 2, 3]))
    for k, (h, w) in expected.items():
        for c, value in ((0, 1.0), (1, 2.0)):
            assert out[k, c].sum().item() == value
            assert out[k, c, 1, h, w].item() == value


def test_mixed_k_batch_equals_per_sample_rot90():
    x = torch.randn(6, 2, 3, 5, 5, generator=_gen(1))
    k = torch.tensor([3, 0, 1, 2, 1, 3])
    out = rotate_quarter(x, k)
    for b in range(6):
        assert torch.equal(out[b], torch.rot90(x[b], int(k[b]), (-2, -1)))
    other_plane = rotate_quarter(x[:, :, :, :, :3], k, dims=(-3, -1))  # D=3, W=3
    for b in range(6):
        assert torch.equal(other_plane[b], torch.rot90(x[b, :, :, :, :3], int(k[b]), (-3, -1)))


def test_rotation_rejects_unequal_plane_and_bad_dims():
    with pytest.raises(ValueError, match="equal sizes"):
        rotate_quarter(torch.zeros(2, 1, 4, 4, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        rotate_quarter(torch.zeros(2, 2, 2, 4, 4), torch.zeros(2, dtype=torch.long), dims=(0, 1))
    with pytest.raises(ValueError):
        rotate_quarter(torch.zeros(2, 1, 4, 4, 4), torch.zeros(3, dtype=torch.long))


def test_random_rotation_labels_match_and_are_reproducible():
    x = torch.randn(64, 2, 2, 4, 4, generator=_gen(2))
    rotated, k = random_rotation(x, _gen(5))
    assert k.dtype == torch.long and k.shape == (64,)
    assert set(k.tolist()) == {0, 1, 2, 3}
    for b in range(64):
        assert torch.equal(rotated[b], torch.rot90(x[b], int(k[b]), (-2, -1)))
    again, k_again = random_rotation(x, _gen(5))
    assert torch.equal(k, k_again) and torch.equal(rotated, again)
    assert not torch.equal(k, random_rotation(x, _gen(6))[1])


def test_rotation_keeps_dtype_and_gradient():
    x = torch.randn(4, 2, 2, 4, 4, generator=_gen(3)).to(torch.bfloat16).requires_grad_(True)
    rotated, k = random_rotation(x, _gen(0))
    assert rotated.dtype == torch.bfloat16 and rotated.shape == x.shape
    (rotated * torch.arange(rotated.numel()).reshape(rotated.shape)).sum().backward()
    # the grad is the weight pattern rotated back
    weights = torch.arange(rotated.numel()).reshape(rotated.shape).to(torch.bfloat16)
    assert torch.equal(x.grad, rotate_quarter(weights, -k))


# ------------------------------------------------------------------------------------------ cutout swinssl_v1

SHAPE = (4, 2, 20, 32, 40)


def _box_volume_bounds(min_side: float, max_side: float, spatial: tuple[int, ...]) -> tuple[float, float]:
    """Smallest and largest possible single-box volume fraction (integer sides, as documented)."""
    lo = [max(1, math.ceil(min_side * s - 1e-9)) for s in spatial]
    hi = [max(low, math.floor(max_side * s + 1e-9)) for low, s in zip(lo, spatial)]
    n = math.prod(spatial)
    return math.prod(lo) / n, math.prod(hi) / n


def _fraction(mask: torch.Tensor) -> torch.Tensor:
    return mask.flatten(1).float().mean(1)


def test_v1_cutout_shape_dtype_preserved():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.rand(SHAPE, generator=_gen(0)).to(dtype)
        x_cut, mask = cutout_v1(x, _gen(1))
        assert x_cut.shape == x.shape and x_cut.dtype == dtype and x_cut.device == x.device
        assert mask.shape == (SHAPE[0], 1, *SHAPE[2:]) and mask.dtype == torch.bool
        assert mask.any()


def test_v1_cutout_noise_fill_mask_marks_exactly_the_changed_voxels():
    x = -1.0 - torch.rand(SHAPE, generator=_gen(0))  # values in (-2, -1]: noise in [0, 1) never equals them
    x_cut, mask = cutout_v1(x, _gen(3), cross_sample_prob=0.0)
    changed = x_cut != x  # (B, C, D, H, W)
    assert torch.equal(changed, mask.expand_as(x))  # every channel of a hole changes, nothing else
    holes = x_cut[mask.expand_as(x)]
    assert holes.min() >= 0.0 and holes.max() < 1.0
    assert holes.std() > 0.2  # uniform noise (std 0.289), not a constant fill


def test_v1_cutout_partner_fill_takes_the_rolled_sample():
    batch = SHAPE[0]
    x = torch.rand(SHAPE, generator=_gen(0)) + 10.0 * torch.arange(1, batch + 1).view(-1, 1, 1, 1, 1)
    x_cut, mask = cutout_v1(x, _gen(4), cross_sample_prob=1.0)
    full = mask.expand_as(x)
    assert mask.any()
    partner = x.roll(1, dims=0)  # sample b is filled from sample b - 1 (uncut)
    assert torch.equal(x_cut[full], partner[full])
    assert torch.equal(x_cut[~full], x[~full])
    assert torch.equal(x_cut != x, full)


def test_v1_cutout_mixed_fill_every_hole_is_noise_or_partner():
    batch = SHAPE[0]
    x = torch.rand(SHAPE, generator=_gen(0)) + 10.0 * torch.arange(1, batch + 1).view(-1, 1, 1, 1, 1)
    x_cut, mask = cutout_v1(x, _gen(8), cross_sample_prob=0.5, max_boxes=40, max_drop=1.0)
    full = mask.expand_as(x)
    from_partner = x_cut == x.roll(1, dims=0)
    from_noise = (x_cut >= 0) & (x_cut < 1)
    assert torch.equal(from_partner | from_noise, full)
    assert from_partner.any() and from_noise.any()
    assert torch.equal(x_cut[~full], x[~full])


def test_v1_cutout_single_sample_falls_back_to_noise():
    x = torch.rand((1, *SHAPE[1:]), generator=_gen(0)) + 5.0
    x_cut, mask = cutout_v1(x, _gen(2), cross_sample_prob=1.0)
    full = mask.expand_as(x)
    assert mask.any()
    assert torch.equal(x_cut != x, full)
    assert x_cut[full].max() < 1.0 and x_cut[full].min() >= 0.0


def test_v1_cutout_dropped_fraction_bounds():
    x = torch.rand(SHAPE, generator=_gen(0))
    spatial = SHAPE[2:]
    min_box, max_box = _box_volume_bounds(0.05, 0.25, spatial)
    # Default cap of 16 boxes: at least one box each, never beyond max_drop + one box.
    _, mask = cutout_v1(x, _gen(1))
    frac = _fraction(mask)
    assert (frac >= min_box).all() and (frac < 0.3 + max_box).all()
    # Enough boxes to reach max_drop: every sample stops in [max_drop, max_drop + one box).
    _, mask = cutout_v1(x, _gen(1), max_boxes=300)
    frac = _fraction(mask)
    assert (frac >= 0.3).all() and (frac < 0.3 + max_box).all(), frac
    # max_drop = 0 drops nothing.
    x_cut, mask = cutout_v1(x, _gen(1), max_drop=0.0)
    assert not mask.any() and torch.equal(x_cut, x)


def test_v1_cutout_single_box_sides_within_bounds():
    batch, spatial = 64, (20, 32, 40)
    x = torch.rand(batch, 1, *spatial, generator=_gen(0))
    min_side, max_side = 0.1, 0.3
    _, mask = cutout_v1(x, _gen(9), min_side=min_side, max_side=max_side, max_boxes=1)
    sides = []
    for b in range(batch):
        m = mask[b, 0]
        extents = [m.any(dim=tuple(d for d in range(3) if d != a)) for a in range(3)]  # 3 x (S_a,)
        box = extents[0][:, None, None] & extents[1][None, :, None] & extents[2][None, None, :]
        assert torch.equal(m, box)  # exactly one axis-aligned box
        for a, (extent, size) in enumerate(zip(extents, spatial)):
            idx = torch.nonzero(extent).squeeze(1)
            side = idx.numel()
            assert idx[-1] - idx[0] + 1 == side  # contiguous, inside the crop by construction of the index
            assert min_side <= side / size <= max_side, (b, a, side)
            sides.append((a, side))
    # the side range is used: both ends of [ceil(0.1 S), floor(0.3 S)] occur on the W axis (4..12)
    w_sides = {s for a, s in sides if a == 2}
    assert min(w_sides) <= 5 and max(w_sides) >= 11


def test_v1_cutout_reproducible_with_seed():
    x = torch.rand(SHAPE, generator=_gen(0))
    a_cut, a_mask = cutout_v1(x, _gen(11))
    b_cut, b_mask = cutout_v1(x, _gen(11))
    assert torch.equal(a_cut, b_cut) and torch.equal(a_mask, b_mask)
    c_cut, c_mask = cutout_v1(x, _gen(12))
    assert not torch.equal(a_mask, c_mask) and not torch.equal(a_cut, c_cut)


# ------------------------------------------------------------------------------------------- cutout reference


def test_reference_cutout_shape_dtype_preserved():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.rand(SHAPE, generator=_gen(0)).to(dtype)
        x_cut, mask = cutout(x, _gen(1))
        assert x_cut.shape == x.shape and x_cut.dtype == dtype and x_cut.device == x.device
        assert mask.shape == (SHAPE[0], 1, *SHAPE[2:]) and mask.dtype == torch.bool
        assert mask.any()


def test_reference_noise_is_min_max_scaled_per_box_over_all_channels():
    # one crop per batch (copies = B): no partner pass; a tiny drop target: exactly one box per view
    x = -1.0 - torch.rand(SHAPE, generator=_gen(0))  # values in (-2, -1]: noise in [0, 1] never equals them
    x_cut, mask = cutout(x, _gen(3), copies=SHAPE[0], max_drop=1e-9)
    assert torch.equal(x_cut != x, mask.expand_as(x))  # every channel of a hole changes, nothing else
    for b in range(SHAPE[0]):
        holes = x_cut[b][mask[b].expand_as(x[b])]
        assert holes.min().item() == 0.0 and holes.max().item() == 1.0  # scaled over the box and both channels
        assert 0.08 < holes.std().item() < 0.3  # scaled Gaussian (sd ~ 1 / range), not a constant fill


def test_reference_drop_fraction_bounds():
    x = torch.rand(SHAPE, generator=_gen(0))
    min_box, max_box = _box_volume_bounds(0.05, 0.25, SHAPE[2:])
    frac = _fraction(cutout(x, _gen(1))[1])
    # at least one box; each pass covers below max_drop plus its last box (two passes at most)
    assert (frac >= min_box * 0.9).all() and (frac < 2 * (0.3 + max_box)).all()
    x_cut, mask = cutout(x, _gen(1), max_drop=0.0)  # U(0, 0) targets: no box at all
    assert not mask.any() and torch.equal(x_cut, x)


def test_reference_cutout_reproducible_with_seed():
    x = torch.rand(SHAPE, generator=_gen(0))
    a_cut, a_mask = cutout(x, _gen(11))
    b_cut, b_mask = cutout(x, _gen(11))
    assert torch.equal(a_cut, b_cut) and torch.equal(a_mask, b_mask)
    c_cut, c_mask = cutout(x, _gen(12))
    assert not torch.equal(a_mask, c_mask) and not torch.equal(a_cut, c_cut)


def test_cutout_rejects_unknown_variant_and_bad_copies():
    x = torch.rand(SHAPE, generator=_gen(0))
    with pytest.raises(ValueError, match="unknown cutout variant"):
        cutout(x, _gen(0), variant="tang")
    for variant in ("reference", "swinssl_v1"):
        with pytest.raises(ValueError, match="copies=3"):
            cutout(x, _gen(0), variant=variant, copies=3)


# ------------------------------------------------------------------------------ the batch_size=1 shortcut


@pytest.mark.parametrize("variant", ["reference", "swinssl_v1"])
def test_batch_size_one_views_are_never_filled_from_their_twin(variant):
    """data.batch_size=1: the two views of the one crop are the whole batch. Before the fix swinssl_v1 filled every
    cross-sample hole of view 1 from view 2 (and back); now every hole holds noise."""
    cfg = load_config(None, ["model.feature_size=12", "data.roi=[32,32,32]", "data.batch_size=1",
                             f"pretext.cutout={variant}", "pretext.cutout_cross_sample=1.0"], PretrainConfig)
    task = PretrainTask(cfg)
    assert task.copies == 2
    x = 2.0 + torch.rand(1, 2, 32, 32, 32, generator=_gen(0))  # crop content in [2, 3), noise in [0, 1]
    for seed in range(3):
        views = task._views(x, _gen(seed))
        for view, twin in ((0, 1), (1, 0)):
            full = views.holes[view].expand_as(views.cut[view])
            filled = views.cut[view][full]
            assert filled.numel() > 0
            assert not bool((filled == views.target[twin][full]).any())  # no voxel of the twin's content
            assert filled.max().item() <= 1.0  # noise only: the twin is the only other sample
        assert torch.equal(views.cut[~views.holes.expand_as(views.cut)], views.target[~views.holes.expand_as(
            views.target)])


def test_v1_partner_is_never_the_twin_but_another_crop_when_there_is_one():
    # two crops x two views, stacked [v1 c0, v1 c1, v2 c0, v2 c1]: sample b takes from b - 1, never from b +- 2
    x = torch.rand(4, 1, 20, 32, 40, generator=_gen(0)) + 10.0 * torch.arange(1, 5).view(-1, 1, 1, 1, 1)
    x_cut, mask = cutout_v1(x, _gen(4), copies=2, cross_sample_prob=1.0)
    full = mask.expand_as(x)
    assert mask.any() and torch.equal(x_cut[full], x.roll(1, dims=0)[full])
