"""Layout discovery (petct.layouts): study folders in any letter case, autoPET, nnU-Net v2 raw, cohort CSV round
trip, layout ambiguity, and labels: label maps translated by class name and labels drawn on the CT grid.

Each layout is built in tmp_path with small writers of this file (SimpleITK NIfTI volumes, the folder names and
JSON of the public layouts), not by the project's synthetic cohort. Ray-free: `prepare_cohort(..., workers=0)`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from petct.config import PrepareConfig
from petct.errors import StudyError
from petct.io import read_label
from petct.labels import PSMA, LabelSet
from petct.layouts import cohort_csv_text, discover, layouts, sources_from_csv
from petct.pipeline import load_sources, prepare_cohort
from petct.shards import read_shard

PET_SPACING, CT_SPACING = (4.0, 4.0, 4.0), (2.0, 2.0, 2.0)


def _volume(path: Path, array: np.ndarray, spacing=PET_SPACING, origin=(0.0, 0.0, 0.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def _pet(shape=(6, 8, 8)) -> np.ndarray:
    suv = np.full(shape, 0.5, np.float32)
    suv[2:4, 3:5, 3:5] = 8.0
    return suv


def _ct(shape=(6, 8, 8)) -> np.ndarray:
    hu = np.full(shape, 40.0, np.float32)
    hu[:, :2] = -1000.0
    return hu


def _seg(shape=(6, 8, 8)) -> np.ndarray:
    seg = np.zeros(shape, np.uint8)
    seg[2:4, 3:5, 3:5] = 1
    return seg


def _cfg(labels: LabelSet = PSMA) -> PrepareConfig:
    cfg = PrepareConfig(qc_png=False, labels=labels)
    return replace(cfg, registration=replace(cfg.registration, enabled=False))


def _acquisition(folder: Path, files=("CT", "CTres", "PET", "SUV", "SEG")) -> None:
    writers = {"CT": _ct, "CTres": _ct, "PET": lambda: _pet() * 5000, "SUV": _pet, "SEG": _seg}
    for name in files:
        _volume(folder / f"{name}.nii.gz", writers[name]())


@pytest.fixture
def autopet(tmp_path) -> Path:
    """2 patients, one with 2 acquisitions (one without CTres, one without SEG), an acquisition lacking SUV."""
    root = tmp_path / "autopet"
    _acquisition(root / "PETCT_0af7ffe12a" / "08-12-2005-NA-PET-CT Ganzkoerper  primaer mit KM-10445")
    _acquisition(root / "PETCT_0af7ffe12a" / "03-20-2006-NA-PET-CT-55371", ("CT", "SUV", "SEG"))
    _acquisition(root / "PETCT_1285b86bea" / "02-05-2004-NA-PET-CT-41221", ("CT", "CTres", "SUV"))
    _acquisition(root / "PETCT_1285b86bea" / "06-06-2007-NA-PET-CT-1", ("CTres", "PET"))
    (root / "PETCT_1285b86bea" / "notes").mkdir()
    return root


def test_autopet_contract(autopet):
    found = discover(autopet)
    assert found.layout == "autopet"
    by_id = {s.study_id: s for s in found.sources}
    first = by_id["PETCT_0af7ffe12a_08-12-2005-NA-PET-CT_Ganzkoerper_primaer_mit_KM-10445"]
    assert (first.ct.name, first.pet.name, first.label.name) == ("CTres.nii.gz", "SUV.nii.gz", "SEG.nii.gz")
    assert first.label_map == {0: "background", 1: "lesion"} and first.patient_id == "PETCT_0af7ffe12a"
    second = by_id["PETCT_0af7ffe12a_03-20-2006-NA-PET-CT-55371"]
    assert second.ct.name == "CT.nii.gz" and second.patient_id == first.patient_id
    unlabelled = by_id["PETCT_1285b86bea_02-05-2004-NA-PET-CT-41221"]
    assert unlabelled.label is None and unlabelled.cohort == "unlabeled" and unlabelled.problem is None
    no_suv = by_id["PETCT_1285b86bea_06-06-2007-NA-PET-CT-1"]
    assert no_suv.problem[0] == "missing_modality" and "SUV.nii.gz" in no_suv.problem[1]
    assert len({s.patient_id for s in found.sources}) == 2
    skipped = dict(found.skipped)
    assert "activity, not SUV" in skipped[str(autopet / "PETCT_0af7ffe12a" / first.pet.parent.name / "PET.nii.gz")]
    assert str(autopet / "PETCT_1285b86bea" / "notes") in skipped


def test_prepare_autopet_needs_no_csv_and_maps_lesion(autopet, tmp_path):
    summary = prepare_cohort(autopet, tmp_path / "out", _cfg(), workers=0, progress=False)
    rows = {r["study_id"]: r for r in summary.records}
    assert [r["status"] for r in summary.records] == ["ok", "ok", "ok", "failed"]
    assert summary.records[3]["error_kind"] == "missing_modality"
    assert {r["patient_id"] for r in summary.records} == {"PETCT_0af7ffe12a", "PETCT_1285b86bea"}
    assert {r["layout"] for r in summary.records} == {"autopet"}
    labelled = rows["PETCT_0af7ffe12a_03-20-2006-NA-PET-CT-55371"]
    assert labelled["label_source_grid"] == "pet" and labelled["label_voxels"] == {"background": 376, "lesion": 8}
    label = read_shard(tmp_path / "out" / labelled["shard"]).label
    np.testing.assert_array_equal(label, np.where(_seg() == 1, PSMA.lesion, 0))  # SEG 1 -> the set's lesion (11)
    manifest = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [m["patient_id"] for m in manifest] == [r["patient_id"] for r in summary.records]


def test_autopet_lesion_goes_to_the_sets_lesion_class_whatever_its_name(autopet, tmp_path):
    tumour = LabelSet(("background", "liver", "tumour"), lesion=2)
    summary = prepare_cohort(autopet, tmp_path / "out", _cfg(tumour), workers=0, progress=False)
    first = summary.records[0]
    assert first["status"] == "ok" and first["label_voxels"] == {"background": 376, "tumour": 8}


def _nnunet(root: Path, channels: dict, labels: dict) -> Path:
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"channel_names": channels, "labels": labels, "numTraining": 2,
                                                   "file_ending": ".nii.gz"}))
    ct_channel = next(int(k) for k, v in channels.items() if v == "CT")
    for split, case in (("imagesTr", "psma_001"), ("imagesTr", "psma_002"), ("imagesTs", "psma_101")):
        for k in channels:
            array = _ct() if int(k) == ct_channel else _pet()
            _volume(root / split / f"{case}_{int(k):04d}.nii.gz", array)
        if split == "imagesTr":
            seg = _seg()
            seg[0, 0, :3] = 2  # liver
            _volume(root / "labelsTr" / f"{case}.nii.gz", seg)
    (root / "imagesTr" / "README.md").write_text("notes")
    return root


def test_nnunet_raw_contract_and_prepare(tmp_path):
    root = _nnunet(tmp_path / "Dataset042_PSMA", {"0": "pet", "1": "CT"}, {"background": 0, "lesion": 1, "liver": 2})
    found = discover(root)
    assert found.layout == "nnunet-raw" and [s.study_id for s in found.sources] == ["psma_001", "psma_002",
                                                                                     "psma_101"]
    first = found.sources[0]
    assert (first.ct.name, first.pet.name, first.label.name) == ("psma_001_0001.nii.gz", "psma_001_0000.nii.gz",
                                                                 "psma_001.nii.gz")
    assert first.label_map == {0: "background", 1: "lesion", 2: "liver"} and found.sources[2].label is None
    assert any(path.endswith("README.md") for path, _ in found.skipped)
    summary = prepare_cohort(root, tmp_path / "out", _cfg(), workers=0, progress=False)
    assert [r["status"] for r in summary.records] == ["ok"] * 3
    label = read_shard(tmp_path / "out" / summary.records[0]["shard"]).label
    assert set(np.unique(label)) == {0, PSMA.value("liver"), PSMA.lesion}  # by name: liver 2 -> 8, lesion 1 -> 11
    assert int((label == PSMA.value("liver")).sum()) == 3


def test_nnunet_class_the_set_lacks_fails_its_study(tmp_path):
    root = _nnunet(tmp_path / "Dataset043", {"0": "CT", "1": "SUV"}, {"background": 0, "lesion": 1, "spleen_x": 2})
    summary = prepare_cohort(root, tmp_path / "out", _cfg(), workers=0, progress=False)
    failed = summary.records[0]
    assert failed["error_kind"] == "label_values" and "spleen_x" in failed["error"]
    assert summary.records[2]["status"] == "ok"  # the unlabelled test case is unaffected


@pytest.mark.parametrize(("channels", "labels", "message"), [
    ({"0": "CT", "1": "PET"}, {"background": 0, "whole": [1, 2]}, "region-based labels"),
    ({"0": "CT", "1": "MR"}, {"background": 0, "lesion": 1}, "exactly one PET channel"),
    ({"CT": 0, "PET": 1}, {"background": 0, "lesion": 1}, "must map channel numbers to names"),
])
def test_nnunet_refuses_what_it_cannot_map(tmp_path, channels, labels, message):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "imagesTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({"channel_names": channels, "labels": labels}))
    with pytest.raises(ValueError, match=message):
        discover(root)


def test_study_folders_any_letter_case(tmp_path):
    root = tmp_path / "studies"
    _volume(root / "a" / "CT.nii.gz", _ct())
    _volume(root / "a" / "PET.nii.gz", _pet())
    _volume(root / "a" / "Label.nii.gz", _seg())
    _volume(root / "b" / "ct.nii.gz", _ct())
    (root / "b" / "PET").mkdir(parents=True)
    _volume(root / "c" / "ct.nii.gz", _ct())
    _volume(root / "c" / "pet.nii.gz", _pet())
    (root / "c" / "CT").mkdir()
    (root / "docs").mkdir()
    found = discover(root)
    assert found.layout == "study-folders" and [s.study_id for s in found.sources] == ["a", "b", "c"]
    a, b, c = found.sources
    assert (a.ct.name, a.pet.name, a.label.name, a.cohort) == ("CT.nii.gz", "PET.nii.gz", "Label.nii.gz", "labeled")
    assert b.pet.name == "PET" and b.pet.is_dir() and b.problem is None
    assert c.problem[0] == "ambiguous" and "ct given 2 times" in c.problem[1]
    assert dict(found.skipped)[str(root / "docs")].startswith("no ct or pet")


def test_two_layouts_in_one_folder_is_an_error(tmp_path, autopet):
    _volume(autopet / "extra_study" / "ct.nii.gz", _ct())
    _volume(autopet / "extra_study" / "pet.nii.gz", _pet())
    with pytest.raises(ValueError, match="matches several layouts: autopet .*study-folders"):
        discover(autopet)


def test_cohort_csv_wins_over_folder_structure(tmp_path, autopet):
    (autopet / "cohort.csv").write_text("study_id,ct,pet\nonly,x/ct.nii.gz,x/pet.nii.gz\n")
    assert [s.study_id for s in load_sources(autopet)] == ["only"]


def test_nothing_found_names_every_layout_tried(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no studies found") as info:
        load_sources(tmp_path / "empty")
    assert all(layout.name in str(info.value) for layout in layouts())


def test_csv_round_trips_every_field(tmp_path, autopet):
    sources = discover(autopet).sources
    csv_path = tmp_path / "review" / "cohort.csv"
    csv_path.parent.mkdir()
    csv_path.write_text(cohort_csv_text(sources, csv_path))
    assert sources_from_csv(csv_path) == sources
    assert "0=background;1=lesion" in csv_path.read_text() and "../autopet/" in csv_path.read_text()


def test_changing_the_label_map_in_the_csv_redoes_the_study(tmp_path, autopet):
    csv_path = tmp_path / "cohort.csv"
    csv_path.write_text(cohort_csv_text(discover(autopet).sources, csv_path))
    first = prepare_cohort(csv_path, tmp_path / "out", _cfg(), workers=0, progress=False).records[0]
    assert first["label_voxels"] == {"background": 376, "lesion": 8}
    again = prepare_cohort(csv_path, tmp_path / "out", _cfg(), workers=0, progress=False).records[0]
    assert again["skipped"]
    csv_path.write_text(csv_path.read_text().replace("0=background;1=lesion", "0=background;1=liver", 1))
    redone = prepare_cohort(csv_path, tmp_path / "out", _cfg(), workers=0, progress=False).records[0]
    assert not redone["skipped"] and redone["label_voxels"] == {"background": 376, "liver": 8}


def test_csv_problem_row_fails_without_being_read(tmp_path):
    csv_path = tmp_path / "cohort.csv"
    csv_path.write_text("study_id,ct,pet,patient_id,problem\n"
                        "p1,missing/ct,missing/pet,P1,ambiguous: 2 attenuation-corrected static PET series\n")
    summary = prepare_cohort(csv_path, tmp_path / "out", _cfg(), workers=0, progress=False)
    row = summary.records[0]
    assert (row["error_kind"], row["patient_id"]) == ("ambiguous", "P1") and "2 attenuation" in row["error"]


# --- labels: translated by name, and drawn on the CT grid --------------------------------------------------------

def _grid(size, spacing, origin) -> sitk.Image:
    image = sitk.Image(size, sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _nearest_truth(label_ct: np.ndarray, ct: sitk.Image, pet: sitk.Image, shift: np.ndarray) -> np.ndarray:
    """Independent nearest-neighbour pull: PET voxel centre p -> CT point p + shift -> nearest CT voxel's value."""
    nx, ny, nz = pet.GetSize()
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    points = np.stack([x, y, z], -1) * np.asarray(pet.GetSpacing()) + np.asarray(pet.GetOrigin()) + shift
    index = np.rint((points - np.asarray(ct.GetOrigin())) / np.asarray(ct.GetSpacing())).astype(int)
    inside = np.all((index >= 0) & (index < np.asarray(ct.GetSize())), axis=-1)
    truth = np.zeros((nz, ny, nx), np.uint8)
    ix, iy, iz = (np.where(inside, index[..., a], 0) for a in range(3))
    truth[inside] = label_ct[iz, iy, ix][inside]
    return truth


