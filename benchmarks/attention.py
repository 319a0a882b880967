"""Benchmark Swin window attention: MONAI's eager attention against the SDPA forward of `model.fused_attention`.

    python benchmarks/attention.py [--roi 64] [--feature-size 24] [--batch 2] [--reps 3] [--threads 1]
                                   [--out bench_out/attention]

The encoder is SSLModel's MONAI SwinTransformer (window 7, depths 2/2/2/2); the fused copy is a deep copy switched
by `use_fused_attention`, so both hold the same weights. Per precision (float32, CPU bf16 autocast) and mode
(forward + backward of a fixed random projection of the five feature maps; forward only under `torch.no_grad`),
eager and fused alternate for `--reps` rounds after one warm-up each; the table gives the median seconds and
eager / fused (> 1: fused is faster). The largest output difference between the two is printed as a sanity check.
"fused" is SDPA in every row here: with `model.fused_attention` on, float32 forward+backward on a CPU runs MONAI's
own forward instead (`FusedWindowAttention.eager_cpu_float_training`), as SDPA is not faster there.
Writes `<out>/result.json`. Peak RSS: ~2 GB at batch 1, ~3.3 GB at batch 2 (MONAI's float32 backward).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch


def _step(net: torch.nn.Module, x: torch.Tensor, weights: list[torch.Tensor], bf16: bool, backward: bool):
    """One encoder pass (and backward); returns the feature maps in float32."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with torch.set_grad_enabled(backward), autocast:
        outs = net(x)
    if backward:
        net.zero_grad(set_to_none=True)
        sum((o.float() * w).sum() for o, w in zip(outs, weights)).backward()
    return [o.detach().float() for o in outs]


def measure(args: argparse.Namespace) -> dict:
    from swinssl.models.fused_attention import FusedWindowAttention, use_fused_attention
    from swinssl.models.ssl_head import SSLModel

    # SDPA in every row, float32 training included (by default that one CPU case runs MONAI's forward)
    FusedWindowAttention.eager_cpu_float_training = False
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    eager = SSLModel(in_channels=2, feature_size=args.feature_size).swinViT
    fused = copy.deepcopy(eager)
    switched = use_fused_attention(fused)
    x = torch.randn(args.batch, 2, *(args.roi,) * 3)
    with torch.no_grad():
        weights = [torch.randn_like(o) for o in eager(x)]
    rows = [_compare(eager, fused, x, weights, bf16, backward, args.reps)
            for bf16 in (False, True) for backward in (True, False)]
    return {"device": "cpu", "threads": args.threads, "torch": torch.__version__, "roi": args.roi,
            "feature_size": args.feature_size, "batch": args.batch, "reps": args.reps,
            "switched_modules": switched, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            "rows": rows}


def _compare(eager: torch.nn.Module, fused: torch.nn.Module, x: torch.Tensor, weights: list[torch.Tensor],
             bf16: bool, backward: bool, reps: int) -> dict:
    """Median seconds of eager and fused, alternating, after one warm-up round; prints and returns the row."""
    times: dict[str, list[float]] = {"eager": [], "fused": []}
    outs = {}
    for rep in range(reps + 1):
        for name, net in (("eager", eager), ("fused", fused)):
            start = time.perf_counter()
            outs[name] = _step(net, x, weights, bf16, backward)
            if rep:
                times[name].append(round(time.perf_counter() - start, 3))
    e, f = statistics.median(times["eager"]), statistics.median(times["fused"])
    diff = max((a - b).abs().max().item() for a, b in zip(outs["eager"], outs["fused"]))
    row = {"precision": "bf16-autocast" if bf16 else "float32",
           "mode": "forward+backward" if backward else "forward (no grad)", "eager_s": e, "fused_s": f,
           "speedup": round(e / f, 2), "max_abs_output_diff": float(f"{diff:.3g}"), "eager_all_s": times["eager"],
           "fused_all_s": times["fused"]}
    print(_row(row), flush=True)
    return row


def _row(r: dict) -> str:
    return (f"{r['precision']:<14} {r['mode']:<18} {r['eager_s']:>8.3f} {r['fused_s']:>8.3f} {r['speedup']:>7.2f}"
            f" {r['max_abs_output_diff']:>10.3g}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--roi", type=int, default=64)
    parser.add_argument("--feature-size", type=int, default=24)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench_out/attention")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"{'precision':<14} {'mode':<18} {'eager s':>8} {'fused s':>8} {'speedup':>7} {'max |diff|':>10}")
    result = measure(args)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"switched {result['switched_modules']} modules, max RSS {result['max_rss_mb']} MB -> {out / 'result.json'}")
    return result


if __name__ == "__main__":
    main()
