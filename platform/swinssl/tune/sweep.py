"""Driver of `swinssl sweep`: expand the search into trials, open the sweep's MLflow run, run the trials with Ray
Tune (a function trainable per trial, see trial.py), reconcile their outcome with MLflow, write the report.

Outputs under `output_dir`: `config.yaml` (resolved), `trials.json` (the trial list: a resume must match it),
`mlflow_run.json` (the sweep run), `tune/` (Tune's experiment: `--resume` restores it), `trials/<key>/` (one
trial, see trial.py), `summary.json` (status per trial), `report/` (see report.py).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from petct.shards import atomic_write_json

from ..config import ConfigError, SweepConfig, save_config
from ..data.studies import check_roi_fits, select_studies
from .space import TrialSpec, expand_trials
from .trial import FAIL_ENV, run_trial, stage_configs

EXIT_TRIALS_FAILED = 3


@dataclass
class SweepResult:
    output_dir: Path
    trials: list[dict]
    """{key, name, status: FINISHED | FAILED | KILLED, error} per trial, in trial order."""
    run_id: str | None
    tracking_uri: str | None
    report: str
    """The Markdown report ('' without MLflow)."""

    @property
    def failed(self) -> list[str]:
        return [t["name"] for t in self.trials if t["status"] != "FINISHED"]


def resolve_stage_paths(cfg: SweepConfig, config_path: str | Path | None) -> SweepConfig:
    """`pretrain:`/`finetune:` are relative to the sweep YAML (then the cwd); store them absolute."""
    def locate(name: str) -> str:
        candidates = [Path(config_path).resolve().parent / name] if config_path else []
        for path in [*candidates, Path(name).resolve()]:
            if path.exists():
                return str(path)
        raise ConfigError(f"stage config {name!r} not found next to {config_path} or in the working directory")

    return replace(cfg, pretrain=locate(cfg.pretrain), finetune=locate(cfg.finetune))


def _validate(cfg: SweepConfig, specs: list[TrialSpec], sweep_dir: Path) -> dict:
    """Build every trial's configs and check its data now, so a bad value fails before any trial is launched;
    returns the resources one trial holds at a time."""
    from ..train.finetune import data_problems
    from ..train.probe import probe_problems

    if not cfg.output_dir or not cfg.data.root:
        raise ConfigError("output_dir and data.root are required")
    ctx = {"uri": "", "experiment": cfg.tracking.experiment}
    need = {"CPU": 0.0, "GPU": 0.0}
    tuned = {}  # one fine-tuning config per distinct finetune.* values (e.g. cv.train_studies), checked below
    early = []  # per-trial problems reported together before any trial runs
    for spec in specs:
        pretrain_cfg, finetune_cfg = stage_configs(spec, cfg, sweep_dir / "trials" / spec.key, ctx)
        tuned.setdefault(repr(sorted(spec.finetune_overrides().items())), finetune_cfg)
        for stage in filter(None, (pretrain_cfg, finetune_cfg)):
            need["CPU"] = max(need["CPU"], stage.trainer.num_workers * stage.trainer.cpus_per_worker
                              + stage.data.read_cpus)
            need["GPU"] = max(need["GPU"], stage.trainer.num_workers if stage.trainer.use_gpu else 0)
        if pretrain_cfg is not None:
            early += _probe_metric_problems(cfg, spec, pretrain_cfg) + probe_problems(pretrain_cfg)
            if pretrain_cfg.model.use_v2 != finetune_cfg.model.use_v2:  # fine-tuning would refuse the encoder
                early.append(f"trial {spec.name!r}: model.use_v2={pretrain_cfg.model.use_v2} pretrains a "
                             f"SwinUNETR{'-V2' if pretrain_cfg.model.use_v2 else ''} encoder but "
                             f"finetune.model.use_v2={finetune_cfg.model.use_v2}; set both (e.g. in one "
                             f"search.settings entry)")
            try:
                studies = select_studies(cfg.data.root, pretrain_cfg.data.cohort, pretrain_cfg.data.subset)
                check_roi_fits(studies, pretrain_cfg.data.roi)
            except ValueError as exc:
                raise type(exc)(f"trial {spec.name!r}: {exc}") from None
    if early:
        raise ConfigError("; ".join(dict.fromkeys(early)), list(dict.fromkeys(early)))
    problems = list(dict.fromkeys(p for tuned_cfg in tuned.values() for p in data_problems(tuned_cfg)[0]))
    if problems:
        raise ConfigError("fine-tuning: " + "; ".join(problems), problems)
    return need


def max_concurrent_trials(cfg: SweepConfig, need: dict) -> int:
    """`max_concurrent_trials` from the config, else what the cluster's CPUs and GPUs hold (at least 1)."""
    if cfg.max_concurrent_trials > 0:
        return cfg.max_concurrent_trials
    import ray

    have = ray.cluster_resources()
    fits = [math.floor(have.get(kind, 0) / amount) for kind, amount in need.items() if amount > 0]
    return max(1, min(fits, default=1))


