"""A predicted label volume as DICOM-SEG (highdicom) that references the source PET series, for 3D Slicer, OHIF and
PACS viewers to show on top of the original images.

- One BINARY segment per foreground class of the label set, segment number = the class value, label = the class
  name. Coded concepts: SNOMED CT where the name maps to a concept pydicom knows ("kidneys" -> Kidney, "liver" ->
  Liver, "lesion" -> Lesion), the category "Anatomical Structure", or "Morphologically Altered Structure" for the
  set's lesion class; any other name gets a code in a private scheme (`99SWINSSL`, DICOM PS3.16 8.2 allows "99"
  prefixed local schemes), so nothing is mislabelled as a concept it is not.
- Frames: the prediction lives on the PET grid as read (`prepare` does not resample the PET), so slice k of the
  prediction is the PET image at the position k along the slice normal. Each source image is matched by its
  ImagePositionPatient, not by file order, and a PET whose reader changed its geometry (e.g. a gantry-tilted stack
  resampled: the record's `pet_geometry` note) is refused: its frames are not the prediction's slices.
- The SEG is written in the PET's study (StudyInstanceUID, patient module copied by highdicom), a new series.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom

from petct.dicom_read import scan_series
from petct.errors import StudyError
from petct.labels import LabelSet
from petct.shards import atomic_write_bytes

__all__ = ["write_dicom_seg", "segment_codes"]

PRIVATE_SCHEME = "99SWINSSL"
ANATOMY = ("91723000", "SCT", "Anatomical Structure")
ALTERED = ("49755003", "SCT", "Morphologically Altered Structure")


def _sct_code(name: str):
    """The SNOMED CT concept pydicom names after `name` ('parotid_glands' -> ParotidGland), or None."""
    from pydicom.sr.codedict import codes

    words = [w for w in re.split(r"[^A-Za-z0-9]+", name) if w]
    if words and words[-1].lower().endswith("s") and len(words[-1]) > 3:
        words[-1] = words[-1][:-1]  # plural organ names: kidneys -> kidney
    key = "".join(w[:1].upper() + w[1:].lower() for w in words)
    try:
        return getattr(codes.SCT, key)
    except AttributeError:
        return None


def segment_codes(labels: LabelSet) -> dict[int, tuple[tuple[str, str, str], tuple[str, str, str]]]:
    """class value -> ((category code, scheme, meaning), (type code, scheme, meaning)) for each foreground class."""
    out = {}
    for value in labels.foreground:
        name = labels.name(value)
        category = ALTERED if value == labels.lesion else ANATOMY
        code = _sct_code(name)
        kind = (code.value, code.scheme_designator, code.meaning) if code else (
            f"SWS{value:03d}", PRIVATE_SCHEME, name.replace("_", " "))
        out[value] = (category, kind)
    return out


def _descriptions(labels: LabelSet, version: str):
    import highdicom as hd

    family = hd.sr.CodedConcept("123109", "DCM", "Artificial Intelligence")
    algorithm = hd.AlgorithmIdentificationSequence(name="swinssl SwinUNETR", version=version, family=family)
    return [hd.seg.SegmentDescription(
        segment_number=value, segment_label=labels.name(value)[:64],
        segmented_property_category=hd.sr.CodedConcept(*category),
        segmented_property_type=hd.sr.CodedConcept(*kind),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
        for value, (category, kind) in segment_codes(labels).items()]


TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
         "AccessionNumber", "ReferringPhysicianName")
"""Patient and study attributes highdicom copies into the SEG; DICOM type 2 (may be empty, must be present)."""


def _with_type2(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A source image with absent type-2 patient/study attributes present and empty (what PS3.3 allows), so an
    anonymised export that dropped them can still be referenced."""
    for keyword in TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def _frame_slices(study_id: str, datasets: list[pydicom.Dataset], origin, spacing, direction, depth: int) -> list[int]:
    """Prediction slice index of each PET image, from its position along the grid's slice normal."""
    normal = np.asarray(direction, dtype=float).reshape(3, 3)[:, 2]
    slices = []
    for ds in datasets:
        along = (np.asarray(ds.ImagePositionPatient, dtype=float) - np.asarray(origin)) @ normal / spacing[2]
        k = int(round(along))
        if abs(along - k) > 0.05 or not 0 <= k < depth:
            raise StudyError(study_id, "geometry", f"PET image {ds.SOPInstanceUID} lies at slice {along:.2f} of the "
                             f"prediction grid (0..{depth - 1}): the PET series is not the grid that was predicted")
        slices.append(k)
    if len(set(slices)) != len(slices):
        raise StudyError(study_id, "geometry", "several PET images share a slice of the prediction grid")
    return slices


def write_dicom_seg(prediction: np.ndarray, record: dict, labels: LabelSet, path: Path, version: str) -> Path:
    """Write the (Z, Y, X) prediction as a DICOM-SEG referencing the study's PET series; returns `path`.

    `record` is the study's `prepare` manifest row (pet_path, pet_series, origin, spacing, direction, pet_geometry).

    Raises:
        StudyError: the PET is not a DICOM series, its geometry was changed by the reader, or its images do not
            match the prediction grid (kind 'not_dicom' / 'geometry').
    """
    import highdicom as hd

    sid = record["study_id"]
    if record.get("pet_geometry"):
        raise StudyError(sid, "geometry", f"the PET was resampled when read ({record['pet_geometry']}): its DICOM "
                         "frames are not the prediction's slices, so no DICOM-SEG can reference them")
    pet_path = Path(record.get("pet_path") or "")
    if not pet_path.exists() or pet_path.suffix in (".gz", ".nii", ".nrrd", ".mha"):
        raise StudyError(sid, "not_dicom", f"PET source {pet_path} is not a DICOM series: no DICOM-SEG (the NIfTI "
                         "label on the PET grid is written)")
    series = scan_series(sid, pet_path, "PT", record.get("pet_series", ""))
    files = sorted({frame.path for frame in series.frames})
    datasets = [_with_type2(pydicom.dcmread(f)) for f in files]
    if any(int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise StudyError(sid, "not_dicom", "the PET is a multi-frame (enhanced) object: DICOM-SEG from it is not "
                         "supported yet; the NIfTI label on the PET grid is written")
    slices = _frame_slices(sid, datasets, record["origin"], record["spacing"], record["direction"],
                           prediction.shape[0])
    frames = np.ascontiguousarray(prediction[slices].astype(np.uint8))
    first = datasets[0]
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_descriptions(labels, version), series_instance_uid=hd.UID(),
        series_number=int(getattr(first, "SeriesNumber", 0) or 0) + 1000, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="swinssl", manufacturer_model_name="SwinUNETR", software_versions=version,
        device_serial_number="0", series_description=f"swinssl segmentation of {first.get('SeriesDescription', 'PET')}"
        [:64], content_label="SWINSSL", omit_empty_frames=True)
    from io import BytesIO

    buffer = BytesIO()
    seg.save_as(buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path
