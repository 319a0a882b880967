"""`swinssl predict`: a trained model + new studies -> label volumes, DICOM-SEG, overlays and a record of what ran.

Input: anything `swinssl prepare` reads (a DICOM tree, NIfTI study folders, autoPET / nnU-Net raw layouts, a cohort
CSV), prepared into `OUT/prepared` with the model's recorded preparation settings (the training data's CT/PET
windows, registration); or an already prepared folder, whose windows must equal the model's (a study prepared with
other windows is refused: the network would see intensities it was not trained on).

Outputs under OUT:
    labels/<id>.nii.gz      uint8 labels on the PET grid (the geometry `swinssl export` and fine-tuning write)
    labels_ct/<id>.nii.gz   the same on the original CT grid (`--ct-grid`): nearest-neighbour through the inverse
                            of the CT -> PET registration the study was prepared with
    dicom_seg/<id>.dcm      DICOM-SEG referencing the source PET series (DICOM input only; see dicom_seg.py)
    overlays/<id>.png       prediction over CT (coronal, sagittal, axial)
    records/<id>.json       per study: status, error kind and message, files, class voxel counts, seconds
    predictions.jsonl       the records in input order
    predict_run.json        model (source run, folds, classes), options, package versions, time

A study that fails (in preparation or prediction) is recorded and skipped; the others finish (exit code 3, as
`prepare`). A rerun skips studies already predicted with the same model, options and prepared input.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from petct.config import PrepareConfig
from petct.errors import StudyError, failure_fields
from petct.export import manifest_records
from petct.shards import atomic_write_json, atomic_write_text, read_shard

from ..eval.infer import predict_volume, save_prediction, write_image_atomic
from .ensemble import Ensemble
from .package import TrainedModel, load_trained

EXIT_STUDIES_FAILED = 3

__all__ = ["PredictOptions", "PredictSummary", "predict_cohort", "predict_image"]


@dataclass
class PredictOptions:
    """How `swinssl predict` runs (recorded in predict_run.json)."""

    folds: list[int] | None = None
    """Fold models to ensemble (mean of softmax probabilities); None = every fold of the model."""
    tta: bool = False
    """Flip test-time augmentation: 8 mirrored passes per window (nnU-Net's default mirroring)."""
    device: str = "cpu"
    """Torch device of the network ('cuda' uses bf16 autocast, as fine-tuning's evaluation)."""
    ct_grid: bool = False
    """Also write the labels on the original CT grid."""
    dicom_seg: bool = True
    """Write DICOM-SEG for studies whose PET is a DICOM series."""
    overlays: bool = True
    """Write an overlay PNG per study."""
    workers: int = 0
    """Ray actors predicting studies in parallel (each holds the model once); 0 = in this process. Also the Ray
    workers of the preparation step (0 = prepare in this process)."""
    progress: bool = True


@dataclass
class PredictSummary:
    records: list[dict]
    out: Path
    run: dict = field(default_factory=dict)

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.records if r["status"] != "ok"]

    @property
    def exit_code(self) -> int:
        return EXIT_STUDIES_FAILED if self.failed else 0

    @property
    def report(self) -> str:
        lines = [f"predicted {len(self.records) - len(self.failed)} of {len(self.records)} studies -> {self.out}"]
        lines += [f"  FAILED {r['study_id']}: [{r['error_kind']}] {r['error']}" for r in self.failed]
        return "\n".join(lines)


