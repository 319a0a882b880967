"""Synthetic PSMA PET/CT studies: files, reproducibility, geometry, motion ground truth, phantom values, DICOM tags."""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from petct.labels import CLASSES, LESION
from petct.synth import CSV_COLUMNS, GRIDS, load_motion, study_seed, synth_cohort, synth_study

SEED = 3


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory) -> Path:
    """2 labelled + 1 unlabelled small NIfTI studies."""
    return synth_cohort(tmp_path_factory.mktemp("synth"), unlabeled=1, labeled=2, seed=SEED)


@pytest.fixture(scope="module")
def rows(small_cohort) -> list[dict]:
    with open(small_cohort, newline="") as handle:
        return list(csv.DictReader(handle))


def test_cohort_csv_columns_order_and_relative_paths(small_cohort, rows):
    assert small_cohort.name == "cohort.csv"
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    assert [r["study_id"] for r in rows] == ["lab_0000", "lab_0001", "unl_0000"]
    assert [r["cohort"] for r in rows] == ["labeled", "labeled", "unlabeled"]
    assert rows[2]["label"] == "" and not (small_cohort.parent / "unl_0000" / "label.nii.gz").exists()
    for row in rows:
        for key in ("ct", "pet", "label"):
            if row[key]:
                assert not Path(row[key]).is_absolute() and row[key].startswith(row["study_id"] + "/")
                assert (small_cohort.parent / row[key]).is_file()
        assert (small_cohort.parent / row["study_id"] / "motion.json").is_file()


def test_a_single_study_regenerates_identically(small_cohort, tmp_path):
    base = small_cohort.parent
    synth_study("lab_0001", tmp_path, labeled=True, seed=study_seed(SEED, True, 1))
    for name in ("ct.nii.gz", "pet.nii.gz", "label.nii.gz"):
        np.testing.assert_array_equal(_array(tmp_path / "lab_0001" / name), _array(base / "lab_0001" / name))
    assert (tmp_path / "lab_0001/motion.json").read_text() == (base / "lab_0001/motion.json").read_text()


def test_other_seed_or_index_differs(small_cohort, tmp_path):
    base = small_cohort.parent
    synth_study("x", tmp_path, labeled=True, seed=study_seed(SEED + 1, True, 1))
    assert _array(tmp_path / "x/pet.nii.gz").shape != _array(base / "lab_0001/pet.nii.gz").shape or not np.array_equal(
        _array(tmp_path / "x/pet.nii.gz"), _array(base / "lab_0001/pet.nii.gz"))
    assert study_seed(SEED, True, 0) != study_seed(SEED, False, 0) != study_seed(SEED, True, 1)


def test_parallel_cohort_equals_serial(small_cohort, tmp_path):
    csv_path = synth_cohort(tmp_path, unlabeled=1, labeled=1, seed=SEED, workers=2)
    assert [r["study_id"] for r in csv.DictReader(open(csv_path))] == ["lab_0000", "unl_0000"]
    for sid in ("lab_0000", "unl_0000"):
        np.testing.assert_array_equal(_array(tmp_path / sid / "ct.nii.gz"),
                                      _array(small_cohort.parent / sid / "ct.nii.gz"))


def test_small_grid_geometry(small_cohort):
    spec, study = GRIDS["small"], small_cohort.parent / "lab_0000"
    ct, pet, label = (sitk.ReadImage(str(study / n)) for n in ("ct.nii.gz", "pet.nii.gz", "label.nii.gz"))
    assert pet.GetSize()[:2] == (64, 64) and pet.GetSize()[2] >= 96
    assert ct.GetSize()[:2] == (128, 128)
    np.testing.assert_allclose(pet.GetSpacing(), (spec.pet_spacing_xy, spec.pet_spacing_xy, 3.0), atol=1e-5)
    np.testing.assert_allclose(ct.GetSpacing(), (spec.ct_spacing_xy, spec.ct_spacing_xy, 3.0), atol=1e-5)
    for image in (ct, pet):  # in-plane centred on the scanner axis, identity direction
        size, spacing = np.array(image.GetSize()), np.array(image.GetSpacing())
        np.testing.assert_allclose(image.GetOrigin()[:2], -(size[:2] - 1) / 2 * spacing[:2], atol=1e-3)
        np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel())
    ct_z = ct.GetOrigin()[2], ct.GetOrigin()[2] + 3 * (ct.GetSize()[2] - 1)
    pet_z = pet.GetOrigin()[2], pet.GetOrigin()[2] + 3 * (pet.GetSize()[2] - 1)
    assert pet_z[0] <= ct_z[0] < ct_z[1] < pet_z[1] and ct.GetSize()[2] < pet.GetSize()[2]
    assert (label.GetSize(), label.GetSpacing(), label.GetOrigin()) == (pet.GetSize(), pet.GetSpacing(),
                                                                         pet.GetOrigin())
    assert ct.GetPixelID() == sitk.sitkInt16 and pet.GetPixelID() == sitk.sitkFloat32
    assert label.GetPixelID() == sitk.sitkUInt8


