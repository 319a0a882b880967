"""Pretraining through real Ray Train + Ray Data + MLflow (sqlite) on the prepared synthetic cohort."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from monai.networks.nets import SwinUNETR

from swinssl.config import ConfigError, load_config
from swinssl.data.studies import DataError, select_studies
from swinssl.models.ssl_head import SSLModel
from swinssl.train.checkpoint import latest_checkpoint_dir, load_state
from swinssl.train.launch import pretrain
from swinssl.train.worker import CHAOS_ENV

TINY = Path(__file__).resolve().parents[1] / "experiments" / "pretrain_tiny.yaml"


def _cfg(prepared_root: Path, out: Path, *overrides: str):
    # check=False, as the CLI does: the driver validates config and data problems together, in one error
    return load_config(TINY, [f"data.root={prepared_root}", f"output_dir={out}",
                              f"tracking.tracking_uri=sqlite:///{out.parent / 'mlflow.db'}", *overrides], check=False)


def test_subsets_follow_curation_order(prepared):
    out, summary = prepared
    unlabeled = [r["study_id"] for r in summary.records if r["cohort"] == "unlabeled"]
    assert [s.study_id for s in select_studies(out, "unlabeled", "all")] == unlabeled
    assert [s.study_id for s in select_studies(out, "unlabeled", "2")] == unlabeled[:2]
    with pytest.raises(DataError, match="only 3"):
        select_studies(out, "unlabeled", "450")
    with pytest.raises(DataError, match="manifest.jsonl"):
        select_studies(out / "shards", "unlabeled", "all")


@pytest.mark.parametrize("overrides, phrases", [
    (["model.feature_size=10"], ["model.feature_size: .*multiple of 12"]),
    (["data.roi=[48,48,48]"], ["data.roi: .*32"]),
    (["data.roi=[256,32,32]"], ["data.roi: .*larger than study"]),
    (["data.subset=0"], ["data.subset: .*positive integer"]),
    (["data.subset=450", "roi=[32,64,32]"], ["data.subset: 450 but", "pretext.rotation_dims: .*equal crop sides"]),
])
def test_bad_configs_fail_before_workers(prepared, tmp_path, overrides, phrases):
    """Config and data problems are found on the driver, all at once, as one ConfigError naming each key (a bare
    `roi=` is set after loading: load_config would already refuse it alone)."""
    with pytest.raises(ConfigError) as caught:
        cfg = _cfg(prepared[0], tmp_path / "run", *[o for o in overrides if not o.startswith("roi=")])
        for override in [o for o in overrides if o.startswith("roi=")]:
            cfg.data.roi = [int(side) for side in override[5:-1].split(",")]
        pretrain(cfg)
    assert len(caught.value.problems) == len(phrases), caught.value.problems
    for phrase in phrases:
        assert any(re.search(phrase, problem) for problem in caught.value.problems), (phrase, caught.value.problems)
    assert not (tmp_path / "run" / "ray").exists()  # nothing was launched


def _metric_steps(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


@pytest.mark.e2e
def test_two_workers_killed_resume_and_export(prepared, tmp_path, ray_session, monkeypatch):
    out = tmp_path / "run"
    cfg = _cfg(prepared[0], out, "trainer.steps=5", "trainer.checkpoint_every=2", "trainer.max_failures=2")
    monkeypatch.setenv(CHAOS_ENV, "3")  # the last worker SIGKILLs itself once, after step 3
    result = pretrain(cfg)
    monkeypatch.delenv(CHAOS_ENV)
    assert (out / ".chaos_fired").exists(), "the fault was not injected"
    assert result.metrics["step"] == 5
    assert load_state(latest_checkpoint_dir(out / "ray" / cfg.name))["loop"]["step"] == 5
    uri, run_id = result.tracking_uri, result.run_id
    assert _metric_steps(uri, run_id, "loss") == [1, 2, 3, 4, 5]  # step 3 redone after the kill, logged once
    for key in ("loss_rotation", "loss_contrastive", "loss_inpainting", "lr", "samples_per_s", "data_wait_fraction"):
        assert _metric_steps(uri, run_id, key) == [1, 2, 3, 4, 5], key

    # a re-submitted run with more steps resumes at step 5 in the same MLflow run
    result = pretrain(_cfg(prepared[0], out, "trainer.steps=7", "trainer.checkpoint_every=2"))
    assert result.run_id == run_id and result.metrics["step"] == 7
    assert _metric_steps(uri, run_id, "loss") == list(range(1, 8))
    checkpoints = sorted(p.name for p in (out / "ray" / cfg.name).glob("checkpoint_*"))
    again = pretrain(_cfg(prepared[0], out, "trainer.steps=7"))  # rerun of a finished command: nothing to train
    assert again.metrics["step"] == 7 and sorted(p.name for p in (out / "ray" / cfg.name).glob("checkpoint_*")) \
        == checkpoints

    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.w_contrastive"] == "1.0" and run.data.params["model.feature_size"] == "12"
    assert run.data.params["data.num_studies"] == "3"
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(run_id)}
    assert {"config.yaml", "encoder.pt"} <= artifacts
    _check_encoder_loads_in_monai(out / "encoder.pt", load_state(latest_checkpoint_dir(out / "ray" / cfg.name)))

    with pytest.raises(ConfigError, match="feature_size"):  # a checkpoint of another model shape is refused
        pretrain(_cfg(prepared[0], out, "model.feature_size=24", "trainer.steps=9"))
    with pytest.raises(ConfigError, match=r"heads: checkpoint \['rotation', 'contrastive', 'inpainting'\] vs config "
                       r"\['rotation', 'inpainting'\].*another output_dir"):  # ... and one with other heads
        pretrain(_cfg(prepared[0], out, "loss.w_contrastive=0", "trainer.steps=9"))


def _check_encoder_loads_in_monai(path: Path, state: dict) -> None:
    trained = SSLModel(in_channels=2, feature_size=12)
    trained.load_state_dict(state["model"])
    expected = {f"swinViT.{k}": v for k, v in trained.swinViT.state_dict().items()}
    weights = torch.load(path, weights_only=True)

    net = SwinUNETR(in_channels=2, out_channels=12, feature_size=12)
    net.load_from(weights)  # MONAI's own path: raises on a missing key
    got = {k: v for k, v in net.state_dict().items() if k.startswith("swinViT.")}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key

    net = SwinUNETR(in_channels=2, out_channels=12, feature_size=12)  # BTCV fine-tuning path
    state_dict = {k.replace("module.", "", 1): v for k, v in weights["state_dict"].items()}
    state_dict = {k.replace("swin_vit", "swinViT"): v for k, v in state_dict.items()}
    missing, _ = net.load_state_dict(state_dict, strict=False)
    assert not [k for k in missing if k.startswith("swinViT.")]
    for key, value in expected.items():
        assert torch.equal(net.state_dict()[key], value), key


def test_mlflow_default_uri_is_absolute_sqlite(tmp_path, monkeypatch):
    from swinssl.config import TrackingConfig
    from swinssl.tracking.mlflow_run import resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_tracking_uri(TrackingConfig(), tmp_path / "run")
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}" and os.path.isabs(uri.removeprefix("sqlite:///"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(TrackingConfig(), tmp_path / "run") == "http://127.0.0.1:5000"
