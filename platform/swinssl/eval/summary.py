"""Fold and cross-validation summaries written to metrics.json (plain JSON values; NaN as null)."""

from __future__ import annotations

import math

from petct.labels import CLASSES

from .metrics import aggregate, fold_summary

LESION_COUNTS = ("tp", "fp", "fn", "truth_count", "pred_count")
LESION_VOLUMES = ("fp_volume_ml", "fn_volume_ml")


def _int_keys(dice: dict[str, float]) -> dict[int, float]:
    return {int(k): (math.nan if v is None else v) for k, v in dice.items()}


def fold_metrics(rows: list[dict]) -> dict:
    """One fold: mean Dice per class over its validation studies (NaN-aware), their mean, lesion totals."""
    agg = aggregate([_int_keys(r["dice"]) for r in rows])
    lesion = {k: int(sum(r["lesion"][k] for r in rows)) for k in LESION_COUNTS}
    lesion.update({k: float(sum(r["lesion"][k] for r in rows)) for k in LESION_VOLUMES})
    lesion["lesion_dice"] = fold_summary([r["lesion"]["lesion_dice"] for r in rows])["mean"]
    return {"studies": [r["study_id"] for r in rows], "dice_mean": agg["dice_mean"],
            "per_class": {str(c): v for c, v in agg["per_class"].items()}, "lesion": lesion}


def cv_summary(folds: dict[str, dict]) -> dict:
    """Mean and std across folds of the fold-level numbers (std is over folds, not studies)."""
    classes = sorted({c for f in folds.values() for c in f["per_class"]}, key=int)
    keys = (*LESION_COUNTS, *LESION_VOLUMES, "lesion_dice")
    return {
        "dice_mean": fold_summary([f["dice_mean"] for f in folds.values()]),
        "per_class": {c: fold_summary([f["per_class"].get(c, math.nan) for f in folds.values()]) for c in classes},
        "lesion": {k: fold_summary([f["lesion"][k] for f in folds.values()]) for k in keys},
    }


def flat_metrics(summary: dict) -> dict[str, float]:
    """MLflow metric names: dice_mean, dice/<class name>, lesion/<key> (means across folds)."""
    out = {"dice_mean": summary["dice_mean"]["mean"]}
    out.update({f"dice/{CLASSES[int(c)]}": v["mean"] for c, v in summary["per_class"].items()})
    out.update({f"lesion/{k}": v["mean"] for k, v in summary["lesion"].items()})
    return {k: v for k, v in out.items() if v is not None and not math.isnan(v)}


def jsonable(value):
    """NaN -> None recursively (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
