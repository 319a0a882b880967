"""SSLModel shapes and head skipping; encoder checkpoints readable by MONAI load_from, the BTCV path and our loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.networks.nets import SwinUNETR
from torch import nn

from swinssl.models.encoder_io import (
    encoder_state_dict_for_monai,
    load_encoder_into_swinunetr,
    save_encoder,
    swinvit_state_from_checkpoint,
)
from swinssl.models.ssl_head import SSLModel, check_input_shape

F = 12  # smallest legal feature_size keeps the suite fast on 2 CPU cores


def _swinvit(net: nn.Module) -> dict[str, torch.Tensor]:
    """Every swinViT state entry (parameters and buffers, relative_position_* included), keyed as in SwinUNETR."""
    return {k: v for k, v in net.state_dict().items() if k.startswith("swinViT.")}


@pytest.fixture(scope="module")
def trained() -> SSLModel:
    """An SSLModel whose encoder differs from any fresh init (LayerNorms included, whose init is always 1/0)."""
    torch.manual_seed(0)
    model = SSLModel(in_channels=2, feature_size=F)
    with torch.no_grad():
        for p in model.swinViT.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def saved(trained: SSLModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_encoder(trained, tmp_path_factory.mktemp("enc") / "encoder.pt", extra={"step": 7, "tag": "t"})


class _Recorder(dict):
    """A dict that remembers which keys were read, to prove load_from consumed every key we wrote."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read.add(key)
        return super().__getitem__(key)


