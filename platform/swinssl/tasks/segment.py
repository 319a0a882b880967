"""Segmentation fine-tuning task: MONAI SwinUNETR (2 -> 12 classes), DiceCE, flips + intensity augmentation.

The encoder comes from a pretrained `encoder.pt` (every `swinViT.*` weight must load: `load_encoder_into_swinunetr`
raises otherwise; a V1/V2 mismatch with `model.use_v2` is a ConfigError) or is trained from scratch. A 1-channel
(CT) encoder, e.g. the published MONAI self-supervised weights, gets its PET channel by `init_pet_channel`
(`models.public_weights`).
`freeze_encoder_steps` keeps it fixed (lr 0, so no weight decay either) while the randomly initialised decoder
adapts; DDP is untouched because gradients still flow.
"""

from __future__ import annotations

import torch
from monai.losses import DiceLoss
from monai.networks.nets import SwinUNETR
from torch import Tensor, nn

from ..config import ConfigError, FinetuneConfig
from ..models.fused_attention import use_fused_attention
from ..models.ssl_head import check_input_shape
from .base import Task
from .seg_augment import random_flip, random_intensity


class SegmentationTask(Task):
    """Fine-tuning: named parameter groups "encoder" / "decoder" so the encoder can be frozen for a while."""

    def __init__(self, cfg: FinetuneConfig, encoder_path: str | None):
        check_input_shape(cfg.data.roi, cfg.model.feature_size)
        if min(cfg.data.roi) < 64:  # a 32-voxel side leaves a 1-voxel bottleneck that InstanceNorm rejects
            raise ValueError(f"data.roi={cfg.data.roi}: SwinUNETR's instance-normalised decoder needs every crop "
                             f"side >= 64 (and divisible by 32)")
        self.cfg, self.encoder_path = cfg, encoder_path or None
        self.init_rule = ""
        """What `build_model` did with the encoder's patch embedding ('' until it loaded one), for the run's record."""
        self.dice = DiceLoss(to_onehot_y=True, softmax=True)
        self.cross_entropy = nn.CrossEntropyLoss()

    def build_model(self) -> nn.Module:
        m = self.cfg.model
        net = SwinUNETR(in_channels=m.in_channels, out_channels=m.out_channels, feature_size=m.feature_size,
                        drop_rate=0.0, dropout_path_rate=m.drop_path_rate, use_checkpoint=m.use_checkpoint,
                        use_v2=m.use_v2)
        if self.encoder_path:
            from ..models.encoder_io import EncoderVariantError, load_encoder

            try:
                self.init_rule = load_encoder(net, self.encoder_path, pet_channel=self.cfg.init_pet_channel
                                              ).patch_embedding
            except EncoderVariantError as exc:  # a config problem: the key to change is model.use_v2
                raise ConfigError(f"model.use_v2: {m.use_v2} does not match encoder={self.encoder_path} ({exc})"
                                  ) from None
        use_fused_attention(net, m.fused_attention)  # forward only: the state dict stays MONAI's
        return net

    def param_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        encoder = {id(p) for p in model.swinViT.parameters()}
        return {"encoder": [p for p in model.parameters() if id(p) in encoder],
                "decoder": [p for p in model.parameters() if id(p) not in encoder]}

    def lr_scale(self, group: str, step: int) -> float:
        frozen = self.encoder_path and group == "encoder" and step < self.cfg.freeze_encoder_steps
        return 0.0 if frozen else 1.0

    def losses(self, model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        image, label = random_flip(batch["image"], batch["label"].long(), generator)
        image = random_intensity(image, generator)
        logits = model(image)
        dice, ce = self.dice(logits, label), self.cross_entropy(logits, label[:, 0])
        return {"loss": dice + ce, "loss_dice": dice.detach(), "loss_ce": ce.detach()}
