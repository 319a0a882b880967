"""The metric families of fine-tuning evaluation: one registry entry per family, everything else iterates it.

A *family* is a named group of numbers computed for every validation study, e.g. `dice` (one value per foreground
class plus their mean) or `lesion` (autoPET detection counts and volumes). `study_metrics` returns
`{family: {key: value}}` for the families a run enables (`eval.metrics`); each family declares how one fold's
studies are combined (`fold`); across folds every key is summarised the same way (mean and sample std over folds,
`metrics.fold_summary`). MLflow names are `<family>/<key>`, except the key `mean`, logged as `<family>_mean`: so the
12-class PSMA run keeps `dice_mean`, `dice/<class name>` and `lesion/<key>`.

Adding a metric is two files: its per-study function (e.g. in `metrics.py`) and a `Family` entry in `FAMILIES`
here (the fine-tuning driver validates `eval.metrics` against this registry). Aggregation, metrics.json and MLflow
pick it up without further changes; a family in the results that is not registered here is an error
(`summary.fold_metrics` / `cv_summary` raise), never silently dropped.

Families of the default run (`eval.metrics: [dice, lesion]`):

- `dice`: `{class name: Dice}` for every foreground class of the label set (MONAI `DiceMetric(include_background=
  False, ignore_empty=True)`: NaN where the truth lacks the class), and `mean` (mean over the non-NaN classes).
  Fold level: per class the mean over the studies where it is not NaN (MONAI `reduction="mean_batch"`); `mean` is
  the mean of those per-class means (every class weighs the same), not the mean of the per-study means.
- `lesion`: `metrics.lesion_metrics` of the label set's lesion class (only when the set has one): the autoPET
  scorer's per-case numbers on 18-connected components. Fold level as the scorer's cohort value: the volumes and
  `lesion_dice` are means over the fold's studies, NaN skipped (so `fn_volume_ml` and `lesion_dice` average the
  lesion-bearing studies, `fp_volume_ml` every study); the detection counts are summed over the studies.
- `hd95` (off by default): `{class name: 95th-percentile symmetric Hausdorff distance in mm}` (MONAI
  `compute_hausdorff_distance(percentile=95, spacing=...)`) and `mean`; NaN unless the class is in both truth and
  prediction (a missed or spurious class has no finite distance; Dice already scores it). Fold level as `dice`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from petct.labels import LabelSet

from .metrics import aggregate, dice_per_class, hd95_per_class, lesion_metrics, mean_dice, nanmean

Values = dict[str, float]
RESERVED_KEY = "mean"
"""Key of a per-class family's mean over classes (so no class may be called "mean")."""


@dataclass(frozen=True)
class Family:
    """One metric family: how a study is scored and how a fold's studies are combined."""

    name: str
    study: Callable[[np.ndarray, np.ndarray, LabelSet, tuple[float, float, float]], Values]
    """(prediction, truth, label set, spacing_zyx mm) -> {key: value} for one study."""
    fold: Callable[[list[Values]], Values]
    """The per-study values of one fold's validation studies -> the fold's {key: value}."""
    applies: Callable[[LabelSet], bool] = lambda labels: True
    """Whether the family is computed for this label set (lesion metrics need a lesion class)."""


def _named(per_class: dict[int, float], labels: LabelSet) -> Values:
    """{class value: v} -> {class name: v, ..., "mean": mean over the non-NaN classes}."""
    out = {labels.name(c): float(v) for c, v in per_class.items()}
    out[RESERVED_KEY] = mean_dice(per_class)
    return out


def _dice_study(pred, truth, labels: LabelSet, spacing_zyx) -> Values:
    return _named(dice_per_class(pred, truth, labels.num_classes), labels)


def _hd95_study(pred, truth, labels: LabelSet, spacing_zyx) -> Values:
    return _named(hd95_per_class(pred, truth, labels.num_classes, spacing_zyx), labels)


def _per_class_fold(rows: list[Values]) -> Values:
    """Per class: mean over the studies where it is not NaN; `mean`: the mean of those per-class means
    (`metrics.aggregate`), keys in label order rather than aggregate's sorted order."""
    agg = aggregate([{k: v for k, v in r.items() if k != RESERVED_KEY} for r in rows])
    keys = dict.fromkeys(k for r in rows for k in r if k != RESERVED_KEY)
    return {**{k: agg["per_class"][k] for k in keys}, RESERVED_KEY: agg["dice_mean"]}


def _lesion_study(pred, truth, labels: LabelSet, spacing_zyx) -> Values:
    return lesion_metrics(pred == labels.lesion, truth == labels.lesion, tuple(spacing_zyx))


COUNT_KEYS = ("tp", "fp", "fn", "truth_count", "pred_count")
PER_CASE_MEAN_KEYS = ("fp_volume_ml", "fn_volume_ml", "lesion_dice")
"""Averaged over cases (the autoPET scorer's cohort mean), never summed over a fold."""


def _lesion_fold(rows: list[Values]) -> Values:
    """Counts summed over the studies; volumes and Dice the mean over studies, NaN (lesion-free truth) skipped."""
    out: Values = {k: int(sum(r[k] for r in rows)) for k in COUNT_KEYS}
    out.update({k: nanmean([_float(r[k]) for r in rows]) for k in PER_CASE_MEAN_KEYS})
    return out


def _float(value) -> float:
    """A per-study value as float; None (a NaN that went through metrics.json) -> NaN."""
    return math.nan if value is None else float(value)


FAMILIES: dict[str, Family] = {
    "dice": Family("dice", _dice_study, _per_class_fold),
    "lesion": Family("lesion", _lesion_study, _lesion_fold, applies=lambda labels: labels.lesion is not None),
    "hd95": Family("hd95", _hd95_study, _per_class_fold),
}
"""Every metric family by name: the names `eval.metrics` accepts."""


def family(name: str) -> Family:
    """The registered family `name`; ValueError naming the registered ones otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"metric family {name!r} is not registered in swinssl.eval.families.FAMILIES "
                         f"(registered: {sorted(FAMILIES)}): it has no aggregation and would be dropped")
    return FAMILIES[name]


def active(names: Sequence[str], labels: LabelSet) -> list[str]:
    """The enabled families that apply to `labels`, in the order given (unknown names raise)."""
    return [n for n in names if family(n).applies(labels)]


def study_metrics(prediction: np.ndarray, truth: np.ndarray, spacing_xyz: Sequence[float], labels: LabelSet,
                  names: Sequence[str] = ("dice", "lesion")) -> dict[str, Values]:
    """{family: {key: value}} of one study; recomputable from predictions/<id>.nii.gz and the study's label.

    Args:
        prediction, truth: (Z, Y, X) integer label volumes with values of `labels`.
        spacing_xyz: voxel size in mm in ITK order (x, y, z), as a prepared study stores it.
        labels: the cohort's label set (class names, lesion class).
        names: enabled families (`eval.metrics`); those that do not apply to `labels` are skipped.
    """
    if RESERVED_KEY in labels.names:
        raise ValueError(f"class name {RESERVED_KEY!r} is reserved for the mean over classes; rename that class")
    spacing_zyx = tuple(float(s) for s in spacing_xyz)[::-1]
    return {n: FAMILIES[n].study(prediction, truth, labels, spacing_zyx) for n in active(names, labels)}


def metric_name(family_name: str, key: str) -> str:
    """MLflow name: `<family>/<key>`, or `<family>_mean` for the mean over classes (`dice_mean`)."""
    return f"{family_name}_mean" if key == RESERVED_KEY else f"{family_name}/{key}"
