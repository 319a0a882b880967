"""Export and import of the pretrained Swin encoder, readable by every SwinUNETR fine-tuning path we know of.

File layout written by :func:`save_encoder` (a plain dict, loadable with ``torch.load(path, weights_only=True)``)::

    {
        "state_dict": {
            "module.patch_embed.proj.weight": T0,                 # MONAI SwinUNETR.load_from layout ...
            "module.layers1.0.blocks.0.mlp.fc1.weight": T1,       # ... (MONAI's mlp.linear1 is called fc1 there)
            ...
            "swinViT.patch_embed.proj.weight": T0,                # BTCV / load_state_dict layout: SwinUNETR's own keys
            "swinViT.layers1.0.blocks.0.mlp.linear1.weight": T1,
            ...
        },
        "format": "swinssl.encoder/1", "feature_size": 48, "in_channels": 2, "depths": [...], "num_heads": [...],
        "window_size": [...], "spatial_dims": 3, "use_v2": False, **extra,
    }

Why both layouts at once, and why it is safe:

* ``SwinUNETR.load_from(ckpt)`` indexes ``ckpt["state_dict"]`` with the ``module.*`` keys only (every key it reads is
  present: one per swinViT tensor, relative_position_index included) and never looks at the others.
* The BTCV path strips ``module.`` and renames ``swin_vit`` to ``swinViT`` then calls
  ``load_state_dict(strict=False)``. The ``swinViT.*`` keys contain neither substring, so they arrive unchanged and
  cover every ``swinViT.*`` entry of SwinUNETR; the stripped load_from keys become ``patch_embed.*`` / ``layers*``,
  which name nothing in SwinUNETR (its encoder lives under ``swinViT.``) and are reported as unexpected, harmlessly.
* The two layouts reference the *same* tensor objects; ``torch.save`` writes a shared storage once, so the file is
  not twice as large.

SwinUNETR-V2 (``use_v2=True``: MONAI's residual conv block ``layers{i}c.0`` before each Swin stage, Hatamizadeh et
al., MICCAI 2023) adds eight ``swinViT.layers{1..4}c.0.layer.conv{1,2}.conv.weight`` tensors; both layouts carry them
(``module.layers1c.0...`` / ``swinViT.layers1c.0...``) and ``use_v2`` is recorded in the file. Which loading paths
carry them:

* :func:`load_encoder_into_swinunetr` (what ``swinssl finetune`` uses) and the BTCV ``load_state_dict`` path do:
  every ``swinViT.*`` tensor, V2 blocks included, is loaded (ours then checks each one with :func:`check_loaded`).
* ``SwinUNETR.load_from`` does **not**: it copies named layers only (patch embedding, the Swin blocks of
  ``layers1..4`` and their downsampling) and never reads a ``layers{i}c`` key, so a ``SwinUNETR(use_v2=True)`` loaded
  that way keeps randomly initialised V2 blocks, silently. Use our loader (or ``load_state_dict``) for V2 encoders.
* Neither MONAI path checks the variant: ``load_from`` of a V2 file into a V1 net, or the BTCV path (which only
  lists the ``layers{i}c`` keys as unexpected), loads Swin blocks that were trained behind conv blocks the net lacks.

A V1 file in a V2 net (or the reverse) is refused by :func:`load_encoder_into_swinunetr` with
:class:`EncoderVariantError`, naming both variants; the variant of a file is read from its keys (files written
before ``use_v2`` was recorded are V1 unless they hold ``layers{i}c`` tensors).

A 1-channel (CT) file, such as the published MONAI self-supervised weights, loads into our 2-channel nets with its
patch embedding widened by the rule of :mod:`swinssl.models.public_weights` (``pet_channel``).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .public_weights import PATCH_EMBEDDING, inflate_patch_embedding

__all__ = [
    "FORMAT",
    "encoder_state_dict_for_monai",
    "encoder_state_dict_swinvit",
    "save_encoder",
    "swinvit_state_from_checkpoint",
    "load_encoder",
    "load_encoder_into_swinunetr",
    "EncoderLoad",
    "check_loaded",
    "EncoderVariantError",
    "is_v2_state",
]

FORMAT = "swinssl.encoder/1"
_LOG = logging.getLogger(__name__)
_PREFIX = "swinViT."
# MONAI's MLPBlock names its layers linear1/linear2; the load_from file layout (the released model_swinvit.pt) says
# fc1/fc2. The dots on both sides keep the rename from touching anything else.
_TO_LOAD_FROM = ((".mlp.linear1.", ".mlp.fc1."), (".mlp.linear2.", ".mlp.fc2."))
_RESERVED = frozenset(
    {"state_dict", "format", "feature_size", "in_channels", "depths", "num_heads", "window_size", "spatial_dims",
     "use_v2"}
)
# The residual conv blocks SwinTransformer(use_v2=True) puts before each stage: swinViT.layers1c.0.layer.conv1...
_V2_BLOCK = re.compile(r"^swinViT\.layers[1-4]c\.")


class EncoderVariantError(ValueError):
    """A SwinUNETR-V2 encoder offered to a V1 net, or the reverse: the weights cannot mean the same thing."""


def _encoder(model: nn.Module) -> nn.Module:
    """The ``swinViT`` of an SSLModel or SwinUNETR, looking through DDP (``.module``) and compile (``._orig_mod``)."""
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and not hasattr(model, "swinViT"):
            model = inner
    enc = getattr(model, "swinViT", None)
    if not isinstance(enc, nn.Module):
        raise TypeError(f"{type(model).__name__} has no 'swinViT' encoder")
    return enc


def _encoder_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Detached CPU copies of the encoder's state, keyed relative to ``swinViT`` (one tensor object per entry)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in _encoder(model).state_dict().items()}


def _to_load_from_key(rel: str) -> str:
    for ours, theirs in _TO_LOAD_FROM:
        rel = rel.replace(ours, theirs)
    return "module." + rel


def _from_load_from_key(key: str) -> str:
    rel = key[len("module.") :]
    for ours, theirs in _TO_LOAD_FROM:
        rel = rel.replace(theirs, ours)
    return _PREFIX + rel


def encoder_state_dict_for_monai(model: nn.Module) -> dict[str, Tensor]:
    """Encoder weights keyed as ``SwinUNETR.load_from`` reads them (``module.layers1.0.blocks.0.mlp.fc1.weight``...).

    Every tensor of ``model.swinViT`` appears exactly once; for a V1, 4-stage, non-Hyena encoder that is exactly the
    set of keys ``load_from`` reads (patch embedding, every block tensor incl. ``relative_position_index``,
    downsampling). A V2 encoder's ``module.layers{i}c.*`` keys are written too, but ``load_from`` never reads them.
    """
    return {_to_load_from_key(k): v for k, v in _encoder_tensors(model).items()}


def encoder_state_dict_swinvit(model: nn.Module) -> dict[str, Tensor]:
    """Encoder weights keyed as in ``SwinUNETR.state_dict()`` (``swinViT.*``), for ``load_state_dict`` users."""
    return {_PREFIX + k: v for k, v in _encoder_tensors(model).items()}


def _encoder_meta(model: nn.Module) -> dict[str, Any]:
    enc = _encoder(model)
    return {
        "format": FORMAT,
        "feature_size": int(enc.embed_dim),
        "in_channels": int(enc.patch_embed.proj.in_channels),
        "depths": [len(layer[0].blocks) for layer in (enc.layers1, enc.layers2, enc.layers3, enc.layers4)],
        "num_heads": [
            int(layer[0].blocks[0].num_heads) for layer in (enc.layers1, enc.layers2, enc.layers3, enc.layers4)
        ],
        "window_size": [int(w) for w in enc.window_size],
        "spatial_dims": len(enc.patch_size),
        "use_v2": bool(getattr(enc, "use_v2", False)),
    }


def _check_plain(value: Any, where: str) -> None:
    """Refuse anything ``torch.load(weights_only=True)`` could not read back (numpy scalars, Paths, objects...)."""
    if value is None or isinstance(value, (bool, int, float, str, Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, item in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: dict key {k!r} is not str/int")
            _check_plain(item, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}; only tensors and plain Python values can be saved")


def save_encoder(model: nn.Module, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
    """Write the encoder in both layouts (see module docstring) atomically; returns the path written.

    Args:
        model: an :class:`~swinssl.models.ssl_head.SSLModel` (or anything with a ``swinViT``; DDP is unwrapped).
        path: destination file; parent folders are created.
        extra: additional plain metadata (step, config...), merged at the top level. Reserved keys are refused.

    Raises:
        ValueError: if ``extra`` uses a reserved key. TypeError: if ``extra`` holds a non-plain value.
    """
    extra = dict(extra or {})
    clash = _RESERVED & extra.keys()
    if clash:
        raise ValueError(f"extra must not override reserved keys {sorted(clash)}")
    _check_plain(extra, "extra")

    tensors = _encoder_tensors(model)
    state: dict[str, Tensor] = {}
    # load_from layout first: a consumer that inspects only the first key (as the BTCV script does) sees "module."
    # and strips it everywhere, which is harmless for the swinViT.* keys; the same tensor objects are shared.
    state.update({_to_load_from_key(k): v for k, v in tensors.items()})
    state.update({_PREFIX + k: v for k, v in tensors.items()})
    payload = {"state_dict": state, **_encoder_meta(model), **extra}

    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)  # readers never see a half-written checkpoint
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def swinvit_state_from_checkpoint(ckpt: Mapping[str, Any]) -> dict[str, Tensor]:
    """Extract encoder tensors keyed ``swinViT.*`` from any layout we may meet.

    Accepted (checked in this order): ``swinViT.*`` (ours, BTCV), ``module.swinViT.*`` (a DDP-wrapped pretraining
    model), ``swin_vit.*`` / ``module.swin_vit.*``; otherwise the ``load_from`` layout (``module.patch_embed.*``,
    ``module.layers*``, ``fc1``/``fc2``). ``ckpt`` may be the file's dict or its ``state_dict``.

    Raises:
        ValueError: when no encoder key is found.
    """
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(sd, Mapping):
        raise ValueError(f"checkpoint is not a dict with a 'state_dict' (got {type(ckpt).__name__})")
    direct: dict[str, Tensor] = {}
    for key, value in sd.items():
        if not isinstance(value, Tensor):
            continue
        for prefix in ("swinViT.", "module.swinViT.", "swin_vit.", "module.swin_vit."):
            if key.startswith(prefix):
                direct[_PREFIX + key[len(prefix) :]] = value
                break
    if direct:
        return direct
    legacy = {
        _from_load_from_key(k): v
        for k, v in sd.items()
        if isinstance(v, Tensor) and (k.startswith("module.patch_embed.") or k.startswith("module.layers"))
    }
    if legacy:
        return legacy
    sample = ", ".join(list(sd)[:5]) or "<empty>"
    raise ValueError(f"no Swin encoder weights in checkpoint (first keys: {sample})")


def _net_summary(enc: nn.Module) -> str:
    return (f"feature_size={enc.embed_dim}, in_channels={enc.patch_embed.proj.in_channels}, "
            f"use_v2={bool(getattr(enc, 'use_v2', False))}")


def is_v2_state(state: Iterable[str]) -> bool:
    """Whether encoder keys (``swinViT.*``, as :func:`swinvit_state_from_checkpoint` returns) hold V2 conv blocks."""
    return any(_V2_BLOCK.match(key) for key in state)


def _variant(use_v2: bool) -> str:
    return "SwinUNETR-V2 (use_v2=True)" if use_v2 else "SwinUNETR V1 (use_v2=False)"


def _check_variant(ckpt: Any, src: Mapping[str, Tensor], enc: nn.Module, path: str | os.PathLike[str]) -> None:
    """Refuse a V1/V2 mismatch before any shape or key check, so the error says what is wrong, not which keys."""
    saved = is_v2_state(src)
    recorded = ckpt.get("use_v2") if isinstance(ckpt, Mapping) else None
    if recorded is not None and bool(recorded) != saved:
        raise EncoderVariantError(f"{path}: records use_v2={recorded} but its weights are {_variant(saved)}; the file "
                                  f"is inconsistent, re-export it")
    net = bool(getattr(enc, "use_v2", False))
    if saved != net:
        raise EncoderVariantError(
            f"{path}: the checkpoint's encoder is {_variant(saved)} but the net is {_variant(net)}: the V2 residual "
            f"conv blocks (layers1c..layers4c) would be {'dropped' if saved else 'left randomly initialised'}; "
            f"build the net with use_v2={saved} (swinssl: model.use_v2={str(saved).lower()}) or use a "
            f"{'V2' if net else 'V1'} encoder")


def check_loaded(net: nn.Module, state: Mapping[str, Tensor], keys: Iterable[str] | None = None) -> None:
    """Assert that ``net``'s encoder tensors equal ``state`` (keys ``swinViT.*``), so a silent no-op load is caught.

    Args:
        net: a SwinUNETR (or SSLModel).
        state: expected tensors keyed ``swinViT.*``.
        keys: the keys to check; ``None`` checks every ``swinViT.*`` entry of ``net``.

    Raises:
        ValueError: naming the keys that are absent from ``state`` or differ.
    """
    current = {_PREFIX + k: v for k, v in _encoder(net).state_dict().items()}
    wanted = list(current) if keys is None else list(keys)
    absent = [k for k in wanted if k not in state or k not in current]
    differ = [
        k
        for k in wanted
        if k in state and k in current and not torch.equal(current[k].detach().cpu(), state[k].to(current[k].dtype))
    ]
    if absent or differ:
        raise ValueError(
            f"encoder not loaded: absent={absent[:5]} (total {len(absent)}), "
            f"different={differ[:5]} (total {len(differ)})"
        )


@dataclass(frozen=True)
class EncoderLoad:
    """What :func:`load_encoder` did: the ``swinViT.*`` keys loaded (net order) and the patch-embedding rule applied
    (:func:`swinssl.models.public_weights.inflate_patch_embedding`), for the run's log and parameters."""

    keys: list[str]
    patch_embedding: str


