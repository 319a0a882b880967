"""Self-supervised pretraining task: the active pretext tasks of `tasks.registry` on 2-channel CT/PET crops.

Per batch of crops x (B, C, D, H, W): make the views (two per crop when an active task compares pairs, e.g.
contrastive; else one), each rotated by its own random quarter turns and cut out; run the encoder once on them with
the heads of the active tasks; then L = sum over active tasks t of w_t * loss_t(head_t output, views). The model has
no head for a task whose weight is 0, so it costs nothing.

A task with its own view (`PretextTask.own_view`: masked-patch modelling, cross-modal reconstruction) gets one more
encoder pass per step on its view of the same crops, after the shared pass (its draws come from the same step
generator, after the shared views', in registry order). When no active task reads the shared views, they are not
made and the shared pass does not run; a task with weight 0 has no view and no pass.

The views are stacked [view 1 of crops 0..B-1; view 2 ...] and `cutout` is told so (`copies`): a hole is never filled
from the other view of the same crop, which would let the contrastive task match the two views by shared content
(with data.batch_size=1 that was every cross-sample hole).

On purpose unlike the reference (Tang et al., CVPR 2022; Project-MONAI/research-contributions, SwinUNETR/Pretrain):

* rotation plane: axial (Y, X) by default instead of the reference's sagittal turn; equal 4.07 mm PET spacing in
  that plane, so a turn does not stretch anatomy (`pretext.rotation_dims`; see `pretext_ops`);
* rotation and contrastive heads read the pooled bottleneck instead of bottleneck tokens 0 and 1 of a 96^3 crop,
  so any ROI works (see `models.ssl_head`);
* NT-Xent negatives are gathered from every worker (`loss.gather_contrastive`; the reference scores each GPU's
  views alone: 2 volumes x 2 crops x 2 views = 8 per loss with its defaults), so negatives grow with the cluster.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..config import ConfigError, PretrainConfig
from ..models.fused_attention import use_fused_attention
from ..models.ssl_head import SSLModel, check_input_shape
from . import registry
from .base import Task
from .pretext_ops import cutout, random_rotation
from .registry import PretextTask, Views


class PretrainTask(Task):
    """Validated at construction (on the driver, before workers); `tasks` defaults to the registry's active ones."""

    def __init__(self, cfg: PretrainConfig, tasks: Sequence[PretextTask] | None = None):
        self.cfg = cfg
        try:
            check_input_shape(cfg.data.roi, cfg.model.feature_size)
        except ValueError as exc:
            raise ConfigError(f"data.roi / model.feature_size: {exc}") from None
        if tasks is None:
            problems = registry.pretext_problems(cfg)
            if problems:
                raise ConfigError("invalid pretext config:\n  - " + "\n  - ".join(problems), problems)
            tasks = registry.active(cfg)
        self.tasks = list(tasks)
        self.weights = {t.name: registry.weight(cfg, t) for t in self.tasks}
        self.copies = 2 if any(t.pair for t in self.tasks) else 1
        self.shared = [t for t in self.tasks if t.own_view is None]
        self.own = [t for t in self.tasks if t.own_view is not None]
        self.init_rule = ""
        """What `build_model` did with init_from's patch embedding ('' until it loaded one)."""

    @property
    def heads(self) -> list[str]:
        """Names of the active tasks (= the model's heads), in build order: part of the checkpoint signature."""
        return [t.name for t in self.tasks]

    def build_model(self, init: bool = True) -> nn.Module:
        """The SSLModel; with `init` and `init_from` set, its encoder loaded from that file (heads stay random).

        `init_rule` then says what was done with the patch embedding. A resumed run is unaffected: the loop restores
        its checkpoint into this model afterwards (`train.loop.run`), so the checkpoint's weights win. `init=False`
        (a checkpoint is about to be loaded: export) skips reading the file."""
        m = self.cfg.model
        model = SSLModel(in_channels=m.in_channels, feature_size=m.feature_size, drop_path_rate=m.drop_path_rate,
                         use_checkpoint=m.use_checkpoint, use_v2=m.use_v2,
                         heads=lambda width: {t.name: t.head(self.cfg, width) for t in self.tasks})
        use_fused_attention(model, m.fused_attention)  # forward only: encoder.pt keys stay MONAI's
        if init and self.cfg.init_from:
            self.init_rule = self._init_encoder(model)
        return model

    def _init_encoder(self, model: nn.Module) -> str:
        """Load init_from into model.swinViT (every tensor checked); a V1/V2 mismatch is a ConfigError."""
        from ..models.encoder_io import EncoderVariantError, load_encoder

        try:
            return load_encoder(model, self.cfg.init_from, pet_channel=self.cfg.init_pet_channel).patch_embedding
        except EncoderVariantError as exc:  # the key to change is model.use_v2
            raise ConfigError(f"model.use_v2: {self.cfg.model.use_v2} does not match init_from={self.cfg.init_from} "
                              f"({exc})") from None

    def _views(self, x: Tensor, generator: torch.Generator) -> Views:
        p, dims = self.cfg.pretext, tuple(self.cfg.pretext.rotation_dims)
        rotated, k = random_rotation(torch.cat([x] * self.copies), generator, dims=dims)
        cut, holes = cutout(rotated, generator, variant=p.cutout, copies=self.copies, min_side=p.cutout_min_side,
                            max_side=p.cutout_max_side, max_drop=p.cutout_max_drop, max_boxes=p.cutout_max_boxes,
                            cross_sample_prob=p.cutout_cross_sample)
        return Views(cut=cut, target=rotated, rotation=k, holes=holes, copies=self.copies)

    def losses(self, model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        x = batch["image"]
        scored: list[tuple[PretextTask, Tensor, object]] = []
        if self.shared:
            views = self._views(x, generator)
            out = model(views.cut, heads=[t.name for t in self.shared])
            scored += [(t, out[t.name], views) for t in self.shared]
        for t in self.own:
            view = t.own_view(x, generator, self.cfg)
            masked = {"mask": view.patch_mask} if view.patch_mask is not None else {}
            scored.append((t, model(view.input, heads=[t.name], **masked)[t.name], view))
        parts, diagnostics = {}, {}
        for t, out, view in scored:
            value = t.loss(out, view, self.cfg)
            if isinstance(value, tuple):  # (loss, {diagnostic: value}): logged as <task>/<diagnostic>
                value, extra = value
                diagnostics.update({f"{t.name}/{key}": v.detach() for key, v in extra.items()})
            parts[t.name] = value
        total = sum(self.weights[t.name] * parts[t.name] for t in self.tasks)
        return {"loss": total, **{f"loss_{name}": parts[name].detach() for name in self.heads}, **diagnostics}
