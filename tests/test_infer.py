"""Inference and evaluation outputs: body box, body-cropped sliding window, NIfTI geometry, PNGs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from petct.labels import PSMA, LabelSet
from petct.shards import PreparedStudy
from swinssl.eval.infer import body_box, predict_volume, save_prediction
from swinssl.eval.plots import CLASS_COLOURS, _axial_index, _series_matrix, class_palette, dice_bar_chart, overlay_png

FOREGROUND = [PSMA.name(c) for c in PSMA.foreground]

SHAPE = (40, 48, 56)
BODY = (slice(5, 35), slice(14, 34), slice(10, 46))  # CT 0.6 inside, air (< 0.3) outside
LEVELS = 11  # PET takes exactly the values (k - 1) / 10, k = 1..11: the pointwise model's class centres


def _image(shape=SHAPE, body=BODY, seed: int = 0) -> np.ndarray:
    """(2, Z, Y, X) float32: CT air noise in [0, 0.25] with a 0.6 body block; PET random class levels everywhere."""
    rng = np.random.default_rng(seed)
    ct = rng.uniform(0.0, 0.25, shape).astype(np.float32)
    ct[body] = 0.6
    pet = (rng.integers(0, LEVELS, shape) / 10).astype(np.float32)
    return np.stack([ct, pet])


class PointwiseLogits(nn.Module):
    """A deterministic per-voxel "network": background where CT <= 0.3, else class 1 + round(10 * PET).

    Background logit 100 * (0.3 - ct) + 0.5 is >= 0.5 on air, <= -29.5 on body; foreground logit k is
    -|10 * pet - (k - 1)|, 0 for the voxel's own class, <= -1 for the others. Margins of >= 0.5 make the argmax
    immune to the rounding of window blending, so any two correct inferences must agree bit for bit.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ct, pet = x[:, :1], x[:, 1:2]
        centres = torch.arange(LEVELS, dtype=x.dtype, device=x.device).view(1, -1, 1, 1, 1)
        return torch.cat([100 * (0.3 - ct) + 0.5, -(10 * pet - centres).abs()], dim=1)


def _study(label: np.ndarray | None, shape=SHAPE) -> PreparedStudy:
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # rotated in-plane: not the identity
    return PreparedStudy("s1", "labeled", 0, _image(shape), label, (4.07, 4.07, 3.0), (-341.5, 12.25, -880.0),
                         direction)


def _label() -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[8:30, 16:30, 12:26] = PSMA.value("liver")
    label[20:26, 20:28, 30:40] = PSMA.value("kidneys")
    label[10:14, 18:22, 34:38] = PSMA.lesion
    label[27:33, 24:29, 20:25] = PSMA.lesion  # the larger lesion: the axial slice goes through it
    return label


def test_body_box_bounds_margin_clamp_and_empty():
    image = _image()
    assert body_box(image, margin=0) == BODY
    assert body_box(image) == (slice(1, 39), slice(10, 38), slice(6, 50))
    assert body_box(image, margin=10) == (slice(0, 40), slice(4, 44), slice(0, 56))  # clamped to the volume
    assert body_box(torch.from_numpy(image)) == body_box(image)
    assert body_box(np.zeros((2, *SHAPE), np.float32)) == tuple(slice(0, n) for n in SHAPE)
    with pytest.raises(ValueError):
        body_box(image[0])


@pytest.mark.parametrize("shape", [SHAPE, (20, 48, 56)])  # the second is shorter than the roi on z: MONAI pads
@pytest.mark.parametrize("mode,sw_batch_size", [("gaussian", 4), ("constant", 1)])
def test_body_crop_is_exact_for_a_model_that_predicts_background_on_air(shape, mode, sw_batch_size):
    body = (slice(3, 17), *BODY[1:]) if shape[0] < 32 else BODY
    image = torch.from_numpy(_image(shape, body))
    model = PointwiseLogits()
    expected = model(image[None])[0].argmax(0).to(torch.uint8).numpy()
    kwargs = {"roi": (32, 32, 32), "num_classes": 12, "sw_batch_size": sw_batch_size, "mode": mode}
    cropped = predict_volume(model, image, crop_to_body=True, **kwargs)
    full = predict_volume(model, image, crop_to_body=False, **kwargs)
    assert cropped.shape == shape and cropped.dtype == np.uint8
    assert len(np.unique(cropped)) == 12  # every class occurs: the check is not vacuous
    np.testing.assert_array_equal(full, expected)
    np.testing.assert_array_equal(cropped, expected)


