"""Swin encoder with the three pretext heads of Tang et al. (CVPR 2022): rotation, contrastive, reconstruction.

The encoder is MONAI's ``SwinTransformer`` built with exactly the arguments ``SwinUNETR`` uses for its ``swinViT``,
and it is stored under the attribute name ``swinViT``: the encoder's ``state_dict`` keys are therefore identical to the
``swinViT.*`` keys of a ``SwinUNETR`` with the same ``in_channels`` / ``feature_size``, which is what makes the
pretrained weights transferable (see :mod:`swinssl.models.encoder_io`).

Differences from the reference pretraining head, on purpose:

* Rotation and contrastive heads read a *globally average-pooled* bottleneck vector. The reference flattens the
  3x3x3 bottleneck tokens of a 96^3 crop and reads one of them, which ties the heads to that ROI; pooling works for any
  ROI whose sides are multiples of 32 (non-cubic included) and keeps the head shapes independent of the ROI.
* The reconstruction decoder normalises with ``GroupNorm`` rather than ``InstanceNorm``: a 32-voxel ROI side gives a
  one-voxel bottleneck, where instance normalisation raises in training mode (and would zero the features anyway).
* The decoder reconstructs all input channels (CT and PET), not a single CT channel.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from monai.networks.nets.swin_unetr import PatchMerging, SwinTransformer
from monai.utils import ensure_tuple_rep, optional_import
from torch import Tensor, nn

__all__ = ["HEADS", "SSLModel", "check_input_shape", "ReconstructionDecoder"]

#: Names of the heads :meth:`SSLModel.forward` can compute (also the keys of its output dict).
HEADS: frozenset[str] = frozenset({"rotation", "contrastive", "reconstruction"})

#: patch embedding (/2) followed by four patch-merging stages (/2 each): every spatial side must divide by 2**5.
SPATIAL_DIVISOR = 32
#: Patch size and window size of the reference encoder; fixed so the weights stay SwinUNETR-compatible.
PATCH_SIZE = 2
#: Number of x2 upsampling stages needed to go from the /32 bottleneck back to input resolution.
_DECODER_STAGES = 5


def check_input_shape(roi: Sequence[int], feature_size: int) -> None:
    """Validate an ROI and feature size against the constraints of the Swin encoder.

    Args:
        roi: spatial size of the network input, e.g. ``(96, 96, 96)`` (a 2-tuple for 2D models).
        feature_size: embedding dimension of the first Swin stage.

    Raises:
        ValueError: if ``feature_size`` is not a positive multiple of 12 (MONAI's SwinUNETR refuses it: the head
            counts 3/6/12/24 must divide every stage width) or if any ROI side is not a positive multiple of 32.
    """
    if isinstance(feature_size, bool) or not isinstance(feature_size, int) or feature_size <= 0 or feature_size % 12:
        raise ValueError(
            f"feature_size must be a positive multiple of 12 (SwinUNETR requirement), got {feature_size!r}; "
            "use e.g. 12, 24, 36 or 48"
        )
    sides = tuple(roi)
    bad = [int(s) for s in sides if int(s) <= 0 or int(s) % SPATIAL_DIVISOR]
    if not sides or bad:
        raise ValueError(
            f"every ROI side must be a positive multiple of {SPATIAL_DIVISOR} (patch size 2 then 4 merging stages), "
            f"got roi={sides}; offending sides: {bad}"
        )


def _group_count(channels: int, max_groups: int = 8) -> int:
    """Largest divisor of ``channels`` not above ``max_groups`` (GroupNorm needs groups | channels)."""
    return math.gcd(channels, max_groups)


class ReconstructionDecoder(nn.Module):
    """Light conv + upsample decoder from the /32 bottleneck back to input resolution.

    Five stages of ``Conv(3x3x3, no bias) -> GroupNorm -> LeakyReLU -> Upsample(x2)``, channels halving from
    ``16 * feature_size`` down to ``feature_size / 2``, then a 1x1 convolution to ``out_channels``. The conv bias is
    dropped because the following normalisation removes it anyway.
    """

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 3) -> None:
        """
        Args:
            in_channels: bottleneck width (``16 * feature_size``).
            out_channels: channels to reconstruct (the number of input modalities).
            spatial_dims: 2 or 3.
        """
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        mode = "trilinear" if spatial_dims == 3 else "bilinear"
        stages: list[nn.Module] = []
        ch = in_channels
        for _ in range(_DECODER_STAGES):
            nxt = max(ch // 2, 1)
            stages.append(
                nn.Sequential(
                    conv(ch, nxt, kernel_size=3, padding=1, bias=False),
                    nn.GroupNorm(_group_count(nxt), nxt),
                    nn.LeakyReLU(0.01, inplace=True),
                    nn.Upsample(scale_factor=2, mode=mode, align_corners=False),
                )
            )
            ch = nxt
        self.stages = nn.Sequential(*stages)
        self.out = conv(ch, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, 16F, D/32, H/32, W/32)`` to ``(B, out_channels, D, H, W)``."""
        return self.out(self.stages(x))


