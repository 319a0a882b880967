"""The downstream probe during pretraining (swinssl.train.probe): config rules, the head trains and its Dice is
recomputed with MONAI from the saved predictions, `probe/*` metrics in the MLflow pretraining run at the probe
steps, `export: best_probe` exporting the best probe's weights (also after a resume), and ASHA on the probe metric in
a small sweep. Real components throughout: the prepared synthetic cohort, Ray Train, Ray Tune, sqlite MLflow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from petct.labels import read_label_set
from petct.shards import read_shard
from swinssl.config import ConfigError, PretrainConfig, SweepConfig, load_config, validate
from swinssl.tasks.pretrain import PretrainTask
from swinssl.train.probe import Prober, best_record, probe_records
from swinssl.tune.space import expand_trials
from swinssl.tune.sweep import _scheduler, resolve_stage_paths, scheduler_mode, sweep

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TINY = EXPERIMENTS / "pretrain_tiny.yaml"
PROBE = ["probe.folds=2", "probe.steps=30", "probe.lr=0.01", "probe.crops_per_study=4"]
"""A probe that costs seconds on CPU: the fixture cohort has 2 labelled studies (fold 0: train on one, score the
other)."""


def _pretrain_cfg(root: Path, out: Path, *overrides: str, check: bool = False) -> PretrainConfig:
    return load_config(TINY, [f"data.root={root}", f"output_dir={out}",
                              f"tracking.tracking_uri=sqlite:///{out.parent / 'mlflow.db'}", *overrides], check=check)


def test_probe_config_problems_are_reported_together(tmp_path):
    cfg = _pretrain_cfg(tmp_path, tmp_path / "run", "trainer.log_every=2", "probe.every=3", "probe.fold=2",
                        "probe.folds=2", "probe.lr=0")
    with pytest.raises(ConfigError) as caught:
        validate(cfg)
    problems = caught.value.problems
    assert any(p.startswith("probe.every: must be a multiple of trainer.log_every (2)") for p in problems), problems
    assert any(p.startswith("probe.fold: must be a fold index of probe.folds=2") for p in problems), problems
    assert any(p.startswith("probe.lr: must be > 0") for p in problems), problems
    with pytest.raises(ConfigError, match=r"export: 'best_probe' needs the probe on \(probe.every > 0\)"):
        validate(_pretrain_cfg(tmp_path, tmp_path / "run", "export=best_probe"))
    with pytest.raises(ConfigError, match="export: .*not a valid choice.*'last', 'best_probe'"):
        _pretrain_cfg(tmp_path, tmp_path / "run", "export=best", check=True)
    validate(_pretrain_cfg(tmp_path, tmp_path / "run", "probe.every=2", "export=best_probe"))  # fine


def _sweep_cfg(*overrides: str) -> SweepConfig:
    path = EXPERIMENTS / "loss_weights_tiny.yaml"
    return resolve_stage_paths(load_config(path, list(overrides), SweepConfig), path)


def test_scheduler_mode_follows_the_metric(tmp_path):
    assert scheduler_mode(_sweep_cfg()) == "min"
    assert scheduler_mode(_sweep_cfg("scheduler.metric=probe/dice_mean")) == "max"
    assert scheduler_mode(_sweep_cfg("scheduler.metric=probe/dice_mean", "scheduler.mode=min")) == "min"
    cfg = _sweep_cfg("scheduler.asha=true", "scheduler.metric=probe/dice_mean")
    asha = _scheduler(cfg, expand_trials(cfg), tmp_path)
    assert asha._metric == "probe/dice_mean" and asha._mode == "max"
    assert asha._stop_last_trials is False  # the pretraining's last report must not end the trial before fine-tuning
    with pytest.raises(ConfigError, match="scheduler.mode: not a valid choice.*'auto', 'min', 'max'"):
        _sweep_cfg("scheduler.mode=up")


def test_probe_data_problems_fail_before_workers(prepared, tmp_path):
    """The probe's data needs are checked on the driver with everything else, before anything is launched."""
    from swinssl.train.launch import pretrain

    out = tmp_path / "run"
    with pytest.raises(ConfigError) as caught:
        pretrain(_pretrain_cfg(prepared[0], out, "probe.every=2", "probe.folds=3", "data.subset=450"))
    problems = caught.value.problems
    assert any(p.startswith("probe.folds: 3 but data.root has only 2 prepared 'labeled' studies") for p in problems)
    assert any(p.startswith("data.subset: 450 but") for p in problems) and len(problems) == 2, problems
    assert not (out / "ray").exists()


