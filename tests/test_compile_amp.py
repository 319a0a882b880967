"""`trainer.compile`, the GPU's mixed-precision path run on CPU (`trainer.amp_on_cpu`) and half-precision safety of the
pretext losses; in-process loop runs without Ray, tiny models.

The compiled SwinUNETR runs use `trainer.compile_backend=aot_eager`: TorchDynamo and AOTAutograd trace forward and
backward exactly as for inductor, but PyTorch's own kernels run them. Inductor's CPU code generation fails on the tiny
pretraining model's backward (torch 2.13.0+cpu, an internal assertion; README "Compile and mixed precision"), and
would take minutes anyway, so inductor itself is checked on a small convolutional net through the same loop path.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from torch import nn
from torch._dynamo.utils import counters

from pretext_helpers import Keep, train_steps
from swinssl.config import FinetuneConfig, PretrainConfig, load_config
from swinssl.losses.contrastive import contrastive_loss, nt_xent
from swinssl.losses.cross_modal import cross_modal_loss
from swinssl.losses.inpainting import inpainting_loss
from swinssl.losses.masked import masked_loss
from swinssl.losses.rotation import rotation_loss
from swinssl.losses.voco import voco_terms
from swinssl.models.encoder_io import load_encoder_into_swinunetr
from swinssl.tasks.base import Task
from swinssl.tasks.pretrain import PretrainTask
from swinssl.tasks.segment import SegmentationTask
from swinssl.train import loop
from swinssl.train.checkpoint import load_state
from swinssl.train.launch import export_encoder

CPU = torch.device("cpu")
TINY = ["model.feature_size=12", "data.roi=[32,32,32]", "data.batch_size=2", "pretext.cutout_max_boxes=8",
        "optim.warmup_steps=2", "trainer.amp=none", "trainer.log_every=1"]
COMPILED = ["trainer.compile=true", "trainer.compile_backend=aot_eager"]
BF16 = ["trainer.amp=bf16", "trainer.amp_on_cpu=true"]


def _pretrain(*overrides: str) -> PretrainTask:
    return WatchedPretrain(load_config(None, [*TINY, *overrides], PretrainConfig))


def _losses(hooks: Keep) -> list[dict[str, float]]:
    return [{k: v for k, v in r.items() if k.startswith("loss") or "/" in k} for r in hooks.reports]


def _graphs() -> int:
    """Graphs TorchDynamo has captured in this process (it counts only what it traced)."""
    return counters["stats"]["unique_graphs"]


class Watched:
    """Mixin for a task: records what the loop ran each `losses` call under (autocast on CPU, every loss's dtype) and
    the dtype of the Swin encoder's deepest features (what the network itself computed in)."""

    def build_model(self, *args, **kwargs) -> nn.Module:
        self.seen, self.encoder_dtypes = [], []
        model = super().build_model(*args, **kwargs)
        if hasattr(model, "swinViT"):
            model.swinViT.register_forward_hook(lambda module, args, out: self.encoder_dtypes.append(out[-1].dtype))
        return model

    def losses(self, model, batch, generator):
        out = super().losses(model, batch, generator)
        self.seen.append({"autocast": torch.is_autocast_enabled("cpu"), "dtypes": {k: v.dtype for k, v in out.items()}})
        return out


class WatchedPretrain(Watched, PretrainTask):
    pass


class WatchedSegmentation(Watched, SegmentationTask):
    pass


def _run(task: Task, model: nn.Module, batch: dict, trainer, optim, hooks: Keep) -> None:
    loop.run(task, model, model, lambda epoch: iter([batch]), trainer, optim, CPU, 0, 1, hooks)


# --- trainer.compile --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrain_runs(tmp_path_factory):
    """2 steps of rotation + contrastive + inpainting from the same seed, eager and compiled, every checkpoint kept."""
    root = tmp_path_factory.mktemp("compile")
    eager_hooks, compiled_hooks = Keep(root / "eager"), Keep(root / "compiled")
    eager = train_steps(_pretrain(), 2, eager_hooks)
    torch.compiler.reset()  # a fresh cache: the compiled run must trace, not reuse another test's graphs
    before = _graphs()
    task = _pretrain(*COMPILED)
    compiled = train_steps(task, 2, compiled_hooks)
    return {"root": root, "eager": (eager, eager_hooks), "compiled": (compiled, compiled_hooks), "task": task,
            "graphs": _graphs() - before}


@pytest.mark.e2e  # minutes of compile and 64^3 steps on 2 cores: kept out of `make test-fast`
def test_compiled_pretraining_matches_eager(pretrain_runs):
    (_, eager), (_, compiled) = pretrain_runs["eager"], pretrain_runs["compiled"]
    assert pretrain_runs["graphs"] > 0, "trainer.compile=true ran the model uncompiled"
    assert len(_losses(compiled)) == 2 and {"loss_rotation", "loss_contrastive"} <= set(_losses(compiled)[0])
    for step, (e, c) in enumerate(zip(_losses(eager), _losses(compiled), strict=True), start=1):
        assert c == pytest.approx(e, rel=1e-4), f"step {step}"
    assert _losses(eager)[1]["loss"] != _losses(eager)[0]["loss"]  # it trained: step 2 saw updated weights


@pytest.mark.e2e  # minutes of compile and 64^3 steps on 2 cores: kept out of `make test-fast`
def test_compiled_checkpoints_and_encoder_keep_plain_keys(pretrain_runs, tmp_path):
    (eager, _), (compiled, _) = pretrain_runs["eager"], pretrain_runs["compiled"]
    keys = list(eager.state_dict())
    assert list(compiled.state_dict()) == keys
    for step in (1, 2):
        assert list(load_state(pretrain_runs["root"] / "compiled" / f"step{step}")["model"]) == keys
    assert not any("_orig_mod" in k for k in keys)
    cfg = pretrain_runs["task"].cfg  # exported as `swinssl pretrain` does at the end of a run
    path = export_encoder(cfg, PretrainTask(cfg), pretrain_runs["root"] / "compiled" / "step2", tmp_path / "encoder.pt")
    net = SwinUNETR(in_channels=2, out_channels=12, feature_size=12)
    loaded = load_encoder_into_swinunetr(net, path)
    assert loaded == [k for k in net.state_dict() if k.startswith("swinViT.")]
    trained = compiled.state_dict()
    assert all(torch.equal(net.state_dict()[k], trained[k]) for k in loaded)


@pytest.mark.e2e  # minutes of compile and 64^3 steps on 2 cores: kept out of `make test-fast`
def test_resume_crosses_compile_both_ways(pretrain_runs, tmp_path):
    """A compiled run resumes an eager run's checkpoint and an eager run a compiled one: step 2 repeats the straight
    runs'."""
    root, straight = pretrain_runs["root"], _losses(pretrain_runs["eager"][1])
    for source, overrides in (("eager", COMPILED), ("compiled", [])):
        hooks = Keep()
        train_steps(_pretrain(*overrides), 2, hooks, resume=root / source / "step1")
        assert [r["step"] for r in hooks.reports] == [2]
        for e, r in zip(straight[1:], _losses(hooks), strict=True):
            assert r == pytest.approx(e, rel=1e-4), f"resumed from the {source} checkpoint"


class Net(nn.Module):
    """A user module (TorchDynamo skips torch's own modules' forward): conv, GELU, conv."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv3d(2, 4, 3, padding=1), nn.Conv3d(4, 1, 1)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


class Regression(Task):
    def build_model(self) -> nn.Module:
        return Net()

    def losses(self, model, batch, generator):
        mse = F.mse_loss(model(batch["image"]), batch["image"][:, :1] * 2 - 1)
        return {"loss": mse, "loss_mse": mse.detach()}


class WatchedRegression(Watched, Regression):
    pass


def _regression(*overrides: str, folder=None) -> tuple[nn.Module, Keep, WatchedRegression]:
    cfg = load_config(None, ["trainer.steps=3", "trainer.log_every=1", "optim.warmup_steps=0", *overrides],
                      PretrainConfig)
    torch.manual_seed(0)
    task, hooks = WatchedRegression(), Keep(folder)
    model = task.build_model()
    _run(task, model, {"image": torch.rand(2, 2, 8, 8, 8, generator=torch.Generator().manual_seed(1))},
         cfg.trainer, cfg.optim, hooks)
    return model, hooks, task


def test_default_inductor_backend_through_the_loop():
    eager, eager_hooks, _ = _regression("trainer.amp=none")
    before = _graphs()
    compiled, compiled_hooks, _ = _regression("trainer.amp=none", "trainer.compile=true")  # compile_backend: inductor
    assert _graphs() > before
    for e, c in zip(_losses(eager_hooks), _losses(compiled_hooks), strict=True):
        assert c == pytest.approx(e, rel=1e-5)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)


SEG = ["model.feature_size=12", "model.out_channels=12", "data.roi=[64,64,64]", "optim.warmup_steps=1",
       "trainer.steps=1", "trainer.log_every=1"]


def _seg_step(*overrides: str) -> dict:
    """One fine-tuning step of the real SwinUNETR (its smallest legal crop, batch 1): losses, gradients, keys."""
    cfg = load_config(None, [*SEG, *overrides], FinetuneConfig)
    task, hooks = WatchedSegmentation(cfg, None), Keep()
    torch.manual_seed(0)
    model = task.build_model()
    g = torch.Generator().manual_seed(4)
    batch = {"image": torch.rand(1, 2, 64, 64, 64, generator=g), "label": torch.randint(0, 12, (1, 1, 64, 64, 64),
                                                                                        generator=g)}
    _run(task, model, batch, cfg.trainer, cfg.optim, hooks)
    grads = {n: p.grad for n, p in model.named_parameters()}
    return {"losses": _losses(hooks)[0], "grads": grads, "keys": list(model.state_dict()), "seen": task.seen,
            "encoder": task.encoder_dtypes}


@pytest.fixture(scope="module")
def seg_eager() -> dict:
    return _seg_step("trainer.amp=none")


def _relative_error(grads: dict, reference: dict) -> float:
    diff = torch.cat([(grads[n] - g).flatten() for n, g in reference.items() if g is not None])
    return float(diff.norm() / torch.cat([g.flatten() for g in reference.values() if g is not None]).norm())


@pytest.mark.e2e  # minutes of compile and 64^3 steps on 2 cores: kept out of `make test-fast`
def test_compiled_finetuning_step_matches_eager(seg_eager):
    torch.compiler.reset()
    before = _graphs()
    compiled = _seg_step("trainer.amp=none", *COMPILED)
    assert _graphs() > before
    assert compiled["losses"] == pytest.approx(seg_eager["losses"], rel=1e-4)
    assert _relative_error(compiled["grads"], seg_eager["grads"]) < 1e-4
    assert compiled["keys"] == seg_eager["keys"] and not any("_orig_mod" in k for k in compiled["keys"])


# --- the mixed-precision path on CPU ---------------------------------------------------------------------------

PRETEXT_GROUPS = {
    "classic": ["loss.w_rotation=1", "loss.w_contrastive=1", "loss.w_inpainting=1"],
    "own_view": ["loss.w_rotation=0", "loss.w_contrastive=0", "loss.w_inpainting=0", "loss.w_simmim=1",
                 "loss.w_xmodal=1", "loss.w_voco=1", "data.batch_size=1", "data.roi=[32,32,64]",
                 "pretext.voco_grid=[1,1,2]", "pretext.voco_crops=1", "model.voco_dim=16"],
}
"""Every built-in pretext task, in two runs that fit in ~2 GB: the shared-view tasks (NT-Xent needs 2 crops for a
negative) and the tasks with their own encoder pass (voco's base crops 32^3, so a 32 x 32 x 64 crop)."""


def _pretrain_step(*overrides: str) -> tuple[nn.Module, Keep, WatchedPretrain]:
    task, hooks = _pretrain(*overrides), Keep()
    return train_steps(task, 1, hooks), hooks, task


@pytest.mark.e2e  # CPU bf16 of every pretext task: ~1 minute, kept out of `make test-fast`
@pytest.mark.parametrize("group", list(PRETEXT_GROUPS))
def test_every_pretext_task_under_cpu_bf16_autocast(group):
    _, fp32_hooks, fp32 = _pretrain_step(*PRETEXT_GROUPS[group])
    model, bf16_hooks, bf16 = _pretrain_step(*PRETEXT_GROUPS[group], *BF16)
    assert [s["autocast"] for s in fp32.seen] == [False] and set(fp32.encoder_dtypes) == {torch.float32}
    assert [s["autocast"] for s in bf16.seen] == [True] and set(bf16.encoder_dtypes) == {torch.bfloat16}
    dtypes = bf16.seen[0]["dtypes"]
    names = {"classic": {"rotation", "contrastive", "inpainting"}, "own_view": {"simmim", "xmodal", "voco"}}[group]
    assert set(bf16.heads) == names and {f"loss_{n}" for n in names} <= set(dtypes)
    assert {k: d for k, d in dtypes.items() if d != torch.float32} == {}
    reference, mixed = _losses(fp32_hooks)[0], _losses(bf16_hooks)[0]
    assert all(math.isfinite(v) for v in mixed.values())
    assert mixed == pytest.approx(reference, rel=0.05, abs=0.01)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.e2e  # bf16 3D convolutions have no fast kernel on most CPUs: this 64^3 step takes ~1-2 minutes
def test_finetuning_step_under_cpu_bf16_autocast(seg_eager):
    mixed = _seg_step(*BF16)
    assert [s["autocast"] for s in mixed["seen"]] == [True] and [s["autocast"] for s in seg_eager["seen"]] == [False]
    assert set(mixed["encoder"]) == {torch.bfloat16}
    assert set(mixed["seen"][0]["dtypes"].values()) == {torch.float32}
    assert all(math.isfinite(v) for v in mixed["losses"].values())
    assert mixed["losses"] == pytest.approx(seg_eager["losses"], rel=0.02)
    assert all(g is None or torch.isfinite(g).all() for g in mixed["grads"].values())
    assert _relative_error(mixed["grads"], seg_eager["grads"]) < 0.2


def test_amp_stays_off_on_cpu_unless_asked_and_fp16_scales_there(tmp_path):
    """trainer.amp=bf16 (the default) changes nothing on CPU; amp_on_cpu with fp16 runs autocast and a GradScaler
    (its scale is in the checkpoint, for a resume)."""
    _, plain_hooks, plain = _regression("trainer.amp=bf16")
    _, hooks, fp16 = _regression("trainer.amp=fp16", "trainer.amp_on_cpu=true", folder=tmp_path)
    assert [s["autocast"] for s in plain.seen] == [False] * 3 and [s["autocast"] for s in fp16.seen] == [True] * 3
    assert load_state(tmp_path / "step3")["scaler"]["scale"] > 0
    for mixed, plain_losses in zip(_losses(hooks), _losses(plain_hooks), strict=True):
        assert mixed == pytest.approx(plain_losses, rel=1e-2)


# --- half-precision safety of the losses ----------------------------------------------------------------------


def _pairs(b: int = 4, d: int = 32, noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    z1 = torch.randn(b, d, generator=g)
    return z1, z1 + noise * torch.randn(b, d, generator=g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("noise", [0.3, 1e-3, 0.0])  # 0: every pair identical, the largest positive logits
def test_nt_xent_in_half_precision_equals_float32(dtype, noise):
    z1, z2 = _pairs(noise=noise)
    z1, z2 = z1.to(dtype).requires_grad_(), z2.to(dtype).requires_grad_()
    half = nt_xent(z1, z2, 0.5)
    reference = nt_xent(z1.detach().float(), z2.detach().float(), 0.5)  # the same rounded inputs in float32
    assert half.dtype == torch.float32 and torch.isfinite(half)
    torch.testing.assert_close(half, reference, rtol=1e-5, atol=1e-6)
    half.backward()
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()
    assert contrastive_loss(z1, z2, 0.5, gather=False).item() == half.item()


def test_nt_xent_of_identical_views_in_fp16_is_exact():
    """All 2B views equal: every logit is 1/0.5 = 2 apart from the masked diagonal (-inf, which fp16 holds: -1e9
    would overflow it), so the loss is exactly log(2B - 1) and the gradient is finite."""
    z = torch.ones(4, 8, dtype=torch.float16, requires_grad=True)
    loss = nt_xent(z, z, 0.5)
    assert loss.item() == pytest.approx(math.log(7), rel=1e-6)
    loss.backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_similarities_stay_float32_under_autocast(dtype):
    """Autocast runs matmuls in half precision: NT-Xent's logits and VoCo's base-crop regulariser must not."""
    z1, z2 = _pairs(noise=1e-3)
    g = torch.Generator().manual_seed(6)
    randoms, bases = torch.randn(2, 3, 16, generator=g), torch.randn(2, 4, 16, generator=g)
    overlap = torch.rand(2, 3, 4, generator=g)
    with torch.autocast("cpu", dtype=dtype):
        mixed, terms = nt_xent(z1, z2, 0.5), voco_terms(randoms, bases, overlap)
    torch.testing.assert_close(mixed, nt_xent(z1, z2, 0.5), rtol=1e-5, atol=1e-6)
    reference = voco_terms(randoms, bases, overlap)
    for name, value in terms.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-6, msg=name)


def test_softmax_and_reconstruction_losses_promote_half_inputs():
    """Rotation's cross-entropy (large fp16 logits included), inpainting, masked-patch and cross-modal L1: float32
    results equal to the float32 computation on the same half-precision inputs."""
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(4, 4, generator=g) * 3e4).half()  # near fp16's max (65504): exp overflows in fp16
    target = torch.tensor([0, 1, 2, 3])
    assert torch.isfinite(rotation_loss(logits, target))
    torch.testing.assert_close(rotation_loss(logits, target), rotation_loss(logits.float(), target))
    prediction, truth = torch.rand(2, 2, 4, 4, 4, generator=g).half(), torch.rand(2, 2, 4, 4, 4, generator=g)
    mask = torch.rand(2, 1, 4, 4, 4, generator=g) > 0.5
    hidden = torch.tensor([0, 1])
    for loss in (lambda p: inpainting_loss(p, truth, mask, holes_only=True), lambda p: masked_loss(p, truth, mask),
                 lambda p: cross_modal_loss(p, truth, hidden)):
        value = loss(prediction)
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, loss(prediction.float()))
