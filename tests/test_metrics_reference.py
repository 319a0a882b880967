"""Our metrics against the references on 200 seeded random cases, to 1e-6.

- Lesion numbers against an independent re-implementation of the autoPET challenge scorer, written here to mirror
  its definitions (lab-midas/autoPET `val_script.py`; lesion-free rule of ClinicalDataScience/autoPETIII
  `evaluation-metrics/evaluation_metrics.py`): scipy's `ndimage.label` with an explicitly built 18-neighbourhood
  instead of cc3d, and the scorer's loop over components instead of our bincounts.
- Per-class Dice and its fold aggregation against real `monai.metrics.DiceMetric`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from swinssl.eval.metrics import aggregate, dice_per_class, lesion_metrics, mean_dice
from swinssl.eval.summary import fold_metrics

CASES = 200
SPACINGS = [(3.0, 4.07, 4.07), (2.0, 2.04, 2.04), (1.0, 1.0, 1.0), (5.0, 0.97, 1.5)]
TOL = 1e-6

# The 18-neighbourhood written out: offsets with at most two non-zero coordinates (faces and edges, no corners).
STRUCTURE_18 = np.array([[[abs(dz) + abs(dy) + abs(dx) <= 2 for dx in (-1, 0, 1)] for dy in (-1, 0, 1)]
                         for dz in (-1, 0, 1)])
STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


def test_the_written_out_neighbourhood_is_18() -> None:
    assert STRUCTURE_18.sum() == 19  # the centre and its 18 neighbours
    assert not STRUCTURE_18[0, 0, 0] and STRUCTURE_18[0, 1, 0] and STRUCTURE_18[1, 1, 0]


# ----------------------------------------------------------------------------- random cases


def _blobs(rng: np.random.Generator, shape: tuple[int, ...], count: int) -> np.ndarray:
    """`count` random ellipsoids (radii 0.5-4 voxels) plus sparse single voxels, whose chance contacts give face,
    edge and corner adjacencies."""
    zz, yy, xx = np.indices(shape)
    mask = np.zeros(shape, dtype=bool)
    for _ in range(count):
        centre = rng.uniform(0, shape)
        radii = rng.uniform(0.5, 4.0, size=3)
        mask |= ((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2 + (
            (xx - centre[2]) / radii[2]) ** 2 <= 1.0
    return mask | (rng.random(shape) < 0.004)


def _perturbed(rng: np.random.Generator, truth: np.ndarray) -> np.ndarray:
    """A prediction: the truth shifted by up to a voxel, with some regions removed and some spurious blobs added."""
    shift = tuple(int(s) for s in rng.integers(-1, 2, size=3))
    pred = np.roll(truth, shift, axis=(0, 1, 2)) & ~_blobs(rng, truth.shape, int(rng.integers(0, 4)))
    return pred | _blobs(rng, truth.shape, int(rng.integers(0, 4)))


def _case(i: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Case i: (pred, truth, spacing_zyx). Every tenth truth is lesion-free, every tenth prediction empty, and every
    tenth case both."""
    rng = np.random.default_rng(1000 + i)
    shape = tuple(int(s) for s in rng.integers(8, 22, size=3))
    truth = _blobs(rng, shape, int(rng.integers(1, 7)))
    pred = _perturbed(rng, truth)
    if i % 10 in (0, 2):
        truth = np.zeros(shape, dtype=bool)
    if i % 10 in (1, 2):
        pred = np.zeros(shape, dtype=bool)
    return pred, truth, SPACINGS[i % len(SPACINGS)]


# ----------------------------------------------------------------------------- the scorer, independently


def _scorer(pred: np.ndarray, truth: np.ndarray, spacing_zyx, structure=STRUCTURE_18) -> dict:
    """The autoPET scorer's per-case numbers, component by component as its `false_pos_pix` / `false_neg_pix` loop."""
    voxel_ml = spacing_zyx[0] * spacing_zyx[1] * spacing_zyx[2] / 1000
    pred_cc, n_pred = ndimage.label(pred, structure=structure)
    truth_cc, n_truth = ndimage.label(truth, structure=structure)
    fp_voxels = fn_voxels = fp = fn = 0
    for idx in range(1, n_pred + 1):
        component = pred_cc == idx
        if (component * truth).sum() == 0:
            fp, fp_voxels = fp + 1, fp_voxels + component.sum()
    for idx in range(1, n_truth + 1):
        component = truth_cc == idx
        if (component * pred).sum() == 0:
            fn, fn_voxels = fn + 1, fn_voxels + component.sum()
    lesion_free = truth.sum() == 0
    return {
        "tp": n_truth - fn, "fn": fn, "fp": fp, "truth_count": n_truth, "pred_count": n_pred,
        "fp_volume_ml": fp_voxels * voxel_ml,
        "fn_volume_ml": math.nan if lesion_free else fn_voxels * voxel_ml,
        "lesion_dice": math.nan if lesion_free else 2 * (pred & truth).sum() / (pred.sum() + truth.sum()),
    }


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= TOL


