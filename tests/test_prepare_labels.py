"""Cohorts with other label sets: `synth --labels` paints them, `prepare --labels` checks, records and publishes them.

Ray-free: `prepare_cohort(..., workers=0)` runs the studies in this process; registration is off where the test is
about labels only (it does not touch label volumes).
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from petct.config import PrepareConfig
from petct.labels import LABELS_FILE, PSMA, LabelSet, read_label_set
from petct.pipeline import EXIT_STUDIES_FAILED, config_digest, prepare_cohort
from petct.shards import read_shard
from petct.synth import synth_cohort, synth_study

TWO = LabelSet(("background", "lesion"), lesion=1)
SEED = 11  # the conftest `cohort` seed: same studies, so the PSMA labels are the reference


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _cfg(labels: LabelSet) -> PrepareConfig:
    cfg = PrepareConfig(labels=labels, qc_png=False)
    return replace(cfg, registration=replace(cfg.registration, enabled=False))


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["study_id", "ct", "pet", "label", "cohort"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _rows(cohort_csv: Path) -> dict[str, dict]:
    """Cohort rows by id, paths made absolute."""
    rows = {}
    for row in csv.DictReader(open(cohort_csv)):
        rows[row["study_id"]] = {k: str(cohort_csv.parent / v) if k in ("ct", "pet", "label") and v else v
                                 for k, v in row.items()}
    return rows


@pytest.fixture(scope="module")
def two_cohort(tmp_path_factory) -> Path:
    """The conftest cohort's first 2 labelled + 1 unlabelled studies, labelled `{0: background, 1: lesion}`."""
    return synth_cohort(tmp_path_factory.mktemp("two"), unlabeled=1, labeled=2, seed=SEED, labels=TWO)


