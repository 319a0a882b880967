"""Shared fixtures: one Ray instance per test session, one small synthetic cohort prepared once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session():
    """`ray.init(num_cpus=4)` once: 2 cores, but logical CPUs may exceed them (REFERENCE.md §5)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", configure_logging=False,
                 log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """3 unlabelled + 2 labelled small NIfTI studies; returns the cohort CSV."""
    from petct.synth import synth_cohort

    return synth_cohort(tmp_path_factory.mktemp("cohort"), unlabeled=3, labeled=2, seed=11, scale="small")


@pytest.fixture(scope="session")
def prepared(cohort, tmp_path_factory, ray_session):
    """The cohort prepared through Ray with 2 workers: (output folder, summary)."""
    from petct.pipeline import prepare_cohort

    out = tmp_path_factory.mktemp("prepared")
    return out, prepare_cohort(cohort, out, workers=2, progress=False)
