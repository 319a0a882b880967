"""Driver side of `swinssl pretrain`: validate everything before a worker starts, open the MLflow run, launch the
TorchTrainer on the Ray Data crop stream, then turn the final checkpoint into `encoder.pt`.

Outputs under `output_dir`: `config.yaml` (resolved), `ray/<name>/checkpoint_*` (Ray Train storage: re-running
with the same output_dir resumes), `encoder.pt` (MONAI `load_from` + BTCV layouts), `mlflow_run.json`, `result.json`,
and with `probe.every` > 0 `probe/` (see train.probe); `export: best_probe` makes encoder.pt from the best probe's
weights instead of the last checkpoint's. With `init_from` the encoder starts from that file's weights (checked
here, before Ray; a resumed run keeps its checkpoint's)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..config import ConfigError, PretrainConfig, flatten, save_config, validate
from ..data.studies import DataError, check_roi_fits, select_studies
from ..models.ssl_head import CLASSIC_HEADS
from ..tasks import registry
from ..tasks.pretrain import PretrainTask
from .checkpoint import latest_checkpoint_dir, load_meta, load_state, signature_differences


@dataclass
class PretrainResult:
    output_dir: Path
    encoder: Path
    metrics: dict
    run_id: str | None
    tracking_uri: str | None
    num_studies: int = 0
    """Unlabelled studies pretrained on (the resolved `data.subset`)."""


def model_signature(cfg: PretrainConfig) -> dict:
    """What a checkpoint must match to be resumed: the encoder's shape and variant (V1/V2) and the active heads, in
    build order (the model holds a head only for an active pretext task, so another head set cannot load its
    weights)."""
    return {"feature_size": cfg.model.feature_size, "in_channels": cfg.model.in_channels,
            "use_v2": cfg.model.use_v2, "contrastive_dim": cfg.model.contrastive_dim,
            "heads": [t.name for t in registry.active(cfg)]}


def check_resumable(cfg: PretrainConfig, output_dir: Path) -> Path | None:
    """The checkpoint to resume from (None: a fresh run); ConfigError when it was trained with another model.

    A checkpoint written before the head set was recorded has no "heads": such a model always held the three classic
    heads (whatever their weights), and it loads into a model with exactly those heads (their keys are renamed on
    load, in the same order, so the optimizer state lines up too); any other head set is refused. One written before
    `use_v2` was recorded holds a V1 encoder.
    """
    latest = latest_checkpoint_dir(output_dir / "ray" / cfg.name)
    if latest is None:
        return None
    meta, wanted = load_meta(latest), model_signature(cfg)
    differences = signature_differences(meta, wanted, {"heads": list(CLASSIC_HEADS), "use_v2": False})
    if differences:
        differ = ", ".join(f"{k}: checkpoint {saved} vs config {want}" for k, (saved, want) in differences.items())
        raise ConfigError(f"{latest} was trained with another model ({differ}); its weights cannot be resumed with "
                          f"this config: use another output_dir (or name) to start a new run, or the checkpoint's "
                          f"settings to resume it")
    return latest


def _as_problem(key: str, exc: Exception) -> str:
    message = str(exc)
    return f"{key}: {message[len(key):].lstrip('= ') if message.startswith(key) else message}"


def _data_problems(cfg: PretrainConfig, known: set[str]) -> tuple[list, list[str]]:
    """(studies, problems): what the prepared data says about this config, as "key: problem" strings; keys already
    found invalid by the config rules (`known`) are not looked up again."""
    if not cfg.data.root or known & {"data.root", "data.subset", "data.cohort"}:
        return [], []
    try:
        studies = select_studies(cfg.data.root, cfg.data.cohort, cfg.data.subset)
    except DataError as exc:
        key = next((k for k in ("subset", "cohort") if k in str(exc)), "root")
        return [], [_as_problem(f"data.{key}", exc)]
    if "data.roi" in known:
        return studies, []
    try:
        check_roi_fits(studies, cfg.data.roi)
    except DataError as exc:
        return studies, [_as_problem("data.roi", exc)]
    return studies, []


def _init_problems(cfg: PretrainConfig) -> list[str]:
    """init_from must name a readable file (checked on the driver: the workers read it)."""
    if not cfg.init_from or Path(cfg.init_from).is_file():
        return []
    return [f"init_from: {cfg.init_from} not found (a checkpoint file: an encoder.pt, a BTCV swinViT.* checkpoint or "
            f"the published MONAI model_swinvit.pt; '' starts from random weights)"]


def _check_init(task: PretrainTask) -> None:
    """Load init_from into a throwaway model now, so a file that does not fit (channels, feature size, variant) is a
    config problem before Ray starts; sets `task.init_rule` for the run's parameters."""
    if not task.cfg.init_from:
        return
    try:
        task.build_model()
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"init_from: {exc}") from None