@pytest.fixture(scope="module")
def prepared_two(two_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared_two")
    return out, prepare_cohort(two_cohort, out, _cfg(TWO), workers=0, progress=False)


def test_synth_maps_phantom_classes_by_name_and_keeps_the_images(cohort, two_cohort, tmp_path):
    for sid in ("lab_0000", "lab_0001", "unl_0000"):
        for name in ("ct.nii.gz", "pet.nii.gz", "motion.json"):  # the label set changes labels only
            assert (two_cohort.parent / sid / name).read_bytes() == (cohort.parent / sid / name).read_bytes()
    assert not (two_cohort.parent / "unl_0000" / "label.nii.gz").exists()
    painted = {}
    for sid in ("lab_0000", "lab_0001"):
        psma = _array(cohort.parent / sid / "label.nii.gz")
        two = _array(two_cohort.parent / sid / "label.nii.gz")
        np.testing.assert_array_equal(two, (psma == PSMA.lesion).astype(np.uint8))
        painted[sid] = int((two == 1).sum())
    assert any(painted.values()), painted  # seed 11 draws lesions in at least one study: the test is not vacuous

    three = LabelSet(("background", "kidneys", "lesion", "bone"), lesion=2)  # "bone" is never painted: stays empty
    row = synth_study("lab_0001", tmp_path, labeled=True, seed=_seed(cohort, "lab_0001"), labels=three)
    psma = _array(cohort.parent / "lab_0001" / "label.nii.gz")
    expected = np.select([psma == PSMA.value("kidneys"), psma == PSMA.lesion], [1, 2], 0)
    np.testing.assert_array_equal(_array(tmp_path / row["label"]), expected)


def _seed(cohort: Path, sid: str) -> int:
    from petct.synth import study_seed

    return study_seed(SEED, sid.startswith("lab"), int(sid.split("_")[1]))


def test_synth_default_is_the_psma_path(cohort, tmp_path):
    """Default output = explicit PSMA output = the conftest cohort's bytes (the remap is skipped, not applied)."""
    row = synth_study("lab_0000", tmp_path, labeled=True, seed=_seed(cohort, "lab_0000"), labels=PSMA)
    for name in ("ct", "pet", "label"):
        assert (tmp_path / row[name]).read_bytes() == (cohort.parent / "lab_0000" / f"{name}.nii.gz").read_bytes()


def test_prepare_publishes_the_label_set_and_voxel_counts(two_cohort, prepared_two):
    out, summary = prepared_two
    assert summary.exit_code == 0, summary.report
    assert json.loads((out / LABELS_FILE).read_text()) == {"classes": {"0": "background", "1": "lesion"},
                                                            "lesion": "lesion"}
    assert read_label_set(out) == TWO
    saved = json.loads((out / "prepare_config.json").read_text())
    assert saved["labels"] == TWO.to_dict()
    assert saved["digest"] == config_digest(_cfg(TWO)) != config_digest(_cfg(PSMA))
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    for row in manifest:
        study = read_shard(out / row["shard"])
        if row["cohort"] == "unlabeled":
            assert row["label_voxels"] is None and study.label is None
            continue
        counts = {"background": int((study.label == 0).sum()), "lesion": int((study.label == 1).sum())}
        assert row["label_voxels"] == {k: v for k, v in counts.items() if v}, row["study_id"]
        assert sum(row["label_voxels"].values()) == int(np.prod(row["shape"]))


def test_same_labels_resume_other_labels_redo(two_cohort, prepared_two, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(prepared_two[0], out)
    again = prepare_cohort(two_cohort, out, _cfg(TWO), workers=0, progress=False)
    assert all(r["skipped"] for r in again.records)
    psma = prepare_cohort(two_cohort, out, _cfg(PSMA), workers=0, progress=False)  # 0/1 labels are valid PSMA values
    assert not any(r["skipped"] for r in psma.records) and psma.exit_code == 0
    assert read_label_set(out) == PSMA


def test_a_value_outside_the_map_fails_only_its_study(cohort, two_cohort, tmp_path):
    rows = _rows(two_cohort)
    psma_study = dict(_rows(cohort)["lab_0001"], study_id="psma_0001")  # 12-class labels in a 2-class cohort
    csv_path = _write_csv(tmp_path / "mixed.csv", [rows["lab_0000"], psma_study, rows["unl_0000"]])
    summary = prepare_cohort(csv_path, tmp_path / "out", _cfg(TWO), workers=0, progress=False)
    status = {r["study_id"]: (r["status"], r["error_kind"]) for r in summary.records}
    assert status == {"lab_0000": ("ok", ""), "psma_0001": ("failed", "label_values"), "unl_0000": ("ok", "")}
    (failed,) = summary.failed
    present = sorted(int(v) for v in np.unique(_array(Path(psma_study["label"]))) if v > 1)
    assert f"label values {present} are not in the label set {{0: background, 1: lesion}}" in failed["error"]
    assert f"FAILED  psma_0001: label_values: label.nii.gz: label values {present}" in summary.report
    assert not (tmp_path / "out" / "shards" / "psma_0001.parquet").exists()
    assert summary.exit_code == EXIT_STUDIES_FAILED


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swinssl.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_labels_flag(cohort, tmp_path):
    """`--labels` through the real CLI: a bad map exits 2 before any study runs; a good one reaches the labels."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("{0: background, 2: lesion}\n")
    result = _cli("prepare", "--input", str(cohort), "--out", str(tmp_path / "never"), "--workers", "0", "--labels",
                  str(bad))
    assert result.returncode == 2, result.stderr
    assert f"swinssl prepare: error: {bad}: label values must be 0..1 without gaps" in result.stderr
    assert not (tmp_path / "never").exists()
    assert _cli("synth", "--out", str(tmp_path / "x"), "--labels", str(tmp_path / "none.yaml")).returncode == 2

    two = tmp_path / "two.yaml"
    two.write_text("{0: background, 1: lesion}\n")
    result = _cli("synth", "--out", str(tmp_path / "syn"), "--unlabeled", "0", "--labeled", "2", "--seed", str(SEED),
                  "--labels", str(two))
    assert result.returncode == 0, result.stderr
    for sid in ("lab_0000", "lab_0001"):
        expected = _array(cohort.parent / sid / "label.nii.gz") == PSMA.lesion
        np.testing.assert_array_equal(_array(tmp_path / "syn" / sid / "label.nii.gz"), expected.astype(np.uint8))
