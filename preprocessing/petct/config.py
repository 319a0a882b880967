"""Typed settings of the preparation stage (defaults documented in README "Preprocessing")."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Literal

from .labels import PSMA, LabelSet


@dataclass(frozen=True)
class Window:
    """Intensity window: values are clipped to [lo, hi] then mapped linearly to [0, 1]."""

    lo: float
    """Value mapped to 0 (and everything below it)."""
    hi: float
    """Value mapped to 1 (and everything above it)."""

    def __post_init__(self):
        if not self.hi > self.lo:
            raise ValueError(f"window needs hi > lo, got [{self.lo}, {self.hi}]")

    @classmethod
    def parse(cls, text: str) -> Window:
        """'-1000,1000' -> Window(-1000, 1000)."""
        lo, hi = (float(v) for v in text.split(","))
        return cls(lo, hi)


@dataclass(frozen=True)
class RegistrationConfig:
    """Rigid CT->PET registration and its plausibility guard.

    PET is fixed and CT moving; Euler3D transform, Mattes mutual information, a shrink/smooth pyramid and
    physical-shift optimiser scales, started at identity in world coordinates (CT and PET share the scanner frame;
    centring the volumes would shift CTs whose scan range differs). The result is kept only when the metric
    improved and the motion is plausible (`max_rotation_deg`, `max_translation_mm`); otherwise the study falls back
    to identity and its record says so.
    """

    enabled: bool = True
    """False: resample with the identity transform (scanner frame), `swinssl prepare --no-registration`."""
    histogram_bins: int = 50
    """Bins of the Mattes mutual-information joint histogram."""
    metric_samples: int = 50_000
    """PET voxels the metric samples per level (regular grid, jittered, fixed seed): enough for a 50-bin joint
    histogram, and the cost no longer grows with the PET grid."""
    shrink_factors: tuple[int, ...] = (4, 2)
    """Downsampling factor of each pyramid level (coarse to fine)."""
    smoothing_sigmas_mm: tuple[float, ...] = (8.0, 0.0)
    """Pyramid: 16 mm then 8 mm voxels. A third level at full PET resolution cost +40% time for no TRE gain on
    the synthetic cohort (0.2-0.5 mm either way)."""
    iterations: int = 200
    """Most optimiser iterations per pyramid level (regular-step gradient descent)."""
    learning_rate: float = 2.0
    """Largest step in mm at the first iteration (physical-shift scales make this a distance)."""
    max_rotation_deg: float = 10.0
    """Plausibility guard: a found rotation above this falls back to identity."""
    max_translation_mm: float = 40.0
    """Plausibility guard: a found translation above this falls back to identity (patients move millimetres)."""
    seed: int = 7
    """Seed of the metric's sample positions: the same inputs register to the same transform."""
    pet_model_refine: Literal["auto", "always", "never"] = "auto"
    """Refine the MI result by fitting a PSF-aware PET model of the CT (`petct.pet_model`). MI's optimum is biased
    (2-6 mm) where the CT covers only part of the PET body, and exact where it covers all of it; the model is better
    in the first case and worse where uptake follows no CT contrast (PSMA: 0.4 -> 0.7 mm). 'auto': refine when
    less than `full_coverage` of the PET body lies inside the CT (README, 'Registration accuracy')."""
    full_coverage: float = 0.98
    """'auto' refinement: share of PET body voxels inside the CT's field of view (after MI) that counts as full."""
    pet_fwhm_mm: float = 7.5
    """The PET's resolution (point-spread FWHM, mm) the model blurs the CT with; clinical whole-body PET 6-8 mm."""
    ct_presmooth_mm: float = 1.0
    """Gaussian sigma (mm) on the CT before its HU bins are taken (CT noise is as large as the soft-tissue steps)."""
    pet_model_samples: int = 60_000
    """PET body voxels the model fits (seeded subset): 20 000 cost 0.15 mm mean TRE on the `trunk` set."""
    max_refine_shift_mm: float = 10.0
    """Guard: a refinement moving the PET centre further than this from the MI result is discarded."""


@dataclass(frozen=True)
class PrepareConfig:
    """Everything `swinssl prepare` decides, saved in the output folder so a run is reproducible."""

    ct_window: Window = field(default_factory=lambda: Window(-1000.0, 1000.0))
    """HU window (the reference pretraining's; keeps lungs and bone). PSMA segmentation work often uses -200,1000."""
    pet_window: Window = field(default_factory=lambda: Window(0.0, 30.0))
    """SUVbw window. 15 saturates PSMA kidneys and bladder (SUV ~40+); 30 keeps most organ contrast."""
    ct_fill_hu: float = -1000.0
    """Value outside the CT field of view after resampling: air, not water."""
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    """Rigid CT->PET registration settings."""
    itk_threads: int = 1
    """ITK threads per study task; Ray runs one study per CPU, so more threads only oversubscribe."""
    qc_png: bool = True
    """Write a QC PNG per study (CT/PET fusion before and after registration); output-neutral, not in the digest."""
    labels: LabelSet = PSMA
    """Classes of the label volumes (`swinssl prepare --labels FILE`): a label value outside the set fails its study;
    written as `labels.json`. Default: the 12-class PSMA set."""
    max_volume_mib: float = 4096.0
    """Memory budget of one input volume as float32 (MiB): a CT or PET larger than this is refused (`too_large`)
    from its headers, before it is allocated. 4096 passes a 512x512x1200 CT (1200 MiB) with room for a tilted one
    resampled onto a wider grid."""

    def to_dict(self) -> dict:
        """Plain-JSON form (`prepare_config.json`); the label set in `labels.json`'s form."""
        return {**asdict(self), "labels": self.labels.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> PrepareConfig:
        """Inverse of `to_dict` (extra keys such as `digest` ignored): new studies prepared like a cohort was."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for name in ("ct_window", "pet_window"):
            if name in values:
                values[name] = Window(**values[name])
        if "registration" in values:
            reg = dict(values["registration"])
            for name in ("shrink_factors", "smoothing_sigmas_mm"):
                if name in reg:
                    reg[name] = tuple(reg[name])
            values["registration"] = RegistrationConfig(**reg)
        if "labels" in values:
            values["labels"] = LabelSet.from_dict(values["labels"])
        return cls(**values)
