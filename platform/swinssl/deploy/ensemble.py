"""Fold ensemble and flip test-time augmentation as one network, so the sliding-window inference of
`swinssl.eval.infer.predict_volume` (body box, Gaussian blending, argmax) runs unchanged on top of it.

What the wrapper returns per window:

- one model, no TTA: that model's logits, unchanged, so `swinssl predict --folds K` gives exactly the labels that
  fine-tuning's evaluation of fold K wrote (the same function on the same network);
- otherwise the mean of the members' softmax probabilities over models x flips. Averaging probabilities, not
  logits, is what nnU-Net and MONAI's ensembles do: logits of differently trained networks are not on one scale.
  Sliding-window blending is linear, so blending mean probabilities equals the mean of each member's blended
  probabilities.

Flip TTA mirrors the window along every subset of the three spatial axes (8 passes, identity included: nnU-Net's
default mirroring) and flips each output back before averaging.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import torch
from torch import Tensor, nn

__all__ = ["Ensemble", "flip_sets"]


def flip_sets(tta: bool) -> list[tuple[int, ...]]:
    """The spatial-axis subsets of (B, C, Z, Y, X) windows to mirror: [()] without TTA, all 8 with it."""
    axes = (2, 3, 4)
    if not tta:
        return [()]
    return [c for n in range(len(axes) + 1) for c in combinations(axes, n)]


class Ensemble(nn.Module):
    """Members (fold models) x flips -> logits (one member, no flips) or mean softmax probabilities."""

    def __init__(self, models: Sequence[nn.Module], tta: bool = False):
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.members = nn.ModuleList(models)
        self.flips = flip_sets(tta)

    @property
    def passthrough(self) -> bool:
        """One model and no flips: the model's logits are returned as they are."""
        return len(self.members) == 1 and self.flips == [()]

    def forward(self, windows: Tensor) -> Tensor:  # (B, C, Z, Y, X) -> (B, classes, Z, Y, X)
        if self.passthrough:
            return self.members[0](windows)
        total = None
        for member in self.members:
            for axes in self.flips:
                logits = member(torch.flip(windows, axes) if axes else windows)
                probs = torch.softmax(logits.float(), dim=1)
                probs = torch.flip(probs, axes) if axes else probs
                total = probs if total is None else total + probs
        return total / (len(self.members) * len(self.flips))
