"""Whole-volume inference of the 12-class segmentation model and the files a person looks at afterwards.

- `body_box`: the bounding box of the body in a prepared study (CT above ~-400 HU) plus a margin.
- `predict_volume`: MONAI sliding-window inference over that box only, argmax to a uint8 label volume.
- `save_prediction`: the label volume as NIfTI on the study's PET grid (the geometry `swinssl export` writes).
- `overlay_png`: truth vs prediction over CT in coronal, sagittal and axial planes.
- `dice_bar_chart`: per-class Dice bars, one group per series (e.g. scratch vs pretrained).

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

import io
import math
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba_array
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from monai.inferers import sliding_window_inference
from scipy import ndimage
from torch import Tensor, nn

from petct.labels import CLASSES, LESION
from petct.qc import body_centre
from petct.shards import PreparedStudy, atomic_write_bytes

__all__ = ["body_box", "predict_volume", "save_prediction", "overlay_png", "dice_bar_chart"]

Box = tuple[slice, slice, slice]
LIVER = CLASSES.index("liver")
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
    num_classes: int = 12,
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
        num_classes: number of output channels of `model`.
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
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{suffix}")
    try:
        sitk.WriteImage(study.to_sitk(prediction.astype(np.uint8, copy=False)), str(tmp), useCompression=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def new_figure(**kwargs) -> Figure:
    """A figure on the Agg canvas, without pyplot: no display, no global figure registry, safe in workers."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, facecolor=fig.get_facecolor())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue(), path.parent)
    return path


# ----------------------------------------------------------------------------------------------------------- overlay
# One saturated colour per class index, readable over gray CT (index 0, background, is never drawn).
CLASS_COLOURS: tuple[str, ...] = ("#000000", "#00e5ff", "#ff00d4", "#ffe600", "#ff8c00", "#ff6fa8", "#39ff14",
                                  "#a24bff", "#c8642d", "#ffd27f", "#2f6bff", "#ff1a1a")


def _class_colours() -> np.ndarray:
    """(classes, 4) RGBA of `CLASS_COLOURS`, background transparent."""
    rgba = to_rgba_array(CLASS_COLOURS[: len(CLASSES)])
    rgba[0, 3] = 0.0
    return rgba


def _axial_index(truth: np.ndarray | None, prediction: np.ndarray, centre_z: int) -> tuple[int, str]:
    """Slice through the largest lesion (truth, else predicted), else the liver, else the body centre."""
    for cls, name in ((LESION, "largest lesion"), (LIVER, "liver")):
        for volume in (truth, prediction):
            if volume is None or not (volume == cls).any():
                continue
            components, count = ndimage.label(volume == cls)
            largest = 1 + int(np.argmax(np.bincount(components.ravel())[1:])) if count > 1 else 1
            return int(np.median(np.nonzero(components == largest)[0])), name
    return centre_z, "body centre"


