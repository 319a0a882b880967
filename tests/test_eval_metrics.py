"""Hand-counted cases for swinssl.eval.metrics: Dice empty rules, aggregation, lesion detection (the comparison with
MONAI and an independent autoPET-scorer implementation on random masks is tests/test_metrics_reference.py)."""

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
    pred[1, 1, 1] = 3  # class 3 predicted only -> NaN (MONAI ignore_empty=True: no truth, not scored)
    truth[1, 2, 0:3] = 4  # class 4 perfect (3 voxels) -> 1
    pred[1, 2, 0:3] = 4
    d = dice_per_class(pred, truth, num_classes=5)
    assert d[2] == 0.0
    assert math.isnan(d[3])
    assert d[4] == 1.0
    assert math.isnan(d[1])  # absent in both
    # mean skips the NaN classes: (0 + 1) / 2, neither / 4 nor with a free 1.0 for the absent classes
    assert mean_dice(d) == pytest.approx(1 / 2)


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
    truth = np.zeros((4, 4, 4), dtype=bool)
    truth[0, 0, 0] = True
    truth[1, 1, 1] = True  # corner-touching only: one lesion at 26-, two at 6- and 18-connectivity
    truth[3, 3, 0] = truth[3, 2, 1] = True  # edge-touching: one lesion at 18- and 26-, two at 6-connectivity
    pred = np.zeros_like(truth)
    pred[0, 0, 0] = pred[3, 3, 0] = True
    m26 = lesion_metrics(pred, truth, spacing_zyx=(3.0, 4.0, 4.0), connectivity=26)
    m6 = lesion_metrics(pred, truth, spacing_zyx=(3.0, 4.0, 4.0), connectivity=6)
    m18 = lesion_metrics(pred, truth, spacing_zyx=(3.0, 4.0, 4.0), connectivity=18)
    assert (m26["truth_count"], m26["tp"], m26["fn"]) == (2, 2, 0)  # (0,0,0)-(1,1,1) corner-joined; the edge pair
    assert m26["fn_volume_ml"] == 0.0
    assert (m6["truth_count"], m6["tp"], m6["fn"]) == (4, 2, 2)
    assert m6["fn_volume_ml"] == pytest.approx(2 * 0.048)  # two voxels of 3*4*4 mm^3
    assert (m18["truth_count"], m18["tp"], m18["fn"]) == (3, 2, 1)  # only the corner voxel is its own lesion
    assert m18["fn_volume_ml"] == pytest.approx(0.048)
    assert lesion_metrics(pred, truth, spacing_zyx=(3.0, 4.0, 4.0)) == m18  # the default is autoPET's 18


def test_lesion_default_is_18_connected_predicted_only() -> None:
    pred = np.zeros((2, 2, 2), dtype=bool)
    pred[0, 0, 0] = pred[1, 1, 1] = True  # corner-touching: two false-positive components at 18-connectivity
    m = lesion_metrics(pred, np.zeros_like(pred), spacing_zyx=(1.0, 1.0, 1.0))
    assert m["pred_count"] == 2 and m["fp"] == 2
    assert m["fp_volume_ml"] == pytest.approx(0.002)  # lesion-free case: only the FP volume is scored
    assert math.isnan(m["lesion_dice"]) and math.isnan(m["fn_volume_ml"])  # autoPET III: NaN without a truth lesion


def test_lesion_both_empty() -> None:
    empty = np.zeros((2, 3, 3), dtype=bool)
    m = lesion_metrics(empty, empty, spacing_zyx=(3.0, 4.07, 4.07))
    assert (m["tp"], m["fn"], m["fp"], m["truth_count"], m["pred_count"]) == (0, 0, 0, 0, 0)
    assert m["fp_volume_ml"] == 0.0
    assert math.isnan(m["fn_volume_ml"]) and math.isnan(m["lesion_dice"])


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
        lesion_metrics(a, a, (1.0, 1.0, 1.0), connectivity=2)  # scipy's rank, not a voxel count


# ----------------------------------------------------------------------------- metric families


def _hd95_scipy(a: np.ndarray, b: np.ndarray, spacing_zyx: tuple[float, float, float]) -> float:
    """Independent HD95: surfaces as mask minus its 6-connected erosion, exact Euclidean distance transforms (mm),
    the larger of the two directed 95th percentiles."""
    from scipy import ndimage

    def edges(mask: np.ndarray) -> np.ndarray:
        return mask & ~ndimage.binary_erosion(mask)

    ea, eb = edges(a), edges(b)
    a_to_b = ndimage.distance_transform_edt(~eb, sampling=spacing_zyx)[ea]
    b_to_a = ndimage.distance_transform_edt(~ea, sampling=spacing_zyx)[eb]
    return float(max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95)))


def _two_studies() -> list[tuple[np.ndarray, np.ndarray]]:
    truth, pred = np.zeros((20, 24, 28), np.uint8), np.zeros((20, 24, 28), np.uint8)
    truth[3:12, 4:15, 5:20] = 1
    pred[5:14, 3:13, 8:22] = 1
    truth[14:18, 18:22, 2:6] = 2
    pred[13:18, 17:23, 3:9] = 2
    pred[1:3, 1:3, 1:3] = 2  # a far false positive: HD95 large, lesion fp = 1
    other_truth, other_pred = truth.copy(), truth.copy()
    other_truth[0:2, 0:2, 25:27] = 2  # missed lesion
    return [(pred, truth), (other_pred, other_truth)]


