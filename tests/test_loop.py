"""The training loop and its tasks without Ray: plain `loop.Hooks`, tiny models, in-memory batches (test-fast).

What Ray adds on top (a dataset shard per worker, DDP, reporting, restarts) is covered in test_pretrain.py; here the
loop's own contract: gradient accumulation, bit-identical resume, a frozen encoder, and one step of every task.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from swinssl.config import ConfigError, FinetuneConfig, PretrainConfig, load_config, validate
from swinssl.models.encoder_io import save_encoder
from swinssl.models.ssl_head import SSLModel
from swinssl.tasks import registry
from swinssl.tasks.base import Task
from swinssl.tasks.pretrain import PretrainTask
from swinssl.tasks.segment import SegmentationTask
from swinssl.train import loop
from swinssl.train.checkpoint import save_state
from swinssl.train.launch import check_resumable
from swinssl.tune.space import short_name

CPU = torch.device("cpu")
TINY = ["model.feature_size=12", "data.roi=[32,32,32]", "data.batch_size=1", "pretext.cutout_max_boxes=8",
        "optim.warmup_steps=2", "trainer.amp=none", "trainer.log_every=1"]


def pretrain_cfg(*overrides: str) -> PretrainConfig:
    return load_config(None, [*TINY, *overrides], PretrainConfig)


class Recorder(loop.Hooks):
    """Keeps every report; copies checkpoints (the loop deletes its temporary folder after `report`) and can stop
    the run right after the checkpoint of `stop_at`, as a crashed worker would."""

    def __init__(self, keep: Path | None = None, stop_at: int = 0, watch=None):
        self.reports, self.keep, self.stop_at, self.watch, self.seen = [], keep, stop_at, watch, {}

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        self.reports.append(metrics)
        if checkpoint_dir and self.keep:
            shutil.copytree(checkpoint_dir, self.keep / f"step{metrics['step']}")
        if metrics["step"] == self.stop_at:
            raise KeyboardInterrupt("stopped after the checkpoint")

    def after_step(self, step: int, rank: int) -> None:
        if self.watch:
            self.seen[step] = self.watch()

    def losses(self, step: int) -> dict[str, float]:
        (metrics,) = [m for m in self.reports if m["step"] == step]
        return {k: v for k, v in metrics.items() if k.startswith("loss")}


def run(task: Task, batches: list[dict], trainer_overrides: dict, hooks: Recorder | None = None,
        resume_dir: Path | None = None, optim=None, model: nn.Module | None = None):
    """(model, hooks) after `loop.run` on one CPU rank; every epoch yields `batches` in order."""
    torch.manual_seed(0)
    model = model or task.build_model()
    trainer = load_config(None, [f"trainer.{k}={v}" for k, v in trainer_overrides.items()], PretrainConfig).trainer
    trainer.amp, trainer.log_every = "none", 1
    hooks = hooks or Recorder()
    loop.run(task, model, model, lambda epoch: iter(batches), trainer, optim or PretrainConfig().optim, CPU, 0, 1,
             hooks, resume_dir=str(resume_dir) if resume_dir else None)
    return model, hooks


class Regression(Task):
    """A linear map of each voxel's channels, MSE to a fixed target: the loss of a batch is the mean of per-sample
    losses of equal size and nothing is random, so two micro-batches of 1 must give the gradient of one batch of 2."""

    def build_model(self) -> nn.Module:
        return nn.Conv3d(2, 1, kernel_size=1)

    def losses(self, model, batch, generator):
        mse = nn.functional.mse_loss(model(batch["image"]), batch["image"][:, :1] * 2 - 1)
        return {"loss": mse, "loss_mse": mse.detach()}


def test_grad_accum_equals_one_big_batch():
    torch.manual_seed(1)
    images = torch.rand(2, 2, 4, 4, 4)
    big, big_hooks = run(Regression(), [{"image": images}], {"steps": 1})
    small, small_hooks = run(Regression(), [{"image": images[:1]}, {"image": images[1:]}],
                             {"steps": 1, "grad_accum": 2})
    for (name, a), b in zip(big.named_parameters(), small.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert big_hooks.losses(1)["loss"] == pytest.approx(small_hooks.losses(1)["loss"], rel=1e-6)
    assert small_hooks.reports[0]["samples_seen"] == big_hooks.reports[0]["samples_seen"] == 2


class Denoise(Regression):
    """Regression of noisy inputs, the noise drawn from the step's generator (as the pretext views are)."""

    def losses(self, model, batch, generator):
        noise = torch.rand(batch["image"].shape, generator=generator)
        return super().losses(model, {"image": batch["image"] + 0.1 * noise}, generator)


