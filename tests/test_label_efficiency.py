"""Label efficiency without Ray: `cv.train_studies` subsets (nested, deterministic, whole patients, validation fold
unchanged), its validation before any training, the sweep axis with a scratch baseline per label count, and the
report's Dice-vs-labelled-studies plot recomputed from a hand-made MLflow store."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from petct.labels import PSMA
from swinssl.config import ConfigError, CVConfig, FinetuneConfig, SweepConfig, load_config
from swinssl.eval.folds import fold_train_val
from swinssl.train.finetune import data_problems, finetune, label_problems, labelled_subset, make_folds
from swinssl.tune.plots import label_curves
from swinssl.tune.report import baseline_for, sweep_report
from swinssl.tune.space import LABELS_KEY, expand_trials

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
# 12 training studies of 7 patients: p0 and p3 have 3 studies, p1 and p5 two, the others one
TRAIN = [f"s{i:02d}" for i in range(12)]
PATIENT = dict(zip(TRAIN, ["p0", "p0", "p0", "p1", "p1", "p2", "p3", "p3", "p3", "p4", "p5", "p5"]))


def _subset(n: int, seed: int = 0, k: int = 0, ids: list[str] = TRAIN) -> list[str]:
    return labelled_subset(CVConfig(seed=seed, train_studies=n), k, ids, PATIENT)


def test_subsets_are_nested_whole_patients_and_minimal() -> None:
    subsets = [_subset(n) for n in range(1, len(TRAIN) + 1)]
    for small, large in zip(subsets, subsets[1:]):
        assert set(small) <= set(large)
    for n, chosen in enumerate(subsets, start=1):
        patients = {PATIENT[s] for s in chosen}
        assert sorted(chosen) == chosen and len(chosen) >= n
        assert set(chosen) == {s for s in TRAIN if PATIENT[s] in patients}  # whole patients only
        # shortest run of patients: without the last one added, fewer than n studies
        assert any(len(chosen) - sum(PATIENT[s] == p for s in TRAIN) < n for p in patients)
    assert _subset(0) == TRAIN and subsets[-1] == TRAIN
    one_each = [f"t{i}" for i in range(9)]  # one study per patient: exactly n
    assert [len(labelled_subset(CVConfig(train_studies=n), 1, one_each, {})) for n in range(1, 10)] == list(
        range(1, 10))


def test_subsets_are_deterministic_from_the_seed_and_fold() -> None:
    shuffled = list(np.random.default_rng(5).permutation(TRAIN))
    assert all(_subset(n) == _subset(n, ids=shuffled) == _subset(n) for n in (1, 4, 7))
    by_seed = {tuple(_subset(3, seed=s)) for s in range(8)}
    by_fold = {tuple(_subset(3, k=k)) for k in range(8)}
    assert len(by_seed) > 1 and len(by_fold) > 1  # seeded per (cv.seed, fold), not a fixed prefix
    with pytest.raises(ValueError, match="fold 2 has 12 training studies"):
        _subset(13, k=2)


def _data_root(tmp_path: Path, labelled: int, unlabelled: int = 0, patients: list[str] | None = None) -> Path:
    """A manifest of empty shards (no read needed: `label_voxels` carries lesion presence), as tests/test_folds.py."""
    (tmp_path / "shards").mkdir(parents=True)
    rows = []
    for order in range(labelled + unlabelled):
        sid, cohort = (f"L{order}", "labeled") if order < labelled else (f"U{order}", "unlabeled")
        (tmp_path / "shards" / f"{sid}.parquet").write_bytes(b"")
        rows.append({"order": order, "study_id": sid, "cohort": cohort, "status": "ok",
                     "shard": f"shards/{sid}.parquet", "shape": [128, 128, 128], "labeled": cohort == "labeled",
                     "patient_id": (patients or [])[order] if order < len(patients or []) else sid,
                     "label_voxels": {"background": 10, PSMA.lesion_name: order % 2} if cohort == "labeled" else None})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_validation_fold_unchanged_and_subset_inside_its_training_set(tmp_path) -> None:
    root = _data_root(tmp_path, 10, patients=["a", "a", "b", "c", "c", "c", "d", "e", "f", "g"])
    cfg = load_config(EXPERIMENTS / "finetune_tiny.yaml", [f"data.root={root}", "cv.train_studies=3"], FinetuneConfig)
    problems, studies, labels = data_problems(cfg)
    assert problems == []
    folds = make_folds(cfg, studies, labels)
    patient_of = {s.study_id: s.patient_id for s in studies}
    for k in range(len(folds)):
        train, val = fold_train_val(folds, k)
        chosen = labelled_subset(cfg.cv, k, train, patient_of)
        assert set(chosen) <= set(train) and not set(chosen) & set(val) and len(chosen) >= 3
        assert {patient_of[s] for s in chosen}.isdisjoint(patient_of[s] for s in val)


def test_too_many_labelled_studies_is_a_config_error_before_training(tmp_path) -> None:
    root = _data_root(tmp_path, 5)  # 2 folds of 5: training sets of 2 and 3 studies
    cfg = load_config(EXPERIMENTS / "finetune_tiny.yaml", [f"data.root={root}", "cv.train_studies=3",
                                                           f"output_dir={tmp_path / 'out'}"], FinetuneConfig)
    folds = make_folds(cfg, *data_problems(cfg)[1:])
    short = [k for k in range(2) if len(fold_train_val(folds, k)[0]) == 2]
    expected = (f"cv.train_studies: 3 labelled training studies requested but fold {short[0]} has only 2 training "
                "studies (of 5 labelled, cv.folds=2)")
    assert label_problems(cfg, folds) == [expected]
    with pytest.raises(ConfigError) as raised:  # finetune() refuses before Ray, folds.json or any training
        finetune(cfg)
    assert expected in raised.value.problems and not (tmp_path / "out" / "folds.json").exists()
    cfg.cv.fold = 1 - short[0]  # only the fold that has 3 training studies runs: fine
    assert label_problems(cfg, folds) == []
    with pytest.raises(ConfigError, match="cv.train_studies: must be >= 0"):
        load_config(EXPERIMENTS / "finetune_tiny.yaml", ["cv.train_studies=-1"], FinetuneConfig)


def test_tiny_sweep_expands_with_a_scratch_baseline_per_label_count(tmp_path) -> None:
    from swinssl.tune.report import Setting
    from swinssl.tune.sweep import _validate, resolve_stage_paths
    from swinssl.tune.trial import stage_configs

    cfg = load_config(EXPERIMENTS / "label_efficiency_tiny.yaml", [], SweepConfig)
    specs = expand_trials(cfg)
    assert [(s.setting, s.init, s.values.get(LABELS_KEY)) for s in specs] == [
        ("labelled=1 n=3", "pretrained", 1), ("labelled=2 n=3", "pretrained", 2),
        ("scratch labelled=1", "scratch", 1), ("scratch labelled=2", "scratch", 2)]
    ctx = {"uri": "", "experiment": "x"}
    cfg = resolve_stage_paths(cfg, EXPERIMENTS / "label_efficiency_tiny.yaml")
    assert [stage_configs(s, cfg, tmp_path, ctx)[1].cv.train_studies for s in specs] == [1, 2, 1, 2]
    settings = [Setting(s.setting, s.init, {k: str(v) for k, v in s.values.items()}, 0) for s in specs]
    assert [baseline_for(s, settings).name for s in settings[:2]] == ["scratch labelled=1", "scratch labelled=2"]
    full = expand_trials(load_config(EXPERIMENTS / "label_efficiency.yaml", [], SweepConfig))
    assert len(full) == 3 * 8 and {s.values[LABELS_KEY] for s in full} == {4, 9, 18, 0}
    assert [full[i].setting for i in (0, 3, 7)] == ["labelled=4 n=760", "labelled=all n=760", "scratch labelled=all"]
    # 3 labelled studies in 2 folds: one fold trains on 1 study, so 2 per fold fails before any trial starts
    root = _data_root(tmp_path / "data", 3, unlabelled=3)
    cfg.data.root, cfg.output_dir = str(root), str(tmp_path / "sweep")
    with pytest.raises(ConfigError, match=r"cv.train_studies: 2 labelled training studies requested but fold \d has "
                                          "only 1 training studies"):
        _validate(cfg, specs, tmp_path / "sweep")


def _store(tmp_path: Path, dice: dict[tuple[str, int], dict[tuple[str, str], float]], axis: bool = True
           ) -> tuple[str, str]:
    """A sweep run, its trial runs ({(setting, labelled): {(seed, fold): dice_mean}}; setting 'scratch' or a
    pretrained name) and their fold runs, as `swinssl sweep` logs them."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("labels")
    sweep = client.create_run(experiment, run_name="tiny", tags={"swinssl.kind": "sweep"}).info.run_id
    trial = 0
    for (name, labelled), folds in dice.items():
        for seed in sorted({s for s, _ in folds}):
            init = "scratch" if name == "scratch" else "pretrained"
            setting = f"{name} labelled={labelled}" if axis else name
            params = {"trial": f"{trial:03d}", "setting": setting, "init": init, "seed": seed,
                      "n_unlabeled": "0" if init == "scratch" else "3",
                      **({LABELS_KEY: str(labelled)} if axis else {}),
                      **({} if init == "scratch" else {"data.subset": "3"})}
            run = client.create_run(experiment, run_name=setting, tags={"swinssl.kind": "sweep-trial",
                                                                        "mlflow.parentRunId": sweep}).info.run_id
            client.log_batch(run, params=[Param(k, str(v)) for k, v in params.items()])
            client.set_terminated(run, "FINISHED")
            trial += 1
            for (s, fold), value in folds.items():
                if s == seed:
                    child = client.create_run(experiment, run_name=f"{setting} fold {fold}", tags={
                        "swinssl.kind": "finetune-fold", "mlflow.parentRunId": run}).info.run_id
                    client.log_batch(child, [Metric("dice_mean", value, 0, 0), Metric("dice/tumor", value, 0, 0)],
                                     [Param("fold", fold), Param("classes", json.dumps(["tumor"]))])
    return uri, sweep


