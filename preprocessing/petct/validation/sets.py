"""Two validation sets designed apart from `petct.synth`, each a seeded generator of studies with a known motion.

`head_pelvis` (as issue #11 describes its independent phantom): a 180 mm head-to-pelvis field of view of a small
body, FDG-like uptake (brain, myocardium, bladder hot), PET 48x48x60 at 4.07x4.07x3 mm, CT 160x160x60 at
1.22x1.22x3 mm, ~10 mm and +-3 degree rigid motion about the PET centre.
`trunk` (a second, different design): thorax-abdomen with arms at the sides, ribs, stomach gas and a scanner table,
PSMA-like uptake (kidneys ~40), PET 60x60x64 at 3.65x3.65x2.8 mm with a 7.5 mm PSF and 15-25 % noise, CT 176x176 at
1.1 mm with 2 mm slices covering only ~80 % of the PET's z range and cutting the arms, 20-40 HU noise, up to 15 mm
and +-5 degree motion about a random centre in the body.
Both: the anatomy is defined in the PET frame; truth T maps a PET point to the CT point showing the same anatomy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .anatomy import Shape, cylinder, ellipsoid, grid_image, render_ct, render_pet
from .tre import body_markers


@dataclass
class ValidationStudy:
    """One study: CT (HU, int16) and PET (SUV) images, the true PET->CT transform, CT-frame markers (N, 3)."""

    study_id: str
    ct: sitk.Image
    pet: sitk.Image
    truth: sitk.Euler3DTransform
    markers: np.ndarray
    """Physical CT-frame points inside the body and inside both fields of view; never painted into any image."""


def _motion(rng: np.random.Generator, centre, shift_mm: tuple[float, float], angle_deg: float) -> sitk.Euler3DTransform:
    t = sitk.Euler3DTransform()
    t.SetCenter([float(v) for v in centre])
    t.SetRotation(*(float(a) for a in np.radians(rng.uniform(-angle_deg, angle_deg, 3))))
    direction = rng.normal(size=3)
    t.SetTranslation([float(v) for v in direction / np.linalg.norm(direction) * rng.uniform(*shift_mm)])
    return t


def _jit(rng: np.random.Generator, centre, semi, move_mm: float = 3.0, size: float = 0.1):
    c = np.asarray(centre, float) + rng.uniform(-move_mm, move_mm, 3)
    return c, np.asarray(semi, float) * rng.uniform(1 - size, 1 + size, len(semi))


def _lesions(rng: np.random.Generator, z0: float, boxes: list[tuple], n_max: int, suv: tuple[float, float]) -> list:
    out = []
    for _ in range(int(rng.integers(0, n_max + 1))):
        lo, hi = boxes[int(rng.integers(len(boxes)))]
        c = rng.uniform(lo, hi) + np.array([0.0, 0.0, z0])
        out.append(ellipsoid(c, [rng.uniform(3.0, 6.0)] * 3, 40.0, rng.uniform(*suv)))
    return out


def head_pelvis_anatomy(rng: np.random.Generator, z0: float) -> list[Shape]:
    """Small-body head-to-pelvis anatomy; z0 = bottom of the PET FOV (scanner z), vertex ~172 mm above it."""
    fw, fd = rng.uniform(0.9, 1.1, 2)

    def at(x, y, z):
        return (x * fw, y * fd, z + z0)

    def organ(c, semi, hu, suv, move=3.0):
        cc, ss = _jit(rng, at(*c), (semi[0] * fw, semi[1] * fd, semi[2]), move)
        return ellipsoid(cc, ss, hu, suv)

    s = [cylinder(at(0, 2, 0)[:2], (58 * fw, 40 * fd), z0 - 30, z0 + 118, -100, 0.4),  # trunk fat
         ellipsoid(at(0, 2, 112), (62 * fw, 38 * fd, 12), -100, 0.4),  # shoulders
         cylinder(at(0, 2, 0)[:2], (52 * fw, 35 * fd), z0 - 30, z0 + 116, 45, 0.8),  # muscle wall
         cylinder(at(0, 4, 0)[:2], (18 * fw, 17 * fd), z0 + 110, z0 + 134, 40, 0.9),  # neck
         organ((0, 0, 150), (30, 34, 24), 700, 0.8, 1.0),  # skull
         organ((0, 0, 150), (26, 30, 20), 35, rng.uniform(6.0, 9.0), 1.0),  # brain
         organ((24, 0, 92), (18, 24, 18), -850, 0.25), organ((-24, 0, 92), (18, 24, 18), -850, 0.25),  # lungs
         organ((6, -10, 84), (15, 13, 12), 45, rng.uniform(3.0, 8.0)),  # heart (myocardium)
         organ((-22, -4, 64), (26, 24, 13), 60, rng.uniform(2.0, 3.0)),  # liver
         organ((28, 12, 66), (9, 10, 9), 50, rng.uniform(1.8, 2.6)),  # spleen
         organ((22, 20, 50), (8, 7, 12), 35, rng.uniform(3.0, 5.0)), organ((-22, 20, 50), (8, 7, 12), 35, 4.0),
         cylinder(at(6, 18, 0)[:2], (4, 4), z0 + 30, z0 + 95, 45, 1.8)]  # aorta
    for i in range(3):  # bowel loops
        s.append(organ((rng.uniform(-20, 20), -14, 36 + 8 * i), (9, 6, 5), 30, rng.uniform(1.2, 3.0), 4.0))
    for k in range(13):  # vertebrae 6 mm of bone, 3 mm discs
        s.append(cylinder(at(0, 28, 0)[:2], (6 * fw, 6 * fd), z0 + 18 + 9 * k, z0 + 24 + 9 * k, 650, 1.0))
    s += [organ((30, 14, 22), (16, 8, 14), 500, 0.8), organ((-30, 14, 22), (16, 8, 14), 500, 0.8),  # iliac wings
          organ((24, 2, 6), (7, 7, 7), 400, 0.7), organ((-24, 2, 6), (7, 7, 7), 400, 0.7),  # femoral heads
          organ((0, -14, 14), (14, 11, 9), 10, rng.uniform(15.0, 40.0), 2.0)]  # bladder
    return s + _lesions(rng, z0, [((-35, -20, 20), (35, 20, 110))], 3, (6.0, 15.0))


def head_pelvis_study(seed: int) -> ValidationStudy:
    """Set 1: the issue's independent phantom (grids, motion and FOV as described there; anatomy our own)."""
    r_anat, r_motion, r_noise = (np.random.default_rng(s) for s in np.random.SeedSequence([11, seed]).spawn(3))
    z0 = float(r_anat.uniform(-900.0, -300.0))
    pet = grid_image((-23.5 * 4.07, -23.5 * 4.07, z0), (4.07, 4.07, 3.0), (48, 48, 60))
    ct = grid_image((-79.5 * 1.22, -79.5 * 1.22, z0 + float(r_anat.uniform(-1.5, 1.5))), (1.22, 1.22, 3.0),
                    (160, 160, 60))
    shapes = head_pelvis_anatomy(r_anat, z0)
    truth = _motion(r_motion, _centre(pet), (8.0, 12.0), 3.0)
    return _study(f"hp_{seed:03d}", shapes, pet, ct, truth, r_noise, fwhm=6.0,
                  pet_noise=r_noise.uniform(0.10, 0.15), ct_noise=r_noise.uniform(10.0, 20.0))


