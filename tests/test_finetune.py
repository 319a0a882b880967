"""Fine-tuning with cross-validation through real Ray Train, a Ray evaluation task and MLflow (sqlite)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from petct.labels import PSMA, LabelSet
from petct.shards import read_shard
from swinssl.config import ConfigError, FinetuneConfig, load_config
from swinssl.data.studies import select_studies
from swinssl.eval.families import study_metrics
from swinssl.eval.summary import jsonable
from swinssl.models.encoder_io import save_encoder
from swinssl.models.ssl_head import SSLModel
from swinssl.train.finetune import finetune
from swinssl.train.worker import CHAOS_ENV

TINY = Path(__file__).resolve().parents[1] / "experiments" / "finetune_tiny.yaml"


def _cfg(root: Path, out: Path, *overrides: str) -> FinetuneConfig:
    tracking = f"tracking.tracking_uri=sqlite:///{out.parent / 'mlflow.db'}"
    return load_config(TINY, [f"data.root={root}", f"output_dir={out}", tracking, *overrides], FinetuneConfig)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    """A tiny encoder.pt in the pretraining output format (random weights stand in for a pretraining run)."""
    return save_encoder(SSLModel(in_channels=2, feature_size=12), tmp_path_factory.mktemp("enc") / "encoder.pt")


def test_bad_inputs_fail_before_workers(prepared, tmp_path):
    wrong = save_encoder(SSLModel(in_channels=2, feature_size=24), tmp_path / "enc24.pt")
    with pytest.raises(ValueError, match="feature_size"):
        finetune(_cfg(prepared[0], tmp_path / "a", f"encoder={wrong}"))
    with pytest.raises(ConfigError) as error:  # every data-dependent problem in one error, before Ray is used
        finetune(_cfg(prepared[0], tmp_path / "b", "cv.folds=3", "model.out_channels=5", "data.roi=[512,64,64]"))
    assert [p.split(":")[0] for p in error.value.problems] == ["cv.folds", "model.out_channels", "data.roi"]
    assert "fewer than cv.folds=3" in str(error.value) and "12 classes" in str(error.value)
    with pytest.raises(ValueError, match="neither an existing file nor an MLflow run id"):
        finetune(_cfg(prepared[0], tmp_path / "c", "encoder=/no/such/encoder.pt"))
    assert not (tmp_path / "a" / "ray").exists()


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _same(stored, value) -> bool:
    return (stored is None and value is None) or math.isclose(stored, value, rel_tol=1e-6)


def _check_recomputable(root: Path, out: Path, metrics: dict, labels: LabelSet, families: list[str]) -> None:
    """Every family of every scored study equals a recomputation from predictions/<id>.nii.gz and the label; none
    missing."""
    for ref in (r for r in select_studies(root, "labeled") if r.study_id in metrics["studies"]):
        study = read_shard(Path(ref.shard))
        image = sitk.ReadImage(str(out / "predictions" / f"{ref.study_id}.nii.gz"))
        assert image.GetSpacing() == study.spacing and image.GetOrigin() == study.origin
        assert image.GetDirection() == study.direction
        recomputed = jsonable(study_metrics(sitk.GetArrayFromImage(image), study.label, study.spacing, labels,
                                            families))
        stored = metrics["studies"][ref.study_id]["metrics"]
        assert list(stored) == list(recomputed) == metrics["metric_families"]
        for family, values in recomputed.items():
            assert list(stored[family]) == list(values)
            for key, value in values.items():
                assert _same(stored[family][key], value), (family, key)


@pytest.mark.e2e
def test_cross_validated_finetune(prepared, encoder, tmp_path, monkeypatch):
    root, out = prepared[0], tmp_path / "ft"
    monkeypatch.setenv(CHAOS_ENV, "3")  # fold 0's last worker dies once after step 3: the fold resumes
    result = finetune(_cfg(root, out, f"encoder={encoder}", "trainer.steps=4", "trainer.checkpoint_every=2",
                           "freeze_encoder_steps=2"))
    monkeypatch.delenv(CHAOS_ENV)
    assert (out / ".chaos_fired").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    labeled = [s.study_id for s in select_studies(root, "labeled")]
    assert sorted(metrics["studies"]) == sorted(labeled) and set(metrics["folds"]) == {"0", "1"}
    assert {s for f in metrics["folds"].values() for s in f["studies"]} == set(labeled)  # folds cover, disjoint
    assert list(metrics["summary"]["dice"]) == [*PSMA.names[1:], "mean"]
    assert set(metrics["summary"]["dice"]["mean"]) == {"mean", "std"}
    assert metrics["labels"] == PSMA.to_dict() and metrics["metric_families"] == ["dice", "lesion"]
    assert load_config(out / "config.yaml", [], FinetuneConfig).model.out_channels == 12  # resolved from the set
    _check_recomputable(root, out, metrics, PSMA, ["dice", "lesion"])
    assert (out / "dice_per_class.png").stat().st_size > 10_000 and list((out / "overlays").glob("*.png"))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["init"] == "pretrained"
    assert parent.data.params["encoder"] == str(encoder)
    assert "dice_mean" in parent.data.metrics and "dice/liver" in parent.data.metrics
    assert {"metrics.json", "dice_per_class.png"} <= {a.path for a in client.list_artifacts(result.run_id)}
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert len(children) == 2
    for child in children:
        assert _steps(client, child.info.run_id, "loss") == [1, 2, 3, 4]  # the killed step is logged once
        assert "dice_mean" in child.data.metrics

    checkpoints = sorted(p.name for p in (out / "ray").rglob("checkpoint_*"))
    again = finetune(_cfg(root, out, f"encoder={encoder}", "trainer.steps=4", "trainer.checkpoint_every=2",
                          "freeze_encoder_steps=2"))
    assert sorted(p.name for p in (out / "ray").rglob("checkpoint_*")) == checkpoints  # nothing redone
    assert again.metrics["summary"] == metrics["summary"]
    assert np.isfinite(metrics["folds"]["0"]["metrics"]["lesion"]["tp"])


PSMA_ONLY = [n for n in PSMA.names if n not in ("background", "lesion")]
"""The 10 PSMA organ names: none may appear anywhere in a 2-class run's outputs."""


