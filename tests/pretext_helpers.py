"""Shared by the pretext-task tests (not a test module): a few in-process CPU training steps of a PretrainTask with
every report and checkpoint kept, so a straight run can be compared with one resumed from its checkpoint."""

from __future__ import annotations

import shutil

import torch
from torch import nn

from swinssl.tasks.pretrain import PretrainTask
from swinssl.train import loop


class Keep(loop.Hooks):
    """Keeps every report and a copy of every checkpoint (the loop deletes its temporary folder after `report`)."""

    def __init__(self, folder=None):
        self.reports, self.folder = [], folder

    def report(self, metrics, checkpoint_dir):
        self.reports.append(metrics)
        if checkpoint_dir and self.folder:
            shutil.copytree(checkpoint_dir, self.folder / f"step{metrics['step']}")


def train_steps(task: PretrainTask, steps: int, hooks: Keep, resume=None) -> nn.Module:
    """`steps` steps on one fixed batch of the config's ROI, a checkpoint at every step."""
    torch.manual_seed(0)
    model = task.build_model()
    trainer = task.cfg.trainer
    trainer.steps, trainer.checkpoint_every = steps, 1
    # one batch per epoch: a resumed run restarts its epoch (as a Ray Data shard does), so it sees the same batch
    shape = (task.cfg.data.batch_size, task.cfg.model.in_channels, *task.cfg.data.roi)
    batches = [{"image": torch.rand(shape, generator=torch.Generator().manual_seed(7))}]
    loop.run(task, model, model, lambda epoch: iter(batches), trainer, task.cfg.optim, torch.device("cpu"), 0, 1,
             hooks, resume_dir=str(resume) if resume else None)
    return model
