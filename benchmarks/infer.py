"""Benchmark whole-study inference: `swinssl.eval.infer.predict_volume` vs MONAI sliding window with its defaults.

    python benchmarks/infer.py [--feature-size 12] [--roi 64] [--threads 2] [--train-steps 60] [--weights PATH]
                               [--repeats 1] [--out bench_out/infer]

What it measures, all in this one process, same SwinUNETR weights, same roi, same thread count, both under
`torch.inference_mode`, warm-up (first forward passes at both batch sizes) excluded:
(a) baseline: `sliding_window_inference(image, roi, sw_batch_size=1, predictor=model)` with MONAI's defaults
    (overlap 0.25, constant blending) over the whole volume, then argmax;
(b) ours: `predict_volume(model, image, roi)` with its defaults (body box only, gaussian blending, 4 windows per
    forward, bf16 autocast and channels_last_3d only on CUDA).
On ONE full-scale synthetic prepared study (168 x 168 x ~320 PET grid, most of it air): studies/s of each (median
wall time of `--repeats` interleaved runs; process CPU time too, and the windows each ran: CPU timings on a shared
machine are noisy, the window ratio is not), the Dice of each prediction against the label, and - because the Dice of
a barely trained model says little - the agreement of the two predictions (fraction of identical voxels inside the
body box, and overall) and the foreground each predicts outside the body box (what cropping discards).
Without `--weights` the SwinUNETR is first trained for `--train-steps` AdamW steps of DiceCE on random roi crops of
this same study (a third centred on a labelled voxel, the rest uniform): 60 steps (~3 min on 2 idle cores) make it
predict background on air and agree with itself across tilings; after 30 it is still so undertrained that moving
the window grid flips a fifth of the body voxels. `--weights` loads a trained SwinUNETR state_dict instead.
Goal: ours >= 1.5x the studies/s of the baseline at equal Dice.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def prepared_study(out: Path, seed: int):
    """One full-scale labelled synthetic study, prepared (cached in `out`); returns its PreparedStudy and the
    prepared folder's label set."""
    from petct.config import PrepareConfig
    from petct.labels import read_label_set
    from petct.pipeline import prepare_cohort
    from petct.shards import read_shard
    from petct.synth import synth_cohort

    shards = sorted((out / "prepared" / "shards").glob("*.parquet"))
    if len(shards) != 1:
        csv = synth_cohort(out / "cohort", unlabeled=0, labeled=1, seed=seed, scale="full")
        summary = prepare_cohort(csv, out / "prepared", PrepareConfig(qc_png=False), workers=0, progress=False)
        assert all(r["status"] == "ok" for r in summary.records), summary.records
        shards = sorted((out / "prepared" / "shards").glob("*.parquet"))
    return read_shard(shards[0]), read_label_set(out / "prepared")


def load_weights(model: torch.nn.Module, path: str) -> None:
    """A trained SwinUNETR state_dict, plain or under key "model"."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    model.load_state_dict(state)


def _crop_starts(label: np.ndarray, roi: tuple[int, ...], rng: np.random.Generator,
                 fg_fraction: float) -> tuple[int, ...]:
    """Corner of a random roi crop: centred on a labelled voxel with probability `fg_fraction`, else uniform."""
    shape = label.shape
    if rng.random() < fg_fraction:
        fg = np.argwhere(label > 0)
        centre = fg[rng.integers(len(fg))]
    else:
        centre = [rng.integers(n) for n in shape]
    return tuple(int(min(max(c - r // 2, 0), max(n - r, 0))) for c, r, n in zip(centre, roi, shape))


def quick_train(model: torch.nn.Module, image: np.ndarray, label: np.ndarray, roi: tuple[int, ...], steps: int,
                seed: int, lr: float = 3e-3, fg_fraction: float = 1 / 3) -> list[float]:
    """`steps` AdamW steps of DiceCE on random roi crops (batch 1) of the study; returns the losses."""
    from monai.losses import DiceCELoss

    rng = np.random.default_rng(seed)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-5)
    model.train()
    losses = []
    for _ in range(steps):
        box = tuple(slice(s, s + r) for s, r in zip(_crop_starts(label, roi, rng, fg_fraction), roi))
        x = torch.from_numpy(np.ascontiguousarray(image[(slice(None), *box)]))[None]
        y = torch.from_numpy(label[box].astype(np.int64))[None, None]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


class WindowCounter:
    """Counts the windows a model sees (sum of forward batch sizes) through a forward hook."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.count = 0
        model.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.count += int(inputs[0].shape[0])


def baseline(model: torch.nn.Module, image: torch.Tensor, roi: tuple[int, ...]) -> np.ndarray:
    """MONAI sliding window with its defaults over the whole volume, argmax to uint8 (the same output as ours)."""
    from monai.inferers import sliding_window_inference

    with torch.inference_mode():
        logits = sliding_window_inference(image[None], roi, 1, model)
        return logits[0].argmax(0).to(torch.uint8).numpy()


def timed(fn, counter: WindowCounter) -> dict:
    """Run `fn()`; returns its prediction, wall and process CPU seconds, and the windows run."""
    counter.count = 0
    wall, cpu = time.perf_counter(), time.process_time()
    prediction = fn()
    return {"prediction": prediction, "wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
            "windows": counter.count}


def summarise(runs: list[dict], config: str) -> dict:
    """Median wall/CPU seconds of the repeats, studies/s, windows and wall seconds per window."""
    wall = statistics.median(r["wall"] for r in runs)
    return {"seconds": round(wall, 2), "cpu_seconds": round(statistics.median(r["cpu"] for r in runs), 2),
            "studies_per_s": round(1 / wall, 4), "windows": runs[-1]["windows"],
            "seconds_per_window": round(wall / runs[-1]["windows"], 3), "config": config}


