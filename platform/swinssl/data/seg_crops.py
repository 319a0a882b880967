"""Paired image/label crops for segmentation fine-tuning (pure numpy; runs inside Ray Data tasks).

Class-balanced sampling: a whole-body study is mostly background and liver; a lacrimal gland or a lesion fills a
few hundred voxels. Uniform crops would almost never show them, so each crop is centred on a voxel of a foreground
class drawn uniformly among the classes present (with a small share of uniform "background" crops so the model
also sees empty regions and learns not to fire there).
"""

from __future__ import annotations

import math

import numpy as np

from .crops import crop_starts

MAX_CENTRES_PER_CLASS = 2000
"""Candidate centres kept per class (a fixed-stride subsample of the class's voxels in C order)."""


def class_centres(label: np.ndarray, num_classes: int | None = None, max_per_class: int = MAX_CENTRES_PER_CLASS,
                  include_background: bool = True) -> dict[int, np.ndarray]:
    """Voxel indices of every class present in `label`, subsampled with a fixed stride.

    Args:
        label: (Z, Y, X) integer class map with values in [0, num_classes).
        num_classes: number of classes of the label set; a larger value in `label` raises ValueError. None: the
            largest value present + 1 (no check).
        max_per_class: at most this many indices per class: of a class's M voxels (C order) every
            ceil(M / max_per_class)-th is kept, so the subsample is deterministic and spread over the whole
            structure (both kidneys, every lesion), and the cost stays one pass over the volume plus one pass
            over the foreground (a few tens of ms on a 300x168x168 study).
        include_background: also return class 0 (a pass over the whole volume; the crop sampler skips it).

    Returns:
        {class: (N, 3) int64 array of (z, y, x) indices}, classes in increasing order, only classes with >= 1 voxel.
    """
    if label.ndim != 3:
        raise ValueError(f"label must be (Z, Y, X), got shape {label.shape}")
    flat = label.reshape(-1)
    if num_classes is None:
        num_classes = int(flat.max(initial=0)) + 1
    counts = np.bincount(flat, minlength=num_classes)
    if counts.size > num_classes:
        raise ValueError(f"label has class {counts.size - 1}, expected classes 0..{num_classes - 1}")
    foreground = np.flatnonzero(flat)  # (F,) flat indices of all foreground voxels, one pass
    values = flat[foreground]
    order = np.argsort(values, kind="stable")  # groups foreground indices by class, keeps C order within a class
    bounds = np.concatenate([[0], np.cumsum(counts[1:])])
    centres = {}
    if include_background and counts[0]:
        centres[0] = _thin(np.flatnonzero(flat == 0), max_per_class, label.shape)
    for cls in np.flatnonzero(counts[1:]) + 1:
        members = foreground[order[bounds[cls - 1]:bounds[cls]]]
        centres[int(cls)] = _thin(members, max_per_class, label.shape)
    return centres


def _thin(flat_index: np.ndarray, limit: int, shape: tuple[int, ...]) -> np.ndarray:
    """Every ceil(M / limit)-th of M flat indices -> (<= limit, 3) int64 (z, y, x)."""
    stride = max(1, math.ceil(flat_index.size / max(limit, 1)))
    return np.stack(np.unravel_index(flat_index[::stride], shape), axis=1).astype(np.int64)


