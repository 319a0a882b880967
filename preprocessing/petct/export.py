"""`export`: a prepared study back to NIfTI on the PET grid (3D Slicer / ITK-SNAP, scripted checks)."""

from __future__ import annotations

import json
from pathlib import Path

import SimpleITK as sitk

from .shards import read_shard


def manifest_records(prepared: Path | str) -> list[dict]:
    """Rows of OUT/manifest.jsonl in curation order."""
    path = Path(prepared) / "manifest.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {prepared} the output folder of `swinssl prepare`?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def find_record(prepared: Path | str, study_id: str) -> dict:
    records = {r["study_id"]: r for r in manifest_records(prepared) if r.get("status") == "ok"}
    if study_id not in records:
        raise KeyError(f"study {study_id!r} is not a prepared study in {prepared}")
    return records[study_id]


def export_study(prepared: Path | str, study_id: str, to: Path | str) -> list[Path]:
    """Write `ct.nii.gz`, `pet.nii.gz` (normalised [0, 1], float32) and `label.nii.gz` when labelled."""
    record = find_record(prepared, study_id)
    study = read_shard(Path(prepared) / record["shard"])
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    arrays = {"ct": study.image[0], "pet": study.image[1]}
    if study.label is not None:
        arrays["label"] = study.label
    written = []
    for name, array in arrays.items():
        path = to / f"{name}.nii.gz"
        sitk.WriteImage(study.to_sitk(array), str(path), useCompression=True)
        written.append(path)
    return written
