"""Typed experiment configs: dataclasses with docstrings, loaded from YAML plus dotted `key=value` overrides.

`load_config(path, overrides, PretrainConfig)` merges, in order: the dataclass defaults, the YAML file (which may
name a `base:` YAML to start from, so experiments are small diffs of a full default), then the overrides. Unknown
keys and wrong types are errors that name the key and list the valid ones. `save_config` writes the resolved
config next to every run.

`validate(cfg)` (run by `load_config` and `from_dict`, and by the drivers with their data-dependent problems as
`extra`) checks meaning in one pass and raises one `ConfigError` whose `problems` lists every finding as
"dotted.key: problem (got X; valid: ...)": `Literal` enumerations (read generically from the annotations), ranges
(the rule table `_rules`), cross-field rules (`_cross_rules`: roi vs fine-tuning, cv.fold vs cv.folds, cutout
sides, sweep search keys against the stage schemas) and the pretext tasks' own rules (tasks.registry).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")


@dataclass
class CropStreamConfig:
    """Where prepared studies come from and how the Ray Data stream cuts crops from them (shared by all runs)."""

    root: str = ""
    """Output folder of `swinssl prepare` (holds manifest.jsonl and shards/)."""
    roi: list[int] = field(default_factory=lambda: [96, 96, 96])
    """Crop size (Z, Y, X) in PET voxels; every side must be divisible by 32."""
    crops_per_study: int = 2
    """Random crops cut from one decoded volume (decoding is the expensive part: reuse it)."""
    batch_size: int = 2
    """Crops per worker per step."""
    shuffle_buffer: int = 8
    """Local shuffle buffer in crops (mixes crops of several studies without a global shuffle)."""
    read_cpus: float = 1.0
    """CPUs per crop task in the Ray Data pipeline."""
    min_crops_per_epoch: int = 256
    """A pass over the data lists each shard often enough to yield at least this many crops: a small cohort would
    otherwise restart the Ray Data pipeline (seconds) every few steps."""


@dataclass
class DataConfig(CropStreamConfig):
    """Which prepared studies feed pretraining (each crop gives two augmented views)."""

    cohort: Literal["unlabeled", "labeled", "all"] = "unlabeled"
    """Cohort of the manifest to pretrain on ('unlabeled', 'labeled' or 'all')."""
    subset: str = "all"
    """'all', or N: the first N studies of the cohort in curation order (450 and 760 are the same code path)."""
    min_foreground: float = 0.05
    """A crop must have at least this share of voxels inside the body (CT channel > body threshold)."""


@dataclass
class ModelConfig:
    """SwinUNETR's Swin encoder (MONAI SwinTransformer) on 2-channel CT/PET input, plus the pretext heads."""

    feature_size: int = 48
    """Embedding width of the first stage; multiple of 12 (bottleneck = 16 x feature_size)."""
    in_channels: int = 2
    """Input modalities stacked as channels (2: CT and PET); the inpainting head reconstructs all of them."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate of the Swin blocks, in [0, 1] (SwinUNETR's dropout_path_rate)."""
    use_checkpoint: bool = False
    """Activation checkpointing in the Swin blocks: less memory, ~30% more compute."""
    contrastive_dim: int = 512
    """Output width of the contrastive projection head (a linear layer on the pooled bottleneck)."""


@dataclass
class LossConfig:
    """Weights of the pretext tasks (0 removes that task's head and compute) and their options. One weight per task
    of swinssl.tasks.registry: `w_<task>` for the built-in ones, `extra.w_<task>` for tasks registered outside."""

    w_rotation: float = 1.0
    """Weight of the rotation task (4-way classification of the quarter turns of each view; metric loss_rotation)."""
    w_contrastive: float = 1.0
    """Weight of the contrastive task (NT-Xent between the two views of each crop; metric loss_contrastive). 0 also
    skips the second view, halving the compute."""
    w_inpainting: float = 1.0
    """Weight of the inpainting task (L1 reconstruction of the uncut crop; metric loss_inpainting)."""
    temperature: float = 0.5
    """NT-Xent softmax temperature (> 0; 0.5 in SimCLR's and the SwinUNETR pretraining recipe)."""
    gather_contrastive: bool = True
    """Gather embeddings from all workers so contrastive negatives grow with the cluster."""
    inpaint_holes_only: bool = False
    """L1 over the cut-out holes only (reference: the whole volume)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Weights and options of pretext tasks registered from outside swinssl (a plugin, a test): `w_<task>` (default
    0: off) and `<task>_<option>`, e.g. `loss.extra.w_toy=1.0`. Keys no registered task reads are config errors."""