def _validate(cfg: PretrainConfig) -> tuple[PretrainTask, list, Path]:
    """Every config and data problem at once (one ConfigError), before Ray starts."""
    required = [f"{key}: required ({hint})" for key, hint in (
        ("output_dir", "e.g. output_dir=runs/pretrain"), ("data.root", "the output folder of `swinssl prepare`"))
        if not (cfg.output_dir if key == "output_dir" else cfg.data.root)]
    try:
        validate(cfg)
        static = []
    except ConfigError as exc:
        static = exc.problems
    known = {p.split(":")[0] for p in static}
    studies, found = _data_problems(cfg, known)
    from .probe import probe_problems

    checked = not any(key == "data.root" or key.startswith("probe.") for key in known)
    validate(cfg, extra=required + found + (probe_problems(cfg) if checked else []) + _init_problems(cfg))
    task = PretrainTask(cfg)
    _check_init(task)
    return task, studies, Path(cfg.output_dir).resolve()


def scaling_config(cfg):
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=cfg.trainer.num_workers, use_gpu=cfg.trainer.use_gpu,
                         resources_per_worker={"CPU": cfg.trainer.cpus_per_worker,
                                               **({"GPU": 1} if cfg.trainer.use_gpu else {}),
                                               **cfg.trainer.resources_per_worker})


def build_trainer(cfg: PretrainConfig, task: PretrainTask, studies: list, output_dir: Path, tracking: dict | None,
                  callbacks: list | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from ..data.pipeline import crop_dataset
    from .worker import train_worker

    stream = crop_dataset([s.shard for s in studies], tuple(cfg.data.roi), cfg.data.crops_per_study,
                          cfg.trainer.seed, cfg.data.min_foreground, cfg.data.read_cpus,
                          cfg.data.min_crops_per_epoch, reproducible=cfg.trainer.deterministic)
    datasets, reproducible = trainer_data(stream)
    return TorchTrainer(
        train_worker,
        train_loop_config={"kind": "pretrain", "cfg": asdict(cfg), "tracking": tracking, "meta": model_signature(cfg),
                           **reproducible,
                           "chaos": chaos_config(cfg, output_dir),
                           # absolute: a worker's working directory is not the driver's
                           "probe": {"dir": str(output_dir / "probe"), "root": str(Path(cfg.data.root).resolve())}
                           if cfg.probe.every > 0 else None,
                           # the workers are other processes: a task registered only here must travel with the run
                           "pretext": registry.pack(task.tasks)},
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(name=cfg.name, storage_path=str(output_dir / "ray"),
                             failure_config=FailureConfig(max_failures=cfg.trainer.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.trainer.keep_checkpoints),
                             callbacks=callbacks or None),
        datasets=datasets,
    )


def trainer_data(stream: Any) -> tuple[dict, dict]:
    """(TorchTrainer `datasets`, extra train_loop_config): a Ray Dataset is split across the workers by Ray Train; a
    reproducible stream (trainer.deterministic) travels in the loop config and each worker reads its own part."""
    from ..data.reproducible import ReproducibleStream

    if isinstance(stream, ReproducibleStream):
        return {}, {"reproducible": stream}
    return {"train": stream}, {}


def chaos_config(cfg, output_dir: Path) -> dict | None:
    """Fault injection from SWINSSL_CHAOS_KILL_STEP (see worker.CHAOS_ENV); fires once per output_dir."""
    from .worker import CHAOS_ENV

    step = int(os.environ.get(CHAOS_ENV, "0") or 0)
    if not step:
        return None
    return {"kill_step": step, "rank": cfg.trainer.num_workers - 1, "marker": str(output_dir / ".chaos_fired")}


def _open_tracking(cfg: PretrainConfig, output_dir: Path, studies: list, parent_run_id: str | None,
                   init_rule: str = "") -> dict | None:
    if not cfg.tracking.enabled:
        return None
    from ..tracking.mlflow_run import log_artifact, open_run, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking, output_dir)
    params = {**flatten(cfg), "data.num_studies": len(studies),
              **({"init_from.patch_embedding": init_rule} if init_rule else {})}
    run_id = open_run(uri, cfg.tracking.experiment, cfg.tracking.run_name or cfg.name, output_dir, params,
                      tags={"swinssl.kind": "pretrain"},
                      parent_run_id=parent_run_id or os.environ.get("SWINSSL_PARENT_RUN_ID"))
    log_artifact(uri, run_id, output_dir / "config.yaml")
    return {"uri": uri, "run_id": run_id}