@pytest.mark.e2e
def test_two_class_cohort_finetunes_with_its_own_classes_and_hd95(ray_session, tmp_path, capsys):
    """{0: background, 1: lesion}: prepared from a synthetic cohort with that label map, fine-tuned end to end
    (1 worker, fold 0 of 2 folds of 1 study) with HD95 switched on; no PSMA organ name in any output."""
    from mlflow.tracking import MlflowClient

    from petct.config import PrepareConfig
    from petct.pipeline import prepare_cohort
    from petct.synth import synth_cohort
    from swinssl.cli import main

    two = LabelSet(("background", "lesion"), lesion=1)
    csv = synth_cohort(tmp_path / "cohort", unlabeled=0, labeled=2, seed=3, scale="small", labels=two)
    root = tmp_path / "prepared"
    prepare_cohort(csv, root, PrepareConfig(labels=two, qc_png=False), workers=0, progress=False)
    out = tmp_path / "runs" / "two"
    # model.out_channels=0 (the label set's): finetune.yaml pins 12 for the PSMA demo
    result = finetune(_cfg(root, out, "model.out_channels=0", "cv.fold=0", "trainer.num_workers=1", "trainer.steps=3",
                           "trainer.checkpoint_every=3", "optim.lr=3e-3", "eval.metrics=[dice,lesion,hd95]"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["folds"]) == ["0"] and len(metrics["studies"]) == 1
    assert metrics["labels"] == two.to_dict() and json.loads((out / "labels.json").read_text()) == two.to_dict()
    assert metrics["metric_families"] == ["dice", "lesion", "hd95"]
    assert list(metrics["summary"]["dice"]) == ["lesion", "mean"] and list(metrics["summary"]["hd95"]) == [
        "lesion", "mean"]
    assert load_config(out / "config.yaml", [], FinetuneConfig).model.out_channels == 2
    _check_recomputable(root, out, metrics, two, ["dice", "lesion", "hd95"])
    _check_hd95_independently(root, out, metrics)

    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.run_id)
    summary = metrics["summary"]
    expected = {"dice_mean", "dice/lesion", *(f"lesion/{k}" for k, v in summary["lesion"].items()
                                              if v["mean"] is not None)}
    expected |= {f"hd95/{k}" if k != "mean" else "hd95_mean" for k, v in summary["hd95"].items() if v["mean"]}
    assert set(parent.data.metrics) == expected  # nothing dropped, nothing else
    if summary["hd95"]["lesion"]["mean"] is not None:
        assert parent.data.metrics["hd95/lesion"] == pytest.approx(summary["hd95"]["lesion"]["mean"])
    assert json.loads(parent.data.params["data.classes"]) == ["lesion"]
    assert main(["report", "--runs", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| lesion |" in table and "| **mean** |" in table

    runs = client.search_runs([parent.info.experiment_id])
    logged = [json.dumps([r.data.params, list(r.data.metrics), r.data.tags]) for r in runs] + [table]
    texts = logged + [p.read_bytes().decode("latin-1") for p in out.rglob("*") if p.is_file()]
    texts.append((tmp_path / "runs" / "mlflow.db").read_bytes().decode("latin-1"))
    assert not [n for n in PSMA_ONLY if any(n in t for t in texts)]


def _check_hd95_independently(root: Path, out: Path, metrics: dict) -> None:
    """HD95 in metrics.json equals a SciPy recomputation (surfaces, exact distance transforms in mm)."""
    from scipy import ndimage

    finite = 0
    for ref in (r for r in select_studies(root, "labeled") if r.study_id in metrics["studies"]):
        study = read_shard(Path(ref.shard))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "predictions" / f"{ref.study_id}.nii.gz"))) == 1
        truth = study.label == 1
        stored = metrics["studies"][ref.study_id]["metrics"]["hd95"]["lesion"]
        if not (pred.any() and truth.any()):
            assert stored is None
            continue
        spacing = study.spacing[::-1]
        edges = [m & ~ndimage.binary_erosion(m) for m in (pred, truth)]
        directed = [ndimage.distance_transform_edt(~edges[1 - i], sampling=spacing)[edges[i]] for i in (0, 1)]
        assert stored == pytest.approx(max(np.percentile(d, 95) for d in directed), rel=1e-5)
        finite += 1
    assert finite  # the check is not vacuous
