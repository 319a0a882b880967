"""Driver of `swinssl finetune`: K-fold cross-validation of SwinUNETR on the labelled studies, each fold trained
on Ray Train (same worker and loop as pretraining) and evaluated by a Ray task; results in metrics.json + MLflow.

Outputs under `output_dir`: `config.yaml` (resolved: `model.out_channels` is the label set's number of classes),
`labels.json` (the label set of data.root), `prepare_config.json` (a copy of data.root's), `folds.json` (the split),
`fold_<k>/metrics.json` (one fold: resume marker), `ray/fold_<k>/checkpoint_*`, `predictions/<study>.nii.gz` (PET
grid, as `swinssl export`), `overlays/`, `dice_per_class.png`, `metrics.json`: `labels`, `metric_families`, then
`{family: {key: value}}` per study (`studies`), per fold (`folds`) and mean/std across folds (`summary`); see
swinssl.eval.families. A finished run can be logged as an MLflow model (`model/`, see swinssl.deploy).

The class set is data: every stage reads it from `labels.json` of data.root (`petct.labels.read_label_set`; the
PSMA set when there is none). Folds are grouped by patient (the manifest's `patient_id`: no patient is in both
training and validation) and stratified on "has a lesion voxel" of the set's lesion class (from the manifest's
`label_voxels`, else the shard); a set without a lesion class gives a plain seeded patient-grouped k-fold.

Label efficiency (`cv.train_studies` = N > 0): each fold trains on `labelled_subset` of its training set (whole
patients, nested in N, seeded by `cv.seed` and the fold), validates on its unchanged fold; folds.json records
`train_studies` and `train` (fold index -> its training ids, for the folds run), the fold runs `n_train` (used)
and `n_train_available`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from petct.labels import LabelSet, LabelSetError, read_label_set, write_label_set
from petct.shards import atomic_write_json, read_shard_row

from ..config import ConfigError, CVConfig, FinetuneConfig, flatten, save_config, validate
from ..data.studies import DataError, StudyRef, check_roi_fits, select_studies
from ..eval.families import FAMILIES, RESERVED_KEY, active
from ..eval.folds import fold_train_val, kfold_split
from ..eval.summary import cv_summary, flat_metrics, fold_metrics, jsonable
from ..tasks.segment import SegmentationTask
from .checkpoint import latest_checkpoint_dir, load_meta, load_state, signature_differences

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class FinetuneResult:
    output_dir: Path
    metrics: dict
    run_id: str | None
    tracking_uri: str | None


def _has_lesion(ref: StudyRef, labels: LabelSet) -> bool:
    """Whether the study's truth holds the set's lesion class: the manifest's `label_voxels` when `prepare` wrote
    them, else one read of the shard's label column. False for a set without a lesion class."""
    if labels.lesion is None:
        return False
    if ref.label_voxels is not None:
        return int(ref.label_voxels.get(labels.lesion_name, 0)) > 0
    row = read_shard_row(ref.shard, ("label",))
    return row["label"] is not None and bool((np.frombuffer(row["label"], np.uint8) == labels.lesion).any())


def make_folds(cfg: FinetuneConfig, studies: list[StudyRef], labels: LabelSet) -> list[list[str]]:
    """`cv.folds` folds grouped by patient (the manifest's `patient_id`) and stratified on lesion presence (plain
    seeded patient-grouped k-fold when the set has no lesion class)."""
    flags = [_has_lesion(s, labels) for s in studies]
    patients = [s.patient_id or s.study_id for s in studies]
    return kfold_split([s.study_id for s in studies], flags, cfg.cv.folds, cfg.cv.seed, groups=patients)


