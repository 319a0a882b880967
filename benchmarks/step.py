"""Benchmark what the platform costs: pretraining samples/s through Ray Train + Ray Data + MLflow against the bare
model step on in-memory tensors, same config, same machine, one command.

    python benchmarks/step.py --prepared PREPARED_DIR [--roi 64] [--feature-size 12] [--steps 10] [--warmup 2]
    python benchmarks/step.py --menu [--roi 64] [--feature-size 12] [--rounds 3] [--threads 1]

Bare: `PretrainTask.losses` + backward + AdamW on a fixed random batch held in memory, one thread (what one Train
worker with `cpus_per_worker=1` gets). Platform: `swinssl pretrain` with one Train worker, the Ray Data crop stream
from the shards, per-step reports and rank-0 MLflow logging; samples/s from the wall time between the metric
timestamps of step `warmup` and the last step. Goal (issue #3): platform / bare >= 0.9.
Without --prepared, a small synthetic cohort is made and prepared first.

`--menu`: the bare step's seconds per pretext family (the classic trio, SimMIM, cross-modal, VoCo, all of them;
weights as in experiments/pretext_menu.yaml), the families alternating in rounds, and each relative to the classic
trio. VoCo's grid: base crops of 32 voxels in plane (1 x 2 x 2 at 64^3 in plane, 1 x 3 x 3 at 96^3).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "pretrain_tiny.yaml"


def _config(prepared: Path, out: Path, args: argparse.Namespace, extra: list[str] | tuple[str, ...] = ()):
    from swinssl.config import load_config

    roi = f"[{args.roi},{args.roi},{args.roi}]"
    return load_config(EXPERIMENT, [
        f"data.root={prepared}", f"output_dir={out}", f"data.roi={roi}", f"model.feature_size={args.feature_size}",
        f"data.batch_size={args.batch}", f"trainer.steps={args.steps}", "trainer.num_workers=1",
        f"trainer.checkpoint_every={args.steps}", "trainer.log_every=1", f"tracking.tracking_uri=sqlite:///{out}.db",
        *extra,
    ])


def bare_samples_per_s(cfg, steps: int, warmup: int) -> float:
    from swinssl.tasks.pretrain import PretrainTask
    from swinssl.train.loop import build_optimizer, step_generator

    torch.set_num_threads(int(cfg.trainer.cpus_per_worker))
    task = PretrainTask(cfg)
    model = task.build_model()
    optimizer, scheduler = build_optimizer(model, cfg.optim, steps)
    batch = {"image": torch.rand(cfg.data.batch_size, 2, *cfg.data.roi)}
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        task.losses(model, batch, step_generator(0, 0, step))["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
    return (steps - warmup) * cfg.data.batch_size / (time.perf_counter() - start)


MENU_SWEEP = EXPERIMENT.parent / "pretext_menu.yaml"
FAMILIES = ("classic", "simmim", "xmodal", "voco", "all")
"""Pretext families timed by `--menu`: these settings of experiments/pretext_menu.yaml, their weights read from it."""


def menu_weights() -> dict[str, dict]:
    from swinssl.config import SweepConfig, flatten, load_config

    settings = load_config(MENU_SWEEP, (), SweepConfig).search.settings
    return {name: flatten(settings[name]) for name in FAMILIES}


def menu_step_seconds(prepared: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    """Bare seconds per step of each pretext family, the families alternating in `args.rounds` rounds (so a noisy
    machine slows them alike); the median round per family."""
    side = args.roi // 32  # VoCo: base crops of 32 voxels in plane
    configs = {name: _config(prepared, out, args, [*(f"{k}={v}" for k, v in weights.items()),
                                                   f"pretext.voco_grid=[1,{side},{side}]",
                                                   f"trainer.cpus_per_worker={args.threads}"])
               for name, weights in menu_weights().items()}
    times: dict[str, list[float]] = {name: [] for name in FAMILIES}
    for _ in range(args.rounds):
        for name, cfg in configs.items():
            times[name].append(cfg.data.batch_size / bare_samples_per_s(cfg, args.steps, args.warmup))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def platform_samples_per_s(cfg, warmup: int) -> tuple[float, dict]:
    from mlflow.tracking import MlflowClient

    from swinssl.train.launch import pretrain

    result = pretrain(cfg)
    history = MlflowClient(result.tracking_uri).get_metric_history(result.run_id, "loss")
    stamp = {m.step: m.timestamp / 1000.0 for m in history}
    last = max(stamp)
    return (last - warmup) * cfg.data.batch_size / (stamp[last] - stamp[warmup]), result.metrics


def _prepared(args: argparse.Namespace, work: Path) -> Path:
    if args.prepared:
        return Path(args.prepared).resolve()
    from petct.config import PrepareConfig
    from petct.pipeline import prepare_cohort
    from petct.synth import synth_cohort

    csv = synth_cohort(work / "cohort", unlabeled=4, labeled=0, seed=1, scale="small")
    prepare_cohort(csv, work / "prepared", PrepareConfig(qc_png=False), workers=2, progress=False)
    return work / "prepared"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", default="")
    parser.add_argument("--roi", type=int, default=64)
    parser.add_argument("--feature-size", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="bench_out/step")
    parser.add_argument("--menu", action="store_true", help="bare step cost per pretext family instead (no Ray)")
    parser.add_argument("--rounds", type=int, default=3, help="--menu: alternating rounds per family")
    parser.add_argument("--threads", type=int, default=1, help="--menu: torch threads")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.menu:
        return _menu(args, out)

    import ray

    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", configure_logging=False,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    prepared = _prepared(args, out)
    with tempfile.TemporaryDirectory(dir=out) as run_dir:
        cfg = _config(prepared, Path(run_dir) / "run", args)
        platform, final = platform_samples_per_s(cfg, args.warmup)
        bare = bare_samples_per_s(cfg, args.steps, args.warmup)
    result = {"roi": args.roi, "feature_size": args.feature_size, "batch_per_worker": args.batch,
              "steps": args.steps, "warmup": args.warmup, "bare_samples_per_s": round(bare, 4),
              "platform_samples_per_s": round(platform, 4), "ratio": round(platform / bare, 3),
              "platform_data_wait_fraction_last": round(final.get("data_wait_fraction", float("nan")), 4)}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


def _menu(args: argparse.Namespace, out: Path) -> dict:
    seconds = menu_step_seconds(out, out / "unused", args)
    result = {"roi": args.roi, "feature_size": args.feature_size, "batch": args.batch, "threads": args.threads,
              "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
              "seconds_per_step": {k: round(v, 3) for k, v in seconds.items()},
              "relative_to_classic": {k: round(v / seconds["classic"], 2) for k, v in seconds.items()}}
    (out / "menu.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
