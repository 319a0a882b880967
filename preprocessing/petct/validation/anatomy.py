"""Analytic anatomy: shapes with a CT value (HU) and a PET value (SUV), painted at any physical points.

A shape is a solid defined by an inequality on physical coordinates (mm, DICOM LPS: +x patient left, +y posterior,
+z head), so CT and PET are rendered from the same anatomy without a label map in between: the CT is painted at
T^-1(y) for each CT voxel centre y (T = true PET->CT motion), the PET at supersampled PET points. Painter's
order: a later shape overwrites an earlier one (organs inside the body, marrow inside bone).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage


@dataclass(frozen=True)
class Shape:
    """An axis-aligned ellipsoid ('ellipsoid') or elliptic cylinder along z ('cylinder', from z_lo to z_hi)."""

    kind: str
    centre: tuple[float, float, float]
    semi: tuple[float, float, float]
    """Semi-axes (mm); for a cylinder the third is ignored (its extent is z_lo..z_hi)."""
    hu: float
    suv: float
    z_lo: float = 0.0
    z_hi: float = 0.0

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned box (lo, hi) holding the shape."""
        c, r = np.asarray(self.centre), np.asarray(self.semi)
        lo, hi = c - r, c + r
        if self.kind == "cylinder":
            lo[2], hi[2] = self.z_lo, self.z_hi
        return lo, hi

    def contains(self, p: np.ndarray) -> np.ndarray:
        """Boolean mask of the points p (N, 3) inside the shape."""
        d = (p - np.asarray(self.centre, np.float32)) / np.asarray(self.semi, np.float32)
        if self.kind == "ellipsoid":
            return np.einsum("ij,ij->i", d, d) <= 1.0
        if self.kind == "cylinder":
            return (d[:, 0] ** 2 + d[:, 1] ** 2 <= 1.0) & (p[:, 2] >= self.z_lo) & (p[:, 2] <= self.z_hi)
        raise ValueError(f"unknown shape kind {self.kind!r}")


def ellipsoid(centre, semi, hu: float, suv: float) -> Shape:
    return Shape("ellipsoid", tuple(map(float, centre)), tuple(map(float, semi)), hu, suv)


def cylinder(xy, semi_xy, z_lo: float, z_hi: float, hu: float, suv: float) -> Shape:
    return Shape("cylinder", (float(xy[0]), float(xy[1]), 0.0), (float(semi_xy[0]), float(semi_xy[1]), 1.0),
                 hu, suv, float(z_lo), float(z_hi))


def paint(shapes: list[Shape], points: np.ndarray, field: str) -> np.ndarray:
    """Value of `field` ('hu' or 'suv') at each point; outside every shape: air (-1000 HU, SUV 0)."""
    out = np.full(len(points), -1000.0 if field == "hu" else 0.0, np.float32)
    for shape in _near(shapes, points):
        out[shape.contains(points)] = getattr(shape, field)
    return out


def _near(shapes: list[Shape], points: np.ndarray) -> list[Shape]:
    """The shapes whose box meets the points' box (painting slab by slab skips most of the others)."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    return [s for s in shapes if np.all(s.bounds()[0] <= hi) and np.all(s.bounds()[1] >= lo)]


def inside_body(shapes: list[Shape], points: np.ndarray) -> np.ndarray:
    """Points inside any shape (the body is the union of the shapes)."""
    mask = np.zeros(len(points), bool)
    for shape in _near(shapes, points):
        mask |= shape.contains(points)
    return mask


def voxel_points(image: sitk.Image, k0: int = 0, k1: int | None = None) -> np.ndarray:
    """Physical centres (N, 3) of the voxels of slices k0..k1 in numpy (z, y, x) order (identity direction)."""
    nx, ny, nz = image.GetSize()
    (ox, oy, oz), (sx, sy, sz) = image.GetOrigin(), image.GetSpacing()
    k = np.arange(k0, nz if k1 is None else min(k1, nz))
    zz, yy, xx = np.meshgrid(oz + sz * k, oy + sy * np.arange(ny), ox + sx * np.arange(nx), indexing="ij")
    return np.stack([xx.ravel(), yy.ravel(), zz.ravel()], axis=1).astype(np.float32)


def grid_image(origin, spacing, size) -> sitk.Image:
    """An empty float32 image, identity direction (a geometry to paint on)."""
    image = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    image.SetOrigin([float(v) for v in origin])
    image.SetSpacing([float(v) for v in spacing])
    return image


def apply_points(transform: sitk.Transform, points: np.ndarray) -> np.ndarray:
    """transform(p) for each row of points (N, 3), through the transform's affine matrix (rigid/affine only)."""
    a = np.asarray(transform.GetMatrix()).reshape(3, 3)
    c, t = np.asarray(transform.GetCenter()), np.asarray(transform.GetTranslation())
    return (points - c) @ a.T + c + t


