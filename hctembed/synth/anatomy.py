"""Analytic head anatomy for the synthetic head-CT generator.

Everything here is defined in head-centred world millimetres (RAS: +x right, +y anterior, +z superior)
and evaluated point-wise, so the same patient imaged on any voxel grid (spacing, rotation, slice
thickness) shows the same anatomy. Points are arrays of shape ``[N, 3]``; per-point results are ``[N]``.

The head is an ellipsoid with small random asymmetries. Layers are measured by an approximate distance
below its outer surface: scalp (with a thin fat layer), skull (cortical tables around a lower-density
diploe), a thin CSF layer, a cortical grey-matter band folded into sulci, and white matter. A tilted
skull-base plate closes the cranial cavity from below; neck soft tissue hangs underneath it. Deep
structures (lateral and third ventricles, deep grey nuclei, brainstem, basal cisterns, Sylvian fissures,
interhemispheric fissure and falx) are simple implicit shapes. Small-scale irregularity comes from smooth
random fields on coarse grids (:class:`SmoothField`), sampled by trilinear interpolation.

Rendering produces :class:`Tissue` labels; :meth:`TissueHU.table` turns labels into Hounsfield units.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from .fields import SmoothField, sulcus_distance

__all__ = ["INTRACRANIAL", "PARENCHYMA", "HeadAnatomy", "Tissue", "TissueHU", "sample_anatomy"]

#: Radius (mm) of the reference sphere onto which brain points are projected to evaluate sulci.
_SULCUS_SPHERE_MM = 80.0
#: How much the sulcal field varies with depth relative to along the surface (0 = perfectly radial sulci).
_SULCUS_RADIAL = 0.55


class Tissue(IntEnum):
    """Voxel labels produced by the renderer (uint8)."""

    AIR = 0
    SOFT = 1
    FAT = 2
    BONE_CORTICAL = 3
    BONE_DIPLOE = 4
    CSF = 5  # extra-axial CSF layer, sulci, interhemispheric fissure
    CISTERN = 6  # basal cisterns and Sylvian fissures
    VENTRICLE = 7
    GREY = 8
    WHITE = 9
    DEEP_GREY = 10
    BRAINSTEM = 11
    FALX = 12
    CALCIFICATION = 13
    OEDEMA = 14
    EDH = 20
    SDH = 21
    IPH = 22
    IVH = 23
    SAH = 24


#: Labels that count as brain parenchyma.
PARENCHYMA = (Tissue.GREY, Tissue.WHITE, Tissue.DEEP_GREY, Tissue.BRAINSTEM)
#: Labels inside the cranial cavity (everything intracranial that is not blood).
INTRACRANIAL = (*PARENCHYMA, Tissue.CSF, Tissue.CISTERN, Tissue.VENTRICLE, Tissue.FALX, Tissue.CALCIFICATION)


@dataclass(frozen=True)
class TissueHU:
    """Per-patient mean attenuation (HU) of each normal tissue, plus lesion values set by the lesions."""

    soft: float
    fat: float
    cortical: float
    diploe: float
    csf: float
    grey: float
    white: float
    falx: float
    calcification: float
    oedema: float

    def table(self, lesion_hu: dict[Tissue, float]) -> np.ndarray:
        """Lookup table ``[256]`` float32 from :class:`Tissue` label to HU."""
        lut = np.zeros(256, dtype=np.float32)
        values = {
            Tissue.AIR: -1000.0,
            Tissue.SOFT: self.soft,
            Tissue.FAT: self.fat,
            Tissue.BONE_CORTICAL: self.cortical,
            Tissue.BONE_DIPLOE: self.diploe,
            Tissue.CSF: self.csf,
            Tissue.CISTERN: self.csf,
            Tissue.VENTRICLE: self.csf,
            Tissue.GREY: self.grey,
            Tissue.WHITE: self.white,
            Tissue.DEEP_GREY: self.grey - 2.0,
            Tissue.BRAINSTEM: self.white + 2.0,
            Tissue.FALX: self.falx,
            Tissue.CALCIFICATION: self.calcification,
            Tissue.OEDEMA: self.oedema,
            **lesion_hu,
        }
        for label, hu in values.items():
            lut[int(label)] = hu
        return lut

    @staticmethod
    def texture_table() -> np.ndarray:
        """Amplitude ``[256]`` float32 (HU per unit of the texture field) of tissue heterogeneity."""
        amp = np.zeros(256, dtype=np.float32)
        for label, a in {
            Tissue.SOFT: 2.0,
            Tissue.FAT: 6.0,
            Tissue.BONE_CORTICAL: 120.0,
            Tissue.BONE_DIPLOE: 90.0,
            Tissue.GREY: 1.2,
            Tissue.WHITE: 1.2,
            Tissue.DEEP_GREY: 1.2,
            Tissue.BRAINSTEM: 1.2,
            Tissue.OEDEMA: 1.5,
            Tissue.EDH: 3.0,
            Tissue.SDH: 2.0,
            Tissue.IPH: 3.0,
            Tissue.IVH: 2.0,
            Tissue.SAH: 2.0,
        }.items():
            amp[int(label)] = a
        return amp


@dataclass(frozen=True, eq=False)
class HeadAnatomy:
    """Random shape parameters of one synthetic head (mm, head-centred unless stated)."""

    center_mm: tuple[float, float, float]  # world position of the head centre
    axes_mm: tuple[float, float, float]  # outer semi-axes (x, y, z)
    asymmetry: tuple[float, ...]  # coefficients of low-order shape terms
    scalp_mm: float
    skull_mm: float
    cortical_mm: float
    base_z0_mm: float  # top of the skull-base plate at y = 0
    base_slope: float  # dz/dy of the skull base (anterior fossa higher)
    base_mm: float  # skull-base plate thickness
    csf_mm: float  # CSF layer between inner skull and brain
    grey_mm: float  # cortical ribbon thickness
    sulcus_depth_mm: float
    sulcus_halfwidth_mm: float
    fissure_halfwidth_mm: float
    vent_y0_mm: float  # lateral-ventricle centre (y)
    vent_z0_mm: float  # lateral-ventricle body centre (z)
    vent_scale: float
    choroid_calcified: bool
    sinus_mm: float  # frontal bone thickening around the frontal sinus (0 = no sinus)
    sinus_uz: float  # height of the frontal sinus (z of its unit direction)
    hu: TissueHU
    fold: SmoothField  # ~6 mm correlation: cortex thickness, IPH outline
    sulci: SmoothField  # approximate signed distance (mm) to sulcal sheets, on the projection sphere
    texture: SmoothField  # ~2.5 mm correlation tissue heterogeneity

    @property
    def axes(self) -> np.ndarray:
        return np.asarray(self.axes_mm, dtype=np.float32)

    def shape_terms(self, u: np.ndarray) -> np.ndarray:
        """Relative radial perturbation of the outer surface along unit directions ``u`` ``[N, 3]``."""
        x, y, z = u[:, 0], u[:, 1], u[:, 2]
        a = self.asymmetry
        return a[0] * x + a[1] * x * y + a[2] * y * z + a[3] * x * z + a[4] * (x * x - y * y) + a[5] * y

    def outer_geometry(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For head-centred points ``p`` ``[N, 3]``: unit directions ``[N, 3]`` in axis-normalised space,
        approximate depth below the outer surface (mm, negative outside) and height above the skull base
        top (mm) -- all float32."""
        axes = self.axes
        n = p / axes
        rho = np.sqrt(np.einsum("ij,ij->i", n, n)) + np.float32(1e-6)
        u = n / rho[:, None]
        ua = u / axes
        grad = np.sqrt(np.einsum("ij,ij->i", ua, ua))  # |d rho / d p|
        depth = (1.0 + self.shape_terms(u) - rho) / grad
        cos_base = np.float32(1.0 / np.hypot(1.0, self.base_slope))
        base_top = np.float32(self.base_slope) * p[:, 1] + np.float32(self.base_z0_mm)
        above_base = (p[:, 2] - base_top) * cos_base
        return u, depth, above_base

    def layer_thickness(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scalp and skull thickness (mm) along unit directions ``u`` ``[N, 3]``, and the frontal-sinus
        weight in [0, 1] (where the frontal bone thickens around an air cell)."""
        x2 = u[:, 0] * u[:, 0]
        x4 = x2 * x2
        temporal = x4 * np.exp(-(((u[:, 2] + 0.05) / 0.35) ** 2))
        scalp = self.scalp_mm + 5.0 * temporal  # temporalis muscle
        skull = self.skull_mm * (1.0 - 0.1 * x4) + 1.0 * u[:, 1] * u[:, 1]
        sinus = np.zeros_like(scalp)
        if self.sinus_mm > 0:
            front = np.flatnonzero((u[:, 1] > 0.6) & (np.abs(u[:, 2] - self.sinus_uz) < 0.35))
            sub = u[front]
            sinus[front] = np.exp(-((sub[:, 0] / 0.2) ** 2) - ((sub[:, 2] - self.sinus_uz) / 0.1) ** 2)
            skull += self.sinus_mm * sinus
        return scalp.astype(np.float32), skull.astype(np.float32), sinus

    def render_head(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Labels of extracranial tissue at head-centred points ``p`` ``[N, 3]``.

        Returns ``(labels [N] uint8, cavity_idx [M], cavity_depth [M] float32, cavity_dirs [M, 3])`` for
        the ``M`` points inside the cranial cavity, which are left labelled AIR for :meth:`render_brain`:
        their distance (mm) below the inner skull / skull-base surface and their unit directions.
        """
        labels = np.zeros(len(p), dtype=np.uint8)
        n = p / self.axes
        near = np.flatnonzero(np.einsum("ij,ij->i", n, n) < 1.15**2)  # cheap bound on the head
        u, depth, above_base = self.outer_geometry(p[near])
        scalp, skull, sinus = self.layer_thickness(u)
        below = -(above_base + self.base_mm)  # distance below the skull-base plate
        depth = depth - 30.0 * np.clip(below / 50.0, 0.0, 1.0) ** 2  # neck narrower than the skull
        inner = depth - scalp - skull
        cavity = np.minimum(inner, above_base)
        inside = depth > 0
        sub = np.where(inside, np.uint8(Tissue.SOFT), np.uint8(Tissue.AIR))
        sub[inside & (depth > 0.3 * scalp) & (depth < 0.6 * scalp)] = Tissue.FAT
        bone = inside & (depth >= scalp) & (cavity < 0) & (below <= 0)
        shell_dist = np.where(inner < 0, np.minimum(depth - scalp, -inner), 0.0)
        base_dist = np.where(above_base < 0, np.minimum(-above_base, self.base_mm + above_base), 0.0)
        bone_dist = np.maximum(shell_dist, base_dist)
        sub[bone] = Tissue.BONE_CORTICAL
        sub[bone & (bone_dist > self.cortical_mm)] = Tissue.BONE_DIPLOE
        sub[bone & (sinus > 0.3) & (bone_dist > self.cortical_mm + 0.5)] = Tissue.AIR
        in_cavity = inside & (below <= 0) & (cavity >= 0)
        sub[in_cavity] = Tissue.AIR
        labels[near] = sub
        # The brain rests on the skull base: barely any CSF below it (a thick band on the tilted plate).
        depth_in = np.minimum(inner, above_base + 0.7 * self.csf_mm)[in_cavity]
        return labels, near[in_cavity], depth_in, u[in_cavity]

    def ventricle_parts(self, w: np.ndarray) -> np.ndarray:
        """Ventricle part at (warped) head-centred points ``w`` ``[N, 3]``: 0 none, 1 left lateral,
        2 right lateral, 3 third ventricle -> ``[N]`` int8."""
        s = self.vent_scale
        rel = w - np.array([0.0, self.vent_y0_mm, self.vent_z0_mm], dtype=np.float32)
        bounds = np.abs(rel + np.float32([0.0, 0.0, 6.5])) < np.float32([30.0, 46.0, 20.5])
        box = np.flatnonzero(bounds.all(axis=1))  # only points near the ventricles need the full test
        x, y, z = rel[box, 0], rel[box, 1], rel[box, 2]
        half_len = 40.0 * s**0.3
        t = y / half_len
        width = (3.8 + 1.6 * np.clip(-t, 0, 1)) * s  # atria wider than frontal horns
        medial = 1.2 + 0.5 * s
        xc = medial + width + 10.0 * t * t  # frontal and occipital horns diverge
        zc = 2.0 - 10.0 * t * t  # arched body
        h = 7.5 * s**0.7
        base = ((z - zc) / h) ** 2 + t**4
        sub = np.zeros(len(box), dtype=np.int8)
        sub[((x - xc) / width) ** 2 + base < 1.0] = 2
        sub[((x + xc) / width) ** 2 + base < 1.0] = 1
        sub[(x / (1.6 * s)) ** 2 + ((y + 2.0) / 14.0) ** 2 + ((z + 17.0) / 8.0) ** 2 < 1.0] = 3
        part = np.zeros(len(w), dtype=np.int8)
        part[box] = sub
        return part

    def render_brain(
        self,
        *,
        w: np.ndarray,
        depth: np.ndarray,
        effaced: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Labels inside the cranial cavity.

        ``w`` ``[N, 3]``: head-centred points after any mass-effect warp; ``depth`` ``[N]``: distance (mm)
        below the (possibly lesion-displaced) cavity surface; ``effaced`` ``[N]`` in [0, 1]: how much the
        surface CSF and sulci are compressed. Returns ``(labels [N] uint8, ventricle part [N] int8)``.
        """
        n = len(w)
        brain_depth = depth - self.csf_mm * (1.0 - effaced)
        labels = np.full(n, Tissue.WHITE, dtype=np.uint8)
        fold = self.fold(w)
        grey_mm = self.grey_mm * (1.0 + 0.25 * fold)
        labels[brain_depth < grey_mm] = Tissue.GREY

        # Sulci: sheets where a random field on the projection sphere crosses zero, so that they run
        # radially in from the brain surface; lined by cortex, wider near the surface.
        sdepth = self.sulcus_depth_mm * (1.0 + 0.2 * fold)
        cortex = np.flatnonzero(brain_depth < sdepth + grey_mm)
        wc, bd, sd, gm = w[cortex], brain_depth[cortex], sdepth[cortex], grey_mm[cortex]
        nrm = wc / self.axes
        rho = np.sqrt(np.einsum("ij,ij->i", nrm, nrm)) + np.float32(1e-6)
        proj = nrm * (_SULCUS_SPHERE_MM * (1.0 + _SULCUS_RADIAL * (rho - 1.0)) / rho)[:, None]
        dist = np.abs(self.sulci(proj))
        half = self.sulcus_halfwidth_mm * (0.5 + np.clip(1.0 - bd / sd, 0.0, 1.0)) * (1.0 - effaced[cortex])
        sub = labels[cortex]
        sub[dist < half + gm] = Tissue.GREY
        sub[(dist < half) & (bd < sd)] = Tissue.CSF
        labels[cortex] = sub
        labels[brain_depth < 0] = Tissue.CSF

        self._deep_structures(w, brain_depth, labels)
        part = self.ventricle_parts(w)
        labels[part > 0] = Tissue.VENTRICLE
        if self.choroid_calcified:
            s = self.vent_scale
            for side in (-1.0, 1.0):
                c = np.array([side * (9.0 + 6.0 * s), self.vent_y0_mm - 30.0 * s**0.3, self.vent_z0_mm - 3.0])
                d2 = np.einsum("ij,ij->i", w - c, w - c)
                labels[(d2 < 2.2**2) & (part > 0)] = Tissue.CALCIFICATION
        return labels, part

    def _deep_structures(self, w: np.ndarray, brain_depth: np.ndarray, labels: np.ndarray) -> None:
        """Paint deep grey nuclei, brainstem, cisterns, Sylvian and interhemispheric fissures in place."""
        x, y, z = w[:, 0], w[:, 1] - self.vent_y0_mm, w[:, 2] - self.vent_z0_mm
        ax = np.abs(x)
        central = (ax < 45.0) & (np.abs(y) < 60.0) & (z < 10.0)
        idx = np.flatnonzero(central)
        cx, cy, cz, cax = x[idx], y[idx], z[idx], ax[idx]
        sub = labels[idx]
        s = self.vent_scale
        edge = 1.2 + 0.5 * s + 3.8 * s
        nuclei = (
            (((cax - 10.0 - 1.5 * s) / 7.0) ** 2 + ((cy + 7.0) / 12.0) ** 2 + ((cz + 13.0) / 8.0) ** 2 < 1)
            | (((cax - 22.0 - 2.0 * s) / 5.5) ** 2 + ((cy - 6.0) / 14.0) ** 2 + ((cz + 12.0) / 9.0) ** 2 < 1)
            | (((cax - edge - 3.0) / 3.5) ** 2 + ((cy - 25.0) / 8.0) ** 2 + ((cz + 1.0) / 7.0) ** 2 < 1)
        )
        sub[nuclei] = Tissue.DEEP_GREY
        # Brainstem (tilted forward as it rises) with a CSF cistern around it.
        stem_r = np.hypot(cx, cy + 14.0 - 0.25 * (cz + 30.0))
        low = cz < -24.0
        sub[low & (stem_r < 11.0 + 4.0 * s)] = Tissue.CISTERN
        sub[low & (stem_r < 11.0)] = Tissue.BRAINSTEM
        suprasellar = (cx / 13.0) ** 2 + ((cy - 12.0) / 8.0) ** 2 + ((cz + 30.0) / 4.0) ** 2 < 1
        sub[suprasellar] = Tissue.CISTERN
        labels[idx] = sub

        # Sylvian fissures: thin oblique sheets running laterally from the suprasellar cistern.
        near = np.flatnonzero((ax > 24.0) & (np.abs(z + 24.0) < 12.0) & (brain_depth > 0))
        sx, sy, sz = ax[near], y[near], z[near]
        lateral = np.clip((sx - 24.0) / 30.0, 0.0, 1.0)
        wiggle = 2.5 * self.fold(w[near] * 1.5)
        syl = np.abs(sy - 8.0 - 0.35 * (sx - 24.0) + wiggle) < (0.6 + 0.5 * s) * (0.6 + lateral)
        syl &= np.abs(sz + 22.0 + 4.0 * lateral) < 8.0
        labels[near[syl]] = Tissue.CISTERN
        # Interhemispheric fissure above the corpus callosum and in front of / behind it, with the falx.
        half_len = 40.0 * s**0.3
        fissure = (z > 9.0 * s**0.7 + 6.0) | (np.abs(y) > half_len + 6.0)
        fissure &= brain_depth > -1.0
        labels[fissure & (ax < self.fissure_halfwidth_mm)] = Tissue.CSF
        labels[fissure & (ax < 0.45)] = Tissue.FALX


def sample_anatomy(*, rng: np.random.Generator) -> HeadAnatomy:
    """Draw one random head. Consumes a fixed number of draws from ``rng`` in a fixed order."""
    u = rng.uniform
    atrophy = u(0.0, 1.0)
    grey = u(35.0, 40.0)
    hu = TissueHU(
        soft=u(35.0, 50.0),
        fat=u(-100.0, -70.0),
        cortical=u(1200.0, 1800.0),
        diploe=u(500.0, 800.0),
        csf=u(2.0, 8.0),
        grey=grey,
        white=float(np.clip(grey - u(8.0, 11.0), 25.0, 30.0)),
        falx=u(40.0, 50.0),
        calcification=u(150.0, 350.0),
        oedema=u(15.0, 22.0),
    )
    axes = (u(70.0, 78.0), u(88.0, 98.0), u(80.0, 90.0))
    base_z0, base_slope = -u(0.42, 0.47) * axes[2], u(0.18, 0.26)
    sinus_z = base_z0 + base_slope * 0.9 * axes[1] + u(5.0, 10.0)  # just above the anterior fossa
    return HeadAnatomy(
        center_mm=(u(-2.0, 2.0), u(-3.0, 3.0), u(-3.0, 3.0)),
        axes_mm=axes,
        asymmetry=tuple(float(a) for a in rng.normal(0.0, 0.012, size=6)),
        scalp_mm=u(4.0, 6.0),
        skull_mm=u(5.5, 7.5),
        cortical_mm=u(1.8, 2.6),
        base_z0_mm=base_z0,
        base_slope=base_slope,
        base_mm=u(6.0, 10.0),
        csf_mm=1.5 + 1.5 * atrophy,
        grey_mm=u(2.5, 3.5),
        sulcus_depth_mm=u(12.0, 17.0),
        sulcus_halfwidth_mm=0.6 + 0.5 * atrophy,
        fissure_halfwidth_mm=0.8 + 0.8 * atrophy,
        vent_y0_mm=u(-8.0, 0.0),
        vent_z0_mm=u(14.0, 22.0),
        vent_scale=0.85 + 0.5 * atrophy,
        choroid_calcified=bool(rng.random() < 0.6),
        sinus_mm=u(6.0, 12.0) if rng.random() < 0.8 else 0.0,
        sinus_uz=sinus_z / axes[2],
        hu=hu,
        fold=SmoothField.sample(rng=rng, half_width_mm=112.0, step_mm=4.0, sigma_mm=6.0),
        sulci=sulcus_distance(rng=rng),
        texture=SmoothField.sample(rng=rng, half_width_mm=112.0, step_mm=2.5, sigma_mm=2.5),
    )
