"""Refine a rigid CT->PET transform by predicting the PET from the CT: a PSF-aware tissue model.

Mutual information compares the sharp CT with a PET blurred by its point-spread function; where the CT covers only
part of the PET, or hot organs sit next to cold ones, its optimum can lie millimetres from the truth (on our `trunk`
validation set: 2-6 mm along z). Here the PET is modelled as the scanner would have measured the CT's anatomy:

    PET(x) ~ sum_k a_k (G_sigma * 1[HU in bin k])(T x) + b

HU-bin indicators (air, lung, fat, soft-tissue steps, bone) blurred by a Gaussian PSF in the CT frame (an isotropic
blur commutes with a rigid motion, so it is done once), the uptakes a_k fitted by weighted least squares at every
step (variable projection), weights 1/max(PET, 0.3) because PET noise grows with the signal. Levenberg-Marquardt
on the six rigid parameters minimises the weighted residual, starting from the MI result. Samples are PET voxels
in the body whose model is fully inside the CT at the start (a fixed set: samples entering and leaving the CT's
field of view would bias the optimum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

HU_BINS = (-950.0, -600.0, -200.0, -30.0, 20.0, 40.0, 55.0, 80.0, 200.0)
"""Bin edges: air | lung | lung-soft partial | fat | fluid/bowel | kidney/muscle | muscle/spleen | liver | contrast
and cartilage | bone. Soft tissue gets several narrow bins because its uptake differs by organ."""
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@dataclass
class ModelFit:
    """Outcome of `refine_with_pet_model`: the refined PET->CT transform and how well the model explains the PET."""

    transform: sitk.Euler3DTransform
    fwhm_mm: float
    r2: float
    """Weighted R^2 of the PET model at the refined transform (0: explains nothing, 1: everything)."""
    iterations: int


@dataclass
class _Channels:
    data: np.ndarray  # (z, y, x, K) blurred indicators on the model grid, channel-last: one gather reads all K
    cover: np.ndarray  # (z, y, x) blurred CT field of view: 1 where the model sees only CT voxels
    origin: np.ndarray
    spacing: np.ndarray  # x, y, z
    direction: np.ndarray  # 3x3

    def index(self, points: np.ndarray) -> np.ndarray:
        """Physical points (N, 3) -> continuous (z, y, x) indices (N, 3) of the model grid."""
        return (((points - self.origin) @ self.direction) / self.spacing)[:, ::-1]

    def sample(self, index: np.ndarray, with_grad: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Trilinear values (N, K) at continuous indices and, if asked, their derivatives along z, y, x (N, 3, K);
        0 outside the grid."""
        nz, ny, nx, k = self.data.shape
        table = self.data.reshape(-1, k)
        base = np.floor(index).astype(np.int64)
        t = (index - base).astype(np.float32)
        values = np.zeros((len(index), k), np.float32)
        grads = np.zeros((len(index), 3, k), np.float32) if with_grad else None
        for corner in np.ndindex(2, 2, 2):
            z, y, x = (base[:, a] + corner[a] for a in range(3))
            inside = (z >= 0) & (z < nz) & (y >= 0) & (y < ny) & (x >= 0) & (x < nx)
            flat = np.where(inside, (z * ny + y) * nx + x, 0)
            v = table[flat] * inside[:, None]
            w = np.where(corner, t, 1.0 - t)  # (N, 3) per-axis weights of this corner
            values += (w[:, 0] * w[:, 1] * w[:, 2])[:, None] * v
            if with_grad:
                sign = np.where(corner, 1.0, -1.0).astype(np.float32)
                grads[:, 0] += (sign[0] * w[:, 1] * w[:, 2])[:, None] * v
                grads[:, 1] += (sign[1] * w[:, 0] * w[:, 2])[:, None] * v
                grads[:, 2] += (sign[2] * w[:, 0] * w[:, 1])[:, None] * v
        return values, grads


