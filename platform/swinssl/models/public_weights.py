"""Start from the published MONAI SwinUNETR self-supervised weights, which saw CT only, in our CT + PET networks.

The published checkpoint (Tang et al., "Self-Supervised Pre-Training of Swin Transformers for 3D Medical Image
Analysis", CVPR 2022; the README of Project-MONAI/research-contributions, SwinUNETR/Pretrain, links
``model_swinvit.pt``) holds a feature-size-48 Swin encoder for 1-channel CT input, keyed in the
``SwinUNETR.load_from`` layout (``module.patch_embed.proj.weight``, ``module.layers1.0.blocks.0.mlp.fc1.weight``...;
:func:`swinssl.models.encoder_io.swinvit_state_from_checkpoint` reads it). Our nets take 2 channels: 0 = CT, 1 = PET.

Only one tensor of the encoder has an input-channel axis: the patch embedding's convolution
``swinViT.patch_embed.proj.weight`` of shape (feature_size, in_channels, 2, 2, 2). Its bias and every later tensor see
feature channels only, so they fit as they are. The rule, when the checkpoint has exactly 1 input channel and the
net more:

* channel 0 (CT) gets the checkpoint's weights, unchanged;
* every other channel (PET) gets zeros (``init_pet_channel: zeros``, the default) or a copy of the CT weights
  (``copy_ct``).

Why zeros: the embedding is linear, ``W_ct * CT + W_pet * PET + b``; with ``W_pet = 0`` the widened network computes
exactly the published 1-channel network's features from the CT, whatever the PET, so step 0 starts from the
published model, and the PET weights grow from zero under the gradient. ``copy_ct`` instead feeds the PET through
the CT filters from the start (its intensities are on another scale, so the features change at step 0).

Anything else is refused: a checkpoint with 0 or 3+ input channels, or widening to fewer channels; a different
feature size or window size is refused by the loader's shape check, as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from torch import Tensor

__all__ = ["PATCH_EMBEDDING", "PET_CHANNEL_RULES", "PetChannel", "inflate_patch_embedding"]

PetChannel = Literal["zeros", "copy_ct"]
#: What the PET channel of a widened 1-channel (CT) patch embedding starts from.
PET_CHANNEL_RULES: tuple[str, ...] = ("zeros", "copy_ct")
#: The only encoder tensor with an input-channel axis (dimension 1).
PATCH_EMBEDDING = "swinViT.patch_embed.proj.weight"


def inflate_patch_embedding(state: Mapping[str, Tensor], net_channels: int, pet_channel: str = "zeros",
                            where: str = "checkpoint") -> tuple[dict[str, Tensor], str]:
    """Widen a 1-channel patch embedding to ``net_channels`` by the module's rule; returns (state, rule applied).

    Args:
        state: encoder tensors keyed ``swinViT.*`` (as ``swinvit_state_from_checkpoint`` returns them); not modified.
        net_channels: input channels of the net the state is loaded into.
        pet_channel: "zeros" or "copy_ct" (see the module docstring).
        where: names the file in error messages.

    Returns:
        The state (the patch embedding replaced when widened, every other tensor the same object) and a sentence
        saying what was done, for the run's log and parameters.

    Raises:
        ValueError: for an unknown ``pet_channel``, or input channels that differ and are not 1 in the checkpoint.
    """
    if pet_channel not in PET_CHANNEL_RULES:
        raise ValueError(f"init_pet_channel: {pet_channel!r} is not one of {list(PET_CHANNEL_RULES)}")
    weight = state.get(PATCH_EMBEDDING)
    if weight is None or weight.ndim < 2:  # the loader's key check reports a missing patch embedding
        return dict(state), "no patch embedding in the checkpoint"
    saved = int(weight.shape[1])
    if saved == net_channels:
        return dict(state), f"patch embedding as saved ({saved} input channel{'s' * (saved != 1)})"
    if saved != 1:
        raise ValueError(f"encoder shape mismatch ({where}): the checkpoint's patch embedding takes {saved} input "
                         f"channels and the net {net_channels}; only a 1-channel (CT) checkpoint can be widened to "
                         f"the net's channels")
    wide = weight.new_zeros((weight.shape[0], net_channels, *weight.shape[2:]))
    wide[:, :1] = weight
    if pet_channel == "copy_ct":
        wide[:, 1:] = weight
    others = "copies of the CT weights" if pet_channel == "copy_ct" else "zeros"
    rule = (f"patch embedding widened from 1 to {net_channels} input channels: channel 0 (CT) from the checkpoint, "
            f"channel{'s' * (net_channels > 2)} 1{f'..{net_channels - 1}' if net_channels > 2 else ''} (PET) "
            f"{others} (init_pet_channel={pet_channel})")
    return {**state, PATCH_EMBEDDING: wide}, rule