def sample_seg_crops(image: np.ndarray, label: np.ndarray, roi: tuple[int, int, int], n: int,
                     rng: np.random.Generator, class_balanced: bool = True, num_classes: int | None = None,
                     background_prob: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """n paired crops of the same windows of `image` and `label`.

    Args:
        image: (C, Z, Y, X) any dtype (float16 from shards).
        label: (Z, Y, X) integer class map, same spatial shape as `image` (ValueError otherwise).
        roi: crop size (z, y, x). An axis where the volume is smaller than roi is zero-padded (image 0, label 0 =
            background) up to roi first, evenly on both sides (the odd voxel at the end).
        n: number of crops.
        rng: numpy Generator; all randomness comes from it.
        class_balanced: True: with probability `background_prob` (or always, when no foreground class is
            present) a uniformly random window; otherwise a foreground class uniformly among those present, then a
            random voxel of it (from `class_centres`) as the crop centre, the window shifted to lie inside the
            volume. False: uniformly random windows.
        num_classes: classes of the label set (values of `label` must be < num_classes); None: not checked.
        background_prob: share of uniform crops when class_balanced.

    Returns:
        (images (n, C, *roi) of image's dtype, labels (n, 1, *roi) uint8).
    """
    roi = _check_inputs(image, label, roi, background_prob)
    image, label = pad_to_roi(image, label, roi)
    if class_balanced:
        starts = _balanced_starts(label, roi, n, rng, num_classes, background_prob)
    else:
        starts = crop_starts(label.shape, roi, n, rng)
    return _cut(image, label, roi, starts)


def _check_inputs(image: np.ndarray, label: np.ndarray, roi: tuple[int, ...], background_prob: float
                  ) -> tuple[int, int, int]:
    """Validate shapes and arguments; returns roi as a tuple of 3 ints."""
    if image.ndim != 4 or label.ndim != 3 or image.shape[1:] != label.shape:
        raise ValueError(f"need image (C, Z, Y, X) and label (Z, Y, X) of the same grid, got {image.shape} "
                         f"and {label.shape}")
    roi = tuple(int(v) for v in roi)
    if len(roi) != 3 or min(roi) < 1:
        raise ValueError(f"roi must be 3 positive sizes, got {roi}")
    if not 0.0 <= background_prob <= 1.0:
        raise ValueError(f"background_prob must be in [0, 1], got {background_prob}")
    return roi


def pad_to_roi(image: np.ndarray, label: np.ndarray, roi: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad image (C, Z, Y, X) and label (Z, Y, X) evenly on any axis smaller than roi (no copy otherwise)."""
    short = np.maximum(np.asarray(roi) - np.asarray(label.shape), 0)
    if not short.any():
        return image, label
    widths = [(int(s) // 2, int(s) - int(s) // 2) for s in short]
    return np.pad(image, [(0, 0), *widths]), np.pad(label, widths)


def _balanced_starts(label: np.ndarray, roi: tuple[int, int, int], n: int, rng: np.random.Generator,
                     num_classes: int | None, background_prob: float) -> np.ndarray:
    """(n, 3) window starts: uniform with probability background_prob, else centred on a random class voxel."""
    starts = crop_starts(label.shape, roi, n, rng)  # the uniform ones; overwritten where a class is drawn
    centres = class_centres(label, num_classes, include_background=False)
    if not centres:
        return starts
    pools = list(centres.values())
    on_class = rng.random(n) >= background_prob
    picks = rng.integers(len(pools), size=n)
    for i in np.flatnonzero(on_class):
        pool = pools[picks[i]]
        starts[i] = pool[rng.integers(len(pool))] - np.asarray(roi) // 2
    high = np.asarray(label.shape) - np.asarray(roi)
    return np.clip(starts, 0, high)


def _cut(image: np.ndarray, label: np.ndarray, roi: tuple[int, int, int], starts: np.ndarray
         ) -> tuple[np.ndarray, np.ndarray]:
    """The windows at `starts` (n, 3): (n, C, *roi) image crops and (n, 1, *roi) uint8 label crops."""
    if not len(starts):
        return np.empty((0, image.shape[0], *roi), image.dtype), np.empty((0, 1, *roi), np.uint8)
    windows = [(slice(z, z + roi[0]), slice(y, y + roi[1]), slice(x, x + roi[2])) for z, y, x in starts]
    images = np.stack([image[(slice(None), *window)] for window in windows])
    labels = np.stack([label[window][None] for window in windows]).astype(np.uint8, copy=False)
    return images, labels