def _recomputed(client: MlflowClient, sweep: str) -> dict[tuple[str, int], tuple[float, float, dict]]:
    """Independently of the report: (init, labelled) -> (mean, sample std (NaN for one fold), {(seed, fold): dice})
    of the fold runs."""
    experiment = client.get_run(sweep).info.experiment_id
    pooled: dict[tuple[str, int], dict] = {}
    for trial in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{sweep}'"):
        key = (trial.data.params["init"], int(trial.data.params[LABELS_KEY]))
        for fold in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{trial.info.run_id}' and "
                                       "tags.`swinssl.kind` = 'finetune-fold'"):  # not the pretraining run
            pooled.setdefault(key, {})[(trial.data.params["seed"], fold.data.params["fold"])] = \
                fold.data.metrics["dice_mean"]
    return {k: (float(np.mean(list(v.values()))),
                float(np.std(list(v.values()), ddof=1)) if len(v) > 1 else math.nan, v) for k, v in pooled.items()}


def test_report_plots_dice_against_labelled_studies(tmp_path) -> None:
    rng = np.random.default_rng(3)
    dice = {(name, n): {(seed, fold): float(base + 0.1 * (n or 8) / 8 + rng.normal(0, 0.02))
                        for seed in ("0", "1") for fold in ("0", "1")}
            for name, base in (("pretrained", 0.5), ("scratch", 0.3)) for n in (1, 2, 0)}
    uri, sweep = _store(tmp_path, dice)
    report = sweep_report(uri, sweep, tmp_path / "out", log=False)
    png = tmp_path / "out" / "dice_vs_labels.png"
    assert png in report.files and png.stat().st_size > 5_000
    truth = _recomputed(MlflowClient(uri), sweep)
    curves = label_curves(report.settings)
    assert [(c.label, c.scratch, c.labelled) for c in curves] == [("pretrained n=3", False, [1, 2, 0]),
                                                                  ("scratch", True, [1, 2, 0])]
    for curve in curves:
        init = "scratch" if curve.scratch else "pretrained"
        for n, mean, std in zip(curve.labelled, curve.mean, curve.std):
            assert math.isclose(mean, truth[(init, n)][0], abs_tol=1e-12)
            assert math.isclose(std, truth[(init, n)][1], abs_tol=1e-12)
    for n in (1, 2, 0):  # each label count is compared with the scratch baseline fine-tuned on as many labels
        ours, base = truth[("pretrained", n)][2], truth[("scratch", n)][2]
        expected = float(np.mean([ours[key] - base[key] for key in ours]))
        assert math.isclose(report.gains[f"pretrained labelled={n}"].gain, expected, abs_tol=1e-12)
        assert report.gains[f"pretrained labelled={n}"].n_pairs == 4


