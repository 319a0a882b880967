"""Fold and cross-validation summaries of metric families (see `families`), written to metrics.json (plain JSON
values; NaN as null) and logged to MLflow. Every function iterates the families it is given; a family that is not
registered in `families.FAMILIES` raises instead of being dropped."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .families import Values, family, metric_name
from .metrics import fold_summary


def fold_metrics(rows: list[dict[str, Values]]) -> dict[str, Values]:
    """One fold from its studies' `study_metrics`: each family's own `fold` aggregation."""
    if not rows:
        raise ValueError("fold_metrics needs at least one study")
    names = list(dict.fromkeys(n for r in rows for n in r))
    return {n: family(n).fold([r[n] for r in rows if n in r]) for n in names}


def cv_summary(folds: Sequence[dict[str, Values]]) -> dict[str, dict[str, dict[str, float]]]:
    """{family: {key: {"mean", "std"}}} over folds (std is over folds, not studies; NaN folds skipped)."""
    names = list(dict.fromkeys(n for f in folds for n in f))
    out = {}
    for n in names:
        family(n)
        keys = list(dict.fromkeys(k for f in folds for k in f.get(n, {})))
        out[n] = {k: fold_summary([_nan(f.get(n, {}).get(k)) for f in folds]) for k in keys}
    return out


def _nan(value) -> float:
    return math.nan if value is None else float(value)


def flat_metrics(summary: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """MLflow metrics of a `cv_summary`: the mean across folds of every key of every family (NaN left out)."""
    out = {metric_name(n, k): v["mean"] for n, keys in summary.items() for k, v in keys.items()}
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
