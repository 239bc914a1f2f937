"""Synthetic chest and abdominal CT (HU ``[Z, Y, X]``, 1.5 mm pixels) for the head check: what an archive
export mixes in with head CT. Coarse anatomy, but the features a head test could be fooled by are there:
ribs and scapulae around the chest, lung inside; spine, lower ribs and fat around the abdomen."""

from __future__ import annotations

import numpy as np

PIXEL_MM = 1.5


def _ellipse(yy, xx, *, cy, cx, ry, rx) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def body_slices(kind: str, *, n: int = 24, width_cm: float = 34.0, depth_cm: float = 24.0, seed: int = 0) -> np.ndarray:
    """``n`` axial slices of a ``kind`` ("chest" or "abdomen") ``width_cm`` wide and ``depth_cm`` deep."""
    rng = np.random.default_rng(seed)
    size = int((width_cm + 8) * 10 / PIXEL_MM)
    yy, xx = np.mgrid[0:size, 0:size] * PIXEL_MM / 10.0  # cm
    c = size * PIXEL_MM / 20.0
    rx, ry = width_cm / 2, depth_cm / 2
    out = np.full((n, size, size), -1000.0, np.float32)
    for z in range(n):
        sl = out[z]
        body = _ellipse(yy, xx, cy=c, cx=c, ry=ry, rx=rx)
        sl[body] = -100.0  # subcutaneous fat
        muscle = _ellipse(yy, xx, cy=c, cx=c, ry=ry - 1.5, rx=rx - 1.5)
        sl[muscle] = 45.0
        spine = _ellipse(yy, xx, cy=c + ry - 5, cx=c, ry=1.8, rx=1.8)
        if kind == "chest":
            for side in (-1, 1):
                sl[_ellipse(yy, xx, cy=c - 0.5, cx=c + side * rx * 0.45, ry=ry * 0.7, rx=rx * 0.38)] = -850.0
                scapula = _ellipse(yy, xx, cy=c + ry - 4, cx=c + side * rx * 0.55, ry=0.6, rx=5.0)
                sl[scapula] = 700.0
            sl[_ellipse(yy, xx, cy=c - 1, cx=c - 1.5, ry=5, rx=5.5)] = 40.0  # heart
            sl[_ellipse(yy, xx, cy=c - ry + 2.3, cx=c, ry=0.6, rx=1.2)] = 600.0  # sternum
            for k in range(20):  # rib sections around the ribcage, 2-4 cm long
                a = 2 * np.pi * k / 20 + rng.normal(0, 0.05)
                py, px = c + (ry - 2.3) * np.sin(a), c + (rx - 2.3) * np.cos(a)
                long = rng.uniform(1.0, 2.0)
                half_y, half_x = 0.6 + long * abs(np.cos(a)) * 0.5, 0.6 + long * abs(np.sin(a)) * 0.5
                sl[_ellipse(yy, xx, cy=py, cx=px, ry=half_y, rx=half_x)] = 650.0
        else:
            sl[_ellipse(yy, xx, cy=c - 1, cx=c - rx * 0.35, ry=ry * 0.45, rx=rx * 0.35)] = 60.0  # liver
            for side in (-1, 1):
                sl[_ellipse(yy, xx, cy=c + ry * 0.35, cx=c + side * rx * 0.35, ry=2.5, rx=1.8)] = 35.0  # kidneys
            fat = _ellipse(yy, xx, cy=c, cx=c + rx * 0.2, ry=ry * 0.5, rx=rx * 0.4) & (rng.random(sl.shape) < 0.5)
            sl[fat] = -90.0  # visceral fat between the bowel loops
            for k in range(6):  # the lowest ribs, laterally
                a = np.pi * (0.75 + 0.1 * k) if k < 3 else np.pi * (0.05 + 0.1 * (k - 3))
                py, px = c + (ry - 2.3) * np.sin(a), c + (rx - 2.3) * np.cos(a)
                sl[_ellipse(yy, xx, cy=py, cx=px, ry=0.7, rx=0.7)] = 650.0
        sl[spine] = 700.0
        sl += rng.normal(0, 8, sl.shape).astype(np.float32)
    return out


# -- the labelled set of the head check (tests/test_head_check.py): volumes HU [Z, Y, X] and their spacing ------


