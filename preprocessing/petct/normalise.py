"""Clip-and-scale intensity normalisation to [0, 1] (pure array functions)."""

from __future__ import annotations

import numpy as np

from .config import Window


def normalise(values: np.ndarray, window: Window) -> np.ndarray:
    """float32 copy of `values` clipped to the window and mapped to [0, 1]; shape unchanged."""
    scaled = (values.astype(np.float32, copy=False) - np.float32(window.lo)) / np.float32(window.hi - window.lo)
    return np.clip(scaled, 0.0, 1.0, out=scaled)
