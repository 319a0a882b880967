"""Pretext losses (rotation CE, SimCLR NT-Xent, inpainting L1) vs hand-computed values, plus a 2-process gloo check
of the gathered NT-Xent."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from swinssl.losses.contrastive import contrastive_loss, gather_with_grad, nt_xent
from swinssl.losses.inpainting import inpainting_loss
from swinssl.losses.rotation import rotation_loss

# ----------------------------------------------------------------------------------------------- rotation


def test_rotation_loss_hand_value():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 0.0, 2.0]])
    target = torch.tensor([3, 1])
    # -log softmax written out: log(sum exp) - logit[target]
    row0 = math.log(math.exp(1.0) + math.exp(2.0) + math.exp(3.0) + math.exp(4.0)) - 4.0
    row1 = math.log(math.exp(0.5) + math.exp(-1.0) + math.exp(0.0) + math.exp(2.0)) - (-1.0)
    expected = (row0 + row1) / 2  # (0.4401896986 + 3.3423495824) / 2
    assert rotation_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert rotation_loss(logits, target).item() == pytest.approx(1.8912696405, rel=1e-6)


def test_rotation_loss_uniform_logits_is_log4_and_shape_checked():
    assert rotation_loss(torch.zeros(5, 4), torch.tensor([0, 1, 2, 3, 0])).item() == pytest.approx(math.log(4))
    with pytest.raises(ValueError):
        rotation_loss(torch.zeros(5, 4), torch.zeros(4, dtype=torch.long))


# -------------------------------------------------------------------------------------------- contrastive


def _nt_xent_by_hand(z1: list[list[float]], z2: list[list[float]], temperature: float) -> float:
    """Explicit loops: views [z1_0..z1_{B-1}, z2_0..z2_{B-1}], positive of i is (i + B) mod 2B."""
    views = []
    for v in z1 + z2:
        norm = math.sqrt(sum(c * c for c in v))
        views.append([c / norm for c in v])
    n, b = len(views), len(z1)
    total = 0.0
    for i in range(n):
        sims = [sum(p * q for p, q in zip(views[i], views[k])) / temperature for k in range(n)]
        denominator = sum(math.exp(sims[k]) for k in range(n) if k != i)
        total += -math.log(math.exp(sims[(i + b) % n]) / denominator)
    return total / n


Z1 = [[1.0, 0.0], [0.0, 2.0]]
Z2 = [[3.0, 1.0], [-1.0, 1.0]]


@pytest.mark.parametrize("temperature", [0.5, 0.1, 1.0])
def test_nt_xent_matches_explicit_formula(temperature):
    got = nt_xent(torch.tensor(Z1), torch.tensor(Z2), temperature).item()
    assert got == pytest.approx(_nt_xent_by_hand(Z1, Z2, temperature), rel=1e-5)


def test_nt_xent_hand_value_and_temperature_dependence():
    z1, z2 = torch.tensor(Z1), torch.tensor(Z2)
    half, tenth, one = nt_xent(z1, z2, 0.5).item(), nt_xent(z1, z2, 0.1).item(), nt_xent(z1, z2, 1.0).item()
    assert half == pytest.approx(_nt_xent_by_hand(Z1, Z2, 0.5), rel=1e-5)
    assert len({round(half, 6), round(tenth, 6), round(one, 6)}) == 3  # the temperature matters
    # Perfectly aligned positives, orthogonal negatives: the loss falls as T falls (-> 0).
    e1, e2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    # anchor: positive sim 1, negatives: the other pair's two views (sim 0) -> -log(e^{1/T} / (e^{1/T} + 2))
    for t in (0.1, 0.5, 1.0):
        assert nt_xent(e1, e2, t).item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / t)), rel=1e-5, abs=1e-6)
    assert nt_xent(e1, e2, 0.1).item() < nt_xent(e1, e2, 0.5).item() < nt_xent(e1, e2, 1.0).item()


def test_nt_xent_scale_invariant_and_gradients_finite():
    z1 = torch.randn(4, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    z2 = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    loss = nt_xent(z1, z2, 0.5)
    assert loss.item() == pytest.approx(nt_xent(3 * z1, 0.2 * z2, 0.5).item(), rel=1e-5)  # L2-normalised
    loss.backward()
    assert torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        nt_xent(z1, z2[:3], 0.5)


def test_gathered_equals_local_on_one_process():
    assert not dist.is_initialized()
    z1 = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    z2 = torch.randn(3, 6, generator=torch.Generator().manual_seed(3))
    reference = nt_xent(z1, z2, 0.5)
    assert torch.equal(contrastive_loss(z1, z2, 0.5, gather=True), reference)  # bit-exact
    assert torch.equal(contrastive_loss(z1, z2, 0.5, gather=False), reference)
    assert gather_with_grad(z1) is z1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank: int, world: int, port: int, inputs: torch.Tensor, weight: torch.Tensor, out_dir: str) -> None:
    """One rank: z = inputs_local @ weight (a shared 'model'), gathered loss, backward, save loss and grads."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        per_rank = inputs.shape[1] // world
        local = inputs[:, rank * per_rank : (rank + 1) * per_rank].clone().requires_grad_(True)  # (2, B, Din)
        w = weight.clone().requires_grad_(True)
        z1, z2 = local[0] @ w, local[1] @ w  # (B, D) each
        z1.retain_grad()
        z2.retain_grad()
        loss = contrastive_loss(z1, z2, 0.5, gather=True)
        local_only = contrastive_loss(z1.detach(), z2.detach(), 0.5, gather=False)
        loss.backward()
        ddp_weight_grad = w.grad.clone()
        dist.all_reduce(ddp_weight_grad)  # what DDP does: average parameter grads over ranks
        ddp_weight_grad /= world
        torch.save(
            {
                "loss": loss.detach(),
                "local_only": local_only,
                "z1_grad": z1.grad,
                "z2_grad": z2.grad,
                "ddp_weight_grad": ddp_weight_grad,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_gathered_loss_two_process_gloo_matches_global_nt_xent(tmp_path):
    """World 2, B = 3 per rank. What is compared:

    * loss: mean over ranks of contrastive_loss(gather=True) == nt_xent over the concatenated global batch.
    * embedding grads: rank r's z.grad is d(L_0 + L_1)/dz_r (the gather's backward sums over ranks), while the
      single-process grad is d(global)/dz = d((L_0 + L_1) / 2)/dz, so cat_r(z.grad_r) / world == full-batch grad.
    * parameter grads: DDP averages w.grad over ranks; that average == single-process w.grad on the full batch.
    """
    world, per_rank, d_in, d = 2, 3, 5, 4
    gen = torch.Generator().manual_seed(7)
    inputs = torch.randn(2, world * per_rank, d_in, generator=gen)  # (views, global batch, Din)
    weight = torch.randn(d_in, d, generator=gen)
    mp.spawn(_gather_worker, args=(world, _free_port(), inputs, weight, str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    x = inputs.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    z1, z2 = x[0] @ w, x[1] @ w
    z1.retain_grad()
    z2.retain_grad()
    full = nt_xent(z1, z2, 0.5)
    full.backward()

    mean_loss = sum(r["loss"] for r in ranks) / world
    torch.testing.assert_close(mean_loss, full.detach(), rtol=1e-5, atol=1e-6)
    # More negatives than a per-rank loss: the gathered rank loss differs from the local-only one.
    assert not torch.allclose(ranks[0]["loss"], ranks[0]["local_only"])
    torch.testing.assert_close(torch.cat([r["z1_grad"] for r in ranks]) / world, z1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["z2_grad"] for r in ranks]) / world, z2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ranks[0]["ddp_weight_grad"], w.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ranks[1]["ddp_weight_grad"], w.grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------- inpainting


def _inpainting_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # B=1, C=2, D=1, H=1, W=3
    reconstruction = torch.tensor([[[[[0.0, 1.0, 2.0]]], [[[1.0, 1.0, 1.0]]]]])
    target = torch.tensor([[[[[0.5, 1.0, 0.0]]], [[[0.0, 4.0, 1.5]]]]])
    hole = torch.tensor([[[[[False, True, True]]]]])
    return reconstruction, target, hole


def test_inpainting_whole_volume_hand_value():
    reconstruction, target, hole = _inpainting_case()
    # |diff| = [0.5, 0, 2] and [1, 3, 0.5]: sum 7 over 6 elements
    assert inpainting_loss(reconstruction, target).item() == pytest.approx(7 / 6)
    assert inpainting_loss(reconstruction, target, hole).item() == pytest.approx(7 / 6)  # mask ignored


def test_inpainting_holes_only_hand_value():
    reconstruction, target, hole = _inpainting_case()
    # holes at w = 1, 2 on both channels: |diff| = 0, 2, 3, 0.5 -> 5.5 / 4
    assert inpainting_loss(reconstruction, target, hole, holes_only=True).item() == pytest.approx(5.5 / 4)
    with pytest.raises(ValueError):
        inpainting_loss(reconstruction, target, None, holes_only=True)


def test_inpainting_holes_only_empty_mask_is_zero_with_finite_grad():
    reconstruction, target, hole = _inpainting_case()
    reconstruction.requires_grad_(True)
    loss = inpainting_loss(reconstruction, target, torch.zeros_like(hole), holes_only=True)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(reconstruction.grad).all() and (reconstruction.grad == 0).all()


def test_inpainting_holes_only_gradient_only_in_holes():
    reconstruction, target, hole = _inpainting_case()
    reconstruction.requires_grad_(True)
    inpainting_loss(reconstruction, target, hole, holes_only=True).backward()
    # d/dr |r - t| / 4 = sign / 4 in the holes (0 where r == t), 0 elsewhere
    expected = torch.tensor([[[[[0.0, 0.0, 0.25]]], [[[0.0, -0.25, -0.25]]]]])
    torch.testing.assert_close(reconstruction.grad, expected)
