"""Inpainting (reconstruction) pretext loss: L1 between the decoder output and the rotated, uncut crop.

The SwinUNETR pretraining (Tang et al., CVPR 2022; Project-MONAI/research-contributions, SwinUNETR/Pretrain) averages
over the whole volume, not only the cut-out holes; `holes_only` is the alternative.
"""

from __future__ import annotations

import torch
from torch import Tensor


def inpainting_loss(
    reconstruction: Tensor,
    target: Tensor,
    hole_mask: Tensor | None = None,
    holes_only: bool = False,
) -> Tensor:
    """Mean absolute error between a reconstruction and its target.

    Args:
        reconstruction: (B, C, D, H, W) decoder output.
        target: (B, C, D, H, W) the uncut (rotated) crop.
        hole_mask: (B, 1, D, H, W) bool, True where `cutout` dropped a voxel (all channels). Needed
            only when `holes_only`.
        holes_only: False (reference behaviour) averages |reconstruction - target| over every element
            of the volume; True averages it over the hole voxels only, all channels included, i.e.
            sum(|diff| * mask) / (C * number of hole voxels).

    Returns:
        Scalar tensor. With `holes_only` and no hole voxel in the whole batch it is exactly 0 and stays
        differentiable (its gradient is 0, never NaN). Half-precision inputs are promoted to float32.
    """
    if reconstruction.shape != target.shape:
        raise ValueError(f"shape mismatch: {tuple(reconstruction.shape)} vs {tuple(target.shape)}")
    if reconstruction.dtype in (torch.float16, torch.bfloat16):
        reconstruction = reconstruction.float()
    diff = (reconstruction - target.to(reconstruction.dtype)).abs()  # (B, C, D, H, W)
    if not holes_only:
        return diff.mean()
    if hole_mask is None:
        raise ValueError("holes_only=True needs a hole_mask")
    expected = (reconstruction.shape[0], 1, *reconstruction.shape[2:])
    if tuple(hole_mask.shape) != expected:
        raise ValueError(f"hole_mask must have shape {expected}, got {tuple(hole_mask.shape)}")
    mask = hole_mask.to(device=diff.device, dtype=torch.bool)  # (B, 1, D, H, W), broadcast over C
    count = mask.sum() * diff.shape[1]  # number of (voxel, channel) elements in the holes, int64
    total = torch.where(mask, diff, torch.zeros((), dtype=diff.dtype, device=diff.device)).sum()
    return total / count.clamp(min=1).to(diff.dtype)