@dataclass
class PretextConfig:
    """Augmentations that make the pretext targets."""

    rotation_dims: list[int] = field(default_factory=lambda: [-2, -1])
    """Plane of the quarter turns: two different dims of the (Z, Y, X) crop (-3..2; default the axial plane). The
    crop sides in that plane must be equal while loss.w_rotation > 0."""
    cutout_min_side: float = 0.05
    """Smallest side of a cut-out box, as a fraction of the crop side, in (0, 1]."""
    cutout_max_side: float = 0.25
    """Largest side of a cut-out box, as a fraction of the crop side, in [cutout_min_side, 1]."""
    cutout_max_drop: float = 0.3
    """A view keeps receiving boxes while less than this fraction of its voxels is dropped (at most
    cutout_max_boxes rounds), so the dropped fraction ends below it plus one box."""
    cutout_cross_sample: float = 0.3
    """Probability that a hole is filled with the same region of another sample instead of noise."""
    cutout_max_boxes: int = 100
    """Box draws per sample; ~100 boxes of 5-25 % sides are needed to reach the ~30 % drop of the reference."""


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay."""

    lr: float = 4e-4
    """Peak learning rate (reached at the end of warm-up); > 0."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay; >= 0."""
    warmup_steps: int = 500
    """Steps of linear warm-up from lr / warmup_steps to lr; 0 starts at lr. A value >= trainer.steps is allowed
    (short smoke runs): the schedule then never leaves warm-up."""
    min_lr_ratio: float = 0.0
    """The cosine decays to min_lr_ratio x lr at the last step; in [0, 1]."""
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables."""


@dataclass
class TrainerConfig:
    """Ray Train settings and the loop's schedule."""

    steps: int = 100_000
    """Optimizer steps (not epochs: unlabelled sets of different sizes train for the same number of updates)."""
    num_workers: int = 1
    """Ray Train workers (data-parallel DDP ranks); >= 1."""
    use_gpu: bool = False
    """One GPU per worker (NCCL); False trains on CPU (gloo)."""
    cpus_per_worker: float = 1.0
    """Logical CPUs each Train worker reserves; > 0."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources each Train worker asks for, e.g. {train_node: 1} to place one worker per node."""
    amp: Literal["bf16", "fp16", "none"] = "bf16"
    """'bf16', 'fp16' or 'none'; only used on GPU."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (the effective batch is batch_size x num_workers x this)."""
    checkpoint_every: int = 1000
    """Steps between checkpoints (and the last step always); >= 1."""
    keep_checkpoints: int = 2
    """Newest checkpoints Ray Train keeps on disk; >= 1."""
    max_failures: int = 3
    """Worker-group restarts Ray Train attempts, each resuming from the last checkpoint."""
    log_every: int = 10
    """Steps between metric reports (MLflow and Ray Train); >= 1."""
    seed: int = 0
    """Seed of model init, crops and augmentations (same seed, same run); >= 0."""


@dataclass
class TrackingConfig:
    """MLflow. An empty tracking_uri means MLFLOW_TRACKING_URI, else sqlite:///<abs output_dir>/../mlflow.db."""

    enabled: bool = True
    """Log params, metrics and artifacts to MLflow; False runs without tracking."""
    tracking_uri: str = ""
    """MLflow tracking URI (e.g. sqlite:///mlflow.db or http://host:5000); '' for the default above."""
    experiment: str = "swinssl-pretrain"
    """MLflow experiment the run is logged under; must not be empty when tracking is enabled."""
    run_name: str = ""
    """MLflow run name; '' uses the config's `name`."""