def trunk_anatomy(rng: np.random.Generator, z0: float) -> tuple[list[Shape], list[Shape]]:
    """Thorax-abdomen (shoulders ~175 mm above z0) with arms; returns (patient shapes, scanner table)."""
    ax, ay = rng.uniform(62.0, 76.0), rng.uniform(46.0, 56.0)

    def organ(c, semi, hu, suv, move=4.0):
        cc, ss = _jit(rng, (c[0] * ax / 70, c[1] * ay / 50, c[2] + z0), semi, move, 0.12)
        return ellipsoid(cc, ss, hu, suv)

    s = [cylinder((0, 0), (ax, ay), z0 - 40, z0 + 176, -90, 0.5),
         cylinder((0, 0), (ax - 9, ay - 8), z0 - 40, z0 + 172, 50, 0.7)]
    for side in (-1, 1):  # arms at the sides, fat + humerus
        x = side * (ax + rng.uniform(14.0, 20.0))
        s += [cylinder((x, 4), (13, 15), z0 - 40, z0 + 200, -60, 0.6),
              cylinder((x, 6), (4, 4), z0 + 20, z0 + 200, 900, 0.6)]
    for k in range(9):  # ribs: a bone ring 4 mm high every 15 mm, refilled inside
        zk = z0 + 60 + 14 * k
        s += [cylinder((0, 0), (ax - 10, ay - 9), zk, zk + 4, 700, 0.8),
              cylinder((0, 0), (ax - 14, ay - 13), zk, zk + 4, 50, 0.7)]
    s += [organ((28, 0, 135), (24, 30, 38), -850, 0.2), organ((-28, 0, 135), (24, 30, 38), -850, 0.2),  # lungs
          organ((8, -14, 118), (20, 17, 18), 45, 1.6),  # heart (blood pool)
          organ((-25, -2, 78), (32, 28, 22), 58, rng.uniform(5.0, 8.0)),  # liver
          organ((35, 18, 82), (11, 13, 14), 50, rng.uniform(6.0, 10.0)),  # spleen
          organ((22, -20, 80), (15, 12, 12), 35, 2.0), organ((22, -24, 84), (9, 6, 6), -900, 0.0),  # stomach, gas
          organ((24, 26, 48), (9, 8, 16), 35, rng.uniform(30.0, 45.0)),
          organ((-24, 26, 44), (9, 8, 16), 35, rng.uniform(30.0, 45.0))]  # kidneys
    for _ in range(5):  # small bowel
        s.append(organ((rng.uniform(-28, 28), rng.uniform(-30, -5), rng.uniform(5, 40)), (10, 8, 7), 30,
                       rng.uniform(3.0, 6.0), 3.0))
    for k in range(16):  # vertebrae 8 mm, discs 3 mm
        s.append(cylinder((0, 34 * ay / 50), (9, 8), z0 - 4 + 11 * k, z0 + 4 + 11 * k, 600, 0.9))
    s += _lesions(rng, z0, [((-40, -25, 10), (40, 25, 160))], 4, (5.0, 30.0))
    table = [cylinder((0, ay + 120), (160, 112), z0 - 400, z0 + 600, 150, 0.0),
             cylinder((0, ay + 120), (150, 108), z0 - 400, z0 + 600, -1000, 0.0)]  # curved shell below the back
    return s, table


