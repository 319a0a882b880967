"""GPU benchmark of the Swin step, one command: pretraining and fine-tuning samples/s for eager fp32 / bf16 /
bf16 + fused attention / + torch.compile, peak memory, utilisation against counted FLOPs, sliding-window inference
windows/s, and what the step consumes against what the loader delivers.

    python benchmarks/gpu.py                      # on a CUDA device: roi 96^3, feature size 48, batch 2
    python benchmarks/gpu.py --smoke              # anywhere (the test suite runs it on CPU): tiny sizes, 2 steps

Each variant is the bare step of the real task (`PretrainTask.losses` with the 2022 trio, `SegmentationTask.losses`
with 12 classes) + backward + AdamW on a fixed batch in device memory, so the model and losses are the platform's
and nothing else is timed. Variants run alternately in `--rounds` rounds (the median is reported), so a noisy
neighbour hurts all of them alike. FLOPs of one step (forward + backward) are counted once with
`torch.utils.flop_counter.FlopCounterMode`; utilisation = counted FLOP/s over the device's dense peak for the
variant's precision (a table of known devices; unknown devices report FLOP/s only).

The loader line compares the crops/s the pretraining step consumes (samples/s, one sample = one crop) with the
crop stream's measured rate per CPU (`bench_out/loader/result.json` from `benchmarks/loader.py`, when present): the
number of loader CPUs a GPU needs.

Output: a table on stdout and `OUT/result.json` (default `bench_out/gpu`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT / "preprocessing")]

PEAK_TFLOPS = {"H100": {"bf16": 989.0, "fp32": 67.0}, "H200": {"bf16": 989.0, "fp32": 67.0},
               "A100": {"bf16": 312.0, "fp32": 19.5}, "L40S": {"bf16": 362.0, "fp32": 91.6}}
"""Dense peak TFLOPS (vendor data sheets; fp32 = non-tensor-core FP32) by a substring of the device name."""
VARIANTS = {"eager_fp32": {}, "bf16": {"amp": True}, "bf16_fused": {"amp": True, "fused": True},
            "bf16_fused_compile": {"amp": True, "fused": True, "compile": True}}


def _configs(args: argparse.Namespace):
    from swinssl.config import FinetuneConfig, PretrainConfig, load_config

    roi = f"[{args.roi},{args.roi},{args.roi}]"
    common = [f"model.feature_size={args.feature_size}", f"data.batch_size={args.batch}", "tracking.enabled=false"]
    pre = load_config(ROOT / "experiments" / "pretrain.yaml", [*common, f"data.roi={roi}"], PretrainConfig,
                      check=False)
    seg_roi = max(args.roi, 64)  # the segmentation decoder needs sides >= 64
    fine = load_config(ROOT / "experiments" / "finetune.yaml", [*common, f"data.roi=[{seg_roi},{seg_roi},{seg_roi}]",
                                                                "model.out_channels=12"], FinetuneConfig, check=False)
    return pre, fine


def _task(kind: str, cfg):
    from swinssl.tasks.pretrain import PretrainTask
    from swinssl.tasks.segment import SegmentationTask

    return PretrainTask(cfg) if kind == "pretrain" else SegmentationTask(cfg, None)


def _batch(kind: str, cfg, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(cfg.data.batch_size, 2, *cfg.data.roi, generator=g)
    batch = {"image": image}
    if kind == "finetune":
        batch["label"] = torch.randint(0, cfg.model.out_channels, (cfg.data.batch_size, 1, *cfg.data.roi),
                                       generator=g)
    return {k: v.to(device) for k, v in batch.items()}


def _build(kind: str, cfg, variant: dict, device: torch.device, compile_backend: str):
    from swinssl.train.loop import build_optimizer

    task = _task(kind, cfg)
    torch.manual_seed(0)
    model = task.build_model().to(device)
    _set_fused(model, variant.get("fused", False))
    if variant.get("compile"):
        model.compile(backend=compile_backend, dynamic=False)
    optimizer, _ = build_optimizer(model, cfg.optim, 1000)
    return task, model, optimizer


def _set_fused(model: torch.nn.Module, enabled: bool) -> int:
    """Fused SDPA window attention on or off (models.fused_attention); returns the modules switched."""
    from swinssl.models.fused_attention import use_fused_attention

    return use_fused_attention(model, enabled)


def _step(task, model, optimizer, batch, device, amp: bool) -> float:
    from swinssl.train.loop import step_generator

    optimizer.zero_grad(set_to_none=True)
    context = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    with context:
        loss = task.losses(model, batch, step_generator(0, 0, 0))["loss"]
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _flops(task, model, optimizer, batch, device, amp: bool) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        _step(task, model, optimizer, batch, device, amp)
    return int(counter.get_total_flops())


def measure(kind: str, cfg, variant: dict, device: torch.device, args: argparse.Namespace) -> dict:
    """One variant of one task: seconds per step (median of `steps` after `warmup`), first loss, peak memory."""
    task, model, optimizer = _build(kind, cfg, variant, device, args.compile_backend)
    batch = _batch(kind, cfg, device)
    amp = bool(variant.get("amp"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    first = _step(task, model, optimizer, batch, device, amp)
    _sync(device)
    first_s = time.perf_counter() - started
    for _ in range(max(args.warmup - 1, 0)):
        _step(task, model, optimizer, batch, device, amp)
    times = [] if args.steps else [first_s]  # --smoke: the first step is the only one
    for _ in range(args.steps):
        _sync(device)
        t0 = time.perf_counter()
        _step(task, model, optimizer, batch, device, amp)
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"step_s": statistics.median(times), "first_step_s": first_s, "first_loss": first, "peak_gib": peak,
            "samples": cfg.data.batch_size}


def inference_windows_per_s(cfg, device: torch.device, args: argparse.Namespace) -> dict:
    """Sliding-window inference of the fine-tuning net (bf16 + fused where enabled) over a whole-body-sized box."""
    from swinssl.eval.infer import predict_volume

    task = _task("finetune", cfg)
    model = task.build_model()
    _set_fused(model, True)
    roi = tuple(cfg.data.roi)
    shape = tuple(int(r * f) for r, f in zip(roi, args.volume_factors))
    image = torch.rand(2, *shape)
    image[0] = 0.6  # all body: no window is skipped by the body box
    windows = []

    def count(module, inputs, output):
        windows.append(inputs[0].shape[0])

    hook = model.register_forward_hook(count)
    predict_volume(model, image, roi, cfg.model.out_channels, sw_batch_size=4, device=device,
                   amp=device.type == "cuda")  # warm-up (cuDNN autotune, allocator)
    windows.clear()
    _sync(device)
    t0 = time.perf_counter()
    predict_volume(model, image, roi, cfg.model.out_channels, sw_batch_size=4, device=device,
                   amp=device.type == "cuda")
    _sync(device)
    elapsed = time.perf_counter() - t0
    hook.remove()
    return {"volume": list(shape), "windows": sum(windows), "seconds": elapsed, "windows_per_s": sum(windows) / elapsed}


def _peak(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v[precision] for k, v in PEAK_TFLOPS.items() if k in name), None)


def _loader_rate() -> float | None:
    """Crops per CPU-second of the crop stream, from benchmarks/loader.py's last result on this machine."""
    path = ROOT / "bench_out" / "loader" / "result.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return data.get("ours", {}).get("crops_per_cpu_s") or data.get("crops_per_cpu_s")


