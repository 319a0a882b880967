"""Reading one CT or PET DICOM image series into a float32 SimpleITK image (DICOM PS3.3 image-plane geometry).

Contract: `scan_series` reads headers only (`stop_before_pixels`: fast) and returns a `Series`: the frames of one
image series, sorted along the slice normal, each a flat `Dataset` (for enhanced multi-frame objects: top-level +
Shared + Per-frame Functional Group attributes, so SUV code sees the tags a one-file-per-slice series has), with the
geometry checked and the float32 size known. `load_series` then decodes the pixels (any transfer syntax pydicom's
pixel plugins decode), applies each frame's own rescale and, for a sheared stack (gantry tilt: slice positions not
along the slice normal), shifts each slice in-plane onto an orthogonal grid. Everything else that is not one plain
3-D volume raises `StudyError` naming the file or series, the problem and what to do.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from scipy import ndimage

from .dicom_values import cs_values
from .errors import StudyError, too_large

ROLE = {"CT": "CT", "PT": "PET"}
FUNCTIONAL_GROUPS = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")
SAME_POSITION_MM = 0.01
"""Two frames closer than this along the normal are at one position (a time or gate series, not a volume)."""
SHEAR_PIXELS = 0.05
"""In-plane slice offsets below this fraction of a pixel are rounding of the position tags, not a shear."""
GEOMETRY_KEY = "petct:geometry"
"""Image metadata key saying how a sheared stack was resampled (absent for a plain stack), for the study record."""


@dataclass(frozen=True)
class Frame:
    """One 2-D image: a single-frame file (`index` None) or frame `index` of a multi-frame file."""

    path: Path
    index: int | None
    ds: Dataset
    syntax: str = ""
    """Transfer syntax UID of the file (named in decoder errors)."""

    @property
    def name(self) -> str:
        return self.path.name if self.index is None else f"{self.path.name} frame {self.index + 1}"


@dataclass(frozen=True)
class Series:
    """A checked image series: frames sorted along `normal`, geometry of the orthogonal output grid."""

    folder: Path
    frames: list[Frame]
    rows: int
    cols: int
    directions: np.ndarray
    """3x3, columns = row direction, column direction, slice normal (ITK direction)."""
    spacing: tuple[float, float, float]
    """(along rows = x, along columns = y, between slices), mm."""
    origin: np.ndarray
    """ImagePositionPatient of the first slice (the centre of its first pixel), mm."""
    offsets: np.ndarray
    """(n, 2) in-plane position of each slice origin (mm along row, column direction) relative to slice 0."""

    @property
    def sheared(self) -> bool:
        return bool(np.abs(self.offsets).max() > SHEAR_PIXELS * min(self.spacing[:2]))

    def output_shape(self) -> tuple[int, int, int]:
        """(slices, rows, cols) of the output: a sheared stack grows to the union of its shifted slices."""
        if not self.sheared:
            return len(self.frames), self.rows, self.cols
        span = np.ptp(self.offsets, axis=0) / np.asarray(self.spacing[:2])
        return len(self.frames), self.rows + int(np.ceil(span[1] - 1e-6)), self.cols + int(np.ceil(span[0] - 1e-6))

    def nbytes(self) -> int:
        return int(np.prod(self.output_shape())) * 4


def _header(path: Path) -> Dataset | None:
    """The header of a DICOM file, None for a file that is not DICOM (README, thumbnail, .DS_Store)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        pass
    try:  # no 128-byte preamble / 'DICM' (older exports): accept only if it parses into an image header
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, defer_size=1024)
        return ds if "SOPClassUID" in ds and "Rows" in ds else None
    except Exception:  # noqa: BLE001 - forcing a parse of arbitrary bytes fails in many ways: it is not DICOM
        return None


def _headers(study_id: str, folder: Path, recursive: bool) -> tuple[list, list]:
    """(image headers, other DICOM headers) of the files in `folder` (or below it), as (path, dataset) pairs."""
    candidates = [folder] if folder.is_file() else folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(p for p in candidates if p.is_file() and not p.name.startswith("."))
    headers, others = [], []
    for path in files:
        try:
            ds = _header(path)
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - a file that says it is DICOM but does not parse, in any way
            raise StudyError(study_id, "read_error", f"cannot read DICOM header of {path.name} in {folder}: {exc}"
                             ) from exc
        if ds is not None:  # SR, KO, presentation states and DICOMDIR carry no pixel matrix (Rows)
            (headers if "Rows" in ds else others).append((path, ds))
    return headers, others


