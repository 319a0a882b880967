"""Two commands at once on one machine: without RAY_ADDRESS every entry point runs on its own local Ray, whatever else
runs there (a `ray start --head`, another swinssl command, the address file of a head killed without `ray stop`);
`RAY_ADDRESS=auto` joins the running head.

The test gives Ray a private temp root (RAY_TMPDIR), so the head's address file, sessions and sockets are its own and
no other Ray on the machine sees them, gives the head free ports, and in the end stops exactly the processes it
started (never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
PROBE = """
import json, os, ray
ray.init(address="auto", log_to_driver=False)
print("JOBS " + json.dumps([{"pid": j["DriverPid"], "dead": j["IsDead"]} for j in ray._private.state.jobs()]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own_processes(marker: str) -> list[int]:
    """Pids whose command line mentions our private temp root (Ray passes its session dir to every process)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _kill_own(marker: str) -> None:
    for pid in _own_processes(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture()
def ray_root():
    """A private RAY_TMPDIR (short: Ray's socket paths have a length limit); every process under it is ours."""
    root = Path(tempfile.mkdtemp(prefix="ri", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(root), "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    try:
        yield root, env
    finally:
        _kill_own(str(root))
        shutil.rmtree(root, ignore_errors=True)


def _start_head(root: Path, env: dict) -> subprocess.Popen:
    ports = {name: _free_port() for name in ("port", "ray-client-server-port", "dashboard-agent-listen-port",
                                             "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                             "metrics-export-port", "node-manager-port", "object-manager-port")}
    log = root / "head.log"
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=1", "--disable-usage-stats",
                             "--include-dashboard=false", "--node-ip-address=127.0.0.1",
                             *[f"--{k}={v}" for k, v in ports.items()]],
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    address_file = root / "ray" / "ray_current_cluster"  # written once the head is up
    deadline = time.time() + 120
    while not (address_file.exists() and address_file.read_text().strip()):
        assert proc.poll() is None, f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no head after 120 s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    return proc


def _one_study_csv(cohort: Path, folder: Path) -> Path:
    row = next(r for r in csv.DictReader(open(cohort)) if r["cohort"] == "unlabeled")
    row.update(ct=str(cohort.parent / row["ct"]), pet=str(cohort.parent / row["pet"]))
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "cohort.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    return folder / "cohort.csv"


def _prepare(csv_path: Path, out: Path, env: dict) -> subprocess.Popen:
    """`swinssl prepare` through Ray (one worker), as a user types it."""
    return subprocess.Popen([sys.executable, "-m", "swinssl.cli", "prepare", "--input", str(csv_path), "--out",
                             str(out), "--workers", "1", "--no-qc", "--no-registration", "--quiet"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, out: Path, timeout: float = 180) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-4000:]
    (row,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert row["status"] == "ok", row
    return output


@pytest.mark.e2e
def test_commands_side_by_side_and_after_a_killed_head(cohort, tmp_path, ray_root):
    root, env = ray_root
    csv_path = _one_study_csv(cohort, tmp_path / "in")
    start = time.time()
    head = _start_head(root, env)
    times = {"head up": time.time() - start}
    try:
        # Two commands at once next to a running head (and its address file): each starts its own local Ray.
        alone = [_prepare(csv_path, tmp_path / f"alone{i}", env) for i in range(2)]
        joined = _prepare(csv_path, tmp_path / "joined", {**env, "RAY_ADDRESS": "auto"})
        outputs = [_finish(p, tmp_path / f"alone{i}") for i, p in enumerate(alone)]
        assert "Connecting to existing Ray cluster" in _finish(joined, tmp_path / "joined")
        assert all("Connecting to existing Ray cluster" not in o for o in outputs)
        times["3 commands side by side"] = time.time() - start - sum(times.values())

        probe = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
        assert probe.returncode == 0, probe.stderr[-3000:]
        drivers = {j["pid"] for j in json.loads(probe.stdout.split("JOBS ", 1)[1])}
        assert joined.pid in drivers  # RAY_ADDRESS=auto really ran on the head ...
        assert not drivers & {p.pid for p in alone}  # ... and the others never touched it
        times["probe"] = time.time() - start - sum(times.values())
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # no `ray stop`: the address file stays behind, pointing at nothing
        head.wait()
        _kill_own(str(root))
    assert (root / "ray" / "ray_current_cluster").read_text().strip()

    times["kill"] = time.time() - start - sum(times.values())
    _finish(_prepare(csv_path, tmp_path / "after_kill", env), tmp_path / "after_kill")
    times["prepare after the SIGKILLed head"] = time.time() - start - sum(times.values())
    print("\n" + ", ".join(f"{k}: {v:.1f} s" for k, v in times.items()))