def test_labels_hold_every_organ(small_cohort):
    for sid in ("lab_0000", "lab_0001"):
        counts = np.bincount(_array(small_cohort.parent / sid / "label.nii.gz").ravel(), minlength=len(CLASSES))
        assert len(counts) == len(CLASSES)  # values 0..11 only
        assert (counts[1:LESION] > 0).all(), dict(zip(CLASSES, counts, strict=True))


def test_body_inside_ct_field_of_view(small_cohort):
    ct = _array(small_cohort.parent / "lab_0000" / "ct.nii.gz")
    border = np.concatenate([ct[:, :3].ravel(), ct[:, -3:].ravel(), ct[:, :, :3].ravel(), ct[:, :, -3:].ravel()])
    assert border.max() < -800 and ct.min() >= -1024


def test_phantom_values_are_psma_like(small_cohort):
    study = small_cohort.parent / "lab_0000"
    pet, label = _array(study / "pet.nii.gz"), _array(study / "label.nii.gz")
    mean = {name: float(pet[label == i].mean()) for i, name in enumerate(CLASSES) if (label == i).any()}
    assert 25 < mean["kidneys"] < 55 and mean["bladder"] > 40 and 3 < mean["liver"] < 10
    assert mean["background"] < 1.5 and pet.min() >= 0
    ct = _array(study / "ct.nii.gz")
    for lo, hi in ((-1030, -950), (-900, -780), (-130, -60), (20, 70), (250, 3000)):  # air lung fat soft bone
        assert ((ct >= lo) & (ct <= hi)).mean() > 1e-3, (lo, hi)


def test_motion_json_round_trips(small_cohort):
    study = small_cohort.parent / "lab_0000"
    info, t = json.loads((study / "motion.json").read_text()), load_motion(study)
    assert isinstance(t, sitk.Euler3DTransform)
    matrix = np.array(info["matrix"])
    p = np.array([12.0, -30.0, float(info["center"][2]) + 100.0])
    np.testing.assert_allclose(t.TransformPoint(tuple(p)), matrix[:3, :3] @ p + matrix[:3, 3], atol=1e-6)
    assert np.all(np.abs(info["angles_rad"]) <= np.radians(3.0) + 1e-9)
    assert 3.0 <= np.linalg.norm(info["translation_mm"]) <= 15.0
    pet = sitk.ReadImage(str(study / "pet.nii.gz"))
    centre = pet.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in pet.GetSize()])
    np.testing.assert_allclose(info["center"], centre, atol=1e-3)  # NIfTI stores float32


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def test_true_motion_realigns_ct_with_pet(small_cohort):
    for sid in ("lab_0000", "unl_0000"):
        study = small_cohort.parent / sid
        ct, pet = sitk.ReadImage(str(study / "ct.nii.gz"), sitk.sitkFloat32), sitk.ReadImage(str(study / "pet.nii.gz"))
        pet_body = sitk.GetArrayFromImage(pet) > 0.15
        scores = []
        for transform in (load_motion(study), sitk.Euler3DTransform()):
            moved = sitk.Resample(ct, pet, transform, sitk.sitkLinear, -1000.0)
            scores.append(_dice(sitk.GetArrayFromImage(moved) > -500, pet_body))
        assert scores[0] > 0.85 and scores[0] > scores[1] + 0.02, scores