@dataclass
class PretrainConfig:
    """`swinssl pretrain`: everything that defines a pretraining run."""

    name: str = "pretrain"
    """Run name: Ray Train's experiment folder under output_dir/ray and the default MLflow run name."""
    output_dir: str = ""
    """Run folder (absolute or relative to the cwd of the driver): config, checkpoints, encoder.pt."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prepared studies and the crop stream."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The Swin encoder and its pretext heads."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Pretext loss weights and options."""
    pretext: PretextConfig = field(default_factory=PretextConfig)
    """Augmentations that make the pretext targets."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Ray Train workers and the loop's schedule."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow logging."""




@dataclass
class FinetuneDataConfig(CropStreamConfig):
    """Labelled studies for fine-tuning (the `labeled` cohort of data.root) and their training crops."""

    crops_per_study: int = 4
    """Random crops cut from one decoded labelled study."""
    class_balanced: bool = True
    """Centre crops on a uniformly chosen class present in the study, so small organs and lesions are seen."""


@dataclass
class SegModelConfig:
    """MONAI SwinUNETR(in_channels=2, out_channels=classes of the label set)."""

    feature_size: int = 48
    """Embedding width of the first Swin stage; multiple of 12 (must match a pretrained encoder's)."""
    in_channels: int = 2
    """Input modalities (CT, PET)."""
    out_channels: int = 0
    """Segmentation classes including background; 0: the number of classes of data.root's label set
    (labels.json, PSMA's 12 without one). The resolved value is written to the run's config.yaml; a non-zero value
    that differs from the label set is a config error."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate of the Swin blocks."""
    use_checkpoint: bool = False
    """Activation checkpointing in the Swin blocks: less memory, ~30% more compute."""


@dataclass
class CVConfig:
    """K-fold cross-validation over the labelled studies (stratified by lesion presence, see eval/folds.py)."""

    folds: int = 5
    """Number of folds k (>= 2, at most the number of labelled studies)."""
    fold: int = -1
    """One fold index (0..folds-1) or -1 for all folds."""
    seed: int = 0
    """Seed of the fold split (folds stay fixed when trainer.seed changes)."""


@dataclass
class EvalConfig:
    """Sliding-window inference over each validation study."""

    sw_batch_size: int = 4
    """Sliding windows per forward pass."""
    overlap: float = 0.25
    """Overlap fraction of neighbouring windows, as in MONAI's sliding_window_inference."""
    mode: Literal["gaussian", "constant"] = "gaussian"
    """Blending of overlapping windows: 'gaussian' down-weights window borders, 'constant' averages evenly."""
    metrics: list[str] = field(default_factory=lambda: ["dice", "lesion"])
    """Metric families computed per validation study (swinssl.eval.families): 'dice', 'lesion' (only when the label
    set has a lesion class), 'hd95' (per-class 95th-percentile Hausdorff distance in mm, MONAI; off by default). The
    fine-tuning driver checks the names against the registry (FAMILIES), so a new family needs no edit here."""
    crop_to_body: bool = True
    """Infer only inside the body's bounding box (the rest of a whole-body FOV is air): same Dice, less time."""
    overlays: int = 3
    """Studies per fold that get a PNG overlay."""
    cpus: float = 1.0
    """CPUs of the Ray task that evaluates one fold (it also takes one GPU when trainer.use_gpu)."""


@dataclass
class FinetuneConfig:
    """`swinssl finetune`: segmentation fine-tuning with cross-validation, from scratch or a pretrained encoder."""

    name: str = "finetune"
    """Run name: Ray Train's experiment folders and the default MLflow run name."""
    output_dir: str = ""
    """Run folder: config, folds, checkpoints, predictions, overlays, metrics.json."""
    encoder: str = ""
    """Path to an `encoder.pt`, an MLflow run id holding one, or '' for training from scratch."""
    freeze_encoder_steps: int = 0
    """Keep the pretrained encoder fixed (lr 0) for this many steps while the decoder adapts."""
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    """Labelled studies and their training crops."""
    model: SegModelConfig = field(default_factory=SegModelConfig)
    """The segmentation network."""
    cv: CVConfig = field(default_factory=CVConfig)
    """Cross-validation folds."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=1e-5, warmup_steps=100))
    """Optimizer and learning-rate schedule."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Ray Train workers and the loop's schedule."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Inference and metrics on each fold's validation studies."""
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="swinssl-finetune"))
    """MLflow logging."""


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
    """Pretraining metric ASHA minimises (a key the loop reports, e.g. 'loss')."""
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


