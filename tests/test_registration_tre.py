"""Registration accuracy on validation sets our generator did not produce, and on our own synthetic cohort.

TRE is measured on CT-only markers (coordinates, never painted into an image) against the study's true motion.
Goal (issue #11): mean TRE <= 1.0 mm and max <= 2.0 mm per study, on every set.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from petct.config import RegistrationConfig
from petct.registration import register_ct_to_pet
from petct.resample import antialias
from petct.synth import load_motion, synth_study
from petct.validation.anatomy import apply_points
from petct.validation.sets import ValidationStudy, head_pelvis_study, trunk_study
from petct.validation.tre import pet_body_markers, register, tre_mm


@pytest.fixture(scope="module")
def head_pelvis() -> list[ValidationStudy]:
    return [head_pelvis_study(seed) for seed in (0, 1)]


@pytest.fixture(scope="module")
def trunk() -> list[ValidationStudy]:
    return [trunk_study(0)]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> list[ValidationStudy]:
    tmp = tmp_path_factory.mktemp("synth_tre")
    out = []
    for i in (0, 1):
        synth_study(f"s{i}", tmp, labeled=False, seed=1000 + i, scale="small")
        ct, pet = (sitk.ReadImage(str(tmp / f"s{i}" / f"{m}.nii.gz")) for m in ("ct", "pet"))
        truth = load_motion(tmp / f"s{i}")
        out.append(ValidationStudy(f"s{i}", ct, pet, truth, pet_body_markers(pet, ct, truth)))
    return out


def _assert_within_goal(studies: list[ValidationStudy]) -> None:
    for study in studies:
        result, _ = register(study.ct, study.pet)
        errors = tre_mm(result.transform, study.truth, study.markers)
        assert result.status == "registered", (study.study_id, result.reason)
        assert errors.mean() <= 1.0 and errors.max() <= 2.0, (study.study_id, errors.mean(), errors.max())


def test_head_pelvis_tre_within_goal(head_pelvis):
    _assert_within_goal(head_pelvis)


def test_synthetic_cohort_tre_within_goal(synth):
    _assert_within_goal(synth)


def test_trunk_tre_within_goal(trunk):
    """MI alone settles 3-6 mm off here (partial CT coverage, 7.5 mm PSF); the PET-model refinement brings it in."""
    _assert_within_goal(trunk)


@pytest.mark.parametrize("name", ["head_pelvis", "trunk", "synth"])
def test_tre_measures_something(name, request):
    """Not vacuous: the truth scores 0, identity scores the motion (>= 3 mm: 3x the goal), a 1 mm shift of the truth
    scores 1 mm, and the markers fill the body (spread >= 60 mm on each axis, inside the patient on the CT)."""
    for study in request.getfixturevalue(name):
        assert tre_mm(study.truth, study.truth, study.markers).max() < 1e-6
        assert tre_mm(sitk.Euler3DTransform(), study.truth, study.markers).mean() >= 3.0
        shifted = sitk.Euler3DTransform(study.truth)
        shifted.SetTranslation(np.asarray(study.truth.GetTranslation()) + [0.0, 0.6, 0.8])
        np.testing.assert_allclose(tre_mm(shifted, study.truth, study.markers), 1.0, atol=1e-6)
        assert np.all(np.ptp(study.markers, axis=0) >= 60.0), np.ptp(study.markers, axis=0)
        hu = [study.ct.EvaluateAtPhysicalPoint([float(v) for v in p], sitk.sitkLinear) for p in study.markers[::20]]
        assert np.mean(np.asarray(hu) > -950.0) >= 0.97  # lungs (-850 HU) are inside the body, air is not


def test_markers_are_not_in_the_images(head_pelvis):
    """The markers are coordinates only: the PET at their true positions looks like the PET body anywhere else
    (no bright or cold beads), so registration cannot be using them."""
    study = head_pelvis[0]
    in_pet = apply_points(study.truth.GetInverse(), study.markers)
    at_markers = np.array([study.pet.EvaluateAtPhysicalPoint([float(v) for v in p], sitk.sitkLinear)
                           for p in in_pet[::10]])
    suv = sitk.GetArrayViewFromImage(study.pet)
    body = suv[suv > 0.3]
    assert abs(np.median(at_markers) - np.median(body)) < 0.5 * np.median(body)
    assert np.percentile(at_markers, 99) <= body.max()


def test_guard_falls_back_on_wild_motion(head_pelvis):
    """A CT turned 35 degrees and shifted 60 mm is no patient motion: identity, with the reason recorded."""
    study = head_pelvis[0]
    wild = sitk.Euler3DTransform()
    wild.SetCenter(study.pet.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in study.pet.GetSize()]))
    wild.SetRotation(0.0, 0.0, np.radians(35.0))
    wild.SetTranslation((60.0, 0.0, 0.0))
    moved = sitk.Resample(study.ct, study.ct, wild.GetInverse(), sitk.sitkLinear, -1000.0)
    result = register_ct_to_pet(antialias(moved, study.pet.GetSpacing()), study.pet, RegistrationConfig())
    assert result.status == "identity_fallback", (result.rotation_deg, result.translation_mm)
    assert result.reason
    assert result.transform.GetParameters() == sitk.Euler3DTransform().GetParameters()


@pytest.mark.xfail(strict=True, reason="open (issue #11): MI improves and the motion is plausible for another "
                   "patient's CT, so the guard keeps it (README 'Registration accuracy')")
def test_guard_falls_back_on_another_patients_ct(head_pelvis, trunk):
    ct = sitk.Image(head_pelvis[0].ct)
    pet = trunk[0].pet
    ct.SetOrigin((*ct.GetOrigin()[:2], pet.GetOrigin()[2]))  # same table position: the FOVs overlap
    result, _ = register(ct, pet)
    assert result.status == "identity_fallback"
