"""`prepare` end to end on a real synthetic cohort through a real Ray: registration accuracy, outputs, export."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from petct.export import export_study, manifest_records
from petct.io import same_grid
from petct.labels import LABELS_FILE, PSMA
from petct.registration import transform_matrix
from petct.shards import read_shard
from petct.synth import load_motion


def _rows(cohort_csv):
    with open(cohort_csv) as handle:
        return list(csv.DictReader(handle))


def _body_points(pet: sitk.Image, step: int = 4) -> np.ndarray:
    """Physical points (N, 3) of PET voxels inside the body, on a sparse lattice."""
    suv = sitk.GetArrayFromImage(pet)[::step, ::step, ::step]
    zyx = np.argwhere(suv > 0.3) * step
    return np.array([pet.TransformIndexToPhysicalPoint([int(x), int(y), int(z)]) for z, y, x in zyx])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def test_registration_recovers_known_motion(cohort, prepared):
    out, summary = prepared
    records = {r["study_id"]: r for r in summary.records}
    for row in _rows(cohort):
        study_dir = cohort.parent / row["study_id"]
        pet = sitk.ReadImage(str(cohort.parent / row["pet"]))
        points = _body_points(pet)
        truth = transform_matrix(load_motion(study_dir))
        found = np.asarray(records[row["study_id"]]["registration_matrix"]).reshape(4, 4)
        tre = np.linalg.norm(_apply(found, points) - _apply(truth, points), axis=1)
        unregistered = np.linalg.norm(points - _apply(truth, points), axis=1)
        assert records[row["study_id"]]["registration_status"] == "registered"
        assert tre.mean() <= 2.0 and tre.max() <= 3.0, (row["study_id"], tre.mean(), tre.max())
        assert unregistered.mean() > 3.0  # the motion was real: without registration the error is large


def test_outputs_keep_pet_geometry_and_order(cohort, prepared, ray_session):
    out, summary = prepared
    rows = _rows(cohort)
    manifest = manifest_records(out)
    assert [r["study_id"] for r in manifest] == [r["study_id"] for r in rows]  # curation order = input order
    assert [r["order"] for r in manifest] == list(range(len(rows)))
    assert summary.exit_code == 0 and all(r["status"] == "ok" for r in manifest)
    for row, record in zip(rows, manifest):
        pet = sitk.ReadImage(str(cohort.parent / row["pet"]))
        study = read_shard(out / record["shard"])
        assert study.image.shape == (2, *pet.GetSize()[::-1])
        assert study.spacing == pet.GetSpacing() and study.origin == pet.GetOrigin()
        assert study.direction == pet.GetDirection()
        assert 0.0 <= study.image.min() and study.image.max() <= 1.0
        expected_pet = np.clip(sitk.GetArrayFromImage(pet) / 30.0, 0, 1)
        np.testing.assert_allclose(study.image[1], expected_pet, atol=1e-3)  # float16 storage
        assert (study.label is None) == (row["label"] == "")
        if study.label is not None:
            label = sitk.GetArrayFromImage(sitk.ReadImage(str(cohort.parent / row["label"])))
            np.testing.assert_array_equal(study.label, label)
            counts = np.bincount(label.ravel(), minlength=PSMA.num_classes)
            assert record["label_voxels"] == {PSMA.name(v): int(n) for v, n in enumerate(counts) if n}
        assert (out / record["qc_png"]).stat().st_size > 10_000
        assert set(record["source_hashes"]) == {"ct", "pet", "label"} and record["source_hashes"]["pet"]
    for name in ("summary.csv", "summary.md", "registration.png"):
        assert (out / "qc" / name).exists()
    assert json.loads((out / "prepare_config.json").read_text())["ct_window"] == {"lo": -1000.0, "hi": 1000.0}
    assert json.loads((out / LABELS_FILE).read_text()) == PSMA.to_dict()  # the default label set, published


def test_ray_data_reads_the_shards(prepared, ray_session):
    import ray

    out, summary = prepared
    dataset = ray.data.read_parquet(str(out / "shards"))
    rows = dataset.select_columns(["study_id", "cohort", "order", "shape"]).take_all()
    assert sorted(r["study_id"] for r in rows) == sorted(r["study_id"] for r in summary.records)
    assert {r["cohort"] for r in rows} == {"labeled", "unlabeled"}


def test_ct_lands_on_pet_anatomy(cohort, prepared):
    """Registered CT body outline overlaps the PET body better than the unregistered one would."""
    out, summary = prepared
    record = next(r for r in summary.records if r["cohort"] == "labeled")
    study = read_shard(out / record["shard"])
    ct_body, pet_body = study.image[0] > 0.45, study.image[1] > 0.3 / 30
    dice = 2 * (ct_body & pet_body).sum() / (ct_body.sum() + pet_body.sum())
    assert dice > 0.85


def test_export_round_trip(cohort, prepared, tmp_path):
    out, summary = prepared
    record = next(r for r in summary.records if r["cohort"] == "labeled")
    row = next(r for r in _rows(cohort) if r["study_id"] == record["study_id"])
    paths = export_study(out, record["study_id"], tmp_path)
    assert sorted(p.name for p in paths) == ["ct.nii.gz", "label.nii.gz", "pet.nii.gz"]
    pet_in = sitk.ReadImage(str(cohort.parent / row["pet"]))
    study = read_shard(out / record["shard"])
    for channel, name in enumerate(("ct", "pet")):
        exported = sitk.ReadImage(str(tmp_path / f"{name}.nii.gz"))
        assert same_grid(exported, pet_in, tol_mm=1e-4)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(exported), study.image[channel])
    label = sitk.ReadImage(str(tmp_path / "label.nii.gz"))
    assert same_grid(label, pet_in, tol_mm=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(
        sitk.ReadImage(str(cohort.parent / row["label"]))))
    with pytest.raises(KeyError, match="nope"):
        export_study(out, "nope", tmp_path)
