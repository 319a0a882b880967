"""The own view of position-aware volume contrast (`voco`, after VoCo: Wu et al., "VoCo: A Simple-yet-Effective
Volume Contrastive Learning Framework for 3D Medical Image Analysis", CVPR 2024; github.com/Luffy03/VoCo).

Each crop (B, C, D, H, W) is the region. It is tiled into a `grid` = (gz, gy, gx) of base crops of (D/gz, H/gy,
W/gx) voxels, and `randoms` random crops of the same size are placed uniformly inside the region (integer voxel
offsets). VoCo tiles its 384 x 384 x 96 region into 4 x 4 x 1 base crops (x and y only); at the PET grid's 4.07 mm a
96^3 crop already spans 391 mm in plane, most of a body's cross-section, so the grid is configurable on every axis
(default 1 x 3 x 3: base crops of 96 x 32 x 32 voxels = 288 x 130 x 130 mm). The target of random crop j and base
crop k is their overlap as a share of the random crop's volume; since the base crops tile the region and a random
crop lies inside it, each random crop's shares sum to exactly 1 (`get_position_label` in VoCo's utils/data_utils.py
computes the same areas).

On purpose unlike VoCo: no resampling (VoCo resizes its 96^3 crops to 64^3; ours keep the PET grid) and no flips,
turns or intensity shifts of the crops (VoCo's `aug` option, off by default there).

Pure function of the crops and the step generator, vectorised over the batch (see `pretext_views`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .pretext_ops import uniform_draws
from .pretext_views import OwnView


@dataclass(frozen=True, kw_only=True)
class PositionView(OwnView):
    """`input` is (B*g + B*n, C, d, h, w): the g base crops of crop 0, ..., of crop B-1, then the n random crops of
    crop 0, ..., of crop B-1 (one encoder pass for all of them)."""

    overlap: Tensor
    """(B, n, g) float32: share of random crop j of crop b inside base crop k (row-major over the grid); rows sum
    to 1."""
    offsets: Tensor
    """(B, n, 3) long: (z, y, x) voxel offset of each random crop in its region."""
    grid: tuple[int, int, int]
    """(gz, gy, gx) base crops along Z, Y and X."""

    @property
    def bases(self) -> int:
        return math.prod(self.grid)


def base_crops(x: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """(B, C, D, H, W) -> (B, g, C, D/gz, H/gy, W/gx): the tiles in row-major (z, y, x) order."""
    (batch, channels), size = x.shape[:2], crop_size(x.shape[2:], grid)
    tiles = x.view(batch, channels, grid[0], size[0], grid[1], size[1], grid[2], size[2])
    return tiles.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(batch, math.prod(grid), channels, *size)


def crop_size(sides: Sequence[int], grid: Sequence[int]) -> tuple[int, int, int]:
    """Side of a base crop (and of a random crop) along each axis."""
    return tuple(side // tiles for side, tiles in zip(sides, grid))


def cut_crops(x: Tensor, offsets: Tensor, size: tuple[int, int, int]) -> Tensor:
    """(B, C, D, H, W), offsets (B, n, 3) -> (B, n, C, d, h, w): the windows of `size` at those (z, y, x)."""
    batch = x.shape[0]
    z, y, w = (offsets[..., axis, None] + torch.arange(side, device=x.device) for axis, side in enumerate(size))
    rows = torch.arange(batch, device=x.device).view(batch, 1, 1, 1, 1)
    picked = x.permute(0, 2, 3, 4, 1)[rows, z[..., :, None, None], y[..., None, :, None], w[..., None, None, :]]
    return picked.permute(0, 1, 5, 2, 3, 4)  # (B, n, d, h, w, C) -> (B, n, C, d, h, w)


def overlap_shares(offsets: Tensor, size: tuple[int, int, int], grid: tuple[int, int, int]) -> Tensor:
    """(B, n, 3) offsets of crops of `size` in a region tiled by a grid of such tiles -> (B, n, g) shares of each
    crop inside each tile (exact: integer voxel counts over the crop's voxels)."""
    per_axis = []
    for axis, (side, tiles) in enumerate(zip(size, grid)):
        start = offsets[..., axis, None]  # (B, n, 1)
        tile_start = torch.arange(tiles, device=offsets.device) * side  # (tiles,)
        per_axis.append((torch.minimum(tile_start + side, start + side) - torch.maximum(tile_start, start)).clamp(0))
    voxels = per_axis[0][..., :, None, None] * per_axis[1][..., None, :, None] * per_axis[2][..., None, None, :]
    return voxels.flatten(2).double().div(math.prod(size)).float()  # (B, n, gz*gy*gx)


def position_view(x: Tensor, generator: torch.Generator | None, grid: Sequence[int], randoms: int) -> PositionView:
    """Base crops on a `grid` over each crop and `randoms` random crops of their size inside it.

    Args:
        x: (B, C, D, H, W) crops; each side divisible by its grid count.
        generator: the step's RNG (None: the global one).
        grid: (gz, gy, gx) base crops, at least 2 in all.
        randoms: random crops per crop, >= 1.
    """
    grid, sides = tuple(int(g) for g in grid), tuple(x.shape[2:])
    if len(grid) != 3 or min(grid) < 1 or math.prod(grid) < 2 or any(s % g for s, g in zip(sides, grid)) \
            or randoms < 1:
        raise ValueError(f"grid {grid} must tile the (D, H, W) = {sides} crop into >= 2 base crops and randoms "
                         f"({randoms}) must be >= 1")
    size = crop_size(sides, grid)
    room = torch.tensor([s - c + 1 for s, c in zip(sides, size)], device=x.device)
    draws = uniform_draws((x.shape[0], randoms, 3), generator, x.device)
    offsets = torch.minimum((draws * room).long(), room - 1)
    bases = base_crops(x, grid).flatten(0, 1)
    crops = cut_crops(x, offsets, size).flatten(0, 1)
    return PositionView(input=torch.cat([bases, crops]), target=x, overlap=overlap_shares(offsets, size, grid),
                        offsets=offsets, grid=grid)
