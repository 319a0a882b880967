"""Connect to Ray the way every entry point does: RAY_ADDRESS when set (cluster / `ray job submit`), else an
embedded local instance. An already initialised Ray (tests, notebooks) is used as it is."""

from __future__ import annotations

import os


def ensure_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    # Small machines: one Parquet footer reader instead of 32 (REFERENCE.md §5).
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False)
