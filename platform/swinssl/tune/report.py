"""`swinssl report --sweep`: the comparison of a sweep's trials, read back from MLflow (the single source).

Fold-level Dice comes from the fine-tune fold runs nested under each trial run. Trials that differ only by seed
form one *setting*; a setting's Dice is the mean +- sample std over all its folds of all its seeds, `seed_std` the
std of its per-seed means (the draw-to-draw spread). Against the scratch baseline (the scratch setting with the
same `finetune.*` values, else the first scratch setting) each setting gets the paired statistics of
`swinssl.tune.stats`: pairs are (seed, fold) - the setting's fold k with seed s against scratch's fold k with seed
s, the same split - `gain` their mean difference, its 95 % paired t interval, the paired t-test's p-value, whether
p < 0.05, and the seeds needed to detect a 2-Dice-point gain at the measured spread. Unpaired folds are listed.

Writes into `out_dir` (and logs as artifacts `report/` of the sweep run): `report.md`, `report.csv`,
`dice_vs_size.png` (Dice vs unlabelled-set size, one line per pretext setting, scratch as a band),
`per_class_gain.png` (gain over scratch per class and setting), and when the sweep has the label-efficiency axis
(`finetune.cv.train_studies`) `dice_vs_labels.png` (Dice against labelled training studies per fold, one line per
setting plus the scratch baseline fine-tuned on the same labels: `plots.label_curves`).

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

from .space import FINETUNE_PREFIX
from .stats import ALPHA, DETECT_GAIN, MAX_PAIRS, POWER, Key, PairedGain, natural_key, pair_up, paired_gain

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
FOLD_NAME = re.compile(r" fold (\d+)$")


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
    pairs: dict[Key, float] = field(default_factory=dict)
    """(seed, fold) -> that fold's `dice_mean` (NaN when the fold run has none): what the paired statistics use."""
    unfinished: list[str] = field(default_factory=list)
    """`seed <s> <status>` of each trial that did not finish: its folds pair with nothing (the report says so)."""
    class_pairs: dict[str, dict[Key, float]] = field(default_factory=dict)
    """Class name -> (seed, fold) -> that fold's `dice/<class>`: the per-class gains pair the same way."""

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
    gains: dict[str, PairedGain] = field(default_factory=dict)
    """Setting name -> its paired statistics against its scratch baseline (scratch settings absent)."""


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
            setting.unfinished.append(f"seed {params.get('seed', '?')} {trial.info.status}")
            continue
        _add_folds(setting, params.get("seed", ""), _by_fold(_children(client, experiment, trial.info.run_id,
                                                                      "finetune-fold")))
    return list(settings.values())


def _add_folds(setting: Setting, seed: str, folds: dict[str, object]) -> None:
    """One finished trial's fold runs (fold index -> run) into its setting, pooled and keyed by (seed, fold)."""
    dice = {k: f.data.metrics.get("dice_mean", math.nan) for k, f in folds.items()}
    setting.fold_dice += list(dice.values())
    setting.seed_means.append(_nanmean(list(dice.values())))
    setting.pairs.update({(seed, k): v for k, v in dice.items()})
    for name in _fold_classes(list(folds.values())):
        per_fold = {k: f.data.metrics.get(f"dice/{name}", math.nan) for k, f in folds.items()}
        setting.fold_class.setdefault(name, []).extend(per_fold.values())
        setting.class_pairs.setdefault(name, {}).update({(seed, k): v for k, v in per_fold.items()})


def _fold_key(fold) -> str:
    """A fold run's fold index: its `fold` param, else the ` fold <k>` its run name ends with, else its run id (a
    fold that pairs with nothing, and is reported so)."""
    if "fold" in fold.data.params:
        return fold.data.params["fold"]
    named = FOLD_NAME.search(fold.info.run_name or "")
    return named.group(1) if named else f"run {fold.info.run_id}"


def _by_fold(folds: list) -> dict[str, object]:
    """One run per fold index, in index order: of several (a fold rerun after an interruption) the one with a
    `dice_mean`, the latest started among equals."""
    chosen: dict[str, object] = {}
    for fold in sorted(folds, key=lambda f: (not math.isnan(f.data.metrics.get("dice_mean", math.nan)),
                                             f.info.start_time or 0)):
        chosen[_fold_key(fold)] = fold  # later in the order wins: scored beats unscored, newer beats older
    return dict(sorted(chosen.items(), key=lambda item: natural_key((item[0],))))


def baseline_for(setting: Setting, settings: list[Setting]) -> Setting | None:
    """The scratch setting a setting is compared with: the one fine-tuned with the same `finetune.*` values (e.g. the
    same number of labelled studies), else the first scratch setting; None without one."""
    scratch = [s for s in settings if s.init == "scratch"]

    def tuned(s: Setting) -> dict[str, str]:
        return {k: v for k, v in s.values.items() if k.startswith(FINETUNE_PREFIX)}

    return next((b for b in scratch if tuned(b) == tuned(setting)), scratch[0] if scratch else None)


