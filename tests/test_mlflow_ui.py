"""The MLflow UI shows a sweep's answer. A tiny study is written with our own tracking code, run by run as a sweep
writes it (sweep run -> trial runs via the sweep's own trial-run helper -> fine-tune fold runs; the report and its
summary logged on the sweep run), then served by a real `mlflow ui` and opened, from the link the CLI prints, in
headless Chromium (Playwright driving the system's `chromium`): the trial runs and their Dice must be on the page.

`SWINSSL_MLFLOW_SCREENSHOT=docs/mlflow_ui.png` also saves the page there (the README's picture).
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from mlflow.tracking import MlflowClient

from swinssl.tracking import links, mlflow_run
from swinssl.tune.report import NOTE_TAG, sweep_report
from swinssl.tune.space import TrialSpec
from swinssl.tune.trial import _open_trial_run

EXPERIMENT = "swinssl-ui-test"
CLASSES = ["tumour", "node"]
FOLD_DICE = {  # setting -> seed -> per-fold dice_mean (3 decimals: the UI shows them as written)
    "n=3": {0: [0.611, 0.633], 1: [0.598, 0.642]},
    "n=6": {0: [0.671, 0.689], 1: [0.665, 0.702]},
    "scratch": {0: [0.512, 0.534], 1: [0.507, 0.529]},
}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def build_study(root: Path) -> dict:
    """The tiny study's MLflow store; returns uri, sweep run id and {trial run name: its dice_mean}."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    sweep_id = mlflow_run.open_run(uri, EXPERIMENT, "ui_demo", root / "sweep", {"study": "ui_demo"},
                                   tags={"study": "ui_demo", "swinssl.kind": "sweep"})
    ctx = {"uri": uri, "experiment": EXPERIMENT, "study": "ui_demo", "sweep_name": "ui_demo", "parent_run_id": sweep_id}
    trial_dice = {}
    for index, (setting, seeds) in enumerate((s, d) for s, d in FOLD_DICE.items()):
        for seed, folds in seeds.items():
            init = "scratch" if setting == "scratch" else "pretrained"
            values = {} if init == "scratch" else {"data.subset": setting[2:]}
            spec = TrialSpec(f"{index}{seed}", f"{setting} seed={seed}", setting, init, seed, values)
            trial_dir = root / "trials" / spec.key
            run_id = _open_trial_run(spec, ctx, trial_dir)
            mlflow_run.log_run_params(uri, run_id, {"n_unlabeled": 0 if init == "scratch" else setting[2:]})
            for k, dice in enumerate(folds):
                fold_id = mlflow_run.open_run(uri, EXPERIMENT, f"{spec.name} fold {k}", trial_dir / f"fold_{k}",
                                              {"fold": k, "classes": '["tumour", "node"]'},
                                              {"swinssl.kind": "finetune-fold"}, parent_run_id=run_id)
                mlflow_run.log_metrics(uri, fold_id, {"dice_mean": dice, "dice/tumour": dice - 0.05,
                                                      "dice/node": dice + 0.05})
                mlflow_run.finish_run(uri, fold_id)
            trial_dice[spec.name] = round(_mean(folds), 3)
            mlflow_run.log_metrics(uri, run_id, {"dice_mean": trial_dice[spec.name]})
            mlflow_run.finish_run(uri, run_id)
    sweep_report(uri, sweep_id, root / "report")  # logs the files and the answer onto the sweep run
    mlflow_run.finish_run(uri, sweep_id)
    return {"uri": uri, "sweep": sweep_id, "trials": trial_dice}


