"""Rank correlation between the pretraining probe's final Dice and the final fine-tuning Dice, across a sweep.

    python experiments/probe_correlation.py --out runs/probe_correlation [--data PREPARED] [KEY=VALUE ...]

Makes a small synthetic cohort (unless --data names a prepared folder), runs a sweep (`loss_weights_tiny.yaml` with
the `TINY` overrides below, then yours: 2 loss settings x 3 seeds, no scratch baseline; each trial pretrains with the
probe on at its last step, then fine-tunes on the probe's fold), then reads every finished trial's
`result.json`: `pretrain["probe/dice_mean"]` (the probe at the last pretraining step) and `dice_mean.mean` (the
fine-tuning's mean fold Dice). Writes `correlation.json` (per-trial pairs, Spearman's rho and its p-value, scipy's
`spearmanr`, ties averaged) and `correlation.png` (the scatter) under --out. At tiny scale the number mostly
measures noise; it is reported whatever it is.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent
SWEEP = HERE / "loss_weights_tiny.yaml"
TINY = ["name=probe_correlation_tiny", "study=probe_correlation_tiny", "scratch_baseline=false", "seeds=[0,1,2]",
        "search.grid={loss.w_contrastive: [1.0, 0.0], data.subset: ['3']}",
        "pretrain_overrides.trainer.steps=8", "pretrain_overrides.trainer.checkpoint_every=8",
        "pretrain_overrides.probe.every=8", "pretrain_overrides.probe.steps=60", "pretrain_overrides.probe.lr=0.01",
        "pretrain_overrides.probe.crops_per_study=4",
        "finetune_overrides.trainer.steps=12", "finetune_overrides.trainer.checkpoint_every=12",
        "finetune_overrides.cv.fold=0"]
"""The tiny study's settings on top of loss_weights_tiny.yaml (a sweep YAML in experiments/ would be one more study
for the experiment-config tests)."""


def prepare(out: Path, unlabeled: int, labeled: int) -> Path:
    from petct.pipeline import prepare_cohort
    from petct.raylocal import ensure_ray
    from petct.synth import synth_cohort

    root = out / "prepared"
    if not (root / "manifest.jsonl").exists():
        ensure_ray(min_cpus=4)
        csv = synth_cohort(out / "cohort", unlabeled=unlabeled, labeled=labeled, seed=11, scale="small")
        prepare_cohort(csv, root, workers=2, progress=False)
    return root


def run_sweep(root: Path, out: Path, extra: list[str]) -> Path:
    from swinssl.config import SweepConfig, load_config
    from swinssl.tune.sweep import resolve_stage_paths, sweep

    sweep_dir = out / "sweep"
    overrides = [*TINY, *extra, f"data.root={root}", f"output_dir={sweep_dir}",
                 f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}"]
    cfg = resolve_stage_paths(load_config(SWEEP, overrides, SweepConfig), SWEEP)
    sweep(cfg, resume=(sweep_dir / "trials.json").exists())
    return sweep_dir


def pairs(sweep_dir: Path) -> list[dict]:
    """(trial, probe Dice, fine-tune Dice) of every finished trial."""
    rows = []
    for path in sorted((sweep_dir / "trials").glob("*/result.json")):
        result = json.loads(path.read_text())
        probe, fine = result["pretrain"].get("probe/dice_mean"), result["dice_mean"]["mean"]
        if probe is None or fine is None or math.isnan(probe) or math.isnan(fine):
            continue
        rows.append({"trial": result["name"], "probe_dice": probe, "finetune_dice": fine})
    return rows


def correlate(rows: list[dict]) -> dict:
    from scipy.stats import spearmanr

    if len(rows) < 3:
        return {"n": len(rows), "spearman_rho": None, "p_value": None, "note": "fewer than 3 finished trials"}
    rho, p = spearmanr([r["probe_dice"] for r in rows], [r["finetune_dice"] for r in rows])
    rho, p = float(rho), float(p)
    return {"n": len(rows), "spearman_rho": None if math.isnan(rho) else rho, "p_value": None if math.isnan(p) else p,
            "note": "NaN: one side is constant" if math.isnan(rho) else ""}


def plot(rows: list[dict], stats: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([r["probe_dice"] for r in rows], [r["finetune_dice"] for r in rows])
    for r in rows:
        ax.annotate(r["trial"], (r["probe_dice"], r["finetune_dice"]), fontsize=7)
    rho = stats["spearman_rho"]
    ax.set_title(f"probe vs fine-tune Dice: Spearman rho = {'n/a' if rho is None else f'{rho:+.2f}'} "
                 f"(n={stats['n']})", fontsize=9)
    ax.set_xlabel("probe/dice_mean at the last pretraining step")
    ax.set_ylabel("fine-tune dice_mean")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/probe_correlation"))
    parser.add_argument("--data", type=Path, default=None, help="a prepared folder (default: a synthetic cohort)")
    parser.add_argument("--unlabeled", type=int, default=3)
    parser.add_argument("--labeled", type=int, default=4)
    parser.add_argument("overrides", nargs="*", help="sweep config overrides, e.g. seeds=[0,1,2,3]")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    root = args.data.resolve() if args.data else prepare(out, args.unlabeled, args.labeled)
    rows = pairs(run_sweep(root, out, args.overrides))
    stats = correlate(rows)
    (out / "correlation.json").write_text(json.dumps({**stats, "trials": rows}, indent=1))
    if rows:
        plot(rows, stats, out / "correlation.png")
    print(json.dumps(stats))
    return stats


if __name__ == "__main__":
    main()
