"""`swinssl predict`'s outputs and failure handling, without Ray: a model package of random weights (what is checked
is geometry, references and bookkeeping, not segmentation quality). Oracles: SimpleITK's and pydicom's reading of the
source DICOM, highdicom's reading of the SEG, a NumPy re-implementation of the CT-grid mapping; the ensemble against
a loop written here. Equality with fine-tuning's own predictions and the MLflow model: tests/test_predict.py."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from image_checks import assert_same_geometry
from petct.config import PrepareConfig
from petct.export import manifest_records
from petct.labels import PSMA
from petct.shards import read_shard
from swinssl.cli import main
from swinssl.config import FinetuneConfig, load_config
from swinssl.deploy.ensemble import Ensemble, flip_sets
from swinssl.deploy.package import TrainedModel, load_trained, write_package
from swinssl.deploy.predict import PredictOptions, predict_cohort
from swinssl.tasks.segment import SegmentationTask

TINY = Path(__file__).resolve().parents[1] / "experiments" / "finetune_tiny.yaml"


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """A 2-fold model package of random tiny SwinUNETRs (12 PSMA classes), prepared-data settings = the defaults."""
    base = tmp_path_factory.mktemp("package")
    cfg = load_config(TINY, ["model.out_channels=12"], FinetuneConfig)
    torch.manual_seed(0)
    weights = {}
    for k in (0, 1):
        weights[k] = base / f"weights_{k}.pt"
        torch.save(SegmentationTask(cfg, None).build_model().state_dict(), weights[k])
    model = TrainedModel(cfg, PSMA, PrepareConfig(qc_png=False).to_dict(), weights, {"note": "random weights"})
    return write_package(model, base / "package")


def test_package_round_trip(package, tmp_path):
    model = load_trained(package)
    assert model.folds == [0, 1] and model.labels == PSMA and model.source["note"] == "random weights"
    assert model.prepare["pet_window"] == {"lo": 0.0, "hi": 30.0}
    for k in model.folds:
        saved = torch.load(package / f"fold_{k}.pt", weights_only=True)
        assert all(torch.equal(saved[key], value) for key, value in model.fold_model(k).state_dict().items())
    copy = load_trained(write_package(model, tmp_path / "again", folds=[1]))
    assert copy.folds == [1] and copy.cfg == model.cfg
    (tmp_path / "again" / "fold_1.pt").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_trained(tmp_path / "again")


class _Net(nn.Module):
    """Not flip-equivariant (a position-dependent bias), so a TTA that forgot to flip back would be caught."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv3d(2, 3, 3, padding=1)
        self.bias = nn.Parameter(torch.randn(1, 3, 4, 6, 8, generator=g))

    def forward(self, x):
        return self.conv(x) + self.bias


def test_ensemble_is_one_models_logits_or_the_mean_of_flipped_back_probabilities():
    torch.manual_seed(0)
    models, x = [_Net(1), _Net(2)], torch.randn(2, 2, 4, 6, 8)
    with torch.no_grad():
        assert torch.equal(Ensemble(models[:1])(x), models[0](x))
        assert len(set(flip_sets(True))) == 8 and flip_sets(False) == [()]
        expected = torch.zeros(2, 3, 4, 6, 8)
        for model in models:
            for axes in [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]:
                flipped = torch.flip(x, axes) if axes else x
                probs = torch.softmax(model(flipped), 1)
                expected += torch.flip(probs, axes) if axes else probs
        torch.testing.assert_close(Ensemble(models, tta=True)(x), expected / 16)
        no_tta = (torch.softmax(models[0](x), 1) + torch.softmax(models[1](x), 1)) / 2
        torch.testing.assert_close(Ensemble(models)(x), no_tta)


def _pet_reference(folder: Path) -> tuple[sitk.Image, list[pydicom.Dataset]]:
    """The PET series read by SimpleITK's own series reader (not our reader) and its datasets via pydicom."""
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(folder))
    reader.SetFileNames(files)
    return reader.Execute(), [pydicom.dcmread(f) for f in files]


