"""The figures a person looks at after fine-tuning (Agg canvas, no pyplot: safe in Ray workers and headless jobs).

- `overlay_png`: truth vs prediction over CT in coronal, sagittal and axial planes, coloured per class.
- `dice_bar_chart`: per-class Dice bars, one group per series (e.g. scratch vs pretrained).
- `new_figure` / `save_png`: the canvas and the atomic PNG write every figure of the platform uses.

Class names and colours come from the cohort's label set: the 12 PSMA classes keep their fixed colours
(`CLASS_COLOURS`), any other set gets a generated palette of distinct saturated hues (`class_palette`).
"""

from __future__ import annotations

import colorsys
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba_array
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from scipy import ndimage

from petct.labels import PSMA, LabelSet
from petct.qc import body_centre
from petct.shards import PreparedStudy, atomic_write_bytes

__all__ = ["new_figure", "save_png", "class_palette", "overlay_png", "dice_bar_chart"]


def new_figure(**kwargs) -> Figure:
    """A figure on the Agg canvas, without pyplot: no display, no global figure registry, safe in workers."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    """Render `fig` as PNG into `path` atomically (folders created); returns `path`."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, facecolor=fig.get_facecolor())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue(), path.parent)
    return path


# ----------------------------------------------------------------------------------------------------------- overlay
CLASS_COLOURS: tuple[str, ...] = ("#000000", "#00e5ff", "#ff00d4", "#ffe600", "#ff8c00", "#ff6fa8", "#39ff14",
                                  "#a24bff", "#c8642d", "#ffd27f", "#2f6bff", "#ff1a1a")
"""The PSMA set's colours: one saturated colour per class value, readable over gray CT (0, background, unused)."""


def class_palette(labels: LabelSet) -> tuple[str, ...]:
    """One colour per class value: `CLASS_COLOURS` for the PSMA set, otherwise distinct saturated hues (golden-ratio
    spaced around the colour wheel, so any number of classes stays distinguishable); the lesion class is red."""
    if labels.names == PSMA.names:
        return CLASS_COLOURS
    colours = ["#000000"]
    for index in range(1, labels.num_classes):
        hue = (0.5 + 0.618034 * (index - 1)) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.9, 1.0)
        colours.append(f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}")
    if labels.lesion is not None:
        colours[labels.lesion] = "#ff1a1a"
    return tuple(colours)


def _class_colours(labels: LabelSet) -> np.ndarray:
    """(classes, 4) RGBA of `class_palette(labels)`, background transparent."""
    rgba = to_rgba_array(class_palette(labels))
    rgba[0, 3] = 0.0
    return rgba


def _axial_classes(labels: LabelSet) -> list[tuple[int, str]]:
    """Classes the axial plane may go through, in order: the lesion class, a class named liver, then the others."""
    first = [(labels.lesion, f"largest {labels.lesion_name}")] if labels.lesion is not None else []
    if "liver" in labels.names[1:]:
        first.append((labels.value("liver"), "liver"))
    taken = {c for c, _ in first}
    return first + [(c, labels.name(c)) for c in labels.foreground if c not in taken]


def _axial_index(truth: np.ndarray | None, prediction: np.ndarray, centre_z: int, labels: LabelSet
                 ) -> tuple[int, str]:
    """Slice through the largest lesion (truth, else predicted), else the liver, else another class present (first
    in label order), else the body centre."""
    for cls, name in _axial_classes(labels):
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


def overlay_png(study: PreparedStudy, prediction: np.ndarray, path: Path, labels: LabelSet, title: str = "") -> Path:
    """3 x 2 panel over CT: rows coronal / sagittal (body centre) / axial (largest lesion, else liver), columns
    truth (class-coloured contours) and prediction (class colours); a legend of the classes shown (names of
    `labels`). Returns `path`."""
    ct = study.image[0]
    truth = study.label
    colours = _class_colours(labels)
    centre = body_centre(ct)
    z, axial_name = _axial_index(truth, prediction, centre[0], labels)
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
    handles = [Patch(color=colours[c], label=labels.name(c)) for c in labels.foreground if c in shown]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False, labelcolor="white")
    fig.suptitle(title or study.study_id, color="white", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return save_png(fig, path)


# ------------------------------------------------------------------------------------------------------- bar chart
def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _series_matrix(per_class: Mapping, classes: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Series names and a (series, class) matrix of Dice, columns in the order of `classes`; absent classes and
    NaN (or None, from JSON) stay NaN.

    A mapping whose values are numbers is one series ("dice"); keys are class names.
    """
    if not per_class:
        raise ValueError("dice_bar_chart needs at least one series or class")
    series = {"dice": per_class} if all(_is_number(v) for v in per_class.values()) else dict(per_class)
    column = {name: i for i, name in enumerate(classes)}
    matrix = np.full((len(series), len(classes)), np.nan)
    for row, values in enumerate(series.values()):
        for key, value in values.items():
            if key not in column:
                raise ValueError(f"class {key!r} is not one of the classes {list(classes)}")
            matrix[row, column[key]] = math.nan if value is None else float(value)
    return [str(name) for name in series], matrix


def dice_bar_chart(per_class: dict[str, dict[str, float]] | dict[str, float], path: Path, classes: Sequence[str],
                   title: str = "") -> Path:
    """Grouped bars of per-class Dice, x = `classes` (class names), one colour per series; returns `path`.

    Args:
        per_class: {class name: dice} (one series) or {series name: {class name: dice}}, e.g. the `dice` family of
            "scratch" and "pretrained" runs. NaN (class not scored, see `swinssl.eval.metrics`) and absent classes
            are drawn as no bar, with an "x" on the axis.
        path: PNG to write (atomically).
        classes: the x axis, e.g. the label set's foreground names (`[labels.name(c) for c in labels.foreground]`).
        title: figure title.
    """
    names, matrix = _series_matrix(per_class, classes)
    columns = np.arange(matrix.shape[1])
    width = 0.8 / len(names)
    fig = new_figure(figsize=(max(8.0, 0.45 * matrix.shape[1] * len(names) ** 0.5 + 3), 4.5))
    ax = fig.subplots()
    handles = []
    for row, name in enumerate(names):
        offsets = columns - 0.4 + width * (row + 0.5)
        finite = np.isfinite(matrix[row])
        ax.bar(offsets[finite], matrix[row, finite], width=width * 0.95, color=f"C{row}")
        mean = float(np.mean(matrix[row, finite])) if finite.any() else math.nan
        handles.append(Patch(color=f"C{row}", label=f"{name} (mean {mean:.3f})"))
        ax.plot(offsets[~finite], np.full((~finite).sum(), 0.015), "x", color=f"C{row}", markersize=5)
    ax.set_xticks(columns, list(classes), rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice")
    ax.grid(axis="y", alpha=0.3)
    handles.append(Line2D([], [], marker="x", linestyle="", color="0.3", label="not scored (NaN) / absent"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)