def _btcv_load(net: nn.Module, path: Path) -> tuple[list[str], list[str]]:
    """The BTCV fine-tuning recipe (Project-MONAI/research-contributions, SwinUNETR/BTCV/main.py: strip `module.`,
    rename `swin_vit` to `swinViT`, load_state_dict(strict=False)), written out: returns (missing, unexpected)."""
    state = torch.load(path, weights_only=True)["state_dict"]
    if "module." in next(iter(state)):
        for key in list(state):
            state[key.replace("module.", "")] = state.pop(key)
    if "swin_vit" in next(iter(state)):
        for key in list(state):
            state[key.replace("swin_vit", "swinViT")] = state.pop(key)
    result = net.load_state_dict(state, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


def _fresh_net(in_channels: int = 2, feature_size: int = F) -> SwinUNETR:
    return SwinUNETR(in_channels=in_channels, out_channels=12, feature_size=feature_size)


# ---------------------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("roi", [(64, 64, 64), (64, 64, 96)])
def test_output_shapes(roi: tuple[int, int, int]) -> None:
    # No grad and batch 1: at 64^3 the stage-1 window attention dominates CPU time whatever the feature size.
    model = SSLModel(in_channels=2, feature_size=F, contrastive_dim=32).eval()
    x = torch.randn(1, 2, *roi)
    with torch.no_grad():
        out = model(x)
    assert set(out) == {"rotation", "contrastive", "inpainting"}
    assert out["rotation"].shape == (1, 4)
    assert out["contrastive"].shape == (1, 32)
    assert out["inpainting"].shape == x.shape


def test_backward_smallest_roi() -> None:
    """A 32^3 ROI gives a one-voxel bottleneck: the decoder norm must still work in training mode; grads reach all."""
    model = SSLModel(feature_size=F).train()
    out = model(torch.randn(2, 2, 32, 32, 32))
    assert out["inpainting"].shape == (2, 2, 32, 32, 32)
    sum(v.float().mean() for v in out.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, no_grad[:3]


def test_encoder_keys_equal_swinunetr() -> None:
    ours = {"swinViT." + k: v.shape for k, v in SSLModel(feature_size=F).swinViT.state_dict().items()}
    assert ours == {k: v.shape for k, v in _swinvit(_fresh_net()).items()}


def test_heads_subset_skips_compute() -> None:
    model = SSLModel(feature_size=F)
    calls = {"rotation": 0, "contrastive": 0, "inpainting": 0, "encoder": 0}
    modules = {**model.heads, "encoder": model.swinViT}
    for name, mod in modules.items():
        mod.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    x = torch.randn(1, 2, 32, 32, 32)

    out = model(x, heads={"rotation"})
    assert set(out) == {"rotation"} and out["rotation"].shape == (1, 4)
    assert calls == {"rotation": 1, "contrastive": 0, "inpainting": 0, "encoder": 1}

    out = model(x, heads={"contrastive", "inpainting"})
    assert set(out) == {"contrastive", "inpainting"}
    assert calls == {"rotation": 1, "contrastive": 1, "inpainting": 1, "encoder": 2}

    assert model(x, heads=set()) == {} and calls["encoder"] == 2
    with pytest.raises(ValueError, match="unknown head"):
        model(x, heads={"rotate"})


def test_only_given_heads_are_built_and_encoder_init_is_independent_of_them() -> None:
    torch.manual_seed(0)
    full = SSLModel(feature_size=F)
    torch.manual_seed(0)
    one = SSLModel(feature_size=F, heads=lambda width: {"rotation": nn.Linear(width, 4)})
    assert list(one.heads) == ["rotation"] and not [k for k in one.state_dict() if "inpainting" in k]
    assert all(torch.equal(a, b) for a, b in zip(full.swinViT.state_dict().values(),
                                                 one.swinViT.state_dict().values()))


def test_pre_registry_checkpoint_keys_load() -> None:
    """Training checkpoints written before the registry named the heads rotation_head / contrastive_head /
    reconstruction_head; they load into the classic heads (same tensors, same parameter order)."""
    model = SSLModel(feature_size=F)
    legacy = {k.replace("heads.rotation.", "rotation_head.").replace("heads.contrastive.", "contrastive_head.")
              .replace("heads.inpainting.", "reconstruction_head."): v + 1 for k, v in model.state_dict().items()}
    assert any(k.startswith("reconstruction_head.") for k in legacy)
    fresh = SSLModel(feature_size=F)
    fresh.load_state_dict(legacy)
    for (key, value), expected in zip(fresh.state_dict().items(), legacy.values()):
        assert torch.equal(value, expected), key


def test_check_input_shape() -> None:
    check_input_shape((96, 96, 96), 48)
    check_input_shape((64, 64, 96), 12)
    with pytest.raises(ValueError, match="multiple of 12"):
        check_input_shape((96, 96, 96), 20)
    with pytest.raises(ValueError, match=r"multiple of 32.*\[80\]"):
        check_input_shape((96, 96, 80), 48)
    with pytest.raises(ValueError, match="multiple of 32"):
        check_input_shape((0, 64, 64), 48)
    with pytest.raises(ValueError, match="multiple of 12"):
        SSLModel(feature_size=30)
    with pytest.raises(ValueError, match="multiple of 32"):
        SSLModel(feature_size=F)(torch.randn(1, 2, 48, 64, 64))
    with pytest.raises(ValueError, match="expected input"):
        SSLModel(feature_size=F)(torch.randn(1, 1, 64, 64, 64))


# ---------------------------------------------------------------------------------------------------- checkpoints


def _assert_matches(net: nn.Module, model: SSLModel) -> None:
    ours = _swinvit_of_model(model)
    theirs = _swinvit(net)
    assert theirs.keys() == ours.keys()
    bad = [k for k in ours if not torch.equal(theirs[k], ours[k])]
    assert not bad, f"{len(bad)} encoder tensors differ, e.g. {bad[:3]}"


def _swinvit_of_model(model: SSLModel) -> dict[str, torch.Tensor]:
    return {"swinViT." + k: v for k, v in model.swinViT.state_dict().items()}


def test_fresh_net_differs(trained: SSLModel) -> None:
    """Guards the loading tests: without loading, every trained parameter differs from a fresh init."""
    fresh = _swinvit(_fresh_net())
    ours = _swinvit_of_model(trained)
    params = {"swinViT." + n for n, _ in trained.swinViT.named_parameters()}
    same = [k for k in params if torch.equal(fresh[k], ours[k])]
    assert not same, same[:3]


def test_file_is_weights_only_with_metadata(saved: Path, trained: SSLModel) -> None:
    ckpt = torch.load(saved, weights_only=True)
    assert ckpt["format"] == "swinssl.encoder/1"
    assert (ckpt["feature_size"], ckpt["in_channels"], ckpt["step"], ckpt["tag"]) == (F, 2, 7, "t")
    assert ckpt["depths"] == [2, 2, 2, 2] and ckpt["num_heads"] == [3, 6, 12, 24] and ckpt["window_size"] == [7] * 3
    n = len(trained.swinViT.state_dict())
    assert len(ckpt["state_dict"]) == 2 * n
    assert "module.layers1.0.blocks.0.mlp.fc1.weight" in ckpt["state_dict"]
    assert not list(saved.parent.glob(".*.tmp"))  # atomic write left no temp file


def test_monai_load_from(saved: Path, trained: SSLModel) -> None:
    net = _fresh_net()
    ckpt = torch.load(saved, weights_only=True)
    ckpt["state_dict"] = _Recorder(ckpt["state_dict"])
    net.load_from(ckpt)
    _assert_matches(net, trained)
    load_from_keys = set(encoder_state_dict_for_monai(trained))
    assert ckpt["state_dict"].read == load_from_keys  # load_from read exactly the module.* keys, all of them


def test_btcv_path(saved: Path, trained: SSLModel) -> None:
    net = _fresh_net()
    missing, unexpected = _btcv_load(net, saved)
    assert not [k for k in missing if k.startswith("swinViT.")]
    assert all(k.startswith(("patch_embed.", "layers")) for k in unexpected)  # the stripped load_from copies
    _assert_matches(net, trained)


def test_own_loader(saved: Path, trained: SSLModel) -> None:
    net = _fresh_net()
    loaded = load_encoder_into_swinunetr(net, saved)
    assert loaded == list(_swinvit(net))
    _assert_matches(net, trained)


def test_own_loader_reads_load_from_layout(tmp_path: Path, trained: SSLModel) -> None:
    path = tmp_path / "legacy.pt"
    torch.save({"state_dict": encoder_state_dict_for_monai(trained)}, path)
    net = _fresh_net()
    load_encoder_into_swinunetr(net, path)
    _assert_matches(net, trained)


@pytest.mark.parametrize(("in_channels", "feature_size", "pattern"), [(2, 24, "feature_size=12"), (1, F, "in_chan")])
def test_own_loader_rejects_mismatch(saved: Path, in_channels: int, feature_size: int, pattern: str) -> None:
    net = _fresh_net(in_channels, feature_size)
    with pytest.raises(ValueError, match=f"shape mismatch.*{pattern}"):
        load_encoder_into_swinunetr(net, saved)


def test_own_loader_rejects_missing_keys(tmp_path: Path, trained: SSLModel) -> None:
    state = {"swinViT." + k: v for k, v in trained.swinViT.state_dict().items() if "layers4" not in k}
    path = tmp_path / "partial.pt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ValueError, match="missing from checkpoint.*layers4"):
        load_encoder_into_swinunetr(_fresh_net(), path)
    loaded = load_encoder_into_swinunetr(_fresh_net(), path, strict_encoder=False)
    assert len(loaded) == len(state)


def test_unknown_layout_and_bad_extra(tmp_path: Path, trained: SSLModel) -> None:
    with pytest.raises(ValueError, match="no Swin encoder weights"):
        swinvit_state_from_checkpoint({"state_dict": {"decoder.w": torch.zeros(1)}})
    with pytest.raises(TypeError, match="Path"):
        save_encoder(trained, tmp_path / "x.pt", extra={"where": tmp_path})
    with pytest.raises(ValueError, match="reserved"):
        save_encoder(trained, tmp_path / "x.pt", extra={"feature_size": 48})
    assert not list(tmp_path.iterdir())