def _variants(kind: str, device: torch.device, smoke: bool) -> list[str]:
    """All variants on CUDA; on a CPU no compile (minutes of inductor) unless --smoke, and the smoke's fine-tuning
    only fp32 and the all-in variant (CPU bf16 3-D convolutions at 64^3 take a minute a step without AMX)."""
    if device.type == "cuda":
        return list(VARIANTS)
    if smoke:
        return list(VARIANTS) if kind == "pretrain" else ["eager_fp32", "bf16_fused_compile"]
    return [name for name, v in VARIANTS.items() if not v.get("compile")]


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pre, fine = _configs(args)
    chosen = {kind: _variants(kind, device, args.smoke) for kind in ("pretrain", "finetune")}
    rows = {kind: {name: [] for name in names} for kind, names in chosen.items()}
    for _ in range(args.rounds):
        for kind, cfg in (("pretrain", pre), ("finetune", fine)):
            for name in chosen[kind]:
                rows[kind][name].append(measure(kind, cfg, VARIANTS[name], device, args))
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "roi": args.roi, "feature_size": args.feature_size, "batch": args.batch,
              "smoke": args.smoke, "tasks": {}}
    for kind, cfg in (("pretrain", pre), ("finetune", fine)):
        task, model, optimizer = _build(kind, cfg, {}, device, args.compile_backend)
        flops = _flops(task, model, optimizer, _batch(kind, cfg, device), device, False)
        result["tasks"][kind] = {"flops_per_step": flops, "variants": {}}
        for name, runs in rows[kind].items():
            step_s = statistics.median(r["step_s"] for r in runs)
            peak_tflops = _peak(device, "bf16" if VARIANTS[name].get("amp") else "fp32")
            result["tasks"][kind]["variants"][name] = {
                "samples_per_s": runs[0]["samples"] / step_s, "step_s": step_s,
                "first_step_s": runs[0]["first_step_s"], "first_loss": runs[0]["first_loss"],
                "peak_gib": runs[0]["peak_gib"], "tflops": flops / step_s / 1e12,
                "utilisation": flops / step_s / 1e12 / peak_tflops if peak_tflops else None}
    result["inference"] = inference_windows_per_s(fine, device, args)
    best = max(v["samples_per_s"] for v in result["tasks"]["pretrain"]["variants"].values())
    rate = _loader_rate()
    result["loader"] = {"crops_per_s_consumed": best, "loader_crops_per_cpu_s": rate,
                        "cpus_needed_per_device": best / rate if rate else None}
    return result


