"""Data-parallel scaling of pretraining: measured with 1 and 2 Train workers on a simulated cluster, and an analytic
estimate for 8, 16 and 32 GPUs at the reference config.

    python benchmarks/scaling.py [--prepared DIR] [--roi 32] [--feature-size 12] [--batch 2] [--steps 10]
                                 [--warmup 3] [--trials 1] [--mfu 0.4 0.1] [--skip-measured] [--out bench_out/scaling]

1. Measured (this machine, CPU). A `ray.cluster_utils.Cluster` with a head (1 CPU: driver, Train controller, data
   tasks) and two worker nodes (2 CPUs, custom resource `train_node: 1`); each Train worker asks for 1 CPU and one
   `train_node`, so there is one worker per node. `swinssl pretrain` (experiments/pretrain_tiny.yaml: tiny roi and
   feature size, so a step takes a couple of seconds on one core) runs with 1 worker, then with 2, in this one
   process (alternating `--trials` times); samples/s (crops/s) from the MLflow timestamps of step `--warmup` and the
   last step, as benchmarks/step.py. Ideal = 2 x the 1-worker rate; efficiency = measured / ideal. The simulated
   nodes share this machine's cores, so the same command also runs the bare model step (benchmarks/step.py's, one
   thread) in 1 and then 2 processes at once: their ratio is what the cores allow before any platform cost, and
   `efficiency_vs_machine` = platform speed-up / bare speed-up is the part of the loss due to the platform (DDP
   all-reduce over gloo/loopback, Ray Data, report barriers). Nothing here measures network bandwidth.
2. Analytic (reference config: experiments/pretrain.yaml, feature_size 48, roi 96^3, 2 crops = 4 views per GPU,
   activation checkpointing). FLOPs are counted with torch's FlopCounterMode over one forward + backward of
   `PretrainTask.losses` for one crop, then scaled to the per-GPU batch. The 96^3 count runs on the meta device
   (shapes only: on this machine the real CPU pass takes minutes and 6 GB); the pretext ops (rotation, cutout) have
   no matmul/conv FLOPs, so only their shapes are stood in. The benchmark checks that the meta count equals a
   real CPU count at the measured (tiny) config. Step time = FLOPs / (MFU x H100 bf16 dense peak) + exposed
   all-reduce, with the all-reduce of every trainable parameter's fp32 gradient, ring volume 2 (N-1)/N x bytes per
   GPU, over NVLink inside a node (8 GPUs) and InfiniBand across nodes, partly hidden behind the backward pass (DDP
   buckets). One table per `--mfu` value (default 40 % and 10 %). The loader ceiling (crops/s a GPU's CPUs can cut,
   from bench_out/loader/result.json when benchmarks/loader.py has run) is printed beside it.
Result: <out>/result.json (measured and analytic) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "pretrain_tiny.yaml"
REFERENCE = ROOT / "experiments" / "pretrain.yaml"
SLOT = "train_node"
WORKER_NODE = {"num_cpus": 2, "resources": {SLOT: 1}}
H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, dense (no sparsity)
LOADER_CROPS_PER_CPU_S = 11.0  # benchmarks/loader.py, 96^3 crops per CPU second of the whole pipeline (fallback)


# ---------------------------------------------------------------- measured part: simulated cluster


def start_cluster():
    """Head + two 1-worker nodes in a private Ray temp dir (nothing else on the machine can attach to it)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": 0})
    for _ in range(2):
        cluster.add_node(**WORKER_NODE)
    cluster.wait_for_nodes()
    # not cluster.connect(): streaming every worker's log to this driver costs CPU the run needs (the logs stay
    # in the session folder under RAY_TMPDIR)
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    return cluster