def test_no_label_axis_no_label_plot(tmp_path) -> None:
    uri, sweep = _store(tmp_path, {("scratch", 0): {("0", "0"): 0.3, ("0", "1"): 0.35},
                                   ("pretrained", 0): {("0", "0"): 0.4, ("0", "1"): 0.45}}, axis=False)
    report = sweep_report(uri, sweep, tmp_path / "out", log=False)
    assert label_curves(report.settings) == [] and not (tmp_path / "out" / "dice_vs_labels.png").exists()
    assert len(report.files) == 4


LABELS_TINY = EXPERIMENTS / "label_efficiency_tiny.yaml"
PLOT_ENV = "SWINSSL_LABELS_PLOT"
"""`SWINSSL_LABELS_PLOT=docs/label_efficiency_tiny.png` also saves the e2e test's plot there (the README's picture)."""


@pytest.fixture(scope="module")
def labelled_cohort(tmp_path_factory, ray_session) -> Path:
    """4 labelled + 3 unlabelled small studies prepared through the session's Ray (conftest's `prepared` has only 2
    labelled studies: too few for 2 labelled training studies in each of 2 folds)."""
    from petct.pipeline import prepare_cohort
    from petct.synth import synth_cohort

    csv = synth_cohort(tmp_path_factory.mktemp("labels_cohort"), unlabeled=3, labeled=4, seed=7, scale="small")
    out = tmp_path_factory.mktemp("labels_prepared")
    summary = prepare_cohort(csv, out, workers=2, progress=False)
    assert summary.failed == [], summary.report
    return out