def test_label_on_the_ct_grid_lands_where_the_pet_grid_truth_is(tmp_path):
    ct = _grid((30, 30, 30), CT_SPACING, (-1.0, -1.0, -1.0))
    pet = _grid((14, 14, 14), PET_SPACING, (1.0, 1.0, 1.0))
    label_ct = np.zeros((30, 30, 30), np.uint8)
    label_ct[8:15, 10:18, 6:13] = 1  # a box drawn on the CT grid
    path = _volume(tmp_path / "label_ct.nii.gz", label_ct, CT_SPACING, ct.GetOrigin())
    shift = np.array([3.4, -2.3, 5.2])  # the registration: PET point p -> CT point p + shift
    transform = sitk.TranslationTransform(3, shift.tolist())
    label, grid = read_label("s", path, pet, LabelSet(("background", "lesion")), ct=ct, transform=transform)
    assert grid == "ct" and label.GetSize() == pet.GetSize() and label.GetSpacing() == pet.GetSpacing()
    truth = _nearest_truth(label_ct, ct, pet, shift)
    assert truth.sum() > 20
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), truth)


def test_label_map_translates_by_name_and_pet_grid_is_used_as_is(tmp_path):
    pet = _grid((8, 8, 6), PET_SPACING, (0.0, 0.0, 0.0))
    seg = _seg()
    seg[0, 0, 0] = 7
    path = _volume(tmp_path / "seg.nii.gz", seg)
    label, grid = read_label("s", path, pet, PSMA, {0: "background", 1: "lesion", 7: "kidneys"})
    array = sitk.GetArrayFromImage(label)
    assert grid == "pet" and int(array[0, 0, 0]) == PSMA.value("kidneys")
    assert int((array == PSMA.lesion).sum()) == 8
    with pytest.raises(StudyError, match=r"label values \[7\] are not in the label map") as info:
        read_label("s", path, pet, PSMA, {0: "background", 1: "lesion"})
    assert info.value.kind == "label_values"