def scheduler_mode(cfg: SweepConfig) -> str:
    """'min' or 'max' for ASHA: `scheduler.mode`, or with 'auto' max for a Dice metric and min otherwise."""
    if cfg.scheduler.mode != "auto":
        return cfg.scheduler.mode
    return "max" if "dice" in cfg.scheduler.metric.lower() else "min"


def _probe_metric_problems(cfg: SweepConfig, spec: TrialSpec, pretrain_cfg) -> list[str]:
    """ASHA on a `probe/*` metric needs the probe on in every pretraining, and its first probe before the grace
    period ends (until then the metric is NaN, which ASHA can neither rank nor stop on)."""
    if not (cfg.scheduler.asha and cfg.scheduler.metric.startswith("probe/")):
        return []
    if pretrain_cfg.probe.every <= 0:
        return [f"scheduler.metric: {cfg.scheduler.metric!r} needs the probe in the pretraining of trial "
                f"{spec.name!r} (set pretrain_overrides.probe.every > 0)"]
    t = pretrain_cfg.trainer
    first = min(pretrain_cfg.probe.every, t.steps) * pretrain_cfg.data.batch_size * t.num_workers * t.grad_accum
    if cfg.scheduler.grace_samples < first:
        return [f"scheduler.grace_samples: {cfg.scheduler.grace_samples} but trial {spec.name!r} probes first at "
                f"{first} samples seen; set grace_samples >= {first}"]
    return []


def _scheduler(cfg: SweepConfig, specs: list[TrialSpec], sweep_dir: Path):
    if not cfg.scheduler.asha:
        return None
    from ray.tune.schedulers import ASHAScheduler

    max_samples = cfg.scheduler.max_samples
    if not max_samples:
        first = next(s for s in specs if s.init == "pretrained")
        pre = stage_configs(first, cfg, sweep_dir, {"uri": "", "experiment": ""})[0]
        max_samples = (pre.trainer.steps * pre.data.batch_size * pre.trainer.num_workers * pre.trainer.grad_accum)
    # stop_last_trials=False: a pretraining's last report reaches max_t, and ASHA's default would stop every trial
    # there, before its fine-tuning (the trial's actual result)
    return ASHAScheduler(time_attr="samples_seen", metric=cfg.scheduler.metric, mode=scheduler_mode(cfg),
                         max_t=max_samples, grace_period=cfg.scheduler.grace_samples,
                         reduction_factor=cfg.scheduler.reduction_factor, stop_last_trials=False)


PROGRESS_PREFIX = "[sweep]"


def _progress_callback(total: int):
    """A Tune callback that prints one `[sweep] ...` line per trial started, finished or failed (with its name,
    `dice_mean` and elapsed time) to stdout, flushed: a long sweep shows where it is even when its stdout is a file or
    a pipe (`scripts/demo.sh` shows these lines). Tune's own status table (every 30 s) names trials by Tune id."""
    import time

    from ray.tune import Callback

    class Progress(Callback):
        def __init__(self):
            self.start, self.ended = time.monotonic(), 0

        def _say(self, trial, what: str) -> None:
            name = (trial.config.get("trial") or {}).get("name", str(trial))
            minutes, seconds = divmod(int(time.monotonic() - self.start), 60)
            print(f"{PROGRESS_PREFIX} {self.ended}/{total} done [{minutes}m{seconds:02d}s] {name}: {what}", flush=True)

        def on_trial_start(self, iteration, trials, trial, **info):
            self._say(trial, "started")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.ended += 1
            result = trial.last_result or {}
            if result.get("finished") != 1:  # ended on a pretraining report: the scheduler stopped it
                self._say(trial, "stopped early")
                return
            dice = result.get("dice_mean")
            self._say(trial, "finished" + (f", dice_mean {dice:.3f}" if isinstance(dice, float) else ""))

        def on_trial_error(self, iteration, trials, trial, **info):
            self.ended += 1
            self._say(trial, "FAILED")

    return Progress()


def _tuner(cfg: SweepConfig, specs: list[TrialSpec], ctx: dict, sweep_dir: Path, need: dict):
    from ray import tune

    resources = {"CPU": 0.1}  # the trial function only drives; its TorchTrainer asks for the workers itself
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)
    # A resume builds a fresh Tuner over the same trial list rather than `Tuner.restore`: finished trials return at
    # once from their result.json, and the concurrency limit (which restore does not re-apply) still holds: more
    # trials than the CPUs allow would starve their own Ray Data tasks.
    return tune.Tuner(
        trainable, param_space={"trial": tune.grid_search([asdict(s) for s in specs])},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent_trials(cfg, need),
                                    scheduler=_scheduler(cfg, specs, sweep_dir), reuse_actors=False),
        run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                  callbacks=[_progress_callback(len(specs))]))


def _write_json(path: Path, data) -> None:
    atomic_write_json(path, data)