@pytest.fixture(scope="module")
def dicom_pair(tmp_path_factory) -> tuple[Path, Path]:
    """The same study (same seed) written as NIfTI and as DICOM."""
    root = tmp_path_factory.mktemp("dicom")
    seed = study_seed(SEED, True, 7)
    synth_study("pair", root / "nifti", labeled=True, seed=seed)
    row = synth_study("pair", root / "dicom", labeled=True, seed=seed, fmt="dicom")
    assert row["ct"] == "pair/ct" and row["pet"] == "pair/pet" and row["label"] == "pair/label.nii.gz"
    return root / "nifti" / "pair", root / "dicom" / "pair"


def _when(date: str, time: str) -> dt.datetime:
    return dt.datetime.strptime(date + time[:6], "%Y%m%d%H%M%S")


def test_dicom_pet_gives_back_the_phantom_suv(dicom_pair):
    nifti, dicom = dicom_pair
    slices = sorted((pydicom.dcmread(p) for p in (dicom / "pet").glob("PT_*.dcm")),
                    key=lambda s: float(s.ImagePositionPatient[2]))
    first, radio = slices[0], slices[0].RadiopharmaceuticalInformationSequence[0]
    assert (first.Modality, first.Units, first.DecayCorrection) == ("PT", "BQML", "START")
    assert {"DECY", "ATTN"} <= set(first.CorrectedImage) and radio.Radiopharmaceutical == "Ga-68 PSMA-11"
    assert float(radio.RadionuclideHalfLife) == 4056.0 and 60 <= float(first.PatientWeight) <= 110
    start = _when(first.SeriesDate, first.SeriesTime)
    assert all(_when(s.SeriesDate, s.AcquisitionTime) >= start for s in slices)
    injected = dt.datetime.strptime(radio.RadiopharmaceuticalStartDateTime[:14], "%Y%m%d%H%M%S")
    assert injected == _when(first.SeriesDate, radio.RadiopharmaceuticalStartTime)
    assert 50 * 60 <= (start - injected).total_seconds() <= 70 * 60
    decay = 2 ** (-(start - injected).total_seconds() / float(radio.RadionuclideHalfLife))
    factor = float(first.PatientWeight) * 1000 / (float(radio.RadionuclideTotalDose) * decay)  # SUVbw, see suv.py
    truth = json.loads((dicom / "suv_truth.json").read_text())
    assert factor == pytest.approx(1 / truth["bqml_per_suv"], rel=1e-12)
    suv = np.stack([s.pixel_array * float(s.RescaleSlope) + float(s.RescaleIntercept) for s in slices]) * factor
    reference = _array(nifti / "pet.nii.gz")
    assert suv.shape == reference.shape and len({s.RescaleSlope for s in slices}) > 10  # per-slice scaling
    peak = reference.max(axis=(1, 2), keepdims=True)
    assert np.all(np.abs(suv - reference) <= 1e-3 * np.maximum(peak, 1e-6))
    hot = reference > 0.01 * peak
    assert np.all(np.abs(suv - reference)[hot] <= 1e-3 * reference[hot])


def test_dicom_ct_series_geometry_and_values(dicom_pair):
    nifti, dicom = dicom_pair
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dicom / "ct")))
    ct, reference = reader.Execute(), sitk.ReadImage(str(nifti / "ct.nii.gz"))
    assert ct.GetSize() == reference.GetSize()
    np.testing.assert_allclose(ct.GetSpacing(), reference.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(ct.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(ct.GetDirection(), np.eye(3).ravel(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ct).astype(np.int32),
                                  sitk.GetArrayFromImage(reference).astype(np.int32))
    top = pydicom.dcmread(dicom / "ct" / "CT_0000.dcm")
    pet = pydicom.dcmread(dicom / "pet" / "PT_0000.dcm")
    assert top.Modality == "CT" and (float(top.RescaleSlope), float(top.RescaleIntercept)) == (1.0, -1024.0)
    assert float(top.ImagePositionPatient[2]) == pytest.approx(ct.GetOrigin()[2] + 3 * (ct.GetSize()[2] - 1))
    assert top.StudyInstanceUID == pet.StudyInstanceUID and top.FrameOfReferenceUID == pet.FrameOfReferenceUID
    assert top.SeriesInstanceUID != pet.SeriesInstanceUID
    np.testing.assert_array_equal(_array(dicom / "label.nii.gz"), _array(nifti / "label.nii.gz"))
    assert load_motion(dicom).GetParameters() == load_motion(nifti).GetParameters()