def compare(settings: list[Setting]) -> dict[str, PairedGain]:
    """Paired statistics of every non-scratch setting against its baseline (`baseline_for`)."""
    gains = {}
    for s in settings:
        base = baseline_for(s, settings)
        if s.init != "scratch" and base is not None:
            gains[s.name] = paired_gain(s.pairs, base.pairs)
    return gains


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


def _fmt_p(p: float) -> str:
    return "n/a" if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def _yes_no(flag: bool | None) -> str:
    return "n/a" if flag is None else ("yes" if flag else "no")


def _stat_cells(g: PairedGain | None) -> list[str]:
    """gain, CI low, CI high, p, significant, pairs, seeds needed; '-' for a baseline row."""
    if g is None:
        return ["-"] * 7
    return [_fmt(g.gain, sign=True), _fmt(g.ci_low, sign=True), _fmt(g.ci_high, sign=True), _fmt_p(g.p),
            _yes_no(g.significant), str(g.n_pairs), _seeds_cell(g)]


def _seeds_cell(g: PairedGain) -> str:
    if g.seeds_needed is not None:
        return str(g.seeds_needed)
    return "n/a" if math.isnan(g.sd) else f"> {MAX_PAIRS // max(g.n_folds, 1)}"  # spread too wide to size


def statistics_text(settings: list[Setting], gains: dict[str, PairedGain]) -> list[str]:
    """What the statistics columns are, then one line per setting with unfinished trials, unpaired folds or an n/a
    value."""
    if not any(s.init == "scratch" for s in settings):
        return ["", "No scratch baseline in this sweep (scratch_baseline: false): no gains, intervals or p-values."]
    lines = ["", f"gain: mean over the `pairs` (seed s, fold k) of the setting's fold-k Dice minus its scratch "
             "baseline's fold-k Dice with the same seed (same split). CI: the 95 % paired t interval, gain -+ "
             "t(0.975, n-1) * sd / sqrt(n), sd the sample std of the paired differences (a seeded percentile "
             "bootstrap interval is in report.csv as a check). p: two-sided paired t-test of a zero mean difference; "
             f"significant: p < {ALPHA} (the interval excludes 0), per comparison, not corrected for the number of "
             f"settings. seeds needed: seeds (each adds one pair per fold) for power {POWER} at alpha {ALPHA} to "
             f"detect a +{DETECT_GAIN} gain with a paired t-test at the measured sd (noncentral t). Pairs of one "
             "fold share validation studies and folds share training studies: the pairs are not independent and "
             "the interval is, if anything, too narrow."]
    noted = [f"- {s.name}: trials not finished ({', '.join(s.unfinished)}), their folds pair with nothing"
             for s in settings if s.unfinished]
    noted += [f"- {name}: " + "; ".join(g.notes) for name, g in gains.items() if g.notes]
    return lines + (["", "Notes:", *noted] if noted else [])


def markdown(settings: list[Setting], title: str, gains: dict[str, PairedGain] | None = None) -> str:
    """The report's text: the settings table with the paired statistics, their definition, the per-class table."""
    gains = compare(settings) if gains is None else gains
    lines = [f"### {title}", "", "| setting | unlabelled | trials ok | Dice (mean +- std over folds) | seed std | "
             "gain vs scratch | CI low | CI high | p | significant | pairs | seeds needed |", "|---" * 12 + "|"]
    for s in settings:
        ok = f"{s.statuses.count('FINISHED')}/{len(s.statuses)}"
        lines.append(f"| {s.name} | {s.n_unlabeled or '-'} | {ok} | {_fmt(s.mean())} +- {_fmt(s.std())} | "
                     f"{_fmt(s.seed_std())} | " + " | ".join(_stat_cells(gains.get(s.name))) + " |")
    lines += statistics_text(settings, gains)
    lines += ["", "Per-class Dice (gain vs scratch: mean paired difference, as `gain`):", "",
              "| class | " + " | ".join(s.name for s in settings) + " |", "|---|" + "---|" * len(settings)]
    for name in class_names(settings):
        cells = [_fmt(s.class_mean(name)) + ("" if s.init == "scratch" else
                                             f" ({_fmt(_class_gain(s, settings, name), True)})") for s in settings]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _class_gain(s: Setting, settings: list[Setting], name: str) -> float:
    """Mean paired (seed, fold) difference of one class's Dice against the baseline (NaN without a pair)."""
    base = baseline_for(s, settings)
    if base is None or s.init == "scratch":
        return math.nan
    _, diffs, _ = pair_up(s.class_pairs.get(name, {}), base.class_pairs.get(name, {}))
    return float(np.mean(diffs)) if len(diffs) else math.nan


STAT_COLUMNS = ["gain", "ci_low", "ci_high", "p", "significant", "seeds_needed", "pairs", "folds", "gain_sd",
                "bootstrap_low", "bootstrap_high", "pairs_needed", "unpaired"]


