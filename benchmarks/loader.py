"""Benchmark the pretraining crop stream (Ray Data over Parquet shards) against the MONAI reference loader.

    python benchmarks/loader.py [--studies 4] [--roi 96 96 96] [--crops-per-study 2] [--passes 10]
                                [--out bench_out/loader]

What it measures, all in this one process so the ratios hold on a noisy machine, with 2 CPUs for each loader:
1. Data: a full-scale synthetic cohort of N unlabelled studies, prepared (`prepare_cohort`, no QC PNGs) and exported
   to NIfTI (`export_study`), so both loaders read the same prepared volumes: ours as one-study Parquet shards
   (float16), the baseline as ct.nii.gz + pet.nii.gz pairs (float32, [0, 1]). Reused when already there.
2. Baseline, what research-contributions SwinUNETR/Pretrain does: LoadImaged + EnsureChannelFirstd + ConcatItemsd
   (2 channels) + ScaleIntensityRanged + RandSpatialCropSamplesd(roi, crops per study) in a torch DataLoader with
   2 workers (list_data_collate), over the N pairs listed `--passes` times.
3. Ours: `crop_dataset(...)` on a fresh `ray.init(num_cpus=2)`, consumed on the driver with
   `iter_torch_batches(batch_size, drop_last=True, local_shuffle_buffer_size=8)` as a Train worker does, over the N
   shards (one pass) and then over the N shards listed `--passes` times (10N by default).
   Throughput: crops delivered as torch tensors per second, after the first batch (warm-up excluded for both).
4. Peak memory of the whole process tree (this driver and every descendant: Ray's GCS, raylet, agents and workers,
   or the DataLoader workers): the sum of RSS (and of PSS, which does not count shared object-store pages twice),
   sampled every 0.2 s; plus the peak object-store usage (Ray's memory summary, sampled every second).
5. Where the time goes, per study in this process: read + decode one shard as the crop task does (and without the
   `to_pylist` copy), cut the crops, versus load one NIfTI pair and run the rest of the reference transforms.
Goals: ours >= 5x the baseline's crops/s; peak RSS streaming 10N within 15% of streaming N (flat in cohort size).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import psutil

WARMUP_BATCHES = 1
SAMPLE_PERIOD_S = 0.2
STORE_EVERY = 5  # object-store samples every 5th memory sample (an RPC to the raylet, ~40 ms)


# --------------------------------------------------------------------------------------------------- data


def build_cohort(out: Path, studies: int, seed: int) -> tuple[list[str], list[dict[str, str]]]:
    """Shard paths and NIfTI pairs of N prepared unlabelled studies, built unless already there."""
    prepared, nifti = out / "prepared", out / "nifti"
    if not cohort_ready(prepared, nifti, studies):
        prepare(out, studies, seed)
    from swinssl.data.studies import select_studies

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

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)


# ------------------------------------------------------------------------------------------------- memory


def load_psutil():
    """psutil ships inside Ray (ray/thirdparty_files), which `import ray` puts on sys.path."""
    import importlib

    import ray  # noqa: F401

    return importlib.import_module("psutil")


def tree_memory(root: psutil.Process) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in bytes of `root` and all its descendants."""
    psutil, rss, pss = load_psutil(), 0, 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
    return rss, pss


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


class PeakMemory:
    """Context manager: peak tree RSS / PSS and peak object-store usage, sampled in a daemon thread."""

    def __init__(self) -> None:
        self.rss = self.pss = 0
        self.store_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        root, tick = load_psutil().Process(), 0
        while not self._stop.wait(SAMPLE_PERIOD_S):
            rss, pss = tree_memory(root)
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
            if tick % STORE_EVERY == 0:
                self.store_mib = max(self.store_mib, object_store_mib())
            tick += 1

    def report(self) -> dict[str, float]:
        return {"rss_peak_mb": round(self.rss / 2**20, 1), "pss_peak_mb": round(self.pss / 2**20, 1),
                "object_store_peak_mib": self.store_mib}


