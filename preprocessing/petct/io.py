"""Reading CT, PET and labels from NIfTI files or DICOM series folders into SimpleITK images.

Contract: every reader returns a float32 (labels: uint8) `sitk.Image` carrying the scanner-frame geometry, or
raises `StudyError` naming the study and the problem. PET from DICOM is converted to SUVbw from its tags (per-slice
RescaleSlope applied in float); PET from NIfTI must already be SUVbw (there are no tags to convert it with).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from .errors import StudyError
from .labels import LabelSet
from .suv import SuvTagError, suv_factor

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


def _check_exists(study_id: str, path: Path | None, what: str) -> Path:
    if path is None or str(path) in ("", ".", "nan"):
        raise StudyError(study_id, "missing_modality", f"no {what} given")
    path = Path(path)
    if not path.exists():
        raise StudyError(study_id, "missing_modality", f"{what} not found: {path}")
    return path


def _dicom_slices(study_id: str, folder: Path) -> list[pydicom.Dataset]:
    """All slices of the one series in `folder`, sorted along the slice normal."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise StudyError(study_id, "missing_modality", f"DICOM folder is empty: {folder}")
    slices = []
    for path in files:
        try:
            ds = pydicom.dcmread(path)
            ds.pixel_array  # noqa: B018 - decode now so a truncated file fails here, with its name
        except (InvalidDicomError, ValueError, OSError, AttributeError, EOFError) as exc:
            raise StudyError(study_id, "read_error", f"cannot read DICOM file {path.name} in {folder}: {exc}") from exc
        slices.append(ds)
    if len({getattr(s, "SeriesInstanceUID", None) for s in slices}) > 1:
        raise StudyError(study_id, "read_error", f"{folder} holds more than one DICOM series")
    normal = _slice_normal(slices[0])
    return sorted(slices, key=lambda s: float(np.dot(normal, np.asarray(s.ImagePositionPatient, float))))


def _slice_normal(ds: pydicom.Dataset) -> np.ndarray:
    row, col = np.asarray(ds.ImageOrientationPatient, float).reshape(2, 3)
    return np.cross(row, col)


def _series_to_image(study_id: str, slices: list[pydicom.Dataset], folder: Path) -> sitk.Image:
    """Stack slices into a float32 image; each slice keeps its own rescale (PET scanners scale per slice)."""
    first = slices[0]
    row, col = np.asarray(first.ImageOrientationPatient, float).reshape(2, 3)
    normal = np.cross(row, col)
    positions = np.array([np.dot(normal, np.asarray(s.ImagePositionPatient, float)) for s in slices])
    gaps = np.diff(positions)
    if len(slices) > 1 and (gaps.min() <= 0 or np.ptp(gaps) > 0.01 * np.median(gaps) + 1e-3):
        raise StudyError(study_id, "read_error", f"{folder}: slices are not evenly spaced (gaps {gaps.min():.3f}"
                         f"..{gaps.max():.3f} mm): missing or duplicate slices")
    volume = np.empty((len(slices), int(first.Rows), int(first.Columns)), np.float32)
    for k, s in enumerate(slices):
        slope, intercept = float(getattr(s, "RescaleSlope", 1.0)), float(getattr(s, "RescaleIntercept", 0.0))
        volume[k] = s.pixel_array.astype(np.float32) * slope + intercept
    image = sitk.GetImageFromArray(volume)
    dy, dx = (float(v) for v in first.PixelSpacing)  # PixelSpacing is (row spacing = y, column spacing = x)
    image.SetSpacing((dx, dy, float(np.median(gaps)) if len(slices) > 1 else float(first.SliceThickness)))
    image.SetOrigin(tuple(float(v) for v in first.ImagePositionPatient))
    image.SetDirection(tuple(np.column_stack([row, col, normal]).ravel()))
    return image


def _nifti_truncation(path: Path, header) -> str:
    """Why a NIfTI file is shorter than its header says ('' when whole). ITK pads a truncated .nii.gz silently.

    Cheap first: a gzip stream ends with the uncompressed size mod 2^32; only on a mismatch do we decompress the
    whole stream to be sure (multi-member gzip files would also mismatch).
    """
    import gzip

    expected = int(header["vox_offset"]) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    if path.name.endswith(".gz"):
        with open(path, "rb") as handle:
            handle.seek(-4, 2)
            if int.from_bytes(handle.read(4), "little") == expected % 2**32:
                return ""
        try:
            with gzip.open(path, "rb") as stream:
                size = sum(len(chunk) for chunk in iter(lambda: stream.read(1 << 24), b""))
        except (EOFError, OSError) as exc:
            return f"truncated gzip stream ({exc})"
    else:
        size = path.stat().st_size
    return "" if size >= expected else f"truncated: {size} bytes, header needs {expected}"