def tissue_channels(ct: sitk.Image, grid_mm: float, sigma_mm: float, presmooth_mm: float) -> _Channels:
    """Blurred HU-bin fractions of `ct`, block-averaged to ~`grid_mm` voxels, in the CT frame.

    Binned at the CT's own resolution (a 2 mm block half lung, half soft tissue is 0.5 of each, not one bin of its
    mean HU: that partial volume is what the PET sees through its PSF)."""
    hu = sitk.GetArrayFromImage(ct).astype(np.float32)
    spacing_zyx = np.asarray(ct.GetSpacing()[::-1])
    if presmooth_mm > 0:  # CT noise (20-40 HU) is as large as the soft-tissue steps; smooth before binning
        hu = ndimage.gaussian_filter(hu, presmooth_mm / spacing_zyx, truncate=2.0)
    f = np.minimum(np.maximum(1, np.round(grid_mm / spacing_zyx)).astype(int), hu.shape)
    shape = np.asarray(hu.shape) // f
    hu = hu[: shape[0] * f[0], : shape[1] * f[1], : shape[2] * f[2]]
    k = len(HU_BINS) + 1
    bins = sum((hu >= edge).view(np.uint8) for edge in HU_BINS)  # bin number 0..k-1 (np.digitize is 10x slower)
    sigma_vox = sigma_mm / (spacing_zyx * f)
    data = np.empty((*shape, k), np.float32)
    for j in range(k):
        data[..., j] = ndimage.gaussian_filter(_block_mean(bins == j, f), sigma_vox, mode="constant", truncate=3.0)
    cover = ndimage.gaussian_filter(np.ones(tuple(shape), np.float32), sigma_vox, mode="constant", truncate=3.0)
    first = [(b - 1) / 2 for b in f[::-1]]
    return _Channels(data, cover, np.asarray(ct.TransformContinuousIndexToPhysicalPoint(first)),
                     (spacing_zyx * f)[::-1].copy(), np.asarray(ct.GetDirection()).reshape(3, 3))


def crop_for_model(ct: sitk.Image, pet: sitk.Image, start: sitk.Euler3DTransform, margin_mm: float) -> sitk.Image:
    """The CT's sub-image holding the body inside the PET's field of view (mapped by `start`) plus a margin: the
    model never needs more, and a full-scale CT is mostly air and table outside it."""
    ct = _body_box(ct, -500.0, margin_mm)
    size = np.asarray(pet.GetSize()) - 1
    corners = [pet.TransformContinuousIndexToPhysicalPoint([float(c) for c in size * np.asarray(b)])
               for b in np.ndindex(2, 2, 2)]
    index = np.asarray([ct.TransformPhysicalPointToContinuousIndex(start.TransformPoint(c)) for c in corners])
    pad = margin_mm / np.asarray(ct.GetSpacing())
    lo = np.maximum(np.floor(index.min(axis=0) - pad), 0).astype(int)
    hi = np.minimum(np.ceil(index.max(axis=0) + pad) + 1, ct.GetSize()).astype(int)
    if np.any(hi <= lo):
        return ct
    return sitk.RegionOfInterest(ct, [int(v) for v in hi - lo], [int(v) for v in lo])


