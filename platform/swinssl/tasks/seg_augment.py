"""Batch-vectorised augmentations for segmentation fine-tuning: random flips and intensity jitter.

Inputs are (B, C, D, H, W) image batches with (B, 1, D, H, W) label maps, on any device. As in `pretext_ops`,
randomness comes only from the optional `generator`: numbers are drawn on the generator's device (the tensor's
device when None, global RNG) and then moved to the tensor's device, so the same seed gives the same result on
CPU and GPU inputs alike. Every sample gets independent draws; no Python loop over the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .pretext_ops import uniform_draws


def random_flip(image: Tensor, label: Tensor, generator: torch.Generator | None = None, prob: float = 0.5,
                axes: tuple[int, ...] = (2, 3, 4)) -> tuple[Tensor, Tensor]:
    """Flip each sample independently along each of `axes` with probability `prob`, image and label alike.

    Args:
        image: (B, C, D, H, W) any dtype.
        label: (B, 1, D, H, W) any dtype, same batch and spatial sizes as image.
        generator: source of randomness (None: global RNG of image's device).
        prob: flip probability per sample and axis; 0 returns the inputs unchanged, 1 is torch.flip on all axes.
        axes: spatial axes (>= 2, negatives allowed) to consider.

    Returns:
        (image (B, C, D, H, W), label (B, 1, D, H, W)), new tensors of the input dtypes and device. All draws come
        from one (B, len(axes)) uniform tensor u: sample b is flipped along axes[a] iff u[b, a] < prob.
    """
    axes = _check_flip(image, label, prob, axes)
    flips = uniform_draws((image.shape[0], len(axes)), generator, image.device) < prob  # (B, A) bool
    for column, axis in enumerate(axes):
        mask = flips[:, column].view(-1, 1, 1, 1, 1)  # (B, 1, 1, 1, 1), broadcast over channels and space
        image = torch.where(mask, image.flip(axis), image)
        label = torch.where(mask, label.flip(axis), label)
    return image, label


def _check_flip(image: Tensor, label: Tensor, prob: float, axes: tuple[int, ...]) -> tuple[int, ...]:
    """Validate shapes and probability; returns the axes as distinct non-negative spatial dims."""
    if image.ndim != 5 or label.ndim != 5 or label.shape[1] != 1 or \
            label.shape[:1] + label.shape[2:] != image.shape[:1] + image.shape[2:]:
        raise ValueError(f"need image (B, C, D, H, W) and label (B, 1, D, H, W), got {tuple(image.shape)} and "
                         f"{tuple(label.shape)}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    normal = tuple(a % 5 for a in axes)
    if min(normal, default=2) < 2 or len(set(normal)) != len(normal):
        raise ValueError(f"axes {axes} must be distinct spatial axes (2, 3, 4 or negatives)")
    return normal


def random_intensity(image: Tensor, generator: torch.Generator | None = None, scale: float = 0.1,
                     shift: float = 0.1) -> Tensor:
    """Per-sample, per-channel affine jitter: x * (1 + U(-scale, scale)) + U(-shift, shift).

    Args:
        image: (B, C, D, H, W) floating batch (labels are not touched: pass only the image).
        generator: source of randomness (None: global RNG of image's device).
        scale: half-width of the multiplicative jitter (>= 0).
        shift: half-width of the additive jitter (>= 0).

    Returns:
        (B, C, D, H, W) new tensor of image's dtype and device; one factor and one offset per (sample, channel),
        drawn from one (2, B, C) uniform tensor.
    """
    if image.ndim != 5:
        raise ValueError(f"image must be (B, C, D, H, W), got {tuple(image.shape)}")
    if scale < 0 or shift < 0:
        raise ValueError(f"scale and shift must be >= 0, got {scale} and {shift}")
    u = uniform_draws((2, *image.shape[:2]), generator, image.device) * 2 - 1  # (2, B, C) in [-1, 1)
    factor = (1 + scale * u[0]).to(image.dtype).view(*image.shape[:2], 1, 1, 1)
    offset = (shift * u[1]).to(image.dtype).view(*image.shape[:2], 1, 1, 1)
    return image * factor + offset
