"""`benchmarks/gpu.py --smoke` on CPU: every code path of the GPU benchmark (both tasks, bf16 autocast, fused
attention, compile, FLOP counting, sliding-window inference) runs, and its numbers are consistent."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.e2e  # minutes of CPU bf16 convolutions: kept out of `make test-fast`
@pytest.mark.timeout(900)
def test_gpu_benchmark_smoke_runs_every_variant_on_cpu(tmp_path, capsys):
    result = _module().main(["--smoke", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(result))
    assert result["device"] == "cpu" and result["smoke"] is True
    for kind in ("pretrain", "finetune"):
        data = result["tasks"][kind]
        assert data["flops_per_step"] > 0
        variants = data["variants"]
        assert set(variants) == ({"eager_fp32", "bf16", "bf16_fused", "bf16_fused_compile"} if kind == "pretrain"
                                 else {"eager_fp32", "bf16_fused_compile"})
        for name, v in variants.items():
            assert v["samples_per_s"] > 0 and math.isfinite(v["first_loss"]), (kind, name)
            assert v["tflops"] == pytest.approx(data["flops_per_step"] / v["step_s"] / 1e12)
        # the same model and batch from the same seed: precision and the attention kernel change the loss only a bit
        base = variants["eager_fp32"]["first_loss"]
        for name in set(variants) - {"eager_fp32"}:
            assert variants[name]["first_loss"] == pytest.approx(base, rel=0.05), (kind, name)
    pretrain = result["tasks"]["pretrain"]["variants"]
    assert pretrain["bf16_fused"]["first_loss"] == pytest.approx(pretrain["bf16"]["first_loss"], rel=0.02)
    inference = result["inference"]
    assert inference["windows"] > 0 and inference["windows_per_s"] > 0
    out = capsys.readouterr().out
    assert "| pretrain | bf16_fused_compile |" in out and "windows/s" in out
