"""SwinUNETR-V2 (`model.use_v2`): the V2 encoder's residual conv blocks (`layers{1..4}c`) are pretrained, exported in
encoder.pt, loaded tensor for tensor into MONAI's `SwinUNETR(use_v2=True)`, and a V1/V2 mismatch is refused clearly
(loader, fine-tuning task, CLI, pretraining and fine-tuning resume). Tiny CPU models (feature_size 12)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from monai.networks.nets import SwinUNETR
from torch import nn

from swinssl.cli import main
from swinssl.config import ConfigError, FinetuneConfig, PretrainConfig, load_config
from swinssl.models.encoder_io import EncoderVariantError, check_loaded, load_encoder_into_swinunetr, save_encoder
from swinssl.models.ssl_head import SSLModel
from swinssl.tasks.pretrain import PretrainTask
from swinssl.tasks.segment import SegmentationTask
from swinssl.train.checkpoint import save_state
from swinssl.train.finetune import resume_problems
from swinssl.train.launch import check_resumable

F = 12
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
PRETRAIN_TINY, FINETUNE_TINY = EXPERIMENTS / "pretrain_tiny.yaml", EXPERIMENTS / "finetune_tiny.yaml"
V2_BLOCKS = [f"swinViT.layers{i}c.0.layer.conv{j}.conv.weight" for i in range(1, 5) for j in (1, 2)]


def _swinvit(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in net.state_dict().items() if k.startswith("swinViT.")}


def _trained(use_v2: bool) -> SSLModel:
    """An SSLModel whose every encoder tensor differs from a fresh init (LayerNorms included: their init is 1/0)."""
    torch.manual_seed(3)
    model = SSLModel(in_channels=2, feature_size=F, contrastive_dim=16, use_v2=use_v2)
    with torch.no_grad():
        for p in model.swinViT.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _net(use_v2: bool) -> SwinUNETR:
    return SwinUNETR(in_channels=2, out_channels=3, feature_size=F, use_v2=use_v2)


@pytest.fixture(scope="module")
def trained_v2() -> SSLModel:
    return _trained(True)


@pytest.fixture(scope="module")
def files(trained_v2: SSLModel, tmp_path_factory) -> dict[str, Path]:
    """encoder.pt of a V2 and of a V1 model."""
    folder = tmp_path_factory.mktemp("enc")
    return {"v2": save_encoder(trained_v2, folder / "v2.pt", extra={"step": 5}),
            "v1": save_encoder(_trained(False), folder / "v1.pt")}


def test_v2_sslmodel_runs_its_conv_blocks(trained_v2: SSLModel) -> None:
    enc = trained_v2.swinViT
    assert enc.use_v2 and all(len(getattr(enc, f"layers{i}c")) == 1 for i in range(1, 5))
    model = SSLModel(in_channels=2, feature_size=F, contrastive_dim=16, use_v2=True).train()
    x = torch.randn(1, 2, 32, 32, 32)  # 32-voxel sides: the last V2 block sees 2 voxels a side (InstanceNorm is fine)
    out = model(x)
    assert out["rotation"].shape == (1, 4) and out["contrastive"].shape == (1, 16)
    assert out["inpainting"].shape == x.shape
    sum(v.float().pow(2).mean() for v in out.values()).backward()
    no_grad = [n for n, p in model.swinViT.named_parameters() if "c.0." in n and (p.grad is None or not p.grad.any())]
    assert not no_grad  # the V2 blocks are in the compute path, so pretraining trains them
    v1 = set(_swinvit(SSLModel(feature_size=F, use_v2=False)))
    assert {f"swinViT.{k}" for k in enc.state_dict()} - v1 == set(V2_BLOCKS)


def test_encoder_file_carries_the_v2_blocks(files: dict[str, Path], trained_v2: SSLModel) -> None:
    v2, v1 = (torch.load(files[k], weights_only=True) for k in ("v2", "v1"))
    assert v2["use_v2"] is True and v1["use_v2"] is False and v2["step"] == 5
    for key in V2_BLOCKS:
        assert torch.equal(v2["state_dict"][key], trained_v2.swinViT.state_dict()[key[len("swinViT."):]])
        assert "module." + key[len("swinViT."):] in v2["state_dict"]  # the load_from layout holds them too
    assert not [k for k in v1["state_dict"] if "c.0.layer." in k]
    assert len(v2["state_dict"]) == 2 * len(trained_v2.swinViT.state_dict())


def test_v2_encoder_loads_into_monai_swinunetr_v2(files: dict[str, Path], trained_v2: SSLModel) -> None:
    net = _net(True)
    expected = {f"swinViT.{k}": v for k, v in trained_v2.swinViT.state_dict().items()}
    assert [k for k in V2_BLOCKS if torch.equal(_swinvit(net)[k], expected[k])] == []  # guards the check below
    loaded = load_encoder_into_swinunetr(net, files["v2"])
    assert loaded == list(_swinvit(net)) and set(V2_BLOCKS) <= set(loaded)
    got = _swinvit(net)
    assert got.keys() == expected.keys()
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []


def test_btcv_path_carries_v2_but_monai_load_from_does_not(files: dict[str, Path], trained_v2: SSLModel) -> None:
    """The documented limitation: `SwinUNETR.load_from` copies named layers only and leaves the V2 blocks at their
    random init, silently; `load_state_dict` of the `swinViT.*` keys (BTCV recipe) carries them."""
    weights = torch.load(files["v2"], weights_only=True)
    expected = {f"swinViT.{k}": v for k, v in trained_v2.swinViT.state_dict().items()}
    net = _net(True)
    before = {k: _swinvit(net)[k].clone() for k in V2_BLOCKS}
    net.load_from(weights)
    after = _swinvit(net)
    assert all(torch.equal(after[k], before[k]) for k in V2_BLOCKS)  # untouched
    assert all(torch.equal(after[k], v) for k, v in expected.items() if k not in V2_BLOCKS)
    with pytest.raises(ValueError, match=r"different=\['swinViT.layers1c"):
        check_loaded(net, expected)  # our check catches such a half load

    net = _net(True)
    missing, _ = net.load_state_dict({k: v for k, v in weights["state_dict"].items() if k.startswith("swinViT.")},
                                     strict=False)
    assert not [k for k in missing if k.startswith("swinViT.")]
    assert all(torch.equal(_swinvit(net)[k], v) for k, v in expected.items())


@pytest.mark.parametrize(("file", "net_v2", "pattern"), [
    ("v1", True, r"encoder is SwinUNETR V1 \(use_v2=False\) but the net is SwinUNETR-V2 \(use_v2=True\).*"
                 r"left randomly initialised.*model.use_v2=false"),
    ("v2", False, r"encoder is SwinUNETR-V2 \(use_v2=True\) but the net is SwinUNETR V1 \(use_v2=False\).*"
                  r"dropped.*model.use_v2=true"),
])
def test_variant_mismatch_is_refused(files: dict[str, Path], file: str, net_v2: bool, pattern: str) -> None:
    for strict in (True, False):  # a partial load must not let half an encoder through either
        net = _net(net_v2)
        before = _swinvit(net)
        with pytest.raises(EncoderVariantError, match=pattern):
            load_encoder_into_swinunetr(net, files[file], strict_encoder=strict)
        assert all(torch.equal(v, before[k]) for k, v in _swinvit(net).items())  # refused before loading anything


def test_file_whose_meta_contradicts_its_weights_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    ckpt = torch.load(files["v1"], weights_only=True)
    torch.save({**ckpt, "use_v2": True}, tmp_path / "odd.pt")
    with pytest.raises(EncoderVariantError, match="records use_v2=True but its weights are SwinUNETR V1"):
        load_encoder_into_swinunetr(_net(False), tmp_path / "odd.pt")


def _seg_cfg(use_v2: bool) -> FinetuneConfig:
    return load_config(FINETUNE_TINY, ["model.out_channels=3", f"model.use_v2={str(use_v2).lower()}"], FinetuneConfig)


def test_segmentation_task_builds_v2_and_names_the_key_on_mismatch(files: dict[str, Path],
                                                                   trained_v2: SSLModel) -> None:
    net = SegmentationTask(_seg_cfg(True), str(files["v2"])).build_model()
    assert net.swinViT.use_v2
    expected = {f"swinViT.{k}": v for k, v in trained_v2.swinViT.state_dict().items()}
    assert all(torch.equal(_swinvit(net)[k], v) for k, v in expected.items())
    assert not SegmentationTask(_seg_cfg(False), None).build_model().swinViT.use_v2
    with pytest.raises(ConfigError, match=rf"model.use_v2: False does not match encoder={files['v2']}.*SwinUNETR-V2"):
        SegmentationTask(_seg_cfg(False), str(files["v2"])).build_model()


@pytest.mark.parametrize("schema,path", [(PretrainConfig, PRETRAIN_TINY), (FinetuneConfig, FINETUNE_TINY)])
def test_config_key_validates(schema: type, path: Path) -> None:
    assert load_config(path, [], schema).model.use_v2 is False
    assert load_config(path, ["model.use_v2=true"], schema).model.use_v2 is True
    with pytest.raises(ConfigError, match="model.use_v2"):
        load_config(path, ["model.use_v2=maybe"], schema)


def test_pretraining_builds_a_v2_encoder() -> None:
    cfg = load_config(PRETRAIN_TINY, ["model.use_v2=true"], PretrainConfig)
    assert PretrainTask(cfg).build_model().swinViT.use_v2
    assert not PretrainTask(load_config(PRETRAIN_TINY, [], PretrainConfig)).build_model().swinViT.use_v2


def test_pretraining_resume_refuses_the_other_variant(tmp_path: Path) -> None:
    v1, v2 = (load_config(PRETRAIN_TINY, [f"output_dir={tmp_path}", f"model.use_v2={f}"], PretrainConfig)
              for f in ("false", "true"))
    shape = {"feature_size": F, "in_channels": 2, "contrastive_dim": 512, "heads": PretrainTask(v1).heads}
    checkpoint = save_state(tmp_path / "ray" / v1.name / "checkpoint_000000", {}, {"step": 2, **shape})
    assert check_resumable(v1, tmp_path) == checkpoint  # written before use_v2 was recorded: a V1 encoder
    with pytest.raises(ConfigError, match=r"use_v2: checkpoint False vs config True.*another output_dir"):
        check_resumable(v2, tmp_path)
    save_state(checkpoint, {}, {"step": 2, **shape, "use_v2": True})
    assert check_resumable(v2, tmp_path) == checkpoint
    with pytest.raises(ConfigError, match=r"use_v2: checkpoint True vs config False"):
        check_resumable(v1, tmp_path)


def test_finetune_resume_refuses_the_other_variant(tmp_path: Path) -> None:
    cfg = replace(_seg_cfg(False), output_dir=str(tmp_path))
    assert resume_problems(cfg, tmp_path, range(2)) == []
    save_state(tmp_path / "ray" / "fold_1" / "checkpoint_000000", {}, {"step": 3, "fold": 1, "feature_size": F})
    assert resume_problems(cfg, tmp_path, range(2)) == []  # an older fold checkpoint: V1
    save_state(tmp_path / "ray" / "fold_1" / "checkpoint_000001", {}, {"step": 6, "fold": 1, "feature_size": F,
                                                                       "use_v2": True})
    (problem,) = resume_problems(cfg, tmp_path, range(2))
    assert problem.startswith("model.use_v2: False but fold 1's checkpoint") and "use_v2=True" in problem
    assert resume_problems(cfg, tmp_path, [0]) == []
    assert resume_problems(replace(cfg, model=replace(cfg.model, use_v2=True)), tmp_path, range(2)) == []


@pytest.mark.parametrize(("file", "flag"), [("v2", "false"), ("v1", "true")])
def test_cli_exits_2_on_a_variant_mismatch(tiny_prepared: Path, files: dict[str, Path], tmp_path: Path, capsys,
                                           file: str, flag: str) -> None:
    capsys.readouterr()
    code = main(["finetune", str(FINETUNE_TINY), f"data.root={tiny_prepared}", f"output_dir={tmp_path / 'run'}",
                 f"encoder={files[file]}", f"model.use_v2={flag}", "tracking.enabled=false"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("swinssl finetune: error: model.use_v2:") and str(files[file]) in err
    assert "SwinUNETR-V2 (use_v2=True)" in err and "SwinUNETR V1 (use_v2=False)" in err
    assert not (tmp_path / "run" / "ray").exists()


def test_v2_pretraining_exports_trained_v2_blocks(prepared, tmp_path: Path) -> None:
    """A tiny V2 pretraining through Ray Train: its encoder.pt holds trained V2 blocks and loads, every tensor
    checked, into the V2 SwinUNETR that `swinssl finetune model.use_v2=true` builds (fine-tuning itself is the V1
    code path with another SwinUNETR flag; its V2 build is tested above without Ray)."""
    from swinssl.train.launch import pretrain

    cfg = load_config(PRETRAIN_TINY, [f"data.root={prepared[0]}", f"output_dir={tmp_path / 'pre'}",
                                      f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "model.use_v2=true",
                                      "trainer.num_workers=1", "trainer.steps=2", "trainer.checkpoint_every=2"],
                      PretrainConfig)
    result = pretrain(cfg)
    assert result.metrics["step"] == 2 and math.isfinite(result.metrics["loss"])
    ckpt = torch.load(result.encoder, weights_only=True)
    assert ckpt["use_v2"] is True and set(V2_BLOCKS) <= set(ckpt["state_dict"])
    torch.manual_seed(cfg.trainer.seed)  # the worker's init (train.worker seeds before build_model)
    fresh = {f"swinViT.{k}": v for k, v in PretrainTask(cfg).build_model().swinViT.state_dict().items()}
    assert [k for k in V2_BLOCKS if torch.equal(ckpt["state_dict"][k], fresh[k])] == []  # trained, not left at init
    net = SegmentationTask(_seg_cfg(True), str(result.encoder)).build_model()  # loads and checks every tensor
    assert all(torch.equal(v, ckpt["state_dict"][k]) for k, v in _swinvit(net).items())
    with pytest.raises(ConfigError, match="model.use_v2"):
        SegmentationTask(_seg_cfg(False), str(result.encoder)).build_model()
