"""The `swinssl` command: one CLI, one verb per stage.

    swinssl synth    --out DIR --unlabeled N --labeled M [--seed S] [--format nifti|dicom] [--scale small|full]
    swinssl scan     DIR --out cohort.csv   (find the studies of DIR, write them as a cohort CSV for review)
    swinssl prepare  --input cohort.csv|DIR --out OUT [--workers K] [--ct-window LO,HI] [--pet-window LO,HI]
    swinssl export   OUT --study ID --to DIR
    swinssl bundle   MODEL --out DIR [--fold K] [--tracking-uri URI]   (a MONAI bundle of one fold)
    swinssl export-nnunet OUT --out nnUNet_raw/DatasetXXX_Name [--finetune RUN_DIR | --folds K --seed S]
    swinssl pretrain experiments/pretrain.yaml [key=value ...]
    swinssl finetune experiments/finetune.yaml [key=value ...]   (encoder=PATH|RUN_ID|'' for scratch)
    swinssl sweep    experiments/dataset_size.yaml [key=value ...] [--resume]
    swinssl report   --runs NAME=FINETUNE_DIR [NAME=FINETUNE_DIR ...] [--nnunet NAME=NNUNET_RESULTS_DIR ...]
    swinssl report   --sweep SWEEP_RUN_ID|SWEEP_NAME|SWEEP_DIR [--tracking-uri URI] [--out DIR]
    swinssl predict  MODEL --input DIR|cohort.csv|PREPARED --out OUT [--folds 0,1] [--tta] [--ct-grid] [--device D]
                     (MODEL: a finetune output_dir, models:/NAME/VERSION, runs:/RUN_ID/model or a finetune run id)

Exit codes: 0 success; 2 usage, config or input error (a bad key or value, a missing or unreadable file, data that
cannot serve the config), found before any training starts, with a message naming the key or file; 3 `prepare` or
`predict` finished but at least one study failed (see the manifest / predictions.jsonl), or `sweep` finished but
at least one trial failed; 4 `pretrain`/`finetune` training failed after its retries.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path


def _synth(args: argparse.Namespace) -> int:
    from petct.labels import PSMA, LabelSet
    from petct.synth import synth_cohort

    labels = LabelSet.load(args.labels) if args.labels else PSMA
    csv_path = synth_cohort(Path(args.out), unlabeled=args.unlabeled, labeled=args.labeled, seed=args.seed,
                            scale=args.scale, fmt=args.format, workers=args.workers, labels=labels)
    print(f"cohort written: {csv_path}")
    return 0


def _scan(args: argparse.Namespace) -> int:
    from petct.layouts import cohort_csv_text, discover
    from petct.shards import atomic_write_text

    root, out = Path(args.dir).resolve(), Path(args.out).resolve()
    found = discover(root)
    if not found.sources:
        raise ValueError(f"no studies found in {root}: looked at {found.looked}")
    print(f"layout: {found.layout} ({len(found.sources)} studies in {root})")
    for source in found.sources:
        state = f"FAILS {source.problem[0]}" if source.problem else "ok"
        print(f"  {source.study_id} [{state}] {found.pairing.get(source.study_id, '')}")
    print(f"skipped ({len(found.skipped)}):")
    for what, why in found.skipped:
        print(f"  {what}: {why}")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, cohort_csv_text(found.sources, out))
    print(f"cohort written: {out}  (review it, then: swinssl prepare --input {out} --out OUT)")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from petct.config import PrepareConfig
    from petct.labels import PSMA, LabelSet
    from petct.pipeline import prepare_cohort

    labels = LabelSet.load(args.labels) if args.labels else PSMA  # a bad map file exits 2 before any study runs
    cfg = PrepareConfig(ct_window=_window(args.ct_window, "--ct-window"), pet_window=_window(args.pet_window,
                                                                                                "--pet-window"),
                        itk_threads=args.itk_threads, qc_png=not args.no_qc, labels=labels,
                        max_volume_mib=_budget_mib(args.max_volume_mib))
    if args.no_registration:
        cfg = replace(cfg, registration=replace(cfg.registration, enabled=False))
    summary = prepare_cohort(args.input, args.out, cfg, workers=args.workers, progress=not args.quiet)
    print(summary.report)
    print(f"manifest: {Path(args.out).resolve() / 'manifest.jsonl'}   QC: {Path(args.out).resolve() / 'qc'}")
    return summary.exit_code


def _window(text: str, flag: str):
    """`LO,HI` of a window flag; a bad one names the flag."""
    from petct.config import Window

    try:
        return Window.parse(text)
    except ValueError as exc:
        raise ValueError(f"{flag} {text!r}: give LO,HI with LO < HI, e.g. -1000,1000 ({exc})") from None


def _budget_mib(text: str) -> float:
    """`--max-volume-mib`: a number of MiB > 0; a bad one names the flag."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"--max-volume-mib {text!r}: give a size in MiB > 0, e.g. 4096")
    return value