def _block_mean(mask: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Fraction of True voxels in each (fz, fy, fx) block, reduced one axis at a time (uint8 sums: fast)."""
    (fz, fy, fx), (nz, ny, nx) = f, np.asarray(mask.shape) // f
    count = mask.view(np.uint8).reshape(nz * fz * ny * fy, nx, fx).sum(axis=2, dtype=np.uint8)
    count = count.reshape(nz * fz, ny, fy, nx).sum(axis=2, dtype=np.uint8)
    count = count.reshape(nz, fz, ny, nx).sum(axis=1, dtype=np.uint8)
    return count.astype(np.float32) / np.float32(fz * fy * fx)


def _body_box(ct: sitk.Image, threshold_hu: float, margin_mm: float) -> sitk.Image:
    """The CT's box around voxels above `threshold_hu` plus a margin (from axis projections: one pass)."""
    body = sitk.GetArrayViewFromImage(ct) > threshold_hu
    lo, hi = [], []
    for axis in range(3):
        hit = np.nonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        if len(hit) == 0:
            return ct
        lo.append(hit[0]), hi.append(hit[-1] + 1)
    pad = np.ceil(margin_mm / np.asarray(ct.GetSpacing()[::-1])).astype(int)
    lo = np.maximum(np.asarray(lo) - pad, 0)
    hi = np.minimum(np.asarray(hi) + pad, body.shape)
    return sitk.RegionOfInterest(ct, [int(v) for v in (hi - lo)[::-1]], [int(v) for v in lo[::-1]])


def _gather(volume: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Trilinear values of one `volume` at continuous (z, y, x) `index` rows (N, 3); 0 outside."""
    return ndimage.map_coordinates(volume, np.ascontiguousarray(index.T), order=1, mode="constant", cval=0.0,
                                   prefilter=False)


def voxel_centres(image: sitk.Image, k: np.ndarray, j: np.ndarray, i: np.ndarray) -> np.ndarray:
    """Physical centres (N, 3) of the voxels at numpy indices (k, j, i) = (z, y, x)."""
    ijk = np.stack([i, j, k], axis=1).astype(float)
    return np.asarray(image.GetOrigin()) + (ijk * np.asarray(image.GetSpacing())) @ np.asarray(
        image.GetDirection()).reshape(3, 3).T


def body_coverage(ct: sitk.Image, pet: sitk.Image, transform: sitk.Transform) -> float:
    """Share of the PET's body voxels (SUV > 0.3) that `transform` (PET point -> CT point) maps inside the CT's
    field of view: below ~1, MI's optimum is biased and the model refinement helps (`RegistrationConfig`)."""
    k, j, i = np.nonzero(sitk.GetArrayViewFromImage(pet)[::2, ::2, ::2] > 0.3)  # every 8th voxel: enough for a share
    if len(k) == 0:
        return 0.0
    in_ct = _apply(transform, voxel_centres(pet, 2 * k, 2 * j, 2 * i))
    index = ((in_ct - np.asarray(ct.GetOrigin())) @ np.asarray(ct.GetDirection()).reshape(3, 3)) / np.asarray(
        ct.GetSpacing())
    return float(np.all((index >= -0.5) & (index <= np.asarray(ct.GetSize()) - 0.5), axis=1).mean())


def _apply(transform: sitk.Transform, points: np.ndarray) -> np.ndarray:
    """transform(p) for each row of points (N, 3), through its affine matrix (rigid or affine transforms only)."""
    a = np.asarray(transform.GetMatrix()).reshape(3, 3)
    c, t = np.asarray(transform.GetCenter()), np.asarray(transform.GetTranslation())
    return (points - c) @ a.T + c + t


def _euler(params: np.ndarray, centre: np.ndarray) -> sitk.Euler3DTransform:
    t = sitk.Euler3DTransform()
    t.SetCenter([float(v) for v in centre])
    t.SetParameters([float(v) for v in params])
    return t


class _Problem:
    """Weighted least squares PET ~ [C(T x), 1] a over fixed PET samples; residual and Jacobian in the 6 params."""

    def __init__(self, channels: _Channels, points: np.ndarray, pet: np.ndarray, weights: np.ndarray, centre):
        self.ch, self.points, self.y, self.sw, self.centre = channels, points, pet, np.sqrt(weights), centre

    def fit(self, params: np.ndarray, with_grad: bool = True) -> tuple:
        """(uptakes a, weighted residual r, model-grid indices of the samples, channel derivatives (N, 3, K))."""
        index = self.ch.index(_apply(_euler(params, self.centre), self.points))
        values, grads = self.ch.sample(index, with_grad)
        design = np.concatenate([values, np.ones((len(self.y), 1), np.float32)], axis=1)
        uptakes, *_ = np.linalg.lstsq(design * self.sw[:, None], self.y * self.sw, rcond=None)
        return uptakes, self.sw * (self.y - design @ uptakes), index, grads

    def cost(self, params: np.ndarray) -> float:
        r = self.fit(params, with_grad=False)[1]
        return float(r @ r)

    def jacobian(self, params: np.ndarray, uptakes: np.ndarray, index: np.ndarray, grads: np.ndarray) -> np.ndarray:
        """d r / d params with the uptakes held (Kaufman's variable-projection approximation): -sw grad(P) . du/dp."""
        grad = grads @ uptakes[:-1].astype(np.float32)  # (N, 3): gradient of the predicted PET in index units
        jac = np.empty((len(self.y), 6))
        for j, eps in enumerate((1e-4, 1e-4, 1e-4, 1e-2, 1e-2, 1e-2)):  # radians, mm
            moved = params.copy()
            moved[j] += eps
            du = (self.ch.index(_apply(_euler(moved, self.centre), self.points)) - index) / eps
            jac[:, j] = -self.sw * np.einsum("ij,ij->i", grad, du)
        return jac

    def r2(self, params: np.ndarray) -> float:
        y = self.sw * (self.y - np.average(self.y, weights=self.sw**2))
        return 1.0 - self.cost(params) / float(y @ y)


def _samples(pet: sitk.Image, channels: _Channels, start: sitk.Euler3DTransform, body_suv: float,
             max_samples: int, seed: int):
    """PET voxel centres (N, 3), SUV and weights of the body voxels whose blurred model lies inside the CT: a seeded
    subset of at most `max_samples` (the cost of each step no longer grows with the PET grid)."""
    suv = sitk.GetArrayFromImage(pet)
    k, j, i = np.nonzero(suv > body_suv)
    if len(k) > max_samples:
        keep = np.sort(np.random.default_rng(seed).choice(len(k), max_samples, replace=False))
        k, j, i = k[keep], j[keep], i[keep]
    points = voxel_centres(pet, k, j, i)
    inside = _gather(channels.cover, channels.index(_apply(start, points))) > 0.999
    smooth = ndimage.gaussian_filter(suv, 1.0)[k, j, i]  # weights from a denoised PET, not the noisy voxel
    return points[inside], suv[k, j, i][inside], 1.0 / np.maximum(smooth[inside], 0.3)


def refine_with_pet_model(ct: sitk.Image, pet: sitk.Image, start: sitk.Euler3DTransform, fwhm_mm: float = 7.5,
                          presmooth_mm: float = 1.0, grid_mm: float = 2.0, iterations: int = 30,
                          body_suv: float = 0.05, max_samples: int = 60_000, seed: int = 7) -> ModelFit:
    """Levenberg-Marquardt from `start` (PET point -> CT point) on the PSF-aware tissue model; see the module doc.

    `ct`: the CT at its own resolution (HU); `fwhm_mm`: the PET's point-spread FWHM."""
    sigma = fwhm_mm * FWHM_TO_SIGMA
    channels = tissue_channels(crop_for_model(ct, pet, start, 3.0 * sigma + 20.0), grid_mm, sigma, presmooth_mm)
    points, y, w = _samples(pet, channels, start, body_suv, max_samples, seed)
    centre = np.asarray(start.GetCenter())
    params = np.asarray(start.GetParameters(), float)
    if len(y) < 1000:
        return ModelFit(_euler(params, centre), fwhm_mm, math.nan, 0)
    problem = _Problem(channels, points, y, w, centre)
    params, done = _levenberg_marquardt(problem, params, iterations)
    return ModelFit(_euler(params, centre), fwhm_mm, problem.r2(params), done)


def _levenberg_marquardt(problem: _Problem, params: np.ndarray, iterations: int) -> tuple[np.ndarray, int]:
    """Damped Gauss-Newton with Marquardt's diagonal scaling; stops when a step moves < ~0.01 mm."""
    damping = 1e-3
    uptakes, r, index, grads = problem.fit(params)
    for it in range(1, iterations + 1):
        jac = problem.jacobian(params, uptakes, index, grads)
        hessian = jac.T @ jac
        step = -np.linalg.solve(hessian + damping * np.diag(np.diag(hessian)), jac.T @ r)
        trial = problem.fit(params + step)  # with derivatives: an accepted step (the usual case) reuses them
        if float(trial[1] @ trial[1]) >= float(r @ r):
            damping *= 4.0
            if damping > 1e4:
                return params, it
            continue
        params, damping = params + step, max(damping / 3.0, 1e-6)
        uptakes, r, index, grads = trial
        if np.linalg.norm(step[3:]) + 100.0 * np.linalg.norm(step[:3]) < 0.01:  # mm, rad at 100 mm
            return params, it
    return params, iterations
