"""A pretext task registered from this file (its own loss, head and weight), trained without and with Ray.

The toy task regresses each crop's mean intensity per channel from the pooled bottleneck. It lives only here: the
Ray Train workers get it from the driver (`registry.pack` in the train loop config), not from an import.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from swinssl.config import PretrainConfig, load_config
from swinssl.tasks import registry
from swinssl.tasks.pretrain import PretrainTask
from swinssl.train import loop
from swinssl.tune.space import short_name

OFF = ["loss.w_rotation=0", "loss.w_contrastive=0", "loss.w_inpainting=0"]


class ToyHead(nn.Module):
    def __init__(self, width: int, channels: int):
        super().__init__()
        self.linear = nn.Linear(width, channels)

    def forward(self, feats: Tensor) -> Tensor:
        return self.linear(feats.flatten(2).mean(2))


def toy_loss(out: Tensor, views: registry.Views, cfg) -> Tensor:
    """Squared error to each view's mean intensity per channel, times the task's `scale` option."""
    target = views.target.flatten(2).mean(2)
    return registry.option(cfg, "toy", "scale") * nn.functional.mse_loss(out.float(), target)


TOY = registry.PretextTask("toy", head=lambda cfg, width: ToyHead(width, cfg.model.in_channels), loss=toy_loss,
                           options={"scale": 1.0})


@pytest.fixture
def toy():
    registry.register(TOY)
    yield TOY
    registry.unregister("toy")


def _cfg(*overrides: str) -> PretrainConfig:
    return load_config(None, ["model.feature_size=12", "data.roi=[32,32,32]", "data.batch_size=1", *OFF,
                              "loss.extra.w_toy=1.0", *overrides], PretrainConfig)


def test_toy_task_trains_without_ray(toy):
    cfg = _cfg("loss.extra.toy_scale=2.0", "trainer.steps=1", "trainer.log_every=1", "trainer.amp=none")
    task = PretrainTask(cfg)
    assert task.heads == ["toy"] and task.copies == 1 and registry.option(cfg, "toy", "scale") == 2.0
    torch.manual_seed(0)
    model = task.build_model()
    reports = []

    class Hooks(loop.Hooks):
        def report(self, metrics, checkpoint_dir):
            reports.append(metrics)

    loop.run(task, model, model, lambda epoch: iter([{"image": torch.rand(1, 2, 32, 32, 32)}]), cfg.trainer,
             cfg.optim, torch.device("cpu"), 0, 1, Hooks())
    assert set(k for k in reports[0] if k.startswith("loss")) == {"loss", "loss_toy"}
    assert math.isfinite(reports[0]["loss_toy"]) and reports[0]["loss"] == pytest.approx(reports[0]["loss_toy"])
    assert all(p.grad is not None for p in model.heads["toy"].parameters())
    assert short_name("loss.extra.w_toy") == "w_toy"


def test_unregistered_toy_weight_is_a_config_error():
    with pytest.raises(ValueError, match="loss.extra.w_toy: no registered pretext task"):
        _cfg()


def test_packed_toy_task_loads_where_this_file_is_not_importable(toy, tmp_path):
    """What a Ray worker does with the train loop config: a fresh interpreter, without tests/ on sys.path."""
    blob = tmp_path / "tasks.pkl"
    blob.write_bytes(registry.pack(PretrainTask(_cfg()).tasks))
    code = ("import sys, pathlib, torch; from swinssl.config import PretrainConfig; from swinssl.tasks import registry;"
            "(t,) = registry.unpack(pathlib.Path(sys.argv[1]).read_bytes());"
            "assert [r.name for r in registry.registered()][-1] == 'toy';"
            "print(tuple(t.head(PretrainConfig(), 8)(torch.zeros(1, 8, 1, 1, 1)).shape))")
    done = subprocess.run([sys.executable, "-c", code, str(blob)], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(1, 2)"


def test_toy_task_pretrains_through_ray_train(toy, prepared, tmp_path):
    from mlflow.tracking import MlflowClient
    from monai.networks.nets import SwinUNETR

    from swinssl.models.encoder_io import load_encoder_into_swinunetr
    from swinssl.train.launch import pretrain

    out = tmp_path / "run"
    tiny = Path(__file__).resolve().parents[1] / "experiments" / "pretrain_tiny.yaml"
    cfg = load_config(tiny, [f"data.root={prepared[0]}", f"output_dir={out}", *OFF, "loss.extra.w_toy=1.0",
                             f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "trainer.num_workers=1",
                             "trainer.steps=2", "trainer.checkpoint_every=2"], PretrainConfig)
    result = pretrain(cfg)
    assert result.metrics["step"] == 2 and math.isfinite(result.metrics["loss_toy"])
    assert not [k for k in result.metrics if k in ("loss_rotation", "loss_contrastive", "loss_inpainting")]
    client = MlflowClient(result.tracking_uri)
    assert sorted(m.step for m in client.get_metric_history(result.run_id, "loss_toy")) == [1, 2]
    assert client.get_run(result.run_id).data.params["loss.extra.w_toy"] == "1.0"
    net = SwinUNETR(in_channels=2, out_channels=2, feature_size=12)
    assert load_encoder_into_swinunetr(net, result.encoder)  # every swinViT tensor loaded and verified
