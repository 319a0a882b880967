"""PET DICOM series as different scanners write them, read through `petct.io.read_pet`: right SUV or a precise refusal.

The series come from this file's own small writer (8x8x4 voxels; not `petct.dicom_write`), with the tag habits of
each vendor: Siemens (time-only injection, SeriesTime after the acquisition, signed pixels, legacy SNOMED RT code),
GE (RadiopharmaceuticalStartDateTime, a RescaleSlope per slice), ADMIN decay correction, GML (SUV stored) and the
mistakes and traps real exports contain. Expected SUVs are recomputed here with exp(-ln2 t / T) and explicit
datetime arithmetic, independently of `petct.suv`.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, PositronEmissionTomographyImageStorage, generate_uid

from petct.errors import StudyError
from petct.io import read_pet
from petct.pipeline import prepare_cohort

NZ, NY, NX = 4, 8, 8
F18_S, GA68_S, ZR89_S = 6586.2, 4057.7, 282276.0
SIEMENS_CORRECTIONS = ["NORM", "DTIM", "ATTN", "SCAT", "DECY", "RAN"]
F18_SRT = ("C-111A1", "SRT", "^18^Fluorine")
GA68_SCT = ("35337001", "SCT", "^68^Gallium")
ZR89_SCT = ("63360001", "SCT", "^89^Zirconium")


def _activity(seed: int = 0) -> np.ndarray:
    """Bq/mL (z, y, x): a body of ~5 kBq/mL with a hot spot, air 0 around it."""
    rng = np.random.default_rng(seed)
    values = np.zeros((NZ, NY, NX))
    values[:, 1:7, 1:7] = rng.uniform(3000.0, 7000.0, (NZ, 6, 6))
    values[1:3, 3:5, 3:5] = rng.uniform(4e4, 8e4, (2, 2, 2))
    return values


def _header(variant: dict) -> Dataset:
    """Series-level attributes of a whole-body PET; `variant` overrides keywords, 'radio' the sequence item."""
    ds = Dataset()
    ds.SOPClassUID, ds.Modality = PositronEmissionTomographyImageStorage, "PT"
    ds.PatientID, ds.PatientName, ds.PatientWeight = "VENDOR1", "VENDOR^ONE", "75"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = "20260315"
    ds.SeriesTime, ds.StudyTime = "100000", "095500"
    ds.Units, ds.DecayCorrection, ds.CorrectedImage = "BQML", "START", SIEMENS_CORRECTIONS
    ds.ImageType, ds.SeriesType = ["ORIGINAL", "PRIMARY"], ["WHOLE BODY", "IMAGE"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.Rows, ds.Columns, ds.PixelSpacing, ds.SliceThickness = NY, NX, ["4.0", "4.0"], "3.0"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    radio = Dataset()
    radio.Radiopharmaceutical = "Fluorodeoxyglucose"
    radio.RadionuclideTotalDose, radio.RadionuclideHalfLife = "350000000", str(F18_S)
    radio.RadiopharmaceuticalStartTime = "090000"
    for key, value in variant.pop("radio", {}).items():
        if value is None:
            delattr(radio, key)
        elif key == "code":
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value
            radio.RadionuclideCodeSequence = Sequence([item])
        else:
            setattr(radio, key, value)
    ds.RadiopharmaceuticalInformationSequence = Sequence([radio])
    for key, value in variant.items():
        setattr(ds, key, value)
    return ds


def write_pet(folder: Path, values: np.ndarray, variant: dict, per_slice=None) -> Path:
    """One file per slice, numbered head first; a RescaleSlope per slice scaled to that slice's maximum."""
    folder.mkdir(parents=True)
    header = _header(dict(variant))
    signed = int(header.PixelRepresentation) == 1
    top = 32000 if signed else 64000
    for i in range(NZ):
        k = NZ - 1 - i
        ds = Dataset()
        ds.update(header)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = PositronEmissionTomographyImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber, ds.ImagePositionPatient = i + 1, ["-16.0", "-16.0", f"{3.0 * k:.1f}"]
        slope = float(f"{max(values[k].max(), 1e-6) / top:.6g}")
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.6g}", "0"
        for key, value in (per_slice(k) if per_slice else {}).items():
            setattr(ds, key, value)
        stored = np.rint(values[k] / slope).astype("<i2" if signed else "<u2")
        ds.PixelData = stored.tobytes()
        ds.save_as(folder / f"IM{i:04d}.dcm", enforce_file_format=True)
    return folder