def _check_truncated(study_id: str, folder: Path, files: list, others: list) -> None:
    """A file of the chosen series (by SeriesInstanceUID, or by SOP class when cut before it) without Rows is
    a damaged slice, not a non-image object: dropping it would only show up as a missing slice."""
    series = str(files[0][1].get("SeriesInstanceUID", ""))
    classes = {str(ds.get("SOPClassUID", "")) for _, ds in files}
    for path, ds in others:
        uid = str(ds.get("SeriesInstanceUID", ""))
        meta = getattr(ds, "file_meta", None)
        sop = {str(ds.get("SOPClassUID", "")), str(getattr(meta, "MediaStorageSOPClassUID", ""))}
        if (uid and uid == series) or (not uid and sop & classes):
            raise StudyError(study_id, "read_error", f"cannot read DICOM file {path.name} in {folder}: its header "
                             "ends before the image attributes (Rows): truncated or damaged; re-export the series")


def _describe(uid: str, files: list[tuple[Path, Dataset]]) -> str:
    ds = files[0][1]
    what = getattr(getattr(ds, "SOPClassUID", None), "name", "?")
    return (f"series {uid or '(no SeriesInstanceUID)'} ({getattr(ds, 'Modality', '?')}, {what}, "
            f"'{getattr(ds, 'SeriesDescription', '')}', {len(files)} files)")


def _not_a_volume(files: list[tuple[Path, Dataset]]) -> str:
    """Why a candidate series cannot be a CT/PET volume ('' when it may be one)."""
    ds = files[0][1]
    if "ImagePositionPatient" not in ds and "PerFrameFunctionalGroupsSequence" not in ds:
        return "no ImagePositionPatient (a secondary capture or screenshot)"
    if int(getattr(ds, "SamplesPerPixel", 1)) != 1:
        return "colour image"
    if "LOCALIZER" in cs_values(ds, "ImageType"):
        return "localizer"
    if sum(int(getattr(d, "NumberOfFrames", 1) or 1) for _, d in files) < 3:
        return "fewer than 3 images"
    return ""


def _pick(study_id: str, folder: Path, headers, modality: str, series_uid: str) -> list[tuple[Path, Dataset]]:
    """The files of the one image series to read: `series_uid`'s, or the folder's one series of `modality`."""
    role = ROLE[modality]
    groups: dict[str, list] = defaultdict(list)
    for path, ds in headers:
        groups[str(getattr(ds, "SeriesInstanceUID", ""))].append((path, ds))
    if series_uid:
        if series_uid not in groups:
            raise StudyError(study_id, "missing_modality", f"no DICOM image file of series {series_uid} under {folder}")
        files = groups[series_uid]
        if getattr(files[0][1], "Modality", "") != modality:
            raise StudyError(study_id, "missing_modality", f"{role} {_describe(series_uid, files)} in {folder} is not "
                             f"a {role} series (Modality must be {modality})")
        return files
    mine = {uid: files for uid, files in groups.items() if getattr(files[0][1], "Modality", "") == modality}
    if not mine:
        found = "; ".join(_describe(uid, files) for uid, files in list(groups.items())[:10]) or "no DICOM image files"
        raise StudyError(study_id, "missing_modality", f"no {role} image series (Modality {modality}) in {folder}: "
                         f"found {found}")
    if len(mine) > 1:
        volumes = {uid: files for uid, files in mine.items() if not _not_a_volume(files)}
        if len(volumes) == 1:  # a dose-report screenshot or a scout beside the volume: not a choice to make
            return next(iter(volumes.values()))
        corrected = {uid: f for uid, f in volumes.items() if _attenuation_corrected(f[0][1])}
        if modality == "PT" and len(corrected) == 1:  # the NAC series a scanner writes beside the AC one
            return next(iter(corrected.values()))
        listed = "; ".join(f"{_describe(uid, f)}{': ' + _not_a_volume(f) if _not_a_volume(f) else ''}"
                           for uid, f in list(mine.items())[:10])
        raise StudyError(study_id, "ambiguous", f"{folder} holds {len(mine)} {role} series, cannot tell which to use "
                         f"({listed}); give the series (its own folder, or the SeriesInstanceUID via `swinssl scan`)")
    return next(iter(mine.values()))


