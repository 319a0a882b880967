"""Reading CT, PET and labels from NIfTI-like files or DICOM series folders into SimpleITK images.

Contract: every reader returns a float32 (labels: uint8) `sitk.Image` carrying the scanner-frame geometry, or
raises `StudyError` naming the study and the problem. It is always one 3-D volume: 4-D files, a singleton axis, a
single slice are refused (`geometry`), and so is a volume above the memory budget (`too_large`, checked from the
header before anything is allocated). DICOM reading lives in `petct.dicom_read`. PET from DICOM is converted to
SUVbw from its tags (per-slice RescaleSlope applied in float); PET from NIfTI must already be SUVbw (there are no
tags to convert it with). Every PET is then checked for physiologically plausible SUV.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .dicom_read import is_dicom_file, load_series, scan_series
from .errors import StudyError, too_large
from .labels import LabelSet
from .plausibility import check_suv_range
from .suv import SuvTagError, suv_factor

CT_FILL_HU = -1024.0
"""Outside the shifted slices of a tilted CT: the scanner's own air value (stored 0 at RescaleIntercept -1024)."""


def _check_exists(study_id: str, path: Path | None, what: str) -> Path:
    if path is None or str(path) in ("", ".", "nan"):
        raise StudyError(study_id, "missing_modality", f"no {what} given")
    path = Path(path)
    if not path.exists():
        raise StudyError(study_id, "missing_modality", f"{what} not found: {path}")
    return path


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


def _itk_error(study_id: str, path: Path, exc: RuntimeError) -> StudyError:
    return StudyError(study_id, "read_error", f"cannot read {path}: {str(exc).strip().splitlines()[-1][:300]}")


