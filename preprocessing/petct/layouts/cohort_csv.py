"""Cohort CSV: the explicit layout, and the file `swinssl scan` writes for review."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from ..errors import KINDS
from ..study import StudySource
from .base import Discovery

COLUMNS = ("study_id", "ct", "pet", "label", "cohort", "patient_id", "ct_series", "pet_series", "label_map",
           "layout", "problem")
"""Written in this order by `write_cohort_csv`; only study_id, ct and pet are required when reading."""
COHORT_FILE = "cohort.csv"


class CohortCsv:
    """`cohort.csv` (or any `.csv` given as the input): one row per study, in curation order.

    Columns: `study_id,ct,pet` (required), `label`, `cohort` (default labeled/unlabeled), `patient_id` (default:
    the study is its own patient), `ct_series`/`pet_series` (a SeriesInstanceUID to pick inside a DICOM folder),
    `label_map` (`0=background;1=lesion`: the label file's values by class name, translated through the label set;
    empty = the file already holds the label set's values), `layout` (the reader that found the row), `problem`
    (`kind: message`: the row fails with it without being read). Paths are relative to the CSV.
    """

    name = "csv"
    expects = f"a .csv file or {COHORT_FILE} (columns study_id,ct,pet[,label,cohort,patient_id,...])"

    def _file(self, root: Path) -> Path:
        return root if root.is_file() else root / COHORT_FILE

    def detect(self, root: Path) -> bool:
        return (root.is_file() and root.suffix.lower() == ".csv") or (root / COHORT_FILE).is_file()

    def discover(self, root: Path) -> Discovery:
        path = self._file(root)
        sources = sources_from_csv(path)
        return Discovery(self.name, sources, [], {s.study_id: f"row {s.order + 1}" for s in sources},
                         f"{path} (rows)")


def _path(base: Path, text: str | None) -> Path | None:
    text = (text or "").strip()
    return (base / text).resolve() if text else None


def parse_label_map(text: str, where: str = "label_map") -> dict[int, str] | None:
    """`0=background;1=lesion` -> {0: 'background', 1: 'lesion'}; '' -> None."""
    text = (text or "").strip()
    if not text:
        return None
    mapping: dict[int, str] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        value, sep, name = item.partition("=")
        if not sep or not value.strip().isdigit() or not name.strip() or int(value) in mapping:
            raise ValueError(f"{where}: {item!r} is not VALUE=NAME with a new integer value (e.g. "
                             f"'0=background;1=lesion')")
        mapping[int(value)] = name.strip()
    return mapping


def format_label_map(mapping: dict[int, str] | None) -> str:
    return ";".join(f"{v}={n}" for v, n in sorted(mapping.items())) if mapping else ""


def _problem(text: str, where: str) -> tuple[str, str] | None:
    text = (text or "").strip()
    if not text:
        return None
    kind, _, message = text.partition(":")
    if kind.strip() not in KINDS:
        raise ValueError(f"{where}: problem {text!r} must be 'KIND: message' with KIND one of {list(KINDS)}")
    return kind.strip(), message.strip()


def _source(base: Path, row: dict, order: int, csv_path: Path) -> StudySource:
    where = f"{csv_path} row {order + 1}"
    label = _path(base, row.get("label"))
    return StudySource(
        row["study_id"].strip(), _path(base, row["ct"]), _path(base, row["pet"]), label,
        (row.get("cohort") or "").strip() or ("labeled" if label else "unlabeled"), order,
        patient_id=(row.get("patient_id") or "").strip(), ct_series=(row.get("ct_series") or "").strip(),
        pet_series=(row.get("pet_series") or "").strip(),
        label_map=parse_label_map(row.get("label_map") or "", f"{where} label_map"),
        layout=(row.get("layout") or "").strip(), problem=_problem(row.get("problem") or "", where))


def sources_from_csv(csv_path: Path) -> list[StudySource]:
    """Rows of a cohort CSV as sources (paths resolved against the CSV's folder)."""
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"study_id", "ct", "pet"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{csv_path}: missing columns {sorted(missing)} (need study_id,ct,pet[,label,cohort])")
        return [_source(csv_path.parent, row, order, csv_path) for order, row in enumerate(reader)]


def _relative(path: Path | None, base: Path) -> str:
    return os.path.relpath(path, base) if path else ""


def cohort_csv_text(sources: list[StudySource], csv_path: Path) -> str:
    """The CSV `sources_from_csv(csv_path)` reads back as `sources` (paths relative to the CSV's folder)."""
    base = csv_path.resolve().parent
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS, lineterminator="\n")
    writer.writeheader()
    for s in sources:
        writer.writerow({
            "study_id": s.study_id, "ct": _relative(s.ct, base), "pet": _relative(s.pet, base),
            "label": _relative(s.label, base), "cohort": s.cohort, "patient_id": s.patient_id,
            "ct_series": s.ct_series, "pet_series": s.pet_series, "label_map": format_label_map(s.label_map),
            "layout": s.layout, "problem": f"{s.problem[0]}: {s.problem[1]}" if s.problem else "",
        })
    return out.getvalue()