def test_sweep_run_carries_the_answer(tmp_path):
    """Per-setting Dice and gain as sweep-run metrics, equal to a recomputation from the fold values; the report
    as the run's description and artifacts; every trial run has the `setting` param that "Group by" pools."""
    study = build_study(tmp_path)
    client = MlflowClient(study["uri"])
    sweep = client.get_run(study["sweep"])
    metrics = sweep.data.metrics
    for setting, seeds in FOLD_DICE.items():
        folds = [d for values in seeds.values() for d in values]
        key = "setting/" + setting.replace("=", "_")
        assert math.isclose(metrics[f"{key}/dice_mean"], _mean(folds), abs_tol=1e-9)
        if setting != "scratch":
            scratch = [d for values in FOLD_DICE["scratch"].values() for d in values]
            assert math.isclose(metrics[f"{key}/gain"], _mean(folds) - _mean(scratch), abs_tol=1e-9)
            assert metrics[f"{key}/gain_ci_low"] < metrics[f"{key}/gain"] < metrics[f"{key}/gain_ci_high"]
    assert "setting/scratch/gain" not in metrics
    assert "| n=6 |" in sweep.data.tags[NOTE_TAG]
    assert {a.path for a in client.list_artifacts(study["sweep"], "report")} >= {"report/report.md",
                                                                               "report/dice_vs_size.png"}
    trials = client.search_runs([sweep.info.experiment_id], links.TRIALS_FILTER)
    assert sorted(r.info.run_name for r in trials) == sorted(study["trials"])
    assert {r.data.params["setting"] for r in trials} == set(FOLD_DICE)


def test_links_open_the_model_training_view(tmp_path):
    study = build_study(tmp_path)
    experiment = MlflowClient(study["uri"]).get_run(study["sweep"]).info.experiment_id
    lines = links.run_links(study["uri"], study["sweep"], trials=True, port=5123)
    assert lines[1].endswith(f"mlflow ui --backend-store-uri {study['uri']} --host 127.0.0.1 --port 5123")
    urls = [line.split()[-1] for line in lines[2:]]
    base = f"http://127.0.0.1:5123/#/experiments/{experiment}"
    assert urls[0] == f"{base}/runs/{study['sweep']}?workflowType=machine_learning"
    assert urls[1] == f"{base}/runs?workflowType=machine_learning"
    query = parse_qs(urlsplit(urls[2].split("#", 1)[1]).query)
    assert query["workflowType"] == ["machine_learning"] and query["orderByKey"] == ["metrics.`dice_mean`"]
    assert query["searchFilter"] == [f"{links.TRIALS_FILTER} and tags.mlflow.parentRunId = '{study['sweep']}'"]
    found = MlflowClient(study["uri"]).search_runs([experiment], query["searchFilter"][0])  # valid MLflow search
    assert sorted(r.info.run_name for r in found) == sorted(study["trials"])
    assert links.ui_base("http://mlflow.lab:8080/") == "http://mlflow.lab:8080"  # a server serves its own UI
    assert links.ui_command("http://mlflow.lab:8080") == ""


def _browser_or_skip() -> tuple[object, str]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]'): the MLflow UI browser test cannot run")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("no `chromium` on PATH (Debian: apt-get install chromium; `make install` does it as root): "
                    "the MLflow UI browser test cannot run")
    return sync_playwright, chromium


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(uri: str, port: int, root: Path) -> subprocess.Popen:
    """`mlflow ui` on 127.0.0.1:port, once it answers (its log in root/mlflow_ui.log)."""
    log = open(root / "mlflow_ui.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host",
                               "127.0.0.1", "--port", str(port), "--workers", "1"], stdout=log, stderr=log)
    deadline = time.monotonic() + 120  # its imports take 10-60 s on a loaded 2-core machine
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return server
        except OSError:
            if server.poll() is not None:
                break
            time.sleep(0.3)
    server.kill()
    pytest.fail("mlflow ui did not start: " + (root / "mlflow_ui.log").read_text()[-2000:])


RETURNING_USER = ("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
                  "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');")
"""The UI opens its assistant panel on a browser's first visit; a returning user has closed it (room for the table)."""


def _toggle_columns(page, names: list[str]) -> None:
    """Tick (or untick) columns in the table's "Columns" menu; the UI keeps the choice per experiment and browser.
    By default it shows no metric or parameter column."""
    page.get_by_role("button", name="Columns").click()
    menu = page.get_by_role("dialog")
    for name in names:
        menu.locator(f'span[title="{name}"]').click()
    page.keyboard.press("Escape")