def trunk_study(seed: int) -> ValidationStudy:
    """Set 2: thorax-abdomen, other grids, noise, motion range and partial CT coverage (see the module doc)."""
    r_anat, r_motion, r_noise = (np.random.default_rng(s) for s in np.random.SeedSequence([22, seed]).spawn(3))
    z0 = float(r_anat.uniform(-1200.0, -400.0))
    pet = grid_image((-29.5 * 3.65, -29.5 * 3.65, z0), (3.65, 3.65, 2.8), (60, 60, 64))
    ct_z0 = z0 + float(r_anat.uniform(0.0, 36.0))  # the CT covers 144 mm of the PET's 179 mm
    ct = grid_image((-87.5 * 1.1, -87.5 * 1.1, ct_z0), (1.1, 1.1, 2.0), (176, 176, 72))
    shapes, table = trunk_anatomy(r_anat, z0)
    centre = np.array([0.0, 30.0, z0 + 90.0]) + r_motion.uniform(-30.0, 30.0, 3)
    truth = _motion(r_motion, centre, (2.0, 15.0), 5.0)
    return _study(f"tr_{seed:03d}", shapes, pet, ct, truth, r_noise, fwhm=7.5, fixed=table,
                  pet_noise=r_noise.uniform(0.15, 0.25), ct_noise=r_noise.uniform(20.0, 40.0))


def _centre(image: sitk.Image):
    return image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])


def _study(sid: str, shapes, pet_grid, ct_grid, truth, rng, *, fwhm: float, pet_noise: float, ct_noise: float,
           fixed=()) -> ValidationStudy:
    pet = render_pet(shapes, pet_grid, rng, fwhm, float(pet_noise))
    ct = render_ct(shapes, ct_grid, truth, rng, float(ct_noise), list(fixed))
    return ValidationStudy(sid, ct, pet, truth, body_markers(shapes, ct, pet, truth))


SETS: dict[str, Callable[[int], ValidationStudy]] = {"head_pelvis": head_pelvis_study, "trunk": trunk_study}
"""Validation set name -> study generator (seed -> study)."""