def _recompute_with_monai(record: dict, probe_dir: Path, root: Path) -> dict[str, float]:
    """Per-class Dice of the saved predictions against the shards' labels, by MONAI's DiceMetric (mean over the
    studies holding the class, NaN where none does)."""
    from monai.metrics import DiceMetric

    labels = read_label_set(root)
    metric = DiceMetric(include_background=False, reduction="mean_batch", get_not_nans=True, ignore_empty=True,
                        num_classes=labels.num_classes)
    shards = {p.stem: p for p in (root / "shards").glob("*.parquet")}
    for study_id in record["val_studies"]:
        prediction = np.load(probe_dir / "predictions" / f"{study_id}.npz")["label"]
        truth = read_shard(shards[study_id]).label
        assert prediction.shape == truth.shape
        metric(torch.from_numpy(prediction.astype(np.int64))[None, None],
               torch.from_numpy(truth.astype(np.int64))[None, None])
    per_class, not_nans = metric.aggregate()
    return {labels.name(c): float(per_class[c - 1]) if int(not_nans[c - 1]) else math.nan
            for c in labels.foreground}


def _same(a: float | None, b: float) -> bool:
    return (a is None and math.isnan(b)) or (a is not None and abs(a - b) < 1e-6)


def test_probe_head_trains_and_its_dice_is_monai_dice(prepared, tmp_path):
    root = prepared[0]
    cfg = _pretrain_cfg(root, tmp_path / "run", "probe.every=1", *PROBE, check=True)
    torch.manual_seed(0)
    model = PretrainTask(cfg).build_model()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    metrics = Prober(cfg, tmp_path / "probe")(model, 1)
    assert torch.equal(torch.get_rng_state(), rng)  # the training's RNG is untouched ...
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # ... and so is the model

    record = probe_records(tmp_path / "probe")[0]
    assert record["step"] == 1 and len(record["train_studies"]) == 1 and len(record["val_studies"]) == 1
    assert not set(record["train_studies"]) & set(record["val_studies"])
    losses = record["head_loss"]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])  # the head learns
    recomputed = _recompute_with_monai(record, tmp_path / "probe", root)
    assert all(_same(record["per_class"][name], value) for name, value in recomputed.items()), \
        (record["per_class"], recomputed)
    present = [v for v in recomputed.values() if not math.isnan(v)]
    assert abs(metrics["probe/dice_mean"] - float(np.mean(present))) < 1e-6 and record["dice_mean"] == \
        metrics["probe/dice_mean"]
    assert {k for k in metrics if k.startswith("probe/dice/")} == {f"probe/dice/{n}" for n, v in recomputed.items()
                                                                   if not math.isnan(v)}

    again = Prober(cfg, tmp_path / "again")(model, 1)  # a fresh prober on the same weights: the same numbers
    assert again == metrics
    assert probe_records(tmp_path / "again")[0]["head_loss"] == losses


def test_best_probe_record_keeps_the_first_maximum(tmp_path):
    """`record_best` over a run's probes (and a resumed run's, which re-reads best.json): the weights kept are those of
    the first step with the highest Dice; NaN never wins; one best_<step>/ folder is left."""
    from swinssl.models.ssl_head import SSLModel
    from swinssl.train.checkpoint import load_state
    from swinssl.train.probe import record_best

    seen = {}
    for step, dice in [(2, 0.1), (4, 0.3), (6, 0.3), (8, math.nan), (10, 0.2)]:
        torch.manual_seed(step)
        model = SSLModel(in_channels=2, feature_size=12)
        seen[step] = model.swinViT.patch_embed.proj.weight.clone()
        record_best(tmp_path, model, step, dice)
    best = best_record(tmp_path)
    assert (best["step"], best["dice_mean"]) == (4, 0.3) and best["dir"] == "best_00000004"
    assert [p.name for p in tmp_path.glob("best_*")] == ["best_00000004"]
    kept = load_state(tmp_path / best["dir"])
    assert kept["loop"]["step"] == 4 and torch.equal(kept["model"]["swinViT.patch_embed.proj.weight"], seen[4])
    assert not record_best(tmp_path, SSLModel(in_channels=2, feature_size=12), 4, 0.3)  # a redone probe: kept as is
    assert record_best(tmp_path, SSLModel(in_channels=2, feature_size=12), 12, 0.31)
    assert best_record(tmp_path)["step"] == 12


