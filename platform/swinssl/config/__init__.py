"""Typed experiment configs: dataclasses with docstrings, loaded from YAML plus dotted `key=value` overrides.

`load_config(path, overrides, PretrainConfig)` merges, in order: the dataclass defaults, the YAML file (which may
name a `base:` YAML to start from, so experiments are small diffs of a full default), then the overrides. Unknown
keys and wrong types are errors that name the key and list the valid ones. `save_config` writes the resolved
config next to every run.

`validate(cfg)` (run by `load_config` and `from_dict`, and by the drivers with their data-dependent problems as
`extra`) checks meaning in one pass and raises one `ConfigError` whose `problems` lists every finding as
"dotted.key: problem (got X; valid: ...)": `Literal` enumerations (read generically from the annotations), ranges
(the rule table `_rules`), cross-field rules (`_cross_rules`: roi vs fine-tuning, cv.fold vs cv.folds, cutout
sides, sweep search keys against the stage schemas) and rules other layers register
(`register_rules`: the pretext tasks' own rules, registered by `swinssl.tasks.registry`).

Modules: `stages` (pretraining and fine-tuning dataclasses), `sweep` (the sweep dataclass), `keys` (ConfigError,
dotted names), `rules` (validation), `loading` (YAML, overrides, `from_dict`, `save_config`). Import from here.
"""

from .keys import ConfigError, flatten
from .loading import from_dict, load_config, save_config
from .rules import register_rules, validate
from .stages import (
    CropStreamConfig,
    CVConfig,
    DataConfig,
    EvalConfig,
    FinetuneConfig,
    FinetuneDataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PretextConfig,
    PretrainConfig,
    SegModelConfig,
    TrackingConfig,
    TrainerConfig,
)
from .sweep import SampleSpec, SchedulerConfig, SearchConfig, SweepConfig, SweepDataConfig

__all__ = [
    "CVConfig", "ConfigError", "CropStreamConfig", "DataConfig", "EvalConfig", "FinetuneConfig", "FinetuneDataConfig",
    "LossConfig", "ModelConfig", "OptimConfig", "PretextConfig", "PretrainConfig", "SampleSpec", "SchedulerConfig",
    "SearchConfig", "SegModelConfig", "SweepConfig", "SweepDataConfig", "TrackingConfig", "TrainerConfig", "flatten",
    "from_dict", "load_config", "register_rules", "save_config", "validate",
]
