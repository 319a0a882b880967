"""Meaning of a config, checked in one pass: `validate(cfg, extra)` collects every problem as
"dotted.key: problem (got X; valid: ...)" and raises one ConfigError listing them all (plus a driver's `extra`,
data-dependent problems). Types first, generically from the annotations (every `Literal` included); then the
per-field range table (`_rules`, looked up along each class's MRO); then cross-field rules (`_cross_rules`, plus
those other layers add with `register_rules`, e.g. the pretext tasks' own rules)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from typing import Any, Literal, get_args, get_origin, get_type_hints

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .keys import ConfigError, _keys_near, flatten
from .stages import (
    CropStreamConfig,
    CVConfig,
    DataConfig,
    EvalConfig,
    FinetuneConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PretextConfig,
    PretrainConfig,
    ProbeConfig,
    SegModelConfig,
    TrackingConfig,
    TrainerConfig,
)
from .sweep import SampleSpec, SchedulerConfig, SearchConfig, SweepConfig

CrossRule = Callable[[Any, str], list[str]]
_REGISTERED: dict[type, list[CrossRule]] = {}


def validate(cfg: Any, extra: list[str] | tuple[str, ...] = ()) -> None:
    """One validation pass over a resolved config: collect every problem (enumerations, ranges, cross-field rules)
    plus the caller's `extra` problems (e.g. data-dependent ones found by a driver), then raise one ConfigError
    listing them all. Returns None when there is nothing to report."""
    _raise_problems([*_problems(cfg), *extra])


def _raise_problems(problems: list[str]) -> None:
    if len(problems) == 1:
        raise ConfigError(problems[0], problems)
    if problems:
        raise ConfigError(f"{len(problems)} config problems:\n  " + "\n  ".join(problems), problems)


# --- validation rules ------------------------------------------------------------------------------------------
# A rule maps a field's value to None (fine) or (problem, valid). Rules are looked up along the class's MRO, so
# FinetuneDataConfig gets CropStreamConfig's; a class's cross-field rules see the whole object. Types (including
# every `Literal`, generically from the annotations) are checked first; a field of the wrong type skips its rule.

Rule = Callable[[Any], "tuple[str, str] | None"]


def _rule(ok: Callable[[Any], bool], problem: str, valid: str = "") -> Rule:
    return lambda value: None if ok(value) else (problem, valid)


def _at_least(low: float) -> Rule:
    return _rule(lambda v: v >= low, f"must be >= {low}")


_POSITIVE = _rule(lambda v: v > 0, "must be > 0")
_UNIT = _rule(lambda v: 0 <= v <= 1, "must be in [0, 1]")
_FRACTION = _rule(lambda v: 0 < v <= 1, "must be in (0, 1]")
_NOT_EMPTY = _rule(lambda v: bool(str(v).strip()), "must not be empty")
_SEED = _at_least(0)
_RETRIES = _rule(lambda v: v >= -1, "must be >= 0 (or -1 for unlimited)")
_ROI = _rule(lambda v: len(v) == 3 and all(s > 0 and s % 32 == 0 for s in v),
             "every side must be a positive multiple of 32 (patch size 2, then 4 merging stages)",
             "3 sides (Z, Y, X), e.g. [96, 96, 96]")
_FEATURE_SIZE = _rule(lambda v: v > 0 and v % 12 == 0, "must be a positive multiple of 12 (SwinUNETR's head counts)",
                      "12, 24, 36, 48, ...")
_SUBSET = _rule(lambda v: str(v).strip().lower() == "all" or (str(v).strip().isdigit() and int(v) > 0),
                "must be 'all' or a positive integer", "'all', '450', ...")
_AXES = _rule(lambda v: len(v) == 2 and all(-3 <= d <= 2 for d in v) and v[0] % 3 != v[1] % 3,
              "must name two distinct axes of a (Z, Y, X) crop", "e.g. [-2, -1] (axial)")


@functools.cache
def _rules() -> dict[type, dict[str, Rule]]:
    return {
        CropStreamConfig: {"roi": _ROI, "crops_per_study": _at_least(1), "batch_size": _at_least(1),
                           "shuffle_buffer": _at_least(0), "read_cpus": _POSITIVE, "min_crops_per_epoch": _at_least(0)},
        DataConfig: {"subset": _SUBSET, "min_foreground": _UNIT},
        ModelConfig: {"feature_size": _FEATURE_SIZE, "in_channels": _at_least(1), "drop_path_rate": _UNIT,
                      "contrastive_dim": _at_least(1), "voco_dim": _at_least(1)},
        LossConfig: {"w_rotation": _at_least(0), "w_contrastive": _at_least(0), "w_inpainting": _at_least(0),
                     "temperature": _POSITIVE, "w_simmim": _at_least(0), "w_xmodal": _at_least(0),
                     "w_voco": _at_least(0)},
        PretextConfig: {"rotation_dims": _AXES, "cutout_min_side": _FRACTION, "cutout_max_side": _FRACTION,
                        "cutout_max_drop": _UNIT, "cutout_cross_sample": _UNIT, "cutout_max_boxes": _at_least(1),
                        "mask_ratio": _rule(lambda v: 0 < v < 1, "must be in (0, 1)"), "mask_patch": _rule(
                            lambda v: v >= 2 and v % 2 == 0, "must be a positive even number of voxels (whole "
                            "2-voxel patches of the patch embedding)", "e.g. 16"), "xmodal_hide_ct": _UNIT,
                        "voco_grid": _rule(lambda v: len(v) == 3 and min(v) >= 1 and math.prod(v) >= 2,
                                           "must be three counts (Z, Y, X) >= 1 making >= 2 base crops",
                                           "e.g. [1, 3, 3]"),
                        "voco_crops": _at_least(1)},
        OptimConfig: {"lr": _POSITIVE, "weight_decay": _at_least(0), "warmup_steps": _at_least(0),
                      "min_lr_ratio": _UNIT, "grad_clip": _at_least(0)},
        TrainerConfig: {"steps": _at_least(1), "num_workers": _at_least(1), "cpus_per_worker": _POSITIVE,
                        "grad_accum": _at_least(1), "checkpoint_every": _at_least(1), "keep_checkpoints": _at_least(1),
                        "max_failures": _RETRIES, "log_every": _at_least(1), "seed": _SEED,
                        "resources_per_worker": _rule(lambda v: all(x >= 0 for x in v.values()), "must be >= 0")},
        PretrainConfig: {"name": _NOT_EMPTY},
        ProbeConfig: {"every": _at_least(0), "folds": _at_least(2), "fold": _at_least(0), "cv_seed": _SEED,
                      "steps": _at_least(1), "batch_size": _at_least(1), "crops_per_study": _at_least(1),
                      "hidden": _at_least(1), "lr": _POSITIVE, "sw_batch_size": _at_least(1)},
        SegModelConfig: {"feature_size": _FEATURE_SIZE, "in_channels": _at_least(1), "drop_path_rate": _UNIT,
                         "out_channels": _rule(lambda v: v == 0 or v >= 2, "must be 0 (the label set's classes) or "
                                               ">= 2 (background and at least one class)")},
        CVConfig: {"folds": _at_least(2), "seed": _SEED, "train_studies": _at_least(0)},
        EvalConfig: {"sw_batch_size": _at_least(1), "overlap": _rule(lambda v: 0 <= v < 1, "must be in [0, 1)"),
                     "overlays": _at_least(0), "cpus": _POSITIVE},
        FinetuneConfig: {"name": _NOT_EMPTY, "freeze_encoder_steps": _at_least(0)},
        SearchConfig: {"num_samples": _at_least(1), "seed": _SEED},
        SchedulerConfig: {"metric": _NOT_EMPTY, "grace_samples": _at_least(1), "max_samples": _at_least(0),
                          "reduction_factor": _at_least(2)},
        SweepConfig: {"name": _NOT_EMPTY, "pretrain": _NOT_EMPTY, "finetune": _NOT_EMPTY,
                      "max_concurrent_trials": _at_least(0), "max_failures": _RETRIES,
                      "seeds": _rule(lambda v: len(v) > 0 and all(s >= 0 for s in v),
                                     "must list at least one seed, each >= 0")},
    }


def _bad(key: str, problem: str, value: Any, valid: str = "") -> str:
    return f"{key}: {problem} (got {value!r}{'; valid: ' + valid if valid else ''})"


def _type_ok(hint: Any, value: Any) -> bool:
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return value in args
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_type_ok(args[0], v) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_type_ok(args[0], k) and _type_ok(args[1], v) for k, v in value.items())
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_problem(key: str, hint: Any, value: Any) -> str | None:
    if _type_ok(hint, value):
        return None
    choices = hint if get_origin(hint) is Literal else next(
        (a for a in get_args(hint) if get_origin(a) is Literal), None)  # list[Literal[...]]
    if choices is not None:
        return _bad(key, "not a valid choice", value, ", ".join(map(repr, get_args(choices))))
    return _bad(key, f"must be of type {str(hint).replace('typing.', '') if get_args(hint) else hint.__name__}",
                value)


def _field_rule(cls: type, name: str) -> Rule | None:
    rules = _rules()
    return next((rules[c][name] for c in cls.__mro__ if name in rules.get(c, {})), None)


def _check_value(cls: type, name: str, hint: Any, value: Any, key: str) -> str | None:
    """Type, then the field's rule: one problem string or None."""
    problem = _type_problem(key, hint, value)
    rule = _field_rule(cls, name)
    found = None if problem or rule is None else rule(value)
    return problem or (found and _bad(key, *found[:1], value, found[1]))


