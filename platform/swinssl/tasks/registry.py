"""The pretext-task registry: every self-supervised pretraining task is declared here, once, by name.

A `PretextTask` named `<name>` is, everywhere in swinssl:

* its head: a module `heads.<name>` of `SSLModel`, built only while the task is active, reading the encoder's
  bottleneck feature map; its output is `model(x)["<name>"]`;
* its loss: a pure tensor function in its own file under `swinssl/losses/`, adapted to `(head output, views, cfg)`;
  an adapter may return `(loss, {key: value})`: the values are diagnostics logged as `<name>/<key>` (not summed);
* its input: the shared `Views` (one encoder pass for every such task), or, with `own_view`, a view of its own made
  from the crops and its own encoder pass (`model(view.input, heads=[name], mask=view.patch_mask)`), made and run
  only while the task is active;
* its weight: `loss.w_<name>` (a `LossConfig` field for the built-in tasks) or `loss.extra.w_<name>` for a task
  registered from outside the package; a weight of 0 (the default for an extra task) skips the head and its compute;
* its metric: `loss_<name>` (MLflow, Ray Train results, sweep trial results as `pretrain/loss_<name>`);
* its short name in sweep trial names (`w_rot=1 w_con=0.5`): `short`, default `w_<name>`.

Built-in: `rotation` (4-way quarter-turn classification), `contrastive` (SimCLR NT-Xent between two views; the only
task that needs the second view), `inpainting` (L1 reconstruction of the uncut crop), after Tang et al., "Self-
Supervised Pre-Training of Swin Transformers for 3D Medical Image Analysis", CVPR 2022 (github.com/Project-MONAI/
research-contributions, SwinUNETR/Pretrain). With their own view and encoder pass (weights 0 by default): `simmim`
(masked-patch modelling: Xie et al., "SimMIM", CVPR 2022; masked image modelling as 3D segmentation pretraining:
Wald et al., "Revisiting MAE pre-training for 3D medical image segmentation", CVPR 2025) and `xmodal` (PET/CT cross-
modal reconstruction: one modality hidden, reconstructed from the other), views in `tasks.pretext_views`; `voco`
(position-aware volume contrast: Wu et al., "VoCo", CVPR 2024), its view in `tasks.position_views`.

Adding a built-in task: its loss file under `losses/`, one `register(PretextTask(..., builtin=True))` at the end of
this module, its `LossConfig` field `w_<name>` (and option fields), tests. Adding a task from a plugin or a test
(no swinssl file changes): write its loss and head, then, before the config is loaded (loading validates it),

    register(PretextTask("toy", head=lambda cfg, width: ToyHead(width), loss=toy_loss, options={"scale": 1.0}))

and set `loss.extra.w_toy=1.0` (options: `loss.extra.toy_scale=2.0`, read with `option(cfg, "toy", "scale")`).
Registration happens in the driver process; `train.launch` ships the active entries to the Ray Train workers
(`pack`/`unpack`: cloudpickled by value, so the plugin module need not be importable there). The registry order is
the order heads are built (and their parameters initialised); a checkpoint records its active heads in that order.

`pretext_problems(cfg)` is the registry's part of `config.validate`: weights, unknown `loss.extra` keys, "nothing to
train", and each active task's own rules (rotation: equal crop sides in its plane).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..config import PretrainConfig, register_rules
from ..losses.contrastive import contrastive_loss
from ..losses.cross_modal import cross_modal_loss
from ..losses.inpainting import inpainting_loss
from ..losses.masked import masked_loss
from ..losses.rotation import rotation_loss
from ..losses.voco import voco_terms
from .position_views import position_view
from .pretext_views import CT, PET, hidden_modality_view, masked_view


@dataclass(frozen=True)
class Views:
    """What the pretraining task hands every loss: the augmented views of one batch of B crops."""

    cut: Tensor
    """(V*B, C, D, H, W) the network input: rotated crops with cut-out holes; V = 2 when a task needs the pair."""
    target: Tensor
    """(V*B, C, D, H, W) the same rotated crops before the cutout (the inpainting target)."""
    rotation: Tensor
    """(V*B,) long: quarter turns applied to each view."""
    holes: Tensor
    """(V*B, 1, D, H, W) bool: True where the cutout dropped a voxel."""
    copies: int
    """V: 1, or 2 when the two views of each crop are stacked as [view 1; view 2]."""


HeadFactory = Callable[[Any, int], nn.Module]
"""(PretrainConfig, bottleneck width 16*feature_size) -> head module mapping the bottleneck (B, width, d, h, w) to
its output; a module with `pooled_input = True` gets the globally average-pooled (B, width) instead."""
LossFn = Callable[[Tensor, Any, Any], "Tensor | tuple[Tensor, Mapping[str, Tensor]]"]
"""(head output, views, PretrainConfig) -> scalar loss, or (scalar loss, {diagnostic: value}). The views are the shared
`Views`, or the task's own view when it has `own_view`."""
OwnViewFn = Callable[[Tensor, torch.Generator, Any], Any]
"""(crops (B, C, D, H, W), step generator, PretrainConfig) -> a view with `.input` (the network input) and
`.patch_mask` (None, or the patch-grid mask the head's mask token fills; see `tasks.pretext_views.OwnView`)."""