class ConfigError(ValueError):
    """A config file, override or value that does not fit the schema; `problems` lists every one found."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems else [message]


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


def _valid_keys(schema: type, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(schema):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys += _valid_keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _keys_near(schema: type, key: str) -> str:
    """The valid keys of `key`'s section (`loss.` for `loss.w_rot`), else all of them: short enough to read."""
    keys = _valid_keys(schema)
    section = key.rpartition(".")[0]
    near = [k for k in keys if section and k.startswith(section + ".")]
    return ", ".join(near or keys)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    """YAML with an optional `base:` (path relative to this file) merged underneath."""
    if path in seen:
        raise ConfigError(f"{path}: circular base chain {[str(p) for p in seen]}")
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of config keys, got a {type(node).__name__}")
    base = node.pop("base", None)
    if base:
        return OmegaConf.merge(_read_yaml((path.parent / base).resolve(), (*seen, path)), node)
    return node


def _omegaconf_problem(exc: OmegaConfBaseException, schema: type, where: str = "", raw: str | None = None) -> str:
    """`key: problem` from OmegaConf's error; an unknown key lists the valid keys of its section. For an override
    (`where`=its key, `raw` its value) of the wrong type: "key: must be of type int (got 'many')", as validate says
    it (OmegaConf's own text for anything deeper, e.g. one element of a list)."""
    key = getattr(exc, "full_key", None) or where
    text = str(exc).splitlines()[0]
    if isinstance(exc, ConfigKeyError):
        return f"{key}: unknown key: {text} (valid keys: {_keys_near(schema, key)})"
    hint = _hint_at(schema, key) if raw is not None and key == where else None
    if hint is not None:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        return _type_problem(key, hint, value) or f"{key}: {text}"
    return f"{key}: {text}" if key else text


