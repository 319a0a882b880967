"""Typed experiment configs: dataclasses with docstrings, loaded from YAML plus dotted `key=value` overrides.

`load_config(path, overrides, PretrainConfig)` merges, in order: the dataclass defaults, the YAML file (which may
name a `base:` YAML to start from, so experiments are small diffs of a full default), then the overrides. Unknown
keys and wrong types are errors that name the key and list the valid ones. `save_config` writes the resolved
config next to every run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

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

    cohort: str = "unlabeled"
    """Cohort of the manifest to pretrain on ('unlabeled', 'labeled' or 'all')."""
    subset: str = "all"
    """'all', or N: the first N studies of the cohort in curation order (450 and 760 are the same code path)."""
    min_foreground: float = 0.05
    """A crop must have at least this share of voxels inside the body (CT channel > body threshold)."""


@dataclass
class ModelConfig:
    """SwinUNETR's Swin encoder (MONAI SwinTransformer) on 2-channel CT/PET input."""

    feature_size: int = 48
    """Embedding width of the first stage; multiple of 12 (bottleneck = 16 x feature_size)."""
    in_channels: int = 2
    drop_path_rate: float = 0.0
    use_checkpoint: bool = False
    """Activation checkpointing in the Swin blocks: less memory, ~30% more compute."""
    contrastive_dim: int = 512


@dataclass
class LossConfig:
    """Weights of the three pretext losses (0 skips that task's compute entirely) and their options."""

    w_rotation: float = 1.0
    w_contrastive: float = 1.0
    w_inpainting: float = 1.0
    temperature: float = 0.5
    gather_contrastive: bool = True
    """Gather embeddings from all workers so contrastive negatives grow with the cluster."""
    inpaint_holes_only: bool = False
    """L1 over the cut-out holes only (reference: the whole volume)."""


@dataclass
class PretextConfig:
    """Augmentations that make the pretext targets."""

    rotation_dims: list[int] = field(default_factory=lambda: [-2, -1])
    """Plane of the quarter turns (default: the axial plane of a (Z, Y, X) crop)."""
    cutout_min_side: float = 0.05
    cutout_max_side: float = 0.25
    cutout_max_drop: float = 0.3
    cutout_cross_sample: float = 0.3
    """Probability that a hole is filled with the same region of another sample instead of noise."""
    cutout_max_boxes: int = 100
    """Box draws per sample; ~100 boxes of 5-25 % sides are needed to reach the ~30 % drop of the reference."""


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay."""

    lr: float = 4e-4
    weight_decay: float = 0.1
    warmup_steps: int = 500
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables."""


@dataclass
class TrainerConfig:
    """Ray Train settings and the loop's schedule."""

    steps: int = 100_000
    """Optimizer steps (not epochs: unlabelled sets of different sizes train for the same number of updates)."""
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources each Train worker asks for, e.g. {train_node: 1} to place one worker per node."""
    amp: str = "bf16"
    """'bf16', 'fp16' or 'none'; only used on GPU."""
    grad_accum: int = 1
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    max_failures: int = 3
    """Worker-group restarts Ray Train attempts, each resuming from the last checkpoint."""
    log_every: int = 10
    seed: int = 0


@dataclass
class TrackingConfig:
    """MLflow. An empty tracking_uri means MLFLOW_TRACKING_URI, else sqlite:///<abs output_dir>/../mlflow.db."""

    enabled: bool = True
    tracking_uri: str = ""
    experiment: str = "swinssl-pretrain"
    run_name: str = ""


