"""Files this project did not write: pydicom's and pydicom-data's test files (every compressed transfer syntax of a
monochrome image they ship, enhanced multi-frame, broken and odd objects) and nibabel's NIfTI test files.

Each DICOM file becomes a small series in tmp_path: copies with new SOP Instance UIDs and positions along the slice
normal (Modality set to CT and, for secondary captures, the image-plane tags added), the pixel data bytes untouched
so they stay compressed. `read_ct` must give exactly the values of the uncompressed reference file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from nibabel.testing import data_path as NIBABEL_DATA
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, JPEGBaseline8Bit, JPEGLossless, generate_uid

from petct import dicom_read
from petct.errors import StudyError
from petct.io import read_ct

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the broken files

# (file, uncompressed reference: a file of the same image, or None = pydicom's own decode of the file)
SINGLE_FRAME = [
    ("MR_small_RLE.dcm", "MR_small.dcm"),
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
    ("MR_small_bigendian.dcm", "MR_small.dcm"),
    ("MR_small_implicit.dcm", "MR_small.dcm"),
    ("693_J2KR.dcm", "693_UNCR.dcm"),  # a real 512x512 CT, JPEG 2000 lossless
    ("693_J2KI.dcm", "693_UNCI.dcm"),  # JPEG 2000 lossy; UNCI is its decoded image
    ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),  # oblique orientation, RescaleSlope 3.77
    ("JPEG2000.dcm", "JPEG2000_UNC.dcm"),
    ("JPEG-LL.dcm", None),  # JPEG Lossless SV1 (.70)
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", None),
    ("JPGExtended.dcm", None),  # JPEG Extended 12-bit (.51), lossy
    ("JPEGLSNearLossless_08.dcm", None),
    ("JPEGLSNearLossless_16.dcm", None),
    ("image_dfl.dcm", None),  # Deflated Explicit VR Little Endian
]
MULTI_FRAME = ["emri_small.dcm", "emri_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm",
               "emri_small_jpeg_ls_lossless.dcm", "emri_small_big_endian.dcm"]


def _syntax(name: str) -> str:
    return str(pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True).file_meta.TransferSyntaxUID)


def _id(case) -> str:
    name = case if isinstance(case, str) else case[0]
    return f"{name}-{UID(_syntax(name)).name}"


def _stored(name: str) -> np.ndarray:
    ds = pydicom.dcmread(get_testdata_file(name))
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    return ds.pixel_array.astype(np.float32) * slope + intercept


def series_from(ds_or_name, folder: Path, n: int = 3, **tags) -> Path:
    """`n` copies of one file as a CT series at 2 mm along the slice normal; pixel data bytes as they are."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    for k in range(n):
        ds = pydicom.dcmread(get_testdata_file(ds_or_name)) if isinstance(ds_or_name, str) else ds_or_name
        ds.SeriesInstanceUID, ds.Modality = uid, "CT"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for keyword, default in (("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), ("PixelSpacing", [1, 1]),
                                 ("ImagePositionPatient", [0, 0, 0])):
            if keyword not in ds:
                setattr(ds, keyword, default)
        if k == 0:
            start, normal = np.asarray(ds.ImagePositionPatient, float), np.cross(
                *np.asarray(ds.ImageOrientationPatient, float).reshape(2, 3))
        ds.ImagePositionPatient = [round(float(v), 4) for v in start + 2.0 * k * normal]
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
        ds.save_as(folder / f"{k}.dcm")
    return folder


def enhanced_from(name: str, folder: Path) -> Path:
    """One multi-frame file made a volume: the Functional Groups it lacks (frame k at 1.2 k mm), pixels untouched."""
    ds = pydicom.dcmread(get_testdata_file(name))
    measures, orientation = Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.9, 0.9], 1.2
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared = Dataset()
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orientation]
    frames = []
    for k in range(int(ds.NumberOfFrames)):
        position, item = Dataset(), Dataset()
        position.ImagePositionPatient = [0.0, 0.0, 1.2 * k]
        item.PlanePositionSequence = [position]
        frames.append(item)
    ds.SharedFunctionalGroupsSequence, ds.PerFrameFunctionalGroupsSequence = [shared], frames
    ds.Modality = "CT"
    folder.mkdir(parents=True)
    ds.save_as(folder / "enhanced.dcm")
    return folder


@pytest.mark.parametrize("case", SINGLE_FRAME, ids=_id)
def test_compressed_single_frame_files_decode_exactly(tmp_path, case):
    name, reference = case
    image = read_ct("s", series_from(name, tmp_path / "ct"))
    expected = _stored(reference or name)
    assert np.array_equal(sitk.GetArrayFromImage(image), np.stack([expected] * 3))
    header = pydicom.dcmread(tmp_path / "ct" / "0.dcm", stop_before_pixels=True)
    assert header.file_meta.TransferSyntaxUID == _syntax(name)  # still compressed as shipped


