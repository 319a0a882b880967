"""DICOM series reading (petct.dicom_read via petct.io): geometry that is not a plain stack, series selection in
folders that hold more than one series, enhanced multi-frame objects (written by highdicom, an independent writer),
the memory budget, and the 3-D-only rule for NIfTI files."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import highdicom
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from petct.dicom_write import sample_meta, write_pet_series
from petct.errors import StudyError
from petct.io import read_ct, read_pet

GRADIENT = np.array([1.0, 2.0, 3.0])  # HU per mm: a linear object, so linear interpolation must be exact
OFFSET = 100.0


def linear_hu(points: np.ndarray) -> np.ndarray:
    """The known object: HU at physical (LPS) points."""
    return points @ GRADIENT + OFFSET


def _slice(uid: str, k: int, rows: int, cols: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.TransferSyntaxUID = CTImageStorage, ExplicitVRLittleEndian
    ds.SOPClassUID, ds.Modality, ds.SeriesInstanceUID = CTImageStorage, "CT", uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.InstanceNumber, ds.ImageType = "1.2.3", k + 1, ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    return ds


def write_ct(folder: Path, positions: np.ndarray, row=(1, 0, 0), col=(0, 1, 0), shape=(6, 7), spacing=(1.0, 1.0),
             uid: str = "", slope: float = 0.01, prefix: str = "IM", **tags) -> str:
    """A CT series of `linear_hu` sampled at each pixel centre of slices at `positions` (one file per slice).

    PixelSpacing = `spacing` (between rows, between columns); stored = HU / slope (int16) with RescaleSlope.
    """
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    rows, cols = shape
    row, col = np.asarray(row, float), np.asarray(col, float)
    j, i = np.mgrid[0:rows, 0:cols]
    for k, origin in enumerate(np.asarray(positions, float)):
        ds = _slice(uid, k, rows, cols)
        ds.ImagePositionPatient, ds.ImageOrientationPatient = list(origin), list(row) + list(col)
        ds.PixelSpacing, ds.RescaleSlope, ds.RescaleIntercept = list(spacing), slope, 0
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
        points = origin + i[..., None] * spacing[1] * row + j[..., None] * spacing[0] * col
        ds.PixelData = np.rint(linear_hu(points) / slope).astype("<i2").tobytes()
        ds.save_as(folder / f"{prefix}{k:04d}", enforce_file_format=True)
    return uid


def voxel_points(image: sitk.Image) -> np.ndarray:
    """Physical point of every voxel, in the (z, y, x) order of GetArrayFromImage."""
    size = image.GetSize()
    k, j, i = np.mgrid[0:size[2], 0:size[1], 0:size[0]]
    index = np.stack([i, j, k], -1).reshape(-1, 3) * np.asarray(image.GetSpacing())
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return (np.asarray(image.GetOrigin()) + index @ direction.T).reshape(*size[::-1], 3)


def tilted(tilt_deg: float, n: int = 5, step: float = 2.0) -> tuple[tuple, tuple, np.ndarray]:
    """Gantry tilt as scanners write it: the image plane tilted about x, slice positions along the table (z)."""
    t = np.radians(tilt_deg)
    return (1, 0, 0), (0, np.cos(t), np.sin(t)), np.array([[-3.0, -2.0, step * k] for k in range(n)])


@pytest.mark.parametrize("case", ["gantry_tilt_20deg", "shear_along_rows"])
def test_sheared_stack_is_resampled_to_true_positions(tmp_path, case):
    if case == "gantry_tilt_20deg":
        row, col, positions = tilted(20.0)
        tags = {"GantryDetectorTilt": 20.0}
    else:  # axial planes, each slice shifted 0.4 mm along x: positions not along the normal
        row, col, positions = (1, 0, 0), (0, 1, 0), np.array([[0.4 * k, 0.0, 2.0 * k] for k in range(5)])
        tags = {}
    write_ct(tmp_path / "ct", positions, row, col, **tags)
    image = read_ct("s", tmp_path / "ct")
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    assert np.allclose(direction.T @ direction, np.eye(3), atol=1e-9)  # an orthogonal grid, never a shear
    values, truth = sitk.GetArrayFromImage(image), linear_hu(voxel_points(image))
    inside = values != -1024.0
    assert image.GetSize()[0] * image.GetSize()[1] > 6 * 7  # grew to hold every shifted slice
    assert 0.5 * values.size < inside.sum() < values.size  # and is filled with air outside them
    assert np.abs(values[inside] - truth[inside]).max() < 0.02  # right value at every physical point
    assert np.isclose(image.GetSpacing()[2], 2.0 * (np.cos(np.radians(20.0)) if case == "gantry_tilt_20deg" else 1))
    assert "resampled onto an orthogonal grid" in image.GetMetaData("petct:geometry")  # said, for the record


def test_oblique_stack_along_its_normal_is_read_as_is(tmp_path):
    row, col, _ = tilted(15.0)
    normal = np.cross(row, col)
    positions = np.array([[-3.0, -2.0, 0.0]]) + 2.5 * np.arange(4)[:, None] * normal
    write_ct(tmp_path / "ct", positions, row, col, GantryDetectorTilt=15.0)
    image = read_ct("s", tmp_path / "ct")
    assert image.GetSize() == (7, 6, 4) and np.allclose(image.GetOrigin(), positions[0])
    assert not image.HasMetaDataKey("petct:geometry")
    values = sitk.GetArrayFromImage(image)
    assert np.abs(values - linear_hu(voxel_points(image))).max() < 0.01


@pytest.mark.parametrize("tag", ["NumberOfTimeSlices", "NumberOfTimeSlots"])
def test_dynamic_or_gated_series_is_refused(tmp_path, tag):
    positions = np.array([[0.0, 0.0, 2.0 * (k // 2)] for k in range(8)])  # every position twice
    write_ct(tmp_path / "pt", positions, **{tag: 2})
    with pytest.raises(StudyError) as err:
        read_ct("s", tmp_path / "pt")
    assert err.value.kind == "geometry" and f"{tag}=2" in err.value.message and "8 images at 4 positions" in \
        err.value.message


@pytest.mark.parametrize("count,image_type", [(2, ["ORIGINAL", "PRIMARY", "AXIAL"]),
                                              (5, ["ORIGINAL", "PRIMARY", "LOCALIZER"])])
def test_single_slice_or_localizer_is_refused(tmp_path, count, image_type):
    write_ct(tmp_path / "ct", [[0.0, 0.0, 2.0 * k] for k in range(count)], ImageType=image_type)
    with pytest.raises(StudyError) as err:
        read_ct("s", tmp_path / "ct")
    assert err.value.kind == "geometry" and "localizer" in err.value.message


def test_missing_slice_is_a_read_error(tmp_path):
    write_ct(tmp_path / "ct", [[0.0, 0.0, 2.0 * k] for k in range(5)])
    (tmp_path / "ct" / "IM0002").unlink()
    with pytest.raises(StudyError) as err:
        read_ct("s", tmp_path / "ct")
    assert err.value.kind == "read_error" and "not evenly spaced" in err.value.message


def test_slice_cut_inside_its_header_is_a_read_error_naming_it(tmp_path):
    write_ct(tmp_path / "ct", [[0.0, 0.0, 2.0 * k] for k in range(5)])
    victim = tmp_path / "ct" / "IM0003"
    victim.write_bytes(victim.read_bytes()[:400])  # before Rows: it reads as a header without an image
    with pytest.raises(StudyError) as err:
        read_ct("s", tmp_path / "ct")
    assert err.value.kind == "read_error" and "IM0003" in err.value.message and "truncated" in err.value.message


def test_size_budget_is_checked_from_headers_before_pixels(tmp_path):
    write_ct(tmp_path / "ct", [[0.0, 0.0, 2.0 * k] for k in range(4)], shape=(64, 64))
    with open(tmp_path / "ct" / "IM0001", "r+b") as handle:  # corrupt pixels: decoding them would be a read_error
        handle.truncate(2000)
    with pytest.raises(StudyError) as err:
        read_ct("s", tmp_path / "ct", max_bytes=64 * 64 * 4 * 3)
    assert err.value.kind == "too_large" and "max_volume_mib" in err.value.message and "64x64x4" in err.value.message
    with pytest.raises(StudyError) as err:
        read_ct("s", tmp_path / "ct", max_bytes=64 * 64 * 4 * 4)
    assert err.value.kind == "read_error" and "IM0001" in err.value.message


def test_nifti_size_budget(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 10), np.float32), np.eye(4)), tmp_path / "ct.nii.gz")
    with pytest.raises(StudyError) as err:
        read_ct("s", tmp_path / "ct.nii.gz", max_bytes=1000)
    assert err.value.kind == "too_large" and "20x20x10" in err.value.message
    assert read_ct("s", tmp_path / "ct.nii.gz", max_bytes=20 * 20 * 10 * 4).GetSize() == (20, 20, 10)


@pytest.mark.parametrize("shape,kind", [((8, 8, 6, 2), "geometry"), ((8, 8, 1), "geometry"), ((8, 8), "geometry"),
                                        ((8, 8, 6, 1), None)])
def test_nifti_must_be_one_3d_volume(tmp_path, shape, kind):
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)), tmp_path / "ct.nii.gz")
    if kind is None:  # a trailing singleton time axis is a 3-D volume
        assert read_ct("s", tmp_path / "ct.nii.gz").GetSize() == shape[:3]
        return
    with pytest.raises(StudyError) as err:
        read_ct("s", tmp_path / "ct.nii.gz")
    assert err.value.kind == kind and "ct.nii.gz" in err.value.message


def _minimal(sop_class: str, modality: str, series: str) -> Dataset:
    """A non-image object (no pixel matrix), as an export puts beside the images."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.TransferSyntaxUID = sop_class, ExplicitVRLittleEndian
    ds.SOPClassUID, ds.Modality, ds.SeriesInstanceUID = sop_class, modality, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def test_non_image_files_beside_the_series_are_ignored(tmp_path):
    positions = [[0.0, 0.0, 2.0 * k] for k in range(4)]
    write_ct(tmp_path / "plain", positions)
    folder = tmp_path / "export"
    write_ct(folder, positions)
    (folder / "README.txt").write_text("exported by PACS\n")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "thumb.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    (folder / "DICOMDIR").write_bytes(Path(get_testdata_file("DICOMDIR")).read_bytes())
    for name, (sop, modality) in {"SR1": ("1.2.840.10008.5.1.4.1.1.88.11", "SR"),
                                  "KO1": ("1.2.840.10008.5.1.4.1.1.88.59", "KO"),
                                  "PR1": ("1.2.840.10008.5.1.4.1.1.11.1", "PR")}.items():
        _minimal(sop, modality, generate_uid()).save_as(folder / name, enforce_file_format=True)
    expected = sitk.GetArrayFromImage(read_ct("s", tmp_path / "plain"))
    assert np.array_equal(sitk.GetArrayFromImage(read_ct("s", folder)), expected)