def _load_context(ckpt: Any, src: Mapping[str, Tensor], enc: nn.Module, path: str | os.PathLike[str]) -> str:
    """What the file and the net are, for error messages (the published weights carry no metadata: read the
    patch embedding's shape, (feature_size, in_channels, ...))."""
    if isinstance(ckpt, Mapping) and "feature_size" in ckpt:
        saved = (f"checkpoint saved with feature_size={ckpt.get('feature_size')}, in_channels={ckpt.get('in_channels')}"
                 f", use_v2={is_v2_state(src)}")
    elif src.get(PATCH_EMBEDDING) is not None and src[PATCH_EMBEDDING].ndim >= 2:
        shape = src[PATCH_EMBEDDING].shape
        saved = f"checkpoint with feature_size={shape[0]}, in_channels={shape[1]}, use_v2={is_v2_state(src)}"
    else:
        saved = "checkpoint"
    return f"{path}: {saved}; net has {_net_summary(enc)}"


def _check_shapes_and_keys(src: Mapping[str, Tensor], target: Mapping[str, Tensor], context: str,
                           strict_encoder: bool) -> list[str]:
    """The keys to load; ValueError on any shape mismatch, on one-sided keys when ``strict_encoder``, or on none."""
    mismatched = [
        f"{k}: checkpoint {tuple(src[k].shape)} vs net {tuple(t.shape)}"
        for k, t in target.items()
        if k in src and src[k].shape != t.shape
    ]
    if mismatched:
        raise ValueError(
            f"encoder shape mismatch ({context}); {len(mismatched)} tensor(s) differ, e.g. " + "; ".join(mismatched[:3])
        )
    missing = [k for k in target if k not in src]
    unexpected = [k for k in src if k not in target]
    if strict_encoder and (missing or unexpected):
        raise ValueError(
            f"encoder keys do not match ({context}): missing from checkpoint {missing[:5]} (total {len(missing)}), "
            f"not in net {unexpected[:5]} (total {len(unexpected)})"
        )
    loaded = [k for k in target if k in src]
    if not loaded:
        raise ValueError(f"no encoder tensor of the checkpoint matches the net ({context})")
    return loaded