def test_label_on_neither_grid_names_both(tmp_path):
    pet = _grid((8, 8, 6), PET_SPACING, (0.0, 0.0, 0.0))
    ct = _grid((16, 16, 12), CT_SPACING, (0.0, 0.0, 0.0))
    path = _volume(tmp_path / "seg.nii.gz", _seg(), (3.0, 3.0, 3.0))
    with pytest.raises(StudyError, match="neither the PET grid .* nor the CT grid .*spacing \\(2.000") as info:
        read_label("s", path, pet, PSMA, ct=ct)
    assert info.value.kind == "label_grid"


def test_prepare_records_a_ct_grid_label(tmp_path):
    root = tmp_path / "studies" / "s1"
    _volume(root / "ct.nii.gz", np.full((12, 16, 16), 40.0, np.float32), CT_SPACING)
    _volume(root / "pet.nii.gz", _pet())
    label_ct = np.zeros((12, 16, 16), np.uint8)
    label_ct[4:8, 6:10, 6:10] = PSMA.lesion
    _volume(root / "label.nii.gz", label_ct, CT_SPACING)
    summary = prepare_cohort(tmp_path / "studies", tmp_path / "out", _cfg(), workers=0, progress=False)
    row = summary.records[0]
    assert row["status"] == "ok" and row["label_source_grid"] == "ct"
    label = read_shard(tmp_path / "out" / row["shard"]).label
    assert int((label == PSMA.lesion).sum()) == 8  # the 8x8x8 mm box covers 2x2x2 PET voxels of 4 mm
