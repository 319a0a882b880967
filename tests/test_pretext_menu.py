"""Masked-patch modelling (`simmim`) and PET/CT cross-modal reconstruction (`xmodal`): the pretext tasks with their
own input view and encoder pass (issue 13). Losses against hand-computed values, the mask and hiding targets, the
masked encoder pass against MONAI's, no extra pass at weight 0 (voco's too), a resumed CPU run of each and of both,
their encoder.pt, and a 2-worker run of every new task together killed and resumed."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn

from pretext_helpers import Keep, train_steps
from swinssl.config import ConfigError, PretrainConfig, load_config
from swinssl.losses.cross_modal import cross_modal_loss
from swinssl.losses.masked import masked_loss, normalize_patches
from swinssl.models.encoder_io import load_encoder_into_swinunetr
from swinssl.models.masked import masked_encoder_features
from swinssl.tasks.pretext_views import CT, PET, hidden_modality_view, masked_view
from swinssl.tasks.pretrain import PretrainTask
from swinssl.tasks.registry import xmodal_directions
from swinssl.train.launch import export_encoder

CPU = torch.device("cpu")
CLASSIC_OFF = ["loss.w_rotation=0", "loss.w_contrastive=0", "loss.w_inpainting=0"]
VOCO = ["data.roi=[32,64,64]", "pretext.voco_grid=[1,2,2]", "model.voco_dim=16"]  # base crops of 32^3
TINY = ["model.feature_size=12", "data.roi=[32,32,32]", "data.batch_size=1", "pretext.cutout_max_boxes=8",
        "optim.warmup_steps=2", "trainer.amp=none", "trainer.log_every=1"]


def cfg_of(*overrides: str) -> PretrainConfig:
    return load_config(None, [*TINY, *overrides], PretrainConfig)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ losses by hand


def test_masked_loss_by_hand():
    target = torch.tensor([1.0, -2.0, 3.0, 0.5]).view(1, 1, 1, 1, 4)
    prediction = torch.tensor([0.0, 0.0, 1.0, 4.5]).view(1, 1, 1, 1, 4)
    mask = torch.tensor([True, False, True, False]).view(1, 1, 1, 1, 4)
    # masked voxels 0 and 2: errors |0 - 1| = 1 and |1 - 3| = 2 (the visible ones, 2 and 4, do not count)
    assert masked_loss(prediction, target, mask, "l1").item() == pytest.approx((1 + 2) / 2)
    assert masked_loss(prediction, target, mask, "l2").item() == pytest.approx((1 + 4) / 2)
    two = torch.cat([target, target + 1], dim=1)  # 2 channels: the mask covers both, the mean is over both
    assert masked_loss(torch.zeros_like(two), two, mask, "l1").item() == pytest.approx((1 + 3 + 2 + 4) / 4)
    nothing = torch.zeros_like(mask)
    pred = prediction.clone().requires_grad_()
    empty = masked_loss(pred, target, nothing)
    empty.backward()
    assert empty.item() == 0 and torch.equal(pred.grad, torch.zeros_like(pred))


def test_per_patch_normalised_target_by_hand():
    values = torch.arange(8.0).view(1, 1, 2, 2, 2)  # one 2^3 patch: mean 3.5, unbiased variance 42 / 7 = 6
    expected = (values - 3.5) / math.sqrt(6 + 1e-6)
    torch.testing.assert_close(normalize_patches(values, 2), expected)
    blocks = torch.cat([values, 10 * values], dim=-1)  # two patches side by side along X, each normalised alone
    normed = normalize_patches(blocks, 2)
    torch.testing.assert_close(normed[..., :2], expected)
    torch.testing.assert_close(normed[..., 2:], (10 * values - 35) / math.sqrt(600 + 1e-6))
    everywhere = torch.ones(1, 1, 2, 2, 2, dtype=torch.bool)
    assert masked_loss(expected, values, everywhere, "l1", norm_patch=2).item() == pytest.approx(0, abs=1e-6)


def test_cross_modal_loss_and_directions_by_hand():
    target = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]]).view(2, 2, 1, 1, 2)
    prediction = torch.zeros_like(target)
    prediction[0, PET] = 100.0  # crop 0 hides CT: its PET channel is not scored, however wrong
    per_view = cross_modal_loss(prediction, target, torch.tensor([CT, PET]))
    torch.testing.assert_close(per_view, torch.tensor([(1 + 2) / 2, (7 + 8) / 2]))
    directions = xmodal_directions(per_view, torch.tensor([CT, PET]), hide_ct=0.25)
    assert directions["ct_from_pet"].item() == pytest.approx(1.5 / (0.25 * 2))
    assert directions["pet_from_ct"].item() == pytest.approx(7.5 / (0.75 * 2))
    combined = 0.25 * directions["ct_from_pet"] + 0.75 * directions["pet_from_ct"]
    assert combined.item() == pytest.approx(per_view.mean().item())  # the task's loss, exactly
    assert set(xmodal_directions(per_view, torch.tensor([PET, PET]), hide_ct=0.0)) == {"pet_from_ct"}


# -------------------------------------------------------------------------------------------- mask and hiding


def test_mask_ratio_and_alignment():
    x = torch.rand(3, 2, 32, 64, 32)
    view = masked_view(x, gen(5), ratio=0.6, mask_patch=16)
    cells = 2 * 4 * 2
    assert view.patch_mask.shape == (3, 16, 32, 16) and view.voxel_mask.shape == (3, 1, 32, 64, 32)
    # exactly ceil(0.6 * 16) = 10 of 16 mask patches per crop, as SimMIM counts
    assert view.voxel_mask.flatten(1).float().mean(1).tolist() == [math.ceil(0.6 * cells) / cells] * 3
    # a voxel is masked iff its 2-voxel embedding patch is
    embedded = view.patch_mask.repeat_interleave(2, 1).repeat_interleave(2, 2).repeat_interleave(2, 3)
    assert torch.equal(embedded.unsqueeze(1), view.voxel_mask)
    # ... iff its 16-voxel mask patch is: every 16^3 block is all masked or all visible
    blocks = view.voxel_mask.view(3, 2, 16, 4, 16, 2, 16).permute(0, 1, 3, 5, 2, 4, 6).flatten(4).float()
    assert torch.equal(blocks.amin(-1), blocks.amax(-1))
    assert view.input is x and view.target is x
    again = masked_view(x, gen(5), ratio=0.6, mask_patch=16)
    assert torch.equal(again.patch_mask, view.patch_mask)  # a pure function of the step generator
    assert not torch.equal(masked_view(x, gen(6), 0.6, 16).patch_mask, view.patch_mask)
    with pytest.raises(ValueError, match="mask_patch=12"):
        masked_view(x, gen(5), 0.6, 12)  # does not tile 32


def test_hidden_channel_is_absent_from_the_input():
    torch.manual_seed(3)
    x = torch.rand(64, 2, 4, 4, 4)
    view = hidden_modality_view(x, gen(1), hide_ct=0.25)
    for b, channel in enumerate(view.hidden.tolist()):
        assert torch.equal(view.input[b, channel], torch.zeros(4, 4, 4))
        assert torch.equal(view.input[b, 1 - channel], x[b, 1 - channel])
    assert 0 < (view.hidden == CT).sum() < 32  # about a quarter of 64 hide their CT
    tampered = x.clone()
    tampered[torch.arange(64), view.hidden] = float("nan")  # whatever the hidden channel holds ...
    same = hidden_modality_view(tampered, gen(1), hide_ct=0.25)
    assert torch.equal(same.input, view.input) and torch.equal(same.hidden, view.hidden)  # ... nothing of it gets in
    assert (hidden_modality_view(x, gen(2), hide_ct=1.0).hidden == CT).all()
    assert (hidden_modality_view(x, gen(2), hide_ct=0.0).hidden == PET).all()


def _encoder_inputs(model: nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    model.swinViT.patch_embed.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen


def test_cross_modal_pass_never_sees_the_hidden_channel():
    """Through the task: the encoder's input is the same whatever the hidden channel of the crop held."""
    task = PretrainTask(cfg_of(*CLASSIC_OFF, "loss.w_xmodal=1"))
    torch.manual_seed(0)
    model = task.build_model()
    seen = _encoder_inputs(model)
    x = torch.rand(2, 2, 32, 32, 32)
    with torch.no_grad():
        first = task.losses(model, {"image": x}, gen(9))
        hidden = hidden_modality_view(x, gen(9), 0.5).hidden  # the draw the task made from the same generator
        tampered = x.clone()
        tampered[torch.arange(2), hidden] = torch.rand(2, 32, 32, 32)
        second = task.losses(model, {"image": tampered}, gen(9))
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    assert first["loss_xmodal"] != second["loss_xmodal"]  # the target did change
    assert {"xmodal/ct_from_pet", "xmodal/pet_from_ct"} <= set(first)