@dataclass(frozen=True)
class PretextTask:
    """One registry entry (see the module docstring for what its name binds)."""

    name: str
    """Identifier binding head, output key, weight, metric and trial name (see the module docstring)."""
    head: HeadFactory
    """Builds the task's head: (PretrainConfig, bottleneck width) -> module."""
    loss: LossFn
    """(head output, Views, PretrainConfig) -> scalar; the pure tensor maths lives in its own file under losses/."""
    pair: bool = False
    """True when the loss compares two views of each crop (the batch is then doubled)."""
    short: str = ""
    """Short name in sweep trial names; default `w_<name>`."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Defaults of the options an extra task reads from `loss.extra.<name>_<option>` (built-ins use LossConfig)."""
    problems: Callable[[Any], list[str]] | None = None
    """Task-specific config rules, checked only while the task is active: cfg -> ["key: problem", ...]."""
    builtin: bool = False
    """Weight and options are LossConfig fields (`loss.w_<name>`) instead of `loss.extra` entries."""
    own_view: OwnViewFn | None = None
    """The task's own input view and encoder pass instead of the shared `Views` (see the module docstring): made
    from the step's generator after the shared views, in registry order, and only while the task is active."""

    def __post_init__(self) -> None:
        if self.own_view is not None and self.pair:
            raise ValueError(f"pretext task {self.name!r}: pair=True compares the shared views; a task with its own "
                             "view cannot ask for the pair")

    @property
    def weight_key(self) -> str:
        return f"loss.w_{self.name}" if self.builtin else f"loss.extra.w_{self.name}"

    @property
    def trial_name(self) -> str:
        return self.short or f"w_{self.name}"


_REGISTRY: dict[str, PretextTask] = {}


def register(task: PretextTask, replace: bool = False) -> PretextTask:
    """Add a task (after the ones already registered). A second task of the same name needs `replace=True`."""
    if not task.name.isidentifier():
        raise ValueError(f"pretext task name {task.name!r} must be a Python identifier (it becomes loss.w_<name>)")
    if task.name in _REGISTRY and not replace:
        raise ValueError(f"pretext task {task.name!r} is already registered")
    _REGISTRY[task.name] = task
    return task


def unregister(name: str) -> None:
    """Remove a task (tests register temporary ones); built-ins cannot be removed."""
    if name in _REGISTRY and _REGISTRY[name].builtin:
        raise ValueError(f"{name!r} is a built-in pretext task")
    _REGISTRY.pop(name, None)


def registered() -> list[PretextTask]:
    """Every task, in registration order (built-ins first)."""
    return list(_REGISTRY.values())


def weight(cfg: Any, task: PretextTask) -> float:
    """The task's loss weight in a PretrainConfig (an extra task without a weight: 0, i.e. off)."""
    if task.builtin:
        return float(getattr(cfg.loss, f"w_{task.name}"))
    return float(cfg.loss.extra.get(f"w_{task.name}", 0.0))


def option(cfg: Any, name: str, key: str) -> Any:
    """Option `key` of extra task `name`: `loss.extra.<name>_<key>`, else the default the entry declares."""
    return cfg.loss.extra.get(f"{name}_{key}", _REGISTRY[name].options[key])


def active(cfg: Any) -> list[PretextTask]:
    """The tasks with a weight > 0, in registry order: the heads the model builds and the checkpoint records."""
    return [t for t in _REGISTRY.values() if weight(cfg, t) > 0]


def short_names() -> dict[str, str]:
    """{dotted weight key: short trial-name key} of every registered task."""
    return {t.weight_key: t.trial_name for t in _REGISTRY.values()}


def _extra_problems(cfg: Any) -> list[str]:
    valid = {}
    for t in _REGISTRY.values():
        if not t.builtin:
            valid[f"w_{t.name}"] = t
            valid.update({f"{t.name}_{o}": t for o in t.options})
    problems = []
    for key, value in cfg.loss.extra.items():
        if key not in valid:
            builtin = key.removeprefix("w_") in _REGISTRY and _REGISTRY[key.removeprefix("w_")].builtin
            hint = f"use loss.{key}" if builtin else (
                f"registered extra keys: {sorted(valid) or 'none'} (is the task's module imported?)")
            problems.append(f"loss.extra.{key}: no registered pretext task reads it; {hint}")
        elif key.startswith("w_") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            problems.append(f"loss.extra.{key}: a loss weight must be a number, got {value!r}")
    return problems


