"""Checks on written images shared by the prediction tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk


def read_labels(path: Path) -> np.ndarray:
    """A label file's array, (Z, Y, X)."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    """Same size, origin (1 um), spacing and direction."""
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
