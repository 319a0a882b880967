"""`swinssl report --sweep` on a hand-made MLflow store (sqlite, no Ray): the class columns come from the fold
runs' `classes` param (any label set), else from their `dice/<class>` metrics."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from scipy import stats

from swinssl.tune.report import class_names, sweep_report


def _store(tmp_path, classes: list[str], dice: dict[str, dict[tuple[str, str], float]] | None = None,
           failed: tuple[tuple[str, str], ...] = ()) -> tuple[str, str]:
    """A sweep run with one trial run per (setting, seed) and one fold run per (seed, fold) of `dice`
    ({setting: {(seed, fold): dice_mean}}; default: scratch 0.4 and pretrained 0.5 on seed 0 fold 0); class k's
    Dice is dice_mean + 0.1 k (classes in label order). `failed`: (setting, seed) trials that FAILED (no folds)."""
    dice = dice or {"scratch": {("0", "0"): 0.4}, "pretrained": {("0", "0"): 0.5}}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("report")
    sweep = client.create_run(experiment, run_name="tiny", tags={"swinssl.kind": "sweep"}).info.run_id
    trials = [(name, seed) for name, folds in dice.items() for seed in sorted({s for s, _ in folds})] + list(failed)
    for trial, (name, seed) in enumerate(trials):
        init = "scratch" if name == "scratch" else "pretrained"
        tags = {"swinssl.kind": "sweep-trial", "mlflow.parentRunId": sweep}
        run = client.create_run(experiment, run_name=f"{name} seed={seed}", tags=tags).info.run_id
        for key, value in {"trial": f"{trial:03d}", "setting": name, "init": init, "seed": seed,
                           "n_unlabeled": "3" if init != "scratch" else "0"}.items():
            client.log_param(run, key, value)
        client.set_terminated(run, "FAILED" if (name, seed) in failed else "FINISHED")
        for (s, fold), value in dice[name].items():
            if s != seed:
                continue
            child = client.create_run(experiment, run_name=f"{name} fold {fold}",
                                      tags={"swinssl.kind": "finetune-fold", "mlflow.parentRunId": run}).info.run_id
            metrics = {"dice_mean": value, **{f"dice/{label}": value + 0.1 * i for i, label in enumerate(classes)}}
            client.log_batch(child, [Metric(k, v, 0, 0) for k, v in metrics.items()],
                             [Param("classes", json.dumps(classes)), Param("fold", fold)])
    return uri, sweep


def test_report_columns_are_the_runs_classes(tmp_path):
    from swinssl.tune.report import _fold_classes

    classes = ["tumour", "node"]  # label order, not alphabetical
    uri, sweep = _store(tmp_path, classes)
    report = sweep_report(uri, sweep, tmp_path / "out", log=False)
    assert class_names(report.settings) == classes
    assert "| tumour | 0.400 | 0.500 (+0.100) |" in report.markdown
    assert "| node | 0.500 | 0.600 (+0.100) |" in report.markdown
    header = (tmp_path / "out" / "report.csv").read_text().splitlines()[0].split(",")
    assert [h for h in header if h.startswith("dice/")] == ["dice/tumour", "dice/node"]
    assert all(p.stat().st_size > 5_000 for p in report.files if p.suffix == ".png")

    client = MlflowClient(uri)  # a fold run from before the `classes` param: its dice/<class> metrics, sorted
    old = client.create_run(client.get_run(sweep).info.experiment_id).info.run_id
    for name in classes:
        client.log_metric(old, f"dice/{name}", 0.5)
    client.log_metric(old, "dice_mean", 0.5)
    assert _fold_classes([client.get_run(old)]) == ["node", "tumour"]


def _fold_dice_from_mlflow(client: MlflowClient, sweep: str) -> dict[str, dict[tuple[str, str], float]]:
    """Independently of the report: {setting: {(trial seed, fold param): dice_mean}} of the scored fold runs."""
    experiment = client.get_run(sweep).info.experiment_id
    found: dict[str, dict[tuple[str, str], float]] = {}
    for trial in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{sweep}'"):
        for fold in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{trial.info.run_id}'"):
            if "dice_mean" in fold.data.metrics:
                found.setdefault(trial.data.params["setting"], {})[
                    (trial.data.params["seed"], fold.data.params["fold"])] = fold.data.metrics["dice_mean"]
    return found


def test_report_ci_column_recomputed_from_the_fold_runs(tmp_path):
    rng = np.random.default_rng(0)
    scratch = {(str(s), str(k)): float(rng.uniform(0.3, 0.6)) for s in range(3) for k in range(3)}
    dice = {"scratch": scratch,
            "w=1": {key: v + 0.04 + float(rng.normal(0, 0.01)) for key, v in scratch.items()},
            "w=0": {key: v + float(rng.normal(0, 0.02)) for key, v in scratch.items()
                    if key[0] != "2" and key != ("1", "2")}}  # w=0: seed 2 failed, seed 1 lacks fold 2
    uri, sweep = _store(tmp_path, ["tumour"], dice, failed=(("w=0", "2"),))
    client = MlflowClient(uri)  # an interrupted rerun of a fold: a second fold-0 run without Dice must not count
    trial = client.search_runs([client.get_run(sweep).info.experiment_id], "attributes.run_name = 'w=1 seed=0'")[0]
    client.create_run(trial.info.experiment_id, run_name="w=1 fold 0", tags={
        "swinssl.kind": "finetune-fold", "mlflow.parentRunId": trial.info.run_id})

    report = sweep_report(uri, sweep, tmp_path / "out", log=False)
    folds = _fold_dice_from_mlflow(client, sweep)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in report.markdown.splitlines() if line.startswith("| w=") or line.startswith("| scratch")}
    with open(tmp_path / "out" / "report.csv") as handle:
        table = {row["setting"]: row for row in csv.DictReader(handle)}
    for name in ("w=1", "w=0"):
        keys = sorted(set(folds[name]) & set(folds["scratch"]))
        diffs = np.array([folds[name][k] - folds["scratch"][k] for k in keys])
        n, mean, sd = len(diffs), diffs.mean(), diffs.std(ddof=1)
        half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
        p = 2 * stats.t.sf(abs(mean / (sd / math.sqrt(n))), n - 1)
        # markdown: | setting | unlabelled | ok | Dice | seed std | gain | CI low | CI high | p | significant | pairs |
        assert rows[name][5:10] == [f"{mean:+.3f}", f"{mean - half:+.3f}", f"{mean + half:+.3f}",
                                    f"{p:.3f}" if p >= 0.001 else f"{p:.1e}", "yes" if p < 0.05 else "no"]
        assert rows[name][10] == str(n) == table[name]["pairs"]
        assert float(table[name]["ci_low"]) == pytest.approx(mean - half, abs=1e-9)
        assert float(table[name]["ci_high"]) == pytest.approx(mean + half, abs=1e-9)
        assert float(table[name]["p"]) == pytest.approx(p, rel=1e-6)
    assert rows["w=1"][10] == "9" and rows["w=1"][9] == "yes"  # +0.04 +- 0.01 over 9 pairs: found
    assert rows["w=0"][2] == "2/3" and rows["w=0"][10] == "5"
    assert table["w=0"]["unpaired"].split("; ") == ["seed 1 fold 2: setting lacks it"] + [
        f"seed 2 fold {k}: setting lacks it" for k in range(3)]
    assert "- w=0: trials not finished (seed 2 FAILED), their folds pair with nothing" in report.markdown
    assert "- w=0: 4 unpaired (seed, fold) left out: seed 1 fold 2: setting lacks it; seed 2 fold 0" in report.markdown
    tumour = next(line for line in report.markdown.splitlines() if line.startswith("| tumour |"))
    paired = np.mean([folds["w=0"][k] - folds["scratch"][k] for k in folds["w=0"]])  # class = dice_mean + 0
    assert tumour.split("|")[4].strip().endswith(f"({paired:+.3f})")  # | class | scratch | w=1 | w=0 |
    assert "95 % paired t interval" in report.markdown and rows["scratch"][5:] == ["-"] * 7
    assert report.gains["w=1"].seeds_needed == math.ceil(report.gains["w=1"].pairs_needed / 3)
