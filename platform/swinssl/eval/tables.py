"""The Dice table printed by `swinssl finetune` and `swinssl report`: classes as rows, runs as columns.

Class names come from each run's metrics.json (`labels`, the label set it was fine-tuned on); runs on different
label sets show the union of their classes (n/a where a run has no such class). A metrics.json written before
label sets existed (summary `per_class` keyed by class value) is read as the PSMA set.
"""

from __future__ import annotations

from petct.labels import PSMA, LabelSet

from .families import RESERVED_KEY


def run_labels(metrics: dict) -> LabelSet:
    """The label set a run's metrics.json was computed with."""
    return LabelSet.from_dict(metrics["labels"], "metrics.json labels") if "labels" in metrics else PSMA


def dice_summary(metrics: dict) -> dict[str, dict]:
    """{class name or "mean": {"mean", "std"}} of a run's metrics.json (either layout)."""
    summary = metrics["summary"]
    if "dice" in summary:
        return summary["dice"]
    legacy = {PSMA.name(int(c)): v for c, v in summary.get("per_class", {}).items()}
    return {**legacy, RESERVED_KEY: summary.get("dice_mean")}


def _cell(entry: dict | None) -> str:
    if not entry or entry.get("mean") is None:
        return "n/a"
    return f"{entry['mean']:.3f} +- {entry['std'] or 0:.3f}"


def dice_table(runs: dict[str, dict]) -> str:
    """Markdown table: one column per run (mean +- std over folds), one row per foreground class, then the mean."""
    names = list(runs)
    classes: list[str] = []
    for metrics in runs.values():
        labels = run_labels(metrics)
        classes += [labels.name(c) for c in labels.foreground if labels.name(c) not in classes]
    dice = {n: dice_summary(runs[n]) for n in names}
    lines = ["| class | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for name in classes:
        lines.append(f"| {name} | " + " | ".join(_cell(dice[n].get(name)) for n in names) + " |")
    lines.append("| **mean** | " + " | ".join(_cell(dice[n].get(RESERVED_KEY)) for n in names) + " |")
    return "\n".join(lines)
