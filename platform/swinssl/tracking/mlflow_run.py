"""MLflow for swinssl runs: the driver opens (or reopens) the run; rank 0 logs metrics into it by id.

Defaults: `tracking.tracking_uri`, else MLFLOW_TRACKING_URI, else an absolute sqlite file next
to the run folder (`sqlite:////abs/path/mlflow.db`). The run id is kept in `<output_dir>/mlflow_run.json`, so a
resumed or re-submitted run keeps logging into the same MLflow run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from petct.shards import atomic_write_json

from ..config import TrackingConfig

RUN_FILE = "mlflow_run.json"
_PARAM_MAX = 6000  # MLflow's param value limit


def resolve_tracking_uri(tracking: TrackingConfig, output_dir: str | Path) -> str:
    if tracking.tracking_uri:
        return tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(output_dir).resolve().parent / 'mlflow.db'}"


def git_commit() -> str:
    """Commit of the code being run ('' outside a git checkout, e.g. an installed wheel on a cluster node)."""
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def open_run(uri: str, experiment: str, run_name: str, output_dir: str | Path, params: dict[str, Any],
             tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> str:
    """Create the run (params + tags) or reopen the one recorded in output_dir; returns its id."""
    client = _client(uri)
    record = Path(output_dir) / RUN_FILE
    if record.exists():
        saved = json.loads(record.read_text())
        if saved.get("tracking_uri") == uri:
            client.update_run(saved["run_id"], status="RUNNING")
            return saved["run_id"]
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    all_tags = {"mlflow.runName": run_name, "mlflow.source.git.commit": git_commit(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, tags={k: v for k, v in all_tags.items() if v}, run_name=run_name)
    log_params(client, run.info.run_id, params)
    attach_run(output_dir, uri, run.info.run_id, experiment)
    return run.info.run_id


def attach_run(output_dir: str | Path, uri: str, run_id: str, experiment: str) -> None:
    """Make a later `open_run(..., output_dir, ...)` log into an existing run instead of creating one (a sweep
    trial's fine-tuning logs its Dice into the trial run, its folds nest under it)."""
    atomic_write_json(Path(output_dir) / RUN_FILE, {"run_id": run_id, "tracking_uri": uri, "experiment": experiment},
                      indent=None)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    client = _client(uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value)[:_PARAM_MAX])


_SECRET_KEY = re.compile(r"(password|secret|token|api_key|access_key|credential)", re.IGNORECASE)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)


def redact(key: str, value: Any) -> str:
    """A param as MLflow stores it, without secrets: credentials belong in the environment, never in a run."""
    if _SECRET_KEY.search(key):
        return "<redacted>"
    return _URL_CREDENTIALS.sub(r"\g<scheme><redacted>@", str(value))[:_PARAM_MAX]


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, redact(k, v)) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])


def log_run_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    log_params(_client(uri), run_id, params)


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    _client(uri).log_artifact(run_id, str(path), artifact_path)


_METRIC_UNSAFE = re.compile(r"[^\w.\- ]+")


def metric_key(text: str) -> str:
    """`text` as one part of a metric name: MLflow accepts letters, digits, `_.- ` (and `/`, which nests)."""
    return _METRIC_UNSAFE.sub("_", text).strip() or "_"


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Summary metrics in one batch (names as given; see `metric_key`)."""
    buffer = MetricBuffer(uri, run_id)
    buffer.log(metrics, step)
    buffer.flush()


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(uri).set_terminated(run_id, status=status)


class MetricBuffer:
    """Rank-0 metric buffer: `log` keeps, `flush` sends in one batch. Flushed only after a checkpoint is reported,
    so steps redone after a restart are logged once."""

    def __init__(self, uri: str, run_id: str, prefix: str = ""):
        self.uri, self.run_id, self.prefix = uri, run_id, prefix
        self.pending: list = []
        self.logged_through = -1  # nothing skipped: step 0 is a real step for summary metrics

    def resume_after(self, key: str) -> int:
        """Skip steps the run already holds for `key`. A checkpoint can be on storage, and its steps flushed, before
        Ray Train's controller registers it; a run stopped in that window restarts from the previous checkpoint and
        would otherwise log the redone steps twice."""
        history = _client(self.uri).get_metric_history(self.run_id, self.prefix + key)
        self.logged_through = max((m.step for m in history), default=-1)
        return self.logged_through

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        if step <= self.logged_through:
            return

        now = int(time.time() * 1000)
        self.pending += [Metric(self.prefix + k, float(v), now, step) for k, v in metrics.items()]

    def flush(self) -> None:
        if not self.pending:
            return
        client = _client(self.uri)
        for start in range(0, len(self.pending), 500):
            client.log_batch(self.run_id, metrics=self.pending[start:start + 500])
        self.pending = []
