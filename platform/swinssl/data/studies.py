"""Choose prepared studies from a `swinssl prepare` output folder (its manifest.jsonl and shards/).

The manifest keeps the input order as curation order, so `subset="450"` means the first 450 studies of the cohort
that were prepared successfully: the earlier snapshot of a growing collection, the same code path as 760.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """The prepared data cannot serve this config (raised on the driver, before any worker starts)."""


@dataclass(frozen=True)
class StudyRef:
    """A prepared study as the data pipelines need it."""

    study_id: str
    cohort: str
    order: int
    shard: str
    """Absolute path of the one-study Parquet shard."""
    shape: tuple[int, int, int]
    labeled: bool
    label_voxels: dict[str, int] | None = field(default=None, compare=False, hash=False)
    """Voxels per class name of the study's label (the manifest's `label_voxels`), None when the manifest predates
    it (then readers look at the shard)."""
    patient_id: str = field(default="", compare=False, hash=False)
    """Patient of the study (the manifest's `patient_id`; the study id when unknown): folds never split a patient."""


def read_manifest(root: str | Path) -> list[dict]:
    root = Path(root).resolve()
    path = root / "manifest.jsonl"
    if not root.exists():
        raise DataError(f"data.root {root} does not exist")
    if not path.exists():
        raise DataError(f"{path} not found: data.root must be the output folder of `swinssl prepare`")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["order"])


def parse_subset(subset: str | int) -> int | None:
    """'all' -> None; '450' or 450 -> 450."""
    text = str(subset).strip().lower()
    if text == "all":
        return None
    if not text.isdigit() or int(text) <= 0:
        raise DataError(f"data.subset must be 'all' or a positive integer, got {subset!r}")
    return int(text)


def select_studies(root: str | Path, cohort: str = "unlabeled", subset: str | int = "all") -> list[StudyRef]:
    """Successfully prepared studies of `cohort` ('all' for every cohort), first `subset` in curation order."""
    root = Path(root).resolve()
    rows = [r for r in read_manifest(root) if r.get("status") == "ok" and (cohort == "all" or r["cohort"] == cohort)]
    limit = parse_subset(subset)
    if not rows:
        raise DataError(f"{root}: no prepared studies in cohort {cohort!r}")
    if limit is not None:
        if limit > len(rows):
            raise DataError(f"data.subset={limit} but {root} has only {len(rows)} prepared {cohort!r} studies")
        rows = rows[:limit]
    refs = [StudyRef(r["study_id"], r["cohort"], r["order"], str(root / r["shard"]), tuple(r["shape"]),
                     bool(r.get("labeled")), r.get("label_voxels"), str(r.get("patient_id") or r["study_id"]))
            for r in rows]
    missing = [ref.shard for ref in refs if not Path(ref.shard).exists()]
    if missing:
        raise DataError(f"{len(missing)} shards listed in the manifest are missing, e.g. {missing[0]}")
    return refs


def check_roi_fits(studies: list[StudyRef], roi: list[int] | tuple[int, ...]) -> None:
    """Every crop must fit inside every volume; say which study is too small."""
    for ref in studies:
        if any(r > s for r, s in zip(roi, ref.shape)):
            raise DataError(f"crop {tuple(roi)} (Z, Y, X) is larger than study {ref.study_id} of shape {ref.shape}")
