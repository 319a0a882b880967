"""The own input views of the pretext tasks that do not read the shared rotated + cut-out views (`registry.Views`).

Each maker is a pure function of the crops and the step's generator (`train.loop.step_generator`), vectorised over
the batch: the draws are made on the generator's device and moved to the crops' device (as `pretext_ops` does), so a
resumed run draws the same masks and hidden channels.

* `masked_view` (masked-patch modelling, after SimMIM, Xie et al., CVPR 2022): each crop is tiled into mask patches
  of `mask_patch`^3 voxels and exactly ceil(ratio x patches) of them, chosen uniformly, are masked. The mask is given
  on the encoder's 2-voxel patch-embedding grid (where the mask token replaces embeddings) and on the voxel grid
  (where the loss is scored): a voxel is masked iff its embedding patch is, iff its mask patch is.
* `hidden_modality_view` (cross-modal reconstruction): each crop hides its CT (channel 0) with probability
  `hide_ct`, else its PET (channel 1); the hidden channel of the input is 0 everywhere (the normalised intensity of
  air / no uptake), whatever it held, so nothing of it reaches the encoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .pretext_ops import uniform_draws

#: Side in voxels of the encoder's patch embedding (SwinUNETR's patch_size 2).
EMBED_PATCH = 2
#: Channel order of a prepared image (petct.shards): 0 CT, 1 PET.
CT, PET = 0, 1


@dataclass(frozen=True)
class OwnView:
    """What an own-view task's encoder pass reads; its loss gets the whole view."""

    input: Tensor
    """(B, C, D, H, W) the network input."""
    target: Tensor
    """(B, C, D, H, W) the crops as they came (the reconstruction target)."""
    patch_mask: Tensor | None = None
    """(B, D/2, H/2, W/2) bool: patch embeddings the encoder replaces by the head's mask token; None: no masking."""


@dataclass(frozen=True, kw_only=True)
class MaskedView(OwnView):
    voxel_mask: Tensor
    """(B, 1, D, H, W) bool: the voxels of the masked patches (where the loss is scored)."""


@dataclass(frozen=True, kw_only=True)
class HiddenModalityView(OwnView):
    hidden: Tensor
    """(B,) long: the channel hidden from each crop's input (CT=0 or PET=1)."""


def _upsample(grid: Tensor, factor: int) -> Tensor:
    """(B, d, h, w) -> (B, d*f, h*f, w*f), each cell repeated into an f^3 block."""
    for dim in (1, 2, 3):
        grid = grid.repeat_interleave(factor, dim=dim)
    return grid


def masked_view(x: Tensor, generator: torch.Generator | None, ratio: float, mask_patch: int) -> MaskedView:
    """Mask exactly ceil(ratio x N) of the N mask patches of every crop (independently per crop).

    Args:
        x: (B, C, D, H, W) crops, every spatial side a multiple of `mask_patch`.
        generator: the step's RNG (None: the global one).
        ratio: share of mask patches to mask, in (0, 1).
        mask_patch: mask patch side in voxels, a multiple of 2 (the patch embedding's).
    """
    if mask_patch % EMBED_PATCH or mask_patch <= 0 or any(s % mask_patch for s in x.shape[2:]):
        raise ValueError(f"mask_patch={mask_patch} must be a positive multiple of {EMBED_PATCH} dividing every side "
                         f"of {tuple(x.shape[2:])}")
    batch, cells = x.shape[0], tuple(s // mask_patch for s in x.shape[2:])
    count = min(max(math.ceil(ratio * math.prod(cells)), 1), math.prod(cells))
    scores = uniform_draws((batch, math.prod(cells)), generator, x.device)
    rank = scores.argsort(dim=1).argsort(dim=1)  # each patch's rank in a uniform random order of its crop
    grid = (rank < count).view(batch, *cells)
    patch_mask = _upsample(grid, mask_patch // EMBED_PATCH)
    voxel_mask = _upsample(grid, mask_patch).unsqueeze(1)
    return MaskedView(input=x, target=x, patch_mask=patch_mask, voxel_mask=voxel_mask)


def hidden_modality_view(x: Tensor, generator: torch.Generator | None, hide_ct: float) -> HiddenModalityView:
    """Hide the CT of each crop with probability `hide_ct`, else its PET; the hidden channel becomes 0.

    Args:
        x: (B, 2, D, H, W) crops (channel 0 CT, 1 PET).
        generator: the step's RNG (None: the global one).
        hide_ct: probability of hiding the CT, in [0, 1].
    """
    if x.shape[1] != 2:
        raise ValueError(f"cross-modal reconstruction needs 2 channels (CT, PET), got {x.shape[1]}")
    hidden = torch.where(uniform_draws((x.shape[0],), generator, x.device) < hide_ct, CT, PET)
    channels = torch.arange(x.shape[1], device=x.device)
    visible = (channels.view(1, -1) != hidden.view(-1, 1)).view(*x.shape[:2], 1, 1, 1)
    # torch.where, not a product: a NaN or inf in the hidden channel must not leak through 0 * value
    hidden_input = torch.where(visible, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return HiddenModalityView(input=hidden_input, target=x, hidden=hidden)
