"""What runs inside each Ray Train worker: rebuild config and task, wrap the model in DDP, stream this worker's
dataset shard, hand everything to the task-agnostic loop with hooks that report to Ray and MLflow."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
from ray.train import Checkpoint

from ..config import PretrainConfig, from_dict
from ..tasks import registry
from ..tasks.base import Task
from ..tasks.pretrain import PretrainTask
from . import loop

CHAOS_ENV = "SWINSSL_CHAOS_KILL_STEP"
"""Resilience testing: `SWINSSL_CHAOS_KILL_STEP=3` (read by the driver) makes the last-rank worker SIGKILL itself
once, right after step 3, to exercise Ray Train's restart-from-checkpoint path for real."""


class RayHooks(loop.Hooks):
    """Reports to Ray Train (a barrier on all ranks); rank 0 buffers metrics for MLflow and runs the probe (`prober`,
    train.probe; the other ranks wait for it in the report)."""

    def __init__(self, rank: int, tracking: dict[str, str] | None, chaos: dict | None = None, prober=None):
        self.chaos = chaos or {}
        self.buffer = None
        self.prober = prober
        # the latest probe values ride along in every report (NaN before the first): Tune's scheduler wants its
        # metric in each result; MLflow gets them only at the probe step
        self.last_probe = dict.fromkeys(prober.metric_names(), float("nan")) if prober else {}
        if rank == 0 and tracking:
            from ..tracking.mlflow_run import MetricBuffer

            self.buffer = MetricBuffer(tracking["uri"], tracking["run_id"])
            self.buffer.resume_after("loss")  # every task logs `loss`

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report({**self.last_probe, **metrics}, checkpoint=checkpoint)

    def evaluate(self, model, step: int, final: bool) -> dict[str, float]:
        if self.prober is None or not self.prober.due(step, final):
            return {}
        fresh = self.prober(model, step)
        self.last_probe.update(fresh)
        return fresh

    def log(self, metrics: dict, step: int) -> None:
        if self.buffer:
            self.buffer.log(metrics, step)

    def flush(self) -> None:
        if self.buffer:
            self.buffer.flush()

    def after_step(self, step: int, rank: int) -> None:
        if step != self.chaos.get("kill_step") or rank != self.chaos.get("rank"):
            return
        marker = Path(self.chaos["marker"])
        if marker.exists():
            return
        marker.write_text(f"killed rank {rank} after step {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)


def _pretrain_task(config: dict[str, Any]):
    # the driver's active pretext entries (a task registered there, e.g. by a plugin or a test, is not in this process
    # until unpacked: before from_dict, whose validation must know its loss.extra keys)
    tasks = registry.unpack(config["pretext"]) if config.get("pretext") else None
    cfg = from_dict(config["cfg"], PretrainConfig)
    return cfg, PretrainTask(cfg, tasks)


def _finetune_task(config: dict[str, Any]):
    from ..config import FinetuneConfig
    from ..tasks.segment import SegmentationTask

    cfg = from_dict(config["cfg"], FinetuneConfig)
    return cfg, SegmentationTask(cfg, config.get("encoder_path"))


TASKS: dict[str, Callable[[dict[str, Any]], tuple[Any, Task]]] = {"pretrain": _pretrain_task,
                                                                  "finetune": _finetune_task}
"""Run kind (`kind` of the train loop config) -> builder of (config, task) from that loop config."""


def _build(config: dict[str, Any]) -> tuple[Any, Task]:
    kind = config["kind"]
    if kind not in TASKS:
        raise ValueError(f"unknown run kind {kind!r}; known: {sorted(TASKS)}")
    return TASKS[kind](config)


def train_worker(config: dict[str, Any]) -> None:
    """`train_loop_per_worker` of every swinssl TorchTrainer (pretraining and fine-tuning)."""
    import torch

    cfg, task = _build(config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if cfg.trainer.deterministic:  # e.g. the Swin bias table's gradient: summed by several threads in any order
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs for it on CUDA
        # CUDA: a few kernels (e.g. trilinear upsampling's backward) have no deterministic variant: warn, not fail
        torch.use_deterministic_algorithms(True, warn_only=cfg.trainer.use_gpu)
    torch.manual_seed(cfg.trainer.seed)  # identical init everywhere (DDP also broadcasts rank 0's weights)
    raw = task.build_model()
    model = ray.train.torch.prepare_model(
        raw, parallel_strategy_kwargs={"find_unused_parameters": task.unused_parameters()})
    device = ray.train.torch.get_device()
    reproducible = config.get("reproducible")  # data.reproducible.ReproducibleStream, or the Ray Data shard
    shard = None if reproducible else ray.train.get_dataset_shard("train")

    def next_epoch(epoch: int):
        if reproducible:
            return reproducible.batches(epoch, rank, world, cfg.data.batch_size, cfg.data.shuffle_buffer)
        return shard.iter_torch_batches(batch_size=cfg.data.batch_size, drop_last=True,
                                        local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                                        local_shuffle_seed=cfg.trainer.seed * 7919 + epoch * 31 + rank)

    prober = None
    if rank == 0 and config.get("probe"):
        from .probe import Prober

        prober = Prober(cfg, config["probe"]["dir"], device, root=config["probe"]["root"])
    hooks = RayHooks(rank, config.get("tracking"), config.get("chaos"), prober)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        loop.run(task, model, raw, next_epoch, cfg.trainer, cfg.optim, device, rank, world, hooks,
                 meta=config.get("meta"))
        return
    with checkpoint.as_directory() as resume_dir:
        loop.run(task, model, raw, next_epoch, cfg.trainer, cfg.optim, device, rank, world, hooks,
                 resume_dir=resume_dir, meta=config.get("meta"))
