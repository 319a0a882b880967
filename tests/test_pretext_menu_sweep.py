"""The pretext menu as a sweep (issue 13): named settings (a pretext family with its weights) crossed with the grid,
their validation, and the tiny menu (SimMIM + cross-modal, VoCo, scratch) run end to end on the session's Ray with
a real sqlite MLflow: every trial run carries its setting's weights and its own tasks'
metrics, so the families compare side by side, and the report's gains match a recomputation from the fold runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from swinssl.cli import main
from swinssl.config import ConfigError, SweepConfig, load_config
from swinssl.tasks.registry import registered
from swinssl.tune.space import expand_trials
from swinssl.tune.sweep import resolve_stage_paths, sweep

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TINY = EXPERIMENTS / "pretext_menu_tiny.yaml"
WEIGHTS = [t.weight_key for t in registered() if t.builtin]


def _cfg(*overrides: str, path: Path = TINY) -> SweepConfig:
    return resolve_stage_paths(load_config(path, list(overrides), SweepConfig), path)


def test_settings_cross_the_grid_and_pair_with_their_scratch_baseline():
    full = expand_trials(_cfg(path=EXPERIMENTS / "pretext_menu.yaml"))
    settings = list(dict.fromkeys(t.setting for t in full))
    assert settings == ["classic n=760", "simmim n=760", "xmodal n=760", "voco n=760", "simmim+xmodal n=760",
                        "simmim+voco n=760", "all n=760", "simmim-v2 n=760", "scratch", "scratch use_v2=True"]
    assert len(full) == 3 * len(settings) and {t.seed for t in full} == {0, 1, 2}
    v2 = next(t for t in full if t.setting == "simmim-v2 n=760")
    assert v2.pretrain_overrides()["model.use_v2"] is True and v2.finetune_overrides() == {"model.use_v2": True}
    voco = next(t for t in expand_trials(_cfg()) if t.setting == "voco n=3")
    assert voco.values["data.roi"] == [32, 64, 64] and voco.values["loss.w_voco"] == 1.0
    crossed = expand_trials(_cfg("search.grid={data.subset: ['2', '3']}"))
    assert [t.setting for t in crossed if t.init == "pretrained"] == [
        f"{s} n={n}" for s in ("simmim+xmodal", "voco") for n in (2, 3)]


def test_bad_settings_reported_together():
    with pytest.raises(ConfigError) as caught:
        _cfg("search.settings.bad={loss.w_simmim: -1.0, data.subset: '2', loss.w_nothing: 1.0}")
    text = str(caught.value)
    assert "search.settings.bad.loss.w_simmim: must be >= 0" in text
    assert "search.settings.bad.data.subset: is also a search.grid key" in text
    assert "search.settings.bad.loss.w_nothing" in text


def test_v1_v2_mismatch_refused_before_any_trial(tiny_prepared, tmp_path):
    cfg = _cfg(f"data.root={tiny_prepared}", f"output_dir={tmp_path / 'sweep'}", "search.grid={data.subset: ['2']}",
               "search.settings={v2: {model.use_v2: true, loss.w_voco: 0.0}}", "scratch_baseline=false")
    with pytest.raises(ConfigError, match=r"trial 'v2 n=2': model.use_v2=True pretrains a SwinUNETR-V2 encoder but "
                                          r"finetune.model.use_v2=False"):
        sweep(cfg)
    assert not (tmp_path / "sweep" / "tune").exists()


def _runs(client: MlflowClient, experiment_id: str, query: str) -> list:
    return client.search_runs([experiment_id], query, max_results=1000)


def _fold_dice(client: MlflowClient, run) -> list[float]:
    kids = _runs(client, run.info.experiment_id, f"tags.mlflow.parentRunId = '{run.info.run_id}' and "
                                                 f"tags.`swinssl.kind` = 'finetune-fold'")
    return [k.data.metrics["dice_mean"] for k in kids]


@pytest.mark.e2e
def test_tiny_pretext_menu_sweep_compares_families_side_by_side(prepared, tmp_path, ray_session, capsys):
    out, db = tmp_path / "sweep", tmp_path / "mlflow.db"
    cfg = _cfg(f"data.root={prepared[0]}", f"output_dir={out}", f"tracking.tracking_uri=sqlite:///{db}",
               "finetune_overrides.cv.fold=0")  # fold 0 of 2 only (suite time); both folds: tests/test_finetune.py
    result = sweep(cfg)
    assert result.failed == [], result.trials
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_run(result.run_id).info.experiment_id
    trials = {r.info.run_name: r for r in _runs(client, exp, f"tags.mlflow.parentRunId = '{result.run_id}'")}
    assert set(trials) == {"simmim+xmodal n=3", "voco n=3", "scratch"}
    expected_tasks = {"simmim+xmodal n=3": {"simmim", "xmodal"}, "voco n=3": {"voco"}}
    for name, tasks in expected_tasks.items():
        run = trials[name]
        on = {k.removeprefix("loss.w_") for k in WEIGHTS if float(run.data.params.get(k, 0)) > 0}
        assert on == tasks, name
        losses = {k.removeprefix("pretrain/loss_") for k in run.data.metrics if k.startswith("pretrain/loss_")}
        assert losses == tasks, name
        assert "dice_mean" in run.data.metrics
    directions = {"pretrain/xmodal/ct_from_pet", "pretrain/xmodal/pet_from_ct"}
    assert directions <= set(trials["simmim+xmodal n=3"].data.metrics)
    assert {"pretrain/voco/pos", "pretrain/voco/neg", "pretrain/voco/reg"} <= set(trials["voco n=3"].data.metrics)

    capsys.readouterr()
    assert main(["report", "--sweep", "pretext_menu_tiny", "--tracking-uri", f"sqlite:///{db}",
                 "--out", str(tmp_path / "report")]) == 0
    text = capsys.readouterr().out
    scratch = np.mean(_fold_dice(client, trials["scratch"]))
    for name in expected_tasks:
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        gain = np.mean(_fold_dice(client, trials[name])) - scratch
        assert row.split("|")[6].strip() == f"{gain:+.3f}", row
