"""Connect to Ray the way every entry point does.

- `RAY_ADDRESS` unset (or empty): start a private local Ray instance for this process, even when another Ray runs
  on the machine (a sweep, a notebook, a `ray start --head`, or the address file such a head leaves behind when it
  was killed without `ray stop`). Plain `ray.init()` would follow that address file and then refuse our `num_cpus`
  ("When connecting to an existing cluster, num_cpus and num_gpus must not be provided"), or run on somebody
  else's cluster.
- `RAY_ADDRESS=auto`: join the local cluster that `ray start` recorded last (Ray's own lookup: the address file,
  else any running cluster on this machine); `RAY_ADDRESS=HOST:PORT` or `ray://...`: that cluster. `ray job
  submit` sets it for its entrypoints. Joining never passes resources: the cluster already has them.
- Ray already initialised in this process (tests, notebooks): used as it is.
"""

from __future__ import annotations

import math
import os


class RayAddressError(ValueError):
    """RAY_ADDRESS names no reachable cluster (a usage error: the CLI exits 2 with this message)."""


def ensure_ray(num_cpus: int | None = None, min_cpus: float = 0) -> None:
    """`num_cpus`: logical CPUs of a private local instance (default: the machine's). `min_cpus`: logical CPUs it
    needs at least (training workers + the data pipeline would deadlock on a 2-core machine otherwise; logical CPUs
    may exceed cores). Both are ignored when joining an existing cluster."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as exc:  # "Could not find any running Ray instance": a setting to fix, say which
            raise RayAddressError(f"RAY_ADDRESS={address}: {exc} Unset RAY_ADDRESS to start a private local Ray.") \
                from None
        return
    # Ray Data starts 32 Parquet footer-reader actors per read by default: one is plenty on a small machine.
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    if num_cpus is None and min_cpus:
        num_cpus = max(os.cpu_count() or 1, math.ceil(min_cpus))
    # "local" = always a new instance (ignores address files); it goes away with this process.
    # The dashboard serves the State API that Ray Train's controller polls; bound to loopback, never 0.0.0.0.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             configure_logging=False)
