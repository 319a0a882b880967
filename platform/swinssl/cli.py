"""The `swinssl` command: one CLI, one verb per stage.

    swinssl synth    --out DIR --unlabeled N --labeled M [--seed S] [--format nifti|dicom] [--scale small|full]
    swinssl prepare  --input cohort.csv|DIR --out OUT [--workers K] [--ct-window LO,HI] [--pet-window LO,HI]
    swinssl export   OUT --study ID --to DIR
    swinssl pretrain experiments/pretrain.yaml [key=value ...]
    swinssl finetune experiments/finetune.yaml [key=value ...]   (encoder=PATH|RUN_ID|'' for scratch)
    swinssl sweep    experiments/dataset_size.yaml [key=value ...] [--resume]
    swinssl report   --runs NAME=FINETUNE_DIR [NAME=FINETUNE_DIR ...]
    swinssl report   --sweep SWEEP_RUN_ID|SWEEP_NAME|SWEEP_DIR [--tracking-uri URI] [--out DIR]

Exit codes: 0 success; 2 usage or config error; 3 `prepare` finished but at least one study failed (see the
manifest), or `sweep` finished but at least one trial failed; 4 training failed after its retries.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path


def _synth(args: argparse.Namespace) -> int:
    from petct.synth import synth_cohort

    csv_path = synth_cohort(Path(args.out), unlabeled=args.unlabeled, labeled=args.labeled, seed=args.seed,
                            scale=args.scale, fmt=args.format, workers=args.workers)
    print(f"cohort written: {csv_path}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from petct.config import PrepareConfig, Window
    from petct.pipeline import prepare_cohort

    cfg = PrepareConfig(ct_window=Window.parse(args.ct_window), pet_window=Window.parse(args.pet_window),
                        itk_threads=args.itk_threads, qc_png=not args.no_qc)
    if args.no_registration:
        cfg = replace(cfg, registration=replace(cfg.registration, enabled=False))
    summary = prepare_cohort(args.input, args.out, cfg, workers=args.workers, progress=not args.quiet)
    print(summary.report)
    print(f"manifest: {Path(args.out).resolve() / 'manifest.jsonl'}   QC: {Path(args.out).resolve() / 'qc'}")
    return summary.exit_code


def _export(args: argparse.Namespace) -> int:
    from petct.export import export_study

    for path in export_study(args.prepared, args.study, args.to):
        print(path)
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from .config import PretrainConfig, load_config
    from .train.launch import pretrain

    cfg = load_config(args.config, args.overrides, PretrainConfig)
    try:
        result = pretrain(cfg)
    except Exception as exc:  # Ray's TrainingFailedError and friends: the config was fine, training was not
        from .config import ConfigError
        from .data.studies import DataError

        if isinstance(exc, (ConfigError, DataError)):
            raise
        print(f"swinssl pretrain: training failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 4
    print(f"encoder: {result.encoder}")
    print("final: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.metrics.items()) if k.startswith("loss")))
    if result.run_id:
        print(f"MLflow run {result.run_id} at {result.tracking_uri}  (mlflow ui --backend-store-uri "
              f"{result.tracking_uri})")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from .config import ConfigError, FinetuneConfig, load_config
    from .data.studies import DataError
    from .train.finetune import finetune

    cfg = load_config(args.config, args.overrides, FinetuneConfig)
    try:
        result = finetune(cfg)
    except (ConfigError, DataError):
        raise
    except Exception as exc:
        print(f"swinssl finetune: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 4
    print(dice_table({cfg.name: result.metrics}))
    print(f"metrics: {result.output_dir / 'metrics.json'}")
    if result.run_id:
        print(f"MLflow run {result.run_id}: mlflow ui --backend-store-uri {result.tracking_uri} --host 127.0.0.1")
    return 0


def dice_table(runs: dict[str, dict]) -> str:
    """Markdown table: one column per run (mean +- std over folds), one row per class, then the mean."""
    from petct.labels import CLASSES

    def cell(entry) -> str:
        if not entry or entry.get("mean") is None:
            return "n/a"
        return f"{entry['mean']:.3f} +- {entry['std'] or 0:.3f}"

    names = list(runs)
    lines = ["| class | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for c in range(1, len(CLASSES)):
        lines.append(f"| {CLASSES[c]} | " + " | ".join(cell(runs[n]["summary"]["per_class"].get(str(c)))
                                                     for n in names) + " |")
    lines.append("| **mean** | " + " | ".join(cell(runs[n]["summary"]["dice_mean"]) for n in names) + " |")
    return "\n".join(lines)


def _sweep(args: argparse.Namespace) -> int:
    from .config import SweepConfig, load_config
    from .tune.sweep import EXIT_TRIALS_FAILED, resolve_stage_paths, sweep

    cfg = resolve_stage_paths(load_config(args.config, args.overrides, SweepConfig), args.config)
    result = sweep(cfg, resume=args.resume)
    for trial in result.trials:
        print(f"{trial['status']:9s} {trial['name']}" + (f"  ({trial['error']})" if trial["error"] else ""))
    if result.report:
        print(result.report)
        print(f"report: {result.output_dir / 'report'}   MLflow sweep run {result.run_id}: mlflow ui "
              f"--backend-store-uri {result.tracking_uri} --host 127.0.0.1")
    if result.failed:
        print(f"swinssl sweep: {len(result.failed)} trial(s) did not finish; `swinssl sweep --resume` reruns them",
              file=sys.stderr)
        return EXIT_TRIALS_FAILED
    return 0


def _report_sweep(args: argparse.Namespace) -> int:
    import json
    import os

    from .tune.report import sweep_report

    record = Path(args.sweep) / "mlflow_run.json"
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (
        json.loads(record.read_text())["tracking_uri"] if record.exists() else "")
    if not uri:
        raise ValueError("give --tracking-uri (or MLFLOW_TRACKING_URI, or a sweep output folder as --sweep)")
    out = Path(args.out or (Path(args.sweep) / "report" if record.exists() else "sweep_report"))
    report = sweep_report(uri, args.sweep, out)
    print(report.markdown)
    print("files: " + "  ".join(str(p) for p in report.files))
    return 0


def _report(args: argparse.Namespace) -> int:
    import json

    if args.sweep:
        return _report_sweep(args)
    runs = {}
    for item in args.runs:
        name, _, folder = item.partition("=")
        path = Path(folder or name) / "metrics.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: give NAME=DIR where DIR is a `swinssl finetune` output_dir")
        runs[name if folder else Path(name).name] = json.loads(path.read_text())
    print(dice_table(runs))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swinssl", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    synth = verbs.add_parser("synth", help="write a synthetic PSMA PET/CT cohort")
    synth.add_argument("--out", required=True)
    synth.add_argument("--unlabeled", type=int, default=4)
    synth.add_argument("--labeled", type=int, default=2)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--format", choices=("nifti", "dicom"), default="nifti")
    synth.add_argument("--scale", choices=("small", "full"), default="small")
    synth.add_argument("--workers", type=int, default=1, help="processes generating studies")
    synth.set_defaults(run=_synth)

    prep = verbs.add_parser("prepare", help="register, resample, normalise and shard a cohort")
    prep.add_argument("--input", required=True, help="cohort CSV, or a folder of study folders")
    prep.add_argument("--out", required=True)
    prep.add_argument("--workers", type=int, default=2, help="studies in parallel (Ray tasks); 0 = in-process")
    prep.add_argument("--ct-window", default="-1000,1000", help="HU window LO,HI mapped to [0, 1]")
    prep.add_argument("--pet-window", default="0,30", help="SUVbw window LO,HI mapped to [0, 1]")
    prep.add_argument("--itk-threads", type=int, default=1, help="ITK threads per study task")
    prep.add_argument("--no-registration", action="store_true", help="resample with identity (scanner frame)")
    prep.add_argument("--no-qc", action="store_true", help="skip the per-study QC PNGs")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(run=_prepare)

    export = verbs.add_parser("export", help="write a prepared study as NIfTI on the PET grid")
    export.add_argument("prepared", help="output folder of `swinssl prepare`")
    export.add_argument("--study", required=True)
    export.add_argument("--to", required=True)
    export.set_defaults(run=_export)

    pre = verbs.add_parser("pretrain", help="self-supervised pretraining on Ray Train")
    pre.add_argument("config", help="experiment YAML, e.g. experiments/pretrain.yaml")
    pre.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. trainer.steps=10")
    pre.set_defaults(run=_pretrain)

    fine = verbs.add_parser("finetune", help="cross-validated segmentation fine-tuning (scratch or pretrained)")
    fine.add_argument("config", help="experiment YAML, e.g. experiments/finetune.yaml")
    fine.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. encoder=runs/pt/encoder.pt")
    fine.set_defaults(run=_finetune)

    sweep = verbs.add_parser("sweep", help="Ray Tune study: each trial pretrains then fine-tunes with CV")
    sweep.add_argument("config", help="sweep YAML, e.g. experiments/dataset_size.yaml")
    sweep.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.root=prepared")
    sweep.add_argument("--resume", action="store_true", help="continue the sweep in output_dir (finished trials "
                       "are kept, failed and unfinished ones run again)")
    sweep.set_defaults(run=_sweep)

    report = verbs.add_parser("report", help="compare fine-tune runs, or the trials of a sweep")
    which = report.add_mutually_exclusive_group(required=True)
    which.add_argument("--runs", nargs="+", help="NAME=DIR pairs of `swinssl finetune` outputs")
    which.add_argument("--sweep", help="sweep run id, sweep run name, or sweep output folder")
    report.add_argument("--tracking-uri", default="", help="MLflow URI for --sweep (default: MLFLOW_TRACKING_URI)")
    report.add_argument("--out", default="", help="folder for the --sweep report files")
    report.set_defaults(run=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"swinssl {args.verb}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
