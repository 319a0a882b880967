"""Position-aware volume contrast (`voco`, issue 13): the base/random crops and their overlap targets against voxel
counting, the loss against a pair-by-pair loop written after VoCo's released code and against hand-computed values,
its config rules, and a CPU run resumed bit-identically that exports a plain encoder."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR

from pretext_helpers import Keep, train_steps
from swinssl.config import ConfigError, PretrainConfig, load_config
from swinssl.losses.voco import voco_terms
from swinssl.models.encoder_io import load_encoder_into_swinunetr
from swinssl.tasks.position_views import position_view
from swinssl.tasks.pretrain import PretrainTask
from swinssl.train.launch import export_encoder

CLASSIC_OFF = ["loss.w_rotation=0", "loss.w_contrastive=0", "loss.w_inpainting=0"]
TINY = ["model.feature_size=12", "data.roi=[32,64,64]", "data.batch_size=1", "pretext.cutout_max_boxes=8",
        "optim.warmup_steps=2", "trainer.amp=none", "trainer.log_every=1", "model.voco_dim=32",
        "pretext.voco_grid=[1,2,2]"]


def cfg_of(*overrides: str) -> PretrainConfig:
    return load_config(None, [*TINY, *overrides], PretrainConfig)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------- crops and targets


@pytest.mark.parametrize("grid", [(1, 2, 2), (1, 3, 1), (2, 2, 3)])
def test_crops_are_the_regions_they_claim_and_overlaps_count_voxels(grid):
    sides = (4, 12, 18)
    x = torch.rand(3, 2, *sides, generator=gen(1))
    view = position_view(x, gen(2), grid, randoms=5)
    size = [s // g for s, g in zip(sides, grid)]
    g = math.prod(grid)
    assert view.input.shape == (3 * g + 3 * 5, 2, *size) and view.overlap.shape == (3, 5, g)
    for b in range(3):
        for k in range(g):
            kz, ky, kx = (k // (grid[1] * grid[2]), k // grid[2] % grid[1], k % grid[2])
            box = tuple(slice(i * s, (i + 1) * s) for i, s in zip((kz, ky, kx), size))
            assert torch.equal(view.input[b * g + k], x[b, :, box[0], box[1], box[2]])
        for j in range(5):
            oz, oy, ox = view.offsets[b, j].tolist()
            assert all(0 <= o <= s - c for o, s, c in zip((oz, oy, ox), sides, size))
            window = (slice(oz, oz + size[0]), slice(oy, oy + size[1]), slice(ox, ox + size[2]))
            assert torch.equal(view.input[3 * g + b * 5 + j], x[b, :, window[0], window[1], window[2]])
            inside = torch.zeros(sides)
            inside[window] = 1  # voxels of the random crop, counted per tile
            tiles = inside.view(grid[0], size[0], grid[1], size[1], grid[2], size[2]).sum(dim=(1, 3, 5)).flatten()
            assert torch.equal(view.overlap[b, j], tiles / math.prod(size))
    assert torch.allclose(view.overlap.sum(-1), torch.ones(3, 5))


def test_offsets_reach_every_position_and_are_seeded():
    x = torch.zeros(64, 1, 2, 8, 8)
    views = [position_view(x, gen(seed), (1, 2, 2), randoms=4) for seed in range(8)]
    seen = torch.cat([v.offsets.flatten(0, 1) for v in views])
    assert set(seen[:, 0].tolist()) == {0}  # one tile along Z: a random crop spans it all
    assert set(seen[:, 1].tolist()) == set(range(5)) and set(seen[:, 2].tolist()) == set(range(5))
    assert torch.equal(position_view(x, gen(3), (1, 2, 2), 4).offsets, views[3].offsets)
    assert not torch.equal(views[0].offsets, views[1].offsets)


def test_bad_grid_refused():
    with pytest.raises(ValueError, match="must tile"):
        position_view(torch.zeros(1, 2, 4, 10, 10), gen(0), (1, 3, 3), 2)
    with pytest.raises(ValueError, match=">= 2 base crops"):
        position_view(torch.zeros(1, 2, 4, 10, 10), gen(0), (1, 1, 1), 2)


# ------------------------------------------------------------------------------------------------ the loss


def loop_voco(randoms, bases, overlap):
    """VoCo's per-sample, per-pair computation (models/voco_head.py: online_assign, ce_loss, regularization_loss),
    re-written as plain loops over one network's embeddings."""
    pos_all, neg_all, reg_all = [], [], []
    for b in range(overlap.shape[0]):
        logits = torch.stack([torch.stack([F.relu(F.cosine_similarity(r[None], base[None]))[0] for base in bases[b]])
                              for r in randoms[b]])
        labels = overlap[b]
        pos = (-labels * torch.log(1 - (labels - logits).abs() + 1e-6)).sum() / (labels.sum() + 1e-6)
        negative = (labels == 0).float()
        neg = (negative * logits**2).sum() / (negative.sum() + 1e-6)
        pairs = [(i, j) for i in range(len(bases[b])) for j in range(i + 1, len(bases[b]))]
        reg = sum(F.relu(F.cosine_similarity(bases[b][i][None], bases[b][j][None].detach()))[0] ** 2
                  for i, j in pairs) / len(pairs)
        pos_all.append(pos), neg_all.append(neg), reg_all.append(reg)
    return {"pos": torch.stack(pos_all), "neg": torch.stack(neg_all), "reg": torch.stack(reg_all)}