def _planes(volume: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    """Coronal, sagittal, axial planes of a (Z, Y, X) volume through `centre`; head up in the first two."""
    z, y, x = centre
    return [volume[::-1, y, :], volume[::-1, :, x], volume[z]]


def _aspects(spacing: tuple[float, float, float]) -> list[float]:
    sx, sy, sz = spacing
    return [sz / sx, sz / sy, sy / sx]


def _plane_heights(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> list[float]:
    """Physical height / width of the coronal, sagittal and axial planes: the figure's row ratios."""
    z, y, x = shape
    sx, sy, sz = spacing
    return [z * sz / (x * sx), z * sz / (y * sy), y * sy / (x * sx)]


def _draw_labels(ax: Axes, plane: np.ndarray, colours: np.ndarray, filled: bool, aspect: float) -> None:
    """Prediction as translucent colours, truth as contours of the same class colour."""
    if filled:
        rgba = colours[plane]
        rgba[..., 3] = np.where(plane > 0, 0.55, 0.0)
        ax.imshow(rgba, aspect=aspect, interpolation="nearest")
        return
    for cls in np.unique(plane):
        if cls > 0:
            ax.contour(plane == cls, levels=[0.5], colors=[colours[cls]], linewidths=1.0)


def overlay_png(study: PreparedStudy, prediction: np.ndarray, path: Path, title: str = "") -> Path:
    """3 x 2 panel over CT: rows coronal / sagittal (body centre) / axial (largest lesion, else liver), columns
    truth (class-coloured contours) and prediction (class colours); a legend of the classes shown. Returns `path`."""
    ct = study.image[0]
    truth = study.label
    colours = _class_colours()
    centre = body_centre(ct)
    z, axial_name = _axial_index(truth, prediction, centre[0])
    centre = (z, centre[1], centre[2])
    heights = _plane_heights(ct.shape, study.spacing)
    fig = new_figure(figsize=(8, 4.3 * sum(heights) + 2), facecolor="black")
    axes = fig.subplots(3, 2, gridspec_kw={"height_ratios": heights})
    rows = zip(_planes(ct, centre), _planes(truth, centre) if truth is not None else [None] * 3,
               _planes(prediction, centre), _aspects(study.spacing), ("coronal", "sagittal", f"axial ({axial_name})"))
    for row, (ct_plane, truth_plane, pred_plane, aspect, name) in enumerate(rows):
        for col, (plane, heading) in enumerate(((truth_plane, "truth"), (pred_plane, "prediction"))):
            ax = axes[row, col]
            ax.imshow(ct_plane, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
            if plane is not None:
                _draw_labels(ax, plane, colours, filled=col == 1, aspect=aspect)
            ax.set_axis_off()
            ax.set_title(f"{heading}: {name}" + ("" if plane is not None else " (unlabelled)"), color="white",
                         fontsize=9)
    shown = set(np.unique(prediction).tolist()) | (set(np.unique(truth).tolist()) if truth is not None else set())
    handles = [Patch(color=colours[c], label=CLASSES[c]) for c in range(1, len(CLASSES)) if c in shown]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False, labelcolor="white")
    fig.suptitle(title or study.study_id, color="white", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return save_png(fig, path)


# ------------------------------------------------------------------------------------------------------- bar chart
def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _series_matrix(per_class: Mapping) -> tuple[list[str], np.ndarray]:
    """Series names and a (series, foreground class) matrix of Dice; absent classes and NaN stay NaN.

    A mapping whose values are numbers is one series ("dice"); class keys may be ints or digit strings (JSON).
    """
    if not per_class:
        raise ValueError("dice_bar_chart needs at least one series or class")
    series = {"dice": per_class} if all(_is_number(v) for v in per_class.values()) else dict(per_class)
    matrix = np.full((len(series), len(CLASSES) - 1), np.nan)
    for row, values in enumerate(series.values()):
        for key, value in values.items():
            cls = int(key)
            if not 1 <= cls < len(CLASSES):
                raise ValueError(f"class {key!r} is not a foreground class 1..{len(CLASSES) - 1}")
            matrix[row, cls - 1] = float(value)
    return [str(name) for name in series], matrix


def dice_bar_chart(per_class: dict[str, dict[int, float]] | dict[int, float], path: Path, title: str = "") -> Path:
    """Grouped bars of per-class Dice, x = foreground class names, one colour per series; returns `path`.

    Args:
        per_class: {class: dice} (one series) or {series name: {class: dice}}, e.g. `dice_per_class` results or
            `aggregate(...)["per_class"]` for "scratch" and "pretrained". NaN (class not scored, see
            `swinssl.eval.metrics`) and absent classes are drawn as no bar, with an "x" on the axis.
        path: PNG to write (atomically).
        title: figure title.
    """
    names, matrix = _series_matrix(per_class)
    classes = np.arange(matrix.shape[1])
    width = 0.8 / len(names)
    fig = new_figure(figsize=(max(8.0, 0.45 * matrix.shape[1] * len(names) ** 0.5 + 3), 4.5))
    ax = fig.subplots()
    handles = []
    for row, name in enumerate(names):
        offsets = classes - 0.4 + width * (row + 0.5)
        finite = np.isfinite(matrix[row])
        ax.bar(offsets[finite], matrix[row, finite], width=width * 0.95, color=f"C{row}")
        mean = float(np.mean(matrix[row, finite])) if finite.any() else math.nan
        handles.append(Patch(color=f"C{row}", label=f"{name} (mean {mean:.3f})"))
        ax.plot(offsets[~finite], np.full((~finite).sum(), 0.015), "x", color=f"C{row}", markersize=5)
    ax.set_xticks(classes, CLASSES[1:], rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice")
    ax.grid(axis="y", alpha=0.3)
    handles.append(Line2D([], [], marker="x", linestyle="", color="0.3", label="not scored (NaN) / absent"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)