def test_resume_continues_bit_identically(tmp_path):
    """4 steps straight vs 2 steps, a stop right after the step-2 checkpoint, and a resume to 4: same weights, same
    losses. Weights, optimizer, scheduler and step counter come from the checkpoint, the step's RNG from the step
    number; the epoch restarts (as a Ray Data shard does), so each epoch here is the 2 batches of 2 steps. A tiny
    model keeps it fast: the pretraining task draws its views from the same generator (one step of it is below)."""
    torch.manual_seed(2)
    batches = [{"image": torch.rand(2, 2, 4, 4, 4)} for _ in range(2)]
    schedule = {"steps": 4, "checkpoint_every": 2}
    straight, straight_hooks = run(Denoise(), batches, schedule)
    with pytest.raises(KeyboardInterrupt):
        run(Denoise(), batches, schedule, Recorder(tmp_path, stop_at=2))
    resumed, resumed_hooks = run(Denoise(), batches, schedule, resume_dir=tmp_path / "step2")
    assert [m["step"] for m in resumed_hooks.reports] == [3, 4]
    for step in (3, 4):
        assert resumed_hooks.losses(step) == straight_hooks.losses(step)
    assert straight_hooks.losses(3) != straight_hooks.losses(2)  # it did train
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    torch.manual_seed(3)
    return save_encoder(SSLModel(feature_size=12, heads=lambda width: {}), tmp_path_factory.mktemp("e") / "enc.pt")


def test_frozen_encoder_stays_bit_identical_then_trains(encoder_file):
    """freeze_encoder_steps=1: after step 1 the pretrained encoder is bit-identical (lr 0, so no weight decay either)
    while the decoder moved; from step 2 on its lr is the scheduled one. Segmentation's step also gives finite
    Dice/CE and decoder gradients. (Real SwinUNETR at its smallest legal crop, 64^3, batch 1: one step is the slowest
    test of this file, so the unfreezing is checked on the schedule rather than by a second step.)"""
    cfg = load_config(None, ["model.feature_size=12", "model.out_channels=12", "data.roi=[64,64,64]",
                             "freeze_encoder_steps=1"], FinetuneConfig)
    task = SegmentationTask(cfg, str(encoder_file))
    torch.manual_seed(4)
    image, label = torch.rand(1, 2, 64, 64, 64), torch.randint(0, 12, (1, 1, 64, 64, 64))
    model = task.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = Recorder(watch=lambda: {k: v.clone() for k, v in model.state_dict().items()})
    run(task, [{"image": image, "label": label}], {"steps": 1}, hooks, optim=cfg.optim, model=model)
    encoder = [k for k in before if k.startswith("swinViT.")]
    decoder = [k for k in before if not k.startswith("swinViT.") and before[k].is_floating_point()]
    assert all(torch.equal(hooks.seen[1][k], before[k]) for k in encoder), "encoder moved while frozen"
    assert any(not torch.equal(hooks.seen[1][k], before[k]) for k in decoder)
    optimizer, scheduler = loop.build_optimizer(model, cfg.optim, 10, task)
    encoder_groups = [i for i, g in enumerate(optimizer.param_groups) if g["name"] == "encoder"]
    assert encoder_groups and all(scheduler.lr_lambdas[i](0) == 0 < scheduler.lr_lambdas[i](1)
                                  for i in encoder_groups)  # lr multiplier at steps 0 and 1
    assert all(math.isfinite(v) for v in hooks.losses(1).values()) and {"loss_dice", "loss_ce"} <= set(hooks.losses(1))
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("swinViT."))


