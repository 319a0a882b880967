"""One sweep trial, run by Ray Tune as a function trainable: pretrain (a TorchTrainer whose rank-0 metrics reach
Tune through TuneReportCallback), then cross-validated fine-tuning, all logged under the trial's MLflow run.

Trial folder `<sweep>/trials/<key>/`: `mlflow_run.json` (the trial run), `pretrain/` and `finetune/` (the two
stages' usual output folders, each resumable), `attempts` (one line per start), `result.json` (written last,
atomically: a trial with it is finished and is never run again).

MLflow: sweep run -> trial run (params: searched values, seed, init, unlabelled-set size; metrics: final pretext
losses and diagnostics as `pretrain/<metric>`, `dice_mean`, `dice/<class>`) -> pretraining run (loss curves,
encoder.pt) and fine-tune fold runs.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from typing import Any

from ..config import FinetuneConfig, PretrainConfig, SweepConfig, flatten, from_dict, load_config
from ..tracking import mlflow_run
from .space import TrialSpec

FAIL_ENV = "SWINSSL_CHAOS_FAIL_TRIAL"
"""Resilience testing: trials whose name contains this text raise on every attempt (read by the sweep driver)."""


def to_overrides(values: dict[str, Any]) -> list[str]:
    """Dotted `key=value` strings for `load_config` (strings as written, everything else as YAML/JSON)."""
    return [f"{k}={v}" if isinstance(v, str) else f"{k}={json.dumps(v)}" for k, v in values.items()]


def stage_configs(spec: TrialSpec, sweep: SweepConfig, trial_dir: Path, ctx: dict) -> tuple[PretrainConfig | None,
                                                                                                FinetuneConfig]:
    """The trial's two configs: the stage YAML <- sweep-wide overrides <- the trial's values <- sweep plumbing."""
    common = {"data.root": sweep.data.root, "trainer.seed": spec.seed, "tracking.tracking_uri": ctx["uri"],
              "tracking.experiment": ctx["experiment"], "tracking.enabled": bool(ctx["uri"])}
    pretrain_cfg = None
    if spec.init == "pretrained":
        values = {**flatten(sweep.pretrain_overrides), **spec.pretrain_overrides(), **common,
                  "output_dir": str(trial_dir / "pretrain"), "tracking.run_name": f"{spec.name} | pretrain"}
        pretrain_cfg = load_config(sweep.pretrain, to_overrides(values), PretrainConfig)
    values = {**flatten(sweep.finetune_overrides), **spec.finetune_overrides(), **common,
              "output_dir": str(trial_dir / "finetune"), "tracking.run_name": spec.name,
              "encoder": str(trial_dir / "pretrain" / "encoder.pt") if pretrain_cfg else ""}
    finetune_cfg = load_config(sweep.finetune, to_overrides(values), FinetuneConfig)
    if pretrain_cfg is not None:  # the probe splits the labelled studies as this trial's fine-tuning does
        pretrain_cfg.probe.folds, pretrain_cfg.probe.cv_seed = finetune_cfg.cv.folds, finetune_cfg.cv.seed
    return pretrain_cfg, finetune_cfg


def _open_trial_run(spec: TrialSpec, ctx: dict, trial_dir: Path) -> str | None:
    if not ctx["uri"]:
        return None
    params = {**spec.values, "seed": spec.seed, "init": spec.init, "setting": spec.setting, "trial": spec.key}
    tags = {"study": ctx["study"], "swinssl.kind": "sweep-trial", "swinssl.init": spec.init,
            "swinssl.setting": spec.setting, "swinssl.sweep": ctx["sweep_name"]}
    return mlflow_run.open_run(ctx["uri"], ctx["experiment"], spec.name, trial_dir, params, tags,
                               parent_run_id=ctx["parent_run_id"])


def _count_attempt(trial_dir: Path) -> int:
    path = trial_dir / "attempts"
    with open(path, "a") as handle:
        handle.write(f"pid {os.getpid()}\n")
    return len(path.read_text().splitlines())


def _trial_metric(key: str) -> bool:
    """A pretraining metric the trial run shows as `pretrain/<key>`: the losses, the probe, a pretext task's own
    diagnostics (`<task>/<name>`, e.g. xmodal/ct_from_pet, voco/pos) and the samples seen."""
    from ..tasks.registry import registered

    tasks = tuple(f"{t.name}/" for t in registered())
    return key.startswith(("loss", "probe/", *tasks)) or key == "samples_seen"


def _pretrain(cfg: PretrainConfig, run_id: str | None, ctx: dict) -> tuple[dict, int]:
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..train.launch import pretrain

    result = pretrain(cfg, parent_run_id=run_id, callbacks=[TuneReportCallback()])
    final = {k: v for k, v in result.metrics.items() if _trial_metric(k)}
    if run_id:
        buffer = mlflow_run.MetricBuffer(ctx["uri"], run_id, prefix="pretrain/")
        buffer.log(final, step=0)
        buffer.flush()
    return final, result.num_studies


def _execute(spec: TrialSpec, sweep: SweepConfig, trial_dir: Path, run_id: str | None, ctx: dict) -> dict:
    from ..train.finetune import finetune

    pretrain_cfg, finetune_cfg = stage_configs(spec, sweep, trial_dir, ctx)
    pretrained, n_unlabeled = {}, 0
    if pretrain_cfg is not None:
        pretrained, n_unlabeled = _pretrain(pretrain_cfg, run_id, ctx)
    if run_id:
        mlflow_run.log_run_params(ctx["uri"], run_id, {"n_unlabeled": n_unlabeled})
        mlflow_run.attach_run(finetune_cfg.output_dir, ctx["uri"], run_id, ctx["experiment"])
    dice = finetune(finetune_cfg).metrics["summary"]["dice"]  # {class name: {mean, std}, "mean": {mean, std}}
    return {"trial": spec.key, "name": spec.name, "setting": spec.setting, "init": spec.init, "seed": spec.seed,
            "values": spec.values, "n_unlabeled": n_unlabeled, "pretrain": pretrained, "run_id": run_id,
            "dice_mean": dice["mean"], "per_class": {k: v for k, v in dice.items() if k != "mean"}}


def tune_metrics(result: dict, metric: str = "loss") -> dict[str, float]:
    """What a finished trial reports to Tune (ASHA needs its `metric` and time attribute in every result; the
    scratch baseline, which does not pretrain, reports NaN for a pretraining metric)."""
    return {"dice_mean": result["dice_mean"]["mean"] if result["dice_mean"]["mean"] is not None else float("nan"),
            "loss": result["pretrain"].get("loss", float("nan")), metric: result["pretrain"].get(metric, float("nan")),
            **{k: v for k, v in result["pretrain"].items() if k.startswith("probe/")},
            "samples_seen": result["pretrain"].get("samples_seen", 0), "finished": 1}


def _write_result(path: Path, result: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


def run_trial(config: dict, ctx: dict) -> None:
    """Tune function trainable. `config["trial"]`: a TrialSpec as a dict; `ctx`: the sweep's shared context."""
    from ray import tune

    spec = TrialSpec(**config["trial"])
    trial_dir = Path(ctx["sweep_dir"]) / "trials" / spec.key
    trial_dir.mkdir(parents=True, exist_ok=True)
    done = trial_dir / "result.json"
    if done.exists():  # finished in an earlier run of the sweep: never redone
        tune.report(tune_metrics(json.loads(done.read_text()), ctx.get("metric", "loss")))
        return
    if (trial_dir / "stopped.json").exists():  # early-stopped in an earlier run: the decision stands
        tune.report({"loss": float("nan"), ctx.get("metric", "loss"): float("nan"), "samples_seen": 0, "finished": 0})
        return
    run_id = _open_trial_run(spec, ctx, trial_dir)
    attempt = _count_attempt(trial_dir)
    try:
        if ctx.get("fail_trial") and ctx["fail_trial"] in spec.name:
            raise RuntimeError(f"chaos: {FAIL_ENV}={ctx['fail_trial']!r} fails trial {spec.name!r} "
                               f"(attempt {attempt})")
        result = _execute(spec, from_dict(ctx["sweep"], SweepConfig), trial_dir, run_id, ctx)
    except Exception as exc:
        if run_id:
            mlflow_run.set_tags(ctx["uri"], run_id, {"error": f"{type(exc).__name__}: {exc}", "attempts": attempt})
            (trial_dir / "error.txt").write_text(traceback.format_exc())
            mlflow_run.log_artifact(ctx["uri"], run_id, trial_dir / "error.txt")
            mlflow_run.finish_run(ctx["uri"], run_id, "FAILED")
        raise
    _write_result(done, result)
    if run_id:
        mlflow_run.set_tags(ctx["uri"], run_id, {"attempts": attempt, "error": ""})
        mlflow_run.finish_run(ctx["uri"], run_id)
    tune.report(tune_metrics(result, ctx.get("metric", "loss")))