def register_rules(schema: type, rules: CrossRule) -> None:
    """Add cross-field `rules(cfg, prefix) -> ["key: problem", ...]` for configs of `schema` (and its subclasses):
    how an upper layer contributes rules this package must not import (the pretext-task registry registers its tasks'
    rules for PretrainConfig when `swinssl.tasks` is imported, as every pretraining driver and worker does)."""
    _REGISTERED.setdefault(schema, []).append(rules)


def _problems(cfg: Any, prefix: str = "") -> list[str]:
    """Every problem of a config object and its sub-configs, in field order, then its cross-field rules."""
    out: list[str] = []
    hints = get_type_hints(type(cfg))
    for f in fields(cfg):
        key, value = prefix + f.name, getattr(cfg, f.name)
        if is_dataclass(value):
            out += _problems(value, key + ".")
        elif isinstance(value, dict) and any(is_dataclass(v) for v in value.values()):
            out += [p for k, v in value.items() for p in _problems(v, f"{key}.{k}.")]
        elif problem := _check_value(type(cfg), f.name, hints[f.name], value, key):
            out.append(problem)
    if _well_typed(cfg):  # cross-field rules may assume every field has its declared type
        out += [p for cls in type(cfg).__mro__
                for rule in [*_cross_rules().get(cls, ()), *_REGISTERED.get(cls, ())] for p in rule(cfg, prefix)]
    return list(dict.fromkeys(out))  # the same problem found by two rules is listed once


