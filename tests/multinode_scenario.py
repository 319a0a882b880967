"""Multi-node fault scenario: tiny pretraining on a simulated 3-node Ray cluster, with a worker process killed and a
worker node lost mid-run; the run must resume from its last checkpoint each time and finish.

    .venv/bin/python tests/multinode_scenario.py --out /tmp/multinode [--prepared PREPARED_DIR]

tests/test_multinode.py runs this in a subprocess: it starts its own cluster (`ray.cluster_utils.Cluster`, one
machine, a process group per node) so it can neither attach to nor disturb the test session's Ray instance. Its Ray
temp dir is private (RAY_TMPDIR), so its `ray_current_cluster` file never redirects another process's `ray.init()`.

Cluster: a head node (1 CPU: driver, Train controller, data tasks) and two worker nodes (2 CPUs each and a custom
resource `train_node: 1`). Each Train worker asks for one `train_node`, so the two workers land on different nodes,
as they would with one GPU node per worker. Storage: Ray Train checkpoints (`<out>/run/ray/`) and MLflow's sqlite
file live in `--out`, a local folder that every simulated node sees because they share one file system; a real
cluster needs shared storage there (NFS, S3, GCS).

Faults: (1) the last-rank worker process SIGKILLs itself after step --kill-step (`SWINSSL_CHAOS_KILL_STEP`, the
mechanism of tests/test_pretrain.py); (2) once step --remove-step is reported, the node of a Train worker is removed
(all its processes SIGKILLed) and --replace-delay s later a replacement node joins, as an autoscaler would.
Per fault it measures the work lost (steps completed since the restored checkpoint, redone after the restart) and
the recovery time (failure -> first step completed after the restart), from a Ray Train callback that timestamps
every report on the controller. Output: `<out>/scenario.json` (read by the test); the process exits non-zero when
the run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from ray.train import UserCallback

TINY = Path(__file__).resolve().parents[1] / "experiments" / "pretrain_tiny.yaml"
SLOT = "train_node"  # custom resource: one per worker node, one per Train worker
WORKER_NODE = {"num_cpus": 2, "resources": {SLOT: 1}}


class StepRecorder(UserCallback):
    """Runs in the Train controller (on the head): appends every report and worker failure, timestamped, to a JSONL
    file. Defined in the script (`__main__`), so Ray pickles it by value into the controller."""

    def __init__(self, path: str):
        self.path = path

    def _write(self, **event) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"t": time.time(), **event}) + "\n")

    def after_report(self, run_context, metrics, checkpoint) -> None:
        self._write(event="report", step=int(metrics[0].get("step", -1)), checkpoint=checkpoint is not None)

    def after_exception(self, run_context, worker_exceptions) -> None:
        self._write(event="exception", ranks=sorted(worker_exceptions),
                    error=str(next(iter(worker_exceptions.values())))[:300])


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def worker_nodes(address: str) -> list[str]:
    """Node ids of the alive Ray Train worker actors (State API, one query)."""
    from ray.util.state import list_actors

    actors = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                         raise_on_missing_output=False)
    return sorted(a.node_id for a in actors)


class FaultInjector:
    """Polled by the main thread while training runs in another (Ray starts a node's processes only from the main
    thread). At the first report of each attempt it records the nodes of the Train workers (one State API query:
    polling the dashboard all the time costs CPU the run needs); once `remove_step` is reported it removes the node
    of a Train worker and, `delay` s later, adds a replacement."""

    def __init__(self, cluster, events: Path, remove_step: int, delay: float):
        self.cluster, self.events, self.remove_step, self.delay = cluster, events, remove_step, delay
        self.attempts: list[dict] = []  # {"t": first report, "nodes": [node ids of the workers]}
        self.fault: dict = {}
        self.seen = 0

    def poll(self) -> None:
        events = read_events(self.events)
        for i in range(self.seen, len(events)):
            if events[i]["event"] == "report" and (i == 0 or events[i - 1]["event"] == "exception"):
                self.attempts.append({"t": events[i]["t"], "nodes": worker_nodes(self.cluster.address)})
            if not self.fault and events[i]["event"] == "report" and events[i]["step"] == self.remove_step:
                self._remove_and_replace()
        self.seen = len(events)

    def _remove_and_replace(self) -> None:
        nodes = {n.node_id: n for n in self.cluster.worker_nodes}
        victim = next(nodes[n] for n in worker_nodes(self.cluster.address) if n in nodes)
        failed_at = time.time()
        self.cluster.remove_node(victim, allow_graceful=False)  # SIGKILL raylet, workers, object store
        time.sleep(self.delay)  # an autoscaler takes minutes; the restart waits for the resources either way
        replacement = self.cluster.add_node(**WORKER_NODE)
        self.fault = {"removed_node": victim.node_id, "replacement_node": replacement.node_id, "t_failure": failed_at,
                      "t_replacement": time.time()}


def fault_stats(events: list[dict], t_failure: float, last_done: int) -> dict:
    """Work lost and recovery time of one fault, from the reports around it. `last_done`: last step completed before
    the failure. The restart must resume at the last checkpoint reported before the failure (first report after it:
    checkpoint + 1); steps_redone = last_done - that checkpoint. steps_after_failure stops at the next failure."""
    before = [e for e in events if e["t"] <= t_failure and e["event"] == "report"]
    after = [e for e in events if e["t"] > t_failure]
    first = next(i for i, e in enumerate(after) if e["event"] == "report")
    reports = []
    for e in after[first:]:
        if e["event"] == "exception":
            break
        reports.append(e)
    detected = next((e["t"] for e in after if e["event"] == "exception"), None)
    resumed_from = reports[0]["step"] - 1
    return {"last_step_done": last_done, "checkpoint_before_failure": max(e["step"] for e in before if e["checkpoint"]),
            "resumed_from_step": resumed_from, "steps_redone": last_done - resumed_from,
            "detect_s": round(detected - t_failure, 2) if detected else None,
            "recovery_s": round(reports[0]["t"] - t_failure, 2), "steps_after_failure": [e["step"] for e in reports]}


def start_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": 0})
    workers = [cluster.add_node(**WORKER_NODE) for _ in range(2)]
    cluster.wait_for_nodes()
    # not cluster.connect(): streaming every worker's log to this driver costs CPU the run needs (the logs stay
    # in the session folder under RAY_TMPDIR)
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    return cluster, workers


def prepared_cohort(arg: str, out: Path) -> Path:
    if arg:
        return Path(arg).resolve()
    from petct.config import PrepareConfig
    from petct.pipeline import prepare_cohort
    from petct.synth import synth_cohort

    csv = synth_cohort(out / "cohort", unlabeled=3, labeled=0, seed=11, scale="small")
    prepare_cohort(csv, out / "prepared", PrepareConfig(qc_png=False), workers=2, progress=False)
    return out / "prepared"


def run_scenario(args: argparse.Namespace, out: Path, cluster, first_nodes: list) -> dict:
    from swinssl.config import load_config
    from swinssl.train.launch import pretrain
    from swinssl.train.worker import CHAOS_ENV

    events = out / "events.jsonl"
    cfg = load_config(TINY, [
        f"data.root={prepared_cohort(args.prepared, out)}", f"output_dir={out / 'run'}", "name=multinode",
        f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}", f"trainer.steps={args.steps}",
        f"data.batch_size={args.batch}",
        f"trainer.checkpoint_every={args.checkpoint_every}", "trainer.max_failures=3",
        f"trainer.resources_per_worker={{{SLOT}: 1}}"])  # one Train worker per worker node
    if args.kill_step:
        os.environ[CHAOS_ENV] = str(args.kill_step)
    injector = FaultInjector(cluster, events, args.remove_step, args.replace_delay)
    started = time.time()
    outcome: dict = {}
    training = threading.Thread(target=_train, args=(pretrain, cfg, events, outcome), daemon=True)
    training.start()
    while training.is_alive():
        if time.time() - started > args.deadline:  # fail with a clean cluster shutdown rather than hang a test
            raise TimeoutError(f"pretraining did not finish in {args.deadline} s; events: {read_events(events)}")
        injector.poll()
        training.join(0.5)
    injector.poll()
    if "error" in outcome:
        raise outcome["error"]
    return summarise(args, out, cluster, first_nodes, injector, outcome["result"], time.time() - started)


def _train(pretrain, cfg, events: Path, outcome: dict) -> None:
    try:
        outcome["result"] = pretrain(cfg, callbacks=[StepRecorder(str(events))])
    except BaseException as exc:  # handed to the main thread, which re-raises it
        outcome["error"] = exc


def summarise(args, out: Path, cluster, first_nodes: list, injector: FaultInjector, result, wall_s: float) -> dict:
    events = read_events(out / "events.jsonl")
    faults = []
    marker = out / "run" / ".chaos_fired"
    if args.kill_step and marker.exists():
        faults.append({"kind": "worker_process_killed", **fault_stats(events, marker.stat().st_mtime, args.kill_step)})
    if injector.fault:
        done = max(e["step"] for e in events if e["event"] == "report" and e["t"] < injector.fault["t_failure"])
        faults.append({"kind": "node_removed", **injector.fault,
                       **fault_stats(events, injector.fault["t_failure"], done)})
    return {
        "storage": str(out / "run" / "ray"), "tracking_uri": result.tracking_uri, "run_id": result.run_id,
        "steps": args.steps, "checkpoint_every": args.checkpoint_every, "final_step": result.metrics.get("step"),
        "head_node": cluster.head_node.node_id, "worker_nodes": [n.node_id for n in first_nodes],
        "attempts": [a["nodes"] for a in injector.attempts], "faults": faults,
        "reports": [e["step"] for e in events if e["event"] == "report"], "wall_s": round(wall_s, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--prepared", default="", help="output of `swinssl prepare` (default: synthesise 3 studies)")
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--checkpoint-every", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2, help="crops per worker per step")
    parser.add_argument("--kill-step", type=int, default=4, help="fault 1 after this step; 0 = off")
    parser.add_argument("--remove-step", type=int, default=7, help="fault 2 once this step is reported")
    parser.add_argument("--replace-delay", type=float, default=1.0)
    parser.add_argument("--deadline", type=float, default=360.0, help="give up (exit 1) after this many seconds")
    parser.add_argument("--keep-logs", action="store_true", help="keep the Ray session logs (always kept on failure)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # A short private temp dir: Unix socket paths must stay < 108 bytes; no shared ray_current_cluster file.
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rmn", dir="/tmp")
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # no progress bars in the test's log
    cluster, first_nodes = start_cluster()
    try:
        summary = run_scenario(args, out, cluster, first_nodes)
    except BaseException:
        print(f"Ray logs kept in {os.environ['RAY_TMPDIR']}/ray/session_latest/logs", file=sys.stderr)
        raise
    finally:
        ray.shutdown()
        cluster.shutdown()
    (out / "scenario.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    if args.keep_logs:
        print(f"Ray logs in {os.environ['RAY_TMPDIR']}/ray/session_latest/logs")
    else:
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