def _grid(shape_zyx, spacing_zyx):
    """Voxel centres in mm, centred on the volume: (zz, yy, xx) each ``shape_zyx``."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape_zyx, spacing_zyx, strict=True)]
    return np.meshgrid(*axes, indexing="ij")


def _finish(hu: np.ndarray, *, seed: int, noise: float = 6.0) -> np.ndarray:
    return (hu + np.random.default_rng(seed).normal(0, noise, hu.shape)).astype(np.float32)


def pelvis(*, child: bool = False, seed: int = 0) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A pelvis: skin and fat, muscles, a bony ring (iliac wings, sacrum, pubis; femoral heads low down) around
    bladder, bowel (3 % gas) and muscle. Adult 36 x 24 cm with a 24 x 18 cm ring; child 24 x 18 cm with a
    17 x 13 cm ring."""
    scale = 0.7 if child else 1.0
    spacing = (4.0, 1.5, 1.5)
    shape = (30, int(400 * scale / 1.5), int(400 * scale / 1.5))
    zz, yy, xx = _grid(shape, spacing)
    rng = np.random.default_rng(seed)
    bx, by = 180 * scale * (0.95 if child else 1.0), 120 * scale * (1.05 if child else 1.0)  # body semi-axes, mm
    rx, ry = (85.0, 65.0) if child else (120.0, 90.0)  # the bony ring's semi-axes
    hu = np.full(shape, -1000.0)
    body = (xx / bx) ** 2 + (yy / by) ** 2 <= 1
    hu[body] = -100.0  # subcutaneous fat
    hu[(xx / (bx - 15 * scale)) ** 2 + (yy / (by - 15 * scale)) ** 2 <= 1] = 50.0  # muscle (glutei, iliopsoas)
    r = np.sqrt((xx / rx) ** 2 + (yy / ry) ** 2)
    thick = 6.0 / rx if child else 9.0 / rx
    low = zz < -20  # the lower half: pubis in front, femoral heads at the sides
    ring = (r > 1 - thick) & (r <= 1)
    angle = np.degrees(np.arctan2(yy, xx))  # y grows to the back here: sacrum at +90
    wings = ring & ((np.abs(angle) < 70) | (np.abs(angle) > 110)) & (yy > -0.3 * ry)  # iliac wings, no front
    hu[wings & ~low] = 700.0
    hu[low & ring & (yy < -0.5 * ry)] = 700.0  # pubic rami
    sacrum = ((xx / (0.22 * rx)) ** 2 + ((yy - 0.85 * ry) / (0.18 * ry)) ** 2 <= 1) & ~low
    hu[sacrum] = 600.0
    for side in (-1, 1):  # femoral heads
        hu[low & ((xx - side * 0.95 * rx) ** 2 + yy**2 + (zz + 45) ** 2 <= (22 * scale) ** 2)] = 650.0
    inside = r < 1 - thick
    bladder = ((xx / (0.4 * rx)) ** 2 + ((yy + 0.45 * ry) / (0.35 * ry)) ** 2 + ((zz + 20) / 40) ** 2) <= 1
    hu[inside & bladder] = 10.0
    gas = inside & ~bladder & (rng.random(shape) < 0.03)
    hu[gas] = -900.0
    hu[inside & ~bladder & ~gas & (rng.random(shape) < 0.05)] = -90.0  # a little fat between the loops
    return _finish(hu, seed=seed), spacing


def knee(*, seed: int = 0) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A knee slab: thigh-sized leg (13 x 12 cm) with the femur's condyles (cortex around fatty marrow), the
    patella in front, muscles, tendons and fat."""
    spacing = (2.0, 0.8, 0.8)
    shape = (40, 200, 200)
    _, yy, xx = _grid(shape, spacing)
    hu = np.full(shape, -1000.0)
    hu[(xx / 65) ** 2 + (yy / 60) ** 2 <= 1] = -100.0
    hu[(xx / 55) ** 2 + (yy / 50) ** 2 <= 1] = 50.0
    for side in (-1, 1):  # two condyles
        condyle = ((xx - side * 18) / 22) ** 2 + ((yy - 5) / 25) ** 2
        hu[condyle <= 1] = 900.0
        hu[condyle <= 0.75] = -60.0  # marrow
    hu[((yy + 45) / 7) ** 2 + (xx / 20) ** 2 <= 1] = 800.0  # patella
    return _finish(hu, seed=seed), spacing


def cylinder(*, rods: bool = False, seed: int = 0) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A water cylinder of 20 cm (acrylic wall), as a CT quality-control phantom; ``rods``: four bone-density
    inserts."""
    spacing = (5.0, 1.0, 1.0)
    shape = (24, 260, 260)
    _, yy, xx = _grid(shape, spacing)
    r = np.sqrt(xx**2 + yy**2)
    hu = np.full(shape, -1000.0)
    hu[r <= 100] = 120.0
    hu[r <= 95] = 0.0
    if rods:
        for a in (0, 90, 180, 270):
            cy, cx = 50 * np.sin(np.radians(a)), 50 * np.cos(np.radians(a))
            hu[(yy - cy) ** 2 + (xx - cx) ** 2 <= 8**2] = 1000.0
    return _finish(hu, seed=seed), spacing


