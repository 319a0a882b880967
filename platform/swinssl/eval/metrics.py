"""Segmentation metrics for one study and their aggregation over studies and folds, as the references compute them.

Arrays are label volumes in (z, y, x) order (the order of a NumPy array read from NIfTI/ITK with the slice axis
first); `spacing_zyx` is the voxel size in millimetres in that same order.

**Per-class Dice** (`dice_per_class`) is MONAI's `DiceMetric(include_background=False, ignore_empty=True,
num_classes=K)` on class-index volumes, value for value (tests/test_metrics_reference.py checks it against MONAI):

- class present in the truth -> 2 |P & T| / (|P| + |T|) (0.0 when not predicted at all);
- class absent from the truth -> NaN, *whether or not it is predicted* (MONAI's `ignore_empty=True`, its default,
  and the autoPET scorer's rule for the lesion class). A study without the class says nothing about how well the
  class is delineated, so it is not counted; a spurious lesion in a lesion-free study is scored by the
  false-positive volume instead.

Aggregation (`aggregate`, one fold's studies): per class, the mean over the studies where the class is not NaN,
which is `DiceMetric(reduction="mean_batch")` (where no study has the class MONAI writes 0.0 with `not_nans` = 0;
we write NaN, so the class is not counted anywhere). `dice_mean` is the mean over classes of those per-class
means (every class weighs the same, as in nnU-Net's foreground mean); it is *not* MONAI's `reduction="mean"`
(mean over classes per study, then over studies), which lets frequent classes dominate. `mean_dice` of one study
is the mean over its non-NaN classes (MONAI's per-study channel average).

**Lesion metrics** (`lesion_metrics`) are those of the autoPET challenge scorer (lab-midas/autoPET `val_script.py`;
the autoPET III scorer ClinicalDataScience/autoPETIII `evaluation-metrics/evaluation_metrics.py` adds the
lesion-free rule), per case:

- lesions are the connected components of each binary mask at 18-connectivity (faces and edges, not corners),
  computed with `cc3d.connected_components(mask, connectivity=18)` as the scorer does;
- false-positive volume: summed volume of the predicted components that touch no truth lesion voxel (0 when
  nothing is predicted); false-negative volume: summed volume of the truth components that touch no predicted
  voxel; in mL, voxel volume = prod(spacing_mm) / 1000;
- lesion Dice: voxel Dice of the two masks;
- **lesion-free truth**: Dice and false-negative volume are NaN (not counted; the autoPET III scorer returns
  `nan` for both), the false-positive volume counts as usual. So only the false-positive volume is scored on a
  lesion-free case, as in autoPET III.
- detection counts on the same 18-connected components: `tp`/`fn` truth lesions hit/missed, `fp` predicted
  components touching no truth lesion, `truth_count`, `pred_count`.

The scorer's cohort value is the mean over cases of each per-case number, NaN skipped (pandas `mean`); the fold
aggregation in `families` does the same (counts are summed). HD95 (`hd95_per_class`): per class, the 95th
percentile of the symmetric surface distance in mm (MONAI); NaN unless the class is in both truth and prediction.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import cc3d
import numpy as np

__all__ = ["dice_per_class", "mean_dice", "aggregate", "fold_summary", "lesion_metrics", "hd95_per_class",
           "nanmean", "CONNECTIVITY"]

CONNECTIVITY = 18
"""Lesion components as the autoPET scorer labels them: 18-connected (voxels sharing a face or an edge)."""


def _dice(intersection: int, truth_size: int, pred_size: int) -> float:
    """Dice from voxel counts with the module's empty rule (MONAI `ignore_empty=True`, autoPET III): NaN when the
    truth is empty, whatever was predicted."""
    if truth_size == 0:
        return math.nan
    return 2.0 * intersection / (truth_size + pred_size)


def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int | None = None) -> dict[int, float]:
    """Dice of each foreground class 1..num_classes-1 for one study.

    Args:
        pred: integer label volume, any shape (typically (Z, Y, X)), values in [0, num_classes).
        truth: integer label volume of the same shape and value range.
        num_classes: number of classes including background 0 (the label set's `num_classes`); None: the
            largest label present + 1 (at least 2).

    Returns:
        {class: dice} for classes 1..num_classes-1, each in [0, 1], or NaN where the class is absent from the
        truth (the module's empty rule, MONAI `DiceMetric(include_background=False, ignore_empty=True)`).
        Background is never scored.

    Raises:
        ValueError: shapes differ, non-integer arrays, or labels outside [0, num_classes).
    """
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"pred shape {pred.shape} != truth shape {truth.shape}")
    if num_classes is None:
        num_classes = max(2, int(max(pred.max(initial=0), truth.max(initial=0))) + 1)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    for name, arr in (("pred", pred), ("truth", truth)):
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
            raise ValueError(f"{name} must hold integer labels, got dtype {arr.dtype}")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= num_classes):
            raise ValueError(f"{name} labels must lie in [0, {num_classes}), got [{arr.min()}, {arr.max()}]")
    # One pass: confusion matrix counts[truth, pred].
    flat = truth.ravel().astype(np.int64) * num_classes + pred.ravel().astype(np.int64)
    confusion = np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    truth_sizes = confusion.sum(axis=1)
    pred_sizes = confusion.sum(axis=0)
    return {c: _dice(int(confusion[c, c]), int(truth_sizes[c]), int(pred_sizes[c])) for c in range(1, num_classes)}


def nanmean(values: Sequence[float]) -> float:
    """Mean of the non-NaN values (pandas' `Series.mean`, the autoPET scorer's cohort mean); NaN, without a
    RuntimeWarning, when there are none."""
    kept = [float(v) for v in values if not math.isnan(v)]
    return math.fsum(kept) / len(kept) if kept else math.nan


def mean_dice(per_class: dict[int, float]) -> float:
    """Mean over classes of a `dice_per_class` result, skipping NaN classes; NaN if all are NaN/empty."""
    return nanmean(list(per_class.values()))


def aggregate(per_study: list[dict[int, float]]) -> dict:
    """Combine per-study `dice_per_class` results (e.g. one fold's validation studies).

    Args:
        per_study: one {class: dice} dict per study; classes may differ between dicts.

    Returns:
        {
          "per_class": {class: mean over the studies where that class is not NaN (NaN if none)},
          "count": {class: number of studies that contributed a non-NaN value},
          "dice_mean": mean over classes of the non-NaN per-class means (NaN if none),
          "studies": len(per_study),
        }
        Classes are the sorted union of the keys. "per_class" and "count" are MONAI
        `DiceMetric(reduction="mean_batch", get_not_nans=True)`'s result and `not_nans` (NaN where MONAI writes 0.0
        for a count of 0). "dice_mean" weights every class equally, which differs from averaging `mean_dice` over
        studies (MONAI `reduction="mean"`).

    Raises:
        ValueError: `per_study` is empty.
    """
    if not per_study:
        raise ValueError("aggregate needs at least one study, got an empty list")
    classes = sorted({c for study in per_study for c in study})
    per_class: dict[int, float] = {}
    count: dict[int, int] = {}
    for c in classes:
        values = [study[c] for study in per_study if c in study and not math.isnan(study[c])]
        count[c] = len(values)
        per_class[c] = nanmean(values)
    return {
        "per_class": per_class,
        "count": count,
        "dice_mean": nanmean(list(per_class.values())),
        "studies": len(per_study),
    }


def fold_summary(values: list[float]) -> dict[str, float]:
    """Mean and spread of one score over cross-validation folds.

    NaN entries are skipped. `std` is the *sample* standard deviation (ddof=1) when at least two
    values remain, because the folds are a sample of possible splits; with exactly one value it is
    0.0 (no spread observable); with none both entries are NaN.

    Returns:
        {"mean": float, "std": float}
    """
    kept = np.asarray([float(v) for v in values if not math.isnan(float(v))], dtype=np.float64)
    if kept.size == 0:
        return {"mean": math.nan, "std": math.nan}
    std = float(kept.std(ddof=1)) if kept.size > 1 else 0.0
    return {"mean": float(kept.mean()), "std": std}


def lesion_metrics(
    pred_lesion: np.ndarray,
    truth_lesion: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    connectivity: int = CONNECTIVITY,
) -> dict:
    """The autoPET scorer's lesion numbers for one study (see the module docstring for the definitions and sources).

    Args:
        pred_lesion: (Z, Y, X) bool mask of voxels predicted as lesion (e.g. `pred == labels.lesion`).
        truth_lesion: (Z, Y, X) bool mask of truth lesion voxels, same shape.
        spacing_zyx: voxel size in mm in array order (z, y, x), e.g. (3.0, 4.07, 4.07).
        connectivity: cc3d neighbourhood of the components: 18 (faces + edges, the scorer's, default), 6 (faces)
            or 26 (faces + edges + corners); only for comparisons, reported numbers use 18.

    Returns:
        {
          "tp": truth components overlapping at least one predicted lesion voxel,
          "fn": truth components with no predicted lesion voxel,
          "fp": predicted components overlapping no truth lesion voxel,
          "fp_volume_ml": summed volume of those false-positive predicted components (mL; 0.0 if none),
          "fn_volume_ml": summed volume of the missed truth components (mL); NaN when the truth has no lesion,
          "truth_count": number of truth components (= tp + fn),
          "pred_count": number of predicted components,
          "lesion_dice": voxel Dice of the two masks; NaN when the truth has no lesion,
        }
        Counts are ints, the rest floats.

    Raises:
        ValueError: masks not 3-D or of different shapes, bad spacing or connectivity.
    """
    pred = np.asarray(pred_lesion).astype(bool, copy=False)
    truth = np.asarray(truth_lesion).astype(bool, copy=False)
    if pred.shape != truth.shape:
        raise ValueError(f"pred_lesion shape {pred.shape} != truth_lesion shape {truth.shape}")
    if pred.ndim != 3:
        raise ValueError(f"lesion masks must be 3-D (z, y, x), got {pred.ndim}-D")
    if len(spacing_zyx) != 3 or any(not (float(s) > 0) for s in spacing_zyx):
        raise ValueError(f"spacing_zyx must be three positive mm values, got {spacing_zyx}")
    if connectivity not in (6, 18, 26):
        raise ValueError(f"connectivity must be 6, 18 (autoPET's) or 26 voxels, got {connectivity}")

    voxel_ml = float(np.prod([float(s) for s in spacing_zyx])) / 1000.0
    overlap = pred & truth
    truth_sizes, truth_hit = _components(truth, overlap, connectivity)
    pred_sizes, pred_hit = _components(pred, overlap, connectivity)
    lesion_free = truth_sizes.size == 0
    return {
        "tp": int(truth_hit.sum()),
        "fn": int((~truth_hit).sum()),
        "fp": int((~pred_hit).sum()),
        "fp_volume_ml": float(pred_sizes[~pred_hit].sum()) * voxel_ml,
        "fn_volume_ml": math.nan if lesion_free else float(truth_sizes[~truth_hit].sum()) * voxel_ml,
        "truth_count": int(truth_sizes.size),
        "pred_count": int(pred_sizes.size),
        "lesion_dice": _dice(int(np.count_nonzero(overlap)), int(truth.sum()), int(pred.sum())),
    }


def _components(mask: np.ndarray, touched: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of `mask`: (voxel count of each, whether each contains a voxel of `touched`), in label
    order 1..N; two empty arrays when the mask is empty."""
    labels, count = cc3d.connected_components(mask, connectivity=connectivity, return_N=True)
    labels = labels.ravel()
    sizes = np.bincount(labels, minlength=count + 1)[1:]
    hit = np.zeros(count + 1, dtype=bool)
    hit[labels[touched.ravel()]] = True
    return sizes, hit[1:]


def hd95_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int,
                   spacing_zyx: tuple[float, float, float]) -> dict[int, float]:
    """95th-percentile Hausdorff distance (mm) of each foreground class 1..num_classes-1 for one study.

    MONAI `compute_hausdorff_distance(percentile=95, spacing=spacing_zyx)` on the class's binary masks: the larger
    of the two directed 95th percentiles of the surface-to-surface distances. NaN when the class is absent from
    truth or prediction (no finite distance exists; `dice_per_class` already scores that case 0 or NaN).

    Args:
        pred, truth: (Z, Y, X) integer label volumes of the same shape, values in [0, num_classes).
        num_classes: number of classes including background 0.
        spacing_zyx: voxel size in mm in array order (z, y, x).
    """
    import torch
    from monai.metrics import compute_hausdorff_distance

    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape or pred.ndim != 3:
        raise ValueError(f"pred {pred.shape} and truth {truth.shape} must be (Z, Y, X) volumes of the same shape")
    out: dict[int, float] = {}
    for c in range(1, num_classes):
        p, t = pred == c, truth == c
        if not (p.any() and t.any()):
            out[c] = math.nan
            continue
        with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal use of a deprecated argument
            warnings.simplefilter("ignore", FutureWarning)
            value = compute_hausdorff_distance(torch.from_numpy(p)[None, None], torch.from_numpy(t)[None, None],
                                               include_background=True, percentile=95,
                                               spacing=[float(s) for s in spacing_zyx])
        out[c] = float(value.reshape(-1)[0])
    return out