def _well_typed(cfg: Any) -> bool:
    hints = get_type_hints(type(cfg))
    return all(_well_typed(v) if is_dataclass(v) else _type_ok(hints[f.name], v)
               for f in fields(cfg) for v in [getattr(cfg, f.name)])


@functools.cache
def _cross_rules() -> dict[type, tuple[CrossRule, ...]]:
    own = {PretextConfig: _pretext_cross, CVConfig: _cv_cross, TrackingConfig: _tracking_cross,
           SampleSpec: _sample_cross, FinetuneConfig: _finetune_cross, SweepConfig: _sweep_cross,
           ProbeConfig: _probe_cross, PretrainConfig: _pretrain_probe_cross}
    return {cls: (rule,) for cls, rule in own.items()}


def _pretext_cross(cfg: PretextConfig, prefix: str) -> list[str]:
    if cfg.cutout_min_side <= cfg.cutout_max_side:
        return []
    return [_bad(f"{prefix}cutout_min_side", f"must be <= {prefix}cutout_max_side ({cfg.cutout_max_side})",
                 cfg.cutout_min_side)]


def _probe_cross(cfg: ProbeConfig, prefix: str) -> list[str]:
    if cfg.fold < cfg.folds:
        return []
    return [_bad(f"{prefix}fold", f"must be a fold index of {prefix}folds={cfg.folds}", cfg.fold,
                 f"0..{cfg.folds - 1}")]


def _pretrain_probe_cross(cfg: PretrainConfig, prefix: str) -> list[str]:
    """The probe runs at report steps only; exporting the best probe's weights needs a probe."""
    out = []
    if cfg.probe.every > 0 and cfg.probe.every % cfg.trainer.log_every:
        out.append(_bad(f"{prefix}probe.every", f"must be a multiple of {prefix}trainer.log_every "
                        f"({cfg.trainer.log_every}): the probe runs at report steps", cfg.probe.every))
    if cfg.export == "best_probe" and cfg.probe.every <= 0:
        out.append(_bad(f"{prefix}export", f"'best_probe' needs the probe on ({prefix}probe.every > 0)", cfg.export))
    return out


def _cv_cross(cfg: CVConfig, prefix: str) -> list[str]:
    if -1 <= cfg.fold < cfg.folds:
        return []
    return [_bad(f"{prefix}fold", f"must be -1 (all folds) or a fold index of {prefix}folds={cfg.folds}", cfg.fold,
                 f"-1..{cfg.folds - 1}")]


