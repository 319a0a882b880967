"""Synthetic whole-body PSMA PET/CT studies and cohorts (NIfTI or DICOM), with ground-truth CT motion.

Conventions (all images: direction identity, DICOM LPS scanner frame shared by CT and PET):
- Labels: the phantom paints the 12 PSMA classes (`petct.labels.PSMA`). For another label set, each painted class
  whose name is in that set gets its value there and every other class becomes background (0): `{0: background,
  1: lesion}` gives binary lesion masks.
- The anatomy is defined in the PET frame. PET(p) = anatomy(p); CT(y) = anatomy(T^-1(y)), where T (motion.json,
  a SimpleITK Euler3DTransform) maps a PET (fixed) point to the CT (moving) point showing the same anatomy, i.e.
  `sitk.Resample(ct, pet, T)` puts the CT onto the PET grid in register.
- In-plane both grids are centred on the scanner axis; the CT starts 0-2 slices above the PET and has a few
  slices fewer, so the z extents differ. The PET volume starts (z origin) at a random table position.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from .labels import PSMA, LabelSet, LabelSetError
from .phantom import S_END, Body, Grid, Phantom, build_phantom, paint, sample_body

CSV_COLUMNS = ("study_id", "ct", "pet", "label", "cohort")
TOP_MARGIN_MM = 25.0  # PET field of view above the vertex
MOTION_PAD_MM = 45.0  # > |translation| + rotation sweep at the body's edge: anatomy needed beyond the CT z range
PET_FWHM_MM = 6.0


@dataclass(frozen=True)
class GridSpec:
    """Scanner grids of one scale of synthetic study."""

    pet_size_xy: int
    """PET matrix size in x and y (voxels)."""
    pet_spacing_xy: float
    """PET in-plane voxel size (mm)."""
    ct_size_xy: int
    """CT matrix size in x and y (voxels)."""
    ct_spacing_xy: float
    """CT in-plane voxel size (mm)."""
    slice_mm: float
    """Slice spacing of both CT and PET (mm)."""
    body_scale: float
    """Size of the phantom relative to an adult (1.0 = skull to mid-thigh ~900 mm)."""


GRIDS: dict[str, GridSpec] = {
    "full": GridSpec(168, 4.07, 512, 0.97, 3.0, 1.0),
    "small": GridSpec(64, 4.07, 128, 2.03, 3.0, 0.4),
}


def study_seed(seed: int, labeled: bool, index: int) -> int:
    """The seed of one cohort study, derived from the cohort seed, its cohort and index (regenerate one study)."""
    return int(np.random.SeedSequence([seed, int(labeled), index]).generate_state(1)[0])


def _grids(spec: GridSpec, body: Body, rng: np.random.Generator) -> tuple[Grid, Grid]:
    """PET grid covering the body at a random table position, and the CT grid offset/shorter in z."""
    sz = spec.slice_mm
    nz = int(np.ceil((S_END * body.k_l + TOP_MARGIN_MM) / sz)) + 1
    z0 = round(float(rng.uniform(-1100.0, -500.0)), 1)
    half = (spec.pet_size_xy - 1) / 2 * spec.pet_spacing_xy
    pet = Grid((-half, -half, z0), (spec.pet_spacing_xy,) * 2 + (sz,), (spec.pet_size_xy,) * 2 + (nz,))
    offset = float(rng.uniform(0.0, 2.0)) * sz
    nz_ct = nz - int(np.ceil(offset / sz)) - int(rng.integers(2, 6))
    half = (spec.ct_size_xy - 1) / 2 * spec.ct_spacing_xy
    ct = Grid((-half, -half, z0 + offset), (spec.ct_spacing_xy,) * 2 + (sz,), (spec.ct_size_xy,) * 2 + (nz_ct,))
    return pet, ct


def random_motion(rng: np.random.Generator, center: tuple[float, float, float]) -> sitk.Euler3DTransform:
    """Rigid patient motion: angles uniform +-3 deg, translation of random direction and norm 3-15 mm."""
    angles = np.radians(rng.uniform(-3.0, 3.0, 3))
    direction = rng.normal(size=3)
    shift = direction / np.linalg.norm(direction) * rng.uniform(3.0, 15.0)
    t = sitk.Euler3DTransform()
    t.SetCenter(center)
    t.SetRotation(*(float(a) for a in angles))
    t.SetTranslation(tuple(float(v) for v in shift))
    return t


def motion_dict(t: sitk.Euler3DTransform) -> dict:
    """JSON form of the motion, with the 4x4 homogeneous matrix of p -> T(p)."""
    rot = np.array(t.GetMatrix()).reshape(3, 3)
    c, tr = np.array(t.GetCenter()), np.array(t.GetTranslation())
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = rot, c + tr - rot @ c
    return {
        "convention": "T maps a PET (fixed) physical point p to the CT (moving) point showing the same anatomy: "
        "CT(T(p)) = PET anatomy at p; use sitk.Resample(ct, pet_reference, T)",
        "type": "Euler3DTransform",
        "compute_zyx": bool(t.GetComputeZYX()),
        "center": list(t.GetCenter()),
        "angles_rad": [t.GetAngleX(), t.GetAngleY(), t.GetAngleZ()],
        "translation_mm": list(t.GetTranslation()),
        "matrix": matrix.tolist(),
    }


def load_motion(study_dir: Path) -> sitk.Euler3DTransform:
    """The ground-truth transform of a study (see `motion_dict`); checks it against the stored matrix."""
    info = json.loads((Path(study_dir) / "motion.json").read_text())
    t = sitk.Euler3DTransform()
    t.SetComputeZYX(bool(info["compute_zyx"]))
    t.SetCenter(info["center"])
    t.SetRotation(*info["angles_rad"])
    t.SetTranslation(info["translation_mm"])
    if not np.allclose(motion_dict(t)["matrix"], info["matrix"], atol=1e-6):
        raise ValueError(f"{study_dir}/motion.json: parameters and matrix disagree")
    return t


def render_ct(ph: Phantom, grid: Grid, motion: sitk.Transform, rng: np.random.Generator) -> sitk.Image:
    """int16 HU CT: anatomy ids on a z-padded CT-like grid, moved by T, then HU + light blur + noise."""
    pad = int(np.ceil(MOTION_PAD_MM / grid.spacing[2])) + 1
    anat = Grid(grid.origin[:2] + (grid.origin[2] - pad * grid.spacing[2],), grid.spacing,
                grid.size[:2] + (grid.size[2] + 2 * pad,))
    ids = anat.image(paint(anat, ph.items))
    # Resample's transform maps output points to input points: CT(y) = anatomy(T^-1(y)).
    moved = sitk.Resample(ids, grid.reference(), motion.GetInverse(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    ids_ct = sitk.GetArrayViewFromImage(moved)
    hu_lut, noise_hu = ph.lut("hu", np.float32), float(rng.uniform(10.0, 20.0))
    sigma = 0.6 / np.array(grid.spacing[:2])  # ~0.6 mm in-plane blur softens nearest-neighbour staircases
    gain = _noise_gain((0.0, *sigma[::-1]))  # white noise loses std through the blur: pre-scale it
    out = np.empty(grid.shape, np.int16)
    for k0 in range(0, grid.shape[0], 32):  # slabs keep full-scale temporaries small
        slab = hu_lut[ids_ct[k0 : k0 + 32]]
        slab += rng.standard_normal(slab.shape, dtype=np.float32) * np.float32(noise_hu / gain)
        slab = ndimage.gaussian_filter(slab, (0.0, *sigma[::-1]), truncate=3.0)
        out[k0 : k0 + 32] = np.clip(np.rint(slab), -1024, 3071)
    return grid.image(out)


def _noise_gain(sigma: tuple[float, ...]) -> float:
    """Std of unit white noise after `gaussian_filter` with these sigmas (voxels)."""
    impulse = np.zeros((15,) * len(sigma), np.float64)
    impulse[(7,) * len(sigma)] = 1.0
    return float(np.sqrt((ndimage.gaussian_filter(impulse, sigma, truncate=3.0) ** 2).sum()))


def render_pet(ph: Phantom, grid: Grid, rng: np.random.Generator) -> tuple[sitk.Image, sitk.Image]:
    """SUV PET (float32) and label (uint8), both on the PET grid, in the anatomy (= PET) frame.

    SUV is rasterised on a 2x oversampled grid and block-averaged (partial volume), blurred to ~6 mm FWHM,
    then given Poisson-like noise (relative std ~10-15 % in hot regions, higher at low uptake).
    """
    fine = Grid(tuple(o - s / 4 for o, s in zip(grid.origin, grid.spacing, strict=True)),
                tuple(s / 2 for s in grid.spacing), tuple(2 * n for n in grid.size))
    ids = paint(fine, ph.items)
    suv_lut, (nz, ny, nx) = ph.lut("suv", np.float32), grid.shape
    suv = np.empty(grid.shape, np.float32)
    for k0 in range(0, nz, 16):
        k1 = min(k0 + 16, nz)
        suv[k0:k1] = suv_lut[ids[2 * k0 : 2 * k1]].reshape(k1 - k0, 2, ny, 2, nx, 2).mean(axis=(1, 3, 5))
    del ids
    # The 2x2x2 block already adds a box blur (variance w^2/12): the Gaussian brings the total to ~6 mm FWHM.
    sig_mm = np.sqrt(np.maximum((PET_FWHM_MM / 2.3548) ** 2 - np.array(grid.spacing) ** 2 / 12, 0.25))
    suv = ndimage.gaussian_filter(suv, (sig_mm / np.array(grid.spacing))[::-1], truncate=3.0)
    noise = ndimage.gaussian_filter(rng.standard_normal(suv.shape, dtype=np.float32), 0.6)
    noise /= noise.std()
    frac = np.float32(rng.uniform(0.10, 0.15))
    suv = np.clip(suv + frac * np.sqrt(suv * (suv + 1.0)) * noise, 0.0, None).astype(np.float32)
    label = ph.lut("label", np.uint8)[paint(grid, ph.items)]
    return grid.image(suv), grid.image(label)


def phantom_label_lut(labels: LabelSet) -> np.ndarray | None:
    """Painted PSMA value -> value in `labels` (the class of the same name, else 0); None when that is the identity.

    A set sharing no foreground class with the phantom would give empty masks: that is an error, not a cohort."""
    lut = np.array([0] + [labels.names.index(n) if n in labels.names[1:] else 0 for n in PSMA.names[1:]], np.uint8)
    if not lut.any():
        raise LabelSetError(f"label set {labels.describe()} shares no class with the synthetic phantom's classes "
                            f"{list(PSMA.names[1:])}")
    return None if np.array_equal(lut, np.arange(PSMA.num_classes)) else lut


def _relabel(label: sitk.Image, lut: np.ndarray | None) -> sitk.Image:
    if lut is None:
        return label
    out = sitk.GetImageFromArray(lut[sitk.GetArrayViewFromImage(label)])
    out.CopyInformation(label)
    return out


def _study_volumes(seed: int, spec: GridSpec) -> dict:
    """Everything of one study, in memory (independent random streams: anatomy, motion, noise, DICOM metadata)."""
    r_anat, r_motion, r_noise, r_meta = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))
    pet_spacing = np.array([spec.pet_spacing_xy, spec.pet_spacing_xy, spec.slice_mm])
    min_semi = 1.05 * 0.5 * float(np.linalg.norm(pet_spacing))  # a ball this big always holds a PET voxel centre
    body = sample_body(r_anat, spec.body_scale, min_semi)
    pet_grid, ct_grid = _grids(spec, body, r_anat)
    top = pet_grid.origin[2] + (pet_grid.size[2] - 1) * spec.slice_mm
    phantom = build_phantom(r_anat, replace(body, z_top=top - TOP_MARGIN_MM))
    motion = random_motion(r_motion, pet_grid.center)
    pet, label = render_pet(phantom, pet_grid, r_noise)
    ct = render_ct(phantom, ct_grid, motion, r_noise)
    return {"ct": ct, "pet": pet, "label": label, "motion": motion, "r_meta": r_meta}


def synth_study(study_id: str, out_dir: Path, *, labeled: bool, seed: int, scale: str = "small",
                fmt: str = "nifti", labels: LabelSet = PSMA) -> dict:
    """Write one study to out_dir/study_id/ and return its cohort.csv row (paths relative to out_dir).

    `labels`: the label set of label.nii.gz (see the module docstring); the images do not depend on it.

    NIfTI: ct.nii.gz (int16 HU), pet.nii.gz (float32 SUVbw), label.nii.gz (uint8, labelled only), motion.json.
    DICOM: ct/ and pet/ series (PET in Bq/mL with SUV tags), suv_truth.json, label.nii.gz, motion.json.
    """
    if fmt not in ("nifti", "dicom"):
        raise ValueError(f"fmt must be 'nifti' or 'dicom', not {fmt!r}")
    lut = phantom_label_lut(labels)
    vol = _study_volumes(seed, GRIDS[scale])
    folder = Path(out_dir) / study_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "motion.json").write_text(json.dumps(motion_dict(vol["motion"]), indent=2))
    if fmt == "nifti":
        sitk.WriteImage(vol["ct"], str(folder / "ct.nii.gz"), True)
        sitk.WriteImage(vol["pet"], str(folder / "pet.nii.gz"), True)
        ct_name, pet_name = "ct.nii.gz", "pet.nii.gz"
    else:
        from .dicom_write import write_study_dicom

        write_study_dicom(folder, study_id, seed, vol["ct"], vol["pet"], vol["r_meta"])
        ct_name, pet_name = "ct", "pet"
    if labeled:
        sitk.WriteImage(_relabel(vol["label"], lut), str(folder / "label.nii.gz"), True)
    return {"study_id": study_id, "ct": f"{study_id}/{ct_name}", "pet": f"{study_id}/{pet_name}",
            "label": f"{study_id}/label.nii.gz" if labeled else "", "cohort": "labeled" if labeled else "unlabeled"}


def synth_cohort(out: Path, *, unlabeled: int, labeled: int, seed: int = 0, scale: str = "small",
                 fmt: str = "nifti", workers: int = 1, labels: LabelSet = PSMA) -> Path:
    """Write `labeled` studies lab_0000.. and `unlabeled` studies unl_0000.. plus out/cohort.csv; return the CSV.
    Label volumes hold the values of `labels` (see the module docstring).

    Study i of a cohort uses `study_seed(seed, labeled, i)`, so the cohort is reproducible whatever `workers`.
    The CSV lists labelled studies first, then unlabelled ones, each in index order.
    """
    if unlabeled < 0 or labeled < 0 or unlabeled + labeled == 0:
        raise ValueError(f"need unlabeled >= 0 and labeled >= 0 studies, at least one in all; got unlabeled="
                         f"{unlabeled}, labeled={labeled}")
    phantom_label_lut(labels)  # a label set the phantom cannot paint fails before any study is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(f"lab_{i:04d}", True, study_seed(seed, True, i)) for i in range(labeled)]
    jobs += [(f"unl_{i:04d}", False, study_seed(seed, False, i)) for i in range(unlabeled)]
    rows: dict[str, dict] = {}
    bar = tqdm(total=len(jobs), desc="synth", unit="study")
    if workers <= 1:
        for sid, lab, s in jobs:
            rows[sid] = synth_study(sid, out, labeled=lab, seed=s, scale=scale, fmt=fmt, labels=labels)
            bar.update()
    else:  # spawn: SimpleITK's thread pool is not fork-safe
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(synth_study, sid, out, labeled=lab, seed=s, scale=scale, fmt=fmt, labels=labels)
                       for sid, lab, s in jobs]
            for future in as_completed(futures):
                row = future.result()
                rows[row["study_id"]] = row
                bar.update()
    bar.close()
    path = out / "cohort.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows[sid] for sid, _, _ in jobs)
    return path