def tiny_config(prepared: Path, out: Path, workers: int, args: argparse.Namespace):
    from swinssl.config import load_config

    roi = f"[{args.roi},{args.roi},{args.roi}]"
    return load_config(TINY, [
        f"data.root={prepared}", f"output_dir={out}", f"data.roi={roi}", f"model.feature_size={args.feature_size}",
        f"data.batch_size={args.batch}", f"trainer.steps={args.steps}", f"trainer.num_workers={workers}",
        "trainer.cpus_per_worker=1", f"trainer.resources_per_worker={{{SLOT}: 1}}",
        f"trainer.checkpoint_every={args.steps}", "trainer.log_every=1",
        f"tracking.tracking_uri=sqlite:///{out}.db"])


def measure(prepared: Path, out: Path, workers: int, args: argparse.Namespace) -> dict:
    """One pretraining run with `workers` Train workers; crops/s over steps warmup..steps (all workers)."""
    from mlflow.tracking import MlflowClient

    from swinssl.train.launch import pretrain

    result = pretrain(tiny_config(prepared, out, workers, args))
    client = MlflowClient(result.tracking_uri)
    stamp = {m.step: m.timestamp / 1000.0 for m in client.get_metric_history(result.run_id, "loss")}
    wait = [m.value for m in client.get_metric_history(result.run_id, "data_wait_fraction") if m.step > args.warmup]
    crops = (args.steps - args.warmup) * args.batch * workers
    return {"workers": workers, "samples_per_s": crops / (stamp[args.steps] - stamp[args.warmup]),
            "step_s": (stamp[args.steps] - stamp[args.warmup]) / (args.steps - args.warmup),
            "data_wait_fraction": sum(wait) / max(len(wait), 1)}


def _bare(cfg_dict: dict, steps: int, warmup: int) -> float:
    from step import bare_samples_per_s  # benchmarks/step.py: the model step alone on a fixed batch, one thread

    from swinssl.config import PretrainConfig, from_dict

    return bare_samples_per_s(from_dict(cfg_dict, PretrainConfig), steps, warmup)