def test_predict_volume_swinunetr_shape_dtype_range_and_mode_restored():
    from monai.networks.nets import SwinUNETR

    # roi 64, not 32: at 32^3 MONAI SwinUNETR's bottleneck is one voxel, which its InstanceNorm rejects even in eval.
    # z and y are shorter than 64, so MONAI pads them; the body box is x 6..50, grown to the roi: x 0..64.
    torch.manual_seed(0)
    model = SwinUNETR(in_channels=2, out_channels=12, feature_size=12).train()
    shape = (40, 48, 120)
    image = torch.from_numpy(_image(shape))
    pred = predict_volume(model, image, (64, 64, 64), 12)
    assert pred.shape == shape and pred.dtype == np.uint8
    assert pred.min() >= 0 and pred.max() < 12
    assert pred[..., :64].any() and not pred[..., 64:].any()  # outside the (grown) box: background by construction
    assert model.training  # the caller's mode is restored
    with pytest.raises(ValueError, match="channels"):
        predict_volume(PointwiseLogits(), image, (64, 64, 64), num_classes=5)


def test_save_prediction_round_trip_geometry_and_values(tmp_path):
    study = _study(_label())
    pred = np.random.default_rng(1).integers(0, 12, SHAPE).astype(np.uint8)
    path = save_prediction(study, pred, tmp_path / "out" / "s1_pred.nii.gz")
    assert path == tmp_path / "out" / "s1_pred.nii.gz"
    assert [p.name for p in path.parent.iterdir()] == ["s1_pred.nii.gz"]  # no temp file left behind
    back = sitk.ReadImage(str(path))
    reference = study.to_sitk(pred)
    assert back.GetPixelID() == sitk.sitkUInt8
    assert back.GetSize() == reference.GetSize() == SHAPE[::-1]
    np.testing.assert_allclose(back.GetSpacing(), study.spacing, rtol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), study.origin, atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), study.direction, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), pred)
    save_prediction(study, np.zeros(SHAPE, np.uint8), path)  # overwrite in place
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(path))).any()
    with pytest.raises(ValueError):
        save_prediction(study, pred[:-1], path)


@pytest.mark.parametrize("labelled", [True, False])
def test_overlay_png_is_a_real_image(tmp_path, labelled):
    label = _label()
    study = _study(label if labelled else None)
    pred = label.copy()
    pred[8:12] = 0  # some disagreement
    path = overlay_png(study, pred, tmp_path / "png" / "overlay.png", PSMA, title="s1: truth vs prediction")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_overlay_of_another_label_set_uses_its_classes_and_palette(tmp_path):
    two = LabelSet(("background", "lesion"), lesion=1)
    label = (_label() == PSMA.lesion).astype(np.uint8)
    assert _axial_index(label, label, 0, two) == (29, "largest lesion")  # z 27..32 of the larger lesion: median 29.5
    organs = LabelSet(("background", "spleen", "kidney"))  # no lesion, no liver: the first class present
    assert _axial_index(np.where(label > 0, 2, 0), label * 0, 5, organs)[1] == "kidney"
    assert _axial_index(None, label * 0, 5, organs) == (5, "body centre")
    path = overlay_png(_study(label), label, tmp_path / "two.png", two)
    assert path.stat().st_size > 10_000
    assert class_palette(PSMA) == CLASS_COLOURS
    many = class_palette(LabelSet(tuple(f"c{i}" for i in range(20))))
    assert len(many) == 20 and len(set(many[1:])) == 19  # distinct colours for any number of classes
    assert class_palette(two)[1] == "#ff1a1a"  # the lesion is red in every set


def test_dice_bar_chart_series_and_nan(tmp_path):
    single = {PSMA.name(c): (math.nan if c in (3, 5) else c / 12) for c in range(1, 12)}
    path = dice_bar_chart(single, tmp_path / "single.png", FOREGROUND, title="one study")
    assert path.stat().st_size > 10_000
    series = {"scratch": single, "pretrained": {"lacrimal_glands": 0.9, "liver": 0.95, "lesion": None},
              "empty": {"parotid_glands": math.nan}}
    path = dice_bar_chart(series, tmp_path / "grouped.png", FOREGROUND, title="scratch vs pretrained")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000

    names, matrix = _series_matrix(series, FOREGROUND)
    assert names == ["scratch", "pretrained", "empty"] and matrix.shape == (3, 11)
    assert np.isnan(matrix[0, [2, 4]]).all() and matrix[0, 0] == pytest.approx(1 / 12)
    assert matrix[1, 0] == 0.9 and matrix[1, 7] == 0.95 and np.isnan(matrix[1, [1, 10]]).all()  # NaN and absent
    assert np.isnan(matrix[2]).all()
    with pytest.raises(ValueError, match="background"):
        _series_matrix({"background": 0.5}, FOREGROUND)  # background is never scored


def test_channels_last_3d_keeps_the_function():
    """The CUDA-only weight layout change (run here on CPU) must not change what the model computes."""
    from swinssl.eval.infer import _channels_last_3d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.InstanceNorm3d(4), nn.Conv3d(4, 12, 1)).eval()
    x = torch.rand(1, 2, 8, 8, 8)
    expected = model(x)
    _channels_last_3d(model)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last_3d)), expected)
