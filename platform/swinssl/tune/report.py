"""`swinssl report --sweep`: the comparison of a sweep's trials, read back from MLflow (the single source).

Fold-level Dice comes from the fine-tune fold runs nested under each trial run. Trials that differ only by seed
form one *setting*; a setting's Dice is the mean +- sample std over all its folds of all its seeds, `seed_std` the
std of its per-seed means (the draw-to-draw spread), `gain` its mean minus the scratch baseline's.

Writes into `out_dir` (and logs as artifacts `report/` of the sweep run): `report.md`, `report.csv`,
`dice_vs_size.png` (Dice vs unlabelled-set size, one line per pretext setting, scratch as a band),
`per_class_gain.png` (gain over scratch per class and setting).

The classes are those the trials were fine-tuned on: each fold run's `classes` param (the label set's foreground
names, in label order), else the `dice/<class>` metrics it holds (sorted by name).
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Setting:
    """One row of the report: the trials of one setting, pooled over seeds."""

    name: str
    init: str
    values: dict[str, str]
    n_unlabeled: int
    statuses: list[str] = field(default_factory=list)
    fold_dice: list[float] = field(default_factory=list)
    seed_means: list[float] = field(default_factory=list)
    fold_class: dict[str, list[float]] = field(default_factory=dict)

    def mean(self) -> float:
        return _nanmean(self.fold_dice)

    def std(self) -> float:
        kept = [v for v in self.fold_dice if not math.isnan(v)]
        return float(np.std(kept, ddof=1)) if len(kept) > 1 else (0.0 if kept else math.nan)

    def seed_std(self) -> float:
        kept = [v for v in self.seed_means if not math.isnan(v)]
        return float(np.std(kept, ddof=1)) if len(kept) > 1 else math.nan

    def class_mean(self, name: str) -> float:
        return _nanmean(self.fold_class.get(name, []))


@dataclass
class SweepReport:
    markdown: str
    settings: list[Setting]
    files: list[Path]


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def find_sweep_run(client, ref: str) -> str:
    """A sweep run id, a sweep run name (the newest sweep run of that name) or a sweep output folder."""
    record = Path(ref) / "mlflow_run.json"
    if record.exists():
        return json.loads(record.read_text())["run_id"]
    if RUN_ID.match(ref):
        return ref
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.mlflow.runName = '{ref}' and tags.`swinssl.kind` = 'sweep'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ValueError(f"no sweep run named {ref!r} in {client.tracking_uri}")
    return runs[0].info.run_id


def _children(client, experiment_id: str, parent: str, kind: str) -> list:
    return client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}' and tags.`swinssl.kind` = "
                              f"'{kind}'", max_results=5000)


def collect(client, sweep_run_id: str) -> list[Setting]:
    """Settings in trial order, each with its folds' Dice pooled over its seeds."""
    experiment = client.get_run(sweep_run_id).info.experiment_id
    trials = sorted(_children(client, experiment, sweep_run_id, "sweep-trial"), key=lambda r: r.data.params["trial"])
    settings: dict[str, Setting] = {}
    for trial in trials:
        params = trial.data.params
        values = {k: v for k, v in params.items() if k not in ("seed", "init", "setting", "trial", "n_unlabeled")}
        setting = settings.setdefault(params["setting"], Setting(params["setting"], params["init"], values,
                                                                 int(params.get("n_unlabeled", 0))))
        setting.statuses.append(trial.info.status)
        if trial.info.status != "FINISHED":
            continue
        folds = _children(client, experiment, trial.info.run_id, "finetune-fold")
        setting.fold_dice += [f.data.metrics.get("dice_mean", math.nan) for f in folds]
        setting.seed_means.append(_nanmean([f.data.metrics.get("dice_mean", math.nan) for f in folds]))
        for name in _fold_classes(folds):
            setting.fold_class.setdefault(name, []).extend(f.data.metrics.get(f"dice/{name}", math.nan)
                                                           for f in folds)
    return list(settings.values())