@pytest.fixture(scope="module")
def lesion_cases() -> list[tuple[dict, dict]]:
    """(ours, the reference) for every random case."""
    out = []
    for i in range(CASES):
        pred, truth, spacing = _case(i)
        out.append((lesion_metrics(pred, truth, spacing), _scorer(pred, truth, spacing)))
    return out


def test_lesion_metrics_equal_the_scorer_on_random_cases(lesion_cases) -> None:
    for i, (ours, ref) in enumerate(lesion_cases):
        assert set(ours) == set(ref)
        bad = {k: (ours[k], ref[k]) for k in ref if not _same(float(ours[k]), float(ref[k]))}
        assert not bad, f"case {i}: {bad}"
    # the cases exercise every rule: lesion-free truths, empty predictions, misses, false positives
    rows = [ref for _, ref in lesion_cases]
    assert sum(math.isnan(r["fn_volume_ml"]) for r in rows) == 2 * CASES // 10
    assert sum(r["pred_count"] == 0 for r in rows) >= 2 * CASES // 10
    assert sum(r["fn"] > 0 for r in rows) > CASES // 4 and sum(r["fp"] > 0 for r in rows) > CASES // 2
    assert sum(r["tp"] > 0 and r["fn_volume_ml"] > 0 and r["fp_volume_ml"] > 0 for r in rows) > CASES // 4
    lesion_free_fp = [r["fp_volume_ml"] for r in rows[::10]]  # lesion-free truth, a prediction: FP volume counts
    assert all(v > 0 for v in lesion_free_fp)


def test_random_cases_tell_18_from_26_connectivity() -> None:
    """The comparison above would catch 26-connected components: on many of the cases the two differ."""
    differ = 0
    for i in range(0, CASES, 4):
        pred, truth, spacing = _case(i)
        differ += _scorer(pred, truth, spacing, STRUCTURE_26) != _scorer(pred, truth, spacing)
    assert differ >= CASES // 20


def test_fold_values_are_the_per_case_means(lesion_cases) -> None:
    """Per fold: volumes and lesion Dice the mean over cases, NaN skipped (the scorer's pandas mean); counts summed."""
    for fold in range(4):
        members = lesion_cases[fold::4]
        got = fold_metrics([{"lesion": ours} for ours, _ in members])["lesion"]
        refs = [ref for _, ref in members]
        for key in ("fp_volume_ml", "fn_volume_ml", "lesion_dice"):
            values = np.array([r[key] for r in refs], dtype=float)
            assert got[key] == pytest.approx(float(np.nanmean(values)), abs=TOL)
            assert got[key] != pytest.approx(float(np.nansum(values)), abs=TOL)  # not the fold's sum
        for key in ("tp", "fn", "fp", "truth_count", "pred_count"):
            assert got[key] == sum(r[key] for r in refs)


def test_18_not_26_connectivity_on_corner_touching_voxels() -> None:
    """Two voxels sharing only a corner are two lesions for autoPET (18-connected), one at 26."""
    truth = np.zeros((3, 3, 3), dtype=bool)
    truth[0, 0, 0] = truth[1, 1, 1] = True
    pred = np.zeros_like(truth)
    pred[0, 0, 0] = True
    spacing = (3.0, 4.0, 4.0)  # 0.048 mL per voxel
    ours = lesion_metrics(pred, truth, spacing)
    assert ours == _scorer(pred, truth, spacing) != _scorer(pred, truth, spacing, STRUCTURE_26)
    assert (ours["truth_count"], ours["fn"]) == (2, 1) and ours["fn_volume_ml"] == pytest.approx(0.048)
    # the same on the prediction side: the corner-joined voxel is a false positive of its own
    ours = lesion_metrics(truth, pred, spacing)
    assert (ours["pred_count"], ours["fp"]) == (2, 1) and ours["fp_volume_ml"] == pytest.approx(0.048)
    assert _scorer(truth, pred, spacing, STRUCTURE_26)["fp_volume_ml"] == 0.0


