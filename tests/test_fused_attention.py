"""Fused Swin window attention (`model.fused_attention`, swinssl.models.fused_attention): equal to MONAI 1.6.1's eager
`WindowAttention` on outputs and on every parameter gradient (shifted and plain windows, V1 and V2, float32 and CPU
bf16 autocast), weights and state-dict keys untouched, attention dropout honoured, and the config flag reaching the
models the pretraining and fine-tuning tasks build (so training, evaluation and `swinssl predict` use it).
Real MONAI modules on CPU, feature_size 12, 32^3 inputs (window 7: stages 1-2 shifted, 3-4 not; 16^3 for bf16)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from monai.networks.nets.swin_unetr import SwinTransformer, WindowAttention
from torch import nn

from swinssl.config import FinetuneConfig, PretrainConfig, load_config
from swinssl.models.encoder_io import save_encoder
from swinssl.models.fused_attention import FusedWindowAttention, count_fused_attention, use_fused_attention
from swinssl.models.ssl_head import SSLModel
from swinssl.tasks.pretrain import PretrainTask
from swinssl.tasks.segment import SegmentationTask

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
PRETRAIN_TINY, FINETUNE_TINY = EXPERIMENTS / "pretrain_tiny.yaml", EXPERIMENTS / "finetune_tiny.yaml"
ATTENTION_MODULES = 8  # depths (2, 2, 2, 2): one WindowAttention per Swin block


def _encoder(use_v2: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return SSLModel(in_channels=2, feature_size=12, use_v2=use_v2).swinViT


def _input(batch: int = 2, side: int = 32) -> torch.Tensor:
    return torch.randn(batch, 2, side, side, side, generator=torch.Generator().manual_seed(1))


def _pass(net: nn.Module, x: torch.Tensor, bf16: bool = False) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Encoder outputs (float32) and every parameter's gradient of a fixed, non-trivial projection of all five."""
    net.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        outs = net(x)
    # a fixed pattern, not |o|^2: the outputs are layer-normalised, so a norm would have (nearly) zero gradient
    loss = sum((o.float() * torch.sin(0.37 * torch.arange(o.numel()).reshape(o.shape))).sum() for o in outs)
    loss.backward()
    return [o.detach().float() for o in outs], {k: p.grad.clone() for k, p in net.named_parameters()}


def _record_masks(net: nn.Module, seen: list[bool]) -> list:
    """Hook every attention module to record, per call, whether a shifted-window mask was passed; returns handles."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((kwargs["mask"] if "mask" in kwargs else args[1]) is not None)

    return [m.register_forward_pre_hook(hook, with_kwargs=True) for m in net.modules()
            if isinstance(m, WindowAttention)]


def _assert_equal_passes(eager: nn.Module, fused: nn.Module, x: torch.Tensor) -> None:
    out_e, grad_e = _pass(eager, x)
    out_f, grad_f = _pass(fused, x)
    for a, b in zip(out_f, out_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert grad_e.keys() == grad_f.keys()
    for key, g in grad_e.items():
        scale = g.abs().max().item()
        assert scale > 0, key
        torch.testing.assert_close(grad_f[key], g, rtol=1e-4, atol=1e-4 * scale, msg=key)


@pytest.fixture
def sdpa_in_cpu_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """SDPA for float32 CPU training too (by default that one case runs MONAI's forward), to test SDPA's backward."""
    monkeypatch.setattr(FusedWindowAttention, "eager_cpu_float_training", False)


@pytest.fixture(scope="module")
def encoders() -> tuple[nn.Module, nn.Module]:
    eager = _encoder()
    fused = copy.deepcopy(eager)
    assert use_fused_attention(fused) == ATTENTION_MODULES
    return eager, fused


def test_switching_keeps_parameters_buffers_and_state_dict() -> None:
    net = _encoder()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = [id(p) for p in net.parameters()]
    assert use_fused_attention(net) == ATTENTION_MODULES == count_fused_attention(net)
    assert use_fused_attention(net) == 0  # already fused
    after = net.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert [id(p) for p in net.parameters()] == params  # same Parameter objects: an optimizer keeps working
    plain = SwinTransformer(in_chans=2, embed_dim=12, window_size=(7,) * 3, patch_size=(2,) * 3, depths=(2,) * 4,
                            num_heads=(3, 6, 12, 24))
    plain.load_state_dict(after, strict=True)  # fused weights load into MONAI's own module
    assert use_fused_attention(net, enabled=False) == ATTENTION_MODULES
    assert count_fused_attention(net) == 0
    assert all(type(m) is WindowAttention for m in net.modules() if isinstance(m, WindowAttention))


def test_fused_equals_monai_in_float32_with_and_without_shift(encoders, sdpa_in_cpu_training) -> None:
    eager, fused = encoders
    seen: list[bool] = []
    handles = _record_masks(fused, seen)
    _assert_equal_passes(eager, fused, _input())
    for handle in handles:
        handle.remove()
    assert True in seen and False in seen  # shifted blocks (mask) and plain blocks (no mask) both ran


def test_fused_bf16_autocast_is_as_accurate_as_monai(encoders) -> None:
    """Under bf16 autocast neither is bit-equal to float32; the fused error must not exceed MONAI's own by much."""
    eager, fused = encoders
    x = _input(side=16)  # CPU bf16 is slow; 16^3 still runs a shifted block (8 windows of 7^3, mask) at stage 1
    out_ref, grad_ref = _pass(eager, x)
    (out_e, grad_e), (out_f, grad_f) = _pass(eager, x, bf16=True), _pass(fused, x, bf16=True)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    for e, f, r in zip(out_e, out_f, out_ref):
        assert rel(f, e) < 0.05
        assert rel(f, r) < 1.5 * rel(e, r) + 1e-3
    flat = [torch.cat([g[k].flatten() for k in sorted(grad_ref)]) for g in (grad_ref, grad_e, grad_f)]
    assert rel(flat[2], flat[1]) < 0.05
    assert rel(flat[2], flat[0]) < 1.5 * rel(flat[1], flat[0]) + 1e-3


def test_fused_equals_monai_for_swinunetr_v2(sdpa_in_cpu_training) -> None:
    eager = _encoder(use_v2=True)
    fused = copy.deepcopy(eager)
    assert use_fused_attention(fused) == ATTENTION_MODULES
    _assert_equal_passes(eager, fused, _input(batch=1))


def test_attention_dropout_is_applied_in_training_and_off_in_eval(sdpa_in_cpu_training) -> None:
    torch.manual_seed(0)
    attn = WindowAttention(dim=12, num_heads=3, window_size=(7, 7, 7), qkv_bias=True, attn_drop=0.5)
    fused = copy.deepcopy(attn)
    use_fused_attention(fused)
    x = torch.randn(4, 343, 12)
    mask = torch.zeros(2, 343, 343)
    mask[1, :100, 100:] = mask[1, 100:, :100] = -100.0  # MONAI's value for token pairs from different regions
    attn.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x, mask), attn(x, mask), rtol=1e-5, atol=1e-6)
    fused.train()
    torch.manual_seed(3)
    first = fused(x, mask)
    first.sum().backward()
    assert torch.isfinite(fused.relative_position_bias_table.grad).all()
    with torch.no_grad():
        torch.manual_seed(3)
        assert torch.equal(fused(x, mask), first)  # the dropout draws come from torch's RNG
        torch.manual_seed(4)
        assert not torch.allclose(fused(x, mask), first)
        assert not torch.allclose(first, attn(x, mask), atol=1e-3)  # train mode: dropout did something