def labelled_subset(cv: CVConfig, k: int, train_ids: list[str], patient_of: dict[str, str]) -> list[str]:
    """Fold k's labelled training studies, sorted: all of `train_ids` when `cv.train_studies` is 0, else the
    shortest run of whole patients (`patient_of`, a study its own patient when absent), in the order
    `np.random.default_rng([cv.seed, k]).permutation` of the sorted patient ids, that holds at least
    `cv.train_studies` studies. The order does not depend on N, so the subsets are nested (N=1's inside N=2's inside
    all), and not on the order of `train_ids`. Raises ValueError when N exceeds len(train_ids)."""
    if cv.train_studies <= 0:
        return sorted(train_ids)
    if cv.train_studies > len(train_ids):
        raise ValueError(f"cv.train_studies={cv.train_studies} but fold {k} has {len(train_ids)} training studies")
    members: dict[str, list[str]] = {}
    for study in sorted(train_ids):
        members.setdefault(patient_of.get(study, study), []).append(study)
    patients = sorted(members)
    chosen: list[str] = []
    for index in np.random.default_rng([cv.seed, k]).permutation(len(patients)):
        if len(chosen) >= cv.train_studies:
            break
        chosen += members[patients[int(index)]]
    return sorted(chosen)


def label_problems(cfg: FinetuneConfig, folds: list[list[str]]) -> list[str]:
    """`cv.train_studies` against the training studies of every fold that will run (one problem per short fold)."""
    if cfg.cv.train_studies <= 0:
        return []
    indices = range(len(folds)) if cfg.cv.fold == -1 else [cfg.cv.fold]
    available = {k: len(fold_train_val(folds, k)[0]) for k in indices if 0 <= k < len(folds)}
    return [f"cv.train_studies: {cfg.cv.train_studies} labelled training studies requested but fold {k} has only "
            f"{n} training studies (of {sum(map(len, folds))} labelled, cv.folds={len(folds)})"
            for k, n in available.items() if n < cfg.cv.train_studies]


def resolve_encoder(spec: str, uri: str | None, output_dir: Path) -> tuple[str | None, str]:
    """(absolute path or None, MLflow run id it came from or ''). An MLflow run id downloads its encoder.pt."""
    if not spec:
        return None, ""
    if Path(spec).exists():
        meta_run = Path(spec).resolve().parent / "mlflow_run.json"
        source = json.loads(meta_run.read_text())["run_id"] if meta_run.exists() else ""
        return str(Path(spec).resolve()), source
    if RUN_ID.match(spec) and uri:
        from mlflow.artifacts import download_artifacts

        target = output_dir / "encoder_source"
        target.mkdir(parents=True, exist_ok=True)
        path = download_artifacts(run_id=spec, artifact_path="encoder.pt", dst_path=str(target), tracking_uri=uri)
        return str(Path(path).resolve()), spec
    raise ConfigError(f"encoder={spec!r} is neither an existing file nor an MLflow run id")


def metric_problems(cfg: FinetuneConfig) -> list[str]:
    """`eval.metrics` against the metric-family registry (the registry, not a config Literal, is the list)."""
    unknown = [name for name in cfg.eval.metrics if name not in FAMILIES]
    return [f"eval.metrics: unknown metric famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; registered: "
            f"{sorted(FAMILIES)}"] if unknown else []


def data_problems(cfg: FinetuneConfig) -> tuple[list[str], list[StudyRef], LabelSet | None]:
    """Problems of the config against the registries and data.root ("key: problem"), the labelled studies and the
    label set."""
    problems = metric_problems(cfg)
    if not cfg.data.root:
        return [*problems, "data.root: required (the output folder of `swinssl prepare`)"], [], None
    try:
        studies = select_studies(cfg.data.root, "labeled", "all")
        labels = read_label_set(cfg.data.root)
    except (DataError, LabelSetError) as exc:
        return [*problems, f"data.root: {exc}"], [], None
    if len(studies) < cfg.cv.folds:
        problems.append(f"cv.folds: {cfg.cv.folds} but data.root has only {len(studies)} prepared 'labeled' studies "
                        f"(fewer than cv.folds={cfg.cv.folds})")
    if cfg.model.out_channels not in (0, labels.num_classes):
        problems.append(f"model.out_channels: {cfg.model.out_channels} but data.root's label set has "
                        f"{labels.num_classes} classes {list(labels.names)}; use 0 (the label set's)")
    if RESERVED_KEY in labels.names:
        problems.append(f"data.root: class name {RESERVED_KEY!r} is reserved (the mean over classes); rename it")
    try:
        check_roi_fits(studies, cfg.data.roi)
    except DataError as exc:
        problems.append(f"data.roi: {exc}")
    if cfg.cv.train_studies > 0 and not problems:  # the folds need valid data; they are then cheap to redo
        try:
            problems += label_problems(cfg, make_folds(cfg, studies, labels))
        except ValueError as exc:
            problems.append(f"cv.folds: {exc}")
    return problems, studies, labels