def _attenuation_corrected(ds: Dataset) -> bool:
    """CorrectedImage (0028,0051) lists both ATTN and DECY: the series SUV can be computed from."""
    return {"ATTN", "DECY"} <= set(cs_values(ds, "CorrectedImage"))


def _merge(target: Dataset, group: Dataset) -> None:
    """Copy each functional-group macro's attributes (the one item of each sequence in `group`) into `target`."""
    for macro in group:
        if macro.VR == "SQ" and len(macro.value):
            for element in macro.value[0]:
                target[element.tag] = element  # replace, never mutate: elements are shared between frames


def _frame_times(flat: Dataset) -> None:
    """FrameAcquisitionDateTime (Frame Content macro) -> AcquisitionDateTime/Date/Time as a legacy slice has them."""
    text = str(flat.get("FrameAcquisitionDateTime", "") or "").strip()
    time = re.split(r"[+-]", text[8:])[0]  # drop a UTC offset: all times of a study share one zone
    for tag, vr, value in ((0x0008002A, "DT", text), (0x00080022, "DA", text[:8]), (0x00080032, "TM", time)):
        if len(text) >= 8 and value:
            flat[tag] = DataElement(tag, vr, value)


def _frames(study_id: str, path: Path, ds: Dataset) -> list[Frame]:
    """Flat per-frame datasets of one file (PS3.3 C.7.6.16 Multi-frame Functional Groups)."""
    count = int(getattr(ds, "NumberOfFrames", 1) or 1)
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if shared is None and per_frame is None:
        if count > 1:
            raise StudyError(study_id, "geometry", f"{path.name}: {count} frames without per-frame functional groups "
                             "(no position for each frame): a cine/time series or screenshot, not a volume")
        return [Frame(path, None, ds, syntax)]
    if per_frame is not None and len(per_frame) != count:
        raise StudyError(study_id, "read_error", f"{path.name}: PerFrameFunctionalGroupsSequence has {len(per_frame)}"
                         f" items for NumberOfFrames {count}")
    base = Dataset()
    for element in ds:
        if element.keyword not in FUNCTIONAL_GROUPS:
            base.add(element)
    if shared is not None and len(shared):
        _merge(base, shared[0])  # includes UnassignedSharedConvertedAttributesSequence (legacy-converted objects)
    frames = []
    for index in range(count):
        flat = Dataset()
        for element in base:
            flat.add(element)
        if per_frame is not None:
            _merge(flat, per_frame[index])
        _frame_times(flat)
        frames.append(Frame(path, index, flat, syntax))
    return frames


