"""Hand-counted cases for swinssl.eval.metrics: Dice empty rules, aggregation, lesion detection."""

from __future__ import annotations

import math

import numpy as np
import pytest

from swinssl.eval.metrics import aggregate, dice_per_class, fold_summary, lesion_metrics, mean_dice


def _vol(shape: tuple[int, int, int] = (2, 4, 4)) -> np.ndarray:
    return np.zeros(shape, dtype=np.int64)


# ----------------------------------------------------------------------------- dice_per_class


def test_dice_half_overlap_by_hand() -> None:
    truth, pred = _vol(), _vol()
    truth[0, 0, 0:4] = 1  # 4 voxels of class 1
    pred[0, 0, 0:2] = 1  # 2 of them ...
    pred[1, 3, 2:4] = 1  # ... plus 2 elsewhere -> 2*2 / (4 + 4) = 0.5
    d = dice_per_class(pred, truth, num_classes=12)
    assert sorted(d) == list(range(1, 12))  # background never scored
    assert d[1] == pytest.approx(0.5)


def test_dice_empty_rules() -> None:
    truth, pred = _vol(), _vol()
    truth[0, 0, 0] = 2  # class 2 present in truth only -> 0
    pred[1, 1, 1] = 3  # class 3 predicted only -> 0 (false positive)
    truth[1, 2, 0:3] = 4  # class 4 perfect (3 voxels) -> 1
    pred[1, 2, 0:3] = 4
    d = dice_per_class(pred, truth, num_classes=5)
    assert d[2] == 0.0
    assert d[3] == 0.0
    assert d[4] == 1.0
    assert math.isnan(d[1])  # absent in both
    # mean skips the NaN class: (0 + 0 + 1) / 3, not / 4 and not with a free 1.0
    assert mean_dice(d) == pytest.approx(1 / 3)


def test_dice_perfect_and_class_count() -> None:
    truth = _vol()
    truth[0, :, 0] = 5
    truth[1, 0, :] = 11
    d = dice_per_class(truth.copy(), truth, num_classes=12)
    assert d[5] == 1.0 and d[11] == 1.0
    assert sum(not math.isnan(v) for v in d.values()) == 2
    assert mean_dice(d) == 1.0


def test_dice_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        dice_per_class(_vol((2, 4, 4)), _vol((2, 4, 3)))
    bad = _vol()
    bad[0, 0, 0] = 12
    with pytest.raises(ValueError, match="labels"):
        dice_per_class(bad, _vol(), num_classes=12)
    with pytest.raises(ValueError, match="integer"):
        dice_per_class(_vol().astype(np.float32), _vol())


def test_mean_dice_all_nan() -> None:
    assert math.isnan(mean_dice({1: math.nan, 2: math.nan}))
    assert math.isnan(mean_dice({}))
    assert math.isnan(mean_dice(dice_per_class(_vol(), _vol())))


# ----------------------------------------------------------------------------- aggregate / fold_summary


def test_aggregate_ignores_nan() -> None:
    studies = [
        {1: 0.5, 2: math.nan, 3: 1.0},
        {1: 1.0, 2: 0.2, 3: math.nan},
        {1: 0.0, 2: math.nan, 3: math.nan},
    ]
    agg = aggregate(studies)
    assert agg["per_class"][1] == pytest.approx(0.5)  # (0.5 + 1 + 0) / 3
    assert agg["per_class"][2] == pytest.approx(0.2)  # only study 2 counts
    assert agg["per_class"][3] == pytest.approx(1.0)  # only study 1 counts
    assert agg["count"] == {1: 3, 2: 1, 3: 1}
    assert agg["dice_mean"] == pytest.approx((0.5 + 0.2 + 1.0) / 3)
    assert agg["studies"] == 3


def test_aggregate_class_never_present() -> None:
    agg = aggregate([{1: 0.4, 2: math.nan}, {1: 0.6, 2: math.nan}])
    assert math.isnan(agg["per_class"][2]) and agg["count"][2] == 0
    assert agg["dice_mean"] == pytest.approx(0.5)  # the all-NaN class is not a 0
    with pytest.raises(ValueError):
        aggregate([])