# ---------------------------------------------------------------------------------------------- streaming


def consume(images: Iterable, crop_shape: tuple[int, ...]) -> dict[str, float]:
    """Drain a stream of crop batches; crops/s counts tensors delivered after the warm-up batch."""
    import torch

    start, first, crops = time.perf_counter(), 0.0, 0
    for index, batch in enumerate(images):
        if not isinstance(batch, torch.Tensor) or tuple(batch.shape[1:]) != crop_shape:
            raise TypeError(f"expected tensor batches (B, {crop_shape}), got {type(batch)} {batch.shape}")
        if index < WARMUP_BATCHES:
            first = time.perf_counter()
            continue
        crops += batch.shape[0]
    steady = time.perf_counter() - first
    return {"crops": crops, "warmup_s": round(first - start, 2), "steady_s": round(steady, 2),
            "crops_per_s": round(crops / steady, 3) if crops else 0.0}


def ours(shards: list[str], args: argparse.Namespace, repeats: int) -> dict[str, float]:
    """Our crop stream over the shards listed `repeats` times, on a fresh 2-CPU Ray."""
    import ray
    import ray.data

    from swinssl.data.pipeline import crop_dataset

    start_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().print_on_execution_start = False
    try:
        with PeakMemory() as memory:
            dataset = crop_dataset(shards, tuple(args.roi), args.crops_per_study, seed=args.seed,
                                   min_crops_per_epoch=len(shards) * args.crops_per_study * repeats)
            batches = dataset.iter_torch_batches(batch_size=args.batch_size, drop_last=True,
                                                 local_shuffle_buffer_size=8)
            stream = consume((b["image"] for b in batches), (2, *args.roi))
    finally:
        ray.shutdown()
    return {**stream, **memory.report()}


def monai_steps(roi: list[int], crops_per_study: int) -> list:
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


