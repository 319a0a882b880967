"""The trials of a sweep as an explicit, deterministic list (written to `trials.json`): the named settings crossed
with the grid's product, each point drawn `num_samples` times for the randomly searched keys, repeated per seed,
plus one scratch baseline per seed and per distinct combination of the points' `finetune.*` values (e.g.
`finetune.cv.train_studies`: the scratch baseline of a label-efficiency sweep is fine-tuned on the same number of
labelled studies). An explicit list keeps trial names readable and stable, so a resumed sweep finds its finished
trials.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import ConfigError, SampleSpec, SweepConfig, flatten
from ..tasks import registry

FINETUNE_PREFIX = "finetune."
SIZE_KEY = "data.subset"
LABELS_KEY = "finetune.cv.train_studies"
"""The label-efficiency axis: labelled training studies per fold (0 = all); the report plots Dice against it."""
SHORT_NAMES = {SIZE_KEY: "n", LABELS_KEY: "labelled"}
"""Short keys of trial names besides the pretext weights, whose short names the task registry declares."""


@dataclass
class TrialSpec:
    """One trial: the values it sets (dotted keys; `finetune.`-prefixed keys go to the fine-tuning config)."""

    key: str
    """Folder name under `<sweep>/trials/` (stable across resumes)."""
    name: str
    """MLflow run name, e.g. `w_rot=1 w_con=0.5 n=760`."""
    setting: str
    """The name without the seed: trials that differ only by seed share a setting (the report groups them)."""
    init: str
    """'pretrained' or 'scratch'."""
    seed: int
    values: dict[str, Any] = field(default_factory=dict)

    def pretrain_overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.values.items() if not k.startswith(FINETUNE_PREFIX)}

    def finetune_overrides(self) -> dict[str, Any]:
        return {k[len(FINETUNE_PREFIX):]: v for k, v in self.values.items() if k.startswith(FINETUNE_PREFIX)}


def short_name(key: str) -> str:
    """`loss.w_rotation` -> `w_rot` (registry), `data.subset` -> `n`, any other key -> its last part."""
    return {**registry.short_names(), **SHORT_NAMES}.get(key, key.rsplit(".", 1)[-1])


def _format(value: Any, key: str = "") -> str:
    if key == LABELS_KEY and value == 0:
        return "all"  # cv.train_studies=0: each fold's whole training set
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _draw(spec: SampleSpec, rng: np.random.Generator, key: str) -> Any:
    if spec.kind == "choice":
        if not spec.values:
            raise ConfigError(f"search.sample.{key}: kind 'choice' needs values")
        return spec.values[int(rng.integers(len(spec.values)))]
    if not spec.low < spec.high:
        raise ConfigError(f"search.sample.{key}: needs low < high, got {spec.low}, {spec.high}")
    if spec.kind == "uniform":
        return float(rng.uniform(spec.low, spec.high))
    if spec.kind == "loguniform":
        if spec.low <= 0:
            raise ConfigError(f"search.sample.{key}: loguniform needs low > 0")
        return float(math.exp(rng.uniform(math.log(spec.low), math.log(spec.high))))
    raise ConfigError(f"search.sample.{key}: kind must be uniform, loguniform or choice, got {spec.kind!r}")


def _points(cfg: SweepConfig) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(setting label, values that name the trial, every value) per point: the named settings crossed with the grid,
    then the random draws."""
    grid = flatten(cfg.search.grid)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"search.grid.{key}: give a non-empty list of values")
    product = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else [{}]
    named = {label: flatten(values) for label, values in cfg.search.settings.items()} or {"": {}}
    points = [(label, point, {**values, **point}) for label, values in named.items() for point in product]
    if not cfg.search.sample:
        return points
    if cfg.search.num_samples < 1:
        raise ConfigError("search.num_samples must be >= 1")
    rng = np.random.default_rng(cfg.search.seed)
    drawn = []
    for label, shown, values in points:
        for _ in range(cfg.search.num_samples):
            draws = {k: _draw(s, rng, k) for k, s in cfg.search.sample.items()}
            drawn.append((label, {**shown, **draws}, {**values, **draws}))
    return drawn


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,-]+", "_", text.replace(" ", ","))[:80]


def _scratch_points(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The distinct `finetune.*` parts of the points, in first-seen order ([{}] without such keys)."""
    parts = [{k: v for k, v in p.items() if k.startswith(FINETUNE_PREFIX)} for p in points]
    distinct: dict[str, dict[str, Any]] = {}
    for part in parts:
        distinct.setdefault(repr(sorted(part.items())), part)  # repr: values may be lists (unhashable)
    return list(distinct.values()) or [{}]


def expand_trials(cfg: SweepConfig) -> list[TrialSpec]:
    """Every trial of the sweep, in a stable order (pretrained points first, then the scratch baselines)."""
    if not cfg.seeds:
        raise ConfigError("seeds must list at least one seed")
    points = _points(cfg)
    if [values for _, _, values in points] == [{}] and not cfg.scratch_baseline:
        raise ConfigError("the sweep has no trials: give search.grid / search.settings / search.sample or "
                          "scratch_baseline: true")
    several = len(cfg.seeds) > 1
    specs: list[TrialSpec] = []
    for seed in cfg.seeds:
        for label, shown, values in points:
            # the unlabelled-set size last: `w_rot=1 w_con=0.5 n=760` reads as "this recipe, on this many"
            ordered = sorted(shown.items(), key=lambda item: item[0] == SIZE_KEY)
            parts = [label] if label else []
            setting = " ".join([*parts, *(f"{short_name(k)}={_format(v, k)}" for k, v in ordered)]) or "pretrained"
            specs.append(TrialSpec("", setting + (f" seed={seed}" if several else ""), setting, "pretrained", seed,
                                   values))
        for values in _scratch_points([values for _, _, values in points]) if cfg.scratch_baseline else []:
            setting = " ".join(["scratch", *(f"{short_name(k)}={_format(v, k)}" for k, v in values.items())])
            specs.append(TrialSpec("", setting + (f" seed={seed}" if several else ""), setting, "scratch", seed,
                                   values))
    names = [s.name for s in specs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ConfigError(f"trials with identical names {duplicated}: the search lists a value twice")
    for index, spec in enumerate(specs):
        spec.key = f"{index:03d}-{_slug(spec.name)}"
    return specs