def _check_seg(seg_path: Path, labels_path: Path, pet_folder: Path, class_names: list[str]) -> None:
    pet, datasets = _pet_reference(pet_folder)
    seg = hd.seg.segread(str(seg_path))
    raw = pydicom.dcmread(str(seg_path))
    assert raw.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert raw.StudyInstanceUID == datasets[0].StudyInstanceUID
    assert raw.ReferencedSeriesSequence[0].SeriesInstanceUID == datasets[0].SeriesInstanceUID
    assert [s.SegmentLabel for s in raw.SegmentSequence] == class_names
    labels = sitk.ReadImage(str(labels_path))
    assert_same_geometry(labels, pet)
    array = sitk.GetArrayFromImage(labels)
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    assert referenced <= {ds.SOPInstanceUID for ds in datasets}
    for z, ds in enumerate(datasets):  # GDCM's file order is slice order along the normal: z-th file = slice z
        np.testing.assert_allclose(pet.TransformIndexToPhysicalPoint((0, 0, z)), ds.ImagePositionPatient, atol=1e-3)
        if ds.SOPInstanceUID not in referenced:
            assert not array[z].any(), f"slice {z} has labels but no SEG frame"
            continue
        frame = seg.get_pixels_by_source_instance([ds.SOPInstanceUID], combine_segments=True)[0]
        assert np.array_equal(frame, array[z]), f"SEG frame of slice {z} differs from the NIfTI labels"


def _check_ct_grid(labels_ct: Path, labels_pet: Path, record: dict) -> None:
    """Every 97th CT voxel: its label is the PET-grid label at the nearest PET voxel of the registered point."""
    ct_img, pet_img = sitk.ReadImage(str(labels_ct)), sitk.ReadImage(str(labels_pet))
    ct_arr, pet_arr = sitk.GetArrayFromImage(ct_img), sitk.GetArrayFromImage(pet_img)
    matrix = np.asarray(record["registration_matrix"]).reshape(4, 4)  # PET point -> CT point
    inverse = np.linalg.inv(matrix)
    index = np.stack(np.unravel_index(np.arange(0, ct_arr.size, 97), ct_arr.shape), 1)[:, ::-1]  # (x, y, z)
    ct_dir, pet_dir = np.reshape(ct_img.GetDirection(), (3, 3)), np.reshape(pet_img.GetDirection(), (3, 3))
    points = np.asarray(ct_img.GetOrigin()) + (index * ct_img.GetSpacing()) @ ct_dir.T
    pet_points = points @ inverse[:3, :3].T + inverse[:3, 3]
    cont = np.linalg.solve(pet_dir, (pet_points - pet_img.GetOrigin()).T).T / pet_img.GetSpacing()
    near = np.rint(cont).astype(int)
    inside = np.all((near >= 0) & (near < pet_img.GetSize()), axis=1)
    expected = np.zeros(len(index), np.uint8)
    expected[inside] = pet_arr[near[inside, 2], near[inside, 1], near[inside, 0]]
    got = ct_arr[index[:, 2], index[:, 1], index[:, 0]]
    edge = np.any(np.abs(cont - np.rint(cont)) > 0.499, axis=1)  # exactly between two voxels: either is right
    assert np.array_equal(got[~edge], expected[~edge]) and inside.sum() > 0.3 * len(index)