def test_series_uid_selects_files_anywhere_below(tmp_path):
    positions = np.array([[0.0, 0.0, 2.0 * k] for k in range(6)])
    root = tmp_path / "pacs"
    uid = write_ct(root / "a" / "1", positions[:3])
    write_ct(root / "b" / "2" / "3", positions[3:], uid=uid)  # the same series split over two folders
    write_ct(root / "a" / "1" / "other", positions + 50)  # another CT series
    image = read_ct("s", root, series_uid=uid)
    assert image.GetSize() == (7, 6, 6) and np.allclose(image.GetOrigin(), positions[0])
    with pytest.raises(StudyError) as err:  # without the uid the root's own files are read: there are none
        read_ct("s", root)
    assert err.value.kind == "missing_modality" and "subfolders" in err.value.message
    with pytest.raises(StudyError) as err:
        read_ct("s", root, series_uid="1.2.999")
    assert err.value.kind == "missing_modality" and "1.2.999" in err.value.message
    with pytest.raises(StudyError) as err:  # the right series, the wrong role
        read_pet("s", root, series_uid=uid)
    assert err.value.kind == "missing_modality" and "Modality must be PT" in err.value.message


def test_two_volumes_in_one_folder_are_ambiguous_a_scout_beside_one_is_not(tmp_path):
    positions = np.array([[0.0, 0.0, 2.0 * k] for k in range(4)])
    first = write_ct(tmp_path / "ct", positions, prefix="A")
    write_ct(tmp_path / "ct", positions[:3] + 0.5, prefix="S", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    assert read_ct("s", tmp_path / "ct").GetSize() == (7, 6, 4)  # the scout is not a candidate
    second = write_ct(tmp_path / "ct", positions + 10, prefix="B")
    with pytest.raises(StudyError) as err:
        read_ct("s", tmp_path / "ct")
    assert err.value.kind == "ambiguous" and first in err.value.message and second in err.value.message


def test_enhanced_ct_from_highdicom_equals_the_legacy_series(tmp_path):
    row, col, _ = tilted(10.0)
    normal = np.cross(row, col)
    positions = np.array([[-3.0, -2.0, 0.0]]) + 2.0 * np.arange(5)[::-1, None] * normal  # files head first
    write_ct(tmp_path / "legacy", positions, row, col, StudyDate="20240101", SeriesDate="20240101",
             StudyTime="100000", PatientName="X^Y", PatientID="1", FrameOfReferenceUID=generate_uid())
    legacy = [pydicom.dcmread(p) for p in sorted((tmp_path / "legacy").iterdir())]
    enhanced = highdicom.legacy.LegacyConvertedEnhancedCTImage(legacy, generate_uid(), 9, generate_uid(), 1)
    (tmp_path / "enhanced").mkdir()
    enhanced.save_as(tmp_path / "enhanced" / "ECT.dcm")
    want, got = read_ct("s", tmp_path / "legacy"), read_ct("s", tmp_path / "enhanced")
    assert np.array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(want))
    for a, b in ((got.GetOrigin(), want.GetOrigin()), (got.GetSpacing(), want.GetSpacing()),
                 (got.GetDirection(), want.GetDirection())):
        assert np.allclose(a, b, atol=1e-6)


