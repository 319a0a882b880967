"""Header-only index of a DICOM tree: files grouped by study and series, each series classified as CT or PET.

`scan_tree(root)` walks every folder (any depth, any names; several series per folder; DICOMDIR or not) and reads
only the header tags it needs (`pydicom.dcmread(stop_before_pixels=True, specific_tags=...)`), so a whole PACS
export is indexed in seconds. Files that are not DICOM (no 'DICM' preamble, PS3.10 section 7.1), DICOMDIRs and
unreadable headers are listed in `skipped` with the reason. `role(series)` says whether a series can serve as the
study's CT or PET, or why not (the tags are those of PS3.3 C.7.6.1 General Image, C.8.9.1 PET Series).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from .dicom_read import is_dicom_file
from .dicom_values import cs_values

MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
"""SOP Class UID of a DICOMDIR (Media Storage Directory Storage)."""
TAGS = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "StudyDate", "Modality", "SeriesNumber",
        "SeriesDescription", "ImageType", "SeriesType", "CorrectedImage", "FrameOfReferenceUID",
        "ImagePositionPatient", "ImageOrientationPatient", "NumberOfFrames", "SOPClassUID",
        "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"]
MIN_IMAGES = 3
"""Fewer images than this is a localizer, a single slice or a fragment, not a volume."""


@dataclass
class SeriesInfo:
    """One series as its headers describe it; `positions` = ImagePositionPatient of every image (frame)."""

    uid: str
    study_uid: str
    patient_id: str
    study_date: str
    modality: str
    number: str
    description: str
    image_type: tuple[str, ...]
    series_type: tuple[str, ...]
    corrected: tuple[str, ...]
    frame_uid: str
    files: list[Path] = field(default_factory=list)
    positions: list[tuple[float, float, float]] = field(default_factory=list)
    normal: tuple[float, float, float] | None = None
    images: int = 0
    """Images (frames of multi-frame files included)."""

    def describe(self) -> str:
        """`series 3 'PET AC WB' (1.2.3...)`: how messages name a series."""
        return f"{self.modality} series {self.number or '?'} {self.description or '(no description)'!r} ({self.uid})"

    @property
    def folder(self) -> Path:
        """The deepest folder holding all the series' files."""
        return Path(os.path.commonpath([str(f.parent) for f in self.files]))

    def axial(self, normal: np.ndarray | None = None) -> np.ndarray:
        """Sorted slice positions (mm) along `normal` (default: the series' own slice normal)."""
        n = np.asarray(normal if normal is not None else (self.normal or (0.0, 0.0, 1.0)), float)
        return np.sort(np.asarray(self.positions, float).reshape(-1, 3) @ n) if self.positions else np.zeros(0)

    @property
    def slice_spacing(self) -> float:
        """Median gap between distinct slice positions (inf when unknown)."""
        gaps = np.diff(np.unique(np.round(self.axial(), 2)))
        return float(np.median(gaps)) if gaps.size else float("inf")

    @property
    def repeated_positions(self) -> int:
        """Images whose position another image of the series already has (frames or gates of one slice)."""
        return len(self.positions) - len({tuple(np.round(p, 2)) for p in self.positions})


@dataclass
class DicomIndex:
    series: dict[str, SeriesInfo]
    skipped: list[tuple[str, str]]
    files_seen: int


def _frame_geometry(ds: pydicom.Dataset) -> tuple[list, tuple | None]:
    """Positions of every frame and the slice normal: per file (classic) or per frame (Enhanced CT/PET)."""
    orientation = ds.get("ImageOrientationPatient")
    positions = [ds.ImagePositionPatient] if "ImagePositionPatient" in ds else []
    if "PerFrameFunctionalGroupsSequence" in ds:
        positions = [g.PlanePositionSequence[0].ImagePositionPatient for g in ds.PerFrameFunctionalGroupsSequence
                     if "PlanePositionSequence" in g]
        shared = ds.get("SharedFunctionalGroupsSequence") or [pydicom.Dataset()]
        groups = [shared[0], *ds.PerFrameFunctionalGroupsSequence[:1]]
        orientation = next((g.PlaneOrientationSequence[0].ImageOrientationPatient for g in groups
                            if "PlaneOrientationSequence" in g), orientation)
    normal = None
    if orientation is not None and len(orientation) == 6:
        row, col = np.asarray(orientation, float).reshape(2, 3)
        normal = tuple(float(v) for v in np.cross(row, col))
    return [tuple(float(v) for v in p) for p in positions], normal


