"""Benchmark what the platform costs: pretraining samples/s through Ray Train + Ray Data + MLflow against the bare
model step on in-memory tensors, same config, same machine, one command.

    python benchmarks/step.py --prepared PREPARED_DIR [--roi 64] [--feature-size 12] [--steps 10] [--warmup 2]

Bare: `PretrainTask.losses` + backward + AdamW on a fixed random batch held in memory, one thread (what one Train
worker with `cpus_per_worker=1` gets). Platform: `swinssl pretrain` with one Train worker, the Ray Data crop stream
from the shards, per-step reports and rank-0 MLflow logging; samples/s from the wall time between the metric
timestamps of step `warmup` and the last step. Goal (issue #3): platform / bare >= 0.9.
Without --prepared, a small synthetic cohort is made and prepared first.
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


def _config(prepared: Path, out: Path, args: argparse.Namespace):
    from swinssl.config import load_config

    roi = f"[{args.roi},{args.roi},{args.roi}]"
    return load_config(EXPERIMENT, [
        f"data.root={prepared}", f"output_dir={out}", f"data.roi={roi}", f"model.feature_size={args.feature_size}",
        f"data.batch_size={args.batch}", f"trainer.steps={args.steps}", "trainer.num_workers=1",
        f"trainer.checkpoint_every={args.steps}", "trainer.log_every=1", f"tracking.tracking_uri=sqlite:///{out}.db",
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
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

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


if __name__ == "__main__":
    main(sys.argv[1:])
