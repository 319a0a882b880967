"""Links into the MLflow UI that open the model-training view, and the command that starts the UI.

The MLflow 3 UI opens an experiment on its GenAI overview unless the URL carries `workflowType=machine_learning`
(its hash route reads the view from this query parameter; the browser then remembers the toggle), so every link
swinssl prints carries it. The runs table also takes its search box and sort order from the URL (`searchFilter`,
`orderByKey`, `orderByAsc`); the columns shown are the browser's choice (kept per experiment), not the URL's.
The UI is assumed at `http://127.0.0.1:5000` (`mlflow ui`'s default host and port) unless the tracking URI
is itself an MLflow server (`http(s)://...`), which then serves the UI too.
"""

from __future__ import annotations

import shlex
from urllib.parse import urlencode

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
VIEW = {"workflowType": "machine_learning"}
"""The query that makes the MLflow 3 UI show runs, parameters and metrics instead of the GenAI overview."""


def ui_base(tracking_uri: str = "", host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    """The UI's root: the tracking server when `tracking_uri` is one, else `http://host:port` (`mlflow ui`)."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return f"http://{host}:{port}"


def experiment_url(experiment_id: str, base: str = "", **query: str) -> str:
    """The experiment's runs table in the model-training view; `query`: more of the table's URL state (e.g.
    `searchFilter`, `orderByKey`, `orderByAsc`, as `trials_url` uses)."""
    return f"{base or ui_base()}/#/experiments/{experiment_id}/runs?{urlencode({**VIEW, **query})}"


TRIALS_FILTER = "tags.`swinssl.kind` = 'sweep-trial'"
"""Search filter of sweep trial runs (each has a `setting` param: "Group by" it pools the seeds)."""


def trials_url(experiment_id: str, base: str = "", sweep_run_id: str = "") -> str:
    """The experiment's sweep trial runs (of the sweep run `sweep_run_id` only, if given), best `dice_mean` first.
    Sorting by a metric also lists them flat: sorted by start time (the default) the UI folds child runs under
    their collapsed sweep run."""
    search = TRIALS_FILTER + (f" and tags.mlflow.parentRunId = '{sweep_run_id}'" if sweep_run_id else "")
    return experiment_url(experiment_id, base, searchFilter=search, orderByKey="metrics.`dice_mean`",
                          orderByAsc="false")


def run_url(experiment_id: str, run_id: str, base: str = "") -> str:
    """One run's page (parameters, metrics, artifacts) in the model-training view."""
    return f"{base or ui_base()}/#/experiments/{experiment_id}/runs/{run_id}?{urlencode(VIEW)}"


def ui_command(tracking_uri: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    """The shell command that serves the UI for a local store ('' when `tracking_uri` is a server already)."""
    if tracking_uri.startswith(("http://", "https://")):
        return ""
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)} --host {host} --port {port}"


def run_links(tracking_uri: str, run_id: str, trials: bool = False, host: str = DEFAULT_HOST,
              port: int = DEFAULT_PORT) -> list[str]:
    """Lines to print after a run: how to start the UI, the run's page, its experiment's runs table and, for a
    sweep run (`trials`), its trial runs (`trials_url`). Reads the run's experiment from the store."""
    from mlflow.tracking import MlflowClient

    experiment_id = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    base = ui_base(tracking_uri, host, port)
    command = ui_command(tracking_uri, host, port)
    lines = [f"MLflow run {run_id} in {tracking_uri}"]
    if command:
        lines.append(f"  start the UI: {command}")
    lines.append(f"  run:          {run_url(experiment_id, run_id, base)}")
    lines.append(f"  experiment:   {experiment_url(experiment_id, base)}")
    if trials:
        lines.append(f"  trial runs:   {trials_url(experiment_id, base, run_id)}")
    return lines
