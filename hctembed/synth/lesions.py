"""Acute intracranial haemorrhages for the synthetic head-CT generator.

One class per subtype, each defined in head-centred world millimetres (see :mod:`.anatomy`) and placed so
that it crosses the mid axial region (z about -10..+35 mm), where one axial slice shows it:

- :class:`ExtraAxialBleed` -- EDH (biconvex lens, compact, thick) or SDH (long thin crescent over one
  hemisphere, stops at the midline). Both sit directly under the inner skull, push the brain surface in
  and warp the deeper anatomy away from them (midline shift).
- :class:`ParenchymalBleed` -- IPH: irregular blob with an oedema rim, pushing the anatomy radially.
- :class:`VentricularBleed` -- IVH: blood layering in the dependent (posterior) part of the ventricles.
- :class:`SubarachnoidBleed` -- SAH: blood replacing the CSF in sulci over a region and in the cisterns.

Lesions act on arrays of points ``[N, 3]``; :func:`sample_lesion` draws one from a generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hctembed.errors import InputError

from .anatomy import PARENCHYMA, HeadAnatomy, Tissue

__all__ = [
    "SUBTYPES",
    "ExtraAxialBleed",
    "Lesion",
    "ParenchymalBleed",
    "SubarachnoidBleed",
    "VentricularBleed",
    "sample_lesion",
]

SUBTYPES: tuple[str, ...] = ("EDH", "SDH", "IPH", "IVH", "SAH")


@dataclass(frozen=True)
class Lesion:
    """Base class: a haemorrhage of one subtype with mean attenuation ``hu``."""

    kind: str
    hu: float

    @property
    def label(self) -> Tissue:
        return Tissue[self.kind]

    def warp(self, w: np.ndarray) -> np.ndarray:
        """Mass effect: map points ``[N, 3]`` to where their anatomy came from (identity by default)."""
        return w

    def thickness(self, u: np.ndarray) -> np.ndarray | None:
        """Extra-axial collections: thickness (mm) under the inner skull along directions ``u``."""
        return None

    def paint(self, *, anatomy: HeadAnatomy, p: np.ndarray, labels: np.ndarray, part: np.ndarray) -> None:
        """Intra-axial lesions: overwrite ``labels`` ``[N]`` in place at unwarped points ``p``."""


def _surface_point(anatomy: HeadAnatomy, u: np.ndarray, inset_mm: float) -> np.ndarray:
    """Head-centred point ``inset_mm`` below the outer surface along unit direction ``u`` ``[3]``."""
    axes = anatomy.axes.astype(np.float64)
    outer = u * axes * (1.0 + float(anatomy.shape_terms(u[None].astype(np.float32))[0]))
    normal = u / axes
    normal /= np.linalg.norm(normal)
    return outer - inset_mm * normal


def _direction(*, azimuth: float, z_mm: float, anatomy: HeadAnatomy) -> np.ndarray:
    """Unit direction (axis-normalised space) at azimuth ``azimuth`` (rad, 0 = +x) reaching height z."""
    sin_e = np.clip(z_mm / (anatomy.axes_mm[2] - 12.0), -0.9, 0.9)
    cos_e = np.sqrt(1.0 - sin_e**2)
    return np.array([cos_e * np.cos(azimuth), cos_e * np.sin(azimuth), sin_e])


def _inner_depth(anatomy: HeadAnatomy, u: np.ndarray) -> float:
    """Depth (mm) of the inner skull table below the outer surface along ``u`` ``[3]``."""
    scalp, skull, _ = anatomy.layer_thickness(u[None].astype(np.float32))
    return float(scalp[0] + skull[0])


@dataclass(frozen=True)
class ExtraAxialBleed(Lesion):
    """EDH or SDH: a collection between the inner skull and the brain.

    Its footprint on the skull is an ellipse around ``direction`` (half extents along ``up`` and ``side``,
    in mm of arc); thickness is ``thickness_mm * (1 - f) ** exponent`` where ``f`` is the squared
    normalised footprint distance (exponent 1 gives an EDH lens, < 1 a flatter SDH crescent).
    """

    direction: tuple[float, float, float]
    up: tuple[float, float, float]
    side_axis: tuple[float, float, float]
    half_extent_mm: tuple[float, float]
    radius_mm: float
    thickness_mm: float
    exponent: float
    side: int
    surface_mm: tuple[float, float, float]
    shift_mm: float

    def thickness(self, u: np.ndarray) -> np.ndarray:
        c, up, sd = (np.asarray(v, dtype=np.float32) for v in (self.direction, self.up, self.side_axis))
        along = u @ c
        a1 = np.arctan2(u @ up, along) * (self.radius_mm / self.half_extent_mm[0])
        a2 = np.arctan2(u @ sd, along) * (self.radius_mm / self.half_extent_mm[1])
        f = np.clip(1.0 - a1 * a1 - a2 * a2, 0.0, 1.0)
        t = self.thickness_mm * f**self.exponent
        if self.kind == "SDH":  # the falx stops it at the midline
            t *= np.clip((self.side * u[:, 0] - 0.04) / 0.12, 0.0, 1.0)
        return t.astype(np.float32)

    def warp(self, w: np.ndarray) -> np.ndarray:
        s = np.asarray(self.surface_mm, dtype=np.float32)
        inward = -s / np.linalg.norm(s)
        sigma = max(self.half_extent_mm)
        d2 = np.einsum("ij,ij->i", w - s, w - s)
        return w - (self.shift_mm * np.exp(-d2 / (2.0 * sigma**2)))[:, None] * inward


@dataclass(frozen=True)
class ParenchymalBleed(Lesion):
    """IPH: blob of radius ``radius_mm`` (perturbed by the anatomy's fold field) with an oedema rim."""

    center_mm: tuple[float, float, float]
    radius_mm: float
    rim_mm: float
    field_offset_mm: tuple[float, float, float]

    def _distance(self, anatomy: HeadAnatomy, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = p - np.asarray(self.center_mm, dtype=np.float32)
        rho = np.sqrt(np.einsum("ij,ij->i", d, d))
        bumpy = anatomy.fold(d * 1.2 + np.asarray(self.field_offset_mm, dtype=np.float32))
        radius = self.radius_mm * np.clip(1.0 + 0.22 * bumpy, 0.6, 1.4)
        return rho, radius

    def warp(self, w: np.ndarray) -> np.ndarray:
        c = np.asarray(self.center_mm, dtype=np.float32)
        d = w - c
        rho = np.sqrt(np.einsum("ij,ij->i", d, d)) + np.float32(1e-6)
        src = np.cbrt(np.maximum(rho**3 - 0.5 * self.radius_mm**3, 0.0))
        return c + d * (src / rho)[:, None]

    def paint(self, *, anatomy: HeadAnatomy, p: np.ndarray, labels: np.ndarray, part: np.ndarray) -> None:
        c = np.asarray(self.center_mm, dtype=np.float32)
        reach = 1.4 * self.radius_mm + 1.3 * self.rim_mm
        idx = np.flatnonzero(np.all(np.abs(p - c) < reach, axis=1))
        if idx.size == 0:
            return
        rho, radius = self._distance(anatomy, p[idx])
        sub = labels[idx]
        rim = self.rim_mm * (1.0 + 0.3 * anatomy.fold(p[idx] * 1.5))
        sub[(rho < radius + rim) & np.isin(sub, PARENCHYMA)] = Tissue.OEDEMA
        sub[rho < radius] = Tissue.IPH
        labels[idx] = sub


@dataclass(frozen=True)
class VentricularBleed(Lesion):
    """IVH: blood in ventricle parts ``parts`` (1 left, 2 right, 3 third) where y < ``level_y_mm``."""

    parts: tuple[int, ...]
    level_y_mm: float
    third_level_y_mm: float

    def paint(self, *, anatomy: HeadAnatomy, p: np.ndarray, labels: np.ndarray, part: np.ndarray) -> None:
        lateral = np.isin(part, [k for k in self.parts if k != 3]) & (p[:, 1] < self.level_y_mm)
        third = (part == 3) & (p[:, 1] < self.third_level_y_mm) if 3 in self.parts else False
        labels[(lateral | third) & (labels != Tissue.CALCIFICATION)] = Tissue.IVH


@dataclass(frozen=True)
class SubarachnoidBleed(Lesion):
    """SAH: blood replacing sulcal/surface CSF within ``radius_mm`` of ``center_mm`` and, if ``cisterns``,
    the basal cisterns and the Sylvian fissures on ``sylvian_sides`` (-1 left, +1 right)."""

    center_mm: tuple[float, float, float]
    radius_mm: float
    cisterns: bool
    sylvian_sides: tuple[int, ...]

    def paint(self, *, anatomy: HeadAnatomy, p: np.ndarray, labels: np.ndarray, part: np.ndarray) -> None:
        csf = np.flatnonzero(labels == Tissue.CSF)
        d = p[csf] - np.asarray(self.center_mm, dtype=np.float32)
        reach = self.radius_mm * (1.0 + 0.25 * anatomy.fold(p[csf] * 0.8))
        labels[csf[np.einsum("ij,ij->i", d, d) < reach**2]] = Tissue.SAH
        if self.cisterns:
            cis = np.flatnonzero(labels == Tissue.CISTERN)
            x = p[cis, 0]
            keep = np.abs(x) < 16.0
            for s in self.sylvian_sides:
                keep |= s * x >= 16.0
            labels[cis[keep]] = Tissue.SAH


def sample_lesion(*, kind: str, anatomy: HeadAnatomy, rng: np.random.Generator, scale: float = 1.0) -> Lesion:
    """Draw one haemorrhage of subtype ``kind`` (one of :data:`SUBTYPES`) for ``anatomy``. ``scale`` multiplies its
    linear size (EDH/SDH extent and thickness, IPH radius and oedema rim, SAH reach; IVH fills the ventricles it is
    in, unscaled); the random draws are the same whatever the scale, so 1.0 gives the default archive bit for bit."""
    if not 0.1 <= scale <= 4.0:
        raise InputError(f"lesion scale must be from 0.1 to 4, not {scale}")
    u = rng.uniform
    side = int(rng.choice([-1, 1]))
    lateral = 0.0 if side > 0 else np.pi
    if kind in ("EDH", "SDH"):
        edh = kind == "EDH"
        tilt = np.deg2rad(u(-60.0, 60.0) if edh else u(-30.0, 30.0))
        direction = _direction(
            azimuth=lateral + side * tilt, z_mm=u(5.0, 25.0) if edh else u(10.0, 30.0), anatomy=anatomy
        )
        up = np.array([0.0, 0.0, 1.0]) - direction[2] * direction
        up /= np.linalg.norm(up)
        surface = _surface_point(anatomy, direction, _inner_depth(anatomy, direction))
        half = (u(20.0, 30.0), u(22.0, 35.0)) if edh else (u(45.0, 60.0), u(45.0, 70.0))
        half = (half[0] * scale, half[1] * scale)
        thick = (u(10.0, 20.0) if edh else u(4.0, 12.0)) * scale
        return ExtraAxialBleed(
            kind=kind,
            hu=u(60.0, 76.0),
            direction=tuple(float(v) for v in direction),
            up=tuple(float(v) for v in up),
            side_axis=tuple(float(v) for v in np.cross(direction, up)),
            half_extent_mm=half,
            radius_mm=float(np.linalg.norm(surface)),
            thickness_mm=thick,
            exponent=1.0 if edh else 0.45,
            side=side,
            surface_mm=tuple(float(v) for v in surface),
            shift_mm=(0.45 if edh else 0.6) * thick,
        )
    if kind == "IPH":
        return _sample_iph(anatomy=anatomy, rng=rng, side=side, scale=scale)
    if kind == "IVH":
        s = anatomy.vent_scale
        parts = [(1,), (2,), (1, 2)][int(rng.choice(3, p=[0.3, 0.3, 0.4]))]
        if rng.random() < 0.4:
            parts = (*parts, 3)
        half_len = 40.0 * s**0.3
        return VentricularBleed(
            kind=kind,
            hu=u(58.0, 75.0),
            parts=parts,
            level_y_mm=anatomy.vent_y0_mm + half_len * u(-0.5, 0.05),
            third_level_y_mm=anatomy.vent_y0_mm + u(-8.0, 6.0),
        )
    if kind == "SAH":
        azimuth = lateral + side * np.deg2rad(u(-70.0, 70.0))
        direction = _direction(azimuth=azimuth, z_mm=u(5.0, 30.0), anatomy=anatomy)
        surface = _surface_point(anatomy, direction, _inner_depth(anatomy, direction) + anatomy.csf_mm)
        cisterns = bool(rng.random() < 0.7)
        sylvian = [(-1,), (1,), (-1, 1)][int(rng.choice(3))]
        return SubarachnoidBleed(
            kind=kind,
            hu=u(58.0, 75.0),
            center_mm=tuple(float(v) for v in surface),
            radius_mm=u(28.0, 45.0) * scale,
            cisterns=cisterns,
            sylvian_sides=sylvian,
        )
    raise InputError(f"unknown haemorrhage subtype {kind!r}; expected one of {SUBTYPES}")


def _sample_iph(*, anatomy: HeadAnatomy, rng: np.random.Generator, side: int, scale: float) -> ParenchymalBleed:
    """Rejection-sample an IPH centre deep enough in the parenchyma for its radius and rim."""
    u = rng.uniform
    radius, rim = u(6.0, 20.0) * scale, u(3.0, 8.0) * scale
    offset = tuple(float(v) for v in rng.uniform(-40.0, 40.0, size=3))
    center = np.zeros(3)
    for attempt in range(200):
        center = np.array([side * u(14.0, 42.0), u(-40.0, 38.0), u(0.0, 28.0)])
        _, _, cavity, _ = anatomy.render_head(center[None].astype(np.float32))
        part = anatomy.ventricle_parts(center[None].astype(np.float32))
        depth = (float(cavity[0]) if cavity.size else -1.0) - anatomy.csf_mm
        if depth >= 1.4 * radius + rim + 4.0 and part[0] == 0:
            break
        if attempt % 20 == 19:
            radius = max(6.0 * scale, 0.85 * radius)
    return ParenchymalBleed(
        kind="IPH",
        hu=u(60.0, 78.0),
        center_mm=tuple(float(v) for v in center),
        radius_mm=radius,
        rim_mm=rim,
        field_offset_mm=offset,
    )
