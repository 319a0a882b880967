"""Write a synthetic study as CT and PET DICOM series the way scanners do (pydicom 3).

CT: one file per slice, int16 stored = HU + 1024 (RescaleIntercept -1024, slope 1).
PET: one file per slice, uint16 with its own RescaleSlope (max-scaled per slice), Bq/mL, attenuation and decay
corrected (CorrectedImage lists ATTN and DECY; decay to the scan start), with every tag SUVbw needs (weight, dose,
injection and series times, half-life, the Ga-68 RadionuclideCodeSequence; see suv.py). Files
are numbered from the head down (file 0 and InstanceNumber 1 = most superior slice), as head-first scanners number
them; readers must sort by position.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    PositronEmissionTomographyImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

GA68_HALF_LIFE_S = 4056.0  # s: a scanner-table value (67.6 min); NuDat 67.71 min, within the 2 % suv.py allows
BED_LENGTH_MM = 200.0  # axial extent of one PET bed position (whole-body scans step the bed)


def _ds(value: float) -> str:
    """A DS string (<= 16 characters) that round-trips to the float actually used in the maths."""
    return format_number_as_ds(float(value))


def sample_meta(rng: np.random.Generator) -> dict:
    """Random patient weight, injected Ga-68 PSMA-11 dose and times (injection 50-70 min before the scan)."""
    start = dt.datetime(2018, 1, 1, 8) + dt.timedelta(days=int(rng.integers(0, 2500)),
                                                      seconds=int(rng.integers(0, 8 * 3600)))
    uptake = int(rng.integers(50 * 60, 70 * 60 + 1))
    return {
        "weight_kg": round(float(rng.uniform(60.0, 110.0)), 1),
        "dose_bq": round(float(rng.uniform(100e6, 200e6)), -4),
        "half_life_s": GA68_HALF_LIFE_S,
        "injection_datetime": (start - dt.timedelta(seconds=uptake)).isoformat(),
        "scan_start_datetime": start.isoformat(),
        "uptake_s": float(uptake),
        "bed_duration_s": int(rng.integers(120, 181)),
        "radiopharmaceutical": "Ga-68 PSMA-11",
    }


def bqml_per_suv(meta: dict) -> float:
    """Activity concentration (Bq/mL) of SUVbw 1 at scan start: dose * 2^(-dt/T) / (weight_kg * 1000)."""
    return meta["dose_bq"] * 2.0 ** (-meta["uptake_s"] / meta["half_life_s"]) / (meta["weight_kg"] * 1000.0)


def _common(meta: dict, uids: dict, modality: str, sop_class: str) -> Dataset:
    """Patient/study/series/frame-of-reference attributes shared by every slice of one series."""
    start = dt.datetime.fromisoformat(meta["scan_start_datetime"])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID, ds.Modality = sop_class, modality
    ds.PatientName, ds.PatientID, ds.PatientSex = f"SYNTH^{uids['patient']}", uids["patient"], "M"
    ds.PatientWeight, ds.PatientPosition = _ds(meta["weight_kg"]), "HFS"
    ds.StudyInstanceUID, ds.FrameOfReferenceUID = uids["study"], uids["frame"]
    ds.SeriesInstanceUID = uids[modality]
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = start.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = start.strftime("%H%M%S")
    ds.SeriesNumber = 2 if modality == "CT" else 3
    ds.SeriesDescription = "CT synthetic phantom" if modality == "CT" else "PET AC synthetic phantom"
    ds.StudyID, ds.AccessionNumber, ds.Manufacturer = "1", "", "swinssl synthetic phantom"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    return ds


def _geometry(ds: Dataset, image: sitk.Image, k: int) -> None:
    """Slice k of an identity-direction image: position, orientation, spacing (PixelSpacing = [row(y), col(x)])."""
    sx, sy, sz = image.GetSpacing()
    ox, oy, oz = image.GetOrigin()
    ds.ImagePositionPatient = [_ds(ox), _ds(oy), _ds(oz + k * sz)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [_ds(sy), _ds(sx)]
    ds.SliceThickness, ds.SliceLocation = _ds(sz), _ds(oz + k * sz)
    ds.Rows, ds.Columns = image.GetSize()[1], image.GetSize()[0]


def _save(ds: Dataset, path: Path, pixels: np.ndarray, number: int, uid_seed: list[str]) -> None:
    ds.InstanceNumber = number
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=uid_seed + [str(number)])
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_ct_series(ct: sitk.Image, folder: Path, meta: dict, uids: dict) -> None:
    """CT_0000.dcm.. (head first); stored values HU + 1024 as int16."""
    folder.mkdir(parents=True, exist_ok=True)
    hu = sitk.GetArrayViewFromImage(ct)
    nz = hu.shape[0]
    ds = _common(meta, uids, "CT", CTImageStorage)
    ds.ImageType, ds.KVP, ds.RescaleType = ["ORIGINAL", "PRIMARY", "AXIAL"], "120", "HU"
    ds.PixelRepresentation, ds.RescaleSlope, ds.RescaleIntercept = 1, "1", "-1024"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.AcquisitionTime = ds.SeriesTime
    for i in range(nz):
        k = nz - 1 - i  # file 0 = top slice
        _geometry(ds, ct, k)
        stored = (hu[k].astype(np.int32) + 1024).clip(0, 32767).astype("<i2")
        _save(ds, folder / f"CT_{i:04d}.dcm", stored, i + 1, [uids["CT"]])


def _radiopharmaceutical(meta: dict) -> Dataset:
    inj = dt.datetime.fromisoformat(meta["injection_datetime"])
    radio = Dataset()
    radio.Radiopharmaceutical = meta["radiopharmaceutical"]
    radio.RadiopharmaceuticalStartTime = inj.strftime("%H%M%S")
    radio.RadiopharmaceuticalStartDateTime = inj.strftime("%Y%m%d%H%M%S")
    radio.RadionuclideTotalDose = _ds(meta["dose_bq"])
    radio.RadionuclideHalfLife = _ds(meta["half_life_s"])
    radio.RadionuclidePositronFraction = "0.8891"
    nuclide = Dataset()  # DICOM PS3.16 CID 4020, as scanners write it: SNOMED CT code of the radionuclide
    nuclide.CodeValue, nuclide.CodingSchemeDesignator, nuclide.CodeMeaning = "35337001", "SCT", "^68^Gallium"
    radio.RadionuclideCodeSequence = Sequence([nuclide])
    return radio


def write_pet_series(suv: sitk.Image, folder: Path, meta: dict, uids: dict) -> None:
    """PT_0000.dcm.. (head first); Bq/mL = SUV * bqml_per_suv, uint16 with a per-slice RescaleSlope.

    Beds are acquired feet to head from the scan start, so AcquisitionTime >= SeriesTime on every slice;
    values are decay corrected to the scan start (DecayCorrection START) whatever the bed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    bq = sitk.GetArrayViewFromImage(suv).astype(np.float64) * bqml_per_suv(meta)
    nz, sz = bq.shape[0], suv.GetSpacing()[2]
    start = dt.datetime.fromisoformat(meta["scan_start_datetime"])
    ds = _common(meta, uids, "PT", PositronEmissionTomographyImageStorage)
    ds.ImageType, ds.SeriesType = ["ORIGINAL", "PRIMARY"], ["WHOLE BODY", "IMAGE"]
    ds.Units, ds.DecayCorrection, ds.CountsSource = "BQML", "START", "EMISSION"
    ds.CorrectedImage = ["DECY", "ATTN", "SCAT", "DTIM", "RAN", "NORM"]
    ds.RadiopharmaceuticalInformationSequence = Sequence([_radiopharmaceutical(meta)])
    ds.PixelRepresentation, ds.RescaleIntercept, ds.NumberOfSlices = 0, "0", nz
    ds.ActualFrameDuration = meta["bed_duration_s"] * 1000
    for i in range(nz):
        k = nz - 1 - i
        _geometry(ds, suv, k)
        bed = int(k * sz // BED_LENGTH_MM)  # bed 0 holds the most inferior slices
        ds.AcquisitionTime = (start + dt.timedelta(seconds=bed * meta["bed_duration_s"])).strftime("%H%M%S")
        ds.ImageIndex = i + 1
        peak = float(bq[k].max())
        # Max-scaled per slice; 65000 leaves headroom for the DS rounding of the slope string.
        slope = float(_ds(peak / 65000.0)) if peak > 0 else 1.0
        ds.RescaleSlope = _ds(slope)
        stored = np.clip(np.rint(bq[k] / slope), 0, 65535).astype("<u2")
        _save(ds, folder / f"PT_{i:04d}.dcm", stored, i + 1, [uids["PT"]])


def write_study_dicom(folder: Path, study_id: str, seed: int, ct: sitk.Image, suv: sitk.Image,
                      rng: np.random.Generator) -> dict:
    """ct/ and pet/ series plus suv_truth.json (the values SUV must be recomputed with); returns the metadata."""
    meta = sample_meta(rng)
    entropy = [study_id, str(seed)]
    uids = {key: generate_uid(entropy_srcs=entropy + [key]) for key in ("study", "frame", "CT", "PT")}
    uids["patient"] = study_id
    write_ct_series(ct, folder / "ct", meta, uids)
    write_pet_series(suv, folder / "pet", meta, uids)
    truth = dict(meta, bqml_per_suv=bqml_per_suv(meta), decay_factor=2.0 ** (-meta["uptake_s"] / meta["half_life_s"]))
    (folder / "suv_truth.json").write_text(json.dumps(truth, indent=2))
    return truth
