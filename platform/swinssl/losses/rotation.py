"""Rotation pretext loss: 4-way classification of the number of quarter turns applied to each view (as in the SwinUNETR
pretraining of Tang et al., CVPR 2022; Project-MONAI/research-contributions, SwinUNETR/Pretrain)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rotation_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy between rotation logits and the applied quarter-turn count.

    Args:
        logits: (B, 4) unnormalised scores, one per k in {0, 1, 2, 3}.
        target: (B,) long, the k each sample was rotated by (as returned by `random_rotation`).

    Returns:
        Scalar tensor: mean over the batch of -log softmax(logits)[b, target[b]].
        Half-precision logits are promoted to float32 before the softmax.
    """
    if logits.ndim != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (B, 4) and target (B,), got {tuple(logits.shape)} and {tuple(target.shape)}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, target.to(device=logits.device, dtype=torch.long))
