"""Swin encoder plus the heads of the active pretext tasks (Tang et al., CVPR 2022: rotation, contrastive, inpainting).

Which heads exist is decided by the caller (``swinssl.tasks.registry`` builds one per active task, under
``heads.<task name>``); ``SSLModel(heads=None)`` builds the three classic heads (see :func:`classic_heads`).

The encoder is MONAI's ``SwinTransformer`` built with exactly the arguments ``SwinUNETR`` uses for its ``swinViT``,
and it is stored under the attribute name ``swinViT``: the encoder's ``state_dict`` keys are therefore identical to the
``swinViT.*`` keys of a ``SwinUNETR`` with the same ``in_channels`` / ``feature_size``, which is what makes the
pretrained weights transferable (see :mod:`swinssl.models.encoder_io`).

Differences from the reference pretraining head, on purpose:

* Rotation and contrastive heads read a *globally average-pooled* bottleneck vector. The reference flattens the
  3x3x3 bottleneck tokens of a 96^3 crop and reads one of them, which ties the heads to that ROI; pooling works for any
  ROI whose sides are multiples of 32 (non-cubic included) and keeps the head shapes independent of the ROI.
* The inpainting (reconstruction) decoder normalises with ``GroupNorm`` rather than ``InstanceNorm``: a 32-voxel ROI
  side gives a one-voxel bottleneck, where instance normalisation raises in training mode (and would zero the
  features anyway).
* The decoder reconstructs all input channels (CT and PET), not a single CT channel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from monai.networks.nets.swin_unetr import PatchMerging, SwinTransformer
from monai.utils import ensure_tuple_rep, optional_import
from torch import Tensor, nn

from .masked import masked_encoder_features

__all__ = ["CLASSIC_HEADS", "PooledLinear", "SSLModel", "check_input_shape", "classic_heads", "ReconstructionDecoder"]

#: The heads every SSLModel had before heads came from the pretext registry, in their build order.
CLASSIC_HEADS: tuple[str, ...] = ("rotation", "contrastive", "inpainting")
#: State-dict prefixes of those heads in training checkpoints written before the registry (loaded transparently).
_LEGACY_PREFIXES = {"rotation_head.": "heads.rotation.", "contrastive_head.": "heads.contrastive.",
                    "reconstruction_head.": "heads.inpainting."}

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


class PooledLinear(nn.Linear):
    """Linear head on the globally average-pooled bottleneck ``(B, W) -> (B, out_features)``.

    ``pooled_input = True`` tells :class:`SSLModel` to hand it the pooled vector, computed once for all such heads
    (so two pooled heads back-propagate through one pooling, exactly as before heads were separate modules).
    """

    pooled_input = True


class ProjectionMLP(nn.Module):
    """VoCo's projection head on the pooled bottleneck ``(B, W) -> (B, dim)``: Linear-BN-ReLU, Linear-BN-ReLU, Linear;
    the batch norms have no affine parameters and no running statistics, as in VoCo's ``projection_head``."""

    pooled_input = True

    def __init__(self, width: int, dim: int):
        super().__init__()

        def norm() -> nn.Module:
            return nn.BatchNorm1d(dim, affine=False, track_running_stats=False)

        self.layers = nn.Sequential(nn.Linear(width, dim), norm(), nn.ReLU(), nn.Linear(dim, dim), norm(), nn.ReLU(),
                                    nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def classic_heads(bottleneck_dim: int, in_channels: int, contrastive_dim: int = 512,
                  spatial_dims: int = 3) -> dict[str, nn.Module]:
    """The three heads of the reference pretraining, keyed like their pretext tasks, in :data:`CLASSIC_HEADS` order."""
    return {"rotation": PooledLinear(bottleneck_dim, 4),
            "contrastive": PooledLinear(bottleneck_dim, contrastive_dim),
            "inpainting": ReconstructionDecoder(bottleneck_dim, in_channels, spatial_dims)}


def _legacy_head_keys(state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: rename pre-registry head keys (``rotation_head.*`` ...) to ``heads.<task>.*``."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        for old, new in _LEGACY_PREFIXES.items():
            if rest.startswith(old):
                state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                break


class SSLModel(nn.Module):
    """SwinUNETR encoder (``swinViT``) plus named pretext heads (``heads.<name>``) on its bottleneck.

    ``forward`` returns a dict with the requested heads only; a task that is off has no head at all (the pretraining
    task builds only the active ones), so no parameter is left without a gradient and DDP needs no
    ``find_unused_parameters``.
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
        heads: Callable[[int], Mapping[str, nn.Module]] | None = None,
        use_v2: bool = False,
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
            contrastive_dim: output dim of the classic contrastive projection (only used when ``heads`` is None).
            spatial_dims: 3 (volumes) or 2.
            heads: bottleneck width -> {name: head module}, built after the encoder (so a fixed seed gives the same
                encoder init whatever the heads); None: :func:`classic_heads`. A head reads the bottleneck feature
                map ``(B, width, d, h, w)``, or the pooled ``(B, width)`` when it has ``pooled_input = True``.
            use_v2: SwinUNETR-V2 encoder (MONAI's residual conv block ``layers{i}c`` before each Swin stage); must
                match the fine-tuning ``SwinUNETR(use_v2=...)``.
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
        self.bottleneck_dim = 16 * feature_size
        # Mirrors SwinUNETR.__init__'s SwinTransformer call argument by argument (its defaults: mlp_ratio 4,
        # qkv_bias, no dropout, LayerNorm, no patch norm, PatchMerging) so the keys and shapes match.
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
            use_v2=use_v2,
        )
        built = heads(self.bottleneck_dim) if heads else classic_heads(self.bottleneck_dim, in_channels,
                                                                      contrastive_dim, spatial_dims)
        self.heads = nn.ModuleDict(dict(built))
        self._register_load_state_dict_pre_hook(_legacy_head_keys)

    def bottleneck(self, x: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None) -> Tensor:
        """Last-stage feature map ``(B, 16F, D/32, H/32, W/32)``, layer-normalised as SwinUNETR consumes it; with a
        patch-grid ``mask`` the masked patch embeddings are ``mask_token`` (see ``models.masked``)."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input (B, {self.in_channels}, {', '.join('S' * self.spatial_dims)}), got {tuple(x.shape)}"
            )
        check_input_shape(tuple(x.shape[2:]), self.feature_size)
        # normalize=True is what SwinUNETR.forward passes; the heads should see the features the decoder will.
        if mask is not None:
            return masked_encoder_features(self.swinViT, x.contiguous(), mask, mask_token, normalize=True)[-1]
        return self.swinViT(x.contiguous(), normalize=True)[-1]

    def mask_token(self, heads: Iterable[str]) -> Tensor:
        """The ``mask_token`` of the one head among ``heads`` that has one (a masked-modelling head)."""
        wanted = set(heads)
        tokens = [h.mask_token for name, h in self.heads.items() if name in wanted and hasattr(h, "mask_token")]
        if len(tokens) != 1:
            raise ValueError(f"a mask needs exactly one requested head with a mask_token, got {len(tokens)} among "
                             f"{sorted(wanted)}")
        return tokens[0]

    def forward(self, x: Tensor, heads: Iterable[str] | None = None, mask: Tensor | None = None) -> dict[str, Tensor]:
        """Run the encoder and the requested heads.

        Args:
            x: ``(B, C, D, H, W)`` with every spatial side a multiple of 32.
            heads: names among the built heads; ``None`` means all. Heads not listed are not computed. An empty set
                returns ``{}`` without running the encoder.
            mask: ``(B, D/2, H/2, W/2)`` bool on the patch-embedding grid: those patch embeddings become the
                ``mask_token`` of the requested masked-modelling head (exactly one must be requested) before the Swin
                stages. None: the plain encoder.

        Returns:
            {name: head output} for the requested heads, in build order (classic heads: ``rotation`` ``(B, 4)``
            logits, ``contrastive`` ``(B, contrastive_dim)`` not normalised, ``inpainting`` ``(B, C, D, H, W)``).
        """
        if isinstance(heads, str):  # a bare "rotation" would otherwise iterate as characters
            heads = {heads}
        wanted = set(self.heads) if heads is None else set(heads)
        unknown = wanted - set(self.heads)
        if unknown:
            raise ValueError(f"unknown head(s) {sorted(unknown)}; this model has {list(self.heads)}")
        if not wanted:
            return {}
        feats = self.bottleneck(x, mask, self.mask_token(wanted) if mask is not None else None)
        pooled = None
        out: dict[str, Tensor] = {}
        for name, head in self.heads.items():
            if name not in wanted:
                continue
            if getattr(head, "pooled_input", False):
                if pooled is None:  # global average over the bottleneck tokens, shared by the pooled heads
                    pooled = torch.flatten(feats, start_dim=2).mean(dim=2)
                out[name] = head(pooled)
            else:
                out[name] = head(feats)
        return out
