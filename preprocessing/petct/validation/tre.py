"""Target registration error (TRE) on CT-only markers, and the pipeline's registration applied to one study.

Markers are dense points in the CT frame, inside the patient and inside both fields of view. They are coordinates,
never painted into the CT or the PET, so the registration cannot use them. For a found PET->CT transform F and the
truth T, a marker m's error is |F^-1(m) - T^-1(m)|: how far from its true PET position the resampled CT puts it.
"""

from __future__ import annotations

import time

import numpy as np
import SimpleITK as sitk

from ..config import RegistrationConfig
from ..registration import RegistrationResult, register_ct_to_pet
from ..resample import antialias
from .anatomy import Shape, apply_points, inside_body, voxel_points


def _inside_fov(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    lo = np.asarray(image.GetOrigin())
    hi = lo + (np.asarray(image.GetSize()) - 1) * np.asarray(image.GetSpacing())
    return np.all((points >= lo) & (points <= hi), axis=1)


def body_markers(shapes: list[Shape], ct: sitk.Image, pet: sitk.Image, truth: sitk.Transform,
                 stride: tuple[int, int, int] = (4, 4, 2), max_points: int = 4000, seed: int = 0) -> np.ndarray:
    """CT-frame marker points (N, 3): CT voxel centres (every `stride` voxel in x, y, z) inside the patient's
    anatomy and whose true PET position lies inside the PET field of view; a seeded subset of `max_points`."""
    points = voxel_points(ct)
    nz, ny, nx = ct.GetSize()[::-1]
    keep = np.zeros((nz, ny, nx), bool)
    keep[:: stride[2], :: stride[1], :: stride[0]] = True
    points = points[keep.ravel()]
    in_pet = apply_points(truth.GetInverse(), points)
    points = points[inside_body(shapes, in_pet) & _inside_fov(pet, in_pet)]
    if len(points) > max_points:
        points = points[np.random.default_rng(seed).choice(len(points), max_points, replace=False)]
    return points


def pet_body_markers(pet: sitk.Image, ct: sitk.Image, truth: sitk.Transform, min_suv: float = 0.3,
                     stride: int = 2) -> np.ndarray:
    """CT-frame markers for a study without analytic anatomy (e.g. `petct.synth`): PET voxel centres (every
    `stride`-th voxel) with SUV above `min_suv`, mapped to the CT frame by the truth, kept inside the CT's FOV."""
    suv = sitk.GetArrayViewFromImage(pet)
    keep = np.zeros(suv.shape, bool)
    keep[::stride, ::stride, ::stride] = True
    points = apply_points(truth, voxel_points(pet)[(keep & (suv > min_suv)).ravel()])
    return points[_inside_fov(ct, points)]


def tre_mm(found: sitk.Transform, truth: sitk.Transform, markers_ct: np.ndarray) -> np.ndarray:
    """Per-marker error (mm) of the PET->CT transform `found` against `truth`: |found^-1(m) - truth^-1(m)|."""
    return np.linalg.norm(apply_points(found.GetInverse(), markers_ct) - apply_points(truth.GetInverse(), markers_ct),
                          axis=1)


def register(ct: sitk.Image, pet: sitk.Image, cfg: RegistrationConfig | None = None) -> tuple[RegistrationResult,
                                                                                                 float]:
    """The pipeline's path: anti-alias the CT for the PET grid, then register; returns (result, seconds)."""
    start = time.perf_counter()
    result = register_ct_to_pet(antialias(ct, pet.GetSpacing()), pet, cfg or RegistrationConfig(), ct)
    return result, time.perf_counter() - start


def summary(errors: np.ndarray) -> dict[str, float]:
    """Mean and max TRE (mm) of one study."""
    return {"mean": float(errors.mean()), "max": float(errors.max())}