def _head(zz, yy, xx, *, axes_mm, skull_mm, scalp_mm, brain_hu=32.0, fontanelle=False, vessels=False):
    """HU of an ellipsoid head centred at 0 with semi-axes ``axes_mm`` (z, y, x), in -1000 air."""
    az, ay, ax = axes_mm
    mean_axis = (az * ay * ax) ** (1 / 3)
    r = np.sqrt((zz / az) ** 2 + (yy / ay) ** 2 + (xx / ax) ** 2)
    hu = np.full(zz.shape, -1000.0)
    hu[r <= 1] = 40.0  # scalp
    skull = (r <= 1 - scalp_mm / mean_axis) & (r > 1 - (scalp_mm + skull_mm) / mean_axis)
    hu[skull] = 1100.0
    brain = r <= 1 - (scalp_mm + skull_mm) / mean_axis
    hu[brain] = brain_hu
    hu[brain & (r < 0.55)] = brain_hu + 6  # grey-white contrast, roughly
    if fontanelle:  # the anterior fontanelle: no bone at the top front
        hu[skull & (zz > 0.6 * az) & (yy < 0) & (np.abs(xx) < 0.3 * ax)] = 40.0
    if vessels:  # contrast-filled arteries inside the skull (CTA)
        hu[brain & ((np.abs(xx) < 3) | (np.abs(yy + 10) < 2)) & (np.abs(zz + 0.3 * az) < 3)] = 350.0
    return hu


def infant_head(*, neonate: bool = False, seed: int = 0) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A neonate's (11 x 13 cm, 1.5 mm skull) or infant's (14 x 16 cm, 2.5 mm skull) head, with an open
    anterior fontanelle, a thin scalp and brain of high water content."""
    spacing = (2.0, 0.5, 0.5)
    axes = (50.0, 65.0, 55.0) if neonate else (62.0, 80.0, 70.0)
    shape = (int(2 * axes[0] / 2.0) + 10, int(2 * axes[1] / 0.5) + 40, int(2 * axes[2] / 0.5) + 40)
    zz, yy, xx = _grid(shape, spacing)
    hu = _head(zz, yy, xx, axes_mm=axes, skull_mm=1.5 if neonate else 2.5, scalp_mm=2.5, brain_hu=22.0,
               fontanelle=True)  # fmt: skip
    return _finish(hu, seed=seed), spacing


def cta_head_neck(*, seed: int = 0) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A CT angiogram from the aortic arch to the vertex (350 mm): the head at the top end (contrast in its
    arteries), the neck (vertebra, carotids, trachea, muscles), and the top of the chest (lungs, the arch) at
    the bottom, cut by a 250 mm field of view."""
    spacing = (2.5, 1.0, 1.0)
    shape = (140, 250, 250)
    zz, yy, xx = _grid(shape, spacing)
    z_top = zz.max()
    hz = zz - (z_top - 95)  # the head's centre 95 mm below the vertex
    hu = _head(hz, yy, xx, axes_mm=(95.0, 95.0, 75.0), skull_mm=7.0, scalp_mm=5.0, vessels=True)
    face = (zz < z_top - 115) & (zz >= z_top - 150)  # below the skull base: face, sinuses, mandible
    r_face = (xx / 68) ** 2 + ((yy + 5) / 88) ** 2
    hu[face] = -1000.0
    hu[face & (r_face <= 1)] = 50.0
    hu[face & (r_face <= 1) & (r_face > 0.85) & (yy < 0)] = 900.0  # maxilla and mandible, in front
    hu[face & (((xx / 30) ** 2 + ((yy - 40) / 25) ** 2) <= 1)] = 800.0  # skull base and upper spine, behind
    for side in (-1, 1):
        hu[face & ((((xx - side * 22) / 14) ** 2 + ((yy + 35) / 16) ** 2) <= 1)] = -1000.0  # maxillary sinuses
    neck = (zz < z_top - 150) & (zz >= z_top - 290)
    r_neck = (xx / 60) ** 2 + ((yy - 5) / 62) ** 2
    hu[neck & (r_neck <= 1)] = -100.0
    hu[neck & (r_neck <= 0.8)] = 50.0
    hu[neck & ((xx**2 + (yy - 25) ** 2) <= 15**2)] = 700.0  # vertebra
    hu[neck & ((xx**2 + (yy - 25) ** 2) <= 7**2)] = 30.0  # the cord in its canal
    hu[neck & ((xx**2 + (yy + 25) ** 2) <= 8**2)] = -1000.0  # trachea
    for side in (-1, 1):
        hu[neck & (((xx - side * 25) ** 2 + (yy + 10) ** 2) <= 4**2)] = 350.0  # carotids
    chest = zz < z_top - 290
    r_chest = (xx / 170) ** 2 + (yy / 110) ** 2
    hu[chest & (r_chest <= 1)] = -100.0
    hu[chest & (r_chest <= 0.85)] = 45.0
    for side in (-1, 1):
        hu[chest & (((xx - side * 70) / 55) ** 2 + (yy / 70) ** 2 <= 1)] = -850.0  # lungs
    hu[chest & ((xx**2 + (yy + 10) ** 2) <= 15**2)] = 350.0  # the arch
    return _finish(hu, seed=seed), spacing