def _check_trial_list(specs: list[TrialSpec], sweep_dir: Path, resume: bool) -> None:
    listed = sweep_dir / "trials.json"
    if listed.exists() and not resume:
        raise ConfigError(f"{sweep_dir} already holds a sweep: run `swinssl sweep --resume` with the same config "
                          f"to continue it, or choose another output_dir")
    if resume and not listed.exists():
        raise ConfigError(f"--resume: {sweep_dir} holds no sweep (no trials.json)")
    if resume and [t["key"] for t in json.loads(listed.read_text())] != [s.key for s in specs]:
        raise ConfigError(f"--resume: the search in this config differs from the one started in {sweep_dir}")


def _last_line(error: BaseException) -> str:
    """The root cause of a Ray-wrapped error: the last line of its message (the first is Ray's actor banner)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _reconcile(specs: list[TrialSpec], grid, sweep_dir: Path, ctx: dict) -> list[dict]:
    """Status per trial from the files it left and Tune's result; MLflow runs of trials that died without
    closing their run (killed actor, early stop) are closed here."""
    from ..tracking import mlflow_run

    errors = {r.config["trial"]["key"]: r.error for r in grid if r.config and "trial" in r.config}
    trials = []
    for spec in specs:
        trial_dir = sweep_dir / "trials" / spec.key
        if (trial_dir / "result.json").exists():
            status, error = "FINISHED", ""
        elif (trial_dir / "stopped.json").exists():
            status, error = "KILLED", "stopped early by the scheduler"
        elif errors.get(spec.key) is not None:
            status, error = "FAILED", _last_line(errors[spec.key])
        else:
            status, error = "KILLED", "stopped early by the scheduler" if ctx["asha"] else "not run"
        if status == "KILLED" and ctx["asha"]:
            _write_json(trial_dir / "stopped.json", {"reason": error})  # a resume keeps the scheduler's decision
        record = trial_dir / mlflow_run.RUN_FILE
        if ctx["uri"] and record.exists() and status != "FINISHED":
            run_id = json.loads(record.read_text())["run_id"]
            if status == "KILLED":
                mlflow_run.set_tags(ctx["uri"], run_id, {"error": error})
            mlflow_run.finish_run(ctx["uri"], run_id, status)
        trials.append({"key": spec.key, "name": spec.name, "status": status, "error": error})
    _write_json(sweep_dir / "summary.json", trials)
    return trials


def _open_parent(cfg: SweepConfig, sweep_dir: Path, specs: list[TrialSpec]) -> tuple[str | None, str | None]:
    if not cfg.tracking.enabled:
        return None, None
    from ..tracking.mlflow_run import log_artifact, metric_key, open_run, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking, sweep_dir)
    params = {"study": cfg.study or cfg.name, "trials": len(specs), "seeds": cfg.seeds,
              "scratch_baseline": cfg.scratch_baseline, "pretrain_config": cfg.pretrain,
              "finetune_config": cfg.finetune, **{f"grid.{k}": v for k, v in cfg.search.grid.items()},
              **{f"setting.{metric_key(k)}": v for k, v in cfg.search.settings.items()},
              **{f"sample.{k}": asdict(v) for k, v in cfg.search.sample.items()}}
    run_id = open_run(uri, cfg.tracking.experiment, cfg.tracking.run_name or cfg.name, sweep_dir, params,
                      tags={"study": cfg.study or cfg.name, "swinssl.kind": "sweep"})
    log_artifact(uri, run_id, sweep_dir / "config.yaml")
    log_artifact(uri, run_id, sweep_dir / "trials.json")
    return uri, run_id


def sweep(cfg: SweepConfig, resume: bool = False) -> SweepResult:
    """Run (or `resume`) a sweep end to end; see the module docstring for the outputs."""
    from petct.raylocal import ensure_ray

    sweep_dir = Path(cfg.output_dir or ".").resolve()
    specs = expand_trials(cfg)
    _check_trial_list(specs, sweep_dir, resume)
    need = _validate(cfg, specs, sweep_dir)
    save_config(cfg, sweep_dir / "config.yaml")
    _write_json(sweep_dir / "trials.json", [asdict(s) for s in specs])
    uri, run_id = _open_parent(cfg, sweep_dir, specs)
    ensure_ray(min_cpus=need["CPU"] + 1)
    ctx = {"sweep": asdict(cfg), "sweep_dir": str(sweep_dir), "uri": uri or "", "experiment": cfg.tracking.experiment,
           "study": cfg.study or cfg.name, "sweep_name": cfg.name, "parent_run_id": run_id,
           "fail_trial": os.environ.get(FAIL_ENV, ""), "asha": cfg.scheduler.asha,
           "metric": cfg.scheduler.metric}
    grid = _tuner(cfg, specs, ctx, sweep_dir, need).fit()
    trials = _reconcile(specs, grid, sweep_dir, ctx)
    report = ""
    if uri:
        from ..tracking.mlflow_run import finish_run, set_tags
        from .report import sweep_report

        report = sweep_report(uri, run_id, sweep_dir / "report").markdown
        failed = sum(t["status"] != "FINISHED" for t in trials)
        set_tags(uri, run_id, {"swinssl.trials_failed": failed, "swinssl.trials": len(trials)})
        finish_run(uri, run_id)
    return SweepResult(sweep_dir, trials, run_id, uri, report)
