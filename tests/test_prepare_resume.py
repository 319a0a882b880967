"""A rerun skips finished studies; an interrupted run never leaves a shard a reader would accept half-written."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import SimpleITK as sitk

from petct.pipeline import prepare_cohort
from petct.shards import read_shard


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_rerun_redoes_nothing_and_redoes_changed_inputs(cohort, prepared, tmp_path, ray_session):
    out = tmp_path / "out"
    shutil.copytree(prepared[0], out)
    before = _mtimes(out / "shards")
    summary = prepare_cohort(cohort, out, workers=2, progress=False)
    assert all(r["skipped"] for r in summary.records)
    assert _mtimes(out / "shards") == before

    # change one input: only that study is prepared again
    victim = summary.records[0]
    pet_path = cohort.parent / victim["study_id"] / "pet.nii.gz"
    work_cohort = tmp_path / "cohort"
    shutil.copytree(cohort.parent, work_cohort)
    pet = sitk.ReadImage(str(work_cohort / victim["study_id"] / "pet.nii.gz"))
    sitk.WriteImage(pet * 1.5, str(work_cohort / victim["study_id"] / "pet.nii.gz"))
    assert pet_path.exists()
    summary = prepare_cohort(work_cohort / "cohort.csv", out, workers=2, progress=False)
    redone = [r["study_id"] for r in summary.records if not r["skipped"]]
    # every path moved, so hashes of files with the same bytes still match: only the edited PET differs
    assert redone == [victim["study_id"]]
    assert summary.exit_code == 0


def test_killed_run_resumes(cohort, tmp_path, ray_session):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "swinssl.cli", "prepare", "--input", str(cohort), "--out", str(out),
           "--workers", "0", "--quiet"]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "records").glob("*.json"))) < 2 and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = {p.stem for p in (out / "records").glob("*.json")}
    assert 2 <= len(finished) < 5, "the run should have been killed part-way"
    for shard in (out / "shards").glob("*.parquet"):  # whatever is published is whole
        assert read_shard(shard).image.shape[0] == 2
    assert not (out / "manifest.jsonl").exists()

    summary = prepare_cohort(cohort, out, workers=2, progress=False)
    assert {r["study_id"] for r in summary.records if r["skipped"]} == finished
    assert all(r["status"] == "ok" for r in summary.records) and len(summary.records) == 5
    assert not list((out / ".tmp").glob("*"))  # the stale temp files of the killed run are gone
    first = read_shard(out / summary.records[0]["shard"])
    assert np.isfinite(first.image).all()
