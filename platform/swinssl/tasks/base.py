"""The interface between a task and the training loop (MAE/DINOv2 style: the loop knows only this)."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn


class Task(Protocol):
    """A task builds its network and turns one batch into a dict of losses.

    `losses` returns {"loss": total to back-propagate, "<name>": detached parts for logging}. Everything
    task-specific (augmentations, heads, weights) lives behind these two methods.
    """

    def build_model(self) -> nn.Module: ...

    def losses(self, model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]: ...

    def unused_parameters(self) -> bool:
        """True when some parameters get no gradient (e.g. a head whose loss weight is 0): DDP must know."""
        ...