def predict_image(ensemble: torch.nn.Module, model: TrainedModel, image: np.ndarray,
                  device: str = "cpu") -> np.ndarray:
    """(C, Z, Y, X) prepared image -> (Z, Y, X) uint8 labels, with the model's fine-tuning evaluation settings."""
    ev = model.cfg.eval
    return predict_volume(ensemble, torch.as_tensor(image), tuple(model.cfg.data.roi), model.labels.num_classes,
                          sw_batch_size=ev.sw_batch_size, overlap=ev.overlap, mode=ev.mode,
                          crop_to_body=ev.crop_to_body, device=device, amp=model.cfg.trainer.amp != "none")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("swinssl", "torch", "monai", "highdicom", "pydicom", "SimpleITK"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = ""
    return found


def _digest(*parts) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def _study_key(digest: str, record: dict) -> str:
    """What a finished prediction of `record` depends on: the run's model and options (`digest`) and the prepared
    input (its sources, settings and preparation time); a rerun with the same key skips the study."""
    return _digest(digest, record.get("source_hashes"), record.get("config_digest"), record.get("prepared_at"))


def _ct_grid_labels(prediction: np.ndarray, study, record: dict) -> sitk.Image:
    """Labels resampled (nearest) onto the CT grid: CT point -> PET point is the inverse of the registration."""
    from petct.io import read_ct

    ct = read_ct(record["study_id"], record["ct_path"], record.get("ct_series", ""))
    transform = sitk.Euler3DTransform()
    transform.SetCenter(record["registration_center"])
    transform.SetParameters(record["registration_params"])
    return sitk.Resample(study.to_sitk(prediction), ct, transform.GetInverse(), sitk.sitkNearestNeighbor, 0,
                         sitk.sitkUInt8)


class StudyPredictor:
    """Holds the ensemble once; predicts one prepared study per call (a Ray actor when `workers` > 0)."""

    def __init__(self, model: TrainedModel, options: PredictOptions, out: str, prepared: str):
        folds = options.folds if options.folds is not None else model.folds
        self.model, self.options, self.out, self.prepared = model, options, Path(out), Path(prepared)
        self.ensemble = Ensemble([model.fold_model(k) for k in folds], tta=options.tta)
        self.version = _versions()["swinssl"] or "0"

    def __call__(self, record: dict) -> dict:
        started = time.perf_counter()
        sid = record["study_id"]
        row = {"study_id": sid, "order": record.get("order", 0), "status": "ok", "error_kind": "", "error": ""}
        try:
            row.update(self._predict(record))
        except Exception as exc:  # StudyError: its kind; anything else 'internal' (petct.errors.failure_fields)
            row.update(failure_fields(exc))
        row["seconds"] = round(time.perf_counter() - started, 3)
        return row

    def _predict(self, record: dict) -> dict:
        sid, out = record["study_id"], self.out
        study = read_shard(self.prepared / record["shard"])
        prediction = predict_image(self.ensemble, self.model, study.image, self.options.device)
        files = {"labels": str(save_prediction(study, prediction, out / "labels" / f"{sid}.nii.gz"))}
        notes = {}
        if self.options.ct_grid:
            files["labels_ct"] = str(write_image_atomic(_ct_grid_labels(prediction, study, record),
                                                        out / "labels_ct" / f"{sid}.nii.gz"))
        if self.options.dicom_seg:
            from .dicom_seg import write_dicom_seg

            try:
                files["dicom_seg"] = str(write_dicom_seg(prediction, record, self.model.labels,
                                                         out / "dicom_seg" / f"{sid}.dcm", self.version))
            except StudyError as exc:  # NIfTI input, or a PET the SEG cannot reference: the labels still count
                notes["dicom_seg"] = f"[{exc.kind}] {exc.message}"
        if self.options.overlays:
            from ..eval.plots import overlay_png

            files["overlay"] = str(overlay_png(study, prediction, out / "overlays" / f"{sid}.png", self.model.labels,
                                               title=f"{sid}: {self.model.cfg.name}"))
        counts = np.bincount(prediction.ravel(), minlength=self.model.labels.num_classes)
        return {"files": files, "notes": notes,
                "voxels": {self.model.labels.name(v): int(n) for v, n in enumerate(counts) if n}}


def _prepare_inputs(model: TrainedModel, input_path: Path, out: Path, options: PredictOptions) -> Path:
    """The prepared folder to predict: `input_path` itself when already prepared, else `OUT/prepared`."""
    if (input_path / "manifest.jsonl").exists():
        return input_path
    if not model.prepare:
        raise ValueError(f"the model records no `swinssl prepare` settings (no prepare_config.json in its run): "
                         f"prepare {input_path} with the training data's windows yourself and give the prepared folder")
    from petct.pipeline import prepare_cohort

    cfg = PrepareConfig.from_dict({**model.prepare, "labels": model.labels.to_dict()})
    prepare_cohort(input_path, out / "prepared", cfg, workers=options.workers, progress=options.progress)
    return out / "prepared"


def _window_problem(record: dict, model: TrainedModel) -> str:
    """Why a prepared study cannot be fed to the model ('' = it can)."""
    for key in ("ct_window", "pet_window"):
        want = model.prepare.get(key)
        want = [want["lo"], want["hi"]] if isinstance(want, dict) else want
        if want is not None and record.get(key) is not None and [float(v) for v in record[key]] != [
                float(v) for v in want]:
            return (f"prepared with {key} {record[key]} but the model was trained on {want}: prepare it again with "
                    f"the model's windows (or give the raw study to `swinssl predict`)")
    return ""


def _todo(records: list[dict], model: TrainedModel, out: Path, digest: str) -> tuple[dict, list[dict]]:
    """(finished or refused rows by study, records still to predict)."""
    done, todo = {}, []
    for record in records:
        sid = record["study_id"]
        if record.get("status") != "ok":
            done[sid] = {"study_id": sid, "order": record.get("order", 0), "status": "failed",
                         "error_kind": record.get("error_kind", "prepare"), "error": f"prepare: {record.get('error')}"}
            continue
        problem = _window_problem(record, model)
        if problem:
            done[sid] = {"study_id": sid, "order": record.get("order", 0), "status": "failed",
                         "error_kind": "prepare_mismatch", "error": problem}
            continue
        previous = out / "records" / f"{sid}.json"
        if previous.exists():
            saved = json.loads(previous.read_text())
            if saved.get("status") == "ok" and saved.get("digest") == _study_key(digest, record):
                done[sid] = {**saved, "skipped": True}
                continue
        todo.append(record)
    return done, todo


def _run(todo: list[dict], model: TrainedModel, options: PredictOptions, out: Path, prepared: Path):
    from tqdm.auto import tqdm

    with tqdm(total=len(todo), desc="predict", unit="study", disable=not options.progress) as bar:
        if options.workers <= 0 or len(todo) <= 1:
            predictor = StudyPredictor(model, options, str(out), str(prepared))
            for record in todo:
                yield record, predictor(record)
                bar.update()
            return
        import ray
        from ray.util import ActorPool

        from petct.raylocal import ensure_ray

        ensure_ray(num_cpus=options.workers)
        gpus = 1 if options.device.startswith("cuda") else 0
        actor = ray.remote(num_cpus=1, num_gpus=gpus)(StudyPredictor)
        pool = ActorPool([actor.remote(model, options, str(out), str(prepared))
                          for _ in range(min(options.workers, len(todo)))])
        by_id = {r["study_id"]: r for r in todo}
        for row in pool.map_unordered(lambda a, r: a.__call__.remote(r), todo):
            yield by_id[row["study_id"]], row
            bar.update()


def predict_cohort(model_spec: str, input_path: Path | str, out: Path | str, options: PredictOptions | None = None,
                   tracking_uri: str = "") -> PredictSummary:
    """Predict every study of `input_path` with the model `model_spec` (see module docstring for the outputs)."""
    options = options or PredictOptions()
    out, input_path = Path(out).resolve(), Path(input_path).resolve()
    model = load_trained(model_spec, tracking_uri, cache=out / ".model")
    folds = options.folds if options.folds is not None else model.folds
    unknown = sorted(set(folds) - set(model.folds))
    if unknown or not folds:
        raise ValueError(f"--folds {folds}: the model has folds {model.folds}")
    if not input_path.exists():
        raise FileNotFoundError(f"{input_path}: no such file or folder")
    prepared = _prepare_inputs(model, input_path, out, options)
    run = {"model": model.describe(), "model_spec": str(model_spec), "folds": folds,
           "options": {k: v for k, v in asdict(options).items() if k != "progress"}, "input": str(input_path),
           "prepared": str(prepared), "versions": _versions(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    digest = _digest(run["model"], folds, options.tta, options.ct_grid, options.dicom_seg, options.overlays)
    records = manifest_records(prepared)
    rows, todo = _todo(records, model, out, digest)
    for record, row in _run(todo, model, options, out, prepared):
        row["digest"] = _study_key(digest, record)
        atomic_write_json(out / "records" / f"{row['study_id']}.json", row)
        rows[row["study_id"]] = row
    ordered = [rows[r["study_id"]] for r in records]
    atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in ordered))
    run["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_json(out / "predict_run.json", run)
    return PredictSummary(ordered, out, run)