def test_jpeg_lossless_process14_any_predictor(tmp_path):
    """1.2.840.10008.1.2.4.57 (any selection value): JPEG-LL.dcm's SV1 stream is also a valid Process 14 stream."""
    ds = pydicom.dcmread(get_testdata_file("JPEG-LL.dcm"))
    ds.file_meta.TransferSyntaxUID = JPEGLossless
    image = read_ct("s", series_from(ds, tmp_path / "ct"))
    assert np.array_equal(sitk.GetArrayFromImage(image), np.stack([_stored("JPEG-LL.dcm")] * 3))


def test_jpeg_baseline_from_an_independent_encoder(tmp_path):
    """No monochrome JPEG Baseline file ships with pydicom: Pillow (libjpeg) encodes one; Pillow's decode is truth."""
    from PIL import Image

    j, i = np.mgrid[0:64, 0:48]
    buffer = io.BytesIO()
    Image.fromarray((2 * i + 3 * j).astype(np.uint8)).save(buffer, format="JPEG", quality=85)
    truth = np.asarray(Image.open(io.BytesIO(buffer.getvalue())), np.float32)
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 64, 48, 8, 8, 7, 0
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    image = read_ct("s", series_from(ds, tmp_path / "ct"))
    assert np.abs(sitk.GetArrayFromImage(image) - truth).max() <= 1  # decoders may round the IDCT differently


@pytest.mark.parametrize("name", MULTI_FRAME, ids=_id)
def test_compressed_multi_frame_files_decode_exactly(tmp_path, name):
    image = read_ct("s", enhanced_from(name, tmp_path / "ct"))
    assert np.array_equal(sitk.GetArrayFromImage(image), _stored("emri_small.dcm"))  # frame k = slice k
    assert np.allclose(image.GetSpacing(), (0.9, 0.9, 1.2))


def test_enhanced_ct_supplemental(tmp_path):
    """eCT_Supplemental.dcm: per-frame positions, shared orientation, spacing and rescale. Its 2 frames are not a
    volume; with two more frames appended (same pixels, next positions) it reads with the file's geometry."""
    name = get_testdata_file("eCT_Supplemental.dcm")
    (tmp_path / "two").mkdir()
    Path(tmp_path / "two" / "e.dcm").write_bytes(Path(name).read_bytes())
    with pytest.raises(StudyError) as err:
        read_ct("s", tmp_path / "two")
    assert err.value.kind == "geometry" and "2 image(s)" in err.value.message
    frames = dicom_read._frames("s", Path(name), pydicom.dcmread(name, stop_before_pixels=True))
    assert [list(map(float, f.ds.ImagePositionPatient)) for f in frames] == [[99.5, -301.5, -159.0],
                                                                            [99.5, -301.5, -149.0]]
    assert all(float(f.ds.RescaleIntercept) == -1024 and float(f.ds.PixelSpacing[0]) == 0.388672 for f in frames)

    ds = pydicom.dcmread(name)
    pixels = ds.pixel_array
    extra = [pydicom.dcmread(name).PerFrameFunctionalGroupsSequence[i] for i in (0, 1)]
    extra[0].PlanePositionSequence[0].ImagePositionPatient = [99.5, -301.5, -169.0]
    extra[1].PlanePositionSequence[0].ImagePositionPatient = [99.5, -301.5, -179.0]
    ds.PerFrameFunctionalGroupsSequence.extend(extra)
    ds.NumberOfFrames, ds.PixelData = 4, ds.PixelData * 2
    (tmp_path / "four").mkdir()
    ds.save_as(tmp_path / "four" / "e.dcm")
    image = read_ct("s", tmp_path / "four")
    # normal = row x col = (-1,0,0) x (0,1,0) = (0,0,-1): z -149, -159, -169, -179 in that order
    expected = np.stack([pixels[1], pixels[0], pixels[0], pixels[1]]).astype(np.float32) - 1024
    assert np.array_equal(sitk.GetArrayFromImage(image), expected)
    assert np.allclose(image.GetOrigin(), (99.5, -301.5, -149.0))
    assert np.allclose(image.GetSpacing(), (0.388672, 0.388672, 10.0))
    assert np.allclose(image.GetDirection(), (-1, 0, 0, 0, 1, 0, 0, 0, -1))
    as_file = read_ct("s", tmp_path / "four" / "e.dcm")  # the file itself: read as DICOM, not through ITK's reader
    assert np.array_equal(sitk.GetArrayFromImage(as_file), expected) and as_file.GetOrigin() == image.GetOrigin()


@pytest.mark.parametrize("name,syntax", [("JPEG-lossy.dcm", "1.2.840.10008.1.2.4.51"),
                                         ("emri_small_jpeg_2k_lossless.dcm", "1.2.840.10008.1.2.4.90")])