def _dice(pred: np.ndarray, truth: np.ndarray, labels) -> dict:
    from swinssl.eval.metrics import dice_per_class, mean_dice

    per_class = dice_per_class(pred, truth, labels.num_classes)
    return {"mean": _round(mean_dice(per_class)),
            "per_class": {labels.name(c): _round(v) for c, v in per_class.items()}}


def _round(value: float, digits: int = 4) -> float | None:
    return None if math.isnan(value) else round(float(value), digits)


def compare(base: np.ndarray, ours: np.ndarray, box: tuple[slice, ...]) -> dict:
    """Agreement of the two predictions inside the body box and overall; baseline foreground outside the box."""
    outside = np.ones(base.shape, bool)
    outside[box] = False
    return {
        "agreement_in_body_box": _round(float(np.mean(base[box] == ours[box])), 5),
        "agreement_whole_volume": _round(float(np.mean(base == ours)), 5),
        "baseline_foreground_voxels_outside_box": int(np.count_nonzero(base[outside])),
        "ours_foreground_voxels_outside_box": int(np.count_nonzero(ours[outside])),
    }


def write_figures(study, base: np.ndarray, ours: np.ndarray, out: Path, labels) -> None:
    """The module's own outputs for this run: prediction NIfTI, overlay PNG, Dice bar chart of both."""
    from swinssl.eval.infer import save_prediction
    from swinssl.eval.plots import dice_bar_chart, overlay_png

    save_prediction(study, ours, out / f"{study.study_id}_pred.nii.gz")
    overlay_png(study, ours, out / f"{study.study_id}_overlay.png", labels, title=f"{study.study_id}: predict_volume")
    series = {"monai default": _dice(base, study.label, labels)["per_class"],
              "predict_volume": _dice(ours, study.label, labels)["per_class"]}
    dice_bar_chart(series, out / "dice.png", [labels.name(c) for c in labels.foreground],
                   title=f"{study.study_id}: Dice vs truth")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--feature-size", type=int, default=12)
    parser.add_argument("--roi", type=int, default=64, help="cubic window edge (a multiple of 32)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=60, help="quick DiceCE training when no --weights")
    parser.add_argument("--train-lr", type=float, default=3e-3)
    parser.add_argument("--weights", default=None, help="trained SwinUNETR state_dict (plain or under 'model')")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each, interleaved; median reported")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--out", default="bench_out/infer")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from monai.networks.nets import SwinUNETR

    from swinssl.eval.infer import body_box, predict_volume

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    study, labels = prepared_study(out, args.seed)
    roi = (args.roi,) * 3
    model = SwinUNETR(in_channels=2, out_channels=labels.num_classes, feature_size=args.feature_size)
    start = time.perf_counter()
    losses = []
    if args.weights:
        load_weights(model, args.weights)
    elif args.train_steps > 0:
        losses = quick_train(model, study.image, study.label, roi, args.train_steps, args.seed, args.train_lr)
    train_s = time.perf_counter() - start
    model.eval()
    image = torch.from_numpy(study.image)
    with torch.inference_mode():  # warm-up: the first forward at each batch size pays one-time costs
        for batch in (1, 4):
            model(torch.zeros(batch, 2, *roi))
    counter = WindowCounter(model)
    runs: dict[str, list] = {"baseline": [], "ours": []}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):  # interleaved, so load from elsewhere on the machine hits both alike
        runs["baseline"].append(timed(lambda: baseline(model, image, roi), counter))
        runs["ours"].append(timed(lambda: predict_volume(model, image, roi, labels.num_classes), counter))
    load_after = os.getloadavg()[0]
    base, ours = runs["baseline"][-1]["prediction"], runs["ours"][-1]["prediction"]
    timing = {"baseline": summarise(runs["baseline"], "sliding_window_inference defaults: whole volume, "
                                                      "sw_batch_size=1, overlap=0.25, mode=constant"),
              "ours": summarise(runs["ours"], "predict_volume defaults: body box, sw_batch_size=4, overlap=0.25, "
                                              "mode=gaussian")}
    box = body_box(study.image)
    write_figures(study, base, ours, out, labels)

    result = {
        "study": study.study_id, "grid_zyx": list(study.image.shape[1:]),
        "body_box_zyx": [[s.start, s.stop] for s in box],
        "body_box_fraction": _round(float(np.prod([s.stop - s.start for s in box]) / np.prod(base.shape)), 4),
        "feature_size": args.feature_size, "roi": list(roi), "threads": args.threads, "repeats": args.repeats,
        "weights": args.weights, "train_steps": 0 if args.weights else args.train_steps, "train_s": round(train_s, 1),
        "train_loss_first_last": [round(losses[0], 4), round(losses[-1], 4)] if losses else None,
        **timing,
        "speedup": round(timing["baseline"]["seconds"] / timing["ours"]["seconds"], 2),
        "speedup_cpu_time": round(timing["baseline"]["cpu_seconds"] / timing["ours"]["cpu_seconds"], 2),
        "window_ratio": round(timing["baseline"]["windows"] / timing["ours"]["windows"], 2),
        "goal_speedup": 1.5,
        "load_average_1min_before_after": [round(load_before, 2), round(load_after, 2)],
        "dice_vs_truth": {"baseline": _dice(base, study.label, labels), "ours": _dice(ours, study.label, labels)},
        **compare(base, ours, box),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
