"""Shared fixtures: one Ray instance per test session, one small synthetic cohort prepared once.

`make test-fast` runs `pytest -m "not ray"` with SWINSSL_TEST_FAST=1: every test that needs Ray (it asks for
`ray_session` directly or through `prepared`, or is marked `e2e` / `ray`) is deselected, and `ray.init` itself is
replaced by an error, so a test that would start Ray behind the marker's back fails instead of silently slowing the
fast loop down.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

FAST = os.environ.get("SWINSSL_TEST_FAST") == "1"
RAY_FIXTURES = {"ray_session", "prepared"}
"""Fixtures that start Ray; a test using any of them is marked `ray` (kept out of `make test-fast`)."""


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if RAY_FIXTURES & set(item.fixturenames) or item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.ray)


def pytest_sessionstart(session) -> None:
    if not FAST:
        return
    import ray

    def refuse(*args, **kwargs):
        raise RuntimeError("ray.init() called in `make test-fast`: mark the test `ray` or use the ray_session fixture")

    ray.init = refuse


@pytest.fixture(scope="session")
def ray_session():
    """`ray.init(num_cpus=4)` once: 2 cores, but logical CPUs may exceed them (Ray schedules by logical CPUs;
    training workers plus their data tasks would deadlock on 2)."""
    import ray

    if not ray.is_initialized():
        # address="local": a private instance even when another Ray runs on the machine (or left its address file)
        ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
                 configure_logging=False, log_to_driver=False)
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


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> Path:
    """2 unlabelled + 2 labelled small studies, prepared in this process (no Ray, no registration, no QC PNGs):
    for CLI and loading checks that need a prepared folder but not the session's Ray-prepared cohort."""
    from dataclasses import replace

    from petct.config import PrepareConfig
    from petct.pipeline import prepare_cohort
    from petct.synth import synth_cohort

    base = tmp_path_factory.mktemp("tiny")
    csv = synth_cohort(base / "cohort", unlabeled=2, labeled=2, seed=3, scale="small")
    cfg = PrepareConfig(qc_png=False)
    cfg = replace(cfg, registration=replace(cfg.registration, enabled=False))
    assert prepare_cohort(csv, base / "prepared", cfg, workers=0, progress=False).exit_code == 0
    return base / "prepared"


@pytest.fixture
def deterministic():
    """The gradient of the Swin blocks' relative-position bias table (an indexed read) is accumulated by several CPU
    threads in a varying order: without this, two identical runs differ in the last bits, resumed or not."""
    import torch

    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)
