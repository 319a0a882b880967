"""Self-supervised pretraining task: rotation + contrastive + inpainting on 2-channel CT/PET crops.

Per batch of crops x (B, C, D, H, W): make two views, each rotated by its own random quarter turns and cut out;
run the encoder once on the 2B views with only the heads whose loss weight is non-zero; then
    L = w_rot * CE(rotation logits, k) + w_con * NT-Xent(view 1, view 2) + w_inp * L1(reconstruction, rotated x).
With w_con = 0 only one view is made (the second view exists for the contrastive pairs), halving the compute.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import PretrainConfig
from ..losses.contrastive import contrastive_loss
from ..losses.inpainting import inpainting_loss
from ..losses.rotation import rotation_loss
from ..models.ssl_head import SSLModel, check_input_shape
from .pretext_ops import cutout, random_rotation

HEAD_OF_LOSS = {"rotation": "w_rotation", "contrastive": "w_contrastive", "reconstruction": "w_inpainting"}


class PretrainTask:
    """Implements `tasks.base.Task` for pretraining; validated at construction (on the driver, before workers)."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        check_input_shape(cfg.data.roi, cfg.model.feature_size)
        dims = [d % 3 for d in cfg.pretext.rotation_dims]
        if cfg.loss.w_rotation and cfg.data.roi[dims[0]] != cfg.data.roi[dims[1]]:
            raise ValueError(f"rotation in dims {cfg.pretext.rotation_dims} needs equal crop sides, roi is "
                             f"{cfg.data.roi}")
        self.heads = {head for head, weight in HEAD_OF_LOSS.items() if getattr(cfg.loss, weight) > 0}
        if not self.heads:
            raise ValueError("all pretext loss weights are 0: nothing to train")

    def build_model(self) -> nn.Module:
        m = self.cfg.model
        return SSLModel(in_channels=m.in_channels, feature_size=m.feature_size, drop_path_rate=m.drop_path_rate,
                        use_checkpoint=m.use_checkpoint, contrastive_dim=m.contrastive_dim)

    def unused_parameters(self) -> bool:
        return self.heads != set(HEAD_OF_LOSS)

    def _views(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(cut views (V*B, ...), rotated uncut targets, rotation labels (V*B,), hole mask)."""
        p, dims = self.cfg.pretext, tuple(self.cfg.pretext.rotation_dims)
        copies = 2 if "contrastive" in self.heads else 1
        rotated, k = random_rotation(torch.cat([x] * copies), generator, dims=dims)
        cut, holes = cutout(rotated, generator, min_side=p.cutout_min_side, max_side=p.cutout_max_side,
                            max_drop=p.cutout_max_drop, max_boxes=p.cutout_max_boxes,
                            cross_sample_prob=p.cutout_cross_sample)
        return cut, rotated, k, holes

    def losses(self, model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        x = batch["image"]
        cut, target, k, holes = self._views(x, generator)
        out = model(cut, heads=self.heads)
        w, parts = self.cfg.loss, {}
        if "rotation" in out:
            parts["loss_rotation"] = (w.w_rotation, rotation_loss(out["rotation"], k))
        if "contrastive" in out:
            z1, z2 = out["contrastive"].chunk(2)
            parts["loss_contrastive"] = (w.w_contrastive,
                                         contrastive_loss(z1, z2, w.temperature, gather=w.gather_contrastive))
        if "reconstruction" in out:
            parts["loss_inpainting"] = (w.w_inpainting, inpainting_loss(
                out["reconstruction"], target, holes, holes_only=w.inpaint_holes_only))
        total = sum(weight * value for weight, value in parts.values())
        return {"loss": total, **{name: value.detach() for name, (_, value) in parts.items()}}