@pytest.mark.e2e
def test_pretrain_logs_probe_and_exports_best(prepared, tmp_path, ray_session):
    """Two Train workers (rank 0 probes, rank 1 waits in the report), probes at steps 2, 4, 6 logged to MLflow at
    those steps; encoder.pt holds the best probe's weights; a resumed longer run keeps comparing against it."""
    out = tmp_path / "run"
    overrides = ["trainer.steps=6", "trainer.checkpoint_every=3", "probe.every=2", *PROBE, "export=best_probe"]
    result = pretrain_run(prepared[0], out, *overrides)
    records = probe_records(out / "probe")
    assert [r["step"] for r in records] == [2, 4, 6]
    client = MlflowClient(result.tracking_uri)
    history = client.get_metric_history(result.run_id, "probe/dice_mean")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
        [(r["step"], pytest.approx(r["dice_mean"])) for r in records]
    assert sorted(m.step for m in client.get_metric_history(result.run_id, "loss")) == [1, 2, 3, 4, 5, 6]
    assert result.metrics["probe/dice_mean"] == pytest.approx(records[-1]["dice_mean"])
    _check_best_export(out, records)

    resumed = pretrain_run(prepared[0], out, *overrides[1:], "trainer.steps=8")
    records = probe_records(out / "probe")
    assert resumed.run_id == result.run_id and [r["step"] for r in records] == [2, 4, 6, 8]
    _check_best_export(out, records)


def pretrain_run(root: Path, out: Path, *overrides: str):
    from swinssl.train.launch import pretrain

    return pretrain(_pretrain_cfg(root, out, *overrides))


def _check_best_export(out: Path, records: list[dict]) -> None:
    """encoder.pt = the swinViT weights saved at the first step with the highest probe Dice."""
    from swinssl.train.checkpoint import load_state

    values = [r["dice_mean"] for r in records]
    best_step = records[values.index(max(values))]["step"]
    best = best_record(out / "probe")
    assert best["step"] == best_step and best["dice_mean"] == pytest.approx(max(values))
    assert [p.name for p in (out / "probe").glob("best_*")] == [best["dir"]]
    encoder = torch.load(out / "encoder.pt", weights_only=True)
    assert encoder["step"] == best_step and encoder["export"] == "best_probe"
    state = load_state(out / "probe" / best["dir"])["model"]
    swin = {k: v for k, v in state.items() if k.startswith("swinViT.")}
    assert swin and all(torch.equal(encoder["state_dict"][k], v) for k, v in swin.items())


@pytest.mark.e2e
def test_asha_on_the_probe_metric(prepared, tmp_path, ray_session):
    """Two trials, ASHA (mode max) on probe/dice_mean: a stopped trial is one whose probe Dice at the rung was below
    the other's; every Tune result carries the metric; finished trials log it on their MLflow trial run."""
    out, db = tmp_path / "sweep", tmp_path / "mlflow.db"
    cfg = _sweep_cfg(f"data.root={prepared[0]}", f"output_dir={out}", f"tracking.tracking_uri=sqlite:///{db}",
                     "search.grid={loss.w_contrastive: [1.0, 0.0], data.subset: ['3']}", "scratch_baseline=false",
                     "finetune_overrides.cv.fold=0", "scheduler.asha=true", "scheduler.metric=probe/dice_mean",
                     "scheduler.grace_samples=4", "pretrain_overrides.probe.every=2",
                     *[f"pretrain_overrides.{o}" for o in PROBE])
    with pytest.raises(ConfigError, match="grace_samples: 2 but trial .* probes first at 4 samples"):
        sweep(_sweep_cfg(*[f"data.root={prepared[0]}", f"output_dir={tmp_path / 'bad'}",
                           "scheduler.asha=true", "scheduler.metric=probe/dice_mean", "scheduler.grace_samples=2",
                           "pretrain_overrides.probe.every=2", "pretrain_overrides.probe.folds=2"]))
    result = sweep(cfg)
    statuses = {t["name"]: t["status"] for t in result.trials}
    assert set(statuses.values()) <= {"FINISHED", "KILLED"} and "FINISHED" in statuses.values(), result.trials
    at_rung = {}
    for trial_dir in (out / "tune").glob("run_trial_*"):
        rows = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
        assert rows and all("probe/dice_mean" in row for row in rows)
        name = rows[0]["config"]["trial"]["name"]
        at_rung[name] = next(row["probe/dice_mean"] for row in rows if row["samples_seen"] >= 4)
    assert set(at_rung) == set(statuses)
    for name, status in statuses.items():
        if status == "KILLED":  # mode max: stopped only when below the better trial at the rung
            assert at_rung[name] < max(v for n, v in at_rung.items() if n != name), at_rung
    client = MlflowClient(f"sqlite:///{db}")
    for trial in result.trials:
        if trial["status"] == "FINISHED":
            run_id = json.loads((out / "trials" / trial["key"] / "mlflow_run.json").read_text())["run_id"]
            assert "pretrain/probe/dice_mean" in client.get_run(run_id).data.metrics