def _check_nifti(study_id: str, path: Path, what: str) -> None:
    """Checks ITK's NIfTI reader skips: truncation (it pads) and NaN/inf in float data (it reads them as 0)."""
    import nibabel

    try:
        image = nibabel.load(str(path))
    except Exception as exc:  # nibabel raises many types for a bad header
        raise StudyError(study_id, "read_error", f"cannot read {path}: unreadable NIfTI header ({exc})") from exc
    problem = _nifti_truncation(path, image.header)
    if problem:
        raise StudyError(study_id, "read_error", f"cannot read {path}: {problem}")
    if np.issubdtype(image.header.get_data_dtype(), np.floating):  # integer voxels cannot be NaN: skip the pass
        bad = int(np.count_nonzero(~np.isfinite(np.asanyarray(image.dataobj))))
        if bad:
            raise StudyError(study_id, "non_finite", f"{what} has {bad} NaN/inf voxels ({path.name})")


def _read_file(study_id: str, path: Path, pixel: int, what: str) -> sitk.Image:
    if path.name.endswith((".nii", ".nii.gz")):
        _check_nifti(study_id, path, what)
    try:
        return sitk.ReadImage(str(path), pixel)
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1][:300]
        raise StudyError(study_id, "read_error", f"cannot read {path}: {first_line}") from exc


def _check_finite(study_id: str, image: sitk.Image, what: str) -> sitk.Image:
    array = sitk.GetArrayViewFromImage(image)
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise StudyError(study_id, "non_finite", f"{what} has {bad} NaN/inf voxels")
    return image


def read_ct(study_id: str, path: Path | str | None) -> sitk.Image:
    """CT in HU, float32, from a NIfTI-like file or a DICOM series folder."""
    path = _check_exists(study_id, path, "CT")
    if path.is_dir():
        image = _series_to_image(study_id, _dicom_slices(study_id, path), path)
    else:
        image = _read_file(study_id, path, sitk.sitkFloat32, "CT")
    return _check_finite(study_id, image, "CT")


def read_pet(study_id: str, path: Path | str | None) -> sitk.Image:
    """PET in SUVbw, float32. DICOM: converted from the tags; NIfTI: taken as SUVbw already."""
    path = _check_exists(study_id, path, "PET")
    if path.is_dir():
        slices = _dicom_slices(study_id, path)
        try:
            factor = suv_factor(slices)
        except SuvTagError as exc:
            kind = "missing_suv_tag" if exc.missing else "bad_suv_tag"
            raise StudyError(study_id, kind, f"PET {path}: {exc}") from exc
        image = _series_to_image(study_id, slices, path) * factor
    else:
        image = _read_file(study_id, path, sitk.sitkFloat32, "PET")
    return _check_finite(study_id, image, "PET")


def same_grid(a: sitk.Image, b: sitk.Image, tol_mm: float = 1e-3) -> bool:
    """True when size, spacing, origin and direction agree (geometry tolerance in mm / direction cosines)."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol_mm)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol_mm)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4)
    )


def describe_grid(image: sitk.Image) -> str:
    spacing = ", ".join(f"{v:.3f}" for v in image.GetSpacing())
    origin = ", ".join(f"{v:.1f}" for v in image.GetOrigin())
    return f"size {image.GetSize()} spacing ({spacing}) origin ({origin})"


def read_label(study_id: str, path: Path | str | None, pet: sitk.Image, labels: LabelSet) -> sitk.Image:
    """Label map on the PET grid, uint8 holding only values of `labels`; any other grid or value is an error."""
    path = _check_exists(study_id, path, "label")
    image = _read_file(study_id, path, sitk.sitkFloat32, "label")
    if not same_grid(image, pet):
        raise StudyError(study_id, "label_grid", f"label grid {describe_grid(image)} differs from the PET grid "
                         f"{describe_grid(pet)}; labels must be drawn on the PET grid")
    values = sitk.GetArrayViewFromImage(image)
    outside = ~np.isin(values, np.arange(labels.num_classes, dtype=values.dtype))  # NaN, fractions, out of range
    if outside.any():
        raise StudyError(study_id, "label_values", f"{path.name}: label values {_listed(np.unique(values[outside]))} "
                         f"are not in the label set {labels.describe()}")
    return sitk.Cast(image, sitk.sitkUInt8)


def _listed(values: np.ndarray, most: int = 10) -> str:
    """`[2, 5, 0.5]`: whole numbers without '.0', and '... (N values)' past `most`."""
    shown = [int(v) if np.isfinite(v) and v % 1 == 0 else float(v) for v in values[:most]]
    return str(shown) if len(values) <= most else f"{str(shown)[:-1]}, ... ({len(values)} values)]"


def hash_source(path: Path | str | None) -> str:
    """blake2b of a file, or of a folder's files (names and bytes, sorted); '' when absent."""
    if path is None or str(path) in ("", "."):
        return ""
    path = Path(path)
    if not path.exists():
        return ""
    digest = hashlib.blake2b(digest_size=16)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()