def bare_concurrent(cfg, processes: int, args: argparse.Namespace) -> float:
    """Machine ceiling: summed samples/s of `processes` bare model steps running at once, one thread each (no Ray,
    no data, no all-reduce). Two of them on 2 cores show what the cores allow before any platform overhead."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes) as pool:
        return sum(pool.starmap(_bare, [(asdict(cfg), args.steps, args.warmup)] * processes))


def measured_scaling(prepared: Path, out: Path, args: argparse.Namespace) -> dict:
    runs: dict[int, list[dict]] = {1: [], 2: []}
    bare: dict[int, list[float]] = {1: [], 2: []}
    load: list[dict] = []  # 1-min load average around each run: above ~2, other processes took cores
    for trial in range(args.trials):
        for workers in (1, 2):  # alternate, so drift or a busy neighbour hits both alike
            before = os.getloadavg()[0]
            runs[workers].append(measure(prepared, out / f"w{workers}_t{trial}", workers, args))
            load.append({"run": f"platform_{workers}_t{trial}", "start": round(before, 2),
                         "end": round(os.getloadavg()[0], 2)})
            print(f"  {workers} worker(s), trial {trial}: {runs[workers][-1]['samples_per_s']:.3f} samples/s")
        for processes in (1, 2):
            before = os.getloadavg()[0]
            bare[processes].append(bare_concurrent(tiny_config(prepared, out, 1, args), processes, args))
            load.append({"run": f"bare_{processes}_t{trial}", "start": round(before, 2),
                         "end": round(os.getloadavg()[0], 2)})
            print(f"  bare, {processes} process(es), trial {trial}: {bare[processes][-1]:.3f} samples/s")
    one, two = (sum(r["samples_per_s"] for r in runs[w]) / args.trials for w in (1, 2))
    bare_one, bare_two = (sum(bare[p]) / args.trials for p in (1, 2))
    return {"config": {"roi": args.roi, "feature_size": args.feature_size, "batch_per_worker": args.batch,
                       "steps": args.steps, "warmup": args.warmup, "trials": args.trials, "cpus_per_worker": 1,
                       "cluster": "head 1 CPU + 2 worker nodes x 2 CPUs, one Train worker per node",
                       "machine_cores": os.cpu_count()},
            "samples_per_s": {"1": round(one, 4), "2": round(two, 4)}, "ideal_2": round(2 * one, 4),
            "speedup": round(two / one, 3), "efficiency": round(two / (2 * one), 3),
            "bare_samples_per_s": {"1": round(bare_one, 4), "2": round(bare_two, 4)},
            "bare_efficiency": round(bare_two / (2 * bare_one), 3),
            "efficiency_vs_machine": round((two / one) / (bare_two / bare_one), 3), "runs": runs, "bare_runs": bare,
            "load_average_1min": load}


def prepared_cohort(arg: str, out: Path) -> Path:
    """--prepared, else a small synthetic cohort prepared once under <out>/prepared (reused by later runs)."""
    if arg:
        return Path(arg).resolve()
    if (out / "prepared" / "manifest.jsonl").exists():
        return out / "prepared"
    from petct.config import PrepareConfig
    from petct.pipeline import prepare_cohort
    from petct.synth import synth_cohort

    csv = synth_cohort(out / "cohort", unlabeled=4, labeled=0, seed=1, scale="small")
    prepare_cohort(csv, out / "prepared", PrepareConfig(qc_png=False), workers=2, progress=False)
    return out / "prepared"


# ---------------------------------------------------------------- analytic part: FLOPs and all-reduce


def _shape_only(task_class: type) -> type:
    """The task with its pretext views replaced by zero tensors of the same shapes on x's device: lets the meta
    device run `losses` (cutout's early stop reads values). Rotation and cutout have no matmul/conv FLOPs."""

    from swinssl.tasks.registry import Views

    class ShapeOnly(task_class):
        def _views(self, x, generator):
            views = self.copies * x.shape[0]

            def zeros(*shape, dtype=torch.float32):
                return torch.zeros(shape, dtype=dtype, device=x.device)

            return Views(cut=zeros(views, *x.shape[1:]), target=zeros(views, *x.shape[1:]),
                         rotation=zeros(views, dtype=torch.long), holes=zeros(views, 1, *x.shape[2:], dtype=torch.bool),
                         copies=self.copies)

    return ShapeOnly


def count_flops(cfg, crops: int, device: str) -> dict:
    """FLOPs (FlopCounterMode: matmul/conv/attention) of one forward + backward of PretrainTask.losses on `crops`
    crops, and the trainable parameter count. device 'meta' counts from shapes only."""
    from torch.utils.flop_counter import FlopCounterMode

    from swinssl.tasks.pretrain import PretrainTask
    from swinssl.train.loop import step_generator

    task = (_shape_only(PretrainTask) if device == "meta" else PretrainTask)(cfg)
    torch.manual_seed(0)
    model = task.build_model().to(device)  # built on CPU: MONAI's init reads values
    image = torch.rand(crops, cfg.model.in_channels, *cfg.data.roi, device=device)
    with FlopCounterMode(display=False) as counter:
        loss = task.losses(model, {"image": image}, step_generator(0, 0, 0))["loss"]
        forward = counter.get_total_flops()
        loss.backward()
    return {"forward": forward, "total": counter.get_total_flops(),
            "params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def reference_flops(args: argparse.Namespace) -> dict:
    """Per-crop FLOPs at the reference config (with and without the activation-checkpointing recompute), and the
    meta-vs-CPU agreement check at the small measured config."""
    from swinssl.config import load_config

    executed = count_flops(load_config(REFERENCE, ["model.use_checkpoint=true"]), 1, "meta")
    model_only = count_flops(load_config(REFERENCE, ["model.use_checkpoint=false"]), 1, "meta")
    small = load_config(TINY, [f"data.roi=[{args.roi},{args.roi},{args.roi}]",
                               f"model.feature_size={args.feature_size}"])
    cpu, meta = count_flops(small, 2, "cpu"), count_flops(small, 2, "meta")
    return {"per_crop_forward": executed["forward"], "per_crop_total_executed": executed["total"],
            "per_crop_total_model": model_only["total"], "trainable_params": executed["params"],
            "meta_equals_cpu_at_small_config": cpu == meta}


def loader_crops_per_cpu_s() -> float:
    """Crops per CPU second of the Ray Data crop stream at 96^3, from the loader benchmark when it has run."""
    path = ROOT / "bench_out" / "loader" / "result.json"
    if path.exists():
        return float(json.loads(path.read_text())["runs"]["ours_10N"]["crops_per_cpu_s"])
    return LOADER_CROPS_PER_CPU_S


def scaling_rows(flops: dict, mfu: float, args: argparse.Namespace) -> list[dict]:
    """Step time and samples/s for each GPU count in args.gpus (data parallel, fixed batch per GPU)."""
    t_compute = flops["per_crop_total_executed"] * args.crops_per_gpu / (mfu * args.peak_tflops * 1e12)
    backward_share = 1 - flops["per_crop_forward"] / flops["per_crop_total_executed"]
    grad_bytes = flops["trainable_params"] * 4  # DDP all-reduces fp32 gradients (params stay fp32 under autocast)
    rows = []
    for gpus in args.gpus:
        bus = args.intra_gbs if gpus <= args.gpus_per_node else args.inter_gbs
        t_comm = 0.0 if gpus == 1 else 2 * (gpus - 1) / gpus * grad_bytes / (bus * 1e9)
        exposed = max(0.0, t_comm - args.overlap * backward_share * t_compute)
        t_step = t_compute + exposed
        rows.append(_rounded({
            "gpus": gpus, "compute_ms": t_compute * 1e3, "allreduce_ms": t_comm * 1e3, "exposed_ms": exposed * 1e3,
            "step_ms": t_step * 1e3, "samples_per_s": gpus * args.crops_per_gpu / t_step,
            "ideal_samples_per_s": gpus * args.crops_per_gpu / t_compute, "efficiency": t_compute / t_step,
            "efficiency_no_overlap": t_compute / (t_compute + t_comm)}))
    return rows


def analytic_table(flops: dict, args: argparse.Namespace) -> dict:
    loader = loader_crops_per_cpu_s()
    assumptions = {
        "config": "experiments/pretrain.yaml: feature_size 48, roi 96^3, activation checkpointing, bf16",
        "crops_per_gpu": args.crops_per_gpu, "views_per_gpu": 2 * args.crops_per_gpu,
        "peak_tflops": args.peak_tflops, "mfu": args.mfu, "gradient_bytes": flops["trainable_params"] * 4,
        "gpus_per_node": args.gpus_per_node, "intra_node_bus_gb_s": args.intra_gbs,
        "inter_node_bus_gb_s": args.inter_gbs,
        "overlap": f"{args.overlap:.0%} of the backward pass can hide all-reduce (DDP buckets)",
        "loader_crops_per_cpu_s": loader, "cpus_per_gpu": args.cpus_per_gpu,
        "loader_ceiling_samples_per_s_per_gpu": round(args.cpus_per_gpu * loader, 1),
        "not_modelled": "contrastive all_gather (4 x 512 floats per GPU), optimizer step, stragglers; the loader "
                        "ceiling is printed, not folded into the step time"}
    tables = [{"mfu": mfu, "achieved_tflops": mfu * args.peak_tflops, "rows": scaling_rows(flops, mfu, args)}
              for mfu in args.mfu]
    return {"assumptions": assumptions, "flops": flops, "tables": tables}


def _rounded(row: dict) -> dict:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}


def print_table(analytic: dict) -> None:
    a = analytic["assumptions"]
    print(f"\nAnalytic: {a['config']}; {a['crops_per_gpu']} crops/GPU; peak {a['peak_tflops']:.0f} TFLOPS; "
          f"grads {a['gradient_bytes'] / 1e6:.1f} MB; bus {a['intra_node_bus_gb_s']:.0f} GB/s in a node of "
          f"{a['gpus_per_node']}, {a['inter_node_bus_gb_s']:.0f} GB/s across; {a['overlap']}; loader ceiling "
          f"{a['loader_ceiling_samples_per_s_per_gpu']} crops/s per GPU ({a['cpus_per_gpu']} CPUs)")
    for table in analytic["tables"]:
        print(f"\n  at {table['mfu']:.0%} of peak ({table['achieved_tflops']:.0f} TFLOPS)")
        print(f"  {'GPUs':>5} {'compute ms':>11} {'allreduce ms':>13} {'step ms':>8} {'samples/s':>10} {'ideal':>8} "
              f"{'eff':>6} {'eff no-ovl':>10}")
        for r in table["rows"]:
            print(f"  {r['gpus']:>5} {r['compute_ms']:>11.2f} {r['allreduce_ms']:>13.2f} {r['step_ms']:>8.2f} "
                  f"{r['samples_per_s']:>10.0f} {r['ideal_samples_per_s']:>8.0f} {r['efficiency']:>6.1%} "
                  f"{r['efficiency_no_overlap']:>10.1%}")


# ---------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", default="")
    parser.add_argument("--roi", type=int, default=32)
    parser.add_argument("--feature-size", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2, help="crops per worker per step (measured part)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--skip-measured", action="store_true", help="analytic part only")
    parser.add_argument("--crops-per-gpu", type=int, default=2, help="reference: 2 crops x 2 views")
    parser.add_argument("--mfu", type=float, nargs="+", default=[0.4, 0.1],
                        help="achieved shares of the peak, one table each (0.4: the planning figure; 0.1: closer to "
                             "what window attention on 7^3 windows with small heads tends to reach)")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    parser.add_argument("--intra-gbs", type=float, default=300.0, help="all-reduce bus bandwidth in a node (NVLink)")
    parser.add_argument("--inter-gbs", type=float, default=80.0, help="across nodes (4 x 200 Gb/s InfiniBand)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--cpus-per-gpu", type=int, default=4, help="experiments/pretrain.yaml cpus_per_worker")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--out", default="bench_out/scaling")
    return parser.parse_args(argv)


def run_measured(args: argparse.Namespace, out: Path) -> dict:
    # private Ray temp dir: this cluster's address file must not redirect another process's ray.init()
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rsc", dir="/tmp")
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    cluster = start_cluster()
    try:
        prepared = prepared_cohort(args.prepared, out)
        with tempfile.TemporaryDirectory(dir=out) as runs:
            return measured_scaling(prepared, Path(runs), args)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started, load_start = time.time(), os.getloadavg()[0]
    measured = None if args.skip_measured else run_measured(args, out)
    analytic = analytic_table(reference_flops(args), args)
    result = {"measured": measured, "analytic": analytic, "wall_s": round(time.time() - started, 1),
              "load_average_1min": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)}}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    if measured:
        m = measured
        print(f"\nMeasured (CPU, simulated nodes): 1 worker {m['samples_per_s']['1']} samples/s, 2 workers "
              f"{m['samples_per_s']['2']} (ideal {m['ideal_2']}): efficiency {m['efficiency']:.1%}; bare model step, "
              f"1 vs 2 processes at once: {m['bare_samples_per_s']['1']} vs {m['bare_samples_per_s']['2']} "
              f"(efficiency {m['bare_efficiency']:.1%}: what {m['config']['machine_cores']} cores allow); platform vs "
              f"that: {m['efficiency_vs_machine']:.1%}")
    print_table(analytic)
    print(f"\nmeta FLOP count == CPU count at the small config: {analytic['flops']['meta_equals_cpu_at_small_config']};"
          f" wall {result['wall_s']} s; load average {result['load_average_1min']}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