def model_signature(cfg: FinetuneConfig) -> dict:
    """What a fold's checkpoint records of its model (meta.json) and must match to be resumed or reused."""
    return {"feature_size": cfg.model.feature_size, "use_v2": cfg.model.use_v2}


def resume_problems(cfg: FinetuneConfig, output_dir: Path, indices) -> list[str]:
    """One problem per fold to run whose checkpoint holds another model (finished folds too: their metrics would mix
    with the new model's); checkpoints written before `use_v2` was recorded hold a V1 SwinUNETR."""
    wanted, problems = model_signature(cfg), []
    for k in indices:
        latest = latest_checkpoint_dir(output_dir / "ray" / f"fold_{k}")
        if latest is None:
            continue
        differences = signature_differences(load_meta(latest), wanted, {**wanted, "use_v2": False})
        problems += [f"model.{key}: {want} but fold {k}'s checkpoint {latest} was trained with {key}={saved}; use "
                     f"another output_dir to start over, or model.{key}={saved} to resume"
                     for key, (saved, want) in differences.items()]
    return problems


def _validate(cfg: FinetuneConfig) -> tuple[list[StudyRef], Path, LabelSet]:
    """One ConfigError listing every config and data problem; resolves `model.out_channels` (0 -> the label set's)."""
    problems, studies, labels = data_problems(cfg)
    if not cfg.output_dir:
        problems.insert(0, "output_dir: required")
    else:  # before config.yaml is overwritten
        indices = range(cfg.cv.folds) if cfg.cv.fold == -1 else [cfg.cv.fold]
        problems += resume_problems(cfg, Path(cfg.output_dir).resolve(), indices)
    if labels is not None and cfg.model.out_channels == 0:
        cfg.model.out_channels = labels.num_classes
    validate(cfg, problems)
    return studies, Path(cfg.output_dir).resolve(), labels


def _write_json(path: Path, data: dict) -> None:
    atomic_write_json(path, jsonable(data))


def evaluate_checkpoint(checkpoint_dir: str, shards: list[str], cfg_dict: dict, labels_dict: dict,
                        output_dir: str) -> list[dict]:
    """The body of the evaluation Ray task: load a fold's final weights into a fresh model and evaluate it."""
    import torch

    from ..config import from_dict
    from ..eval.evaluate import evaluate_studies

    cfg = from_dict(cfg_dict, FinetuneConfig)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.use_gpu else "cpu")
    model = SegmentationTask(cfg, None).build_model()
    model.load_state_dict(load_state(checkpoint_dir)["model"])
    return evaluate_studies(model.to(device), shards, LabelSet.from_dict(labels_dict), cfg.data.roi, cfg.eval,
                            output_dir, device=device, amp=cfg.trainer.amp != "none")