def _export(args: argparse.Namespace) -> int:
    from petct.export import export_study

    for path in export_study(args.prepared, args.study, args.to):
        print(path)
    return 0


def _export_nnunet(args: argparse.Namespace) -> int:
    import os

    from .deploy.nnunet import export_nnunet

    preprocessed = args.preprocessed if args.preprocessed is not None else os.environ.get("nnUNet_preprocessed")
    result = export_nnunet(args.prepared, args.out, finetune=args.finetune, folds=args.folds, seed=args.seed,
                           preprocessed=preprocessed or None, include_unlabelled=args.include_unlabelled,
                           progress=not args.quiet)
    print(result.report())
    return 0


def _bundle(args: argparse.Namespace) -> int:
    from .deploy.bundle import bundle_fold, write_bundle
    from .deploy.package import load_trained

    trained = load_trained(args.model, args.tracking_uri)
    fold = bundle_fold(trained, args.fold)
    out = write_bundle(trained, args.out, fold).resolve()
    print(f"MONAI bundle of fold {fold} written: {out}")
    print(f"run it: python -m monai.bundle run --config_file {out}/configs/inference.json --bundle_root {out} "
          "--dataset_dir DATA --output_dir OUT   (DATA: `swinssl export` study folders)")
    return 0


def input_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input, not a failed run: exit 2. ValueError covers ConfigError, DataError,
    LabelSetError and the ValueErrors of driver-side checks (they all run before Ray starts training); OSError a
    missing, unreadable or unwritable path; StudyError a study's input when a verb handles one study."""
    from petct.errors import StudyError

    return ValueError, KeyError, OSError, StudyError


def _train(verb: str, run, cfg):
    """`run(cfg)` -> (result, 0). An input error found by the driver propagates (main: exit 2); any other failure,
    including an input-looking error raised inside a Ray task or worker (Ray re-raises it as a subclass of the
    original type), means training itself failed: (None, 4)."""
    try:
        return run(cfg), 0
    except input_errors() as exc:
        if not type(exc).__module__.startswith("ray"):
            raise
        failure = exc
    except Exception as exc:  # Ray's TrainingFailedError and friends: the config was fine, training was not
        failure = exc
    print(f"swinssl {verb}: training failed: {type(failure).__name__}: {str(failure).splitlines()[0][:500]}",
          file=sys.stderr)
    return None, 4