def _check_shape(study_id: str, path: Path, what: str, max_bytes: int | None) -> None:
    """From the header alone: one 3-D scalar volume, at least 3 voxels on each axis, within the memory budget."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _itk_error(study_id, path, exc) from exc
    size = reader.GetSize()  # ITK drops trailing singleton axes: (x, y, z, 1) reads as 3-D
    if reader.GetNumberOfComponents() != 1:
        raise StudyError(study_id, "read_error", f"{what} {path.name}: {reader.GetNumberOfComponents()} components "
                         "per voxel (a colour or vector image), not a scalar volume")
    if len(size) != 3:
        raise StudyError(study_id, "geometry", f"{what} {path.name} is {len(size)}-D (size {size}): give one 3-D "
                         "volume (a 4-D file is a dynamic, gated or multi-volume series)")
    if min(size) < 3:
        raise StudyError(study_id, "geometry", f"{what} {path.name} has size {size}: a single slice or a singleton "
                         "axis, not a volume (need at least 3 voxels on each axis)")
    if max_bytes is not None and 4 * int(np.prod(size)) > max_bytes:
        raise too_large(study_id, f"{what} {path.name}", size, max_bytes)


def _read_file(study_id: str, path: Path, pixel: int, what: str, max_bytes: int | None = None) -> sitk.Image:
    _check_shape(study_id, path, what, max_bytes)
    if path.name.endswith((".nii", ".nii.gz")):
        _check_nifti(study_id, path, what)
    try:
        return sitk.ReadImage(str(path), pixel)
    except RuntimeError as exc:
        raise _itk_error(study_id, path, exc) from exc


def _check_finite(study_id: str, image: sitk.Image, what: str) -> sitk.Image:
    array = sitk.GetArrayViewFromImage(image)
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise StudyError(study_id, "non_finite", f"{what} has {bad} NaN/inf voxels")
    return image


def read_ct(study_id: str, path: Path | str | None, series_uid: str = "", max_bytes: int | None = None) -> sitk.Image:
    """CT in HU, float32, from a NIfTI-like file, a DICOM folder (`series_uid`: that series, searched below it) or
    one multi-frame DICOM file (read as DICOM, never through ITK's reader: it ignores per-frame geometry).

    `max_bytes`: refuse (`too_large`) a volume whose float32 size, known from the headers, is larger.
    """
    path = _check_exists(study_id, path, "CT")
    if path.is_dir() or is_dicom_file(path):
        image = load_series(study_id, scan_series(study_id, path, "CT", series_uid, max_bytes), CT_FILL_HU)
    else:
        image = _read_file(study_id, path, sitk.sitkFloat32, "CT", max_bytes)
    return _check_finite(study_id, image, "CT")


def read_pet(study_id: str, path: Path | str | None, series_uid: str = "", max_bytes: int | None = None) -> sitk.Image:
    """PET in SUVbw, float32. DICOM: converted from the tags (before any pixel is decoded); NIfTI: taken as SUVbw.

    `series_uid` and `max_bytes` as for `read_ct`; the SUV range is then checked (`petct.plausibility`).
    """
    path = _check_exists(study_id, path, "PET")
    if path.is_dir() or is_dicom_file(path):
        series = scan_series(study_id, path, "PT", series_uid, max_bytes)
        try:
            factor = suv_factor([frame.ds for frame in series.frames])
        except SuvTagError as exc:
            raise StudyError(study_id, exc.kind, f"PET {path}: {exc}") from exc
        activity = load_series(study_id, series, 0.0)
        image, origin = activity * factor, f"DICOM series {path}"
        for key in activity.GetMetaDataKeys():  # arithmetic drops metadata (the resampling note)
            image.SetMetaData(key, activity.GetMetaData(key))
    else:
        image, origin = _read_file(study_id, path, sitk.sitkFloat32, "PET", max_bytes), f"NIfTI {path}"
    image = _check_finite(study_id, image, "PET")
    check_suv_range(study_id, image, origin)
    return image


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


def read_label(study_id: str, path: Path | str | None, pet: sitk.Image, labels: LabelSet,
               label_map: dict[int, str] | None = None, ct: sitk.Image | None = None,
               transform: sitk.Transform | None = None) -> tuple[sitk.Image, str]:
    """(label on the PET grid, uint8 holding only values of `labels`; the grid it was drawn on: 'pet' or 'ct').

    `label_map` ({file value: class name}, e.g. autoPET's {0: background, 1: lesion}) translates the file's values
    by class name ('background' is 0, 'lesion' the set's lesion class); None = the file holds the set's values. A
    label on the PET grid is used as is; one on the grid of `ct` (the CT as read) is resampled nearest-neighbour
    onto the PET grid through `transform` (PET point -> CT point: the registration's). Any other grid, a value
    outside the map or the set, or a class the set lacks is an error.
    """
    path = _check_exists(study_id, path, "label")
    image = _read_file(study_id, path, sitk.sitkFloat32, "label")
    grid = "pet" if same_grid(image, pet) else "ct" if ct is not None and same_grid(image, ct) else ""
    if not grid:
        on_ct = f" nor the CT grid {describe_grid(ct)}" if ct is not None else ""
        raise StudyError(study_id, "label_grid", f"{path.name}: label grid {describe_grid(image)} is neither the PET "
                         f"grid {describe_grid(pet)}{on_ct}; labels must be drawn on the PET or the CT grid")
    aliases = {"background": 0} | ({"lesion": labels.lesion} if labels.lesion is not None else {})
    names = label_map or dict(enumerate(labels.names))
    table = {v: labels.names.index(n) if n in labels.names else aliases.get(n, -1) for v, n in names.items()}
    values = sitk.GetArrayViewFromImage(image)
    outside = ~np.isin(values, np.array(sorted(table), dtype=values.dtype))  # NaN, fractions, out of range
    if outside.any():
        allowed = f"the label map {label_map} of this layout" if label_map else f"the label set {labels.describe()}"
        raise StudyError(study_id, "label_values", f"{path.name}: label values {_listed(np.unique(values[outside]))} "
                         f"are not in {allowed}")
    lacking = {v: names[v] for v, t in table.items() if t < 0 and (values == v).any()}
    if lacking:
        raise StudyError(study_id, "label_values", f"{path.name}: classes {lacking} (file value: name) are not in the "
                         f"label set {labels.describe()}; give `prepare --labels` a set that names them")
    translated = values.astype(np.uint8) if not label_map else np.zeros(values.shape, np.uint8)
    for value, target in table.items() if label_map else ():
        if target > 0:  # 0 is the fill
            translated[values == value] = target
    out = sitk.GetImageFromArray(translated)
    out.CopyInformation(image)
    if grid == "ct":
        out = sitk.Resample(out, pet, transform or sitk.Euler3DTransform(), sitk.sitkNearestNeighbor, 0,
                            sitk.sitkUInt8)
    return out, grid


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
