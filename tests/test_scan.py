"""DICOM tree discovery (petct.dicom_index, petct.layouts.dicom_tree) and `swinssl scan`.

The tree is written here with pydicom as a PACS export and a DICOM CD write them: nested folders with arbitrary
names, several series in one folder, an attenuation-corrected and a non-corrected PET side by side, a localizer, an
SR document, a README, and a second study written by pydicom's FileSet as a CD (DICOMDIR + PT000000/ST000000/...).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    PositronEmissionTomographyImageStorage,
    generate_uid,
)

from petct.layouts import discover, sources_from_csv
from swinssl.cli import main

SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR


def _base(patient: str, study: str, series: str, frame: str, modality: str, sop_class: str, number: int,
          description: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.TransferSyntaxUID = sop_class, ExplicitVRLittleEndian
    ds.SOPClassUID, ds.Modality, ds.PatientID, ds.PatientName = sop_class, modality, patient, f"TEST^{patient}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.StudyDate = ds.SeriesDate = "20210315"
    ds.StudyTime = ds.SeriesTime = "101500"
    ds.SeriesNumber, ds.SeriesDescription, ds.StudyID = number, description, "1"
    return ds


def _image(ds: Dataset, z: float, spacing: float, size: int, stored: np.ndarray) -> None:
    corner = -size * spacing / 2
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [corner, corner, z], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [spacing, spacing], 3.0
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = stored.astype("<u2").tobytes()


def _write(ds: Dataset, path: Path, k: int) -> Path:
    ds.InstanceNumber = k + 1
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_ct(folder: Path, ids: dict, number: int, description: str, z0: float, slices: int, gap: float = 3.0,
             frame: str | None = None, image_type=("ORIGINAL", "PRIMARY", "AXIAL"), prefix: str = "") -> list[Path]:
    ds = _base(ids["patient"], ids["study"], generate_uid(), frame or ids["frame"], "CT", CTImageStorage, number,
               description)
    ds.ImageType, ds.RescaleIntercept, ds.RescaleSlope, ds.KVP = list(image_type), "-1024", "1", "120"
    paths = []
    for k in range(slices):
        _image(ds, z0 + k * gap, 2.0, 16, np.full((16, 16), 1064))
        paths.append(_write(ds, folder / f"{prefix or 'IM'}{number:03d}{k:04d}", k))
    return paths


def write_pet(folder: Path, ids: dict, number: int, description: str, corrected=("DECY", "ATTN", "SCAT"),
              series_type=("WHOLE BODY", "IMAGE"), slices: int = 5, frames: int = 1) -> list[Path]:
    ds = _base(ids["patient"], ids["study"], generate_uid(), ids["frame"], "PT", PositronEmissionTomographyImageStorage,
               number, description)
    ds.ImageType, ds.SeriesType, ds.CorrectedImage = ["ORIGINAL", "PRIMARY"], list(series_type), list(corrected)
    ds.Units, ds.DecayCorrection, ds.PatientWeight = "BQML", "START", "80"
    radio = Dataset()
    radio.RadiopharmaceuticalStartTime, radio.RadionuclideTotalDose, radio.RadionuclideHalfLife = "091500", "3.7e8", \
        "6586.2"
    ds.RadiopharmaceuticalInformationSequence = Sequence([radio])
    ds.RescaleSlope, ds.RescaleIntercept = "0.5", "0"
    start = dt.datetime(2021, 3, 15, 10, 15)
    paths = []
    for frame in range(frames):
        for k in range(slices):
            ds.AcquisitionTime = (start + dt.timedelta(minutes=2 * frame)).strftime("%H%M%S")
            _image(ds, 3.0 + k * 3.0, 4.0, 8, np.full((8, 8), 2000))
            paths.append(_write(ds, folder / f"PT{number:03d}{frame:02d}{k:04d}", frame * slices + k))
    return paths


def write_sr(path: Path, ids: dict) -> Path:
    ds = _base(ids["patient"], ids["study"], generate_uid(), ids["frame"], "SR", SR_STORAGE, 99, "Dose report")
    return _write(ds, path, 0)


def _ids(patient: str) -> dict:
    return {"patient": patient, "study": generate_uid(), "frame": generate_uid()}


@pytest.fixture
def tree(tmp_path) -> tuple[Path, dict]:
    """PACS export (study A, nested, mixed folder) + DICOM CD of study B (FileSet, DICOMDIR) + other files."""
    root = tmp_path / "export"
    a, b = _ids("PAT-001"), _ids("PAT 002")
    mixed = root / "PACS" / "2021" / "0315" / "x7f3"
    write_ct(mixed, a, 2, "CT WB 3.0 B30f", 0.0, 8)
    write_ct(mixed, a, 1, "Topogram 0.6 T20f", 0.0, 1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), prefix="TOP")
    write_pet(mixed, a, 4, "PET WB AC")
    write_pet(mixed, a, 5, "PET WB NAC", corrected=("DECY",))
    write_pet(root / "PACS" / "2021" / "dyn", a, 6, "PET dynamic", series_type=("DYNAMIC", "IMAGE"), frames=2)
    write_sr(root / "PACS" / "2021" / "sr" / "report.dcm", a)
    (root / "README.txt").write_text("Exported by PACS X\n")
    staging = tmp_path / "staging"
    files = write_ct(staging, b, 3, "CT low dose", -6.0, 10, frame=generate_uid())  # other frame of reference
    files += write_ct(staging, b, 2, "CT WB", 0.0, 8)
    files += write_pet(staging, b, 7, "PET AC")
    fileset = FileSet()
    for path in files:
        fileset.add(path)
    fileset.write(root / "CD")
    return root, {"a": a, "b": b}


def test_dicom_tree_pairs_ct_and_ac_pet_and_lists_what_it_skipped(tree):
    root, ids = tree
    found = discover(root)
    assert found.layout == "dicom"
    assert [s.study_id for s in found.sources] == sorted(["PAT-001_20210315", "PAT_002_20210315"],
                                                        key=lambda sid: ids["a" if "001" in sid else "b"]["study"])
    by_patient = {s.patient_id: s for s in found.sources}
    assert set(by_patient) == {"PAT-001", "PAT 002"} and all(s.problem is None for s in found.sources)
    assert "'CT WB 3.0 B30f'" in found.pairing[by_patient["PAT-001"].study_id]
    assert "'PET WB AC'" in found.pairing[by_patient["PAT-001"].study_id]
    pairing_b = found.pairing[by_patient["PAT 002"].study_id]
    assert "CT series 2 'CT WB'" in pairing_b and "same frame of reference" in pairing_b  # FoR beats coverage
    reasons = " | ".join(f"{what}: {why}" for what, why in found.skipped)
    for expected in ("'PET WB NAC'", "not attenuation corrected", "'Topogram 0.6 T20f'", "localizer",
                     "'PET dynamic'", "dynamic PET", "modality SR", "README.txt: not a DICOM file", "DICOMDIR",
                     "'CT low dose'", "does not share the PET's frame of reference"):
        assert expected in reasons, expected
    a = by_patient["PAT-001"]
    assert a.ct == a.pet == (root / "PACS" / "2021" / "0315" / "x7f3").resolve() and a.ct_series != a.pet_series


def test_two_ac_pets_make_the_study_ambiguous_and_it_fails_unread(tmp_path):
    root = tmp_path / "tree"
    ids = _ids("P9")
    write_ct(root / "s", ids, 2, "CT", 0.0, 8)
    write_pet(root / "s", ids, 4, "PET AC 2 min")
    write_pet(root / "s", ids, 5, "PET AC 3 min")
    (source,) = discover(root).sources
    assert source.problem[0] == "ambiguous"
    assert "'PET AC 2 min'" in source.problem[1] and "PT series 5 'PET AC 3 min'" in source.problem[1]
    from petct.pipeline import prepare_cohort

    summary = prepare_cohort(root, tmp_path / "out", workers=0, progress=False)
    row = summary.records[0]
    assert (row["status"], row["error_kind"], row["patient_id"]) == ("failed", "ambiguous", "P9")


def test_tied_cts_are_ambiguous_and_a_study_without_ac_pet_is_missing_modality(tmp_path):
    root = tmp_path / "tree"
    tied, no_pet = _ids("P1"), _ids("P2")
    write_ct(root / "a", tied, 2, "CT soft", 0.0, 8)
    write_ct(root / "a", tied, 3, "CT bone", 0.0, 8)
    write_pet(root / "a", tied, 4, "PET AC")
    write_ct(root / "b", no_pet, 2, "CT", 0.0, 8)
    write_pet(root / "b", no_pet, 5, "PET NAC", corrected=("DECY",))
    first, second = sorted(discover(root).sources, key=lambda s: s.patient_id)
    assert first.problem[0] == "ambiguous" and "'CT soft'" in first.problem[1] and "'CT bone'" in first.problem[1]
    assert second.problem[0] == "missing_modality" and "not attenuation corrected" in second.problem[1]


def test_finer_and_wider_ct_wins_within_the_frame_of_reference(tmp_path):
    root = tmp_path / "tree"
    ids = _ids("P3")
    write_ct(root / "x", ids, 2, "CT short", 6.0, 3)  # covers only part of the PET's 3..15 mm
    write_ct(root / "x", ids, 3, "CT 3mm", 0.0, 8)
    write_ct(root / "x", ids, 4, "CT 1.5mm", 0.0, 16, gap=1.5)  # same coverage, finer slices
    write_pet(root / "x", ids, 5, "PET AC")
    found = discover(root)
    assert "'CT 1.5mm'" in found.pairing[found.sources[0].study_id]
    reasons = dict((what.split(" in ")[0], why) for what, why in found.skipped)
    assert "covers 6.0 mm" in next(v for k, v in reasons.items() if "CT short" in k)
    assert "slice spacing 3.00 mm" in next(v for k, v in reasons.items() if "CT 3mm" in k)


def test_swinssl_scan_prints_pairing_and_skipped_and_the_csv_round_trips(tree, tmp_path, capsys):
    root, ids = tree
    out = tmp_path / "review" / "cohort.csv"
    assert main(["scan", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("layout: dicom (2 studies")
    assert "PET WB AC" in printed and "patient PAT-001" in printed and "skipped (" in printed
    assert "README.txt: not a DICOM file" in printed and "not attenuation corrected" in printed
    assert sources_from_csv(out) == discover(root).sources
    assert ",../export/PACS/2021/0315/x7f3," in out.read_text()


def test_swinssl_scan_exits_2_when_nothing_is_found(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("nothing here")
    assert main(["scan", str(tmp_path / "empty"), "--out", str(tmp_path / "c.csv")]) == 2
    error = capsys.readouterr().err
    assert "no studies found" in error and "dicom:" in error and "autopet:" in error
    assert not (tmp_path / "c.csv").exists()


def test_prepare_of_the_tree_equals_prepare_of_its_scan_csv(tree, tmp_path):
    from dataclasses import replace

    from petct.config import PrepareConfig
    from petct.pipeline import prepare_cohort

    root, _ = tree
    csv_path = tmp_path / "cohort.csv"
    assert main(["scan", str(root), "--out", str(csv_path)]) == 0
    cfg = PrepareConfig(qc_png=False)
    cfg = replace(cfg, registration=replace(cfg.registration, enabled=False))
    direct = prepare_cohort(root, tmp_path / "direct", cfg, workers=0, progress=False).records
    via_csv = prepare_cohort(csv_path, tmp_path / "via_csv", cfg, workers=0, progress=False).records
    assert [r["status"] for r in direct] == ["ok", "ok"]
    same = ("study_id", "patient_id", "layout", "ct_series", "pet_series", "source_hashes", "shape", "origin")
    assert [{k: r[k] for k in same} for r in direct] == [{k: r[k] for k in same} for r in via_csv]
    assert {r["patient_id"] for r in direct} == {"PAT-001", "PAT 002"} and direct[0]["layout"] == "dicom"


def test_third_party_files_in_the_tree_are_indexed_and_skipped_with_reasons(tmp_path):
    """pydicom's own test files (not written by us): an Enhanced CT with per-frame geometry, a classic single CT
    slice, MR and NM objects, next to a usable study."""
    import shutil

    from pydicom.data import get_testdata_file

    from petct.dicom_index import role, scan_tree

    root = tmp_path / "tree"
    ids = _ids("P5")
    write_ct(root / "ours", ids, 2, "CT", 0.0, 8)
    write_pet(root / "ours", ids, 4, "PET AC")
    names = ("eCT_Supplemental.dcm", "CT_small.dcm", "MR_small.dcm", "JPEG-LL.dcm")
    for name in names:
        (root / "theirs").mkdir(parents=True, exist_ok=True)
        shutil.copy(get_testdata_file(name), root / "theirs" / name)
    (root / "theirs" / "cut.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes()[:400])
    index = scan_tree(root)
    assert "truncated header" in dict(index.skipped)[str(root / "theirs" / "cut.dcm")]
    series = {s.files[0].name: s for s in index.series.values()}
    enhanced = series["eCT_Supplemental.dcm"]
    assert (enhanced.images, len(enhanced.positions), enhanced.normal) == (2, 2, (0.0, 0.0, -1.0))
    assert role(enhanced)[1].startswith("only 2 image(s)") and role(series["CT_small.dcm"])[1].startswith("only 1")
    assert role(series["MR_small.dcm"])[1] == "modality MR is neither CT nor PT"
    assert role(series["JPEG-LL.dcm"])[1] == "modality NM is neither CT nor PT"
    found = discover(root)
    ours = next(s for s in found.sources if s.patient_id == "P5")
    assert ours.problem is None and ours.ct_series and ours.pet_series
    assert all(s.problem and s.problem[0] == "missing_modality" for s in found.sources if s is not ours)