def _trial_runs(client: MlflowClient, sweep_id: str) -> dict[str, object]:
    experiment = client.get_run(sweep_id).info.experiment_id
    return {r.info.run_name: r for r in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{sweep_id}'")}


def _fold_runs(client: MlflowClient, trial) -> list:
    return client.search_runs([trial.info.experiment_id], f"tags.mlflow.parentRunId = '{trial.info.run_id}' and "
                              "tags.`swinssl.kind` = 'finetune-fold'")


def _check_training_sets(out: Path, root: Path, trials: dict, client: MlflowClient) -> None:
    """Each fold trained on `labelled_subset` of its fold's training set: folds.json against an independent split of
    the manifest (validation fold unchanged, subsets nested in N, pretrained and scratch alike), and the fold runs'
    `n_train` / `n_train_available` / `n_val` against it."""
    manifest = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    labelled = sorted(r["study_id"] for r in manifest if r["labeled"] and r["status"] == "ok")
    patient_of = {r["study_id"]: r.get("patient_id") or r["study_id"] for r in manifest}
    specs = {s["name"]: s for s in json.loads((out / "trials.json").read_text())}
    chosen: dict[tuple[str, int], list[str]] = {}
    for name, trial in trials.items():
        n = int(trial.data.params[LABELS_KEY])
        folds = json.loads((out / "trials" / specs[name]["key"] / "finetune" / "folds.json").read_text())
        assert sorted(s for f in folds["folds"] for s in f) == labelled and folds["train_studies"] == n
        assert list(folds["train"]) == ["0"]  # finetune_overrides.cv.fold=0
        val = folds["folds"][0]
        available = sorted(set(labelled) - set(val))
        train = folds["train"]["0"]
        assert train == labelled_subset(CVConfig(seed=folds["seed"], train_studies=n), 0, available, patient_of)
        assert len(train) == n and set(train) <= set(available)  # one study per synthetic patient: exactly N
        chosen[(trial.data.params["init"], n)] = train
        [fold] = _fold_runs(client, trial)
        assert {k: fold.data.params[k] for k in ("fold", "n_train", "n_train_available", "n_val")} == {
            "fold": "0", "n_train": str(n), "n_train_available": str(len(available)), "n_val": str(len(val))}
    assert chosen[("pretrained", 1)] == chosen[("scratch", 1)] and chosen[("pretrained", 2)] == chosen[("scratch", 2)]
    assert set(chosen[("pretrained", 1)]) < set(chosen[("pretrained", 2)])  # nested


def _csv_points(path: Path) -> dict[tuple[str, int], tuple[float, float]]:
    import csv

    with open(path) as handle:
        return {(row["init"], int(row[LABELS_KEY])): (float(row["dice_mean"]), float(row["dice_std"]))
                for row in csv.DictReader(handle)}


@pytest.mark.e2e
def test_tiny_label_efficiency_sweep_end_to_end(labelled_cohort, tmp_path, capsys) -> None:
    """label_efficiency_tiny on real Ray + sqlite MLflow (fold 0 of 2: one Train run per trial), then `swinssl report
    --sweep label_efficiency_tiny`: the plotted points are the fold runs' Dice, recomputed here from MLflow."""
    from swinssl.cli import main
    from swinssl.tune.report import collect
    from swinssl.tune.sweep import resolve_stage_paths, sweep

    out, uri = tmp_path / "sweep", f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = resolve_stage_paths(load_config(LABELS_TINY, [f"data.root={labelled_cohort}", f"output_dir={out}",
                                                        f"tracking.tracking_uri={uri}", "finetune_overrides.cv.fold=0"],
                                          SweepConfig), LABELS_TINY)
    result = sweep(cfg)
    assert result.failed == []
    client = MlflowClient(uri)
    trials = _trial_runs(client, result.run_id)
    assert {name: (r.info.status, r.data.params["init"], r.data.params[LABELS_KEY]) for name, r in trials.items()} == {
        "labelled=1 n=3": ("FINISHED", "pretrained", "1"), "labelled=2 n=3": ("FINISHED", "pretrained", "2"),
        "scratch labelled=1": ("FINISHED", "scratch", "1"), "scratch labelled=2": ("FINISHED", "scratch", "2")}
    _check_training_sets(out, labelled_cohort, trials, client)

    capsys.readouterr()
    report_dir = tmp_path / "report"
    assert main(["report", "--sweep", "label_efficiency_tiny", "--tracking-uri", uri, "--out", str(report_dir)]) == 0
    text = capsys.readouterr().out
    truth = _recomputed(client, result.run_id)  # (init, labelled) -> (mean, std, {(seed, fold): dice})
    assert set(truth) == {("pretrained", 1), ("pretrained", 2), ("scratch", 1), ("scratch", 2)}
    assert all(len(folds) == 1 and not math.isnan(next(iter(folds.values()))) for _, _, folds in truth.values())
    points = _csv_points(report_dir / "report.csv")
    assert set(points) == set(truth)
    for key, (mean, std) in points.items():
        assert math.isclose(mean, truth[key][0], abs_tol=1e-12) and std == 0.0  # one fold: no spread drawn
    curves = label_curves(collect(client, result.run_id))  # exactly what dice_vs_labels.png draws
    assert [(c.label, c.labelled) for c in curves] == [("pretrained n=3", [1, 2]), ("scratch", [1, 2])]
    for curve in curves:
        init = "scratch" if curve.scratch else "pretrained"
        assert curve.mean == [points[(init, n)][0] for n in curve.labelled]
    for n in (1, 2):
        gain = truth[("pretrained", n)][0] - truth[("scratch", n)][0]
        row = next(line for line in text.splitlines() if line.startswith(f"| labelled={n} n=3 |"))
        assert f"{gain:+.3f}" in [cell.strip() for cell in row.split("|")]
    png = report_dir / "dice_vs_labels.png"
    assert png.stat().st_size > 10_000 and str(png) in text
    if os.environ.get(PLOT_ENV):
        shutil.copy(png, os.environ[PLOT_ENV])
