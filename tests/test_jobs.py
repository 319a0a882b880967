"""`ray job submit` end to end: the test starts its own `ray start --head` and `mlflow server` on 127.0.0.1, submits
a tiny pretraining (stopped mid-run and resubmitted: it resumes) and a tiny sweep with the Ray CLI, checks the runs
through MLflow's REST API, and stops exactly the processes it started (never `ray stop`, which would kill every Ray
on the machine, including the session's)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from swinssl.train.checkpoint import latest_checkpoint_dir, load_meta

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answered (the dashboard asks for the auth token): it is up
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer in {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group we started (`ray start --block` tears its cluster down on it), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 8), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(grace)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    port, log = _free_port(), root / "server.log"
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", 90, proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def ray_head():
    """A separate single-node Ray cluster (own ports and temp dir), dashboard and job server on 127.0.0.1."""
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths have a length limit
    ports = {name: _free_port() for name in ("port", "dashboard-port", "ray-client-server-port",
                                             "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                             "runtime-env-agent-port", "metrics-export-port", "node-manager-port",
                                             "object-manager-port")}
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    log = temp / "head.log"
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=4", "--disable-usage-stats",
                             "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
                             *[f"--{k}={v}" for k, v in ports.items()]],
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        _wait_http(f"{address}/api/version", 120, proc, log)
        yield address, env
    finally:
        _stop(proc)


def _ray(env: dict, *args: str, timeout: float = 120) -> str:
    out = subprocess.run([str(BIN / "ray"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"ray {' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr  # the job CLI reports through its logger (stderr)


def _submit(head, job_id: str, entrypoint: str) -> float:
    """`ray job submit --working-dir .` with our two packages shipped as py_modules; returns the submit time."""
    address, env = head
    runtime_env = {"py_modules": ["platform/swinssl", "preprocessing/petct"],
                   "env_vars": {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"}}
    start = time.time()
    _ray(env, "job", "submit", "--address", address, "--working-dir", ".", "--submission-id", job_id, "--no-wait",
         "--runtime-env-json", json.dumps(runtime_env), "--", *shlex.split(entrypoint))
    return start


def _status(head, job_id: str) -> str:
    out = _ray(head[1], "job", "status", job_id, "--address", head[0])
    for phrase, status in (("succeeded", "SUCCEEDED"), ("failed", "FAILED"), ("was stopped", "STOPPED")):
        if f"Job '{job_id}' {phrase}" in out:
            return status
    found = re.findall(rf"Status for job '{job_id}': (\w+)", out)  # PENDING / RUNNING / STOPPING
    return found[-1] if found else "UNKNOWN"


def _wait_job(head, job_id: str, timeout: float = 400) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = _status(head, job_id)
        if status in TERMINAL:
            if status != "SUCCEEDED":
                print(_ray(head[1], "job", "logs", job_id, "--address", head[0])[-6000:])
            return status
        time.sleep(2)
    raise TimeoutError(f"job {job_id} still running after {timeout} s")


def _rest(server: str, endpoint: str, body: dict | None = None) -> dict:
    url = f"{server}/api/2.0/mlflow/{endpoint}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _search(server: str, experiment: str, query: str) -> list[dict]:
    exp = _rest(server, f"experiments/get-by-name?experiment_name={experiment}")["experiment"]["experiment_id"]
    return _rest(server, "runs/search", {"experiment_ids": [exp], "filter": query, "max_results": 100}).get("runs",
                                                                                                             [])


def _tags(run: dict) -> dict:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


@pytest.mark.e2e
def test_job_ships_the_package(ray_head):
    _submit(ray_head, "import-check", "python -c 'import swinssl, petct; print(swinssl.__file__)'")
    assert _wait_job(ray_head, "import-check", 120) == "SUCCEEDED"
    logs = _ray(ray_head[1], "job", "logs", "import-check", "--address", ray_head[0])
    assert "runtime_resources" in logs  # imported from the shipped py_modules, not the local checkout


@pytest.mark.e2e
def test_pretrain_job_stopped_and_resubmitted_resumes(ray_head, mlflow_server, prepared, tmp_path):
    out = tmp_path / "pt"
    cmd = (f"swinssl pretrain experiments/pretrain_tiny.yaml data.root={prepared[0]} output_dir={out} "
           f"tracking.tracking_uri={mlflow_server} tracking.experiment=jobs trainer.steps=5 "
           f"trainer.checkpoint_every=2 trainer.num_workers=1 data.min_crops_per_epoch=16")
    _submit(ray_head, "pt-1", cmd)
    deadline = time.time() + 300
    while (latest_checkpoint_dir(out / "ray" / "pretrain_tiny") is None) and time.time() < deadline:
        assert _status(ray_head, "pt-1") not in TERMINAL, "the job ended before its first checkpoint"
        time.sleep(1)
    _ray(ray_head[1], "job", "stop", "pt-1", "--address", ray_head[0])
    assert _wait_job(ray_head, "pt-1") == "STOPPED"
    logs = _ray(ray_head[1], "job", "logs", "pt-1", "--address", ray_head[0])
    done = max([int(s) for s in re.findall(r"Reporting training result (\d+)", logs)] or [0])
    checkpointed = load_meta(latest_checkpoint_dir(out / "ray" / "pretrain_tiny"))["step"]
    assert 2 <= checkpointed < 5

    resubmitted = _submit(ray_head, "pt-2", cmd)
    assert _wait_job(ray_head, "pt-2") == "SUCCEEDED"
    run = _search(mlflow_server, "jobs", "tags.`swinssl.kind` = 'pretrain'")
    assert len(run) == 1 and run[0]["info"]["status"] == "FINISHED"  # the resubmission reopened the same run
    run_id = run[0]["info"]["run_id"]
    history = _rest(mlflow_server, f"metrics/get-history?run_id={run_id}&metric_key=loss")["metrics"]
    assert sorted(m["step"] for m in history) == list(range(1, 6))  # every step once, none lost or doubled
    first_new = min(m["timestamp"] for m in history if m["step"] == checkpointed + 1) / 1000
    print(f"\njob stop/resubmit: steps done {done}, last checkpoint {checkpointed}, work lost "
          f"{max(done - checkpointed, 0)} steps, recovery (resubmit -> step {checkpointed + 1}) "
          f"{first_new - resubmitted:.1f} s")


@pytest.mark.e2e
def test_sweep_job_logs_to_mlflow_server(ray_head, mlflow_server, prepared, tmp_path):
    out = tmp_path / "sweep"
    cmd = (f"swinssl sweep experiments/dataset_size_tiny.yaml data.root={prepared[0]} output_dir={out} "
           f"tracking.tracking_uri={mlflow_server} 'search.grid={{data.subset: [2]}}' scratch_baseline=false "
           f"finetune_overrides.cv.fold=0")
    _submit(ray_head, "sweep-1", cmd)
    assert _wait_job(ray_head, "sweep-1", 500) == "SUCCEEDED"
    parent = _search(mlflow_server, "swinssl-studies-tiny", "tags.`swinssl.kind` = 'sweep'")
    assert len(parent) == 1 and _tags(parent[0])["study"] == "dataset_size_tiny"
    parent_id = parent[0]["info"]["run_id"]
    children = _search(mlflow_server, "swinssl-studies-tiny", f"tags.mlflow.parentRunId = '{parent_id}'")
    assert [c["info"]["run_name"] for c in children] == ["n=2"]
    assert all(c["info"]["status"] == "FINISHED" for c in children)
    assert all("dice_mean" in {m["key"] for m in c["data"]["metrics"]} for c in children)
    listed = _rest(mlflow_server, f"artifacts/list?run_id={parent_id}&path=report").get("files", [])
    assert {Path(f["path"]).name for f in listed} >= {"report.md", "dice_vs_size.png"}