SPACING_XYZ = (2.0, 4.07, 3.0)


def test_hd95_equals_an_independent_recomputation() -> None:
    from swinssl.eval.metrics import hd95_per_class

    for pred, truth in _two_studies():
        hd = hd95_per_class(pred, truth, 4, SPACING_XYZ[::-1])
        for c in (1, 2):
            assert hd[c] == pytest.approx(_hd95_scipy(pred == c, truth == c, SPACING_XYZ[::-1]), rel=1e-5)
        assert math.isnan(hd[3])  # absent from both: not scored
    assert math.isnan(hd95_per_class(np.zeros((4, 4, 4), np.uint8), np.ones((4, 4, 4), np.uint8), 2, (1, 1, 1))[1])


def test_study_metrics_families_names_and_fold_aggregation() -> None:
    from petct.labels import LabelSet
    from swinssl.eval.families import study_metrics
    from swinssl.eval.summary import cv_summary, flat_metrics, fold_metrics

    labels = LabelSet(("background", "organ", "lesion", "spare"), lesion=2)
    rows = [study_metrics(p, t, SPACING_XYZ, labels, ["dice", "lesion", "hd95"]) for p, t in _two_studies()]
    assert list(rows[0]) == ["dice", "lesion", "hd95"]
    assert set(rows[0]["dice"]) == {"organ", "lesion", "spare", "mean"}
    per_class = dice_per_class(*_two_studies()[0], num_classes=4)
    assert rows[0]["dice"]["organ"] == per_class[1] and rows[0]["dice"]["mean"] == mean_dice(per_class)
    assert rows[0]["lesion"] == lesion_metrics(_two_studies()[0][0] == 2, _two_studies()[0][1] == 2, (3.0, 4.07, 2.0))

    fold = fold_metrics(rows)
    agg = aggregate([dice_per_class(p, t, 4) for p, t in _two_studies()])  # the pre-family aggregation
    assert fold["dice"]["organ"] == agg["per_class"][1] and fold["dice"]["mean"] == agg["dice_mean"]
    assert fold["lesion"]["fp"] == rows[0]["lesion"]["fp"] + rows[1]["lesion"]["fp"]  # counts: summed
    for key in ("fp_volume_ml", "fn_volume_ml", "lesion_dice"):  # volumes and Dice: the per-case mean (autoPET)
        assert fold["lesion"][key] == pytest.approx((rows[0]["lesion"][key] + rows[1]["lesion"][key]) / 2)
    assert fold["hd95"]["lesion"] == pytest.approx((rows[0]["hd95"]["lesion"] + rows[1]["hd95"]["lesion"]) / 2)

    flat = flat_metrics(cv_summary([fold, fold]))
    assert {"dice_mean", "dice/organ", "dice/lesion", "lesion/tp", "lesion/lesion_dice", "hd95_mean",
            "hd95/lesion"} <= set(flat)
    assert "dice/spare" not in flat  # NaN in every fold: not logged

    no_lesion = LabelSet(("background", "organ", "other"))
    assert list(study_metrics(*_two_studies()[0], SPACING_XYZ, no_lesion)) == ["dice"]  # lesion needs a class


def test_unknown_family_is_an_error_not_dropped() -> None:
    from swinssl.eval.summary import cv_summary, fold_metrics

    with pytest.raises(ValueError, match="'volume' is not registered"):
        fold_metrics([{"dice": {"a": 1.0, "mean": 1.0}, "volume": {"a": 3.0}}])
    with pytest.raises(ValueError, match="not registered"):
        cv_summary([{"volume": {"a": 3.0}}])


def test_psma_metric_names_are_unchanged() -> None:
    from petct.labels import PSMA
    from swinssl.eval.families import study_metrics
    from swinssl.eval.summary import cv_summary, flat_metrics, fold_metrics

    truth = np.zeros((8, 8, 8), np.uint8)
    for c in PSMA.foreground:
        truth[c % 8, c // 8::2, :] = c
    flat = flat_metrics(cv_summary([fold_metrics([study_metrics(truth, truth, (1, 1, 1), PSMA)])]))
    expected = {"dice_mean", *(f"dice/{PSMA.name(c)}" for c in PSMA.foreground),
                *(f"lesion/{k}" for k in ("tp", "fp", "fn", "truth_count", "pred_count", "fp_volume_ml",
                                          "fn_volume_ml", "lesion_dice"))}
    assert set(flat) == expected


def test_eval_metrics_are_checked_against_the_registry() -> None:
    from swinssl.config import EvalConfig, FinetuneConfig
    from swinssl.train.finetune import metric_problems

    assert EvalConfig().metrics == ["dice", "lesion"]  # HD95 is off by default
    cfg = FinetuneConfig()
    cfg.eval.metrics = ["dice", "hd95"]
    assert metric_problems(cfg) == []
    cfg.eval.metrics = ["dice", "hd96", "nsd"]
    (problem,) = metric_problems(cfg)
    assert problem.startswith("eval.metrics:") and "['hd96', 'nsd']" in problem and "hd95" in problem