def monai(pairs: list[dict[str, str]], args: argparse.Namespace, repeats: int) -> dict[str, float]:
    """MONAI Dataset + torch DataLoader (2 workers) over the NIfTI pairs listed `repeats` times."""
    from monai.data import DataLoader, Dataset, list_data_collate
    from monai.transforms import Compose

    dataset = Dataset(pairs * repeats, Compose(monai_steps(args.roi, args.crops_per_study)))
    loader = DataLoader(dataset, batch_size=max(1, args.batch_size // args.crops_per_study), shuffle=True,
                        num_workers=2, collate_fn=list_data_collate, drop_last=True)
    with PeakMemory() as memory:
        stream = consume((b["image"].as_tensor() for b in loader), (2, *args.roi))
    return {**stream, **memory.report()}


# ---------------------------------------------------------------------------------------------- breakdown


def timed(fn, *a, **kw) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn(*a, **kw)
    return time.perf_counter() - start, value


def shard_costs(path: str, roi: tuple[int, ...], k: int) -> dict[str, float]:
    """Seconds to read + decode one shard as CropSampler does, without to_pylist, and to cut k crops."""
    import pyarrow.parquet as pq

    from swinssl.data.crops import sample_crops
    from swinssl.data.pipeline import CROP_COLUMNS

    def as_sampler() -> np.ndarray:
        row = pq.read_table(path, columns=list(CROP_COLUMNS)).to_pylist()[0]
        return np.frombuffer(row["image"], np.float16).reshape((2, *(int(v) for v in row["shape"])))

    def zero_copy() -> np.ndarray:
        table = pq.read_table(path, columns=list(CROP_COLUMNS))
        shape = table.column("shape")[0].as_py()
        return np.frombuffer(table.column("image").chunk(0).buffers()[2], np.float16).reshape((2, *shape))

    read, volume = timed(as_sampler)
    arrow, _ = timed(zero_copy)
    parquet_only, _ = timed(pq.read_table, path, columns=list(CROP_COLUMNS))
    crop, _ = timed(sample_crops, volume, roi, k, np.random.default_rng(0), 0.05)
    body, _ = timed(np.greater, volume[0], 0.3)
    return {"shard_parquet_read_s": parquet_only, "shard_read_decode_s": read, "shard_read_zero_copy_s": arrow,
            "crop_s": crop, "crop_body_mask_s": body}


def nifti_costs(pair: dict[str, str], roi: list[int], k: int) -> dict[str, float]:
    """Seconds to load one NIfTI pair (LoadImaged) and to run the rest of the reference chain."""
    from monai.transforms import Compose

    steps = monai_steps(roi, k)
    load, data = timed(steps[0], dict(pair))
    rest, _ = timed(Compose(steps[1:]), data)
    return {"nifti_load_pair_s": load, "nifti_rest_transforms_s": rest}


def breakdown(shards: list[str], pairs: list[dict[str, str]], args: argparse.Namespace) -> dict[str, float]:
    """Median per-study costs over the cohort, one study at a time in this process (one thread each)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker / a Ray task
    rows = [{**shard_costs(s, tuple(args.roi), args.crops_per_study),
             **nifti_costs(p, args.roi, args.crops_per_study)} for s, p in zip(shards, pairs)]
    torch.set_num_threads(threads)
    return {key: round(statistics.median(r[key] for r in rows), 3) for key in rows[0]}


# ------------------------------------------------------------------------------------------------- report


def summarise(args: argparse.Namespace, shards: list[str], runs: dict[str, dict], costs: dict) -> dict:
    ours_rate, base_rate = runs["ours_10N"]["crops_per_s"], runs["monai"]["crops_per_s"]
    ours_study_s = costs["shard_read_decode_s"] + costs["crop_s"]
    base_study_s = costs["nifti_load_pair_s"] + costs["nifti_rest_transforms_s"]
    rss_n, rss_10n = runs["ours_N"]["rss_peak_mb"], runs["ours_10N"]["rss_peak_mb"]
    return {
        "studies": len(shards), "roi": list(args.roi), "crops_per_study": args.crops_per_study,
        "batch_size": args.batch_size, "passes": args.passes, "cpus": 2,
        "ours_crops_per_s": ours_rate, "monai_crops_per_s": base_rate,
        "speedup": round(ours_rate / base_rate, 2) if base_rate else None,
        "rss_peak_mb_N": rss_n, "rss_peak_mb_10N": rss_10n, "rss_ratio": round(rss_10n / rss_n, 3),
        "pss_peak_mb_N": runs["ours_N"]["pss_peak_mb"], "pss_peak_mb_10N": runs["ours_10N"]["pss_peak_mb"],
        "object_store_peak_mib_N": runs["ours_N"]["object_store_peak_mib"],
        "object_store_peak_mib_10N": runs["ours_10N"]["object_store_peak_mib"],
        "ideal_crops_per_s": {"ours": round(2 * args.crops_per_study / ours_study_s, 2),
                              "monai": round(2 * args.crops_per_study / base_study_s, 2)},
        "per_study_s": costs, "runs": runs,
        "goals": {"speedup_ge_5x": bool(base_rate and ours_rate / base_rate >= 5),
                  "rss_flat_within_15pct": abs(rss_10n / rss_n - 1) <= 0.15},
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--roi", type=int, nargs=3, default=[96, 96, 96])
    parser.add_argument("--crops-per-study", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2, help="crops per batch (ours); baseline: //crops")
    parser.add_argument("--passes", type=int, default=10, help="the long runs list the cohort this many times")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--out", default="bench_out/loader")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = "1"
    out = Path(args.out).resolve()
    started = time.perf_counter()
    shards, pairs = build_cohort(out, args.studies, args.seed)
    costs = breakdown(shards, pairs, args)
    runs = {"monai": monai(pairs, args, args.passes), "ours_N": ours(shards, args, 1),
            "ours_10N": ours(shards, args, args.passes)}
    result = {**summarise(args, shards, runs, costs), "wall_s": round(time.perf_counter() - started, 1)}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
