"""The sweep report's two figures (Agg canvas, no pyplot: safe in Ray workers and headless jobs)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..eval.plots import new_figure, save_png
from .space import SIZE_KEY

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
    """Mean Dice (+- std over folds and seeds) against the unlabelled-set size; scratch as a horizontal band."""
    fig = new_figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    for i, (label, group) in enumerate(_series(settings).items()):
        ax.errorbar([s.n_unlabeled for s in group], [s.mean() for s in group], yerr=[s.std() for s in group],
                    marker="o", capsize=4, color=f"C{i}", label=label)
    scratch = next((s for s in settings if s.init == "scratch"), None)
    if scratch and not math.isnan(scratch.mean()):
        spread = 0.0 if math.isnan(scratch.std()) else scratch.std()
        ax.axhline(scratch.mean(), color="0.3", linestyle="--", label=f"scratch ({scratch.mean():.3f})")
        ax.axhspan(scratch.mean() - spread, scratch.mean() + spread, color="0.5", alpha=0.15)
    sizes = sorted({s.n_unlabeled for s in settings if s.init != "scratch"})
    if sizes:
        ax.set_xticks(sizes)
    ax.set_xlabel("unlabelled studies pretrained on")
    ax.set_ylabel("fine-tune Dice (mean over classes)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.set_title(f"{title}: Dice vs unlabelled-set size", fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)


def per_class_gain(settings: list[Setting], path: Path, title: str = "") -> Path:
    """Grouped bars: Dice gain over the scratch baseline per foreground class, one colour per pretrained setting."""
    from .report import class_names

    classes = class_names(settings)
    scratch = next((s for s in settings if s.init == "scratch"), None)
    pretrained = [s for s in settings if s.init != "scratch"]
    fig = new_figure(figsize=(max(8.0, 0.5 * len(classes) * max(1, len(pretrained)) ** 0.5 + 3), 4.5))
    ax = fig.subplots()
    x = np.arange(len(classes))
    width = 0.8 / max(1, len(pretrained))
    for row, s in enumerate(pretrained):
        gains = np.array([s.class_mean(c) - (scratch.class_mean(c) if scratch else math.nan) for c in classes])
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
