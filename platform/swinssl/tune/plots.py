"""The sweep report's figures (Agg canvas, no pyplot: safe in Ray workers and headless jobs): Dice vs unlabelled-set
size, per-class gain, and (label-efficiency sweeps) Dice vs labelled training studies."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..eval.plots import new_figure, save_png
from .space import LABELS_KEY, SIZE_KEY, short_name

if TYPE_CHECKING:
    from .report import Setting


def _series(settings: list[Setting]) -> dict[str, list[Setting]]:
    """Pretrained settings grouped by everything but the unlabelled-set size, each sorted by size."""
    groups: dict[str, list[Setting]] = {}
    for s in settings:
        if s.init == "scratch":
            continue
        label = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in s.values.items() if k != SIZE_KEY) or "pretrained"
        groups.setdefault(label, []).append(s)
    return {k: sorted(v, key=lambda s: s.n_unlabeled) for k, v in groups.items()}


def dice_vs_size(settings: list[Setting], path: Path, title: str = "") -> Path:
    """Mean Dice (+- std over folds and seeds) against the unlabelled-set size; scratch as a horizontal band, or,
    when the series have different scratch baselines (`report.baseline_for`: e.g. per label count), one dashed line
    per series in its colour."""
    from .report import baseline_for

    fig = new_figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    series = _series(settings)
    baselines = [baseline_for(group[0], settings) for group in series.values()]
    several = len({b.name for b in baselines if b is not None}) > 1
    for i, (label, group) in enumerate(series.items()):
        ax.errorbar([s.n_unlabeled for s in group], [s.mean() for s in group], yerr=[s.std() for s in group],
                    marker="o", capsize=4, color=f"C{i}", label=label)
        base = baselines[i]
        if several and base is not None and not math.isnan(base.mean()):
            ax.axhline(base.mean(), color=f"C{i}", linestyle="--", label=f"{base.name} ({base.mean():.3f})")
    scratch = next((s for s in settings if s.init == "scratch"), None)
    if scratch and not several and not math.isnan(scratch.mean()):
        spread = 0.0 if math.isnan(scratch.std()) else scratch.std()
        ax.axhline(scratch.mean(), color="0.3", linestyle="--", label=f"scratch ({scratch.mean():.3f})")
        ax.axhspan(scratch.mean() - spread, scratch.mean() + spread, color="0.5", alpha=0.15)
    sizes = sorted({s.n_unlabeled for s in settings if s.init != "scratch"})
    if sizes:
        ax.set_xticks(sizes)
    return _finish_dice_axes(fig, ax, path, "unlabelled studies pretrained on", f"{title}: Dice vs unlabelled-set size")


def per_class_gain(settings: list[Setting], path: Path, title: str = "") -> Path:
    """Grouped bars: Dice gain over its scratch baseline (`report.baseline_for`) per foreground class, one colour per
    pretrained setting."""
    from .report import baseline_for, class_names

    classes = class_names(settings)
    scratch = next((s for s in settings if s.init == "scratch"), None)
    pretrained = [s for s in settings if s.init != "scratch"]
    fig = new_figure(figsize=(max(8.0, 0.5 * len(classes) * max(1, len(pretrained)) ** 0.5 + 3), 4.5))
    ax = fig.subplots()
    x = np.arange(len(classes))
    width = 0.8 / max(1, len(pretrained))
    for row, s in enumerate(pretrained):
        base = baseline_for(s, settings)  # the scratch setting with the same finetune.* values (label count)
        gains = np.array([s.class_mean(c) - (base.class_mean(c) if base else math.nan) for c in classes])
        finite = np.isfinite(gains)
        ax.bar((x - 0.4 + width * (row + 0.5))[finite], gains[finite], width=width * 0.95, color=f"C{row}",
               label=s.name)
    ax.axhline(0.0, color="0.2", linewidth=0.8)
    ax.set_xticks(x, classes, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("Dice gain over scratch")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.set_title(f"{title}: per-class gain over scratch" + ("" if scratch else " (no scratch baseline)"), fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)


@dataclass
class LabelCurve:
    """One line of the label-efficiency plot: a setting's Dice at each number of labelled training studies."""

    label: str
    scratch: bool
    labelled: list[int]
    """`finetune.cv.train_studies` of each point, ascending, 0 (all of each fold's training set) last."""
    mean: list[float]
    """Setting.mean(): dice_mean over the folds of all seeds."""
    std: list[float]
    """Setting.std(): their sample std (NaN for one fold)."""


def label_curves(settings: list[Setting]) -> list[LabelCurve]:
    """The settings that carry the label-efficiency axis (`LABELS_KEY`), one curve per combination of their other
    values (pretrained curves in first-seen order, then scratch), labelled `pretrained|scratch <short>=<value>...`;
    [] when the sweep has no such axis."""
    groups: dict[tuple[bool, str], list[Setting]] = {}
    for s in settings:
        if LABELS_KEY in s.values:
            rest = " ".join(f"{short_name(k)}={v}" for k, v in s.values.items() if k != LABELS_KEY)
            groups.setdefault((s.init == "scratch", rest), []).append(s)
    curves = []
    for (scratch, rest), group in sorted(groups.items(), key=lambda item: item[0][0]):  # stable: scratch last
        group = sorted(group, key=lambda s: _labelled_order(int(s.values[LABELS_KEY])))
        curves.append(LabelCurve(" ".join(filter(None, ["scratch" if scratch else "pretrained", rest])),
                                 scratch, [int(s.values[LABELS_KEY]) for s in group], [s.mean() for s in group],
                                 [s.std() for s in group]))
    return curves


def _labelled_order(n: int) -> float:
    return math.inf if n == 0 else n


def dice_vs_labels(settings: list[Setting], path: Path, title: str = "") -> Path | None:
    """Dice (mean +- std over folds x seeds) against labelled training studies per fold, log x, one line per
    pretrained setting and the scratch baseline dashed; "all" (0) drawn right of the largest count. None (nothing
    written) when no setting has the label-efficiency axis."""
    curves = label_curves(settings)
    if not curves:
        return None
    counts = sorted({n for c in curves for n in c.labelled if n > 0})
    where = {**{n: float(n) for n in counts}, 0: 2.0 * counts[-1] if counts else 1.0}
    fig = new_figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    for i, curve in enumerate(curves):
        style = {"color": "0.3", "linestyle": "--", "marker": "s"} if curve.scratch else {"color": f"C{i}",
                                                                                        "marker": "o"}
        ax.errorbar([where[n] for n in curve.labelled], curve.mean, yerr=[0.0 if math.isnan(v) else v
                                                                          for v in curve.std],
                    capsize=4, label=curve.label, **style)
    ax.set_xscale("log")
    ticks = sorted({n for c in curves for n in c.labelled}, key=_labelled_order)
    ax.set_xticks([where[n] for n in ticks], [str(n) if n else "all" for n in ticks])
    ax.minorticks_off()
    return _finish_dice_axes(fig, ax, path, "labelled training studies per fold (log scale)",
                             f"{title}: label efficiency (mean +- std over folds x seeds)")


def _finish_dice_axes(fig, ax, path: Path, xlabel: str, title: str) -> Path:
    """Labels, grid, legend outside the axes and title of a Dice-vs-something plot; saves it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fine-tune Dice (mean over classes)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)
