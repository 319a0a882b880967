"""`swinssl report --sweep` on a hand-made MLflow store (sqlite, no Ray): the class columns come from the fold
runs' `classes` param (any label set), else from their `dice/<class>` metrics."""

from __future__ import annotations

import json

from mlflow.tracking import MlflowClient

from swinssl.tune.report import class_names, sweep_report


def _store(tmp_path, classes: list[str]) -> tuple[str, str]:
    """A sweep run with a scratch and a pretrained trial, one fold run each (classes in label order)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("report")
    sweep = client.create_run(experiment, run_name="tiny", tags={"swinssl.kind": "sweep"}).info.run_id
    for trial, (init, dice) in enumerate((("scratch", 0.4), ("pretrained", 0.5))):
        tags = {"swinssl.kind": "sweep-trial", "mlflow.parentRunId": sweep}
        run = client.create_run(experiment, run_name=init, tags=tags).info.run_id
        for key, value in {"trial": str(trial), "setting": init, "init": init, "seed": "0",
                           "n_unlabeled": "3" if init != "scratch" else "0"}.items():
            client.log_param(run, key, value)
        client.set_terminated(run)
        fold = client.create_run(experiment, run_name=f"{init} fold 0",
                                 tags={"swinssl.kind": "finetune-fold", "mlflow.parentRunId": run}).info.run_id
        client.log_param(fold, "classes", json.dumps(classes))
        client.log_metric(fold, "dice_mean", dice)
        for i, name in enumerate(classes):
            client.log_metric(fold, f"dice/{name}", dice + 0.1 * i)
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