def pretext_problems(cfg: Any) -> list[str]:
    """Every pretext-related problem of a PretrainConfig as "key: problem" strings (registered with
    `config.register_rules` below, so `config.validate` reports them with every other problem)."""
    problems = _extra_problems(cfg)
    numeric = []
    for t in _REGISTRY.values():
        try:
            w = weight(cfg, t)
        except (TypeError, ValueError):
            continue  # reported by _extra_problems
        numeric.append(t)
        if w < 0 and not t.builtin:  # config.validate's range rules cover the LossConfig fields
            problems.append(f"{t.weight_key}: a loss weight must be >= 0, got {w}")
    on = [t for t in numeric if weight(cfg, t) > 0]
    if not on:
        problems.append("loss: every pretext loss weight is 0, nothing to train; set one of "
                        + ", ".join(f"{t.weight_key}" for t in _REGISTRY.values()) + " > 0")
    for t in on:
        problems += t.problems(cfg) if t.problems else []
    return problems


def pack(tasks: Sequence[PretextTask]) -> bytes:
    """Cloudpickle entries for the Ray Train workers; plugin modules (outside swinssl) are pickled by value."""
    import cloudpickle

    modules = {getattr(f, "__module__", None) for t in tasks for f in (t.head, t.loss, t.problems, t.own_view) if f}
    plugins = [sys.modules[m] for m in modules if m and m in sys.modules and m.split(".")[0] not in ("swinssl",
                                                                                                      "__main__")]
    for module in plugins:
        cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps(list(tasks))
    finally:
        for module in plugins:
            cloudpickle.unregister_pickle_by_value(module)


def unpack(blob: bytes) -> list[PretextTask]:
    """The entries `pack` shipped; the ones from outside swinssl are registered here too, so this process's config
    validation (`from_dict`) knows their `loss.extra` keys."""
    import pickle

    tasks = pickle.loads(blob)
    for task in tasks:
        if not task.builtin:
            register(task, replace=True)
    return tasks


# ---------------------------------------------------------------------------------------------- built-in tasks


def _pooled_head(size: Callable[[Any], int]) -> HeadFactory:
    def build(cfg: Any, width: int) -> nn.Module:
        from ..models.ssl_head import PooledLinear

        return PooledLinear(width, size(cfg))

    return build


def _inpainting_head(cfg: Any, width: int) -> nn.Module:
    from ..models.ssl_head import ReconstructionDecoder

    return ReconstructionDecoder(width, cfg.model.in_channels)


def _rotation(out: Tensor, views: Views, cfg: Any) -> Tensor:
    return rotation_loss(out, views.rotation)


def _contrastive(out: Tensor, views: Views, cfg: Any) -> Tensor:
    z1, z2 = out.chunk(2)
    return contrastive_loss(z1, z2, cfg.loss.temperature, gather=cfg.loss.gather_contrastive)


def _inpainting(out: Tensor, views: Views, cfg: Any) -> Tensor:
    return inpainting_loss(out, views.target, views.holes, holes_only=cfg.loss.inpaint_holes_only)


def _simmim_head(cfg: Any, width: int) -> nn.Module:
    from ..models.masked import MaskedModellingHead
    from ..models.ssl_head import ReconstructionDecoder

    return MaskedModellingHead(cfg.model.feature_size, ReconstructionDecoder(width, cfg.model.in_channels))


def _simmim_view(x: Tensor, generator: torch.Generator, cfg: Any) -> Any:
    return masked_view(x, generator, cfg.pretext.mask_ratio, cfg.pretext.mask_patch)


def _simmim(out: Tensor, view: Any, cfg: Any) -> Tensor:
    norm = cfg.pretext.mask_patch if cfg.loss.simmim_norm_target else 0
    return masked_loss(out, view.target, view.voxel_mask, kind=cfg.loss.simmim_loss, norm_patch=norm)


def _xmodal_view(x: Tensor, generator: torch.Generator, cfg: Any) -> Any:
    return hidden_modality_view(x, generator, cfg.pretext.xmodal_hide_ct)


def _xmodal(out: Tensor, view: Any, cfg: Any) -> tuple[Tensor, dict[str, Tensor]]:
    per_view = cross_modal_loss(out, view.target, view.hidden)
    return per_view.mean(), xmodal_directions(per_view, view.hidden, cfg.pretext.xmodal_hide_ct)


