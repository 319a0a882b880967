"""Every kind of bad input fails its own study with a clear message and leaves the others untouched."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from petct.pipeline import EXIT_STUDIES_FAILED, prepare_cohort
from petct.shards import read_shard
from petct.synth import synth_cohort


def _write(image: sitk.Image, path: Path) -> str:
    sitk.WriteImage(image, str(path))
    return str(path)


def _bad_cases(src: Path, work: Path) -> list[tuple[dict, str, str]]:
    """(cohort row, expected error kind, a phrase the message must contain) per bad study, built from good files."""
    lab = src / "lab_0000"
    ct, pet, label = (sitk.ReadImage(str(lab / f"{n}.nii.gz")) for n in ("ct", "pet", "label"))
    cases = []

    def row(sid, ct_path, pet_path, label_path=""):
        return {"study_id": sid, "ct": ct_path, "pet": pet_path, "label": label_path, "cohort": "labeled"}

    truncated = work / "truncated_ct.nii.gz"
    truncated.write_bytes((lab / "ct.nii.gz").read_bytes()[:5000])
    cases.append((row("bad_truncated", str(truncated), str(lab / "pet.nii.gz")), "read_error", "truncated_ct"))
    garbage = work / "garbage_ct.nii.gz"
    garbage.write_text("not an image")
    cases.append((row("bad_unreadable", str(garbage), str(lab / "pet.nii.gz")), "read_error", "garbage_ct"))
    cases.append((row("bad_missing_pet", str(lab / "ct.nii.gz"), ""), "missing_modality", "no PET"))
    cases.append((row("bad_absent_pet", str(lab / "ct.nii.gz"), str(work / "nowhere.nii.gz")),
                  "missing_modality", "nowhere"))
    far = sitk.Image(ct)
    far.SetOrigin([o + 5000.0 for o in ct.GetOrigin()])
    cases.append((row("bad_no_overlap", _write(far, work / "far_ct.nii.gz"), str(lab / "pet.nii.gz")),
                  "no_overlap", "do not intersect"))
    nan_pet = sitk.GetArrayFromImage(pet)
    nan_pet[3, 10, 10] = np.nan
    nan_image = sitk.GetImageFromArray(nan_pet)
    nan_image.CopyInformation(pet)
    cases.append((row("bad_nan", str(lab / "ct.nii.gz"), _write(nan_image, work / "nan_pet.nii.gz")),
                  "non_finite", "1 NaN/inf"))
    coarse = sitk.Resample(label, [s // 2 for s in label.GetSize()], sitk.Transform(), sitk.sitkNearestNeighbor,
                           label.GetOrigin(), [s * 2 for s in label.GetSpacing()], label.GetDirection())
    cases.append((row("bad_label_grid", str(lab / "ct.nii.gz"), str(lab / "pet.nii.gz"),
                      _write(coarse, work / "coarse_label.nii.gz")), "label_grid", "is neither the PET grid"))
    values = sitk.GetArrayFromImage(label)
    values[0, 0, 0] = 12
    wrong = sitk.GetImageFromArray(values)
    wrong.CopyInformation(label)
    cases.append((row("bad_label_values", str(lab / "ct.nii.gz"), str(lab / "pet.nii.gz"),
                      _write(wrong, work / "label12.nii.gz")), "label_values", "12"))
    return cases


def _dicom_cases(work: Path) -> list[tuple[dict, str, str]]:
    src = synth_cohort(work / "dicom", unlabeled=1, labeled=0, seed=5, fmt="dicom").parent / "unl_0000"
    no_weight = work / "pet_no_weight"
    shutil.copytree(src / "pet", no_weight)
    for path in no_weight.iterdir():
        ds = pydicom.dcmread(path)
        del ds.PatientWeight
        ds.save_as(path)
    truncated = work / "pet_truncated"
    shutil.copytree(src / "pet", truncated)
    victim = sorted(truncated.iterdir())[5]
    victim.write_bytes(victim.read_bytes()[:2000])
    return [
        ({"study_id": "bad_suv_tag", "ct": str(src / "ct"), "pet": str(no_weight), "label": "", "cohort": "unlabeled"},
         "missing_suv_tag", "PatientWeight"),
        ({"study_id": "bad_dicom_slice", "ct": str(src / "ct"), "pet": str(truncated), "label": "",
          "cohort": "unlabeled"}, "read_error", victim.name),
        ({"study_id": "good_dicom", "ct": str(src / "ct"), "pet": str(src / "pet"), "label": "",
          "cohort": "unlabeled"}, "", ""),
    ]


@pytest.mark.e2e
def test_bad_studies_fail_alone(cohort, tmp_path, ray_session):
    good = [dict(r) for r in csv.DictReader(open(cohort))][:2]
    for r in good:
        for key in ("ct", "pet", "label"):
            r[key] = str(cohort.parent / r[key]) if r[key] else ""
    cases = _bad_cases(cohort.parent, tmp_path) + _dicom_cases(tmp_path)
    duplicate = dict(good[1])
    rows = [good[0], *[c[0] for c in cases[:4]], good[1], *[c[0] for c in cases[4:]], duplicate]
    csv_path = tmp_path / "cohort.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["study_id", "ct", "pet", "label", "cohort"])
        writer.writeheader()
        writer.writerows(rows)

    summary = prepare_cohort(csv_path, tmp_path / "out", workers=2, progress=False)
    by_id = {}
    for record in summary.records:
        by_id.setdefault(record["study_id"], []).append(record)
    assert [r["study_id"] for r in summary.records] == [r["study_id"] for r in rows]
    for row, kind, phrase in cases:
        (record,) = by_id[row["study_id"]]
        if not kind:
            assert record["status"] == "ok", record
            continue
        assert (record["status"], record["error_kind"]) == ("failed", kind), record
        assert phrase in record["error"], record["error"]
        assert not (tmp_path / "out" / "shards" / f"{row['study_id']}.parquet").exists()
    assert by_id[good[0]["study_id"]][0]["status"] == "ok"
    dup = by_id[good[1]["study_id"]]
    assert len(dup) == 2 and all(r["error_kind"] == "duplicate_id" for r in dup)
    read_shard(tmp_path / "out" / "shards" / f"{good[0]['study_id']}.parquet")  # the good one is whole
    assert summary.exit_code == EXIT_STUDIES_FAILED
    assert "FAILED  bad_nan: non_finite" in summary.report


def test_cli_exit_codes(cohort, tmp_path):
    """The CLI exits 0 on a clean cohort and 3 (documented) when a study fails; usage errors exit 2."""
    rows = [dict(r) for r in csv.DictReader(open(cohort))][:1]
    rows[0].update({k: str(cohort.parent / rows[0][k]) for k in ("ct", "pet")}, label="")
    bad = dict(rows[0], study_id="broken", pet=str(tmp_path / "missing.nii.gz"))
    for name, content, expected in (("good.csv", rows, 0), ("bad.csv", rows + [bad], 3)):
        path = tmp_path / name
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(content)
        result = subprocess.run([sys.executable, "-m", "swinssl.cli", "prepare", "--input", str(path), "--out",
                                 str(tmp_path / name.replace(".csv", "")), "--workers", "0", "--quiet", "--no-qc"],
                                capture_output=True, text=True)
        assert result.returncode == expected, result.stderr
    assert "broken" in result.stdout and "missing_modality" in result.stdout
    usage = subprocess.run([sys.executable, "-m", "swinssl.cli", "export", str(tmp_path / "nothing"), "--study",
                            "x", "--to", str(tmp_path)], capture_output=True, text=True)
    assert usage.returncode == 2 and "manifest.jsonl" in usage.stderr