def test_predict_a_dicom_study_cli_with_seg_and_ct_grid(package, tmp_path):
    from petct.synth import synth_cohort

    run = package
    csv = synth_cohort(tmp_path / "dicom", unlabeled=1, labeled=0, seed=21, scale="small", fmt="dicom")
    out = tmp_path / "out"
    assert main(["predict", str(run), "--input", str(csv.parent / "unl_0000"), "--out", str(out), "--ct-grid",
                 "--folds", "0", "--quiet"]) == 0
    record = manifest_records(out / "prepared")[0]
    sid = record["study_id"]
    row = json.loads((out / "records" / f"{sid}.json").read_text())
    assert row["status"] == "ok" and set(row["files"]) == {"labels", "labels_ct", "dicom_seg", "overlay"}
    study = read_shard(out / "prepared" / record["shard"])
    assert sum(row["voxels"].values()) == study.image[0].size
    model = load_trained(run)
    _check_seg(out / "dicom_seg" / f"{sid}.dcm", out / "labels" / f"{sid}.nii.gz", Path(record["pet_path"]),
               [model.labels.name(c) for c in model.labels.foreground])
    ct_reader = sitk.ImageSeriesReader()
    ct_reader.SetFileNames(ct_reader.GetGDCMSeriesFileNames(record["ct_path"]))
    assert_same_geometry(sitk.ReadImage(str(out / "labels_ct" / f"{sid}.nii.gz")), ct_reader.Execute())
    _check_ct_grid(out / "labels_ct" / f"{sid}.nii.gz", out / "labels" / f"{sid}.nii.gz", record)
    run_record = json.loads((out / "predict_run.json").read_text())
    assert run_record["folds"] == [0] and run_record["model_spec"] == str(run)
    assert run_record["model"]["note"] == "random weights"
    assert run_record["options"]["tta"] is False and run_record["versions"]["torch"]
    # a rerun predicts nothing again
    assert main(["predict", str(run), "--input", str(csv.parent / "unl_0000"), "--out", str(out), "--ct-grid",
                 "--folds", "0", "--quiet"]) == 0
    assert json.loads((out / "predictions.jsonl").read_text().splitlines()[0]).get("skipped") is True


def test_one_bad_study_is_reported_and_the_others_finish(package, cohort, tmp_path):
    run = package
    with cohort.open() as f:
        rows = list(csv.DictReader(f))[:2]
    for row in rows:  # absolute paths: the new CSV lives elsewhere
        row.update({k: str(cohort.parent / row[k]) if row[k] else "" for k in ("ct", "pet", "label")})
    bad = tmp_path / "broken_pet.nii.gz"
    bad.write_bytes(b"not a nifti file")
    rows.append({**rows[0], "study_id": "broken", "pet": str(bad), "label": "", "cohort": "unlabeled"})
    table = tmp_path / "cohort.csv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    assert main(["predict", str(run), "--input", str(table), "--out", str(out), "--quiet", "--no-overlays",
                 "--folds", "1"]) == 3
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok", "ok", "failed"]
    assert records[2]["study_id"] == "broken" and "prepare" in records[2]["error"]
    assert records[0]["notes"]["dicom_seg"].startswith("[not_dicom]")  # NIfTI input: labels, no SEG
    assert (out / "labels" / f"{rows[1]['study_id']}.nii.gz").exists()


def test_a_study_prepared_with_other_windows_is_refused(package, tiny_prepared, tmp_path):
    run = package
    copy = tmp_path / "prepared"
    shutil.copytree(tiny_prepared, copy)
    lines = (copy / "manifest.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["pet_window"] = [0.0, 15.0]
    (copy / "manifest.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    summary = predict_cohort(str(run), copy, tmp_path / "out", PredictOptions(folds=[0], dicom_seg=False,
                                                                             overlays=False, progress=False))
    assert summary.exit_code == 3
    refused = summary.records[0]
    assert refused["error_kind"] == "prepare_mismatch" and "pet_window" in refused["error"]
    assert all(r["status"] == "ok" for r in summary.records[1:] if json.loads(
        next(ln for ln in lines if json.loads(ln)["study_id"] == r["study_id"]))["status"] == "ok")


def test_bad_model_and_input_exit_2(package, tmp_path, capsys):
    run = package
    assert main(["predict", str(tmp_path), "--input", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "neither a `swinssl finetune` output folder" in capsys.readouterr().err
    assert main(["predict", str(run), "--input", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert main(["predict", str(run), "--input", str(tmp_path), "--out", str(tmp_path / "o"), "--folds", "7"]) == 2
    assert "the model has folds [0, 1]" in capsys.readouterr().err


