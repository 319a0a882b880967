"""Sweeps: the trial list, the stage configs a trial gets, and a tiny study run end to end on the session's real
Ray with a real sqlite MLflow (a failing trial, a resume that redoes nothing, the report read back from MLflow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from petct.labels import PSMA
from swinssl.cli import main
from swinssl.config import ConfigError, SweepConfig, load_config
from swinssl.data.studies import DataError
from swinssl.tune.space import expand_trials
from swinssl.tune.sweep import _scheduler, max_concurrent_trials, resolve_stage_paths, sweep
from swinssl.tune.trial import FAIL_ENV, stage_configs

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TINY = EXPERIMENTS / "loss_weights_tiny.yaml"


def _cfg(*overrides: str, path: Path = TINY) -> SweepConfig:
    return resolve_stage_paths(load_config(path, list(overrides), SweepConfig), path)


def test_trials_grid_seeds_and_scratch():
    specs = expand_trials(_cfg())
    assert [s.name for s in specs] == ["w_con=1 n=2", "w_con=0 n=2", "w_con=1 n=3", "w_con=0 n=3", "scratch"]
    assert specs[3].values == {"data.subset": "3", "loss.w_contrastive": 0.0} and specs[4].init == "scratch"
    assert len({s.key for s in specs}) == 5
    seeded = expand_trials(_cfg("seeds=[0,1]"))
    assert len(seeded) == 10 and {s.seed for s in seeded} == {0, 1}
    assert [s.setting for s in seeded[:5]] == [s.setting for s in seeded[5:]]  # seeds repeat the settings
    assert seeded[5].name == "w_con=1 n=2 seed=1"


def test_random_search_is_seeded_and_bounded(tmp_path):
    sample = ["search.sample={loss.temperature: {kind: loguniform, low: 0.05, high: 1.0}}", "search.num_samples=3",
              "scratch_baseline=false"]
    first, again = expand_trials(_cfg(*sample)), expand_trials(_cfg(*sample))
    temps = [s.values["loss.temperature"] for s in first]
    assert len(first) == 12 and temps == [s.values["loss.temperature"] for s in again]
    assert all(0.05 <= t <= 1.0 for t in temps) and len(set(temps)) == 12
    assert temps != [s.values["loss.temperature"] for s in expand_trials(_cfg(*sample, "search.seed=1"))]
    with pytest.raises(ConfigError, match="kind: Invalid value 'normal'.*'uniform', 'loguniform', 'choice'"):
        expand_trials(_cfg("search.sample={loss.temperature: {kind: normal}}"))
    (tmp_path / "empty.yaml").write_text("name: empty\nscratch_baseline: false\n")
    with pytest.raises(ConfigError, match="no trials"):
        expand_trials(load_config(tmp_path / "empty.yaml", (), SweepConfig))


def test_stage_configs_carry_the_trial_values(tmp_path):
    cfg = _cfg("data.root=/data/prepared", "search.grid={finetune.optim.lr: [0.01]}")
    spec = expand_trials(cfg)[0]
    ctx = {"uri": "sqlite:////x/mlflow.db", "experiment": "e"}
    pre, fine = stage_configs(spec, cfg, tmp_path / spec.key, ctx)
    assert pre.loss.w_contrastive == 1.0 and pre.data.subset == "2" and pre.data.root == "/data/prepared"
    assert pre.trainer.steps == 3 and pre.trainer.cpus_per_worker == 0.5  # sweep-wide overrides
    assert fine.optim.lr == 0.01 and fine.encoder == str(tmp_path / spec.key / "pretrain" / "encoder.pt")
    assert pre.output_dir == str(tmp_path / spec.key / "pretrain") and fine.tracking.tracking_uri == ctx["uri"]
    scratch = expand_trials(cfg)[-1]
    assert stage_configs(scratch, cfg, tmp_path, ctx)[0] is None
    assert stage_configs(scratch, cfg, tmp_path, ctx)[1].encoder == ""


def test_resources_and_scheduler(ray_session, tmp_path):
    auto = _cfg("max_concurrent_trials=0")
    assert max_concurrent_trials(auto, {"CPU": 1.5, "GPU": 0}) == 2  # 4 logical CPUs in the test session
    assert max_concurrent_trials(auto, {"CPU": 8, "GPU": 0}) == 1
    assert max_concurrent_trials(_cfg("max_concurrent_trials=3"), {"CPU": 8}) == 3
    cfg = _cfg("scheduler.asha=true")
    asha = _scheduler(cfg, expand_trials(cfg), tmp_path)
    # samples, not iterations: 3 steps x batch 2 x 1 worker
    assert asha._time_attr == "samples_seen" and asha._max_t == 6 and asha._metric == "loss"


def test_bad_trial_fails_before_any_trial(prepared, tmp_path):
    out = tmp_path / "sweep"
    with pytest.raises(DataError, match="trial 'w_con=1 n=450'.*only 3"):
        sweep(_cfg(f"data.root={prepared[0]}", f"output_dir={out}", "search.grid={data.subset: ['450']}"))
    assert not (out / "trials.json").exists() and not (out / "tune").exists()


def _runs(client: MlflowClient, experiment_id: str, query: str) -> list:
    return client.search_runs([experiment_id], query, max_results=1000)


E2E_GRID = "search.grid={loss.w_contrastive: [1.0, 0.0], data.subset: ['3']}"
"""The e2e sweep searches both keys of loss_weights_tiny but one subset size: 2 settings + scratch = 3 trials (the
full 2 x 2 grid's expansion is checked above without Ray; each trial costs two Ray Train start-ups)."""
E2E_TRIALS = {"w_con=1 n=3", "w_con=0 n=3", "scratch"}


def _check_mlflow(client: MlflowClient, parent_id: str, failed_name: str) -> dict:
    """Sweep run -> 3 trial runs -> pretraining run + fold run each; returns {trial name: trial run}."""
    parent = client.get_run(parent_id)
    assert parent.data.tags["study"] == "loss_weights_tiny" and parent.data.tags["swinssl.kind"] == "sweep"
    exp = parent.info.experiment_id
    trials = {r.info.run_name: r for r in _runs(client, exp, f"tags.mlflow.parentRunId = '{parent_id}'")}
    assert set(trials) == E2E_TRIALS
    for name, run in trials.items():
        assert run.data.tags["study"] == "loss_weights_tiny" and run.data.params["seed"] == "0"
        children = _runs(client, exp, f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        kinds = sorted(c.data.tags["swinssl.kind"] for c in children)
        if name == failed_name:
            assert run.info.status == "FAILED" and "chaos" in run.data.tags["error"] and kinds == []
            continue
        assert run.info.status == "FINISHED", name
        assert kinds == ["finetune-fold"] + ([] if name == "scratch" else ["pretrain"])
        assert {"dice_mean", "dice/liver"} <= set(run.data.metrics)
        if name != "scratch":
            assert run.data.params["loss.w_contrastive"] in ("1.0", "0.0") and run.data.params["data.subset"] in "23"
            assert run.data.params["n_unlabeled"] == run.data.params["data.subset"]
            assert "pretrain/loss" in run.data.metrics
            pre = next(c for c in children if c.data.tags["swinssl.kind"] == "pretrain")
            assert [m.step for m in client.get_metric_history(pre.info.run_id, "loss")] == [1, 2, 3]
    return trials


def _expected_gain(client: MlflowClient, trials: dict, name: str) -> float:
    """Independently of the report: mean fold Dice of `name` minus the scratch baseline's."""
    def folds(run) -> list[float]:
        exp = run.info.experiment_id
        kids = _runs(client, exp, f"tags.mlflow.parentRunId = '{run.info.run_id}' and tags.`swinssl.kind` = "
                                  f"'finetune-fold'")
        return [k.data.metrics["dice_mean"] for k in kids]

    return float(np.mean(folds(trials[name])) - np.mean(folds(trials["scratch"])))


@pytest.mark.e2e
def test_tiny_sweep_failure_resume_and_report(prepared, tmp_path, ray_session, monkeypatch, capsys):
    out, db = tmp_path / "sweep", tmp_path / "mlflow.db"
    # fine-tune fold 0 of 2 only: half the Train runs per trial (suite time); both folds: tests/test_finetune.py
    overrides = [f"data.root={prepared[0]}", f"output_dir={out}", f"tracking.tracking_uri=sqlite:///{db}",
                 "finetune_overrides.cv.fold=0", E2E_GRID]
    monkeypatch.setenv(FAIL_ENV, "scratch")  # this trial raises on every attempt (its rerun is the cheapest)
    result = sweep(_cfg(*overrides))
    monkeypatch.delenv(FAIL_ENV)
    assert result.failed == ["scratch"]
    failed = next(t for t in result.trials if t["status"] == "FAILED")
    assert "chaos" in failed["error"]
    assert len((out / "trials" / failed["key"] / "attempts").read_text().splitlines()) == 2  # max_failures=1
    client = MlflowClient(f"sqlite:///{db}")
    trials = _check_mlflow(client, result.run_id, "scratch")
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "report")}
    assert artifacts == {f"report/{f}" for f in ("report.md", "report.csv", "dice_vs_size.png",
                                                  "per_class_gain.png")}

    # resume: only the failed trial runs; finished trials keep their files and runs untouched
    finished = {t["key"]: (out / "trials" / t["key"] / "result.json").stat().st_mtime_ns
                for t in result.trials if t["status"] == "FINISHED"}
    runs_before = {r.info.run_id for r in _runs(client, trials["scratch"].info.experiment_id, "")}
    with pytest.raises(ConfigError, match="--resume"):
        sweep(_cfg(*overrides))
    resumed = sweep(_cfg(*overrides), resume=True)
    assert resumed.failed == [] and resumed.run_id == result.run_id
    assert {k: (out / "trials" / k / "result.json").stat().st_mtime_ns for k in finished} == finished
    runs_after = {r.info.run_id for r in _runs(client, trials["scratch"].info.experiment_id, "")}
    new = [client.get_run(r) for r in runs_after - runs_before]
    assert [r.data.tags["swinssl.kind"] for r in new] == ["finetune-fold"]
    assert all(r.data.tags["mlflow.parentRunId"] == trials["scratch"].info.run_id for r in new)
    assert client.get_run(trials["scratch"].info.run_id).info.status == "FINISHED"

    # the report, read back from MLflow by sweep name through the CLI
    capsys.readouterr()
    assert main(["report", "--sweep", "loss_weights_tiny", "--tracking-uri", f"sqlite:///{db}",
                 "--out", str(tmp_path / "report")]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("| w_con=1 n=3 |"))
    gain = _expected_gain(client, _check_mlflow(client, result.run_id, ""), "w_con=1 n=3")
    assert row.split("|")[3].strip() == "1/1" and row.split("|")[6].strip() == f"{gain:+.3f}"
    assert all(f"| {PSMA.name(c)} |" in text for c in PSMA.foreground)  # classes from the fold runs' params
    for png in ("dice_vs_size.png", "per_class_gain.png"):
        assert (tmp_path / "report" / png).stat().st_size > 10_000
    rows = (tmp_path / "report" / "report.csv").read_text().splitlines()
    assert len(rows) == 1 + len(E2E_TRIALS) and rows[0].startswith("setting,init,data.subset,loss.w_contrastive,"
                                                                     "n_unlabeled")
    summary = json.loads((out / "summary.json").read_text())
    assert [t["status"] for t in summary] == ["FINISHED"] * len(E2E_TRIALS)
    assert not math.isnan(float(rows[-1].split(",")[rows[0].split(",").index("dice_mean")]))
