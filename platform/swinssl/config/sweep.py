"""The config of `swinssl sweep`: the trials (grid and sampled keys over the stage configs), seeds, the scratch
baseline, concurrency and the optional ASHA scheduler."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .stages import TrackingConfig


@dataclass
class SampleSpec:
    """One randomly searched key: `uniform`/`loguniform` over [low, high], or `choice` among `values`."""

    kind: Literal["uniform", "loguniform", "choice"] = "uniform"
    """'uniform' or 'loguniform' over [low, high], or 'choice' among values."""
    low: float = 0.0
    """Lower bound (uniform/loguniform); loguniform needs low > 0."""
    high: float = 1.0
    """Upper bound (uniform/loguniform); must be > low."""
    values: list[Any] = field(default_factory=list)
    """The candidates of a 'choice' (non-empty for that kind)."""


@dataclass
class SearchConfig:
    """The trials of a sweep. Keys are the dotted config keys of the pretraining YAML (`loss.w_rotation`,
    `data.subset`); a `finetune.` prefix targets the fine-tuning config instead (`finetune.optim.lr`)."""

    grid: dict[str, list[Any]] = field(default_factory=dict)
    """Every combination is a trial (nested YAML or dotted keys)."""
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Named settings, each a set of values taken together (nested YAML or dotted keys), e.g. a pretext family with
    its weights: `simmim: {loss.w_rotation: 0, loss.w_contrastive: 0, loss.w_inpainting: 0, loss.w_simmim: 1}`.
    Each is crossed with the grid; its trials are named after it (`simmim n=760`). A key may not be both here and
    in the grid."""
    sample: dict[str, SampleSpec] = field(default_factory=dict)
    """Random search: each of `num_samples` draws per grid point samples these keys (seeded, so reproducible)."""
    num_samples: int = 1
    """Random draws per grid point (only used with `sample`); >= 1."""
    seed: int = 0
    """Seed of the random search draws (the same seed gives the same trials); >= 0."""


@dataclass
class SchedulerConfig:
    """Optional ASHA early stopping of pretraining, on `metric` measured in samples seen (not iterations: subsets
    of different sizes run different numbers of epochs). Stopped trials are not fine-tuned (MLflow: KILLED)."""

    asha: bool = False
    """Stop weak pretraining trials early with ASHA; False runs every trial to the end."""
    metric: str = "loss"
    """Pretraining metric ASHA ranks trials by (a key the loop reports: 'loss', 'loss_<task>', or the probe's
    'probe/dice_mean' / 'probe/dice/<class>', which need the pretraining's probe.every > 0)."""
    mode: Literal["auto", "min", "max"] = "auto"
    """Whether a higher or lower `metric` is better: 'min', 'max', or 'auto' (max for a Dice metric, a name
    containing 'dice'; min otherwise)."""
    grace_samples: int = 64
    """Samples seen before a trial can be stopped; >= 1."""
    max_samples: int = 0
    """0: the samples a full pretraining sees (steps x batch x workers x accumulation)."""
    reduction_factor: int = 2
    """ASHA keeps 1/reduction_factor of the trials at each rung; >= 2."""


@dataclass
class SweepDataConfig:
    """The prepared data every trial uses."""

    root: str = ""
    """Output folder of `swinssl prepare`; used by both the pretraining and the fine-tuning of every trial."""


@dataclass
class SweepConfig:
    """`swinssl sweep`: a Ray Tune study; each trial pretrains (TorchTrainer) then fine-tunes with CV."""

    name: str = "sweep"
    """Sweep name: MLflow run name of the sweep run and Ray Tune's experiment name."""
    study: str = ""
    """MLflow `study` tag of the sweep and all its runs (the filter for the compare view); default: name."""
    output_dir: str = ""
    """Sweep folder: trial list, Tune state, one folder per trial, the report."""
    data: SweepDataConfig = field(default_factory=SweepDataConfig)
    """The prepared data of both stages."""
    pretrain: str = "pretrain.yaml"
    """Pretraining YAML (relative to this file) every trial starts from."""
    finetune: str = "finetune.yaml"
    """Fine-tuning YAML (relative to this file) every trial (and the scratch baseline) fine-tunes with."""
    pretrain_overrides: dict[str, Any] = field(default_factory=dict)
    """Applied to every trial's pretraining config before its search values (e.g. trainer.steps)."""
    finetune_overrides: dict[str, Any] = field(default_factory=dict)
    """Applied to every trial's fine-tuning config before its search values (e.g. trainer.steps)."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """The grid and random search that define the trials."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Each trial runs once per seed (trainer.seed of both stages; folds stay fixed): the report shows spread."""
    scratch_baseline: bool = True
    """Add one fine-tune-from-scratch trial per seed: the baseline every gain is measured against."""
    max_concurrent_trials: int = 0
    """0: as many as the cluster's CPUs/GPUs hold (each trial: its Train workers + data tasks)."""
    max_failures: int = 1
    """Tune retries of a failing trial before it is recorded as FAILED (the other trials go on)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Optional early stopping of pretraining trials."""
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="swinssl-sweep"))
    """MLflow logging of the sweep run (the trials log under it)."""
