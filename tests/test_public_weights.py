"""Starting from the published MONAI SwinUNETR self-supervised weights (issue 14): a file in their layout
(`model_swinvit.pt`: 1-channel CT, feature size 48, `module.*` keys with fc1/fc2, head tensors and an epoch beside
them) made here from a real MONAI SwinUNETR, loaded into our 2-channel nets with the patch embedding widened
(`models.public_weights`), for fine-tuning (`encoder=`) and pretraining (`init_from=`); what is refused. No Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.networks.nets import SwinUNETR
from torch import nn

from pretext_helpers import Keep, train_steps
from swinssl.config import ConfigError, FinetuneConfig, PretrainConfig, load_config
from swinssl.models.encoder_io import load_encoder_into_swinunetr
from swinssl.tasks.pretrain import PretrainTask
from swinssl.tasks.segment import SegmentationTask
from swinssl.train.checkpoint import load_state
from swinssl.train.launch import _validate

PUBLISHED = 48  # the feature size of the published weights
PATCH = "swinViT.patch_embed.proj.weight"
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _monai_net(in_channels: int, feature_size: int, seed: int) -> SwinUNETR:
    torch.manual_seed(seed)
    return SwinUNETR(in_channels=in_channels, out_channels=14, feature_size=feature_size).eval()


def _write_public(net: SwinUNETR, path: Path) -> Path:
    """The released layout, written by hand: DDP's `module.` prefix, the encoder's tensors by their names in the
    original code (MONAI's mlp.linear1/linear2 are fc1/fc2 there), pretraining heads and training state beside them."""
    state = {}
    for key, value in net.swinViT.state_dict().items():
        state["module." + key.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")] = value
    width = 16 * net.swinViT.embed_dim
    state.update({"module.rotation_head.weight": torch.randn(4, width), "module.contrastive_head.weight":
                  torch.randn(512, width), "module.conv.0.weight": torch.randn(width // 2, width, 1, 1, 1)})
    torch.save({"state_dict": state, "epoch": 100}, path)
    return path


def _encoder(net: nn.Module) -> dict[str, torch.Tensor]:
    return {"swinViT." + k: v for k, v in net.swinViT.state_dict().items()}


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[SwinUNETR, Path]:
    """(the 1-channel MONAI net, its weights in the published layout)."""
    net = _monai_net(1, PUBLISHED, seed=5)
    return net, _write_public(net, tmp_path_factory.mktemp("public") / "model_swinvit.pt")


def _finetune_net(path: Path, pet_channel: str) -> tuple[SegmentationTask, nn.Module]:
    cfg = load_config(None, [f"model.feature_size={PUBLISHED}", "model.out_channels=14", f"encoder={path}",
                             f"init_pet_channel={pet_channel}"], FinetuneConfig)
    torch.manual_seed(0)
    task = SegmentationTask(cfg, cfg.encoder)
    return task, task.build_model().eval()


@pytest.mark.parametrize("pet_channel", ["zeros", "copy_ct"])
def test_published_layout_loads_into_the_two_channel_finetuning_net(published, pet_channel):
    source, path = published
    task, net = _finetune_net(path, pet_channel)
    saved, loaded = _encoder(source), _encoder(net)
    assert "from 1 to 2 input channels" in task.init_rule and f"init_pet_channel={pet_channel}" in task.init_rule
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved if k != PATCH)
    assert saved[PATCH].shape[1] == 1 and loaded[PATCH].shape[1] == 2
    assert torch.equal(loaded[PATCH][:, 0], saved[PATCH][:, 0])
    pet = loaded[PATCH][:, 1]
    assert torch.equal(pet, saved[PATCH][:, 0] if pet_channel == "copy_ct" else torch.zeros_like(pet))


def test_zero_pet_weights_compute_the_published_networks_ct_features(published):
    """Why zeros is the default: the widened encoder on (CT, any PET) is the 1-channel encoder on CT alone."""
    source, path = published
    ct, pet = torch.randn(1, 1, 32, 32, 32), 5 * torch.rand(1, 1, 32, 32, 32)
    encoder = _finetune_net(path, "zeros")[1].swinViT
    with torch.no_grad():
        want, ours = source.swinViT(ct), encoder(torch.cat([ct, pet], 1))
        assert len(ours) == len(want) == 5
        for mine, theirs in zip(ours, want):  # our net's attention is fused (SDPA): equal up to float rounding
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
        encoder.patch_embed.proj.weight[:, 1] = encoder.patch_embed.proj.weight[:, 0]  # copy_ct's weights
        assert not torch.allclose(encoder(torch.cat([ct, pet], 1))[0], want[0], atol=1e-3)  # PET is not ignored


def test_monai_load_from_reads_the_file_as_written(published):
    """MONAI's own loader of the released weights accepts the file: it is in the real layout."""
    source, path = published
    net = _monai_net(1, PUBLISHED, seed=9)
    assert not torch.equal(_encoder(net)[PATCH], _encoder(source)[PATCH])
    net.load_from(torch.load(path, weights_only=True))
    assert all(torch.equal(v, _encoder(source)[k]) for k, v in _encoder(net).items())


def test_pretraining_model_starts_from_init_from_with_random_heads(published):
    source, path = published
    with_init = PretrainTask(load_config(None, [f"model.feature_size={PUBLISHED}", f"init_from={path}"],
                                         PretrainConfig))
    bare = PretrainTask(load_config(None, [f"model.feature_size={PUBLISHED}"], PretrainConfig))
    torch.manual_seed(0)
    model = with_init.build_model()
    torch.manual_seed(0)
    fresh = bare.build_model()
    saved, loaded = _encoder(source), _encoder(model)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved if k != PATCH)
    assert torch.equal(loaded[PATCH][:, 0], saved[PATCH][:, 0]) and not loaded[PATCH][:, 1].any()
    assert "from 1 to 2 input channels" in with_init.init_rule and "zeros" in with_init.init_rule and not bare.init_rule
    heads = {k: v for k, v in model.state_dict().items() if k.startswith("heads.")}
    assert heads and all(torch.equal(v, fresh.state_dict()[k]) for k, v in heads.items())  # untouched by the load


def test_a_resumed_pretraining_run_keeps_its_checkpoint_not_init_from(tmp_path):
    """The worker builds the model (init_from loaded), then the loop restores the checkpoint over it."""
    path = _write_public(_monai_net(1, 12, seed=2), tmp_path / "public.pt")
    tiny = ["model.feature_size=12", "data.roi=[32,32,32]", "data.batch_size=1", "optim.warmup_steps=2",
            "trainer.amp=none", "trainer.log_every=1", "pretext.cutout_max_boxes=8", "loss.w_contrastive=0",
            "loss.w_inpainting=0"]
    train_steps(PretrainTask(load_config(None, tiny, PretrainConfig)), 1, Keep(tmp_path))
    checkpoint = load_state(tmp_path / "step1")["model"]
    task = PretrainTask(load_config(None, [*tiny, f"init_from={path}"], PretrainConfig))
    resumed = train_steps(task, 1, Keep(), resume=tmp_path / "step1")  # already at step 1: restores, trains nothing
    assert task.init_rule  # init_from was loaded first ...
    assert not torch.equal(checkpoint["swinViT.layers1.0.blocks.0.attn.qkv.weight"],
                           _encoder(_monai_net(1, 12, seed=2))["swinViT.layers1.0.blocks.0.attn.qkv.weight"])
    assert all(torch.equal(v, checkpoint[k]) for k, v in resumed.state_dict().items())  # ... and the checkpoint won


def test_three_channel_file_is_refused_naming_both_channel_counts(tmp_path):
    path = _write_public(_monai_net(3, 12, seed=1), tmp_path / "rgb.pt")
    net = SwinUNETR(in_channels=2, out_channels=3, feature_size=12)
    before = _encoder(net)
    with pytest.raises(ValueError, match=r"takes 3 input channels and the net 2.*only a 1-channel"):
        load_encoder_into_swinunetr(net, path)
    assert all(torch.equal(v, before[k]) for k, v in _encoder(net).items())  # nothing half-loaded
    task = PretrainTask(load_config(None, ["model.feature_size=12", f"init_from={path}"], PretrainConfig))
    with pytest.raises(ValueError, match="takes 3 input channels"):
        task.build_model()


def test_feature_size_24_file_is_refused_by_a_feature_size_48_net(tmp_path):
    path = _write_public(_monai_net(1, 24, seed=1), tmp_path / "fs24.pt")
    net = SwinUNETR(in_channels=2, out_channels=3, feature_size=PUBLISHED)
    with pytest.raises(ValueError, match=r"shape mismatch.*feature_size=24, in_channels=1.*net has feature_size=48"):
        load_encoder_into_swinunetr(net, path, pet_channel="copy_ct")


def test_init_pet_channel_is_a_checked_choice_in_both_stages():
    for schema in (PretrainConfig, FinetuneConfig):
        assert load_config(None, [], schema).init_pet_channel == "zeros"
        with pytest.raises(ConfigError, match="init_pet_channel"):
            load_config(None, ["init_pet_channel=ones"], schema)


def _driver_cfg(tiny_prepared: Path, tmp_path: Path, init_from: Path) -> PretrainConfig:
    return load_config(EXPERIMENTS / "pretrain_tiny.yaml", [f"data.root={tiny_prepared}",
                                                            f"output_dir={tmp_path / 'run'}", f"init_from={init_from}"],
                       PretrainConfig)


def test_pretrain_driver_refuses_a_missing_or_unfit_init_from_before_ray(tiny_prepared, tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ConfigError) as found:
        _validate(_driver_cfg(tiny_prepared, tmp_path, missing))
    assert found.value.problems == [found.value.problems[0]] and found.value.problems[0].startswith(
        f"init_from: {missing} not found")
    rgb = _write_public(_monai_net(3, 12, seed=1), tmp_path / "rgb.pt")
    with pytest.raises(ConfigError, match=r"^init_from: .*takes 3 input channels and the net 2"):
        _validate(_driver_cfg(tiny_prepared, tmp_path, rgb))
    ct = _write_public(_monai_net(1, 12, seed=1), tmp_path / "ct.pt")
    task, _, _ = _validate(_driver_cfg(tiny_prepared, tmp_path, ct))
    assert "widened from 1 to 2" in task.init_rule  # what the run records as init_from.patch_embedding
