"""The masked encoder pass of masked-patch modelling (SimMIM-style) and its head.

SimMIM (Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", CVPR 2022; github.com/microsoft/SimMIM,
`SwinTransformerForSimMIM`) replaces the patch embeddings of masked patches by one learned mask token, right after the
patch embedding and before the Swin stages, and predicts the masked pixels with a light decoder. Here:

* :func:`masked_encoder_features` is MONAI 1.6.1's ``SwinTransformer.forward`` (monai/networks/nets/swin_unetr.py:
  patch_embed -> pos_drop -> [layersNc if use_v2] -> layersN, each output through ``proj_out(normalize)``) with the
  mask tokens put in between patch_embed and pos_drop. It reads the encoder's own modules, so the encoder stays
  exactly MONAI's and ``encoder.pt`` is unchanged;
* the mask token is a parameter of the head (:class:`MaskedModellingHead`, ``heads.<task>.mask_token``), never of
  the encoder, so it is not exported;
* the decoder is swinssl's light reconstruction decoder on the bottleneck (5 conv + x2 upsampling stages, the
  inpainting head's architecture): SimMIM's one-layer pixel-shuffle head would need 32^3 x C outputs per bottleneck
  voxel in 3D (about 50M parameters at feature_size 48).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_STAGES = ("layers1", "layers2", "layers3", "layers4")


def masked_encoder_features(encoder: nn.Module, x: Tensor, patch_mask: Tensor | None, mask_token: Tensor | None,
                            normalize: bool = True) -> list[Tensor]:
    """MONAI ``SwinTransformer.forward(x, normalize)`` with masked patch embeddings replaced by ``mask_token``.

    Args:
        encoder: a MONAI ``SwinTransformer`` (V1 or V2: ``use_v2`` runs its residual conv blocks as MONAI does).
        x: (B, C, D, H, W) input.
        patch_mask: (B, D/2, H/2, W/2) bool on the patch-embedding grid, True where the embedding is replaced; None
            (or all False) gives exactly ``encoder(x, normalize)``.
        mask_token: (1, embed_dim, 1, 1, 1) broadcast into the masked positions (needed when patch_mask is given).
        normalize: layer-normalise each output, as SwinUNETR's forward asks for.

    Returns:
        The five feature maps ``encoder.forward`` returns (patch embedding, then the four stages).
    """
    x0 = encoder.patch_embed(x)
    if patch_mask is not None:
        if mask_token is None:
            raise ValueError("a patch_mask needs a mask_token")
        if tuple(patch_mask.shape) != (x0.shape[0], *x0.shape[2:]):
            raise ValueError(f"patch_mask must have shape {(x0.shape[0], *x0.shape[2:])} (the patch grid of an input "
                             f"{tuple(x.shape)}), got {tuple(patch_mask.shape)}")
        weight = patch_mask.unsqueeze(1).to(device=x0.device, dtype=x0.dtype)
        x0 = x0 * (1 - weight) + mask_token.to(x0.dtype) * weight  # as SimMIM's SwinTransformerForSimMIM
    x0 = encoder.pos_drop(x0)
    outs = [encoder.proj_out(x0, normalize)]
    for stage in _STAGES:
        if getattr(encoder, "use_v2", False):
            x0 = getattr(encoder, f"{stage}c")[0](x0.contiguous())
        x0 = getattr(encoder, stage)[0](x0.contiguous())
        outs.append(encoder.proj_out(x0, normalize))
    return outs


class MaskedModellingHead(nn.Module):
    """The learned mask token plus a decoder from the bottleneck to every input channel at full resolution.

    ``SSLModel.forward(x, heads=[name], mask=...)`` takes the token from the one requested head that has a
    ``mask_token`` and runs :func:`masked_encoder_features`; the head itself only decodes the bottleneck.
    """

    def __init__(self, embed_dim: int, decoder: nn.Module, spatial_dims: int = 3) -> None:
        """
        Args:
            embed_dim: the encoder's patch-embedding width (``feature_size``).
            decoder: maps the bottleneck ``(B, 16 * embed_dim, ...)`` to ``(B, C, D, H, W)``.
            spatial_dims: 3 (volumes) or 2.
        """
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim, *[1] * spatial_dims))
        nn.init.trunc_normal_(self.mask_token, std=0.02)  # SimMIM's init
        self.decoder = decoder

    def forward(self, feats: Tensor) -> Tensor:
        return self.decoder(feats)
