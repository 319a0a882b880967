"""Fine-tuning with cross-validation through real Ray Train, a Ray evaluation task and MLflow (sqlite)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from swinssl.config import FinetuneConfig, load_config
from swinssl.data.studies import DataError, select_studies
from swinssl.eval.evaluate import study_metrics
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
    with pytest.raises(DataError, match="fewer than cv.folds=3"):
        finetune(_cfg(prepared[0], tmp_path / "b", "cv.folds=3"))
    with pytest.raises(ValueError, match="neither an existing file nor an MLflow run id"):
        finetune(_cfg(prepared[0], tmp_path / "c", "encoder=/no/such/encoder.pt"))
    assert not (tmp_path / "a" / "ray").exists()


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


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
    assert set(metrics["summary"]["per_class"]) == {str(c) for c in range(1, 12)}
    assert set(metrics["summary"]["dice_mean"]) == {"mean", "std"}

    # every per-study number is recomputable from predictions/ and the labels
    for ref in select_studies(root, "labeled"):
        from petct.shards import read_shard

        study = read_shard(Path(ref.shard))
        image = sitk.ReadImage(str(out / "predictions" / f"{ref.study_id}.nii.gz"))
        assert image.GetSpacing() == study.spacing and image.GetOrigin() == study.origin
        assert image.GetDirection() == study.direction
        recomputed = jsonable(study_metrics(sitk.GetArrayFromImage(image), study.label, study.spacing))
        stored = metrics["studies"][ref.study_id]
        for key in ("dice", "lesion"):
            for name, value in recomputed[key].items():
                assert (stored[key][name] is None and value is None) or math.isclose(stored[key][name], value), name
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
    assert np.isfinite(metrics["folds"]["0"]["lesion"]["tp"])