def load_encoder(net: nn.Module, path: str | os.PathLike[str], strict_encoder: bool = True,
                 pet_channel: str = "zeros") -> EncoderLoad:
    """Load pretrained encoder weights into ``net.swinViT`` (a MONAI SwinUNETR or an SSLModel) and verify they landed.

    Args:
        net: the network whose ``swinViT`` receives the weights.
        path: a file from :func:`save_encoder`, a BTCV-style ``swinViT.*`` checkpoint, or a ``load_from`` layout one
            (the published MONAI self-supervised ``model_swinvit.pt`` included; its other keys, heads, are ignored).
        strict_encoder: require a one-to-one match between the checkpoint's encoder keys and ``net.swinViT``'s.
            When False, keys present on only one side are skipped, but at least one must load.
        pet_channel: how a 1-channel (CT) checkpoint's patch embedding is widened to the net's channels: "zeros" or
            "copy_ct" (:mod:`swinssl.models.public_weights`); a file with the net's channels loads as saved.

    Raises:
        EncoderVariantError: (a ValueError) when the checkpoint is SwinUNETR-V2 and the net V1, or the reverse (also
            with ``strict_encoder=False``: a half-V2 encoder is never what was meant).
        ValueError: on input channels that cannot be widened (not 1 in the file), on any other shape mismatch (e.g.
            feature_size 24 vs 48, another window size), on missing/unexpected encoder keys when
            ``strict_encoder``, or when nothing could be loaded.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    src = swinvit_state_from_checkpoint(ckpt)
    enc = _encoder(net)
    target = {_PREFIX + k: v for k, v in enc.state_dict().items()}
    _check_variant(ckpt, src, enc, path)
    context = _load_context(ckpt, src, enc, path)
    src, rule = inflate_patch_embedding(src, int(enc.patch_embed.proj.in_channels), pet_channel, where=context)
    loaded = _check_shapes_and_keys(src, target, context, strict_encoder)
    enc.load_state_dict({k[len(_PREFIX) :]: src[k] for k in loaded}, strict=False)
    check_loaded(net, src, loaded)  # every tensor, the widened patch embedding included
    _LOG.info("encoder %s: %d tensors loaded, %s", path, len(loaded), rule)
    return EncoderLoad(loaded, rule)


def load_encoder_into_swinunetr(net: nn.Module, path: str | os.PathLike[str], strict_encoder: bool = True,
                                pet_channel: str = "zeros") -> list[str]:
    """:func:`load_encoder`, returning the ``swinViT.*`` keys that were loaded, in the net's order.

    A file with the net's input channels loads as saved; a 1-channel (CT) one has its patch embedding widened by
    ``pet_channel`` (the rule applied is logged; :func:`load_encoder` returns it). Raises as :func:`load_encoder`.
    """
    return load_encoder(net, path, strict_encoder, pet_channel).keys