@pytest.mark.parametrize("name", [t.name for t in registry.registered()])
def test_each_registered_pretext_task_runs_a_step(name):
    """Only this task's weight is on: the model holds only its head, which gets gradients; its loss is finite."""
    entry = next(t for t in registry.registered() if t.name == name)
    weights = [f"{t.weight_key}={int(t is entry)}" for t in registry.registered() if t.builtin or t is entry]
    shape = ["data.roi=[32,64,64]", "pretext.voco_grid=[1,2,2]", "model.voco_dim=16"] if name == "voco" else []
    task = PretrainTask(pretrain_cfg(*weights, *shape))  # voco: base crops of 32^3
    batch = 2 if entry.pair else 1  # NT-Xent of one crop's two views has no negative: loss and gradient 0
    model, hooks = run(task, [{"image": torch.rand(batch, 2, *task.cfg.data.roi)}], {"steps": 1})
    assert list(model.heads) == [name] and task.copies == (2 if task.tasks[0].pair else 1)
    losses = hooks.losses(1)
    assert {k for k in losses if "/" not in k} == {"loss", f"loss_{name}"}  # plus <task>/<diagnostic> keys
    assert all(math.isfinite(v) for v in losses.values())
    grads = [p.grad for p in model.heads[name].parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0
                                                                                           for g in grads)


def test_pretext_problems_all_at_once():
    bad = ["loss.w_rotation=0", "loss.w_contrastive=0", "loss.w_inpainting=0", "loss.extra.w_nope=1",
           "loss.extra.w_rotation=1"]
    with pytest.raises(ConfigError) as caught:  # what a user sees: one error listing every problem
        pretrain_cfg(*bad)
    assert len(caught.value.problems) == 3, caught.value.problems
    cfg = pretrain_cfg()
    cfg.loss.w_rotation = cfg.loss.w_contrastive = cfg.loss.w_inpainting = 0
    cfg.loss.extra = {"w_nope": 1, "w_rotation": 1}
    problems = registry.pretext_problems(cfg)
    assert any(p.startswith("loss.extra.w_nope: no registered pretext task") for p in problems), problems
    assert any(p.startswith("loss.extra.w_rotation:") and "use loss.w_rotation" in p for p in problems), problems
    assert any(p.startswith("loss: every pretext loss weight is 0") for p in problems), problems
    with pytest.raises(ConfigError, match="every pretext loss weight is 0"):
        PretrainTask(cfg)
    unequal = pretrain_cfg("loss.w_rotation=0", "data.roi=[32,64,32]")
    assert registry.pretext_problems(unequal) == []
    unequal.loss.w_rotation = 1.0
    assert [p.split(":")[0] for p in registry.pretext_problems(unequal)] == ["pretext.rotation_dims"]
    with pytest.raises(ConfigError, match="pretext.rotation_dims: .*equal crop sides"):
        validate(unequal)


def _fake_checkpoint(output_dir: Path, cfg: PretrainConfig, meta: dict) -> Path:
    return save_state(output_dir / "ray" / cfg.name / "checkpoint_000000", {}, {"step": 2, **meta})


def test_resume_with_other_heads_is_refused(tmp_path):
    cfg = pretrain_cfg()
    shape = {"feature_size": 12, "in_channels": 2, "contrastive_dim": 512}
    checkpoint = _fake_checkpoint(tmp_path, cfg, {**shape, "heads": ["rotation", "inpainting"]})
    with pytest.raises(ConfigError, match=r"heads: checkpoint \['rotation', 'inpainting'\] vs config "
                                          r"\['rotation', 'contrastive', 'inpainting'\].*another output_dir"):
        check_resumable(cfg, tmp_path)
    assert check_resumable(pretrain_cfg("loss.w_contrastive=0"), tmp_path) == checkpoint


def test_pre_registry_checkpoint_resumes_only_with_the_classic_heads(tmp_path):
    """Before the registry every model held all three heads: such a checkpoint (no "heads" in its meta) resumes
    with all three weights on, and is refused with a clear message otherwise (its weights would not load)."""
    cfg = pretrain_cfg()
    checkpoint = _fake_checkpoint(tmp_path, cfg, {"feature_size": 12, "in_channels": 2, "contrastive_dim": 512})
    assert check_resumable(cfg, tmp_path) == checkpoint
    with pytest.raises(ConfigError, match="contrastive.*another output_dir"):
        check_resumable(pretrain_cfg("loss.w_contrastive=0"), tmp_path)


def test_trial_short_names_come_from_the_registry():
    assert [short_name(f"loss.w_{n}") for n in ("rotation", "contrastive", "inpainting")] == ["w_rot", "w_con",
                                                                                               "w_inp"]
    assert short_name("data.subset") == "n" and short_name("optim.lr") == "lr"