def _hint_at(schema: type, key: str) -> Any:
    """The annotation of the dotted leaf `key` of `schema`, or None (not a leaf of nested dataclasses)."""
    hint: Any = schema
    for part in key.split("."):
        hint = get_type_hints(hint).get(part) if is_dataclass(hint) else None
        if hint is None:
            return None
    return None if is_dataclass(hint) else hint


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), schema: type[T] = PretrainConfig,
                check: bool = True) -> T:
    """Defaults <- YAML (with base) <- `key=value` overrides, checked against `schema` (keys and types) and then
    `validate`d; every problem found (each bad override, then every rule) comes in one ConfigError.

    `check=False` skips `validate` when keys and types are fine: for a caller that validates itself, with its
    data-dependent problems in the same error (the pretrain/finetune drivers), or a test of such a caller."""
    merged = OmegaConf.structured(schema)
    try:
        if path:
            merged = OmegaConf.merge(merged, _read_yaml(Path(path).resolve()))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {_omegaconf_problem(exc, schema)}") from None
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must be key=value, got {bad}")
    problems = []
    for override in overrides:  # one at a time, so that every bad override is reported, not only the first
        # `key=` means the empty string (e.g. encoder= for scratch), not YAML's null
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([f"{override}''" if override.endswith("=")
                                                                     else override]))
        except OmegaConfBaseException as exc:
            problems.append(_omegaconf_problem(exc, schema, *override.split("=", 1)))
        except yaml.YAMLError as exc:  # the value part is parsed as YAML: `data.roi=[33,` or `x={a:b:c}`
            problems.append(f"{override.partition('=')[0]}: the value is not valid YAML: "
                            f"{str(exc).splitlines()[0]} (got {override.partition('=')[2]!r})")
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:  # e.g. a mandatory value missing in the YAML
        _raise_problems([*problems, _omegaconf_problem(exc, schema)])
    # with check=False a key or type error still brings every other problem along: all of them in one error
    _raise_problems([*problems, *(_problems(cfg) if check or problems else [])])
    return cfg  # type: ignore[return-value]


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{'loss.w_rotation': 1.0, ...}: MLflow params and sweep keys use these dotted names."""
    out: dict[str, Any] = {}
    for key, value in (asdict(cfg) if is_dataclass(cfg) else cfg).items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically); it loads back with `load_config`."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    os.replace(tmp, path)
    return path


def from_dict(data: dict, schema: type[T] = PretrainConfig) -> T:
    """Rebuild a config from `dataclasses.asdict` output (e.g. inside Ray workers), validated like a YAML."""
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), data))
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_problem(exc, schema)) from None
    validate(cfg)
    return cfg  # type: ignore[return-value]


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
                      "contrastive_dim": _at_least(1)},
        LossConfig: {"w_rotation": _at_least(0), "w_contrastive": _at_least(0), "w_inpainting": _at_least(0),
                     "temperature": _POSITIVE},
        PretextConfig: {"rotation_dims": _AXES, "cutout_min_side": _FRACTION, "cutout_max_side": _FRACTION,
                        "cutout_max_drop": _UNIT, "cutout_cross_sample": _UNIT, "cutout_max_boxes": _at_least(1)},
        OptimConfig: {"lr": _POSITIVE, "weight_decay": _at_least(0), "warmup_steps": _at_least(0),
                      "min_lr_ratio": _UNIT, "grad_clip": _at_least(0)},
        TrainerConfig: {"steps": _at_least(1), "num_workers": _at_least(1), "cpus_per_worker": _POSITIVE,
                        "grad_accum": _at_least(1), "checkpoint_every": _at_least(1), "keep_checkpoints": _at_least(1),
                        "max_failures": _RETRIES, "log_every": _at_least(1), "seed": _SEED,
                        "resources_per_worker": _rule(lambda v: all(x >= 0 for x in v.values()), "must be >= 0")},
        PretrainConfig: {"name": _NOT_EMPTY},
        SegModelConfig: {"feature_size": _FEATURE_SIZE, "in_channels": _at_least(1), "drop_path_rate": _UNIT,
                         "out_channels": _rule(lambda v: v == 0 or v >= 2, "must be 0 (the label set's classes) or "
                                               ">= 2 (background and at least one class)")},
        CVConfig: {"folds": _at_least(2), "seed": _SEED},
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
        out += [p for cls in type(cfg).__mro__ for p in _cross_rules().get(cls, lambda _cfg, _prefix: [])(cfg, prefix)]
    return list(dict.fromkeys(out))  # the same problem found by two rules is listed once


def _well_typed(cfg: Any) -> bool:
    hints = get_type_hints(type(cfg))
    return all(_well_typed(v) if is_dataclass(v) else _type_ok(hints[f.name], v)
               for f in fields(cfg) for v in [getattr(cfg, f.name)])


@functools.cache
def _cross_rules() -> dict[type, Callable[[Any, str], list[str]]]:
    return {PretextConfig: _pretext_cross, CVConfig: _cv_cross, TrackingConfig: _tracking_cross,
            SampleSpec: _sample_cross, PretrainConfig: _pretrain_cross, FinetuneConfig: _finetune_cross,
            SweepConfig: _sweep_cross}


def _pretext_cross(cfg: PretextConfig, prefix: str) -> list[str]:
    if cfg.cutout_min_side <= cfg.cutout_max_side:
        return []
    return [_bad(f"{prefix}cutout_min_side", f"must be <= {prefix}cutout_max_side ({cfg.cutout_max_side})",
                 cfg.cutout_min_side)]


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


def _pretrain_cross(cfg: PretrainConfig, prefix: str) -> list[str]:
    """The pretext rules live with the tasks (weights, a task's own rules such as rotation's equal plane sides):
    one place per task, plugins included. Imported here, lazily, so that this module imports nothing of swinssl
    at import time."""
    import importlib

    registry = importlib.import_module(f"{__package__}.tasks.registry")
    return [prefix + problem for problem in registry.pretext_problems(cfg)]


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