# ------------------------------------------------------------------------------------------ masked encoder pass


@pytest.mark.parametrize("use_v2", [False, True])
def test_masked_pass_is_monais_forward_plus_mask_tokens(use_v2):
    torch.manual_seed(0)
    encoder = SwinTransformer(in_chans=2, embed_dim=12, window_size=(7, 7, 7), patch_size=(2, 2, 2),
                              depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), use_v2=use_v2).eval()
    x = torch.rand(1, 2, 32, 32, 32)
    token = torch.randn(1, 12, 1, 1, 1)
    nothing = torch.zeros(1, 16, 16, 16, dtype=torch.bool)
    with torch.no_grad():
        reference = encoder(x, normalize=True)
        plain = masked_encoder_features(encoder, x, nothing, token)
        mask = masked_view(x, gen(0), 0.5, 16).patch_mask
        masked = masked_encoder_features(encoder, x, mask, token)
    assert all(torch.equal(a, b) for a, b in zip(plain, reference, strict=True))
    normed_token = nn.functional.layer_norm(token.flatten(), [12])
    torch.testing.assert_close(masked[0].permute(0, 2, 3, 4, 1)[mask], normed_token.expand(int(mask.sum()), 12))
    torch.testing.assert_close(masked[0].permute(0, 2, 3, 4, 1)[~mask], reference[0].permute(0, 2, 3, 4, 1)[~mask])
    assert not torch.allclose(masked[-1], reference[-1])


