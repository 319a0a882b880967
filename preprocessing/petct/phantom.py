"""Geometric whole-body PSMA phantom: shapes, per-study anatomy and rasterisation onto voxel grids.

Frames: the scanner frame is DICOM LPS (+x patient left, +y posterior, +z superior/head). The anatomy is written
in full-scale "body coordinates" (x, y in mm, s = mm below the vertex) and mapped to the scanner frame by `Body`,
which applies the grid's body_scale, the per-study size factors and the table position.
Arrays are numpy (z, y, x), as `sitk.GetArrayFromImage` returns them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import SimpleITK as sitk

F32 = np.float32


@dataclass(frozen=True)
class Grid:
    """A voxel grid with identity direction; `origin` is the centre of voxel (0, 0, 0), all in (x, y, z) order."""

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    size: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        """numpy (z, y, x) shape."""
        return self.size[2], self.size[1], self.size[0]

    @property
    def center(self) -> tuple[float, float, float]:
        """Physical centre of the volume."""
        return tuple(o + (n - 1) / 2 * s for o, s, n in zip(self.origin, self.spacing, self.size, strict=True))

    def axis(self, i: int) -> np.ndarray:
        """Physical voxel-centre coordinates along axis i (0=x, 1=y, 2=z), float32."""
        return (self.origin[i] + self.spacing[i] * np.arange(self.size[i])).astype(F32)

    def index_slice(self, i: int, lo: float, hi: float) -> slice:
        """Voxel indices along axis i whose centres lie in [lo, hi], clipped to the grid."""
        a = int(np.ceil((lo - self.origin[i]) / self.spacing[i]))
        b = int(np.floor((hi - self.origin[i]) / self.spacing[i])) + 1
        return slice(max(a, 0), max(min(b, self.size[i]), 0))

    def image(self, array: np.ndarray) -> sitk.Image:
        """Wrap a (z, y, x) array as a SimpleITK image on this grid."""
        img = sitk.GetImageFromArray(array)
        img.SetOrigin(self.origin)
        img.SetSpacing(self.spacing)
        return img

    def reference(self, pixel: int = sitk.sitkUInt8) -> sitk.Image:
        """An empty image with this geometry (a Resample target)."""
        img = sitk.Image(list(self.size), pixel)
        img.SetOrigin(self.origin)
        img.SetSpacing(self.spacing)
        return img


class Shape(Protocol):
    """A solid: physical bounding box and an inside test on broadcast coordinates x (1,1,nx), y (1,ny,1), z (nz,1,1)."""

    def bounds(self) -> tuple[np.ndarray, np.ndarray]: ...

    def mask(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray: ...


def rotation(rx: float = 0.0, ry: float = 0.0, rz: float = 0.0) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx from angles in degrees."""
    a, b, c = np.radians([rx, ry, rz])
    mx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    my = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    mz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return mz @ my @ mx


