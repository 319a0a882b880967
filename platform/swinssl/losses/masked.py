"""Masked-patch modelling loss (SimMIM-style): reconstruction error on the masked voxels only.

Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", CVPR 2022 (github.com/microsoft/SimMIM): L1 on
the raw values of the masked pixels, averaged over masked pixels and channels. The optional per-patch normalised
target is MAE's `norm_pix_loss` (He et al., CVPR 2022), which Wald et al., "Revisiting MAE pre-training for 3D medical
image segmentation", CVPR 2025, use for 3D segmentation pretraining.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

NORM_EPS = 1e-6
"""Added to the per-patch variance before the square root (MAE's value)."""


def normalize_patches(target: Tensor, patch: int) -> Tensor:
    """Each channel of each non-overlapping `patch`^3 block standardised to mean 0, unit (unbiased) variance.

    Args:
        target: (B, C, D, H, W); every spatial side a multiple of `patch`.
        patch: block side in voxels (the mask patch size, so a block is masked or visible as a whole).

    Returns:
        Tensor of target's shape: (t - mean) / sqrt(var + 1e-6) within each block and channel, as MAE's
        norm_pix_loss (torch's default, unbiased, variance).
    """
    b, c, *sides = target.shape
    if len(sides) != 3 or any(s % patch for s in sides):
        raise ValueError(f"every spatial side of {tuple(target.shape)} must be a multiple of patch={patch}")
    d, h, w = (s // patch for s in sides)
    blocks = target.reshape(b, c, d, patch, h, patch, w, patch).permute(0, 1, 2, 4, 6, 3, 5, 7)
    blocks = blocks.reshape(b, c, d, h, w, patch ** 3)
    mean, var = blocks.mean(-1, keepdim=True), blocks.var(-1, keepdim=True)
    normed = (blocks - mean) / (var + NORM_EPS).sqrt()
    normed = normed.reshape(b, c, d, h, w, patch, patch, patch).permute(0, 1, 2, 5, 3, 6, 4, 7)
    return normed.reshape(target.shape)


def masked_loss(
    prediction: Tensor,
    target: Tensor,
    mask: Tensor,
    kind: Literal["l1", "l2"] = "l1",
    norm_patch: int = 0,
) -> Tensor:
    """Mean reconstruction error over the masked voxels (all channels), nothing from the visible ones.

    Args:
        prediction: (B, C, D, H, W) decoder output.
        target: (B, C, D, H, W) the unmasked crop.
        mask: (B, 1, D, H, W) bool, True where the encoder saw the mask token instead of the voxel's patch.
        kind: "l1" (SimMIM's choice) or "l2" (squared error, MAE's).
        norm_patch: 0 compares raw values; N > 0 compares with `normalize_patches(target, N)`.

    Returns:
        Scalar: sum over masked voxels and channels of the error / (C * masked voxels); exactly 0 (with a zero, not
        NaN, gradient) when nothing is masked. Half-precision inputs are promoted to float32.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"shape mismatch: {tuple(prediction.shape)} vs {tuple(target.shape)}")
    expected = (prediction.shape[0], 1, *prediction.shape[2:])
    if tuple(mask.shape) != expected:
        raise ValueError(f"mask must have shape {expected}, got {tuple(mask.shape)}")
    if kind not in ("l1", "l2"):
        raise ValueError(f"kind must be 'l1' or 'l2', got {kind!r}")
    prediction = prediction.float()
    target = target.to(device=prediction.device, dtype=torch.float32)
    if norm_patch:
        target = normalize_patches(target, norm_patch)
    diff = prediction - target
    error = diff.abs() if kind == "l1" else diff.square()
    mask = mask.to(device=error.device, dtype=torch.bool)
    total = torch.where(mask, error, torch.zeros((), dtype=error.dtype, device=error.device)).sum()
    return total / (mask.sum() * error.shape[1]).clamp(min=1).to(error.dtype)
