"""Contrastive pretext loss: SimCLR NT-Xent, optionally with negatives gathered from every rank.

The SwinUNETR pretraining (Tang et al., CVPR 2022; Project-MONAI/research-contributions, SwinUNETR/Pretrain) computes
NT-Xent (temperature 0.5) per GPU, so with 2 crops per GPU each anchor sees only 2 negatives.
`contrastive_loss(gather=True)` keeps each rank's anchors local but scores them against the views of
ALL ranks, so the number of negatives grows with the cluster.

Gradient bookkeeping under DDP (world size W, every rank holding B crops):

* Each rank returns the mean over its own 2B anchors, L_r. Since every rank has the same number of
  anchors, the global NT-Xent over all 2BW views equals mean_r L_r.
* `gather_with_grad` sums the gradients of the gathered tensor over ranks in its backward, so the
  gradient that reaches rank r's embeddings is d(sum_r' L_r')/dz_r: its own loss plus the other
  ranks' losses in which its views served as negatives/positives.
* DDP then averages parameter gradients over ranks: (1/W) sum_r d(sum_r' L_r')/dθ|_r = d(mean_r L_r)/dθ,
  which is exactly the gradient of the global loss. No extra scaling is needed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def _distributed_world() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather in forward; in backward sum the incoming gradient over ranks and keep this rank's rows."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # x: (N, ...) -> (W * N, ...)
        rank, world = _distributed_world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # grad: (W * N, ...) -> (N, ...)
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from every rank along dim 0 (rank order) while keeping gradients to the local shard.

    Args:
        x: (N, ...) local tensor; N and the trailing shape must be the same on every rank.

    Returns:
        (W * N, ...) tensor whose rows [rank * N, (rank + 1) * N) are `x` itself. Backward all-reduces
        (sums) the gradient over ranks and returns this rank's slice, so every rank must run backward
        through it (as DDP does). When torch.distributed is not initialised or the world size is 1,
        `x` is returned unchanged (same object).
    """
    _, world = _distributed_world()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x)


def _normalised_views(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """Validate inputs and return the L2-normalised (2B, D) views [z1; z2] (float32 for half inputs)."""
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"expected z1 and z2 of equal shape (B, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    views = torch.cat([z1, z2], dim=0)
    if views.dtype in (torch.float16, torch.bfloat16):
        views = views.float()
    return F.normalize(views, dim=1)


def _nt_xent_anchors(anchors: Tensor, candidates: Tensor, offset: int, temperature: float) -> Tensor:
    """Mean NT-Xent over `anchors` (2B, D) scored against `candidates` (M, D), both L2-normalised.

    `candidates[offset : offset + 2B]` must be `anchors` itself (rows [z1; z2]): anchor i's own column is
    offset + i (excluded) and its positive is offset + (i + B) mod 2B; every other column is a negative.
    """
    n = anchors.shape[0]
    rows = torch.arange(n, device=anchors.device)
    self_col = rows + offset  # (2B,)
    positive_col = (rows + n // 2) % n + offset  # (2B,)
    # float32 similarities even under autocast, which runs a matmul in bf16/fp16 (bf16 keeps ~3 significant digits,
    # 1/T amplifies the error); the diagonal is masked with -inf, which every dtype holds (-1e9 overflows fp16)
    with torch.autocast(anchors.device.type, enabled=False):
        logits = anchors.float() @ candidates.float().T / temperature  # (2B, M)
    cols = torch.arange(candidates.shape[0], device=anchors.device)
    logits = logits.masked_fill(cols[None, :] == self_col[:, None], float("-inf"))
    return F.cross_entropy(logits, positive_col)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR NT-Xent loss on one process.

    Args:
        z1, z2: (B, D) projections of two views of the same B crops (row b of z1 and of z2 is a pair).
        temperature: softmax temperature (reference 0.5).

    Returns:
        Scalar: mean over the 2B anchors v_i of -log(exp(s(i, p(i))/T) / sum_{k != i} exp(s(i, k)/T)),
        s = cosine similarity, p(i) = the other view of the same crop, the sum over the 2B - 1 other views
        (the positive and 2B - 2 negatives). Half-precision inputs are promoted to float32.
    """
    views = _normalised_views(z1, z2, temperature)
    return _nt_xent_anchors(views, views, 0, temperature)


def contrastive_loss(z1: Tensor, z2: Tensor, temperature: float, gather: bool = True) -> Tensor:
    """NT-Xent whose negatives are the views of every rank when `gather` is True.

    Args:
        z1, z2: (B, D) local projections of the two views; B must be equal on every rank.
        temperature: softmax temperature.
        gather: True scores each local anchor against all W * 2B views of the cluster (ordered by rank,
            each rank contributing [z1; z2]); the positive index is shifted by rank * 2B. False, or a
            single process, gives exactly `nt_xent(z1, z2, temperature)`.

    Returns:
        Scalar: the mean over this rank's 2B local anchors. Averaged over ranks (what DDP does with the
        gradients) it equals NT-Xent over the global batch of W * B crops; see the module docstring.
        With gather=True on several ranks, every rank must call this (a collective) with equal shapes.
    """
    views = _normalised_views(z1, z2, temperature)  # (2B, D)
    rank, world = _distributed_world()
    if not gather or world == 1:
        return _nt_xent_anchors(views, views, 0, temperature)
    candidates = gather_with_grad(views)  # (W * 2B, D)
    return _nt_xent_anchors(views, candidates, rank * views.shape[0], temperature)