def _fold_classes(folds: list) -> list[str]:
    """Class names of fold runs: their `classes` param, else their `dice/<class>` metric names."""
    names: list[str] = []
    for fold in folds:
        param = fold.data.params.get("classes")
        found = json.loads(param) if param else sorted(k[5:] for k in fold.data.metrics if k.startswith("dice/"))
        names += [n for n in found if n not in names]
    return names


def class_names(settings: list[Setting]) -> list[str]:
    """The report's classes: every class any setting was scored on, in first-seen (label) order."""
    return list(dict.fromkeys(name for s in settings for name in s.fold_class))


def _fmt(value: float, sign: bool = False) -> str:
    return "n/a" if math.isnan(value) else (f"{value:+.3f}" if sign else f"{value:.3f}")


def markdown(settings: list[Setting], title: str) -> str:
    scratch = next((s for s in settings if s.init == "scratch"), None)
    base = scratch.mean() if scratch else math.nan
    lines = [f"### {title}", "", "| setting | unlabelled | trials ok | Dice (mean +- std over folds) | seed std | "
             "gain vs scratch |", "|---|---|---|---|---|---|"]
    for s in settings:
        ok = f"{s.statuses.count('FINISHED')}/{len(s.statuses)}"
        lines.append(f"| {s.name} | {s.n_unlabeled or '-'} | {ok} | {_fmt(s.mean())} +- {_fmt(s.std())} | "
                     f"{_fmt(s.seed_std())} | {'-' if s is scratch else _fmt(s.mean() - base, sign=True)} |")
    lines += ["", "Per-class Dice (gain vs scratch):", "", "| class | " + " | ".join(s.name for s in settings) + " |",
              "|---|" + "---|" * len(settings)]
    for name in class_names(settings):
        ref = scratch.class_mean(name) if scratch else math.nan
        cells = [_fmt(s.class_mean(name)) + ("" if s is scratch else f" ({_fmt(s.class_mean(name) - ref, True)})")
                 for s in settings]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(settings: list[Setting], path: Path) -> Path:
    scratch = next((s for s in settings if s.init == "scratch"), None)
    keys = sorted({k for s in settings for k in s.values})
    classes = class_names(settings)
    header = ["setting", "init", *keys, "n_unlabeled", "trials", "finished", "dice_mean", "dice_std", "seed_std",
              "gain", *[f"dice/{c}" for c in classes], *[f"gain/{c}" for c in classes]]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for s in settings:
            gain = s.mean() - scratch.mean() if scratch and s is not scratch else math.nan
            writer.writerow([s.name, s.init, *[s.values.get(k, "") for k in keys], s.n_unlabeled, len(s.statuses),
                             s.statuses.count("FINISHED"), s.mean(), s.std(), s.seed_std(), gain,
                             *[s.class_mean(c) for c in classes],
                             *[s.class_mean(c) - scratch.class_mean(c) if scratch and s is not scratch else math.nan
                               for c in classes]])
    return path


def sweep_report(uri: str, ref: str, out_dir: str | Path, log: bool = True) -> SweepReport:
    """Collect, tabulate and plot a sweep; logs the files to the sweep run under `report/` when `log`."""
    from mlflow.tracking import MlflowClient

    from .plots import dice_vs_size, per_class_gain

    client = MlflowClient(uri)
    run_id = find_sweep_run(client, ref)
    settings = collect(client, run_id)
    if not settings:
        raise ValueError(f"sweep run {run_id} has no trial runs")
    name = client.get_run(run_id).info.run_name
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(settings, f"Sweep {name} ({run_id})")
    (out / "report.md").write_text(text + "\n")
    files = [out / "report.md", write_csv(settings, out / "report.csv"),
             dice_vs_size(settings, out / "dice_vs_size.png", name),
             per_class_gain(settings, out / "per_class_gain.png", name)]
    if log:
        for path in files:
            client.log_artifact(run_id, str(path), "report")
    return SweepReport(text, settings, files)
