"""Position-aware volume contrast loss (VoCo: Wu et al., CVPR 2024; github.com/Luffy03/VoCo, models/voco_head.py).

Per crop b: the embeddings of its g base crops and n random crops give similarities s_jk = relu(cos(r_j, b_k)), the
predicted share of random crop j inside base crop k; the true shares y_jk (rows summing to 1) supervise them:

    pos_b = - sum_jk y_jk log(1 - |y_jk - s_jk| + 1e-6) / sum_jk y_jk       (overlapping pairs pulled to their share)
    neg_b = sum_jk [y_jk = 0] s_jk^2 / (#{y_jk = 0} + 1e-6)                  (disjoint pairs pushed to similarity 0)
    reg_b = mean over pairs k < l of relu(cos(b_k, stopgrad(b_l)))^2       (base crops of one region kept apart)

and the loss is the batch mean of pos_b + neg_b + reg_b, as VoCo's `ce_loss` and `regularization_loss` compute it.

On purpose unlike VoCo's released code: one network scores itself, with no EMA teacher (the code keeps a momentum-0.9
teacher and averages student-vs-teacher and teacher-vs-student similarities); a second encoder would double the
memory, and only the exported encoder matters downstream. Similarities are computed in float32 (AMP-safe).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-6


def overlap_similarity(randoms: Tensor, bases: Tensor) -> Tensor:
    """(B, n, E), (B, g, E) -> (B, n, g) relu(cosine similarity), float32."""
    return F.relu(F.cosine_similarity(randoms.float()[:, :, None], bases.float()[:, None], dim=-1))


def base_regularisation(bases: Tensor) -> Tensor:
    """(B, g, E) -> (B,): mean over pairs k < l of relu(cos(b_k, stopgrad(b_l)))^2."""
    b = F.normalize(bases.float(), dim=-1)
    with torch.autocast(b.device.type, enabled=False):  # autocast would run this matmul (and the term) in bf16/fp16
        sim = F.relu(b @ b.detach().transpose(1, 2))  # (B, g, g): row k against a detached l
    upper = torch.triu(torch.ones(sim.shape[1:], dtype=torch.bool, device=sim.device), diagonal=1)
    return (sim[:, upper] ** 2).mean(dim=1)


def voco_terms(randoms: Tensor, bases: Tensor, overlap: Tensor) -> dict[str, Tensor]:
    """Per-crop terms of the VoCo loss.

    Args:
        randoms: (B, n, E) embeddings of the random crops.
        bases: (B, g, E) embeddings of the base crops.
        overlap: (B, n, g) true shares of each random crop inside each base crop.

    Returns:
        {"pos", "neg", "reg"}: (B,) float32 each (see the module docstring); the loss is the mean of their sum.
    """
    if randoms.shape[:2] != overlap.shape[:2] or bases.shape[:2] != (overlap.shape[0], overlap.shape[2]):
        raise ValueError(f"shapes do not match: randoms {tuple(randoms.shape)}, bases {tuple(bases.shape)}, "
                         f"overlap {tuple(overlap.shape)}")
    s, y = overlap_similarity(randoms, bases), overlap.float().to(randoms.device)
    pos = -(y * torch.log(1 - (y - s).abs() + EPS)).flatten(1).sum(1) / (y.flatten(1).sum(1) + EPS)
    disjoint = (y == 0).float()
    neg = (disjoint * s**2).flatten(1).sum(1) / (disjoint.flatten(1).sum(1) + EPS)
    return {"pos": pos, "neg": neg, "reg": base_regularisation(bases)}