def table(result: dict) -> str:
    lines = [f"device {result['device']}, roi {result['roi']}^3, feature size {result['feature_size']}, "
             f"batch {result['batch']}", "| task | variant | samples/s | step s | first step s | TFLOP/s | util | "
             "peak GiB |", "|---|---|---|---|---|---|---|---|"]
    for kind, data in result["tasks"].items():
        for name, v in data["variants"].items():
            util = f"{100 * v['utilisation']:.1f} %" if v["utilisation"] is not None else "-"
            peak = f"{v['peak_gib']:.2f}" if v["peak_gib"] is not None else "-"
            lines.append(f"| {kind} | {name} | {v['samples_per_s']:.3f} | {v['step_s']:.3f} | "
                         f"{v['first_step_s']:.2f} | {v['tflops']:.3f} | {util} | {peak} |")
    inf = result["inference"]
    lines.append(f"inference: {inf['windows']} windows over {inf['volume']} in {inf['seconds']:.2f} s = "
                 f"{inf['windows_per_s']:.2f} windows/s")
    loader = result["loader"]
    need = loader["cpus_needed_per_device"]
    lines.append(f"loader: the step consumes {loader['crops_per_s_consumed']:.2f} crops/s; "
                 + (f"at {loader['loader_crops_per_cpu_s']:.1f} crops per CPU-second that is {need:.1f} loader CPUs"
                    if need else "no loader result on this machine (run benchmarks/loader.py)"))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU smoke test of every code path)")
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--feature-size", type=int, default=48)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile happens here)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--volume-factors", type=float, nargs=3, default=(3.0, 2.0, 2.0),
                        help="inference volume = roi x these (Z, Y, X): ~whole-body PET at 96^3")
    parser.add_argument("--out", default=str(ROOT / "bench_out" / "gpu"))
    args = parser.parse_args(argv)
    if args.smoke:  # every code path, seconds on a CPU: compile with the eager backend (inductor takes minutes)
        args.roi, args.feature_size, args.batch, args.steps, args.warmup, args.rounds = 32, 12, 1, 0, 1, 1
        args.compile_backend, args.volume_factors = "eager", (1.5, 1.0, 1.0)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(table(result))
    return result


if __name__ == "__main__":
    main()