def export_encoder(cfg: PretrainConfig, task: PretrainTask, checkpoint_dir: str | Path, path: Path) -> Path:
    from ..models.encoder_io import save_encoder

    state = load_state(checkpoint_dir)
    model = task.build_model(init=False)  # every weight comes from the checkpoint
    model.load_state_dict(state["model"])
    return save_encoder(model, path, extra={"step": int(state["loop"]["step"]), "source": "swinssl.pretrain",
                                            "roi": list(cfg.data.roi), "export": cfg.export})


def export_source(cfg: PretrainConfig, output_dir: Path, last: str | Path) -> Path:
    """The checkpoint `encoder.pt` is made from: `last`, or with export=best_probe the best probe's weights."""
    if cfg.export == "best_probe":
        from .probe import best_checkpoint

        return best_checkpoint(output_dir)
    return Path(last)


def _fit(cfg: PretrainConfig, task: PretrainTask, studies: list, output_dir: Path, tracking: dict | None,
         callbacks: list | None):
    from petct.raylocal import ensure_ray

    # workers + their data tasks + Train's controller: on a small machine ask for enough logical CPUs
    ensure_ray(min_cpus=cfg.trainer.num_workers * cfg.trainer.cpus_per_worker + 2 * cfg.data.read_cpus)
    try:
        result = build_trainer(cfg, task, studies, output_dir, tracking, callbacks).fit()
    except Exception:
        if tracking:
            from ..tracking.mlflow_run import finish_run

            finish_run(tracking["uri"], tracking["run_id"], "FAILED")
        raise
    with result.checkpoint.as_directory() as directory:
        encoder = export_encoder(cfg, task, export_source(cfg, output_dir, directory), output_dir / "encoder.pt")
    return encoder, {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}


def pretrain(cfg: PretrainConfig, parent_run_id: str | None = None, callbacks: list | None = None) -> PretrainResult:
    """Run (or resume) a pretraining run end to end; see the module docstring for the outputs.

    `parent_run_id`: nest the MLflow run (else SWINSSL_PARENT_RUN_ID); `callbacks`: Ray Train UserCallbacks (a
    sweep trial passes Tune's TuneReportCallback so rank 0's metrics reach the scheduler)."""
    if cfg.init_from:  # the workers' working directory is not the driver's
        cfg = replace(cfg, init_from=str(Path(cfg.init_from).resolve()))
    task, studies, output_dir = _validate(cfg)
    latest = check_resumable(cfg, output_dir)
    save_config(cfg, output_dir / "config.yaml")
    tracking = _open_tracking(cfg, output_dir, studies, parent_run_id, task.init_rule)
    if latest is not None and load_meta(latest).get("step", 0) >= cfg.trainer.steps:
        # a rerun of a finished command: nothing to launch, re-export from the last checkpoint
        encoder = export_encoder(cfg, task, export_source(cfg, output_dir, latest), output_dir / "encoder.pt")
        previous = output_dir / "result.json"
        metrics = json.loads(previous.read_text())["metrics"] if previous.exists() else {}
    else:
        encoder, metrics = _fit(cfg, task, studies, output_dir, tracking, callbacks)
    (output_dir / "result.json").write_text(json.dumps({"metrics": metrics, "encoder": str(encoder)}, indent=1))
    if tracking:
        from ..tracking.mlflow_run import finish_run, log_artifact

        log_artifact(tracking["uri"], tracking["run_id"], encoder)
        finish_run(tracking["uri"], tracking["run_id"])
    return PretrainResult(output_dir, encoder, metrics, tracking and tracking["run_id"], tracking and tracking["uri"],
                          len(studies))
