"""Segmentation metrics for one study and their aggregation over studies and folds.

Arrays are label volumes in (z, y, x) order (the order of a NumPy array read from NIfTI/ITK with
the slice axis first); `spacing_zyx` is the voxel size in millimetres in that same order.

Empty-class rule of every Dice here (per class and lesion-wise):

- class absent in both truth and prediction -> NaN. The study carries no information about that
  class, so it is *not counted*: scoring it 1.0 would inflate the mean with free perfect scores,
  scoring it 0.0 would punish a correct "nothing here". NaNs are skipped by `mean_dice`,
  `aggregate` and `fold_summary`.
- class absent in truth but predicted -> 0.0 (false positives are penalised).
- class present in truth but absent from the prediction -> 0.0.

HD95 (`hd95_per_class`): per class, the 95th percentile of the symmetric surface distance in mm (MONAI); NaN
unless the class is present in both truth and prediction.

Lesion-wise detection follows the autoPET challenge: connected components of the truth and of
the predicted lesion masks (26-connected by default); a truth lesion is detected when any of its
voxels is predicted lesion; a predicted component is a false positive when it touches no truth
lesion voxel. Volumes are in mL: voxel volume = prod(spacing_mm) / 1000.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["dice_per_class", "mean_dice", "aggregate", "fold_summary", "lesion_metrics", "hd95_per_class"]


def _dice(intersection: int, truth_size: int, pred_size: int) -> float:
    """Dice from voxel counts with the module's empty rule: NaN when both are empty."""
    denom = truth_size + pred_size
    if denom == 0:
        return math.nan
    return 2.0 * intersection / denom


def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int | None = None) -> dict[int, float]:
    """Dice of each foreground class 1..num_classes-1 for one study.

    Args:
        pred: integer label volume, any shape (typically (Z, Y, X)), values in [0, num_classes).
        truth: integer label volume of the same shape and value range.
        num_classes: number of classes including background 0 (the label set's `num_classes`); None: the
            largest label present + 1 (at least 2).

    Returns:
        {class: dice} for classes 1..num_classes-1, each in [0, 1] or NaN (see the module's
        empty-class rule). Background is never scored.

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


def _nanmean(values: Sequence[float]) -> float:
    """Mean of the non-NaN values; NaN (without a RuntimeWarning) when there are none."""
    kept = [float(v) for v in values if not math.isnan(v)]
    return math.fsum(kept) / len(kept) if kept else math.nan


def mean_dice(per_class: dict[int, float]) -> float:
    """Mean over classes of a `dice_per_class` result, skipping NaN classes; NaN if all are NaN/empty."""
    return _nanmean(list(per_class.values()))


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
        Classes are the sorted union of the keys. Note "dice_mean" weights every class equally,
        which differs from averaging `mean_dice` over studies.

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
        per_class[c] = _nanmean(values)
    return {
        "per_class": per_class,
        "count": count,
        "dice_mean": _nanmean(list(per_class.values())),
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
    connectivity: int = 3,
) -> dict:
    """autoPET-style lesion-wise detection and false-positive/negative volumes for one study.

    Args:
        pred_lesion: (Z, Y, X) bool mask of voxels predicted as lesion (e.g. `pred == labels.lesion`).
        truth_lesion: (Z, Y, X) bool mask of truth lesion voxels, same shape.
        spacing_zyx: voxel size in mm in array order (z, y, x), e.g. (3.0, 4.07, 4.07).
        connectivity: neighbourhood of the connected components, as in
            `scipy.ndimage.generate_binary_structure(3, connectivity)`: 1 = 6-connected (faces),
            2 = 18-connected (faces + edges), 3 = 26-connected (faces + edges + corners, default).

    Returns:
        {
          "tp": truth components overlapping at least one predicted lesion voxel,
          "fn": truth components with no predicted lesion voxel,
          "fp": predicted components overlapping no truth lesion voxel,
          "fp_volume_ml": total volume of those false-positive predicted components (mL),
          "fn_volume_ml": total volume of the missed truth components (mL),
          "truth_count": number of truth components (= tp + fn),
          "pred_count": number of predicted components,
          "lesion_dice": voxel Dice of the two masks (NaN if both are empty),
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
    if connectivity not in (1, 2, 3):
        raise ValueError(f"connectivity must be 1 (6-), 2 (18-) or 3 (26-connected), got {connectivity}")

    voxel_ml = float(np.prod([float(s) for s in spacing_zyx])) / 1000.0
    structure = ndimage.generate_binary_structure(3, connectivity)
    truth_lab, truth_count = ndimage.label(truth, structure=structure)
    pred_lab, pred_count = ndimage.label(pred, structure=structure)

    # Component ids touched by the other mask (0 = background is dropped).
    hit_truth = np.unique(truth_lab[pred & truth])
    hit_pred = np.unique(pred_lab[pred & truth])
    hit_truth = hit_truth[hit_truth > 0]
    hit_pred = hit_pred[hit_pred > 0]

    truth_sizes = np.bincount(truth_lab.ravel(), minlength=truth_count + 1)
    pred_sizes = np.bincount(pred_lab.ravel(), minlength=pred_count + 1)
    missed = np.ones(truth_count + 1, dtype=bool)
    missed[0] = False
    missed[hit_truth] = False
    spurious = np.ones(pred_count + 1, dtype=bool)
    spurious[0] = False
    spurious[hit_pred] = False

    intersection = int(np.count_nonzero(pred & truth))
    return {
        "tp": int(hit_truth.size),
        "fn": int(truth_count - hit_truth.size),
        "fp": int(pred_count - hit_pred.size),
        "fp_volume_ml": float(pred_sizes[spurious].sum()) * voxel_ml,
        "fn_volume_ml": float(truth_sizes[missed].sum()) * voxel_ml,
        "truth_count": int(truth_count),
        "pred_count": int(pred_count),
        "lesion_dice": _dice(intersection, int(truth.sum()), int(pred.sum())),
    }


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
