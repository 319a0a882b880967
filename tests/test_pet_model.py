"""The PSF-aware PET model that refines registration (`petct.pet_model`): its interpolation and derivatives against
SciPy, its optimiser against a PET the model itself generated (the truth is then its exact optimum), and the
pipeline's guard around it."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from petct.config import RegistrationConfig
from petct.pet_model import FWHM_TO_SIGMA, HU_BINS, _Channels, body_coverage, refine_with_pet_model, tissue_channels
from petct.validation.sets import head_pelvis_study, trunk_study
from petct.validation.tre import register, tre_mm


@pytest.fixture(scope="module")
def study():
    return head_pelvis_study(3)


def _random_channels(rng: np.random.Generator) -> _Channels:
    data = ndimage.gaussian_filter(rng.random((12, 14, 16, 3)).astype(np.float32), (1, 1, 1, 0))
    return _Channels(data, np.ones(data.shape[:3], np.float32), np.zeros(3), np.ones(3), np.eye(3))


def test_trilinear_values_and_derivatives_match_scipy():
    rng = np.random.default_rng(0)
    ch = _random_channels(rng)
    index = rng.uniform([1, 1, 1], [10, 12, 14], (200, 3))
    values, grads = ch.sample(index)
    for k in range(3):
        expected = ndimage.map_coordinates(ch.data[..., k], index.T, order=1)
        np.testing.assert_allclose(values[:, k], expected, atol=1e-5)
        for axis in range(3):  # within a cell trilinear interpolation is smooth: central differences agree
            h = np.zeros(3)
            h[axis] = 1e-3
            fd = (ndimage.map_coordinates(ch.data[..., k], (index + h).T, order=1)
                  - ndimage.map_coordinates(ch.data[..., k], (index - h).T, order=1)) / 2e-3
            np.testing.assert_allclose(grads[:, axis, k], fd, atol=2e-3)
    outside = ch.sample(np.array([[-5.0, 2.0, 2.0], [2.0, 2.0, 40.0]]))[0]
    assert np.all(outside == 0.0)


def test_channels_are_hu_bin_fractions_blurred(study):
    """Unblurred (sigma ~0) the channels are per-block fractions of the HU bins: they sum to 1 and match a count."""
    ch = tissue_channels(study.ct, 2.44, 1e-3, 0.0)
    np.testing.assert_allclose(ch.data.sum(axis=-1), 1.0, atol=1e-5)
    hu = sitk.GetArrayFromImage(study.ct)
    lung = ((hu >= HU_BINS[0]) & (hu < HU_BINS[1]))[:, :2, :2].mean()  # first 2x2 block column, z by z
    assert ch.data.shape[-1] == len(HU_BINS) + 1
    assert ch.data[:, 0, 0, 1].mean() == pytest.approx(lung, abs=1e-6)
    assert np.allclose(ch.spacing, (2.44, 2.44, 3.0))


def test_refinement_recovers_the_motion_of_a_pet_the_model_generated(study):
    """PET := model(CT through a known motion), noise-free: the optimum is exactly that motion, so Levenberg-
    Marquardt from a start 4 mm and 2 degrees off must return it (TRE ~0) with R^2 ~1."""
    sigma = 7.5 * FWHM_TO_SIGMA
    ch = tissue_channels(study.ct, 2.0, sigma, 1.0)
    uptake = np.array([0.0, 0.3, 0.5, 0.4, 2.0, 6.0, 1.0, 3.0, 0.8, 1.2], np.float32)
    pet = sitk.Image(study.pet)
    nx, ny, nz = pet.GetSize()
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    points = np.asarray(pet.GetOrigin()) + np.stack([i, j, k], -1).reshape(-1, 3) * np.asarray(pet.GetSpacing())
    moved = (points - study.truth.GetCenter()) @ np.asarray(study.truth.GetMatrix()).reshape(3, 3).T
    values = ch.sample(ch.index(moved + study.truth.GetCenter() + study.truth.GetTranslation()), False)[0]
    synthetic = sitk.GetImageFromArray((values @ uptake + 0.05).reshape(nz, ny, nx).astype(np.float32))
    synthetic.CopyInformation(pet)
    start = sitk.Euler3DTransform(study.truth)
    start.SetRotation(*(np.asarray(study.truth.GetParameters()[:3]) + np.radians([1.0, -1.0, 1.0])))
    start.SetTranslation(np.asarray(study.truth.GetTranslation()) + [2.0, -2.0, 2.8])
    assert tre_mm(start, study.truth, study.markers).mean() > 4.0
    fit = refine_with_pet_model(study.ct, synthetic, start, 7.5, 1.0, body_suv=0.1)
    errors = tre_mm(fit.transform, study.truth, study.markers)
    assert errors.max() < 0.05, errors.max()
    assert fit.r2 > 0.999


def test_auto_refines_only_a_partial_ct(study):
    """'auto': head_pelvis's CT covers the PET body (MI only); trunk's covers ~80 % of it (refined)."""
    full, _ = register(study.ct, study.pet)
    assert body_coverage(study.ct, study.pet, full.transform) >= 0.98 and not full.refined
    trunk = trunk_study(0)
    partial, _ = register(trunk.ct, trunk.pet)
    assert 0.5 < body_coverage(trunk.ct, trunk.pet, partial.transform) < 0.95 and partial.refined


def test_refinement_is_recorded_and_guarded(study):
    kept, _ = register(study.ct, study.pet, RegistrationConfig(pet_model_refine="always"))
    assert kept.refined and kept.status == "registered" and 0.0 < kept.model_r2 < 1.0
    record = kept.to_record()
    assert record["registration_refined"] is True and record["registration_model_r2"] == kept.model_r2
    mi_only, _ = register(study.ct, study.pet, RegistrationConfig(pet_model_refine="never"))
    assert not mi_only.refined and np.isnan(mi_only.model_r2)
    assert mi_only.transform.GetParameters() != kept.transform.GetParameters()
    # a refinement moving further than the guard allows is discarded: the MI result stands, with the reason
    strict, _ = register(study.ct, study.pet, RegistrationConfig(pet_model_refine="always", max_refine_shift_mm=1e-4))
    assert not strict.refined and "discarded" in strict.reason
    np.testing.assert_allclose(strict.transform.GetParameters(), mi_only.transform.GetParameters(), atol=1e-6)