def _pixel_format(study_id: str, frame: Frame) -> None:
    samples = int(getattr(frame.ds, "SamplesPerPixel", 1))
    photometric = str(getattr(frame.ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise StudyError(study_id, "read_error", f"{frame.name}: a colour image (PhotometricInterpretation "
                         f"{photometric}, {samples} samples per pixel), not a CT or PET slice")


def _vector(study_id: str, frame: Frame, keyword: str, size: int) -> np.ndarray:
    value = frame.ds.get(keyword)
    try:
        vector = np.asarray([float(v) for v in value], float) if value is not None else np.empty(0)
    except (TypeError, ValueError):
        vector = np.empty(0)
    if vector.shape != (size,) or not np.isfinite(vector).all():
        raise StudyError(study_id, "geometry", f"{frame.name}: {keyword} is {'missing' if value is None else value}: "
                         "without the image-plane tags (PS3.3 C.7.6.2) the slice has no place in the patient "
                         "(a secondary capture or screenshot?)")
    return vector


def _time_series(ds: Dataset) -> tuple[bool, str]:
    """(is a time/gate series by its tags, the tags present) - PET Series / Image modules, PS3.3 C.8.9."""
    parts, multi = [], False
    for keyword in ("NumberOfTimeSlots", "NumberOfTimeSlices", "NumberOfTemporalPositions"):
        value = ds.get(keyword)
        if value not in (None, ""):
            parts.append(f"{keyword}={value}")
            multi = multi or int(value) > 1
    series_type = cs_values(ds, "SeriesType")
    if series_type:
        parts.append("SeriesType=" + "\\".join(series_type))
        multi = multi or series_type[0] in ("DYNAMIC", "GATED")
    if "FrameReferenceTime" in ds:
        parts.append(f"FrameReferenceTime={ds.FrameReferenceTime}")
    return multi, ", ".join(parts) or "no time tags"


def _orientation(study_id: str, frames: list[Frame]) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) direction cosines shared by all frames, orthonormalised; anything else is refused."""
    iop = _vector(study_id, frames[0], "ImageOrientationPatient", 6)
    for frame in frames[1:]:
        if not np.allclose(_vector(study_id, frame, "ImageOrientationPatient", 6), iop, atol=1e-4):
            raise StudyError(study_id, "geometry", f"{frame.name}: ImageOrientationPatient differs from "
                             f"{frames[0].name}: slices of several orientations are not one volume")
    row, col = iop.reshape(2, 3)
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise StudyError(study_id, "geometry", f"{frames[0].name}: ImageOrientationPatient {list(iop)} is not two "
                         "orthogonal unit vectors")
    row = row / np.linalg.norm(row)
    col = col - (col @ row) * row
    return row, col / np.linalg.norm(col)


def _geometry(study_id: str, folder: Path, frames: list[Frame]) -> Series:
    """Sort along the slice normal and check it is one evenly spaced volume (sheared allowed: see `Series`)."""
    first = frames[0]
    rows, cols = int(first.ds.Rows), int(first.ds.Columns)
    pixel = _vector(study_id, first, "PixelSpacing", 2)
    for frame in frames[1:]:
        if (int(frame.ds.Rows), int(frame.ds.Columns)) != (rows, cols) or not np.allclose(
                _vector(study_id, frame, "PixelSpacing", 2), pixel, rtol=1e-4):
            raise StudyError(study_id, "geometry", f"{frame.name}: matrix or PixelSpacing differs from {first.name}")
    row, col = _orientation(study_id, frames)
    normal = np.cross(row, col)
    positions = np.array([_vector(study_id, f, "ImagePositionPatient", 3) for f in frames])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    frames, positions, along = [frames[i] for i in order], positions[order], along[order]
    gaps = np.diff(along)
    repeated = int(np.count_nonzero(gaps < SAME_POSITION_MM))
    multi, tags = _time_series(first.ds)
    if repeated or multi:
        raise StudyError(study_id, "geometry", f"{folder}: {len(frames)} images at {len(frames) - repeated} "
                         f"positions ({tags}): a dynamic, gated or other multi-time series, or duplicated images; give "
                         "one static volume (one image per position)")
    if np.ptp(gaps) > 0.01 * np.median(gaps) + 1e-3:
        raise StudyError(study_id, "read_error", f"{folder}: slices are not evenly spaced (gaps {gaps.min():.3f}"
                         f"..{gaps.max():.3f} mm): missing or duplicate slices")
    relative = positions - positions[0] - np.outer(along - along[0], normal)
    offsets = np.column_stack([relative @ row, relative @ col])
    spacing = (float(pixel[1]), float(pixel[0]), float(np.median(gaps)))  # PixelSpacing = [between rows, columns]
    return Series(folder, frames, rows, cols, np.column_stack([row, col, normal]), spacing, positions[0], offsets)


def _unique(frames: list[Frame]) -> list[Frame]:
    """One frame per (SOPInstanceUID, frame): an export that holds the same instance twice is not two slices."""
    return list({(str(f.ds.get("SOPInstanceUID", f.path)), f.index): f for f in frames}.values())


def scan_series(study_id: str, folder: Path, modality: str, series_uid: str = "",
                max_bytes: int | None = None) -> Series:
    """Headers of one CT (`modality` 'CT') or PET ('PT') series, checked; no pixel data is read.

    `folder` may also be one (multi-frame) DICOM file.
    `series_uid`: take the files of that SeriesInstanceUID anywhere under `folder`; else the folder's own files must
    hold one series of `modality` (other files - non-DICOM, SR, KO, presentation states, DICOMDIR, other
    modalities - are ignored). `max_bytes`: refuse (`too_large`) when the float32 volume would be larger.
    """
    headers, others = _headers(study_id, folder, recursive=bool(series_uid))
    if not headers:
        subfolders = sum(1 for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else 0
        hint = f" (it has {subfolders} subfolders: give the series folder itself)" if subfolders else ""
        raise StudyError(study_id, "missing_modality", f"no DICOM image files in {folder}{hint}")
    files = _pick(study_id, folder, headers, modality, series_uid)
    _check_truncated(study_id, folder, files, others)
    frames = _unique([frame for path, ds in files for frame in _frames(study_id, path, ds)])
    for frame in frames:
        _pixel_format(study_id, frame)
    if "LOCALIZER" in cs_values(frames[0].ds, "ImageType") + cs_values(frames[0].ds, "FrameType") or len(frames) < 3:
        raise StudyError(study_id, "geometry", f"{folder}: {len(frames)} image(s), ImageType "
                         f"{cs_values(frames[0].ds, 'ImageType')}: a single slice or localizer/scout, not a "
                         "volume (need at least 3 slices of a cross-sectional series)")
    series = _geometry(study_id, folder, frames)
    if max_bytes is not None and series.nbytes() > max_bytes:
        raise too_large(study_id, str(folder), series.output_shape()[::-1], max_bytes)
    return series


def is_dicom_file(path: Path) -> bool:
    """A file with the DICOM preamble ('DICM' at byte 128, PS3.10 7.1), e.g. one enhanced multi-frame object; a
    cheap test before handing a file to pydicom. False for a file that cannot be opened."""
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _decode(study_id: str, series: Series, frame: Frame, count: int) -> np.ndarray:
    """All frames of one file as (frames, rows, cols) stored values; decoder failures name the transfer syntax."""
    try:
        pixels = pydicom.dcmread(frame.path, force=True).pixel_array  # force: files without a preamble
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - the pixel plugins raise many types for a stream they cannot decode
        syntax = UID(frame.syntax) if frame.syntax else None
        named = f"{syntax.name} ({syntax})" if syntax else "unknown"
        missing = isinstance(exc, NotImplementedError)  # pydicom: no decoder (plugin) for this transfer syntax
        todo = ("no decoder for it is installed: install pydicom's pixel plugins (pylibjpeg, pylibjpeg-libjpeg, "
                "-openjpeg, -rle, pyjpegls) or re-export the series uncompressed" if missing else
                "the file is damaged or its stream is one the decoders cannot read: re-export the series "
                "(uncompressed, e.g. Explicit VR Little Endian)")
        raise StudyError(study_id, "read_error", f"cannot decode the pixel data of {frame.path.name} in "
                         f"{series.folder}, transfer syntax {named}: {str(exc).strip()[:400]}; {todo}") from exc
    if pixels.size != count * series.rows * series.cols:
        raise StudyError(study_id, "read_error", f"{frame.path.name}: decoded {pixels.shape} values, header says "
                         f"{count} frame(s) of {series.rows}x{series.cols}")
    return pixels.reshape(count, series.rows, series.cols)


def _number(ds: Dataset, keyword: str, default: float) -> float:
    value = ds.get(keyword)
    return default if value is None or value == "" else float(value)


def load_series(study_id: str, series: Series, fill: float) -> sitk.Image:
    """Decode and rescale every frame into float32; `fill` = value outside the shifted slices of a sheared stack."""
    shape = series.output_shape()
    volume = np.full(shape, fill, np.float32) if series.sheared else np.empty(shape, np.float32)
    low = series.offsets.min(axis=0) if series.sheared else np.zeros(2)  # grid corner, relative to slice 0
    by_file: dict[Path, list[tuple[int, Frame]]] = defaultdict(list)
    for k, frame in enumerate(series.frames):
        by_file[frame.path].append((k, frame))
    for items in by_file.values():
        pixels = _decode(study_id, series, items[0][1], int(items[0][1].ds.get("NumberOfFrames", 1) or 1))
        for k, frame in items:
            plane = pixels[frame.index or 0].astype(np.float32) * _number(frame.ds, "RescaleSlope", 1.0) + _number(
                frame.ds, "RescaleIntercept", 0.0)
            if series.sheared:
                # output pixel (r, c) of slice k sits at input (r, c) + shift: a pure in-plane shift (PS3.3 C.7.6.2)
                shift = (low[::-1] - series.offsets[k, ::-1]) / np.asarray(series.spacing[1::-1])
                ndimage.affine_transform(plane, np.eye(2), offset=shift, output_shape=shape[1:], output=volume[k],
                                         order=1, mode="constant", cval=fill)
            else:
                volume[k] = plane
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(series.spacing)
    image.SetOrigin(tuple(float(v) for v in series.origin + series.directions[:, :2] @ low))
    image.SetDirection(tuple(series.directions.ravel()))
    if series.sheared:
        tilt = series.frames[0].ds.get("GantryDetectorTilt")
        image.SetMetaData(GEOMETRY_KEY, f"sheared stack (GantryDetectorTilt {tilt}) resampled onto an orthogonal grid:"
                          f" slices shifted in-plane by up to {np.abs(series.offsets).max():.2f} mm")
    return image