@dataclass
class PretrainConfig:
    """`swinssl pretrain`: everything that defines a pretraining run."""

    name: str = "pretrain"
    output_dir: str = ""
    """Run folder (absolute or relative to the cwd of the driver): config, checkpoints, encoder.pt."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    pretext: PretextConfig = field(default_factory=PretextConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class FinetuneDataConfig(CropStreamConfig):
    """Labelled studies for fine-tuning (the `labeled` cohort of data.root) and their training crops."""

    crops_per_study: int = 4
    class_balanced: bool = True
    """Centre crops on a uniformly chosen class present in the study, so small organs and lesions are seen."""


@dataclass
class SegModelConfig:
    """MONAI SwinUNETR(in_channels=2, out_channels=12)."""

    feature_size: int = 48
    in_channels: int = 2
    out_channels: int = 12
    drop_path_rate: float = 0.0
    use_checkpoint: bool = False


@dataclass
class CVConfig:
    """K-fold cross-validation over the labelled studies (stratified by lesion presence, see eval/folds.py)."""

    folds: int = 5
    fold: int = -1
    """One fold index (0..folds-1) or -1 for all folds."""
    seed: int = 0


@dataclass
class EvalConfig:
    """Sliding-window inference over each validation study."""

    sw_batch_size: int = 4
    overlap: float = 0.25
    mode: str = "gaussian"
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
    output_dir: str = ""
    encoder: str = ""
    """Path to an `encoder.pt`, an MLflow run id holding one, or '' for training from scratch."""
    freeze_encoder_steps: int = 0
    """Keep the pretrained encoder fixed (lr 0) for this many steps while the decoder adapts."""
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=1e-5, warmup_steps=100))
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="swinssl-finetune"))


@dataclass
class SampleSpec:
    """One randomly searched key: `uniform`/`loguniform` over [low, high], or `choice` among `values`."""

    kind: str = "uniform"
    low: float = 0.0
    high: float = 1.0
    values: list[Any] = field(default_factory=list)


@dataclass
class SearchConfig:
    """The trials of a sweep. Keys are the dotted config keys of the pretraining YAML (`loss.w_rotation`,
    `data.subset`); a `finetune.` prefix targets the fine-tuning config instead (`finetune.optim.lr`)."""

    grid: dict[str, list[Any]] = field(default_factory=dict)
    """Every combination is a trial (nested YAML or dotted keys)."""
    sample: dict[str, SampleSpec] = field(default_factory=dict)
    """Random search: each of `num_samples` draws per grid point samples these keys (seeded, so reproducible)."""
    num_samples: int = 1
    seed: int = 0


@dataclass
class SchedulerConfig:
    """Optional ASHA early stopping of pretraining, on `metric` measured in samples seen (not iterations: subsets
    of different sizes run different numbers of epochs). Stopped trials are not fine-tuned (MLflow: KILLED)."""

    asha: bool = False
    metric: str = "loss"
    grace_samples: int = 64
    max_samples: int = 0
    """0: the samples a full pretraining sees (steps x batch x workers x accumulation)."""
    reduction_factor: int = 2


@dataclass
class SweepDataConfig:
    root: str = ""
    """Output folder of `swinssl prepare`; used by both the pretraining and the fine-tuning of every trial."""


@dataclass
class SweepConfig:
    """`swinssl sweep`: a Ray Tune study; each trial pretrains (TorchTrainer) then fine-tunes with CV."""

    name: str = "sweep"
    study: str = ""
    """MLflow `study` tag of the sweep and all its runs (the filter for the compare view); default: name."""
    output_dir: str = ""
    data: SweepDataConfig = field(default_factory=SweepDataConfig)
    pretrain: str = "pretrain.yaml"
    """Pretraining YAML (relative to this file) every trial starts from."""
    finetune: str = "finetune.yaml"
    pretrain_overrides: dict[str, Any] = field(default_factory=dict)
    """Applied to every trial's pretraining config before its search values (e.g. trainer.steps)."""
    finetune_overrides: dict[str, Any] = field(default_factory=dict)
    search: SearchConfig = field(default_factory=SearchConfig)
    seeds: list[int] = field(default_factory=lambda: [0])
    """Each trial runs once per seed (trainer.seed of both stages; folds stay fixed): the report shows spread."""
    scratch_baseline: bool = True
    """Add one fine-tune-from-scratch trial per seed: the baseline every gain is measured against."""
    max_concurrent_trials: int = 0
    """0: as many as the cluster's CPUs/GPUs hold (each trial: its Train workers + data tasks)."""
    max_failures: int = 1
    """Tune retries of a failing trial before it is recorded as FAILED (the other trials go on)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="swinssl-sweep"))


class ConfigError(ValueError):
    """A config file, override or value that does not fit the schema; `problems` lists every one found."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems else [message]


def validate(cfg: Any, extra: list[str] | tuple[str, ...] = ()) -> None:
    """One validation pass over a resolved config: collect every problem (enumerations, ranges, cross-field rules)
    plus the caller's `extra` problems (e.g. data-dependent ones found by a driver), then raise one ConfigError
    listing them all. Returns None when there is nothing to report."""
    problems = list(extra)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems), problems)


def _valid_keys(schema: type, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(schema):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys += _valid_keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    """YAML with an optional `base:` (path relative to this file) merged underneath."""
    if path in seen:
        raise ConfigError(f"{path}: circular base chain {[str(p) for p in seen]}")
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    node = OmegaConf.load(path)
    base = node.pop("base", None)
    if base:
        return OmegaConf.merge(_read_yaml((path.parent / base).resolve(), (*seen, path)), node)
    return node


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), schema: type[T] = PretrainConfig
                ) -> T:
    """Defaults <- YAML (with base) <- `key=value` overrides, validated against `schema`."""
    merged = OmegaConf.structured(schema)
    try:
        if path:
            merged = OmegaConf.merge(merged, _read_yaml(Path(path).resolve()))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must be key=value, got {bad}")
        # `key=` means the empty string (e.g. encoder= for scratch), not YAML's null
        dotlist = [f"{o}''" if o.endswith("=") else o for o in overrides]
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(dotlist))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        raise ConfigError(f"{'config key ' + repr(key) + ': ' if key else ''}{str(exc).splitlines()[0]}\n"
                          f"valid keys: {', '.join(_valid_keys(schema))}") from None


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
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), data))  # type: ignore[return-value]