class SSLModel(nn.Module):
    """SwinUNETR encoder (``swinViT``) plus rotation, contrastive and reconstruction heads.

    ``forward`` returns a dict with the requested heads only, so that a head whose loss weight is 0 costs nothing.
    Under DDP, a run that skips heads leaves their parameters without gradients: wrap with
    ``find_unused_parameters=True`` (or ``static_graph=True`` when the head set is fixed for the run).
    """

    def __init__(
        self,
        in_channels: int = 2,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        drop_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        contrastive_dim: int = 512,
        spatial_dims: int = 3,
    ) -> None:
        """
        Args:
            in_channels: input modalities (2 for CT + PET).
            feature_size: first-stage embedding dim; must be a multiple of 12. The bottleneck is ``16 * feature_size``.
            depths: Swin blocks per stage (4 stages; ``SwinTransformer.forward`` hard-codes 4).
            num_heads: attention heads per stage.
            window_size: attention window (7 in the reference; must match the fine-tuning SwinUNETR).
            drop_path_rate: stochastic depth rate (SwinUNETR calls it ``dropout_path_rate``).
            use_checkpoint: gradient checkpointing inside the Swin blocks.
            contrastive_dim: output dim of the contrastive projection.
            spatial_dims: 3 (volumes) or 2.
        """
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(f"depths and num_heads need 4 stages, got depths={depths}, num_heads={num_heads}")
        if not 0.0 <= drop_path_rate <= 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1], got {drop_path_rate}")
        check_input_shape((SPATIAL_DIVISOR,) * spatial_dims, feature_size)
        # MONAI imports einops lazily and only fails at the first forward; fail here with the fix instead.
        if not optional_import("einops")[1]:
            raise ImportError("MONAI's SwinTransformer needs the 'einops' package: pip install einops")

        self.in_channels = in_channels
        self.feature_size = feature_size
        self.spatial_dims = spatial_dims
        self.contrastive_dim = contrastive_dim
        self.bottleneck_dim = 16 * feature_size
        # Mirrors SwinUNETR.__init__'s SwinTransformer call argument by argument (its defaults: mlp_ratio 4,
        # qkv_bias, no dropout, LayerNorm, no patch norm, PatchMerging, v1 blocks) so the keys and shapes match.
        self.swinViT = SwinTransformer(
            in_chans=in_channels,
            embed_dim=feature_size,
            window_size=ensure_tuple_rep(window_size, spatial_dims),
            patch_size=ensure_tuple_rep(PATCH_SIZE, spatial_dims),
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            mlp_ratio=4.0,
            qkv_bias=True,
            drop_rate=0.0,
            attn_drop_rate=0.0,
            drop_path_rate=drop_path_rate,
            norm_layer=nn.LayerNorm,
            patch_norm=False,
            use_checkpoint=use_checkpoint,
            spatial_dims=spatial_dims,
            downsample=PatchMerging,
            use_v2=False,
        )
        self.rotation_head = nn.Linear(self.bottleneck_dim, 4)
        self.contrastive_head = nn.Linear(self.bottleneck_dim, contrastive_dim)
        self.reconstruction_head = ReconstructionDecoder(self.bottleneck_dim, in_channels, spatial_dims)

    def bottleneck(self, x: Tensor) -> Tensor:
        """Last-stage feature map ``(B, 16F, D/32, H/32, W/32)``, layer-normalised as SwinUNETR consumes it."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input (B, {self.in_channels}, {', '.join('S' * self.spatial_dims)}), got {tuple(x.shape)}"
            )
        check_input_shape(tuple(x.shape[2:]), self.feature_size)
        # normalize=True is what SwinUNETR.forward passes; the heads should see the features the decoder will.
        return self.swinViT(x.contiguous(), normalize=True)[-1]

    def forward(self, x: Tensor, heads: Iterable[str] | None = None) -> dict[str, Tensor]:
        """Run the encoder and the requested heads.

        Args:
            x: ``(B, C, D, H, W)`` with every spatial side a multiple of 32.
            heads: subset of ``{"rotation", "contrastive", "reconstruction"}``; ``None`` means all. Heads not listed
                are not computed (the reconstruction decoder, by far the most expensive head, is skipped entirely).
                An empty set returns ``{}`` without running the encoder.

        Returns:
            dict with the requested keys: ``rotation`` ``(B, 4)`` logits, ``contrastive`` ``(B, contrastive_dim)``
            (not normalised; the loss does that), ``reconstruction`` ``(B, C, D, H, W)``.
        """
        if isinstance(heads, str):  # a bare "rotation" would otherwise iterate as characters
            heads = {heads}
        wanted = HEADS if heads is None else frozenset(heads)
        unknown = wanted - HEADS
        if unknown:
            raise ValueError(f"unknown head(s) {sorted(unknown)}; choose from {sorted(HEADS)}")
        if not wanted:
            return {}
        feats = self.bottleneck(x)
        out: dict[str, Tensor] = {}
        if wanted & {"rotation", "contrastive"}:
            pooled = torch.flatten(feats, start_dim=2).mean(dim=2)  # global average over the bottleneck tokens
            if "rotation" in wanted:
                out["rotation"] = self.rotation_head(pooled)
            if "contrastive" in wanted:
                out["contrastive"] = self.contrastive_head(pooled)
        if "reconstruction" in wanted:
            out["reconstruction"] = self.reconstruction_head(feats)
        return out
