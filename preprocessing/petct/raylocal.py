"""Connect to Ray the way every entry point does: RAY_ADDRESS when set (cluster / `ray job submit`), else an
embedded local instance. An already initialised Ray (tests, notebooks) is used as it is."""

from __future__ import annotations

import math
import os


def ensure_ray(num_cpus: int | None = None, min_cpus: float = 0) -> None:
    """`min_cpus`: logical CPUs the local instance needs at least (training workers + the data pipeline would
    deadlock on a 2-core machine otherwise; logical CPUs may exceed cores)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    # Small machines: one Parquet footer reader instead of 32 (REFERENCE.md §5).
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    if num_cpus is None and min_cpus:
        num_cpus = max(os.cpu_count() or 1, math.ceil(min_cpus))
    # The dashboard serves the State API that Ray Train's controller polls; bound to loopback, never 0.0.0.0.
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", configure_logging=False)