def _train_fold(cfg, k, train_refs, output_dir, encoder_path, tracking, labels: LabelSet) -> Path:
    """Fit fold k (resuming its own checkpoints) and return its final checkpoint folder."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from ..data.pipeline import seg_crop_dataset
    from .launch import chaos_config, scaling_config, trainer_data
    from .worker import train_worker

    run_dir = output_dir / "ray" / f"fold_{k}"
    latest = latest_checkpoint_dir(run_dir)
    if latest is not None and load_meta(latest).get("step", 0) >= cfg.trainer.steps:
        return latest
    stream = seg_crop_dataset([s.shard for s in train_refs], tuple(cfg.data.roi), cfg.data.crops_per_study,
                              cfg.trainer.seed + k, cfg.data.class_balanced, cfg.data.read_cpus,
                              cfg.data.min_crops_per_epoch, num_classes=labels.num_classes,
                              reproducible=cfg.trainer.deterministic)
    datasets, reproducible = trainer_data(stream)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"kind": "finetune", "cfg": asdict(cfg), "encoder_path": encoder_path,
                           "tracking": tracking, "meta": {"fold": k, **model_signature(cfg)},
                           "chaos": chaos_config(cfg, output_dir), **reproducible},
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(name=f"fold_{k}", storage_path=str(output_dir / "ray"),
                             failure_config=FailureConfig(max_failures=cfg.trainer.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.trainer.keep_checkpoints)),
        datasets=datasets,
    )
    return Path(trainer.fit().checkpoint.path)


def _evaluate(cfg, checkpoint: Path, val_refs, output_dir, labels: LabelSet) -> list[dict]:
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # placement_group=None: inside a Tune trial the task must not be captured into the trial's 0.1-CPU bundle
    task = ray.remote(evaluate_checkpoint).options(
        num_cpus=cfg.eval.cpus, num_gpus=1 if cfg.trainer.use_gpu else 0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    return ray.get(task.remote(str(checkpoint), [s.shard for s in val_refs], asdict(cfg), labels.to_dict(),
                               str(output_dir)))


def _classes(labels: LabelSet) -> str:
    """The foreground class names as one MLflow param (the sweep report reads its columns from it)."""
    return json.dumps([labels.name(c) for c in labels.foreground])


def _run_fold(cfg, k, folds, train_ids, by_id, output_dir, encoder_path, parent, labels: LabelSet) -> dict:
    """Train fold k on `train_ids` (its `labelled_subset`, as written to folds.json), evaluate on the fold."""
    done = output_dir / f"fold_{k}" / "metrics.json"
    if done.exists():  # a finished fold is never redone
        return json.loads(done.read_text())
    available, val_ids = fold_train_val(folds, k)
    child = None
    if parent:
        from ..tracking.mlflow_run import open_run

        child = {"uri": parent["uri"], "run_id": open_run(
            parent["uri"], cfg.tracking.experiment, f"{parent['name']} fold {k}", output_dir / f"fold_{k}",
            {"fold": k, "n_train": len(train_ids), "n_train_available": len(available), "n_val": len(val_ids),
             "classes": _classes(labels)},
            {"swinssl.kind": "finetune-fold"},
            parent_run_id=parent["run_id"])}
    checkpoint = _train_fold(cfg, k, [by_id[i] for i in train_ids], output_dir, encoder_path, child, labels)
    rows = _evaluate(cfg, checkpoint, [by_id[i] for i in val_ids], output_dir, labels)
    result = {"fold": k, "studies": [r["study_id"] for r in rows],
              "metrics": fold_metrics([r["metrics"] for r in rows]), "rows": rows}
    if child:
        _log_fold(child, result["metrics"])
    _write_json(done, result)
    return json.loads(done.read_text())


def _log_fold(child: dict, metrics: dict) -> None:
    from ..tracking.mlflow_run import MetricBuffer, finish_run

    summary = cv_summary([metrics])
    buffer = MetricBuffer(child["uri"], child["run_id"])
    buffer.log(flat_metrics(summary), step=0)
    buffer.flush()
    finish_run(child["uri"], child["run_id"])


def _open_parent(cfg: FinetuneConfig, output_dir: Path, encoder_source: str, n_studies: int, labels: LabelSet,
                 init_rule: str = "") -> dict | None:
    if not cfg.tracking.enabled:
        return None
    from ..tracking.mlflow_run import log_artifact, open_run, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking, output_dir)
    name = cfg.tracking.run_name or cfg.name
    params = {**flatten(cfg), "encoder_source_run": encoder_source, "init": "pretrained" if cfg.encoder else
              "scratch", "data.num_labeled": n_studies, "data.classes": _classes(labels),
              **({"encoder.patch_embedding": init_rule} if init_rule else {})}
    run_id = open_run(uri, cfg.tracking.experiment, name, output_dir, params,
                      tags={"swinssl.kind": "finetune", "swinssl.init": params["init"]},
                      parent_run_id=os.environ.get("SWINSSL_PARENT_RUN_ID"))
    log_artifact(uri, run_id, output_dir / "config.yaml")
    return {"uri": uri, "run_id": run_id, "name": name}


def _report(cfg, output_dir: Path, folds_done: dict, encoder_path, encoder_source, parent, labels: LabelSet) -> dict:
    from ..eval.plots import dice_bar_chart

    studies = {r["study_id"]: {"fold": int(k), "metrics": r["metrics"]} for k, f in folds_done.items()
               for r in f["rows"]}
    fold_level = {k: {"studies": f["studies"], "metrics": f["metrics"]} for k, f in folds_done.items()}
    summary = cv_summary([f["metrics"] for f in folds_done.values()])
    metrics = {"labels": labels.to_dict(), "metric_families": active(cfg.eval.metrics, labels),
               "encoder": encoder_path or "", "encoder_source_run": encoder_source, "folds": fold_level,
               "studies": studies, "summary": summary}
    _write_json(output_dir / "metrics.json", metrics)
    label = "pretrained" if encoder_path else "scratch"
    dice = {name: v["mean"] for name, v in summary.get("dice", {}).items() if name != RESERVED_KEY}
    chart = dice_bar_chart({label: dice}, output_dir / "dice_per_class.png",
                           [labels.name(c) for c in labels.foreground],
                           title=f"{cfg.name}: Dice per class (mean over folds)")
    if parent:
        from ..tracking.mlflow_run import MetricBuffer, finish_run, log_artifact

        buffer = MetricBuffer(parent["uri"], parent["run_id"])
        buffer.log(flat_metrics(summary), step=0)
        buffer.flush()
        for path in (output_dir / "metrics.json", output_dir / "labels.json", chart):
            log_artifact(parent["uri"], parent["run_id"], path)
        if (output_dir / "overlays").exists():
            log_artifact(parent["uri"], parent["run_id"], output_dir / "overlays", "overlays")
        finish_run(parent["uri"], parent["run_id"])
    return json.loads((output_dir / "metrics.json").read_text())


def _keep_prepare_settings(root: Path, output_dir: Path) -> None:
    """A copy of data.root's prepare_config.json: `swinssl predict` prepares new studies the same way even after
    the training data has moved."""
    source = root / "prepare_config.json"
    if source.exists():
        atomic_write_json(output_dir / "prepare_config.json", json.loads(source.read_text()))


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Cross-validated fine-tuning end to end (resumable fold by fold); see the module docstring for outputs."""
    from petct.raylocal import ensure_ray

    studies, output_dir, labels = _validate(cfg)
    folds = make_folds(cfg, studies, labels)
    save_config(cfg, output_dir / "config.yaml")
    write_label_set(labels, output_dir)
    _keep_prepare_settings(Path(cfg.data.root), output_dir)
    patient_of = {s.study_id: s.patient_id or s.study_id for s in studies}
    indices = range(cfg.cv.folds) if cfg.cv.fold == -1 else [cfg.cv.fold]
    train = {str(k): labelled_subset(cfg.cv, k, fold_train_val(folds, k)[0], patient_of) for k in indices}
    _write_json(output_dir / "folds.json", {"seed": cfg.cv.seed, "folds": folds,
                                            "patients": [sorted({patient_of[i] for i in f}) for f in folds],
                                            "train_studies": cfg.cv.train_studies, "train": train})
    uri_hint = None
    if cfg.tracking.enabled:
        from ..tracking.mlflow_run import resolve_tracking_uri

        uri_hint = resolve_tracking_uri(cfg.tracking, output_dir)
    encoder_path, encoder_source = resolve_encoder(cfg.encoder, uri_hint, output_dir)
    task = SegmentationTask(cfg, encoder_path)
    task.build_model()  # a mismatched encoder fails here, before any worker
    parent = _open_parent(cfg, output_dir, encoder_source, len(studies), labels, task.init_rule)
    ensure_ray(min_cpus=cfg.trainer.num_workers * cfg.trainer.cpus_per_worker + 2 * cfg.data.read_cpus)
    by_id = {s.study_id: s for s in studies}
    try:
        done = {str(k): _run_fold(cfg, k, folds, train[str(k)], by_id, output_dir, encoder_path, parent, labels)
                for k in indices}
    except Exception:
        if parent:
            from ..tracking.mlflow_run import finish_run

            finish_run(parent["uri"], parent["run_id"], "FAILED")
        raise
    metrics = _report(cfg, output_dir, done, encoder_path, encoder_source, parent, labels)
    return FinetuneResult(output_dir, metrics, parent and parent["run_id"], parent and parent["uri"])
