"""Is a PET volume plausibly SUVbw? Catches the unit mistakes a header check cannot (NIfTI has no tags).

Two robust statistics, both independent of the image's units:
  * robust max `M`: 99.9th percentile of the positive voxels (hot organs: kidneys, bladder, brain; single hot voxels
    and outliers do not move it);
  * body median `B`: median of the voxels at or above 2 % of `M` (the body without the air or the zero padding
    around it, whatever the units).
Real SUVbw images: FDG body median ~0.5-1.5, brain/bladder SUV 10-40; PSMA body median over the threshold ~1-10
(kidneys ~40, bladder up to ~100-200 at its hottest voxels, which the 99.9th percentile of a whole-body field of view
mostly does not reach; a pelvis-only one can have the bladder as its robust max and most of its "body").
Mistakes move them by orders of magnitude: activity in Bq/mL (body ~1e3-1e4 Bq/mL for 100-500 MBq in 70 kg), a dose
written in MBq (x1e6), a weight in grams (x1e3), activity in MBq/mL (x~1e-3).
The bounds leave a margin of >= 3x to real SUV images; a factor of 2-10 (kBq/mL, lean body mass SUV) cannot be told from
a real uptake difference and is not caught.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .errors import StudyError

ROBUST_MAX_LIMIT = 1000.0
"""SUV: the hottest organs reach ~100-300 at single voxels; Bq/mL images reach 1e4-1e6."""
BODY_MEDIAN_RANGE = (0.05, 300.0)
"""SUV: lowest-uptake bodies (fat, muscle ~0.3) up to PSMA organs (~40) when 2 % of the robust max is above the
background, and bladder values (~100-200) in a pelvis-only field of view dominated by a hot bladder; Bq/mL gives
~1e3 and more, MBq/mL ~1e-3."""
BODY_FRACTION = 0.02
SAMPLE_VOXELS = 2_000_000  # statistics on a regular subsample above this: percentiles move < 1 %, reading is cheap


def suv_statistics(pet: sitk.Image) -> tuple[float, float]:
    """(robust max, body median) of a PET image; (0, 0) when no voxel is positive."""
    values = sitk.GetArrayViewFromImage(pet)
    step = max(1, int(np.ceil((values.size / SAMPLE_VOXELS) ** (1 / 3))))
    sample = np.asarray(values[::step, ::step, ::step] if values.ndim == 3 else values, dtype=np.float32)
    positive = sample[np.isfinite(sample) & (sample > 0)]
    if positive.size == 0:
        return 0.0, 0.0
    robust_max = float(np.percentile(positive, 99.9))
    body = positive[positive >= BODY_FRACTION * robust_max]
    return robust_max, float(np.median(body))


def check_suv_range(study_id: str, pet: sitk.Image, origin: str) -> None:
    """Raise `StudyError(kind="implausible_value")` when `pet` cannot be SUVbw; `origin` names the file or series."""
    robust_max, body_median = suv_statistics(pet)
    found = f"robust max (99.9th percentile) {robust_max:.4g}, body median {body_median:.4g}"
    lo, hi = BODY_MEDIAN_RANGE
    if robust_max == 0.0:
        raise StudyError(study_id, "implausible_value", f"PET {origin} has no positive voxel: not an SUV image")
    if robust_max > ROBUST_MAX_LIMIT or body_median > hi:
        raise StudyError(study_id, "implausible_value", (
            f"PET {origin}: {found}; an SUVbw image has a robust max <= {ROBUST_MAX_LIMIT:g} and a body median "
            f"<= {hi:g}. This looks like activity (Bq/mL, body values in the thousands) rather than SUV, or SUV "
            "computed with the dose in MBq (x1e6) or the weight in grams (x1e3). NIfTI PET must be SUVbw: convert with "
            "SUV = Bq/mL x weight[kg] x 1000 / decay-corrected dose[Bq], or give the DICOM series"))
    if body_median < lo:
        raise StudyError(study_id, "implausible_value", (
            f"PET {origin}: {found}; the body median of an SUVbw image is at least ~{lo:g} (fat and muscle ~0.3). "
            "This looks like activity in MBq/mL (x~1e-3), or SUV computed with a dose 1000x too large "
            "(a unit mix-up); NIfTI PET must be SUVbw"))
