"""The training loop run by every Ray Train worker. It knows only the `Task` interface.

Per optimizer step: `grad_accum` micro-batches from this worker's dataset shard -> task.losses -> backward (AMP on
GPU, on CPU only with `trainer.amp_on_cpu`; the model compiled in place with `trainer.compile`) -> clip -> AdamW step
-> warm-up/cosine lr. Every `log_every` steps the rank-0 metrics are reported; every
`checkpoint_every` steps (and at the end) a checkpoint is reported (rank 0 writes it) and the buffered MLflow
metrics are flushed, so a restart resumes from that checkpoint with the same step counter, optimizer, scheduler,
scaler and pretext RNG, and never logs a step twice.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..config import OptimConfig, TrainerConfig
from ..tasks.base import Task
from .checkpoint import load_state, save_state
from .schedule import warmup_cosine


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    samples: int = 0


class Meter:
    """Running sums between two log points (reset after each)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.count, self.samples, self.wait_s, self.start = 0, 0, 0.0, time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor], samples: int) -> None:
        # keep device tensors: a float() here would synchronise the GPU every micro-step
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().float()
        self.count += 1
        self.samples += samples

    def summary(self, world: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {k: float(v) / max(self.count, 1) for k, v in self.sums.items()}
        out["samples_per_s"] = self.samples * world / elapsed
        out["data_wait_fraction"] = min(self.wait_s / elapsed, 1.0)
        return out


def _amp_active(device: torch.device, trainer: TrainerConfig) -> bool:
    """Mixed precision runs on CUDA, and on CPU only with `amp_on_cpu` (a test switch: the GPU's dtype path)."""
    return trainer.amp != "none" and (device.type == "cuda" or (device.type == "cpu" and trainer.amp_on_cpu))


def _autocast(device: torch.device, trainer: TrainerConfig):
    if not _amp_active(device, trainer):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if trainer.amp == "bf16" else torch.float16)


def compile_model(raw_model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile `raw_model` in place (`nn.Module.compile`): its `__call__` runs the compiled graph while its
    parameters, `state_dict` keys (no `_orig_mod.` prefix of `torch.compile(model)`'s wrapper) and submodules stay
    those of the eager module, so checkpoints, resume and encoder.pt do not change. A DDP wrapper around it calls
    the compiled module, which is what the PyTorch docs advise ("Where to apply torch.compile?": compile the inner
    module passed to DDP). Static shapes (`dynamic=False`): a run calls the model with a few fixed input shapes and
    head lists (the shared views, each pretext task's own view), each of which gets its own specialised graph."""
    raw_model.compile(backend=backend, dynamic=False)


def _batches(next_epoch: Callable[[int], Iterator[dict]], state: LoopState, meter: Meter) -> Iterator[dict]:
    """Endless stream over epochs; time spent waiting for data is charged to the meter."""
    while True:
        start = time.perf_counter()
        iterator = iter(next_epoch(state.epoch))
        meter.wait_s += time.perf_counter() - start
        while True:
            start = time.perf_counter()
            batch = next(iterator, None)
            meter.wait_s += time.perf_counter() - start
            if batch is None:
                break
            yield batch
        state.epoch += 1


def build_optimizer(model: nn.Module, optim: OptimConfig, steps: int, task: Task | None = None):
    """AdamW (no weight decay on norms and biases) + warm-up/cosine. The task names parameter groups
    (`param_groups`) and scales their lr per step (`lr_scale`), e.g. to keep a pretrained encoder fixed for the first
    steps; no task: the `Task` defaults (one group at the scheduled lr)."""
    task = task if task is not None else Task()
    groups = []
    for name, params in task.param_groups(model).items():
        params = [p for p in params if p.requires_grad]
        groups += [{"params": [p for p in params if p.ndim > 1], "weight_decay": optim.weight_decay, "name": name},
                   {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "name": name}]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=optim.lr)

    def factor(name: str):
        return lambda s: warmup_cosine(s, steps, optim.warmup_steps, optim.min_lr_ratio) * task.lr_scale(name, s)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(g["name"]) for g in groups])
    return optimizer, scheduler


