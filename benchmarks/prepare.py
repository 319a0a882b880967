"""Benchmark `swinssl prepare` at full scale against the I/O floor, and its Ray scaling from 1 to 2 workers.

    python benchmarks/prepare.py [--studies 4] [--scale full] [--out bench_out/prepare]

What it measures, all in this one process so ratios hold on a noisy machine:
1. Per-study stage times (hash, read, register, resample+normalise, write, QC) of the real pipeline, one study at a
   time (`workers=0`, one ITK thread: the per-task setting).
2. The I/O floor per study: only reading the inputs (CT, PET, label) and writing an output of the same size and
   format (a float16 2-channel Parquet shard on the PET grid), nothing computed in between.
3. Wall time of the whole cohort through Ray with 1 and then 2 workers (fresh output folders each time).
Goal (issue #2): pipeline <= 3x the I/O floor per study; near-linear speed-up from 1 to 2 workers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def io_floor(sources, tmp: Path) -> list[float]:
    """Seconds per study to read the inputs and write a same-sized shard, nothing else."""
    from petct.io import read_ct, read_label, read_pet
    from petct.labels import PSMA as labels
    from petct.shards import PreparedStudy, write_shard

    times = []
    for s in sources:
        start = time.perf_counter()
        ct, pet = read_ct(s.study_id, s.ct, s.ct_series), read_pet(s.study_id, s.pet, s.pet_series)
        label = read_label(s.study_id, s.label, pet, labels, s.label_map)[0] if s.label else None
        label = None if label is None else sitk.GetArrayFromImage(label)
        image = np.broadcast_to(sitk.GetArrayViewFromImage(pet), (2, *pet.GetSize()[::-1]))
        study = PreparedStudy(s.study_id, s.cohort, s.order, image, label, pet.GetSpacing(), pet.GetOrigin(),
                              pet.GetDirection())
        write_shard(tmp / f"{s.study_id}.parquet", study, tmp / ".tmp")
        times.append(time.perf_counter() - start)
        del ct
    return times


def stage_table(records: list[dict]) -> dict[str, float]:
    stages = ["hash", "read", "register", "resample", "write", "qc"]
    return {k: statistics.mean(r["timings_s"].get(k, 0.0) for r in records) for k in stages}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--scale", default="full", choices=("small", "full"))
    parser.add_argument("--out", default="bench_out/prepare")
    args = parser.parse_args(argv)

    import ray

    from petct.pipeline import load_sources, prepare_cohort
    from petct.synth import synth_cohort

    out = Path(args.out).resolve()
    cohort_csv = out / "cohort" / "cohort.csv"
    if not cohort_csv.exists() or len(load_sources(cohort_csv)) != args.studies:
        shutil.rmtree(out / "cohort", ignore_errors=True)
        cohort_csv = synth_cohort(out / "cohort", unlabeled=args.studies - 1, labeled=1, seed=123, scale=args.scale)
    sources = load_sources(cohort_csv)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)

    floor = io_floor(sources, out / "floor")
    shutil.rmtree(out / "serial", ignore_errors=True)
    serial = prepare_cohort(cohort_csv, out / "serial", workers=0, progress=False).records
    stages = stage_table(serial)
    pipeline = statistics.mean(sum(r["timings_s"].values()) for r in serial)

    walls = {}
    for workers in (1, 2):
        ray.init(num_cpus=workers, include_dashboard=True, dashboard_host="127.0.0.1", configure_logging=False,
                 log_to_driver=False)
        shutil.rmtree(out / f"ray{workers}", ignore_errors=True)
        start = time.perf_counter()
        records = prepare_cohort(cohort_csv, out / f"ray{workers}", workers=workers, progress=False).records
        walls[workers] = time.perf_counter() - start
        assert all(r["status"] == "ok" for r in records)
        ray.shutdown()

    result = {
        "studies": len(sources), "scale": args.scale,
        "stage_mean_s": {k: round(v, 3) for k, v in stages.items()},
        "pipeline_per_study_s": round(pipeline, 3), "io_floor_per_study_s": round(statistics.mean(floor), 3),
        "ratio_to_io_floor": round(pipeline / statistics.mean(floor), 2),
        "ratio_to_io_floor_without_qc": round((pipeline - stages["qc"]) / statistics.mean(floor), 2),
        "ray_wall_s": {str(k): round(v, 2) for k, v in walls.items()},
        "speedup_1_to_2_workers": round(walls[1] / walls[2], 2),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