def test_loss_equals_the_pair_by_pair_loop_in_value_and_gradient():
    view = position_view(torch.rand(3, 1, 2, 8, 8, generator=gen(4)), gen(5), (1, 2, 2), randoms=3)
    emb = torch.randn(3 * 4 + 3 * 3, 16, generator=gen(6), dtype=torch.float64)
    pieces = []
    for fn in (voco_terms, loop_voco):
        e = emb.clone().requires_grad_(True)
        terms = fn(e[12:].view(3, 3, 16), e[:12].view(3, 4, 16), view.overlap.double())
        sum(t.mean() for t in terms.values()).backward()
        pieces.append((terms, e.grad))
    (ours, grad), (theirs, grad_loop) = pieces
    for key in ("pos", "neg", "reg"):
        assert torch.allclose(ours[key].double(), theirs[key], atol=1e-6), key
    assert torch.allclose(grad, grad_loop, atol=1e-6)


def test_loss_by_hand():
    """Two base crops along x, one random crop 3/4 inside the first: embeddings at known angles."""
    bases = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # orthogonal: reg 0
    randoms = torch.tensor([[[math.cos(0.5), math.sin(0.5)]]])  # cos to base 0: cos(0.5), to base 1: sin(0.5)
    overlap = torch.tensor([[[0.75, 0.25]]])
    terms = voco_terms(randoms, bases, overlap)
    s = [math.cos(0.5), math.sin(0.5)]
    pos = -(0.75 * math.log(1 - abs(0.75 - s[0]) + 1e-6) + 0.25 * math.log(1 - abs(0.25 - s[1]) + 1e-6)) / (1 + 1e-6)
    assert terms["pos"].item() == pytest.approx(pos, rel=1e-6)
    assert terms["neg"].item() == 0.0 and terms["reg"].item() == 0.0  # no disjoint pair; bases orthogonal
    apart = voco_terms(randoms, bases, torch.tensor([[[1.0, 0.0]]]))  # disjoint from base 1: sin(0.5)^2
    assert apart["neg"].item() == pytest.approx(math.sin(0.5) ** 2 / (1 + 1e-6), rel=1e-6)
    same = voco_terms(randoms, torch.tensor([[[1.0, 0.0], [1.0, 1.0]]]), overlap)  # cos 45 degrees between bases
    assert same["reg"].item() == pytest.approx(0.5, rel=1e-6)


# ------------------------------------------------------------------------------------- config and the task


def test_grid_must_give_encoder_sized_base_crops_and_options_are_validated_together():
    with pytest.raises(ConfigError, match=r"pretext.voco_grid: \[1, 2, 2\] splits data.roi \[32, 32, 32\] into"):
        cfg_of("loss.w_voco=1", "data.roi=[32,32,32]")
    assert cfg_of("data.roi=[32,32,32]").loss.w_voco == 0  # off: not its problem
    with pytest.raises(ConfigError) as caught:
        cfg_of("loss.w_voco=1", "pretext.voco_grid=[1,1,1]", "pretext.voco_crops=0", "model.voco_dim=0")
    keys = sorted(p.split(":")[0] for p in caught.value.problems)
    assert keys == ["model.voco_dim", "pretext.voco_crops", "pretext.voco_grid"], caught.value.problems


def test_task_alone_runs_one_pass_over_all_crops_and_logs_its_terms():
    task = PretrainTask(cfg_of(*CLASSIC_OFF, "loss.w_voco=1"))
    torch.manual_seed(0)
    model = task.build_model()
    seen = []
    model.swinViT.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    x = torch.rand(2, 2, 32, 64, 64, generator=gen(0))
    losses = task.losses(model, {"image": x}, gen(1))
    assert task.heads == ["voco"] and seen == [(2 * 4 + 2 * 2, 2, 32, 32, 32)]
    terms = [losses[f"voco/{k}"] for k in ("pos", "neg", "reg")]
    assert losses["loss_voco"].item() == pytest.approx(sum(terms).item(), rel=1e-6)
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.swinViT.parameters() if p.requires_grad)


def test_trains_resumes_bit_identically_and_exports_a_plain_encoder(tmp_path, deterministic):
    cfg = cfg_of(*CLASSIC_OFF, "loss.w_voco=1")
    straight_hooks = Keep(tmp_path)
    straight = train_steps(PretrainTask(cfg), 2, straight_hooks)
    resumed = train_steps(PretrainTask(cfg), 2, Keep(), resume=tmp_path / "step1")
    assert all(math.isfinite(straight_hooks.reports[0][k]) for k in ("loss_voco", "voco/pos", "voco/neg", "voco/reg"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    path = export_encoder(cfg, PretrainTask(cfg), tmp_path / "step2", tmp_path / "encoder.pt")
    assert not [k for k in torch.load(path, weights_only=True)["state_dict"] if "heads" in k]
    net = SwinUNETR(in_channels=2, out_channels=3, feature_size=12)
    assert len(load_encoder_into_swinunetr(net, path)) == len(net.swinViT.state_dict())
