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
