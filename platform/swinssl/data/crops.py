"""Random 3D crops from one decoded volume (pure numpy; runs inside Ray Data tasks)."""

from __future__ import annotations

import numpy as np

BODY_THRESHOLD = 0.3
"""Normalised CT above this is inside the body (-400 HU with the default [-1000, 1000] window)."""


def body_mask(ct: np.ndarray) -> np.ndarray:
    """ct > BODY_THRESHOLD. For float16, non-negative finite values order like their bit patterns, so integer
    compares on a uint16 view give the same mask several times faster (numpy has no fast float16 compare); the
    upper bound keeps negative values, inf and NaN (sign bit or all-ones exponent) out of the mask."""
    if ct.dtype == np.float16:
        bits = ct.view(np.uint16)
        return (bits > np.float16(BODY_THRESHOLD).view(np.uint16)) & (bits < 0x7C00)
    return ct > BODY_THRESHOLD


def crop_starts(shape: tuple[int, ...], roi: tuple[int, ...], n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) uniform random start indices such that start + roi <= shape on every axis."""
    high = np.asarray(shape[-3:]) - np.asarray(roi) + 1
    if (high < 1).any():
        raise ValueError(f"crop {tuple(roi)} larger than volume {tuple(shape[-3:])}")
    return (rng.random((n, 3)) * high).astype(np.int64)


def sample_crops(image: np.ndarray, roi: tuple[int, ...], n: int, rng: np.random.Generator,
                 min_foreground: float = 0.0, tries: int = 8) -> np.ndarray:
    """n crops (n, C, *roi) from image (C, Z, Y, X), each with >= min_foreground body voxels when one of `tries`
    candidates has (whole-body volumes have lots of air around the patient: air-only crops teach nothing)."""
    starts = crop_starts(image.shape, roi, n * tries, rng).reshape(tries, n, 3)
    chosen = starts[0].copy()
    if min_foreground > 0:
        body = body_mask(image[0])
        done = np.zeros(n, bool)
        for candidate in starts:  # short loop over tries, not over voxels
            share = np.array([body[z:z + roi[0], y:y + roi[1], x:x + roi[2]].mean() for z, y, x in candidate])
            take = ~done & (share >= min_foreground)
            chosen[take], done = candidate[take], done | take
            if done.all():
                break
    return np.stack([image[:, z:z + roi[0], y:y + roi[1], x:x + roi[2]] for z, y, x in chosen])
