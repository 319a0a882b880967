"""`swinssl predict` and the MLflow model on a real fine-tune run (Ray Train, 2 folds, MLflow sqlite, the model logged
and registered through the CLI). Oracle: fine-tuning's own evaluation predictions. Outputs (DICOM-SEG, CT grid) and
failure handling without Ray: tests/test_predict_outputs.py."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from image_checks import assert_same_geometry, read_labels
from petct.export import manifest_records
from petct.shards import read_shard
from swinssl.cli import main
from swinssl.deploy.package import load_trained
from swinssl.deploy.predict import PredictOptions, predict_cohort

TINY = Path(__file__).resolve().parents[1] / "experiments" / "finetune_tiny.yaml"
REGISTERED = "psma-tiny"


@pytest.fixture(scope="module")
def finetuned(prepared, tmp_path_factory):
    """`swinssl finetune` (CLI) on the session cohort: 2 folds, 3 steps, model logged and registered."""
    base = tmp_path_factory.mktemp("finetuned")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    code = main(["finetune", str(TINY), f"data.root={prepared[0]}", f"output_dir={base / 'run'}",
                 f"tracking.tracking_uri={uri}", "trainer.steps=3", "trainer.num_workers=1",
                 "trainer.checkpoint_every=3", "--register", REGISTERED])
    assert code == 0
    return base / "run", uri


def _labelled_raw_csv(cohort: Path, out: Path) -> Path:
    """The labelled studies of the session cohort as a cohort CSV of their raw NIfTI files (absolute paths)."""
    with cohort.open() as f:
        rows = [r for r in csv.DictReader(f) if r["cohort"] == "labeled"]
    for row in rows:
        row.update({k: str(cohort.parent / row[k]) if row[k] else "" for k in ("ct", "pet", "label")})
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


@pytest.fixture
def one_thread():
    """Fine-tuning evaluates in a 1-CPU Ray task, i.e. with one torch thread. Another thread count sums the same
    convolutions in another order, and the last-bit differences can flip an exact near-tie of an untrained net's
    logits (seen: 1 voxel in 500 000): same threads, same bits."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_predict_equals_the_finetune_evaluation_from_raw_and_prepared_input(finetuned, cohort, tmp_path, one_thread):
    run, _ = finetuned
    folds = json.loads((run / "folds.json").read_text())["folds"]
    model = load_trained(run)
    assert model.folds == [0, 1] and model.prepare["ct_window"] == {"lo": -1000.0, "hi": 1000.0}
    options = {"dicom_seg": False, "overlays": False, "progress": False}
    # raw NIfTI studies: prepared again with the run's recorded settings (registration included), fold 0 alone
    raw = predict_cohort(str(run), _labelled_raw_csv(cohort, tmp_path / "labelled.csv"), tmp_path / "raw",
                         PredictOptions(folds=[0], **options))
    # the folder that run prepared, given as prepared input (used in place), fold 1 alone
    again = predict_cohort(str(run), tmp_path / "raw" / "prepared", tmp_path / "prepared",
                           PredictOptions(folds=[1], **options))
    assert not (tmp_path / "prepared" / "prepared").exists()
    for k, summary in enumerate((raw, again)):
        assert summary.exit_code == 0 and {r["status"] for r in summary.records} == {"ok"}
        for study in folds[k]:
            ours, theirs = summary.out / "labels" / f"{study}.nii.gz", run / "predictions" / f"{study}.nii.gz"
            assert np.array_equal(read_labels(ours), read_labels(theirs)), (k, study)
            assert_same_geometry(sitk.ReadImage(str(ours)), sitk.ReadImage(str(theirs)))


def _one_study(prepared: Path, record: dict, out: Path) -> Path:
    """A prepared folder holding one study of `prepared` (manifest row, shard, settings)."""
    (out / "shards").mkdir(parents=True)
    for name in ("prepare_config.json", "labels.json"):
        shutil.copy(prepared / name, out / name)
    shutil.copy(prepared / record["shard"], out / record["shard"])
    (out / "manifest.jsonl").write_text(json.dumps(record) + "\n")
    return out


def test_mlflow_model_registered_loads_and_predicts_the_same_labels(finetuned, prepared, tmp_path):
    import mlflow

    run, uri = finetuned
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    version = client.get_model_version(REGISTERED, "1")
    assert version.run_id == json.loads((run / "mlflow_run.json").read_text())["run_id"]
    pyfunc = mlflow.pyfunc.load_model(f"models:/{REGISTERED}/1")
    inputs = pyfunc.metadata.get_input_schema().inputs[0]
    assert inputs.type == np.dtype(np.float32) and inputs.shape == (-1, 2, -1, -1, -1)
    record = next(r for r in manifest_records(prepared[0]) if r["status"] == "ok" and r["labeled"])
    study = read_shard(prepared[0] / record["shard"])
    one = _one_study(prepared[0], record, tmp_path / "one")
    out = tmp_path / "cli"
    assert main(["predict", f"models:/{REGISTERED}/1", "--input", str(one), "--out", str(out),
                 "--tracking-uri", uri, "--quiet", "--no-overlays", "--no-dicom-seg"]) == 0
    ours = read_labels(out / "labels" / f"{record['study_id']}.nii.gz")
    labels = pyfunc.predict(study.image[None], params={"folds": "all"})
    assert labels.dtype == np.uint8 and labels.shape == (1, *study.image.shape[1:])
    assert np.array_equal(labels[0], ours)
    single = pyfunc.predict(study.image[None], params={"folds": "0"})[0]
    fold0 = predict_cohort(str(run), one, tmp_path / "f0", PredictOptions(folds=[0], dicom_seg=False,
                                                                                overlays=False, progress=False))
    assert fold0.exit_code == 0
    assert np.array_equal(single, read_labels(tmp_path / "f0" / "labels" / f"{record['study_id']}.nii.gz"))
    run_record = json.loads((out / "predict_run.json").read_text())
    assert run_record["model"]["model_uri"] == f"models:/{REGISTERED}/1" and run_record["folds"] == [0, 1]