def _pretrain(args: argparse.Namespace) -> int:
    from .config import PretrainConfig, load_config

    # keys and types now, before importing Ray Train; `pretrain` validates the rest together with the data
    cfg = load_config(args.config, args.overrides, PretrainConfig, check=False)
    from .train.launch import pretrain

    result, code = _train("pretrain", pretrain, cfg)
    if code:
        return code
    print(f"encoder: {result.encoder}")
    print("final: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.metrics.items()) if k.startswith("loss")))
    if result.run_id:
        print(mlflow_links(result.tracking_uri, result.run_id))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from .config import FinetuneConfig, load_config

    # keys and types now, before importing Ray Train; `finetune` validates the rest together with the data
    cfg = load_config(args.config, args.overrides, FinetuneConfig, check=False)
    from .train.finetune import finetune

    result, code = _train("finetune", finetune, cfg)
    if code:
        return code
    print(dice_table({cfg.name: result.metrics}))
    print(f"metrics: {result.output_dir / 'metrics.json'}")
    if result.run_id:
        if not args.no_log_model:
            print(f"MLflow model: {_log_model(result, args.register)}")
        print(mlflow_links(result.tracking_uri, result.run_id))
    return 0


def _log_model(result, registered_name: str) -> str:
    """The finished run's fold models as an MLflow pyfunc model (registered when a name is given)."""
    from .deploy.mlflow_model import log_model
    from .deploy.package import load_trained, write_package

    model = load_trained(result.output_dir)
    package = write_package(model, result.output_dir / "model_package")
    return log_model(model, package, result.tracking_uri, result.run_id, registered_name)


def _predict(args: argparse.Namespace) -> int:
    from .deploy.predict import PredictOptions, predict_cohort

    folds = None if args.folds in ("", "all") else [int(v) for v in args.folds.split(",")]
    options = PredictOptions(folds=folds, tta=args.tta, device=args.device, ct_grid=args.ct_grid,
                             dicom_seg=not args.no_dicom_seg, overlays=not args.no_overlays, workers=args.workers,
                             progress=not args.quiet)
    summary = predict_cohort(args.model, args.input, args.out, options, args.tracking_uri)
    print(summary.report)
    print(f"records: {summary.out / 'predictions.jsonl'}   run: {summary.out / 'predict_run.json'}")
    return summary.exit_code


def mlflow_links(tracking_uri: str, run_id: str, trials: bool = False) -> str:
    """How to open a run in the MLflow UI: the `mlflow ui` command and links to its model-training view."""
    from .tracking.links import run_links

    return "\n".join(run_links(tracking_uri, run_id, trials=trials))


def dice_table(runs: dict[str, dict]) -> str:
    """Markdown Dice table of metrics.json contents (classes from each run's label set); see eval/tables.py."""
    from .eval.tables import dice_table as table

    return table(runs)


def _sweep(args: argparse.Namespace) -> int:
    from .config import SweepConfig, load_config

    cfg = load_config(args.config, args.overrides, SweepConfig)  # before importing Ray Tune: errors come fast
    from .tune.sweep import EXIT_TRIALS_FAILED, resolve_stage_paths, sweep

    cfg = resolve_stage_paths(cfg, args.config)
    result = sweep(cfg, resume=args.resume)
    for trial in result.trials:
        print(f"{trial['status']:9s} {trial['name']}" + (f"  ({trial['error']})" if trial["error"] else ""))
    if result.report:
        print(result.report)
        print(f"report: {result.output_dir / 'report'}")
        print(mlflow_links(result.tracking_uri, result.run_id, trials=True))
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
    from mlflow.exceptions import MlflowException

    try:
        report = sweep_report(uri, args.sweep, out)
    except MlflowException as exc:  # an unreachable or unusable tracking store is an input error, not a crash
        raise ValueError(f"MLflow at {uri}: {str(exc).splitlines()[0][:300]}") from None
    from mlflow.tracking import MlflowClient

    from .tune.report import find_sweep_run

    run_id = find_sweep_run(MlflowClient(uri), args.sweep)
    print(report.markdown)
    print("files: " + "  ".join(str(p) for p in report.files))
    print(mlflow_links(uri, run_id, trials=True))
    return 0


def _report(args: argparse.Namespace) -> int:
    import json

    if args.nnunet is not None and not args.runs:
        raise ValueError("--nnunet goes with --runs NAME=FINETUNE_DIR (one table of both)")
    if args.sweep:
        return _report_sweep(args)
    runs = {}
    for item in args.runs:
        name, _, folder = item.partition("=")
        path = Path(folder or name) / "metrics.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: give NAME=DIR where DIR is a `swinssl finetune` output_dir")
        runs[name if folder else Path(name).name] = json.loads(path.read_text())
    nnunet = _nnunet_columns(args.nnunet or [], runs)
    print(dice_table({**runs, **nnunet}))
    for name, metrics in nnunet.items():
        print(f"{name}: nnU-Net folds {', '.join(metrics['folds'])} of {metrics['source']} (per-case Dice re-scored "
              "from its TP/FP/FN: NaN where the truth lacks the class, as ours)")
    return 0


