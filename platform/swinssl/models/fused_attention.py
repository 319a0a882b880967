"""Swin window attention through ``torch.nn.functional.scaled_dot_product_attention`` (SDPA), in training too.

MONAI 1.6.1's ``WindowAttention`` (monai/networks/nets/swin_unetr.py) has an SDPA branch, but it is taken only when
``use_flash_attention=True`` *and* autograd is off (``not torch.is_grad_enabled()``): every training step, and any
forward with gradients on, runs the eager ``softmax(q k^T * scale + bias [+ mask]) v``. :func:`use_fused_attention`
switches MONAI's modules to :class:`FusedWindowAttention`, whose forward hands the same attention to SDPA with or
without gradients (except float32 training on a CPU, where SDPA has no fused kernel for it and is not faster: see
``FusedWindowAttention.eager_cpu_float_training``). The switch changes the module's class only: parameters, buffers
and ``state_dict`` keys stay MONAI's, so encoders and checkpoints load into plain MONAI models and back.

Why it is the same function: SDPA computes ``softmax(q k^T * scale + attn_mask) v`` with dropout on the attention
weights (PyTorch docs, ``scaled_dot_product_attention``). The ``attn_mask`` passed here is MONAI's additive term, the
relative-position bias ``(heads, n, n)`` gathered from ``relative_position_bias_table`` by
``relative_position_index``, plus, for shifted windows, the region mask ``(nw, n, n)`` added to window ``i`` of every
image exactly as MONAI's ``attn.view(b // nw, nw, heads, n, n) + mask[None, :, None]`` does; ``scale`` is MONAI's
``self.scale``. Gradients reach the bias table through ``attn_mask``. Not bit-equal, only equal up to float rounding:
SDPA's math backend scales q and k by ``sqrt(scale)`` each where MONAI scales q, fused kernels reduce the matmuls and
the softmax in another order (blockwise, with a running maximum), and under autocast SDPA keeps the logits in
float32 where MONAI rounds ``q k^T`` to bf16 before adding the float32 bias, while the bias itself is rounded to
the query dtype here (SDPA takes a float mask only in that dtype). Measured: ~1e-6 relative in float32 on outputs
and gradients; under bf16 autocast the error against a float32 reference is the same as MONAI's own.
Dropout draws different random numbers, so with ``attn_drop > 0`` training steps are equal in distribution only.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import WindowAttention
from torch import Tensor, nn

__all__ = ["FusedWindowAttention", "count_fused_attention", "use_fused_attention"]


class FusedWindowAttention(WindowAttention):
    """MONAI's ``WindowAttention`` with its forward computed by SDPA; never constructed, only switched to by
    :func:`use_fused_attention` (so ``__init__``, weights and keys are MONAI's)."""

    eager_cpu_float_training: ClassVar[bool] = True
    """Run MONAI's own forward for float32/float64 on a CPU with gradients on. SDPA's CPU flash kernel returns no
    ``attn_mask`` gradient, so there SDPA runs its math backend: MONAI's matmuls plus extra scaling, measured 0.86 to
    1.05x of MONAI's speed (benchmarks/attention.py). Every other case (CUDA, bf16/fp16 autocast, no gradients)
    uses SDPA. Tests switch it off to check SDPA's training path against MONAI's."""

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """``(B * nw, n, C)`` window tokens -> same shape; ``mask``: ``(nw, n, n)`` for shifted windows, else None."""
        if self.eager_cpu_float_training and _cpu_float_training(x, self.qkv.weight):
            return super().forward(x, mask)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn_mask = self._additive_mask(b, n, mask).to(q.dtype)  # SDPA takes a float mask in the query dtype only
        dropout = self.attn_drop.p if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, scale=self.scale)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))

    def _additive_mask(self, b: int, n: int, mask: Tensor | None) -> Tensor:
        """MONAI's bias ``(1, heads, n, n)``; with a shifted-window mask, bias + mask per window ``(b, heads, n, n)``.

        The index is sliced to ``[:n, :n]`` as MONAI does (windows smaller than ``window_size`` at small stages)."""
        index = self.relative_position_index[:n, :n].reshape(-1)
        bias = self.relative_position_bias_table[index].reshape(n, n, -1).permute(2, 0, 1)
        if mask is None:
            return bias.unsqueeze(0)
        nw = mask.shape[0]
        if b % nw:
            raise ValueError(f"window attention got {b} windows, not a multiple of the mask's {nw} windows per image")
        per_window = bias.unsqueeze(0) + mask.to(bias.dtype).unsqueeze(1)  # (nw, heads, n, n)
        return per_window.unsqueeze(0).expand(b // nw, -1, -1, -1, -1).reshape(b, self.num_heads, n, n)


def _cpu_float_training(x: Tensor, weight: Tensor) -> bool:
    """True on a CPU with autograd on, when qkv would run in float32/64 (not under a lower-precision autocast)."""
    if x.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    lower = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in (torch.bfloat16, torch.float16)
    return not lower and weight.dtype in (torch.float32, torch.float64)


def use_fused_attention(model: nn.Module, enabled: bool = True) -> int:
    """Switch every MONAI ``WindowAttention`` in ``model`` to the SDPA forward (``enabled=False``: back to MONAI's).

    Only the class of each module changes (``module.__class__``), so parameters, buffers, ``state_dict`` keys and
    any optimizer already holding the parameters are untouched. Subclasses of ``WindowAttention`` other than
    :class:`FusedWindowAttention` are left alone (their forward may differ from MONAI's).

    Returns:
        The number of modules switched (0 when every module already had the requested forward).
    """
    source, target = (WindowAttention, FusedWindowAttention) if enabled else (FusedWindowAttention, WindowAttention)
    switched = 0
    for module in model.modules():
        if type(module) is source:
            module.__class__ = target
            switched += 1
    return switched


def count_fused_attention(model: nn.Module) -> int:
    """How many window-attention modules of ``model`` run the SDPA forward (to check that a config reached it)."""
    return sum(type(m) is FusedWindowAttention for m in model.modules())
