"""Benchmark the pretraining crop stream (Ray Data over Parquet shards) against the MONAI reference loader.

    python benchmarks/loader.py [--studies 4] [--roi 96 96 96] [--crops-per-study 2] [--passes 20] [--trials 2]
                                [--no-variants] [--out bench_out/loader]

What it measures, all in this one process so the ratios hold on a noisy machine, with 2 CPUs for each loader:
1. Data: a full-scale synthetic cohort of N unlabelled studies, prepared (`prepare_cohort`, 2 workers, no QC PNGs)
   and exported to NIfTI (`export_study`), so both loaders read the same prepared volumes: ours as one-study Parquet
   shards (float16), the baseline as ct.nii.gz + pet.nii.gz pairs (float32, [0, 1]). Reused when already there.
2. Baseline, what research-contributions SwinUNETR/Pretrain does: LoadImaged + EnsureChannelFirstd + ConcatItemsd
   (2 channels) + ScaleIntensityRanged + RandSpatialCropSamplesd(roi, crops per study) in a torch DataLoader with
   2 workers (list_data_collate, shuffled), over the N pairs listed `--passes` times.
3. Ours: `crop_dataset(...)` on a fresh `ray.init(num_cpus=2)`, consumed on the driver with
   `iter_torch_batches(batch_size, drop_last=True, local_shuffle_buffer_size=8)` as a Train worker does, over the
   N shards listed `--passes` times (throughput), once (N) and 10 times (10N).
   Throughput: crops delivered as torch tensors per second after the first batch (warm-up excluded for both); also
   over the middle 80% of the batches (`crops_per_s_mid80`: no start-up, no pipeline fill or drain). Baseline and
   ours alternate `--trials` times and the rates are averaged, so a busy neighbour on the machine slows both alike;
   `crops_per_cpu_s` (crops per CPU second of the whole tree) does not depend on the neighbour at all.
4. Memory of the whole process tree (this driver and every descendant: Ray's GCS, raylet, agents, workers, or the
   DataLoader workers): peak of the summed RSS sampled every 0.2 s; peak summed PSS (which counts shared
   object-store pages once) and object-store usage (Ray's memory summary), every second; CPU seconds per process
   kind (`cpu_use_of_2_cores`: their sum over 2 x the run's wall time).
5. Where the time goes, per study in this process (one thread): read + decode one shard as the crop task does
   (and without the `to_pylist` copy), cut the crops (of which the whole-volume body mask), versus load one NIfTI
   pair and run the rest of the reference chain. `ideal_crops_per_s` = 2 CPUs / that per-study cost.
6. Diagnostics (skip with --no-variants): ours again with Ray Data's operator resource reservation off, and with
   `read_cpus=0.5` (two read tasks per CPU).
`load_average_1min` (start, end) tells whether other processes competed for the 2 cores (anything near or above 2).
Goals: ours >= 5x the baseline's crops/s; peak RSS streaming 10N within 15% of streaming N (flat in cohort size).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import psutil

SAMPLE_PERIOD_S = 0.2
SLOW_EVERY = 5  # PSS (parses smaps) and object store (an RPC to the raylet, ~40 ms): every 5th tick
SHUFFLE_BUFFER = 8
TASK_NAMES = ("ray::IDLE", "ray::MapBatches", "ray::ReadItems", "ray::FromItems", "ray::RandomizeBlockOrder")


# --------------------------------------------------------------------------------------------------- data


def build_cohort(out: Path, studies: int, seed: int) -> tuple[list[str], list[dict[str, str]]]:
    """Shard paths and NIfTI pairs of N prepared unlabelled studies, built unless already there."""
    from swinssl.data.studies import select_studies

    prepared, nifti = out / "prepared", out / "nifti"
    if not cohort_ready(prepared, nifti, studies):
        prepare(out, studies, seed)
    refs = select_studies(prepared, "unlabeled")
    pairs = [{key: str(nifti / r.study_id / f"{key}.nii.gz") for key in ("ct", "pet")} for r in refs]
    return [r.shard for r in refs], pairs


def cohort_ready(prepared: Path, nifti: Path, studies: int) -> bool:
    from swinssl.data.studies import DataError, select_studies

    try:
        refs = select_studies(prepared, "unlabeled")
    except DataError:
        return False
    return len(refs) == studies and all((nifti / r.study_id / "pet.nii.gz").exists() for r in refs)


def prepare(out: Path, studies: int, seed: int) -> None:
    """Synthesise (full scale), prepare through Ray with 2 workers (no QC PNGs), export every study to NIfTI."""
    import ray

    from petct.config import PrepareConfig
    from petct.export import export_study
    from petct.pipeline import prepare_cohort
    from petct.synth import synth_cohort

    for folder in ("cohort", "prepared", "nifti"):
        shutil.rmtree(out / folder, ignore_errors=True)
    cohort_csv = synth_cohort(out / "cohort", unlabeled=studies, labeled=0, seed=seed, scale="full")
    start_ray()
    try:
        summary = prepare_cohort(cohort_csv, out / "prepared", PrepareConfig(qc_png=False), workers=2, progress=False)
    finally:
        ray.shutdown()
    if summary.failed:
        raise SystemExit(f"prepare failed: {summary.failed}")
    for record in summary.records:
        export_study(out / "prepared", record["study_id"], out / "nifti" / record["study_id"])


def start_ray() -> None:
    import ray

    # address="local": always a fresh instance of our own, even when another `ray start` cluster runs here
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)


# ------------------------------------------------------------------------------------- process-tree monitor


def load_psutil():
    """psutil ships inside Ray (ray/thirdparty_files), which `import ray` puts on sys.path."""
    import importlib

    import ray  # noqa: F401

    return importlib.import_module("psutil")


def process_kind(proc: psutil.Process, root: psutil.Process) -> str:
    """driver / ray_tasks (the crop tasks' workers) / loader_workers / any other process by its title or script."""
    if proc.pid == root.pid:
        return "driver"
    name = proc.name()
    if name.startswith(TASK_NAMES):
        return "ray_tasks"
    if not name.startswith("python"):
        return name.split(".")[0]
    command = proc.cmdline()
    if command == root.cmdline():
        return "loader_workers"  # forked DataLoader workers
    scripts = [Path(part).name for part in command if part.endswith(".py")]
    return scripts[0] if scripts else name  # Ray's helpers: log_monitor.py, monitor.py, ...


def object_store_mib() -> float:
    """Plasma usage from Ray's memory summary; 0 without a running Ray."""
    import re

    import ray

    if not ray.is_initialized():
        return 0.0
    from ray._private.internal_api import memory_summary

    try:
        found = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
    except Exception:  # the summary is best effort (private API)
        return 0.0
    return float(found.group(1)) if found else 0.0


class TreeMonitor:
    """Context manager sampling the process tree in a daemon thread: peak summed RSS / PSS, peak object-store
    usage, and CPU seconds spent inside the block per process kind (last sample of each process)."""

    def __init__(self) -> None:
        self.psutil = load_psutil()
        self.root = self.psutil.Process()
        self.rss = self.pss = 0
        self.store_mib = 0.0
        self.cpu_start: dict[int, float] = {}
        self.cpu_last: dict[int, tuple[str, float]] = {}
        self.wall = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMonitor:
        self.cpu_start = {pid: cpu for pid, (_, cpu) in self._sample().items()}
        self.wall = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall = time.perf_counter() - self.wall

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(SAMPLE_PERIOD_S):
            slow = tick % SLOW_EVERY == 0
            self._sample(pss=slow)
            if slow:
                self.store_mib = max(self.store_mib, object_store_mib())
            tick += 1

    def _sample(self, pss: bool = False) -> dict[int, tuple[str, float]]:
        total_rss = total_pss = 0
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                with proc.oneshot():
                    memory, cpu = proc.memory_full_info() if pss else proc.memory_info(), proc.cpu_times()
                    self.cpu_last[proc.pid] = (process_kind(proc, self.root), cpu.user + cpu.system)
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                continue
            total_rss, total_pss = total_rss + memory.rss, total_pss + getattr(memory, "pss", 0)
        self.rss, self.pss = max(self.rss, total_rss), max(self.pss, total_pss)
        return self.cpu_last

    def report(self) -> dict[str, Any]:
        cpu: dict[str, float] = {}
        for pid, (kind, seconds) in self.cpu_last.items():
            cpu[kind] = cpu.get(kind, 0.0) + seconds - self.cpu_start.get(pid, 0.0)
        cpu = dict(sorted(((k, round(v, 2)) for k, v in cpu.items() if v >= 0.05), key=lambda kv: -kv[1]))
        return {"rss_peak_mb": round(self.rss / 2**20, 1), "pss_peak_mb": round(self.pss / 2**20, 1),
                "object_store_peak_mib": self.store_mib, "cpu_s": cpu,
                "cpu_use_of_2_cores": round(sum(cpu.values()) / (2 * self.wall), 2)}


# ---------------------------------------------------------------------------------------------- streaming


def consume(images: Iterable, crop_shape: tuple[int, ...]) -> dict[str, float]:
    """Drain a stream of crop batches, checking each is a torch tensor (B, *crop_shape); rates count crops after
    the first batch, and over the middle 80% of batches."""
    import torch

    start, stamps, sizes = time.perf_counter(), [], []
    for batch in images:
        if not isinstance(batch, torch.Tensor) or tuple(batch.shape[1:]) != crop_shape:
            raise TypeError(f"expected tensor batches (B, {crop_shape}), got {type(batch)} {batch.shape}")
        stamps.append(time.perf_counter())
        sizes.append(int(batch.shape[0]))
    if len(stamps) < 2:
        raise ValueError("need at least two batches to time a stream")
    first, last = 0, len(stamps) - 1
    low, high = len(stamps) // 10, len(stamps) - 1 - len(stamps) // 10
    return {"crops": sum(sizes[1:]), "crops_total": sum(sizes), "warmup_s": round(stamps[0] - start, 2),
            "steady_s": round(stamps[last] - stamps[first], 2),
            "crops_per_s": rate(sizes, stamps, first, last), "crops_per_s_mid80": rate(sizes, stamps, low, high)}


def rate(sizes: list[int], stamps: list[float], low: int, high: int) -> float:
    """Crops of batches low+1..high over the time from batch low to batch high."""
    seconds = stamps[high] - stamps[low]
    return round(sum(sizes[low + 1:high + 1]) / seconds, 2) if seconds > 0 else float("inf")


def finish(studies: int, stream: dict[str, Any], monitor: TreeMonitor) -> dict[str, Any]:
    """One run's record; `crops_per_cpu_s` (all crops over all CPU seconds of the tree) does not depend on how
    much of the 2 cores other processes on the machine left to this one."""
    usage = monitor.report()
    cpu = sum(usage["cpu_s"].values())
    return {"studies_streamed": studies, **stream, **usage, "crops_per_cpu_s": round(stream["crops_total"] / cpu, 2)}


def ours(shards: list[str], args: argparse.Namespace, repeats: int, read_cpus: float = 1.0,
         context: dict[str, Any] | None = None) -> dict[str, Any]:
    """Our crop stream over the shards listed `repeats` times, on a fresh 2-CPU Ray; `context` overrides
    DataContext fields for this run only."""
    import ray
    import ray.data

    from swinssl.data.pipeline import crop_dataset

    ctx = ray.data.DataContext.get_current()
    saved = {key: getattr(ctx, key) for key in context or {}}
    start_ray()
    try:
        for key, value in (context or {}).items():
            setattr(ctx, key, value)
        with TreeMonitor() as monitor:
            crops = len(shards) * args.crops_per_study * repeats
            dataset = crop_dataset(shards, tuple(args.roi), args.crops_per_study, seed=args.seed,
                                   read_cpus=read_cpus, min_crops_per_epoch=crops)
            batches = dataset.iter_torch_batches(batch_size=args.batch_size, drop_last=True,
                                                 local_shuffle_buffer_size=SHUFFLE_BUFFER)
            stream = consume((b["image"] for b in batches), (2, *args.roi))
    finally:
        ray.shutdown()
        for key, value in saved.items():
            setattr(ctx, key, value)
    return finish(len(shards) * repeats, stream, monitor)


def monai_steps(roi: list[int], crops_per_study: int) -> list[Callable]:
    """The reference pretraining's transform chain on an already normalised 2-channel pair."""
    from monai.transforms import (
        ConcatItemsd,
        DeleteItemsd,
        EnsureChannelFirstd,
        LoadImaged,
        RandSpatialCropSamplesd,
        ScaleIntensityRanged,
    )

    return [
        LoadImaged(keys=["ct", "pet"]),
        EnsureChannelFirstd(keys=["ct", "pet"]),
        ConcatItemsd(keys=["ct", "pet"], name="image", dim=0),
        DeleteItemsd(keys=["ct", "pet"]),  # the reference has a single image key; do not ship the volumes
        ScaleIntensityRanged(keys=["image"], a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
        RandSpatialCropSamplesd(keys=["image"], roi_size=roi, num_samples=crops_per_study, random_size=False),
    ]


def monai(pairs: list[dict[str, str]], args: argparse.Namespace, repeats: int) -> dict[str, Any]:
    """MONAI Dataset + torch DataLoader (2 workers) over the NIfTI pairs listed `repeats` times."""
    from monai.data import DataLoader, Dataset, list_data_collate
    from monai.transforms import Compose

    dataset = Dataset(pairs * repeats, Compose(monai_steps(args.roi, args.crops_per_study)))
    loader = DataLoader(dataset, batch_size=max(1, args.batch_size // args.crops_per_study), shuffle=True,
                        num_workers=2, collate_fn=list_data_collate, drop_last=True)
    with TreeMonitor() as monitor:
        stream = consume((b["image"].as_tensor() for b in loader), (2, *args.roi))
    return finish(len(pairs) * repeats, stream, monitor)


# ---------------------------------------------------------------------------------------------- breakdown


def timed(fn: Callable, *a: Any, repeats: int = 3) -> tuple[float, Any]:
    """Best of `repeats` calls (the least disturbed by other processes) and the last value."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn(*a)
        best = min(best, time.perf_counter() - start)
    return best, value


def shard_costs(path: str, roi: tuple[int, ...], k: int) -> dict[str, float]:
    """Seconds to read + decode one shard as CropSampler does, without the to_pylist copy, and to cut k crops."""
    import pyarrow.parquet as pq

    from swinssl.data.crops import BODY_THRESHOLD, sample_crops
    from swinssl.data.pipeline import CROP_COLUMNS

    def as_sampler() -> np.ndarray:
        row = pq.read_table(path, columns=list(CROP_COLUMNS)).to_pylist()[0]
        return np.frombuffer(row["image"], np.float16).reshape((2, *(int(v) for v in row["shape"])))

    def zero_copy() -> np.ndarray:
        table = pq.read_table(path, columns=list(CROP_COLUMNS))
        shape = table.column("shape")[0].as_py()
        return np.frombuffer(table.column("image").chunk(0).buffers()[2], np.float16).reshape((2, *shape))

    parquet, _ = timed(lambda: pq.read_table(path, columns=list(CROP_COLUMNS)))
    read, volume = timed(as_sampler)
    arrow, _ = timed(zero_copy)
    crop, _ = timed(sample_crops, volume, roi, k, np.random.default_rng(0), 0.05)
    mask, _ = timed(np.greater, volume[0], BODY_THRESHOLD)
    return {"shard_parquet_read_s": parquet, "shard_read_decode_s": read, "shard_read_zero_copy_s": arrow,
            "crop_s": crop, "crop_body_mask_s": mask}


def nifti_costs(pair: dict[str, str], roi: list[int], k: int) -> dict[str, float]:
    """Seconds to load one NIfTI pair (LoadImaged) and to run the rest of the reference chain."""
    from monai.transforms import Compose

    steps = monai_steps(roi, k)
    load, data = timed(steps[0], dict(pair))
    rest, _ = timed(Compose(steps[1:]), data)
    return {"nifti_load_pair_s": load, "nifti_rest_transforms_s": rest}


def breakdown(shards: list[str], pairs: list[dict[str, str]], args: argparse.Namespace) -> dict[str, float]:
    """Median over the cohort of per-study costs (best of 3), one study at a time in this process, one thread (as in
    a loader worker)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = [{**shard_costs(s, tuple(args.roi), args.crops_per_study),
                 **nifti_costs(p, args.roi, args.crops_per_study)} for s, p in zip(shards, pairs)]
    finally:
        torch.set_num_threads(threads)
    return {key: round(statistics.median(r[key] for r in rows), 3) for key in rows[0]}


# ------------------------------------------------------------------------------------------------- report


def run_all(shards: list[str], pairs: list[dict[str, str]], args: argparse.Namespace) -> dict[str, dict]:
    """Memory runs first (the driver's own heap has not yet seen a long stream), then throughput trials that
    alternate baseline and ours (a busy neighbour then slows both alike), then the diagnostic variants."""
    runs = {"ours_N": ours(shards, args, 1), "ours_10N": ours(shards, args, 10)}
    for trial in range(args.trials):
        runs[f"monai_{trial}"] = monai(pairs, args, args.passes)
        runs[f"ours_{trial}"] = ours(shards, args, args.passes)
    if args.variants:
        runs["ours_no_op_reservation"] = ours(shards, args, args.passes,
                                              context={"op_resource_reservation_enabled": False})
        runs["ours_read_cpus_0.5"] = ours(shards, args, args.passes, read_cpus=0.5)
    return runs


def mean_of(runs: dict[str, dict], prefix: str, trials: int, key: str) -> float:
    return round(statistics.mean(runs[f"{prefix}_{t}"][key] for t in range(trials)), 2)


def throughput(runs: dict[str, dict], trials: int) -> dict[str, Any]:
    ours_rate, base_rate = mean_of(runs, "ours", trials, "crops_per_s"), mean_of(runs, "monai", trials, "crops_per_s")
    ratio = {key: round(mean_of(runs, "ours", trials, key) / mean_of(runs, "monai", trials, key), 2)
             for key in ("crops_per_s_mid80", "crops_per_cpu_s")}
    return {"ours_crops_per_s": ours_rate, "monai_crops_per_s": base_rate, "speedup": round(ours_rate / base_rate, 2),
            "speedup_trials": [round(runs[f"ours_{t}"]["crops_per_s"] / runs[f"monai_{t}"]["crops_per_s"], 2)
                               for t in range(trials)],
            "speedup_mid80": ratio["crops_per_s_mid80"], "cpu_efficiency_ratio": ratio["crops_per_cpu_s"]}


def memory(runs: dict[str, dict], args: argparse.Namespace) -> dict[str, Any]:
    n, ten = runs["ours_N"], runs["ours_10N"]
    return {"rss_peak_mb_N": n["rss_peak_mb"], "rss_peak_mb_10N": ten["rss_peak_mb"],
            "rss_ratio": round(ten["rss_peak_mb"] / n["rss_peak_mb"], 3),
            f"rss_peak_mb_{args.passes}N": max(runs[f"ours_{t}"]["rss_peak_mb"] for t in range(args.trials)),
            "pss_peak_mb_N": n["pss_peak_mb"], "pss_peak_mb_10N": ten["pss_peak_mb"],
            "pss_ratio": round(ten["pss_peak_mb"] / n["pss_peak_mb"], 3),
            "object_store_peak_mib_N": n["object_store_peak_mib"],
            "object_store_peak_mib_10N": ten["object_store_peak_mib"],
            "monai_rss_peak_mb": max(runs[f"monai_{t}"]["rss_peak_mb"] for t in range(args.trials))}


def summarise(args: argparse.Namespace, shards: list[str], runs: dict[str, dict], costs: dict) -> dict:
    speed, mem = throughput(runs, args.trials), memory(runs, args)
    ours_study_s = costs["shard_read_decode_s"] + costs["crop_s"]
    base_study_s = costs["nifti_load_pair_s"] + costs["nifti_rest_transforms_s"]
    return {
        "studies": len(shards), "roi": list(args.roi), "crops_per_study": args.crops_per_study,
        "batch_size": args.batch_size, "passes": args.passes, "trials": args.trials, "cpus": 2, **speed, **mem,
        "ideal_crops_per_s": {"ours": round(2 * args.crops_per_study / ours_study_s, 2),
                              "monai": round(2 * args.crops_per_study / base_study_s, 2)},
        "per_study_s": costs, "runs": runs,
        "goals": {"speedup_ge_5x": speed["speedup"] >= 5, "rss_flat_within_15pct": abs(mem["rss_ratio"] - 1) <= 0.15},
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--roi", type=int, nargs=3, default=[96, 96, 96])
    parser.add_argument("--crops-per-study", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2, help="crops per batch (baseline: batch // crops studies)")
    parser.add_argument("--passes", type=int, default=20, help="the throughput runs list the cohort this many times")
    parser.add_argument("--trials", type=int, default=2, help="alternating baseline / ours throughput runs")
    parser.add_argument("--no-variants", dest="variants", action="store_false", help="skip the diagnostic runs")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--out", default="bench_out/loader")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = "1"
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    out = Path(args.out).resolve()
    started, load = time.perf_counter(), os.getloadavg()[0]
    shards, pairs = build_cohort(out, args.studies, args.seed)
    costs = breakdown(shards, pairs, args)
    runs = run_all(shards, pairs, args)
    result = {**summarise(args, shards, runs, costs), "wall_s": round(time.perf_counter() - started, 1),
              "load_average_1min": {"start": round(load, 2), "end": round(os.getloadavg()[0], 2)}}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