def test_undecodable_pixel_data_is_a_read_error_naming_file_and_syntax(tmp_path, name, syntax):
    """JPEG-lossy.dcm: a 12-bit stream no plugin decodes. The J2K file is cut short by 8 bytes, as pydicom-data's
    emri_small_jpeg_2k_lossless_too_short.dcm is (that file itself has no functional groups to make it a volume)."""
    if name.startswith("emri"):
        folder = enhanced_from(name, tmp_path / "ct")
        with open(folder / "enhanced.dcm", "r+b") as handle:
            handle.truncate(handle.seek(0, 2) - 8)
    else:
        folder = series_from(name, tmp_path / "ct")
    with pytest.raises(StudyError) as err:
        read_ct("s", folder)
    assert err.value.kind == "read_error" and syntax in err.value.message and UID(syntax).name in err.value.message
    assert ".dcm" in err.value.message


def test_transfer_syntax_without_decoder_is_a_read_error(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video: pydicom has no decoder for it
    with pytest.raises(StudyError) as err:
        read_ct("s", series_from(ds, tmp_path / "ct"))
    assert err.value.kind == "read_error" and "MPEG2 Main Profile / Main Level (1.2.840.10008.1.2.4.100)" in \
        err.value.message
    assert "0.dcm" in err.value.message


def test_truncated_file_is_a_read_error_naming_it(tmp_path):
    folder = series_from("MR_small.dcm", tmp_path / "ct")
    truncated = pydicom.dcmread(get_testdata_file("MR_truncated.dcm"))
    truncated.SeriesInstanceUID = pydicom.dcmread(folder / "0.dcm").SeriesInstanceUID
    truncated.Modality, truncated.ImagePositionPatient = "CT", pydicom.dcmread(folder / "2.dcm").ImagePositionPatient
    (folder / "2.dcm").unlink()
    truncated.save_as(folder / "truncated.dcm")
    with pytest.raises(StudyError) as err:
        read_ct("s", folder)
    assert err.value.kind == "read_error" and "truncated.dcm" in err.value.message


def test_rgb_secondary_capture_is_refused(tmp_path):
    with pytest.raises(StudyError) as err:  # as shipped (Modality OT): no CT series here, and it says what it found
        read_ct("s", series_from("SC_rgb.dcm", tmp_path / "ot", Modality="OT"))
    assert err.value.kind == "missing_modality" and "OT" in err.value.message
    with pytest.raises(StudyError) as err:  # labelled CT: still a colour image
        read_ct("s", series_from("SC_rgb.dcm", tmp_path / "ct"))
    assert err.value.kind == "read_error" and "colour" in err.value.message and "RGB" in err.value.message


def test_dicomdir_readme_and_non_dicom_files_beside_a_series(tmp_path):
    plain = read_ct("s", series_from("MR_small_RLE.dcm", tmp_path / "plain"))
    folder = series_from("MR_small_RLE.dcm", tmp_path / "cd")
    (folder / "DICOMDIR").write_bytes(Path(get_testdata_file("DICOMDIR")).read_bytes())
    (folder / "README.TXT").write_text("Patient CD\n")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (folder / "autorun.inf").write_text("[autorun]\n")
    assert np.array_equal(sitk.GetArrayFromImage(read_ct("s", folder)), sitk.GetArrayFromImage(plain))


def test_file_without_preamble_is_read(tmp_path):
    folder = series_from("MR_small.dcm", tmp_path / "ct")
    for path in folder.iterdir():  # an older export: the bare dataset, no 128-byte preamble, no 'DICM'
        ds = pydicom.dcmread(path)
        ds.preamble = None
        pydicom.dcmwrite(path, ds, enforce_file_format=False)
        assert path.read_bytes()[128:132] != b"DICM"
    assert np.array_equal(sitk.GetArrayFromImage(read_ct("s", folder)), np.stack([_stored("MR_small.dcm")] * 3))


@pytest.mark.parametrize("name", ["example4d.nii.gz", "functional.nii"])
def test_nibabel_4d_files_are_refused(name):
    with pytest.raises(StudyError) as err:
        read_ct("s", os.path.join(NIBABEL_DATA, name))
    assert err.value.kind == "geometry" and "4-D" in err.value.message


@pytest.mark.parametrize("name", ["anatomical.nii", "standard.nii.gz", "reoriented_anat_moved.nii"])
def test_nibabel_3d_files_read_with_nibabels_geometry(name):
    path = os.path.join(NIBABEL_DATA, name)
    reference = nib.load(path)
    image = read_ct("s", path)
    data = reference.get_fdata()
    assert image.GetSize() == data.shape
    assert np.allclose(sitk.GetArrayFromImage(image), data.transpose(2, 1, 0))  # ITK arrays are (z, y, x)
    lps_from_ras = np.diag([-1.0, -1.0, 1.0])  # nibabel's affine is RAS+, ITK's physical space LPS+
    for index in [(0, 0, 0), tuple(s - 1 for s in data.shape), (1, 2, 3)]:
        ras = reference.affine @ np.array([*index, 1.0])
        assert np.allclose(image.TransformIndexToPhysicalPoint(index), lps_from_ras @ ras[:3], atol=1e-4)