# ----------------------------------------------------------------------------- per-class Dice vs MONAI

K = 5  # background + 4 classes


def _label_case(i: int) -> tuple[np.ndarray, np.ndarray]:
    """(pred, truth) label volumes with K classes; each class is absent from the truth in about a quarter of the
    cases (sometimes still predicted), and sometimes not predicted at all."""
    rng = np.random.default_rng(5000 + i)
    shape = tuple(int(s) for s in rng.integers(8, 20, size=3))
    truth = np.zeros(shape, dtype=np.int64)
    pred = np.zeros(shape, dtype=np.int64)
    for c in range(1, K):
        mask = _blobs(rng, shape, int(rng.integers(1, 4)))
        guess = _perturbed(rng, mask) if rng.random() > 0.15 else np.zeros(shape, dtype=bool)
        if rng.random() < 0.25:
            mask[:] = False
        truth[mask] = c
        pred[guess] = c
    return pred, truth


def test_dice_per_class_and_aggregation_equal_monai() -> None:
    from monai.metrics import DiceMetric
    from monai.metrics.utils import do_metric_reduction

    metric = DiceMetric(include_background=False, reduction="mean_batch", get_not_nans=True, ignore_empty=True,
                        num_classes=K)
    ours = []
    for i in range(CASES):
        pred, truth = _label_case(i)
        ours.append(dice_per_class(pred, truth, K))
        metric(torch.from_numpy(pred)[None, None], torch.from_numpy(truth)[None, None])
    per_case = metric.get_buffer().double().numpy()  # (cases, K - 1), NaN where the truth lacks the class
    assert per_case.shape == (CASES, K - 1)
    for i, d in enumerate(ours):
        assert sorted(d) == list(range(1, K))
        assert all(_same(d[c], float(per_case[i, c - 1])) for c in d), f"case {i}: {d} vs {per_case[i]}"
        study, valid = do_metric_reduction(metric.get_buffer()[i:i + 1].clone(), "mean")
        assert _same(mean_dice(d), float(study) if valid.item() else math.nan)
    assert np.isnan(per_case).sum() > CASES // 4  # the empty rule is exercised
    spurious = [(pred == c).any() and not (truth == c).any() for pred, truth in map(_label_case, range(40))
                for c in range(1, K)]
    assert sum(spurious) > 3  # predicted-only classes occur (NaN with ignore_empty=True, not 0)

    per_class, not_nans = metric.aggregate()  # mean_batch: per class over the cases where it is not NaN
    agg = aggregate(ours)
    for c in range(1, K):
        assert agg["count"][c] == int(not_nans[c - 1]) > 0
        assert agg["per_class"][c] == pytest.approx(float(per_class[c - 1]), abs=TOL)
    assert agg["dice_mean"] == pytest.approx(float(per_class.double().mean()), abs=TOL)  # mean over classes
    overall, _ = metric.aggregate("mean")  # MONAI's other reduction, per case first: a different number
    assert abs(agg["dice_mean"] - float(overall)) > TOL


def test_class_absent_from_every_study_is_nan_where_monai_writes_zero() -> None:
    from monai.metrics import DiceMetric

    metric = DiceMetric(include_background=False, reduction="mean_batch", get_not_nans=True, num_classes=3)
    ours = []
    for pred, truth in map(_label_case, range(3)):
        pred, truth = np.where(pred > 2, 0, pred), np.where(truth > 2, 0, truth)
        truth[truth == 2] = 0  # class 2 never in the truth (still predicted)
        ours.append(dice_per_class(pred, truth, 3))
        metric(torch.from_numpy(pred)[None, None], torch.from_numpy(truth)[None, None])
    per_class, not_nans = metric.aggregate()
    agg = aggregate(ours)
    assert float(per_class[1]) == 0.0 and int(not_nans[1]) == 0  # MONAI: 0.0 with a count of 0
    assert math.isnan(agg["per_class"][2]) and agg["count"][2] == 0  # ours: NaN, so it is not counted
    assert agg["dice_mean"] == pytest.approx(float(per_class[0]), abs=TOL)


def test_dice_family_and_lesion_dice_agree_on_the_lesion_class(lesion_cases) -> None:
    """Both references leave a lesion-free case out of Dice: the lesion class's Dice is the scorer's lesion Dice."""
    for i in range(0, CASES, 5):
        pred, truth, _ = _case(i)
        dice = dice_per_class(pred.astype(np.uint8), truth.astype(np.uint8), 2)[1]
        assert _same(dice, lesion_cases[i][0]["lesion_dice"])
