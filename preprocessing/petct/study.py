"""Prepare one study: read -> register -> resample + normalise -> write shard (+ QC PNG). Returns its record.

The record is the study's manifest row (plain JSON values). It is written atomically to `OUT/records/<id>.json`
after the shard, so a record with status 'ok' always points at a complete shard.
"""

from __future__ import annotations

import json
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .config import PrepareConfig
from .dicom_read import GEOMETRY_KEY
from .errors import StudyError, failure_fields
from .io import hash_source, read_ct, read_label, read_pet
from .labels import LabelSet
from .normalise import normalise
from .registration import register_ct_to_pet
from .resample import antialias, physical_overlap, resample_ct_to_pet
from .shards import PreparedStudy, atomic_write_json, write_shard

VALID_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class StudySource:
    """One input row: absolute paths (label None for unlabelled studies) and its curation order.

    `ct`/`pet` are a file or a folder; with `*_series` set, the folder is searched recursively for the DICOM files of
    that SeriesInstanceUID (a PACS export keeps several series per folder). `label_map` maps the label file's values
    to class names ({1: "lesion"} for autoPET's SEG): values are then translated through the label set by name;
    None = the file already uses the label set's values. `problem` = (error kind, message) found while discovering
    the study (e.g. ambiguous series): the study fails with it without being read.
    """

    study_id: str
    ct: Path | None
    pet: Path | None
    label: Path | None
    cohort: str
    order: int
    patient_id: str = ""
    """Patient the study belongs to ('' = the study is its own patient); folds never split a patient."""
    ct_series: str = ""
    pet_series: str = ""
    label_map: dict[int, str] | None = None
    layout: str = ""
    """Name of the layout reader that found the study (petct.layouts), '' for a hand-written CSV."""
    problem: tuple[str, str] | None = None


@dataclass(frozen=True)
class OutputLayout:
    """Where `prepare` writes, relative to OUT (documented in README)."""

    root: Path

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def records(self) -> Path:
        return self.root / "records"

    @property
    def qc(self) -> Path:
        return self.root / "qc"

    @property
    def tmp(self) -> Path:
        return self.root / ".tmp"

    def shard(self, study_id: str) -> Path:
        return self.shards / f"{study_id}.parquet"

    def record(self, study_id: str) -> Path:
        return self.records / f"{study_id}.json"


class _Timer(dict):
    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[stage] = self.get(stage, 0.0) + time.perf_counter() - start


def source_hashes(source: StudySource) -> dict:
    """blake2b of each input. The series picked inside a folder and the label map are part of what is read: a rerun
    that picks another series of the same folder, or maps labels otherwise, must redo the study."""
    label_map = ";".join(f"{v}={n}" for v, n in sorted((source.label_map or {}).items()))
    return {"ct": hash_source(source.ct) + (f"@{source.ct_series}" if source.ct_series else ""),
            "pet": hash_source(source.pet) + (f"@{source.pet_series}" if source.pet_series else ""),
            "label": hash_source(source.label) + (f"@{label_map}" if label_map else "")}


def _base_record(source: StudySource, hashes: dict, config_digest: str) -> dict:
    return {
        "order": source.order, "study_id": source.study_id, "cohort": source.cohort,
        "patient_id": source.patient_id or source.study_id, "layout": source.layout,
        "ct_series": source.ct_series, "pet_series": source.pet_series, "ct_path": str(source.ct or ""),
        "pet_path": str(source.pet or ""), "label_path": str(source.label or ""),
        "source_hashes": hashes, "config_digest": config_digest,
    }


def is_finished(record: dict | None, hashes: dict, config_digest: str, layout: OutputLayout) -> bool:
    """A study needs no work when its last run succeeded on the same inputs and settings and its shard exists."""
    return bool(
        record and record.get("status") == "ok" and record.get("source_hashes") == hashes
        and record.get("config_digest") == config_digest and layout.shard(record["study_id"]).exists()
    )