class Hooks:
    """What the loop tells the outside world (Ray Train + MLflow in `train.worker`; plain in tests)."""

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        """Called on every rank at the same steps (Ray's report is a barrier); checkpoint_dir from rank 0 only."""

    def log(self, metrics: dict, step: int) -> None:
        """Rank 0: buffer metrics for the tracker."""

    def flush(self) -> None:
        """Rank 0: hand buffered metrics to the tracker (right after a checkpoint is safely reported)."""

    def after_step(self, step: int, rank: int) -> None:
        """Every rank, after each optimizer step (fault injection for resilience tests lives here)."""

    def evaluate(self, model: nn.Module, step: int, final: bool) -> dict[str, float]:
        """Every rank, at each report step before the report: metrics measured on the unwrapped model (rank 0's are
        logged and reported with the loop's; e.g. the downstream probe of `train.probe`). Default: none."""
        return {}


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """Pretext RNG as a pure function of (seed, rank, step): a resumed run draws what the first run would have."""
    return torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + rank) * 1_000_003 + step)


def _to_device(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: (v.to(device, non_blocking=True).float() if v.is_floating_point() else v.to(device))
            for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _restore(resume_dir, device, raw_model, optimizer, scheduler, scaler) -> LoopState:
    saved = load_state(resume_dir, map_location=device)
    raw_model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    return LoopState(**saved["loop"])


def run(task: Task, model: nn.Module, raw_model: nn.Module, next_epoch: Callable[[int], Iterator[dict]],
        trainer: TrainerConfig, optim: OptimConfig, device: torch.device, rank: int, world: int, hooks: Hooks,
        resume_dir: str | None = None, meta: dict | None = None) -> LoopState:
    """Train `model` (DDP-wrapped or not; `raw_model` is the unwrapped module) until `trainer.steps`."""
    optimizer, scheduler = build_optimizer(raw_model, optim, trainer.steps, task)
    scaler = torch.amp.GradScaler(device.type, enabled=trainer.amp == "fp16" and _amp_active(device, trainer))
    state = _restore(resume_dir, device, raw_model, optimizer, scheduler, scaler) if resume_dir else LoopState()
    if trainer.compile:  # in place: the restore above and every checkpoint use the same plain keys either way
        compile_model(raw_model, trainer.compile_backend)
    meter = Meter()
    stream = _batches(next_epoch, state, meter)
    model.train()
    while state.step < trainer.steps:
        generator = step_generator(trainer.seed, rank, state.step)
        optimizer.zero_grad(set_to_none=True)
        for micro in range(trainer.grad_accum):
            batch = _to_device(next(stream), device)
            last = micro == trainer.grad_accum - 1
            with (contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()), \
                    _autocast(device, trainer):
                losses = task.losses(model, batch, generator)
            scaler.scale(losses["loss"] / trainer.grad_accum).backward()
            meter.add(losses, int(batch["image"].shape[0]))
            state.samples += int(batch["image"].shape[0]) * world
        scaler.unscale_(optimizer)
        if optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        state.step += 1
        hooks.after_step(state.step, rank)
        _after_step(state, meter, trainer, world, scheduler, hooks, raw_model, optimizer, scaler, rank, meta or {})
    return state


def _after_step(state, meter, trainer, world, scheduler, hooks, raw_model, optimizer, scaler, rank, meta) -> None:
    final = state.step == trainer.steps
    checkpoint_now = final or state.step % trainer.checkpoint_every == 0
    if not (checkpoint_now or state.step % trainer.log_every == 0):
        return
    metrics = {**meter.summary(world), "lr": max(scheduler.get_last_lr()), "epoch": state.epoch,
               "samples_seen": state.samples, "step": state.step}
    metrics.update(hooks.evaluate(raw_model, state.step, final))
    meter.reset()  # after the evaluation: its time is not charged to the next interval's throughput
    if rank == 0:
        hooks.log({k: v for k, v in metrics.items() if k != "step"}, state.step)
    if not checkpoint_now:
        hooks.report(metrics, None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        directory = None
        if rank == 0:
            state_dict = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                          "loop": {"step": state.step, "epoch": state.epoch, "samples": state.samples}}
            directory = str(save_state(tmp, state_dict, {**meta, "step": state.step}))
        hooks.report(metrics, directory)
    if rank == 0:
        hooks.flush()