@pytest.mark.e2e  # a real server and browser (~30 s): part of `make test`, not the fast loop
def test_ui_shows_trials_and_dice(tmp_path):
    sync_playwright, chromium = _browser_or_skip()
    study = build_study(tmp_path)
    port = _free_port()
    printed = [line.split()[-1] for line in links.run_links(study["uri"], study["sweep"], trials=True, port=port)]
    sweep_url, trials_url = printed[2], printed[4]
    server = _serve(study["uri"], port, tmp_path)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            context = browser.new_context(viewport={"width": 1280, "height": 560})
            context.add_init_script(RETURNING_USER)
            page = context.new_page()
            page.goto(trials_url)
            for name in study["trials"]:
                page.get_by_text(name, exact=True).first.wait_for(timeout=30_000)
            listed = page.inner_text("body")
            _toggle_columns(page, ["Dataset", "Source", "Models", "dice_mean", "setting"])  # off, off, off, on, on
            page.get_by_text(str(max(study["trials"].values())), exact=True).first.wait_for(timeout=10_000)
            text = page.inner_text("body")
            page.screenshot(path=str(tmp_path / "mlflow_ui.png"))
            page.goto(sweep_url)  # the sweep run's page: the report as its description, the per-setting metrics
            page.get_by_text("setting/n_6/dice_mean", exact=True).first.wait_for(timeout=20_000)
            sweep_page = page.inner_text("body")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
    best_first = sorted(study["trials"], key=study["trials"].get, reverse=True)
    assert sorted(best_first, key=listed.index) == best_first, "trial runs not listed flat, best Dice first"
    assert "matching runs" in listed and f"{len(best_first)} matching runs" in listed
    cells = text.split("\n")
    for name, dice in study["trials"].items():
        assert str(dice) in cells, f"Dice {dice} of {name} not on the page"  # the UI drops trailing zeros
    assert "Description" in sweep_page and "Dice (mean +- std over folds)" in sweep_page
    assert "0.68175" in sweep_page.split("\n")  # setting/n_6/dice_mean: the mean of its four folds
    assert (tmp_path / "mlflow_ui.png").stat().st_size > 20_000
    if os.environ.get("SWINSSL_MLFLOW_SCREENSHOT"):
        shutil.copy(tmp_path / "mlflow_ui.png", os.environ["SWINSSL_MLFLOW_SCREENSHOT"])


def test_sweep_prints_a_progress_line_per_trial(capsys):
    """What `scripts/demo.sh` shows during its sweep step: a `[sweep]` line per trial started / finished / stopped,
    with the trial's name and Dice (the callback on real Tune `Trial` objects; no Ray needed)."""
    from ray.tune.experiment import Trial

    from swinssl.tune.sweep import PROGRESS_PREFIX, _progress_callback

    progress = _progress_callback(2)
    done, stopped = (Trial("run_trial", config={"trial": {"name": n}}, stub=True) for n in ("n=3 seed=0", "n=6"))
    progress.on_trial_start(0, [done, stopped], done)
    done.run_metadata.last_result = {"dice_mean": 0.61234, "finished": 1}
    progress.on_trial_complete(0, [done, stopped], done)
    stopped.run_metadata.last_result = {"loss": 1.5, "samples_seen": 8}
    progress.on_trial_complete(0, [done, stopped], stopped)
    lines = capsys.readouterr().out.splitlines()
    assert all(line.startswith(PROGRESS_PREFIX + " ") for line in lines) and len(lines) == 3
    assert lines[0].endswith("n=3 seed=0: started") and lines[1].startswith("[sweep] 1/2 done")
    assert lines[1].endswith("n=3 seed=0: finished, dice_mean 0.612")
    assert lines[2].startswith("[sweep] 2/2 done") and lines[2].endswith("n=6: stopped early")