def test_enhanced_pet_from_highdicom_gives_the_legacy_suv(tmp_path):
    """SUV tags sit in UnassignedShared/PerFrame converted attributes and per-frame acquisition times in the Frame
    Content macro: the flattened frames must give the same factor (SeriesTime after the first bed makes the
    acquisition times matter)."""
    rng = np.random.default_rng(3)
    suv = sitk.GetImageFromArray(rng.uniform(0.5, 8.0, (6, 8, 9)).astype(np.float32))
    suv.SetSpacing((4.0, 4.0, 3.0))
    meta = sample_meta(rng) | {"bed_duration_s": 150}
    uids = {key: generate_uid() for key in ("study", "frame", "CT", "PT")} | {"patient": "p1"}
    write_pet_series(suv, tmp_path / "legacy", meta, uids)
    late = (dt.datetime.fromisoformat(meta["scan_start_datetime"]) + dt.timedelta(minutes=20)).strftime("%H%M%S")
    legacy = []
    for path in sorted((tmp_path / "legacy").iterdir()):  # reconstructed later: SeriesTime after the scan
        ds = pydicom.dcmread(path)
        ds.SeriesTime = late
        ds.save_as(path)
        legacy.append(ds)
    enhanced = highdicom.legacy.LegacyConvertedEnhancedPETImage(legacy, generate_uid(), 9, generate_uid(), 1)
    (tmp_path / "enhanced").mkdir()
    enhanced.save_as(tmp_path / "enhanced" / "EPT.dcm")
    want, got = read_pet("s", tmp_path / "legacy"), read_pet("s", tmp_path / "enhanced")
    assert np.allclose(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(want), rtol=1e-6)
    assert np.allclose(got.GetOrigin(), want.GetOrigin()) and np.allclose(got.GetSpacing(), want.GetSpacing())
    assert np.allclose(sitk.GetArrayFromImage(want), sitk.GetArrayFromImage(suv), rtol=2e-3, atol=1e-3)


