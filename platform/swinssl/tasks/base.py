"""The interface between a task and the training loop (MAE/DINOv2 style: the loop knows only this).

`Task` declares every method `train.loop` calls; subclass it and override `build_model` and `losses` (the rest have
defaults that fit a task with one parameter group and no unused parameters). The loop never probes a task for
optional methods.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Task:
    """A task builds its network and turns one batch into a dict of losses."""

    def build_model(self) -> nn.Module:
        """The network, freshly initialised (the worker seeds torch first, so every rank builds the same one)."""
        raise NotImplementedError

    def losses(self, model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """{"loss": total to back-propagate, "<name>": detached parts for logging} for one (micro-)batch.

        `generator` is the step's RNG (a pure function of seed, rank and step): draw every random augmentation from
        it so a resumed run repeats what the first run would have done.
        """
        raise NotImplementedError

    def unused_parameters(self) -> bool:
        """True when some parameters may get no gradient in a step: DDP must then be told to look for them."""
        return False

    def param_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Named parameter groups whose lr `lr_scale` can scale separately; default: one group, "all"."""
        return {"all": list(model.parameters())}

    def lr_scale(self, group: str, step: int) -> float:
        """Multiplier of the scheduled lr of parameter group `group` at optimizer step `step` (0 freezes it)."""
        return 1.0