def _new_series(ds: pydicom.Dataset) -> SeriesInfo:
    text = lambda key: str(ds.get(key, "") or "").strip()  # noqa: E731
    return SeriesInfo(text("SeriesInstanceUID"), text("StudyInstanceUID"), text("PatientID"), text("StudyDate"),
                      text("Modality").upper(), text("SeriesNumber"), text("SeriesDescription"),
                      tuple(cs_values(ds, "ImageType")), tuple(cs_values(ds, "SeriesType")),
                      tuple(cs_values(ds, "CorrectedImage")), text("FrameOfReferenceUID"))


def _read_header(path: Path) -> tuple[pydicom.Dataset | None, str]:
    """(dataset, '') or (None, why the file is skipped)."""
    if not is_dicom_file(path):
        return None, "not a DICOM file (no 'DICM' preamble)"
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=TAGS)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a damaged header; skip, never crash
        return None, f"unreadable DICOM header ({type(exc).__name__}: {str(exc)[:120]})"
    sop_class = str(getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
    if sop_class == MEDIA_DIRECTORY:
        return None, "DICOMDIR (a directory of the files; the tree itself is scanned instead)"
    if not ds.get("SeriesInstanceUID") or not ds.get("StudyInstanceUID"):
        return None, "DICOM file without StudyInstanceUID/SeriesInstanceUID (not an image, or a truncated header)"
    return ds, ""


def walk_files(root: Path):
    """Every non-hidden file under `root`, in sorted order (deterministic ids and pairing)."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder) / name


def contains_dicom(root: Path) -> bool:
    """True as soon as one file under `root` is a DICOM file (stops at the first)."""
    return root.is_dir() and any(is_dicom_file(p) for p in walk_files(root))


def scan_tree(root: Path) -> DicomIndex:
    """Headers of every file under `root`, grouped by SeriesInstanceUID (sorted by study, then series number)."""
    series: dict[str, SeriesInfo] = {}
    skipped, seen = [], 0
    for path in walk_files(root):
        seen += 1
        ds, reason = _read_header(path)
        if ds is None:
            skipped.append((str(path), reason))
            continue
        try:
            positions, normal = _frame_geometry(ds)
        except (ValueError, TypeError, AttributeError, IndexError) as exc:
            skipped.append((str(path), f"unusable ImagePositionPatient/ImageOrientationPatient ({exc})"[:200]))
            continue
        info = series.setdefault(str(ds.SeriesInstanceUID), _new_series(ds))
        info.files.append(path)
        info.images += max(int(ds.get("NumberOfFrames", 1) or 1), 1)
        info.positions += positions
        info.normal = info.normal or normal
    ordered = sorted(series.values(), key=lambda s: (s.study_uid, _number(s.number), s.uid))
    return DicomIndex({s.uid: s for s in ordered}, skipped, seen)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("inf")


def role(s: SeriesInfo) -> tuple[str, str]:
    """('ct' | 'pet', '') for a usable series, ('', reason) for one that is skipped."""
    if s.modality not in ("CT", "PT"):
        return "", f"modality {s.modality or '(none)'} is neither CT nor PT"
    images = s.images
    if "LOCALIZER" in s.image_type:
        return "", f"localizer/scout (ImageType {'/'.join(s.image_type)})"
    if images < MIN_IMAGES:
        return "", f"only {images} image(s): a single slice or localizer, not a volume (need >= {MIN_IMAGES})"
    if s.modality == "CT":
        return ("ct", "") if not s.repeated_positions else ("", f"{s.repeated_positions} repeated slice positions")
    kind = s.series_type[0] if s.series_type else ""
    if kind in ("DYNAMIC", "GATED"):
        return "", f"{kind.lower()} PET (SeriesType {'/'.join(s.series_type)}): only static PET is prepared"
    if s.repeated_positions:
        return "", f"PET with {s.repeated_positions} repeated slice positions (frames or gates): not static"
    lacking = [c for c in ("ATTN", "DECY") if c not in s.corrected]
    if lacking:
        return "", (f"PET not {' and '.join({'ATTN': 'attenuation', 'DECY': 'decay'}[c] for c in lacking)} "
                    f"corrected (CorrectedImage {'/'.join(s.corrected) or 'absent'}; NAC)")
    return "pet", ""