# ------------------------------------------------------------------------------- weights, forwards, validation


@pytest.mark.parametrize("weights, heads, passes", [
    ([], ["rotation", "contrastive", "inpainting"], 1),
    (["loss.w_simmim=1", "loss.w_xmodal=0.5"], ["rotation", "contrastive", "inpainting", "simmim", "xmodal"], 3),
    ([*CLASSIC_OFF, "loss.w_simmim=1"], ["simmim"], 1),  # no task reads the shared views: they are not made
    (["loss.w_simmim=1", "loss.w_xmodal=0.5", "loss.w_voco=0.5", *VOCO], [
        "rotation", "contrastive", "inpainting", "simmim", "xmodal", "voco"], 4),
    ([*CLASSIC_OFF, "loss.w_voco=1", *VOCO], ["voco"], 1),
])
def test_encoder_passes_per_step(weights, heads, passes):
    task = PretrainTask(cfg_of(*weights))
    torch.manual_seed(0)
    model = task.build_model()
    seen = _encoder_inputs(model)
    with torch.no_grad():
        losses = task.losses(model, {"image": torch.rand(2, 2, *task.cfg.data.roi)}, gen(0))
    assert task.heads == heads and list(model.heads) == heads and len(seen) == passes
    assert {k for k in losses if k.startswith("loss_")} == {f"loss_{h}" for h in heads}
    expected = sum(task.weights[h] * losses[f"loss_{h}"] for h in heads)
    assert losses["loss"].item() == pytest.approx(expected.item())


def test_new_options_validated_all_at_once():
    bad = ["loss.w_simmim=1", "loss.w_xmodal=1", "pretext.mask_ratio=1.0", "pretext.mask_patch=15",
           "pretext.xmodal_hide_ct=1.5", "model.in_channels=1", "loss.w_xmodal=-1"]
    with pytest.raises(ConfigError) as caught:
        cfg_of(*bad[:-1])
    keys = sorted(p.split(":")[0] for p in caught.value.problems)
    assert keys == ["model.in_channels", "pretext.mask_patch", "pretext.mask_ratio", "pretext.xmodal_hide_ct"], keys
    with pytest.raises(ConfigError, match=r"pretext.mask_patch: 64-voxel mask patches must tile the crop.*\[32\]"):
        cfg_of("loss.w_simmim=1", "data.roi=[32,64,64]", "pretext.mask_patch=64")
    assert cfg_of("data.roi=[32,64,64]", "pretext.mask_patch=64").loss.w_simmim == 0  # off: not its problem
    with pytest.raises(ConfigError, match=r"loss.w_xmodal: must be >= 0"):
        cfg_of("loss.w_xmodal=-1")
    with pytest.raises(ConfigError, match=r"loss.simmim_loss: not a valid choice"):
        cfg_of("loss.simmim_loss=l3")