def _stat_row(g: PairedGain | None) -> list:
    if g is None:
        return [math.nan] * 4 + [""] * 9
    return [g.gain, g.ci_low, g.ci_high, g.p, _yes_no(g.significant).replace("n/a", ""), g.seeds_needed or "",
            g.n_pairs, g.n_folds, g.sd, g.boot_low, g.boot_high, g.pairs_needed or "", "; ".join(g.missing)]


def write_csv(settings: list[Setting], path: Path, gains: dict[str, PairedGain] | None = None) -> Path:
    """One row per setting: its values, Dice, the paired statistics (`STAT_COLUMNS`, full precision), per class."""
    gains = compare(settings) if gains is None else gains
    keys = sorted({k for s in settings for k in s.values})
    classes = class_names(settings)
    header = ["setting", "init", *keys, "n_unlabeled", "trials", "finished", "dice_mean", "dice_std", "seed_std",
              *STAT_COLUMNS, *[f"dice/{c}" for c in classes], *[f"gain/{c}" for c in classes]]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for s in settings:
            writer.writerow([s.name, s.init, *[s.values.get(k, "") for k in keys], s.n_unlabeled, len(s.statuses),
                             s.statuses.count("FINISHED"), s.mean(), s.std(), s.seed_std(),
                             *_stat_row(gains.get(s.name)),
                             *[s.class_mean(c) for c in classes], *[_class_gain(s, settings, c) for c in classes]])
    return path


def sweep_report(uri: str, ref: str, out_dir: str | Path, log: bool = True) -> SweepReport:
    """Collect, tabulate and plot a sweep; when `log`, the files go to the sweep run under `report/` and the answer
    onto the run itself (`log_summary`): the sweep run always shows the latest report."""
    from mlflow.tracking import MlflowClient

    from .plots import dice_vs_labels, dice_vs_size, per_class_gain

    client = MlflowClient(uri)
    run_id = find_sweep_run(client, ref)
    settings = collect(client, run_id)
    if not settings:
        raise ValueError(f"sweep run {run_id} has no trial runs")
    name = client.get_run(run_id).info.run_name
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gains = compare(settings)
    text = markdown(settings, f"Sweep {name} ({run_id})", gains)
    (out / "report.md").write_text(text + "\n")
    files = [out / "report.md", write_csv(settings, out / "report.csv", gains),
             dice_vs_size(settings, out / "dice_vs_size.png", name),
             per_class_gain(settings, out / "per_class_gain.png", name)]
    files += filter(None, [dice_vs_labels(settings, out / "dice_vs_labels.png", name)])
    report = SweepReport(text, settings, files, gains)
    if log:
        for path in files:
            client.log_artifact(run_id, str(path), "report")
        log_summary(uri, run_id, report)
    return report


def summary_metrics(report: SweepReport) -> dict[str, float]:
    """The answer as metrics of the sweep run, one group per setting (so the runs table and charts show it):
    `setting/<name>/dice_mean`, `.../dice_std` (over all folds of all seeds), `.../seed_std`, and for a setting
    compared with scratch `.../gain`, `.../gain_ci_low`, `.../gain_ci_high`, `.../gain_p` (see report.py); NaN
    values are left out. `<name>` is the setting's name with characters MLflow rejects (e.g. `=`) as `_`."""
    from ..tracking.mlflow_run import metric_key

    out: dict[str, float] = {}
    for setting in report.settings:
        key = f"setting/{metric_key(setting.name)}"
        out.update({f"{key}/dice_mean": setting.mean(), f"{key}/dice_std": setting.std(),
                    f"{key}/seed_std": setting.seed_std()})
        gain = report.gains.get(setting.name)
        if gain is not None:
            out.update({f"{key}/gain": gain.gain, f"{key}/gain_ci_low": gain.ci_low,
                        f"{key}/gain_ci_high": gain.ci_high, f"{key}/gain_p": gain.p})
    return {k: float(v) for k, v in out.items() if not math.isnan(v)}


NOTE_TAG = "mlflow.note.content"
"""The run description the MLflow UI renders (Markdown) on the run's page: the sweep run shows the report table."""
NOTE_MAX = 5800  # MLflow tag values are capped (mlflow_run.set_tags keeps 6000 characters)


def log_summary(uri: str, run_id: str, report: SweepReport) -> None:
    """Log the report's answer on the sweep run: `summary_metrics` and the report's Markdown as its description
    (the report files themselves are its `report/` artifacts, logged by `sweep_report`)."""
    from ..tracking.mlflow_run import log_metrics, set_tags

    log_metrics(uri, run_id, summary_metrics(report))
    note = report.markdown
    if len(note) > NOTE_MAX:
        note = note[:NOTE_MAX] + "\n\n(cut here: the whole report is the artifact report/report.md)"
    set_tags(uri, run_id, {NOTE_TAG: note})