def render_ct(shapes: list[Shape], grid: sitk.Image, truth: sitk.Transform, rng: np.random.Generator,
              noise_hu: float, fixed: list[Shape] = ()) -> sitk.Image:
    """int16 HU CT on `grid`: anatomy at T^-1(y), `fixed` shapes (the scanner table) at y, blur, white noise.

    The table does not move with the patient, so it is painted in the scanner frame, and only where there is air."""
    inverse = truth.GetInverse()
    nz = grid.GetSize()[2]
    hu = np.empty(grid.GetSize()[::-1], np.float32)
    for k0 in range(0, nz, 16):
        y = voxel_points(grid, k0, k0 + 16)
        slab = paint(shapes, apply_points(inverse, y), "hu")
        air = slab == -1000.0
        for shape in fixed:  # in order, only where the patient is not: a later shape can hollow an earlier one
            slab[shape.contains(y) & air] = shape.hu
        hu[k0 : k0 + 16] = slab.reshape(-1, *hu.shape[1:])
    hu = ndimage.gaussian_filter(hu, (0.0, 0.5, 0.5))  # partial volume at the CT's own resolution
    hu += rng.normal(0.0, noise_hu, hu.shape).astype(np.float32)
    out = sitk.GetImageFromArray(np.clip(np.rint(hu), -1024, 3071).astype(np.int16))
    out.CopyInformation(grid)
    return out


def render_pet(shapes: list[Shape], grid: sitk.Image, rng: np.random.Generator, fwhm_mm: float,
               noise: float) -> sitk.Image:
    """float32 SUV PET on `grid`: 3x3x3 supersampled anatomy (partial volume), Gaussian PSF, signal-dependent noise.

    Noise: relative std `noise` at the local SUV, correlated over ~1 voxel (reconstruction), never negative."""
    fine = grid_image([o - s / 3 for o, s in zip(grid.GetOrigin(), grid.GetSpacing())],
                      [s / 3 for s in grid.GetSpacing()], [3 * n for n in grid.GetSize()])
    nx, ny, nz = grid.GetSize()
    suv = np.empty((nz, ny, nx), np.float32)
    for k0 in range(0, nz, 8):
        k1 = min(k0 + 8, nz)
        values = paint(shapes, voxel_points(fine, 3 * k0, 3 * k1), "suv")
        suv[k0:k1] = values.reshape(k1 - k0, 3, ny, 3, nx, 3).mean(axis=(1, 3, 5))
    sigma_vox = fwhm_mm / 2.3548 / np.asarray(grid.GetSpacing()[::-1])
    suv = ndimage.gaussian_filter(suv, sigma_vox)
    grain = ndimage.gaussian_filter(rng.standard_normal(suv.shape).astype(np.float32), 0.8)
    grain /= grain.std()
    suv = np.clip(suv * (1.0 + noise * grain) + 0.02 * noise * grain, 0.0, None).astype(np.float32)
    out = sitk.GetImageFromArray(suv)
    out.CopyInformation(grid)
    return out