def _runs_sdpa(module: nn.Module, *args: torch.Tensor) -> tuple[bool, torch.Tensor]:
    """Whether the forward called aten::scaled_dot_product_attention (torch's profiler), and its output."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = module(*args)
    return any(e.key == "aten::scaled_dot_product_attention" for e in prof.key_averages()), out


def test_sdpa_runs_everywhere_but_cpu_float32_training(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    attn = WindowAttention(dim=12, num_heads=3, window_size=(7, 7, 7), qkv_bias=True)
    fused = copy.deepcopy(attn)
    use_fused_attention(fused)
    x, mask = torch.randn(4, 343, 12), torch.zeros(2, 343, 343)
    used, out = _runs_sdpa(fused, x, mask)  # float32 CPU with gradients: MONAI's own forward, bit for bit
    assert not used and torch.equal(out, attn(x, mask))
    with torch.no_grad():
        assert _runs_sdpa(fused, x, mask)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _runs_sdpa(fused, x, mask)[0]
    monkeypatch.setattr(FusedWindowAttention, "eager_cpu_float_training", False)
    assert _runs_sdpa(fused, x, mask)[0]


def test_fused_equals_monai_without_gradients(encoders) -> None:
    """Evaluation and `swinssl predict` run the encoder in eval mode without autograd, where SDPA may pick another
    kernel (on CPU its flash kernel, as the mask then needs no gradient) than in training."""
    eager, fused = encoders
    x = _input()
    eager.eval(), fused.eval()
    try:
        with torch.no_grad():
            for a, b in zip(fused(x), eager(x)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    finally:
        eager.train(), fused.train()


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _flag(cfg_path: Path, schema: type, flag: bool, *extra: str):
    return load_config(cfg_path, [*extra, f"model.fused_attention={str(flag).lower()}"], schema)


def test_config_flag_reaches_the_task_models_and_files_do_not_change(tmp_path: Path) -> None:
    built = {}
    for flag in (True, False):
        pre_cfg, seg_cfg = _flag(PRETRAIN_TINY, PretrainConfig, flag), _flag(FINETUNE_TINY, FinetuneConfig, flag,
                                                                                 "model.out_channels=3")
        assert pre_cfg.model.fused_attention is flag and seg_cfg.model.fused_attention is flag
        built[flag] = PretrainTask(pre_cfg).build_model(), SegmentationTask(seg_cfg, None).build_model()
        for net in built[flag]:
            total = sum(isinstance(m, WindowAttention) for m in net.modules())
            assert total == ATTENTION_MODULES and count_fused_attention(net) == (total if flag else 0)
    assert load_config(PRETRAIN_TINY, [], PretrainConfig).model.fused_attention is True  # on by default
    for fused, plain in zip(built[True], built[False]):  # checkpoints: MONAI's keys and shapes, whatever the flag
        assert _shapes(fused.state_dict()) == _shapes(plain.state_dict())

    # encoder.pt from a fused pretraining model loads, every swinViT tensor checked, into a plain MONAI SwinUNETR
    pretrained = built[True][0]
    encoder = save_encoder(pretrained, tmp_path / "encoder.pt")
    saved = torch.load(encoder, map_location="cpu", weights_only=True)["state_dict"]
    plain_encoder = {f"swinViT.{k}": v for k, v in built[False][0].swinViT.state_dict().items()}
    assert _shapes({k: v for k, v in saved.items() if k.startswith("swinViT.")}) == _shapes(plain_encoder)
    loaded = SegmentationTask(_flag(FINETUNE_TINY, FinetuneConfig, False, "model.out_channels=3"),
                              str(encoder)).build_model()
    assert count_fused_attention(loaded) == 0
    assert all(torch.equal(v, pretrained.swinViT.state_dict()[k]) for k, v in loaded.swinViT.state_dict().items())