def load_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_study(source: StudySource, layout: OutputLayout, cfg: PrepareConfig, config_digest: str) -> dict:
    """Prepare one study, never raising for bad input: failures come back as a record with status 'failed'."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(cfg.itk_threads)
    timer = _Timer()
    with timer("hash"):
        hashes = source_hashes(source)
    previous = load_record(layout.record(source.study_id))
    if is_finished(previous, hashes, config_digest, layout):
        return {**previous, "skipped": True}
    record = _base_record(source, hashes, config_digest)
    try:
        record.update(_prepare(source, layout, cfg, timer))
        record.update(status="ok", error_kind="", error="")
    except Exception as exc:  # StudyError: its kind; anything else 'internal' (see failure_fields)
        record.update(failure_fields(exc))
    record["timings_s"] = {k: round(v, 4) for k, v in timer.items()}
    record["prepared_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_json(layout.record(source.study_id), record, layout.tmp)
    return {**record, "skipped": False}


def label_voxels(label: np.ndarray, labels: LabelSet) -> dict[str, int]:
    """{class name: voxel count} of the classes present (background included), in label-value order."""
    counts = np.bincount(label.ravel(), minlength=labels.num_classes)
    return {labels.name(v): int(n) for v, n in enumerate(counts) if n}


def _read_images(source: StudySource, cfg: PrepareConfig) -> tuple[sitk.Image, sitk.Image]:
    """CT and PET of the study (the named series inside a DICOM folder), refused above the memory budget."""
    sid, max_bytes = source.study_id, int(cfg.max_volume_mib * 2**20)
    return (read_ct(sid, source.ct, source.ct_series, max_bytes),
            read_pet(sid, source.pet, source.pet_series, max_bytes))


def _geometry_note(image: sitk.Image) -> str:
    """How the reader changed the scanner's geometry ('' = read as stored; e.g. a gantry-tilted stack resampled)."""
    return image.GetMetaData(GEOMETRY_KEY) if image.HasMetaDataKey(GEOMETRY_KEY) else ""


def _prepare(source: StudySource, layout: OutputLayout, cfg: PrepareConfig, timer: _Timer) -> dict:
    sid = source.study_id
    if source.problem:  # found by discovery (petct.layouts): nothing to read
        raise StudyError(sid, *source.problem)
    with timer("read"):
        ct, pet = _read_images(source, cfg)
    if physical_overlap(ct, pet) <= 0:
        raise StudyError(sid, "no_overlap", "CT and PET fields of view do not intersect in the scanner frame")
    with timer("resample"):
        ct_smoothed = antialias(ct, pet.GetSpacing())
    with timer("register"):
        try:
            result = register_ct_to_pet(ct_smoothed, pet, cfg.registration, ct)
        except RuntimeError as exc:  # ITK: "Joint PDF summed to zero" = nothing in common at identity
            raise StudyError(sid, "no_overlap", f"CT and PET share no signal at identity ({exc})"[:300]) from exc
    with timer("read"):  # after registration: a label drawn on the CT follows the CT onto the PET grid
        label, label_grid = read_label(sid, source.label, pet, cfg.labels, source.label_map, ct,
                                       result.transform) if source.label else (None, None)
    with timer("resample"):
        ct_on_pet = resample_ct_to_pet(ct_smoothed, pet, result.transform, cfg.ct_fill_hu)
        ct_norm = normalise(sitk.GetArrayViewFromImage(ct_on_pet), cfg.ct_window)
        pet_norm = normalise(sitk.GetArrayViewFromImage(pet), cfg.pet_window)
        image = np.stack([ct_norm, pet_norm])
        label_array = None if label is None else sitk.GetArrayFromImage(label)
    study = PreparedStudy(sid, source.cohort, source.order, image, label_array,
                          pet.GetSpacing(), pet.GetOrigin(), pet.GetDirection())
    with timer("write"):
        shard_bytes = write_shard(layout.shard(sid), study, layout.tmp)
    record = {
        "shard": str(layout.shard(sid).relative_to(layout.root)), "shard_bytes": shard_bytes,
        "shape": list(image.shape[1:]), "spacing": list(pet.GetSpacing()), "origin": list(pet.GetOrigin()),
        "direction": list(pet.GetDirection()), "ct_window": [cfg.ct_window.lo, cfg.ct_window.hi],
        "pet_window": [cfg.pet_window.lo, cfg.pet_window.hi], "labeled": label is not None,
        "label_voxels": None if label_array is None else label_voxels(label_array, cfg.labels),
        "label_source_grid": label_grid, "ct_geometry": _geometry_note(ct), "pet_geometry": _geometry_note(pet),
        **result.to_record(),
    }
    if cfg.qc_png:
        with timer("qc"):
            from .qc import study_png  # matplotlib only when QC is on

            before = resample_ct_to_pet(ct_smoothed, pet, sitk.Euler3DTransform(), cfg.ct_fill_hu)
            ct_before = normalise(sitk.GetArrayViewFromImage(before), cfg.ct_window)
            png = layout.qc / f"{sid}.png"
            study_png(png, study, ct_before, record, layout.tmp)
            record["qc_png"] = str(png.relative_to(layout.root))
    return record