def test_nac_series_beside_the_ac_one_in_a_pet_folder_is_not_a_choice(tmp_path):
    """`<patient>/PET/` as a scanner exports it: the AC series and its NAC twin in one folder -> the AC one."""
    rng = np.random.default_rng(5)
    suv = sitk.GetImageFromArray(rng.uniform(0.5, 8.0, (4, 6, 7)).astype(np.float32))
    suv.SetSpacing((4.0, 4.0, 3.0))
    meta = sample_meta(rng)
    uids = {key: generate_uid() for key in ("study", "frame", "CT", "PT")} | {"patient": "p1"}
    write_pet_series(suv, tmp_path / "ac", meta, uids)
    write_pet_series(suv * 0.5, tmp_path / "nac", meta, uids | {"PT": generate_uid()})
    (tmp_path / "PET").mkdir()
    for source, prefix in ((tmp_path / "ac", "AC"), (tmp_path / "nac", "NAC")):
        for path in sorted(source.iterdir()):
            ds = pydicom.dcmread(path)
            if prefix == "NAC":
                ds.CorrectedImage = ["DECY", "RAN", "NORM"]
            ds.save_as(tmp_path / "PET" / f"{prefix}_{path.name}")
    got = read_pet("s", tmp_path / "PET")
    assert np.allclose(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(read_pet("s", tmp_path / "ac")))