def _tracking_cross(cfg: TrackingConfig, prefix: str) -> list[str]:
    return [_bad(f"{prefix}experiment", "must not be empty when tracking is enabled", cfg.experiment)
            ] if cfg.enabled and not cfg.experiment.strip() else []


def _sample_cross(spec: SampleSpec, prefix: str) -> list[str]:
    if spec.kind == "choice":
        return [] if spec.values else [_bad(f"{prefix}values", "kind 'choice' needs at least one value", spec.values)]
    out = [] if spec.low < spec.high else [_bad(f"{prefix}high", f"must be > low ({spec.low})", spec.high)]
    if spec.kind == "loguniform" and spec.low <= 0:
        out.append(_bad(f"{prefix}low", "loguniform needs low > 0", spec.low))
    return out


def _finetune_cross(cfg: FinetuneConfig, prefix: str) -> list[str]:
    # a 32-voxel side leaves a 1-voxel bottleneck that SwinUNETR's instance-normalised decoder rejects
    if min(cfg.data.roi, default=0) >= 64 or _ROI(cfg.data.roi):  # a roi off the 32-grid is reported once
        return []
    return [_bad(f"{prefix}data.roi", "fine-tuning needs every side >= 64 (and a multiple of 32)", cfg.data.roi)]


def _sweep_cross(cfg: SweepConfig, prefix: str) -> list[str]:
    """Search keys and override keys must be keys of the stage configs, their values of the right type."""
    out = []
    for key, values in flatten(cfg.search.grid).items():
        if not isinstance(values, list) or not values:
            out.append(_bad(f"{prefix}search.grid.{key}", "give a non-empty list of values", values))
            continue
        out += [p for v in values if (p := _stage_value_problem(f"{prefix}search.grid.", key, v))][:1]
    for name, values in cfg.search.settings.items():
        if not isinstance(values, dict) or not values:
            out.append(_bad(f"{prefix}search.settings.{name}", "give a mapping of config keys to values", values))
            continue
        for key, value in flatten(values).items():
            both = key in flatten(cfg.search.grid)
            out += [_bad(f"{prefix}search.settings.{name}.{key}", "is also a search.grid key; set it in one place",
                         value)] if both else []
            out += [p for p in [_stage_value_problem(f"{prefix}search.settings.{name}.", key, value)] if p]
    for key, spec in cfg.search.sample.items():
        values = spec.values if spec.kind == "choice" else [spec.low, spec.high]
        out += [p for v in values if (p := _stage_value_problem(f"{prefix}search.sample.", key, v))][:1]
    for stage in ("pretrain", "finetune"):
        overrides = getattr(cfg, f"{stage}_overrides")
        for key, value in flatten(overrides).items():
            out += [p for p in [_stage_value_problem(f"{prefix}{stage}_overrides.", key, value,
                                                     FinetuneConfig if stage == "finetune" else None)] if p]
    return out


def _stage_value_problem(where: str, key: str, value: Any, schema: type | None = None) -> str | None:
    """`value` for the dotted `key` of a stage config (`finetune.`-prefixed: fine-tuning, else pretraining, as
    tune/space.py splits them; or `schema`'s): the key must name a field, the value must convert to its type and
    pass its rule."""
    if schema is None and key.startswith("finetune."):
        schema, name = FinetuneConfig, key[len("finetune."):]
    else:
        schema, name = schema or PretrainConfig, key
    prefix = "finetune." if schema is FinetuneConfig and key != name else ""
    owner, parts = schema, name.split(".")
    for i, part in enumerate(parts):
        hint = get_type_hints(owner).get(part)
        if hint is None or (is_dataclass(hint) and i == len(parts) - 1):
            stage = "fine-tuning" if schema is FinetuneConfig else "pretraining"
            near = _keys_near(schema, name).split(", ")
            return f"{where}{key}: not a key of the {stage} config (valid keys: {', '.join(prefix + k for k in near)})"
        if i < len(parts) - 1:
            if get_origin(hint) is dict:
                return None  # a free-form mapping (e.g. trainer.resources_per_worker.<name>)
            if not is_dataclass(hint):
                return _bad(where + key, f"{'.'.join(parts[:i + 1])} has no sub-keys", value)
            owner = hint
    node = OmegaConf.structured(owner)
    try:
        node[parts[-1]] = value  # the conversion a trial's `key=value` override gets
        converted = getattr(OmegaConf.to_object(node), parts[-1])
    except OmegaConfBaseException as exc:
        return _bad(where + key, str(exc).splitlines()[0], value)
    return _check_value(owner, parts[-1], hint, converted, where + key)