def xmodal_directions(per_view: Tensor, hidden: Tensor, hide_ct: float) -> dict[str, Tensor]:
    """Per-direction L1 (`ct_from_pet`, `pet_from_ct`) as sum over that direction's views / (its probability x
    views): an unbiased estimate of the direction's mean L1 even in a step that drew none of its views (the loop
    averages every metric over its log interval, so a mean over the drawn views alone would be biased towards 0 by
    the steps without any). Per step, p x ct_from_pet + (1 - p) x pet_from_ct is exactly loss_xmodal. A direction
    that is never drawn (probability 0) is not logged."""
    out = {}
    for key, channel, prob in (("ct_from_pet", CT, hide_ct), ("pet_from_ct", PET, 1.0 - hide_ct)):
        if prob > 0:
            drawn = torch.where(hidden.to(per_view.device) == channel, per_view, torch.zeros_like(per_view))
            out[key] = drawn.sum() / (prob * per_view.numel())
    return out


def _voco_head(cfg: Any, width: int) -> nn.Module:
    from ..models.ssl_head import ProjectionMLP

    return ProjectionMLP(width, cfg.model.voco_dim)


def _voco_view(x: Tensor, generator: torch.Generator, cfg: Any) -> Any:
    return position_view(x, generator, cfg.pretext.voco_grid, cfg.pretext.voco_crops)


def _voco(out: Tensor, view: Any, cfg: Any) -> tuple[Tensor, dict[str, Tensor]]:
    batch, bases = view.overlap.shape[0], view.bases
    terms = voco_terms(out[batch * bases:].unflatten(0, (batch, -1)), out[:batch * bases].unflatten(0, (batch, bases)),
                       view.overlap)
    return sum(terms.values()).mean(), {key: value.mean() for key, value in terms.items()}


def _voco_problems(cfg: Any) -> list[str]:
    grid, roi = list(cfg.pretext.voco_grid), list(cfg.data.roi)
    if len(roi) != 3 or len(grid) != 3 or min(grid) < 1:
        return []  # config.validate reports a malformed roi or grid
    base = [side / tiles for side, tiles in zip(roi, grid)]
    if any(side % 32 for side in base):
        return [f"pretext.voco_grid: {grid} splits data.roi {roi} into base crops of {base} voxels; the encoder "
                f"needs whole multiples of 32 (e.g. roi [96, 96, 96] with grid [1, 3, 3], [64, 64, 64] with [2, 2, 2])"
                f", or set loss.w_voco=0"]
    return []


def _simmim_problems(cfg: Any) -> list[str]:
    side = cfg.pretext.mask_patch
    if side < 2 or side % 2:
        return []  # config.validate reports a malformed mask_patch
    bad = [s for s in cfg.data.roi if s % side]
    return [f"pretext.mask_patch: {side}-voxel mask patches must tile the crop, data.roi {list(cfg.data.roi)} has "
            f"sides {bad} that are not multiples of it (change one of them or set loss.w_simmim=0)"] if bad else []


def _xmodal_problems(cfg: Any) -> list[str]:
    if cfg.model.in_channels == 2:
        return []
    return [f"model.in_channels: cross-modal reconstruction hides CT or PET of a 2-channel (CT, PET) crop, got "
            f"{cfg.model.in_channels} channels (set loss.w_xmodal=0)"]


def _rotation_problems(cfg: Any) -> list[str]:
    dims, roi = list(cfg.pretext.rotation_dims), list(cfg.data.roi)
    if len(dims) != 2 or len({d % 3 for d in dims}) != 2 or any(not -3 <= d < 3 for d in dims):
        return []  # config.validate reports a malformed rotation_dims (and random_rotation refuses it)
    a, b = (d % 3 for d in dims)
    if len(roi) == 3 and roi[a] != roi[b]:
        return [f"pretext.rotation_dims: quarter turns in dims {dims} need equal crop sides there, data.roi is {roi} "
                f"(make those sides equal or set loss.w_rotation=0)"]
    return []


register(PretextTask("rotation", _pooled_head(lambda cfg: 4), _rotation, short="w_rot", builtin=True,
                     problems=_rotation_problems))
register(PretextTask("contrastive", _pooled_head(lambda cfg: cfg.model.contrastive_dim), _contrastive, pair=True,
                     short="w_con", builtin=True))
register(PretextTask("inpainting", _inpainting_head, _inpainting, short="w_inp", builtin=True))
register(PretextTask("simmim", _simmim_head, _simmim, short="w_mim", builtin=True, problems=_simmim_problems,
                     own_view=_simmim_view))
register(PretextTask("xmodal", _inpainting_head, _xmodal, short="w_xmod", builtin=True, problems=_xmodal_problems,
                     own_view=_xmodal_view))
register(PretextTask("voco", _voco_head, _voco, short="w_voco", builtin=True, problems=_voco_problems,
                     own_view=_voco_view))

# config.validate runs these with its own rules; config itself never imports this layer (it sits below it)
register_rules(PretrainConfig, lambda cfg, prefix: [prefix + problem for problem in pretext_problems(cfg)])