@dataclass(frozen=True)
class Ellipsoid:
    """Ellipsoid; the columns of `rot` are its axes in the scanner frame (None = axis-aligned)."""

    center: np.ndarray
    semi: np.ndarray
    rot: np.ndarray | None = None

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        half = self.semi if self.rot is None else np.sqrt(((self.rot * self.semi[None, :]) ** 2).sum(1))
        return self.center - half, self.center + half

    def mask(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        d = [x - F32(self.center[0]), y - F32(self.center[1]), z - F32(self.center[2])]
        if self.rot is None:
            return sum((d[i] / F32(self.semi[i])) ** 2 for i in range(3)) <= 1
        acc = 0
        for j in range(3):
            u = d[0] * F32(self.rot[0, j]) + d[1] * F32(self.rot[1, j]) + d[2] * F32(self.rot[2, j])
            acc = acc + (u / F32(self.semi[j])) ** 2
        return acc <= 1


@dataclass(frozen=True)
class Capsule:
    """All points within `radius` of the segment p0-p1 (bowel loops, long bones, vessels)."""

    p0: np.ndarray
    p1: np.ndarray
    radius: float

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return np.minimum(self.p0, self.p1) - self.radius, np.maximum(self.p0, self.p1) + self.radius

    def mask(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        d = (self.p1 - self.p0).astype(F32)
        rel = [x - F32(self.p0[0]), y - F32(self.p0[1]), z - F32(self.p0[2])]
        t = np.clip(sum(rel[i] * d[i] for i in range(3)) / F32(max(float(d @ d), 1e-6)), 0, 1)
        return sum((rel[i] - t * d[i]) ** 2 for i in range(3)) <= F32(self.radius**2)


@dataclass(frozen=True)
class Profile:
    """Elliptic cross-section whose centre and semi-axes vary linearly between z knots (body outline, spine).

    `y_keep` keeps only the part with (y - cy) / ay inside the interval (partial rings: ribs, mandible).
    """

    z: np.ndarray  # ascending
    cx: np.ndarray
    cy: np.ndarray
    ax: np.ndarray
    ay: np.ndarray
    y_keep: tuple[float, float] | None = None

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lo = np.array([np.min(self.cx - self.ax), np.min(self.cy - self.ay), self.z[0]])
        hi = np.array([np.max(self.cx + self.ax), np.max(self.cy + self.ay), self.z[-1]])
        return lo, hi

    def mask(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        cx, cy, ax, ay = (np.interp(z, self.z, v).astype(F32) for v in (self.cx, self.cy, self.ax, self.ay))
        u = (y - cy) / ay
        inside = ((x - cx) / ax) ** 2 + u**2 <= 1
        if self.y_keep is not None:
            inside &= (u >= F32(self.y_keep[0])) & (u <= F32(self.y_keep[1]))
        return inside


@dataclass(frozen=True)
class Minus:
    """`outer` without `inner` (shells: skull, ribs)."""

    outer: Shape
    inner: Shape

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.outer.bounds()

    def mask(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return self.outer.mask(x, y, z) & ~self.inner.mask(x, y, z)


@dataclass(frozen=True)
class Material:
    """One painted tissue: CT number, PSMA uptake and label class (0 = unlabelled)."""

    name: str
    hu: float
    suv: float
    label: int = 0


@dataclass
class Phantom:
    """Materials (id = list index) and shapes painted in order: a later shape overwrites an earlier one."""

    materials: list[Material] = field(default_factory=list)
    items: list[tuple[Shape, int]] = field(default_factory=list)

    def add_material(self, material: Material) -> int:
        if len(self.materials) >= 255:
            raise ValueError("phantom ids are uint8: too many materials")
        self.materials.append(material)
        return len(self.materials) - 1

    def lut(self, attr: str, dtype: type) -> np.ndarray:
        """Per-id table of one Material attribute ('hu', 'suv', 'label')."""
        return np.array([getattr(m, attr) for m in self.materials], dtype=dtype)


def paint(grid: Grid, items: Sequence[tuple[Shape, int]], background: int = 0, chunk: int = 4_000_000) -> np.ndarray:
    """Rasterise shapes (point sampling at voxel centres) into a uint8 id map, each only inside its bounding box.

    Large boxes are processed in z slabs of about `chunk` voxels so temporaries stay small at full resolution.
    """
    out = np.full(grid.shape, background, np.uint8)
    axes = [grid.axis(i) for i in range(3)]
    for shape, value in items:
        lo, hi = shape.bounds()
        sx, sy, sz = (grid.index_slice(i, lo[i], hi[i]) for i in range(3))
        if sx.start >= sx.stop or sy.start >= sy.stop or sz.start >= sz.stop:
            continue
        x, y = axes[0][sx][None, None, :], axes[1][sy][:, None][None]
        step = max(1, chunk // ((sx.stop - sx.start) * (sy.stop - sy.start)))
        for k0 in range(sz.start, sz.stop, step):
            k1 = min(k0 + step, sz.stop)
            inside = shape.mask(x, y, axes[2][k0:k1][:, None, None])
            out[k0:k1, sy, sx][inside] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# Anatomy. Numbers are full-scale body coordinates: x (mm, + = patient left), y (mm, + = posterior), s (mm below
# the vertex). Each organ position/size is jittered per study.
# ---------------------------------------------------------------------------------------------------------------

S_END = 940.0  # bottom of the PET field of view (upper thigh), in s
LEG_END = 1100.0  # legs continue past the field of view, also after the CT motion padding
# Head/neck/torso outline knots: (s, cy, ax, ay, subcutaneous fat multiplier).
_CAP_S = (0, 3, 8, 18, 32, 52, 78, 105, 130, 150)  # ellipsoidal cranium of half-height 105; r >= 0.08: no zero axis
_HEAD_CAP = [(s, 0.0, 72 * r, 92 * r, 0.25) for s in _CAP_S for r in [max(np.sqrt(1 - ((s - 105) / 105) ** 2), 0.08)]]
_TORSO = _HEAD_CAP + [
    (170, -5, 62, 85, 0.25), (195, -8, 52, 70, 0.3), (210, 8, 50, 58, 0.4), (250, 10, 55, 58, 0.45),
    (268, 5, 110, 80, 0.6), (285, 0, 178, 105, 0.8), (330, 0, 172, 110, 1.0), (450, 0, 165, 112, 1.0),
    (540, -5, 158, 115, 1.2), (650, -8, 158, 118, 1.4), (720, -5, 170, 115, 1.3), (790, 0, 175, 110, 1.2),
    (845, 5, 168, 100, 1.0),
]
_LEG = [(815, 85, 0, 70, 75), (850, 88, 0, 82, 85), (LEG_END, 80, 0, 70, 74)]  # (s, |cx|, cy, ax, ay)
_SPINE = [(190, 20, 11), (280, 35, 14), (400, 50, 16), (600, 48, 20), (760, 40, 22)]  # (s, cy, radius)
# Paired glands (mirrored in x) and the single sublingual gland: name -> (x, y, s, semi-axes, z-rotation deg).
_GLANDS = {
    "lacrimal_glands": ((42, -72, 86), (9, 6, 4), 0),
    "parotid_glands": ((50, 5, 155), (10, 18, 22), 0),
    "submandibular_glands": ((34, -20, 200), (11, 14, 10), 0),
    "tubarial_glands": ((20, 10, 148), (4, 9, 11), 20),
    "sublingual_gland": ((0, -48, 185), (16, 7, 5), 0),
}


@dataclass(frozen=True)
class Body:
    """One study's proportions: maps body coordinates to the scanner frame."""

    k_w: float  # mm per body-mm, in-plane
    k_l: float  # mm per body-mm, cranio-caudal
    z_top: float  # scanner z of the vertex (s = 0)
    min_semi: float  # smallest organ semi-axis (mm): keeps every organ visible on the PET grid
    fat: float  # subcutaneous fat thickness of the chest (body mm)
    belly: float  # abdominal AP girth factor

    def p(self, x: float, y: float, s: float) -> np.ndarray:
        return np.array([x * self.k_w, y * self.k_w, self.z_top - s * self.k_l])

    def semi(self, a: float, b: float, c: float) -> np.ndarray:
        return np.maximum([a * self.k_w, b * self.k_w, c * self.k_l], self.min_semi)

    def profile(self, knots: Sequence[tuple], y_keep: tuple[float, float] | None = None) -> Profile:
        """Profile from (s, cx, cy, ax, ay) knots in body coordinates."""
        k = np.array(knots, float)[::-1]  # s ascending = z descending: flip so z ascends
        return Profile(self.z_top - k[:, 0] * self.k_l, k[:, 1] * self.k_w, k[:, 2] * self.k_w,
                       np.maximum(k[:, 3], 1.0) * self.k_w, np.maximum(k[:, 4], 1.0) * self.k_w, y_keep)


def sample_body(rng: np.random.Generator, body_scale: float, min_semi: float) -> Body:
    """Random body size (+-10 % in height and girth), fat and belly; z_top is set once the grid is known."""
    return Body(k_w=body_scale * rng.uniform(0.9, 1.1), k_l=body_scale * rng.uniform(0.9, 1.1), z_top=0.0,
                min_semi=min_semi, fat=rng.uniform(8, 28), belly=rng.uniform(0.9, 1.2))


def _materials(rng: np.random.Generator) -> list[Material]:
    """Per-study CT numbers and PSMA SUVs, drawn around typical values: HU air -1000, lung ~-850, fat ~-100, soft
    tissue ~40, liver ~55, bone 300-1000; SUVbw of PSMA ligands: kidneys ~40, parotid/submandibular ~13-15, liver
    ~5-8, spleen ~6-10, bladder very high, blood ~1.5-2, muscle 0.5-1 (lesions: see `_lesions`)."""
    from .labels import CLASSES

    u = rng.uniform
    organs = {  # name: (HU range, SUV range)
        "lacrimal_glands": ((35, 50), (6, 10)), "parotid_glands": ((-15, 20), (12, 16)),
        "submandibular_glands": ((35, 50), (12, 16)), "tubarial_glands": ((30, 45), (6, 10)),
        "sublingual_gland": ((35, 50), (6, 10)), "kidneys": ((28, 40), (30, 50)), "spleen": ((40, 50), (6, 10)),
        "liver": ((50, 65), (5, 8)), "small_intestine": ((20, 40), (6, 10)), "bladder": ((5, 15), (60, 100)),
    }
    tissues = {
        "air": ((-1000, -1000), (0, 0)), "fat": ((-110, -85), (0.25, 0.45)), "soft": ((35, 50), (0.6, 1.0)),
        "brain": ((30, 40), (0.2, 0.4)), "eye": ((5, 15), (0.15, 0.3)), "lung": ((-880, -820), (0.25, 0.4)),
        "blood": ((35, 50), (1.5, 2.2)), "cancellous": ((250, 400), (0.8, 1.3)), "cortical": ((800, 1100), (0.3, 0.5)),
        "disc": ((70, 90), (0.5, 0.8)), "visceral": ((-100, -60), (0.3, 0.5)), "prostate": ((35, 50), (2, 4)),
    }
    mats = [Material(n, u(*hu), u(*suv)) for n, (hu, suv) in tissues.items()]
    return mats + [Material(n, u(*hu), u(*suv), CLASSES.index(n)) for n, (hu, suv) in organs.items()]


class _Builder:
    """Collects materials and shapes in painting order; `organ` jitters position and size per study."""

    def __init__(self, rng: np.random.Generator, body: Body):
        self.rng, self.b, self.ph = rng, body, Phantom()
        self.ids = {m.name: self.ph.add_material(m) for m in _materials(rng)}

    def add(self, shape: Shape, name: str) -> None:
        self.ph.items.append((shape, self.ids[name]))

    def organ(self, name: str, xys: tuple, semi: tuple, rot: np.ndarray | None = None, jitter: float = 4.0) -> None:
        centre = np.asarray(xys, float) + self.rng.normal(0, jitter, 3)
        size = np.asarray(semi, float) * self.rng.uniform(0.88, 1.12, 3)
        self.add(Ellipsoid(self.b.p(*centre), self.b.semi(*size), rot), name)

    def capsule(self, a: tuple, c: tuple, r: float, name: str) -> None:
        self.add(Capsule(self.b.p(*a), self.b.p(*c), max(r * self.b.k_w, self.b.min_semi / 2)), name)



def _outline(bld: _Builder) -> None:
    """Skin outline (fat), the muscle core inside the subcutaneous fat, and the fat-filled abdominal cavity."""
    b = bld.b
    belly = [b.belly if 560 <= k[0] <= 760 else 1.0 for k in _TORSO]
    torso = [(s, cy * f, ax, ay * f, m) for (s, cy, ax, ay, m), f in zip(_TORSO, belly, strict=True)]
    for fat, name in ((0.0, "fat"), (b.fat, "soft")):
        bld.add(b.profile([(s, 0, cy, ax - fat * m, ay - fat * m) for s, cy, ax, ay, m in torso]), name)
        for side in (-1, 1):
            bld.add(b.profile([(s, side * cx, cy, ax - 0.8 * fat, ay - 0.8 * fat) for s, cx, cy, ax, ay in _LEG]), name)
    # Abdominal organs lie in mesenteric/retroperitoneal fat: that fat is what gives a non-contrast CT its contrast.
    wall = b.fat * 1.3 + 15
    bld.add(b.profile([(s, 0, cy, ax - wall, ay - wall) for s, cy, ax, ay, _ in torso if 500 <= s <= 845]), "visceral")
    for sd in (-1, 1):
        bld.capsule((30 * sd, 48, 600), (62 * sd, 30, 810), 17, "soft")  # psoas


def _head(bld: _Builder) -> None:
    b = bld.b
    skull = Ellipsoid(b.p(0, 4, 80), b.semi(70, 89, 78))
    brain = Ellipsoid(b.p(0, 4, 80), b.semi(63, 82, 70))
    bld.add(Minus(skull, brain), "cortical")
    bld.add(brain, "brain")
    for side in (-1, 1):
        bld.add(Ellipsoid(b.p(32 * side, -72, 95), b.semi(12, 12, 12)), "eye")  # carves the orbits
    jaw = [(168, 0, -10, 50, 62), (198, 0, -10, 48, 60)]
    bld.add(Minus(b.profile(jaw, y_keep=(-1.0, 0.25)), b.profile([(s, 0, cy, ax - 8, ay - 8) for s, _, cy, ax, ay
                                                                    in jaw])), "cortical")


def _chest(bld: _Builder) -> None:
    b = bld.b
    bld.add(b.profile([(200, 0, -25, 9, 9), (300, 0, -5, 10, 10), (360, 0, 5, 10, 10)]), "air")  # trachea
    bld.organ("lung", (-78, 8, 395), (62, 80, 115), jitter=2)
    bld.organ("lung", (80, 8, 400), (58, 80, 110), jitter=2)
    bld.organ("blood", (18, -25, 445), (55, 48, 55), jitter=3)  # heart (blood pool)
    bld.capsule((0, -10, 335), (15, 20, 345), 12, "blood")  # aortic arch and descending aorta
    bld.capsule((15, 20, 345), (12, 22, 700), 11, "blood")
    bld.add(Ellipsoid(b.p(0, -86, 400), b.semi(14, 6, 85)), "cortical")  # sternum
    for side in (-1, 1):
        bld.capsule((15 * side, -60, 285), (150 * side, -20, 280), 8, "cortical")  # clavicles
    for s in np.arange(300, 530, 22.0):  # ribs: partial rings inside the chest wall, open anteriorly
        cy, ax, ay = (float(np.interp(s, [k[0] for k in _TORSO], [k[i] for k in _TORSO])) for i in (1, 2, 3))
        ax, ay = ax - b.fat - 3, ay - b.fat - 3
        ring = [(s - 3.5, 0, cy, ax, ay), (s + 3.5, 0, cy, ax, ay)]
        inner = [(t, 0, cy, ax - 9, ay - 9) for t, *_ in ring]
        bld.add(Minus(b.profile(ring, y_keep=(-0.55, 1.0)), b.profile(inner)), "cortical")


def _spine(bld: _Builder) -> None:
    b = bld.b
    body = [(s, 0, cy, r, 0.85 * r) for s, cy, r in _SPINE]
    bld.add(b.profile(body), "cancellous")
    levels = np.concatenate([np.arange(200, 300, 16.0), np.arange(300, 580, 23.0), np.arange(590, 760, 32.0)])
    for s in levels:  # intervertebral discs
        cy, r = (float(np.interp(s, [k[0] for k in _SPINE], [k[i] for k in _SPINE])) for i in (1, 2))
        bld.add(b.profile([(s - 2.5, 0, cy, r, 0.85 * r), (s + 2.5, 0, cy, r, 0.85 * r)]), "disc")
    bld.add(b.profile([(s, 0, cy + r + 18, 5, 8) for s, cy, r in _SPINE]), "cortical")  # spinous processes
    bld.add(b.profile([(s, 0, cy + r + 7, 7, 7) for s, cy, r in _SPINE]), "soft")  # spinal canal


def _pelvis(bld: _Builder) -> None:
    b = bld.b
    bld.add(Ellipsoid(b.p(0, 65, 765), b.semi(38, 18, 50), rotation(rx=-20)), "cancellous")  # sacrum
    for sd in (-1, 1):
        bld.add(Ellipsoid(b.p(95 * sd, 25, 715), b.semi(9, 55, 60), rotation(rz=25 * sd)), "cancellous")  # ilium
        bld.capsule((15 * sd, -55, 815), (70 * sd, -25, 800), 10, "cancellous")  # pubic ramus
        bld.capsule((60 * sd, 25, 785), (55 * sd, 20, 840), 12, "cancellous")  # ischium
        bld.add(Ellipsoid(b.p(88 * sd, -5, 800), b.semi(24, 24, 24)), "cancellous")  # femoral head
        bld.capsule((88 * sd, -5, 800), (110 * sd, 5, 825), 15, "cancellous")  # femoral neck
        bld.capsule((110 * sd, 5, 825), (90 * sd, 0, LEG_END), 14, "cortical")  # femoral shaft
        bld.capsule((110 * sd, 5, 830), (90 * sd, 0, LEG_END), 7, "cancellous")  # marrow cavity


def _abdomen(bld: _Builder) -> None:
    rng = bld.rng
    bld.organ("liver", (-58, -5, 550), (75, 85, 70), rotation(ry=15))
    bld.organ("liver", (20, -45, 530), (50, 38, 30))  # left lobe
    bld.organ("spleen", (90, 45, 545), (28, 45, 55), rotation(rz=30))
    _small_intestine(bld)
    bld.organ("kidneys", (-68, 55, 610), (28, 32, 52), rotation(ry=-12))
    bld.organ("kidneys", (68, 55, 595), (28, 32, 52), rotation(ry=12))
    bld.organ("prostate", (0, -25, 832), (20, 16, 18), jitter=2)
    bld.organ("bladder", (0, -35, 785), (rng.uniform(30, 48), rng.uniform(28, 40), rng.uniform(22, 36)), jitter=3)


def _small_intestine(bld: _Builder, steps: int = 45, step_mm: float = 22.0, radius: float = 11.0) -> None:
    """A meandering tube: random walk of capsules reflected inside the mid/lower abdomen box."""
    lo, hi = np.array([-85.0, -85.0, 640.0]), np.array([85.0, 20.0, 760.0])
    point = lo + (hi - lo) * bld.rng.uniform(0.3, 0.7, 3)
    heading = bld.rng.normal(size=3)
    for _ in range(steps):
        heading = heading / np.linalg.norm(heading) + bld.rng.normal(0, 0.6, 3)  # smooth turns
        nxt = point + step_mm * heading / np.linalg.norm(heading)
        nxt = np.where(nxt < lo, 2 * lo - nxt, np.where(nxt > hi, 2 * hi - nxt, nxt))  # reflect at the walls
        bld.capsule(tuple(point), tuple(nxt), radius, "small_intestine")
        heading, point = nxt - point, nxt


def _glands(bld: _Builder) -> None:
    for name, ((x, y, s), semi, rz) in _GLANDS.items():
        for side in ((-1, 1) if x else (1,)):
            bld.organ(name, (x * side, y, s), semi, rotation(rz=rz * side) if rz else None, jitter=2)


def _lesion_site(rng: np.random.Generator) -> tuple[tuple[float, float, float], bool]:
    """A PSMA-typical lesion centre (body coordinates) and whether it lies in bone."""
    side = rng.choice([-1, 1])
    site = rng.choice(["vertebra", "ilium", "femur", "pelvic_node", "paraaortic_node", "mediastinal_node",
                       "inguinal_node", "prostate"], p=[0.2, 0.12, 0.08, 0.2, 0.15, 0.08, 0.07, 0.1])
    if site == "vertebra":
        s = rng.uniform(300, 740)
        return (0, float(np.interp(s, [k[0] for k in _SPINE], [k[1] for k in _SPINE])), s), True
    centre, spread = {
        "ilium": ((95 * side, 25, 715), (5, 25, 30)), "femur": ((90 * side, -3, 805), (5, 5, 10)),
        "pelvic_node": ((55 * side, -5, 770), (8, 10, 20)), "paraaortic_node": ((-22 if side < 0 else 40, 20, 650),
                                                                                 (4, 5, 50)),
        "mediastinal_node": ((18 * side, -5, 380), (5, 5, 20)), "inguinal_node": ((80 * side, -55, 840), (8, 8, 10)),
        "prostate": ((0, -25, 832), (6, 5, 6)),
    }[site]
    return tuple(np.asarray(centre) + rng.uniform(-1, 1, 3) * np.asarray(spread)), site in ("ilium", "femur")


def _lesions(bld: _Builder) -> int:
    """0-5 spherical-ish lesions (5-25 mm), each its own material so its SUV varies; returns the count."""
    from .labels import LESION

    rng, count = bld.rng, int(bld.rng.choice(6, p=[0.15, 0.25, 0.2, 0.15, 0.15, 0.1]))
    for i in range(count):
        centre, in_bone = _lesion_site(rng)
        suv = float(np.clip(rng.lognormal(np.log(7.0), 0.7), 4.0, 50.0))
        hu = rng.uniform(450, 900) if in_bone else rng.uniform(35, 55)  # sclerotic bone / soft-tissue node
        bld.ids[f"lesion{i}"] = bld.ph.add_material(Material(f"lesion{i}", hu, suv, LESION))
        bld.organ(f"lesion{i}", centre, np.full(3, rng.uniform(2.5, 12.5)), jitter=0.0)
    return count


def build_phantom(rng: np.random.Generator, body: Body) -> Phantom:
    """All shapes of one study, in painting order (tissue, bones, organs, glands, lesions: lesions win)."""
    bld = _Builder(rng, body)
    for part in (_outline, _head, _chest, _spine, _pelvis, _abdomen, _glands, _lesions):
        part(bld)
    return bld.ph