def _nnunet_columns(items: list[str], runs: dict) -> dict[str, dict]:
    """`--nnunet NAME=DIR ...` as metrics.json-like dicts (see deploy/nnunet.py); a NAME also in --runs is refused."""
    if not items:
        return {}
    from .deploy.nnunet import nnunet_runs

    nnunet = nnunet_runs(items)
    clash = sorted(set(nnunet) & set(runs))
    if clash:
        raise ValueError(f"--nnunet names {clash} are also --runs names: give each column its own NAME")
    return nnunet


def _count(text: str) -> int:
    """argparse type of a study count: a non-negative integer (argparse turns the error into exit 2)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swinssl", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    synth = verbs.add_parser("synth", help="write a synthetic PSMA PET/CT cohort")
    synth.add_argument("--out", required=True)
    synth.add_argument("--unlabeled", type=_count, default=4, help="unlabelled studies (>= 0)")
    synth.add_argument("--labeled", type=_count, default=2, help="labelled studies (>= 0)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--format", choices=("nifti", "dicom"), default="nifti")
    synth.add_argument("--scale", choices=("small", "full"), default="small")
    synth.add_argument("--workers", type=int, default=1, help="processes generating studies")
    synth.add_argument("--labels", metavar="FILE", help="label map (YAML/JSON) the label volumes use: each phantom "
                       "class of the same name gets its value, the others 0 (default: the 12 PSMA classes)")
    synth.set_defaults(run=_synth)

    scan = verbs.add_parser("scan", help="find the studies of a folder (any layout) and write them as a cohort CSV")
    scan.add_argument("dir", help="folder: a DICOM tree, autoPET, nnU-Net v2 raw, or study folders")
    scan.add_argument("--out", required=True, help="cohort CSV to write (paths relative to it)")
    scan.set_defaults(run=_scan)

    prep = verbs.add_parser("prepare", help="register, resample, normalise and shard a cohort")
    prep.add_argument("--input", required=True, help="cohort CSV, or a folder in any layout `swinssl scan` finds")
    prep.add_argument("--out", required=True)
    prep.add_argument("--workers", type=int, default=2, help="studies in parallel (Ray tasks); 0 = in-process")
    prep.add_argument("--ct-window", default="-1000,1000", help="HU window LO,HI mapped to [0, 1]")
    prep.add_argument("--pet-window", default="0,30", help="SUVbw window LO,HI mapped to [0, 1]")
    prep.add_argument("--itk-threads", type=int, default=1, help="ITK threads per study task")
    prep.add_argument("--no-registration", action="store_true", help="resample with identity (scanner frame)")
    prep.add_argument("--no-qc", action="store_true", help="skip the per-study QC PNGs")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.add_argument("--max-volume-mib", default="4096", metavar="MIB",
                      help="refuse a CT or PET whose float32 volume would exceed this (checked from the headers)")
    prep.add_argument("--labels", metavar="FILE", help="label map (YAML/JSON), e.g. {0: background, 1: lesion}; a "
                      "label value outside it fails its study (default: the 12 PSMA classes)")
    prep.set_defaults(run=_prepare)

    export = verbs.add_parser("export", help="write a prepared study as NIfTI on the PET grid")
    export.add_argument("prepared", help="output folder of `swinssl prepare`")
    export.add_argument("--study", required=True)
    export.add_argument("--to", required=True)
    export.set_defaults(run=_export)

    bundle = verbs.add_parser("bundle", help="write one fold of a fine-tuned model as a MONAI bundle")
    bundle.add_argument("model", help="finetune output_dir, model package, models:/NAME/VERSION, runs:/ID/model, "
                        "run id")
    bundle.add_argument("--out", required=True, help="bundle folder to create (new or empty)")
    bundle.add_argument("--fold", type=int, default=None, help="fold to export (default: the model's first)")
    bundle.add_argument("--tracking-uri", default="", help="MLflow URI for models:/ and run ids "
                        "(default: MLFLOW_TRACKING_URI)")
    bundle.set_defaults(run=_bundle)

    nnu = verbs.add_parser("export-nnunet", help="the labelled cohort as an nnU-Net v2 raw dataset with our folds")
    nnu.add_argument("prepared", help="output folder of `swinssl prepare`")
    nnu.add_argument("--out", required=True, help="nnUNet_raw/DatasetXXX_Name (nnU-Net's Dataset<3 digits>_<name>)")
    nnu.add_argument("--finetune", metavar="RUN_DIR", help="take the folds from this `swinssl finetune` output_dir")
    nnu.add_argument("--folds", type=int, help="our folds computed with cv.folds=K (default 5)")
    nnu.add_argument("--seed", type=int, help="cv.seed of the computed folds (default 0)")
    nnu.add_argument("--preprocessed", metavar="DIR", help="also write DIR/DatasetXXX_Name/splits_final.json "
                     "(default: $nnUNet_preprocessed when set)")
    nnu.add_argument("--include-unlabelled", action="store_true", help="write unlabelled studies to imagesTs")
    nnu.add_argument("--quiet", action="store_true", help="no progress bar")
    nnu.set_defaults(run=_export_nnunet)

    pre = verbs.add_parser("pretrain", help="self-supervised pretraining on Ray Train")
    pre.add_argument("config", help="experiment YAML, e.g. experiments/pretrain.yaml")
    pre.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. trainer.steps=10")
    pre.set_defaults(run=_pretrain)

    fine = verbs.add_parser("finetune", help="cross-validated segmentation fine-tuning (scratch or pretrained)")
    fine.add_argument("config", help="experiment YAML, e.g. experiments/finetune.yaml")
    fine.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. encoder=runs/pt/encoder.pt")
    fine.add_argument("--no-log-model", action="store_true", help="do not log the fold models as an MLflow model")
    fine.add_argument("--register", default="", metavar="NAME", help="register the MLflow model under NAME")
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
    report.add_argument("--nnunet", nargs="+", metavar="NAME=DIR", help="nnU-Net results folders "
                        "(nnUNet_results/DatasetXXX_Name/<trainer>__<plans>__<config>) as extra columns of --runs")
    report.add_argument("--tracking-uri", default="", help="MLflow URI for --sweep (default: MLFLOW_TRACKING_URI)")
    report.add_argument("--out", default="", help="folder for the --sweep report files")
    report.set_defaults(run=_report)

    pred = verbs.add_parser("predict", help="segment new studies with a fine-tuned model (labels, DICOM-SEG, PNGs)")
    pred.add_argument("model", help="finetune output_dir, model package, models:/NAME/VERSION, runs:/ID/model, run id")
    pred.add_argument("--input", required=True, help="studies: a DICOM tree, a folder in any layout `swinssl scan` "
                      "finds, a cohort CSV, or a `swinssl prepare` output folder")
    pred.add_argument("--out", required=True)
    pred.add_argument("--folds", default="all", help="fold models to ensemble, e.g. 0,2 (default: all)")
    pred.add_argument("--tta", action="store_true", help="flip test-time augmentation (8 mirrored passes)")
    pred.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:1")
    pred.add_argument("--ct-grid", action="store_true", help="also write the labels on the original CT grid")
    pred.add_argument("--no-dicom-seg", action="store_true", help="no DICOM-SEG for DICOM studies")
    pred.add_argument("--no-overlays", action="store_true", help="no overlay PNGs")
    pred.add_argument("--workers", type=_count, default=0, help="Ray actors (and prepare workers); 0 = in-process")
    pred.add_argument("--tracking-uri", default="", help="MLflow URI for models:/ and run ids "
                      "(default: MLFLOW_TRACKING_URI)")
    pred.add_argument("--quiet", action="store_true", help="no progress bars")
    pred.set_defaults(run=_predict)
    return parser


def error_message(exc: BaseException) -> str:
    """The one line (or, for several config problems, a count then one line per problem) shown for bad input."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])  # str(KeyError) would quote the message
    return str(exc) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one verb; bad input exits 2 with `swinssl <verb>: error: ...` (no traceback), see the exit codes above."""
    args = build_parser().parse_args(argv)  # usage errors: argparse prints them and exits 2
    try:
        return args.run(args)
    except input_errors() as exc:
        print(f"swinssl {args.verb}: error: {error_message(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
