"""Whole-volume inference of the segmentation model (any label set) and its prediction files.

- `body_box`: the bounding box of the body in a prepared study (CT above ~-400 HU) plus a margin.
- `predict_volume`: MONAI sliding-window inference over that box only, argmax to a uint8 label volume.
- `save_prediction`: the label volume as NIfTI on the study's PET grid (the geometry `swinssl export` writes).

The figures (overlays, Dice bars) are in `swinssl.eval.plots`.

Why inference over the body box only is safe: a whole-body PET field of view (e.g. 168 x 168 x ~300 voxels at
4.07 x 4.07 x 3 mm) is mostly air, and every class, lesions included, lies inside the body. `prepare` fills the CT
outside its own field of view with air (-1000 HU -> 0.0) and air inside it normalises to ~0.0 too, so outside the box
(CT <= threshold everywhere, plus a `margin` of air around the body) there is nothing to segment: we write background
there instead of running the network on it. The network still sees every body voxel with at least `margin` voxels of
real air around it, and when the box is smaller than `roi` on an axis it is grown to `roi` with real voxels of the
volume (centred on the box, clamped to the volume), so windows are never padded with anything the full-volume
inference would not also see. Only a volume smaller than `roi` on an axis is padded, by MONAI, with 0 (= air in
normalised CT, SUV 0 in PET), exactly as full-volume sliding-window inference would pad it.

What cropping changes: for a network that predicts background on air (what training on these studies teaches) the
voxels outside the box are background either way. Inside the box the windows are tiled from the box corner rather
than the volume corner, so a real network sees slightly different context per voxel and overlapping windows blend
differently; the effect is of the order of changing `overlap`, not a loss of anything. Gaussian blending (our
default, unlike MONAI's "constant") down-weights window borders, where the context is poorest, which reduces it.
A per-voxel model gives bit-identical results cropped or not (tests/test_infer.py).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference
from torch import Tensor, nn

from petct.shards import PreparedStudy

__all__ = ["body_box", "predict_volume", "save_prediction", "write_image_atomic"]

Box = tuple[slice, slice, slice]
BODY_THRESHOLD = 0.3
"""Normalised CT above which a voxel is body: 0.3 is ~-400 HU with the default -1000..1000 HU window."""


# --------------------------------------------------------------------------------------------------------- inference
def body_box(image: np.ndarray | Tensor, threshold: float = BODY_THRESHOLD, margin: int = 4) -> Box:
    """Bounding box of the body in a (C, Z, Y, X) image: voxels with CT (channel 0) > `threshold`.

    Args:
        image: prepared image, channel 0 normalised CT in [0, 1]; NumPy array or tensor on any device.
        threshold: normalised CT value above which a voxel is body.
        margin: voxels added on every side, clamped to the volume.

    Returns:
        (z, y, x) slices with step None; the whole volume when no voxel is above `threshold`.
    """
    if image.ndim != 4:
        raise ValueError(f"image must be (C, Z, Y, X), got shape {tuple(image.shape)}")
    body = image[0] > threshold
    body = body.cpu().numpy() if isinstance(body, Tensor) else np.asarray(body)
    shape = body.shape
    if not body.any():
        return tuple(slice(0, n) for n in shape)
    box = []
    for axis, size in enumerate(shape):
        hits = np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, size)))
    return tuple(box)


def _grow_to_roi(box: Box, roi: Sequence[int], shape: Sequence[int]) -> Box:
    """Grow each axis of `box` shorter than `roi` to `roi` (centred, shifted to stay inside `shape`)."""
    grown = []
    for sl, size, n in zip(box, roi, shape):
        length = sl.stop - sl.start
        if length >= size or n <= size:
            grown.append(slice(0, n) if n <= size else sl)
            continue
        start = min(max(sl.start - (size - length) // 2, 0), n - size)
        grown.append(slice(start, start + size))
    return tuple(grown)


def _cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _predictor(model: nn.Module, device: torch.device, amp: bool) -> Callable[[Tensor], Tensor]:
    """`model` as a MONAI predictor: bf16 autocast and channels_last_3d windows on CUDA, plain float elsewhere.

    CPU autocast is left off: without AMX, bf16 convolutions on CPU are slower than float32.
    """
    cuda = _cuda(device)

    def predict(windows: Tensor) -> Tensor:
        if cuda:
            windows = windows.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and cuda):
            return model(windows)

    return predict


def _channels_last_3d(model: nn.Module) -> None:
    """5-D weights (Conv3d) to channels_last_3d, which cuDNN's bf16 3-D convolutions prefer; others untouched."""
    for param in model.parameters():
        if param.dim() == 5:
            param.data = param.data.contiguous(memory_format=torch.channels_last_3d)