# ------------------------------------------------------------------- training, resume and the exported encoder


@pytest.mark.parametrize("tasks", [["loss.w_simmim=1", "loss.simmim_norm_target=true"], ["loss.w_xmodal=1"],
                                   ["loss.w_simmim=1", "loss.w_xmodal=1"]], ids=["simmim", "xmodal", "both"])
def test_new_tasks_train_resume_bit_identically_and_export_a_plain_encoder(tasks, tmp_path, deterministic):
    """Each new task alone and both (one pass a task a step): 2 steps straight vs a resume from its step-1
    checkpoint; encoder.pt holds no mask token and loads into MONAI SwinUNETR with every encoder tensor checked.
    (voco: tests/test_voco.py.)"""
    cfg = cfg_of(*CLASSIC_OFF, *tasks)
    straight_hooks = Keep(tmp_path)
    straight = train_steps(PretrainTask(cfg), 2, straight_hooks)  # its step-1 checkpoint is what a killed run leaves
    resumed_hooks = Keep()
    resumed = train_steps(PretrainTask(cfg), 2, resumed_hooks, resume=tmp_path / "step1")
    first, last = straight_hooks.reports
    assert {f"loss_{h}" for h in PretrainTask(cfg).heads} <= set(first) and all(math.isfinite(first[k]) for k in first)
    assert [m["step"] for m in resumed_hooks.reports] == [2]
    assert {k: v for k, v in resumed_hooks.reports[0].items() if k.startswith(("loss", "xmodal/"))} \
        == {k: v for k, v in last.items() if k.startswith(("loss", "xmodal/"))}
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert ("heads.simmim.mask_token" in straight.state_dict()) == ("simmim" in PretrainTask(cfg).heads)

    path = export_encoder(cfg, PretrainTask(cfg), tmp_path / "step2", tmp_path / "encoder.pt")
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert not [k for k in saved if "mask" in k or "heads" in k]
    net = SwinUNETR(in_channels=2, out_channels=3, feature_size=12)
    loaded = load_encoder_into_swinunetr(net, path)  # raises unless every swinViT tensor loaded and matches
    assert len(loaded) == len(net.swinViT.state_dict())
    for key, value in straight.swinViT.state_dict().items():
        assert torch.equal(net.swinViT.state_dict()[key], value), key


@pytest.mark.e2e
def test_two_workers_pretrain_all_new_tasks_killed_and_resumed(prepared, tmp_path, ray_session, monkeypatch):
    """Real Ray Train (2 DDP workers on gloo: rotation, simmim, xmodal and voco, four encoder passes a step, one
    backward), a worker killed after step 3 and the run resumed from the step-2 checkpoint; per-task metrics in
    MLflow; encoder.pt loads into SwinUNETR."""
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from swinssl.train.launch import pretrain
    from swinssl.train.worker import CHAOS_ENV

    out = tmp_path / "run"
    tiny = Path(__file__).resolve().parents[1] / "experiments" / "pretrain_tiny.yaml"
    cfg = load_config(tiny, [f"data.root={prepared[0]}", f"output_dir={out}", "loss.w_contrastive=0",
                             "loss.w_inpainting=0", "loss.w_simmim=1", "loss.w_xmodal=1", "loss.w_voco=1", *VOCO,
                             "trainer.steps=4",
                             "trainer.checkpoint_every=2", "trainer.max_failures=2",
                             f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"], PretrainConfig)
    monkeypatch.setenv(CHAOS_ENV, "3")
    result = pretrain(cfg)
    assert (out / ".chaos_fired").exists(), "the fault was not injected"
    assert result.metrics["step"] == 4
    client = MlflowClient(result.tracking_uri)
    for key in ("loss", "loss_rotation", "loss_simmim", "loss_xmodal", "xmodal/ct_from_pet", "xmodal/pet_from_ct",
                "loss_voco", "voco/pos", "voco/neg", "voco/reg"):
        assert sorted(m.step for m in client.get_metric_history(result.run_id, key)) == [1, 2, 3, 4], key
    net = SwinUNETR(in_channels=2, out_channels=2, feature_size=12)
    assert len(load_encoder_into_swinunetr(net, result.encoder)) == len(net.swinViT.state_dict())