def test_fold_summary_sample_std() -> None:
    s = fold_summary([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == pytest.approx(2.5)
    # sample variance: (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    assert s["std"] == pytest.approx(math.sqrt(5 / 3))
    assert fold_summary([0.7]) == {"mean": pytest.approx(0.7), "std": 0.0}
    s = fold_summary([0.2, math.nan, 0.4])
    assert s["mean"] == pytest.approx(0.3) and s["std"] == pytest.approx(math.sqrt(0.02))
    empty = fold_summary([])
    assert math.isnan(empty["mean"]) and math.isnan(empty["std"])


# ----------------------------------------------------------------------------- lesion_metrics


def _lesion_case() -> tuple[np.ndarray, np.ndarray]:
    """(Z, Y, X) = (4, 6, 6) masks: truth lesions A (2 voxels, hit) and B (3 voxels, missed),
    prediction: 1 voxel on A plus a 2-voxel spurious component far from both."""
    truth = np.zeros((4, 6, 6), dtype=bool)
    pred = np.zeros_like(truth)
    truth[0, 0, 0:2] = True  # lesion A, 2 voxels
    truth[3, 5, 3:6] = True  # lesion B, 3 voxels
    pred[0, 0, 1] = True  # hits A
    pred[2, 2, 0:2] = True  # spurious, 2 voxels, touches neither lesion (not even diagonally)
    return pred, truth


def test_lesion_counts_and_volumes_by_hand() -> None:
    pred, truth = _lesion_case()
    m = lesion_metrics(pred, truth, spacing_zyx=(2.0, 4.0, 4.0))  # 2*4*4 = 32 mm^3 = 0.032 mL
    assert m["truth_count"] == 2 and m["pred_count"] == 2
    assert m["tp"] == 1 and m["fn"] == 1 and m["fp"] == 1
    assert m["fn_volume_ml"] == pytest.approx(3 * 0.032)  # lesion B
    assert m["fp_volume_ml"] == pytest.approx(2 * 0.032)  # spurious component
    # voxel Dice: |P & T| = 1, |P| = 3, |T| = 5 -> 2 / 8
    assert m["lesion_dice"] == pytest.approx(0.25)
    assert isinstance(m["tp"], int) and isinstance(m["fp_volume_ml"], float)


def test_lesion_partially_overlapping_component_is_not_fp() -> None:
    truth = np.zeros((3, 3, 5), dtype=bool)
    pred = np.zeros_like(truth)
    truth[1, 1, 0] = True
    pred[1, 1, 0:5] = True  # one 5-voxel component overlapping the lesion: TP, no FP volume
    m = lesion_metrics(pred, truth, spacing_zyx=(1.0, 1.0, 1.0))
    assert (m["tp"], m["fn"], m["fp"]) == (1, 0, 0)
    assert m["fp_volume_ml"] == 0.0 and m["fn_volume_ml"] == 0.0
    assert m["lesion_dice"] == pytest.approx(2 * 1 / (1 + 5))


def test_lesion_diagonal_connectivity() -> None:
    truth = np.zeros((3, 3, 3), dtype=bool)
    truth[0, 0, 0] = True
    truth[1, 1, 1] = True  # corner-touching only: one lesion at 26-, two at 6- and 18-connectivity
    pred = np.zeros_like(truth)
    pred[0, 0, 0] = True
    m26 = lesion_metrics(pred, truth, spacing_zyx=(3.0, 4.0, 4.0), connectivity=3)
    m6 = lesion_metrics(pred, truth, spacing_zyx=(3.0, 4.0, 4.0), connectivity=1)
    m18 = lesion_metrics(pred, truth, spacing_zyx=(3.0, 4.0, 4.0), connectivity=2)
    assert (m26["truth_count"], m26["tp"], m26["fn"]) == (1, 1, 0)
    assert m26["fn_volume_ml"] == 0.0
    assert (m6["truth_count"], m6["tp"], m6["fn"]) == (2, 1, 1)
    assert m6["fn_volume_ml"] == pytest.approx(0.048)  # one voxel of 3*4*4 mm^3
    assert m18["truth_count"] == 2


def test_lesion_default_is_26_connected() -> None:
    pred = np.zeros((2, 2, 2), dtype=bool)
    pred[0, 0, 0] = pred[1, 1, 1] = True
    m = lesion_metrics(pred, np.zeros_like(pred), spacing_zyx=(1.0, 1.0, 1.0))
    assert m["pred_count"] == 1 and m["fp"] == 1
    assert m["fp_volume_ml"] == pytest.approx(0.002)
    assert m["lesion_dice"] == 0.0  # predicted only -> 0


def test_lesion_both_empty() -> None:
    empty = np.zeros((2, 3, 3), dtype=bool)
    m = lesion_metrics(empty, empty, spacing_zyx=(3.0, 4.07, 4.07))
    assert (m["tp"], m["fn"], m["fp"], m["truth_count"], m["pred_count"]) == (0, 0, 0, 0, 0)
    assert m["fp_volume_ml"] == 0.0 and m["fn_volume_ml"] == 0.0
    assert math.isnan(m["lesion_dice"])


def test_lesion_missed_entirely() -> None:
    truth = np.zeros((2, 3, 3), dtype=bool)
    truth[1, :, :] = True  # 9 voxels
    m = lesion_metrics(np.zeros_like(truth), truth, spacing_zyx=(2.0, 4.0, 4.0))
    assert (m["tp"], m["fn"], m["fp"]) == (0, 1, 0)
    assert m["fn_volume_ml"] == pytest.approx(9 * 0.032)
    assert m["lesion_dice"] == 0.0


def test_lesion_rejects_bad_input() -> None:
    a = np.zeros((2, 2, 2), dtype=bool)
    with pytest.raises(ValueError, match="shape"):
        lesion_metrics(a, np.zeros((2, 2, 3), dtype=bool), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="3-D"):
        lesion_metrics(a[0], a[0], (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        lesion_metrics(a, a, (0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="connectivity"):
        lesion_metrics(a, a, (1.0, 1.0, 1.0), connectivity=4)