def predict_volume(
    model: nn.Module,
    image: Tensor,
    roi: tuple[int, int, int],
    num_classes: int,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    mode: str = "gaussian",
    crop_to_body: bool = True,
    device: torch.device | str = "cpu",
    amp: bool = True,
) -> np.ndarray:
    """Label volume of one study: argmax of MONAI sliding-window inference, over the body box only.

    Args:
        model: maps (B, C, *roi) -> (B, num_classes, *roi) logits, e.g. a MONAI SwinUNETR. It is moved to `device`
            in place, as `nn.Module.to` does (on CUDA its 5-D weights also become channels_last_3d), and run in eval
            mode; its train/eval flag is restored afterwards.
        image: (C, Z, Y, X) float image (a NumPy array is accepted too), channel 0 normalised CT.
        roi: sliding-window size (z, y, x), e.g. (96, 96, 96).
        num_classes: number of output channels of `model` (the label set's `num_classes`).
        sw_batch_size: windows per forward pass.
        overlap: window overlap fraction, as in MONAI.
        mode: blending of overlapping windows, "gaussian" (down-weights window borders) or "constant".
        crop_to_body: run only inside `body_box(image)` (grown to `roi` where smaller); everything outside is
            background. See the module docstring for why this is safe. False runs over the whole volume.
        device: where the model and the windows live; on CUDA with `amp`, bf16 autocast.
        amp: use bf16 autocast on CUDA (ignored on CPU).

    Returns:
        (Z, Y, X) uint8 labels in [0, num_classes).
    """
    device = torch.device(device)
    image = torch.as_tensor(image)
    if image.ndim != 4:
        raise ValueError(f"image must be (C, Z, Y, X), got shape {tuple(image.shape)}")
    roi = tuple(int(r) for r in roi)
    shape = tuple(image.shape[1:])
    box = body_box(image) if crop_to_body else tuple(slice(0, n) for n in shape)
    box = _grow_to_roi(box, roi, shape)
    crop = image[(slice(None), *box)].to(device=device, dtype=torch.float32)[None]
    was_training = model.training
    model.to(device).eval()
    if _cuda(device):
        _channels_last_3d(model)
    try:
        with torch.inference_mode():
            logits = sliding_window_inference(crop, roi, sw_batch_size, _predictor(model, device, amp), overlap=overlap,
                                              mode=mode, sw_device=device, device=device)
            if logits.shape[1] != num_classes:
                raise ValueError(f"model gave {logits.shape[1]} channels, expected num_classes={num_classes}")
            labels = logits[0].argmax(dim=0).to(torch.uint8).cpu().numpy()
    finally:
        model.train(was_training)
    out = np.zeros(shape, dtype=np.uint8)
    out[box] = labels
    return out


# ------------------------------------------------------------------------------------------------------------- files
def save_prediction(study: PreparedStudy, prediction: np.ndarray, path: Path) -> Path:
    """Write a (Z, Y, X) label volume as uint8 NIfTI with the study's PET geometry, atomically; return `path`.

    The file is written under a temporary name in the same folder (same extension, so ITK picks the same writer)
    and renamed over `path`: a reader sees the old file or the whole new one, never half of it.
    """
    path = Path(path)
    prediction = np.asarray(prediction)
    if study.image is not None and prediction.shape != tuple(study.image.shape[1:]):
        raise ValueError(f"prediction shape {prediction.shape} != study grid {tuple(study.image.shape[1:])}")
    return write_image_atomic(study.to_sitk(prediction.astype(np.uint8, copy=False)), path)


def write_image_atomic(image: sitk.Image, path: Path) -> Path:
    """`sitk.WriteImage` (compressed) under a temporary name in the same folder (same extension, so ITK picks the
    same writer), then renamed over `path`: a reader sees the old file or the whole new one. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{suffix}")
    try:
        sitk.WriteImage(image, str(tmp), useCompression=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