def _stored_activity(folder: Path) -> np.ndarray:
    """The activity the files hold (stored * slope), read back slice by slice, sorted by z."""
    import pydicom

    slices = sorted((pydicom.dcmread(p) for p in folder.iterdir()), key=lambda s: float(s.ImagePositionPatient[2]))
    return np.stack([s.pixel_array * float(s.RescaleSlope) + float(s.RescaleIntercept) for s in slices])


def _suv_scale(weight_kg: float, dose_bq: float, uptake_s: float, half_life_s: float) -> float:
    return weight_kg * 1000.0 / (dose_bq * math.exp(-math.log(2.0) * uptake_s / half_life_s))


def _seconds(later: dt.datetime, earlier: dt.datetime) -> float:
    return (later - earlier).total_seconds()


def _read(folder: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(read_pet("vendor", folder))


def _assert_suv(folder: Path, scale: float) -> None:
    suv = _read(folder)
    expected = _stored_activity(folder) * scale
    np.testing.assert_allclose(suv, expected, rtol=2e-6, atol=1e-6)
    assert 0.3 < float(np.median(suv[:, 1:7, 1:7])) < 6.0  # and it looks like an SUV image


def test_siemens_like(tmp_path):
    """Time-only injection, SeriesTime after the earliest AcquisitionTime, int16 pixels, SRT code for F-18."""
    beds = {0: "100500", 1: "100500", 2: "100800", 3: "100800"}
    folder = write_pet(tmp_path / "siemens", _activity(1), {
        "Manufacturer": "SIEMENS", "SeriesTime": "103000", "PixelRepresentation": 1, "radio": {"code": F18_SRT}},
        per_slice=lambda k: {"AcquisitionTime": beds[k]})
    uptake = _seconds(dt.datetime(2026, 3, 15, 10, 5), dt.datetime(2026, 3, 15, 9, 0))
    _assert_suv(folder, _suv_scale(75, 350e6, uptake, F18_S))


def test_ge_like(tmp_path):
    """RadiopharmaceuticalStartDateTime (wins over the time), a slope per slice, Ga-68 SCT code, 67.63 min."""
    folder = write_pet(tmp_path / "ge", _activity(2), {
        "Manufacturer": "GE MEDICAL SYSTEMS", "SeriesTime": "103000", "PatientWeight": "82.5",
        "radio": {"code": GA68_SCT, "RadionuclideHalfLife": str(GA68_S), "RadionuclideTotalDose": "160e6",
                  "RadiopharmaceuticalStartDateTime": "20260315093512.000000", "RadiopharmaceuticalStartTime": "0800"}},
        per_slice=lambda k: {"AcquisitionTime": "103000"})
    slopes = {float(s) for s in _slopes(folder)}
    assert len(slopes) == NZ  # per-slice scaling really differs
    uptake = _seconds(dt.datetime(2026, 3, 15, 10, 30), dt.datetime(2026, 3, 15, 9, 35, 12))
    _assert_suv(folder, _suv_scale(82.5, 160e6, uptake, GA68_S))


def _slopes(folder: Path) -> list[str]:
    import pydicom

    return [pydicom.dcmread(p, stop_before_pixels=True).RescaleSlope for p in folder.iterdir()]


def test_admin_decay_correction(tmp_path):
    folder = write_pet(tmp_path / "admin", _activity(3), {"Manufacturer": "Philips", "DecayCorrection": "ADMIN"})
    _assert_suv(folder, 75 * 1000.0 / 350e6)


def test_gml_is_taken_as_suv(tmp_path):
    suv = _activity(4) / 4000.0  # SUV values, body ~1
    folder = write_pet(tmp_path / "gml", suv, {"Units": "GML"})
    np.testing.assert_allclose(_read(folder), _stored_activity(folder), rtol=2e-6)


def test_time_only_injection_across_midnight(tmp_path):
    folder = write_pet(tmp_path / "midnight", _activity(5), {
        "SeriesDate": "20260316", "AcquisitionDate": "20260316", "SeriesTime": "000500",
        "radio": {"code": F18_SRT, "RadiopharmaceuticalStartTime": "231500"}},
        per_slice=lambda k: {"AcquisitionTime": "000500"})
    uptake = _seconds(dt.datetime(2026, 3, 16, 0, 5), dt.datetime(2026, 3, 15, 23, 15))
    assert uptake == 50 * 60
    _assert_suv(folder, _suv_scale(75, 350e6, uptake, F18_S))


REFUSED = {  # variant, expected kind, phrase of the message
    "nac": ({"CorrectedImage": ["NORM", "DTIM", "SCAT", "DECY", "RAN"]}, "not_corrected", "attenuation"),
    "no_corrected_tag": ({"CorrectedImage": None}, "not_corrected", "CorrectedImage"),
    "decay_none": ({"DecayCorrection": "NONE", "CorrectedImage": ["ATTN", "SCAT"]}, "not_corrected", "decay"),
    "philips_cnts": ({"Manufacturer": "Philips", "Units": "CNTS"}, "bad_suv_tag", "CNTS"),
    "dose_in_mbq": ({"radio": {"RadionuclideTotalDose": "350"}}, "implausible_value", "looks like MBq"),
    "weight_in_grams": ({"PatientWeight": "75000"}, "implausible_value", "grams"),
    "half_life_mismatch": ({"radio": {"code": GA68_SCT}}, "bad_suv_tag", r"\^68\^Gallium"),
    "long_lived_time_only": ({"radio": {"code": ZR89_SCT, "RadionuclideHalfLife": str(ZR89_S)}}, "missing_suv_tag",
                             "RadiopharmaceuticalStartDateTime"),
    "no_weight": ({"PatientWeight": None}, "missing_suv_tag", "PatientWeight"),
}


def _write_variant(folder: Path, name: str) -> Path:
    """The refused variant `name`; a tag given as None is deleted from the written files."""
    variant = REFUSED[name][0]
    write_pet(folder, _activity(6), {k: v for k, v in variant.items() if v is not None})
    drop = [k for k, v in variant.items() if v is None]
    if drop:
        import pydicom

        for path in folder.iterdir():
            ds = pydicom.dcmread(path)
            for key in drop:
                delattr(ds, key)
            ds.save_as(path)
    return folder


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_variants(tmp_path, name):
    _, kind, phrase = REFUSED[name]
    folder = _write_variant(tmp_path / name, name)
    with pytest.raises(StudyError, match=phrase) as info:
        read_pet("vendor", folder)
    assert info.value.kind == kind and str(folder) in info.value.message


def test_long_lived_tracer_with_a_date_is_read(tmp_path):
    """Zr-89 imaged 4 days after injection: fine when RadiopharmaceuticalStartDateTime gives the date."""
    folder = write_pet(tmp_path / "zr89", _activity(7), {"radio": {
        "code": ZR89_SCT, "RadionuclideHalfLife": str(ZR89_S), "RadionuclideTotalDose": "37e6",
        "RadiopharmaceuticalStartDateTime": "20260311100000"}}, per_slice=lambda k: {"AcquisitionTime": "100000"})
    uptake = _seconds(dt.datetime(2026, 3, 15, 10), dt.datetime(2026, 3, 11, 10))
    suv = _read(folder)
    np.testing.assert_allclose(suv, _stored_activity(folder) * _suv_scale(75, 37e6, uptake, ZR89_S), rtol=2e-6)


def _tiny_ct(path: Path) -> str:
    ct = sitk.GetImageFromArray(np.full((NZ, 16, 16), 40.0, np.float32))
    ct.SetSpacing((2.0, 2.0, 3.0))
    ct.SetOrigin((-16.0, -16.0, 0.0))
    sitk.WriteImage(ct, str(path))
    return str(path)


def test_prepare_records_the_error_kind(tmp_path):
    """Through `prepare_cohort` (inline): the manifest row carries the kind and the message names the series."""
    ct = _tiny_ct(tmp_path / "ct.nii.gz")
    names = ["nac", "dose_in_mbq", "half_life_mismatch"]
    rows = [{"study_id": n, "ct": ct, "pet": str(_write_variant(tmp_path / n, n)), "label": "", "cohort": "unlabeled"}
            for n in names]
    cohort = tmp_path / "cohort.csv"
    with open(cohort, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    prepare_cohort(cohort, tmp_path / "out", workers=0, progress=False)
    manifest = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [(r["study_id"], r["status"], r["error_kind"]) for r in manifest] == [
        (n, "failed", REFUSED[n][1]) for n in names]
    assert all(n in r["error"] for n, r in zip(names, manifest))


# PET that is not SUV: NIfTI has no tags, so the values themselves are checked (petct.plausibility).

def _anatomy(organs: dict[str, float], body: float, seed: int) -> np.ndarray:
    """A 40x48x48 (4 mm) torso: ellipse body at `body` SUV, box organs at their SUV, 10 % noise, air ~0."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:40, 0:48, 0:48]
    suv = np.where(((y - 24) / 16.0) ** 2 + ((x - 24) / 21.0) ** 2 <= 1.0, body, 0.0)
    places = {"brain": (slice(34, 40), slice(16, 32), slice(16, 32)), "liver": (slice(18, 26), slice(14, 28),
              slice(8, 20)), "kidneys": (slice(14, 18), slice(26, 32), slice(10, 16)), "bladder": (slice(2, 5),
              slice(22, 26), slice(22, 26)), "glands": (slice(31, 33), slice(12, 14), slice(18, 30)),
              "lesion": (slice(20, 22), slice(20, 22), slice(30, 32))}
    for name, value in organs.items():
        suv[places[name]] = value
    return np.clip(suv * (1 + 0.1 * rng.standard_normal(suv.shape)) + 0.005 * rng.random(suv.shape), 0, None)


FDG = _anatomy({"brain": 9.0, "liver": 2.2, "kidneys": 3.0, "bladder": 35.0, "lesion": 15.0}, 0.7, 1)
PSMA = _anatomy({"liver": 6.0, "kidneys": 45.0, "bladder": 180.0, "glands": 15.0, "lesion": 80.0}, 0.6, 2)
LOW = _anatomy({}, 0.3, 3)
BQML_PER_SUV = 370e6 * 2 ** (-3600 / F18_S) / 70e3  # FDG 370 MBq, 70 kg, 1 h: ~3.3 kBq/mL per SUV


def _nifti(tmp_path: Path, name: str, values: np.ndarray) -> Path:
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.SetSpacing((4.0, 4.0, 4.0))
    path = tmp_path / f"{name}.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("name", ["fdg", "psma", "low"])
def test_real_suv_images_pass(tmp_path, name):
    values = {"fdg": FDG, "psma": PSMA, "low": LOW}[name]
    np.testing.assert_allclose(sitk.GetArrayFromImage(read_pet(name, _nifti(tmp_path, name, values))), values,
                               rtol=1e-6)


@pytest.mark.parametrize(("name", "values", "phrase"), [
    ("activity_bqml", FDG * BQML_PER_SUV, "looks like activity"),
    ("psma_activity_bqml", PSMA * 160e6 * 2 ** (-3600 / GA68_S) / 80e3, "looks like activity"),
    ("dose_in_mbq", FDG * 1e6, "dose in MBq"),
    ("weight_in_grams", PSMA * 1e3, "weight in grams"),
    ("low_uptake_in_grams", _anatomy({}, 0.5, 4) * 1e3, "body median"),  # robust max < 1000: the median tells
    ("low_uptake_activity", LOW * BQML_PER_SUV, "looks like activity"),
    ("activity_mbqml", FDG * BQML_PER_SUV * 1e-6, "MBq/mL"),
    ("all_zero", FDG * 0, "no positive voxel"),
])
def test_values_that_cannot_be_suv_are_refused(tmp_path, name, values, phrase):
    with pytest.raises(StudyError, match=phrase) as info:
        read_pet(name, _nifti(tmp_path, name, values))
    assert info.value.kind == "implausible_value" and f"{name}.nii.gz" in info.value.message
    if name != "all_zero":
        assert "robust max (99.9th percentile)" in info.value.message and "body median" in info.value.message


def test_synthetic_dicom_study_reads_back_its_phantom(tmp_path):
    """`swinssl synth --format dicom` writes what a scanner writes (ATTN/DECY, Ga-68 code): it still reads."""
    from petct.synth import synth_study

    synth_study("s", tmp_path / "nifti", labeled=False, seed=3)
    synth_study("s", tmp_path / "dicom", labeled=False, seed=3, fmt="dicom")
    phantom = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "nifti" / "s" / "pet.nii.gz")))
    suv = sitk.GetArrayFromImage(read_pet("s", tmp_path / "dicom" / "s" / "pet"))
    assert np.abs(suv - phantom).max() <= 1e-3 * phantom.max()
    import pydicom

    first = pydicom.dcmread(next((tmp_path / "dicom" / "s" / "pet").iterdir()), stop_before_pixels=True)
    code = first.RadiopharmaceuticalInformationSequence[0].RadionuclideCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == GA68_SCT
    assert {"ATTN", "DECY"} <= set(first.CorrectedImage)


def test_synthetic_cohort_is_plausible_suv(cohort):
    from petct.plausibility import check_suv_range, suv_statistics

    rows = list(csv.DictReader(open(cohort)))
    for row in rows:
        pet = sitk.ReadImage(str(cohort.parent / row["pet"]))
        check_suv_range(row["study_id"], pet, row["pet"])
        robust_max, body_median = suv_statistics(pet)
        assert 10 < robust_max < 200 and 0.2 < body_median < 10, (row["study_id"], robust_max, body_median)
