"""Cross-modal reconstruction loss (PET/CT): L1 between the reconstruction of the hidden modality and that modality.

A view hides one channel (CT or PET) from the encoder; the decoder predicts every channel, and only the hidden one is
scored: the visible one could simply be copied. The idea of predicting one modality from the other as a pretext task
is the cross-channel prediction of split-brain autoencoders (Zhang et al., CVPR 2017), here on CT/PET volumes.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cross_modal_loss(reconstruction: Tensor, target: Tensor, hidden: Tensor) -> Tensor:
    """Per-view mean absolute error on the hidden channel.

    Args:
        reconstruction: (B, C, D, H, W) decoder output (every channel).
        target: (B, C, D, H, W) the crop before hiding.
        hidden: (B,) long, the channel hidden from view b's input.

    Returns:
        (B,) float32: mean over the voxels of |reconstruction[b, hidden[b]] - target[b, hidden[b]]|; the task's loss
        is its mean (every view has the same number of voxels).
    """
    if reconstruction.shape != target.shape:
        raise ValueError(f"shape mismatch: {tuple(reconstruction.shape)} vs {tuple(target.shape)}")
    if tuple(hidden.shape) != reconstruction.shape[:1]:
        raise ValueError(f"hidden must have shape ({reconstruction.shape[0]},), got {tuple(hidden.shape)}")
    reconstruction = reconstruction.float()
    index = hidden.to(device=reconstruction.device, dtype=torch.long).view(-1, 1, *[1] * (reconstruction.ndim - 2))
    index = index.expand(-1, 1, *reconstruction.shape[2:])
    pick = reconstruction.gather(1, index)
    truth = target.to(device=reconstruction.device, dtype=torch.float32).gather(1, index)
    return (pick - truth).abs().flatten(1).mean(1)
