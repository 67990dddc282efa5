"""Synthetic abdominal CT phantom in the LiTS layout: volumes, liver and tumor labels.

The phantom exists so that a model trained on it alone segments the liver of real CT, so it
copies what real scans show (measured on 3D-IRCADb portal-phase CT; see
``benchmarks/phantom_realism.py``), and no intensity threshold can segment the liver: the
spleen, pancreas, bowel wall, heart and vessels share the liver's Hounsfield range in each
phase, and only shape, position and context tell them apart. Tumors are hypo- or hyper-dense
as their contrast phase makes them (:data:`HYPER_LESION_CASES`: hyperdense mostly in the
arterial phase, as hypervascular lesions; darker than the liver in the other phases, as
metastases and washed-out HCC are, and as 3D-IRCADb's portal-phase lesions are) with blurred
edges, from a few millimetres to several centimetres (a dominant mass of up to 10 cm in one
tumor-bearing case in ten), replace the parenchyma and vessels they grow over, and about one case in six has
none.

Geometry and orientation:
    Arrays are indexed ``[i, j, k]`` with shape ``(X, Y, Z)`` like nibabel's, and the affine
    is ``diag(-dx, -dy, dz)`` plus a translation, the orientation of DICOM-derived LiTS
    volumes (nibabel axis codes ``("L", "P", "S")``): ``i`` runs toward the patient's left,
    ``j`` toward the back, ``k`` toward the head. Shown with ``i`` as columns and ``j`` as
    rows (radiological convention), the patient's right, where the liver is, is on the
    image's left. World coordinates are RAS+ as nibabel defines them, so the liver lies at
    larger world ``x`` than the body's centre.

    In-plane spacing is drawn per case from a range given for a 512-pixel matrix
    (default 0.55-1.0 mm, a 282-512 mm field of view, never smaller than the body needs) and
    scaled by ``512 / size``, so every size shows the whole abdomen. Slice thickness is drawn
    from 1-5 mm, narrowed so that the scan covers 150-450 mm where the slice count allows:
    thin slices come with many slices, as in clinical series. Anatomy is laid out in
    millimetres, so tumor diameters and volumes computed from the header are true ones.

    Body 250-360 mm wide, 0.72-0.88 as deep, on a curved scanner table (carbon shells around
    a foam core) 3-25 mm below the back. The liver (about 0.5-2.1 l, mean 1.15 l, 120-200 mm
    craniocaudal) is a right lobe against the right wall and a left lobe reaching across the
    midline in its upper half (in 30 % of cases thick and on to the left flank and the spleen); its dome lies under the right diaphragm, 8-60 mm (sometimes
    up to 140 mm) below the top of the scan, so the top slices show the lung bases (wrapping
    the dome behind and beside it) and the heart (myocardium around the blood pool). Inside
    the liver run portal and hepatic venous trees (capsules of 1.5-7.5 mm radius, labelled
    liver; the portal trunk at the hilum is background), with the IVC along its back and the
    aorta left of the spine. A gallbladder (0-25 HU fluid, 1.5-3 mm wall, labelled
    background) hangs from the right lobe's inferior surface in 85 % of cases. Kidneys
    (cortex, medulla, sinus), spleen, pancreas, stomach (wall, contents, gas), bowel loops
    (enhancing wall, fluid or positive oral contrast, gas at the front), spine and ribs.

Intensities (HU), drawn per case. Contrast phase: portal venous 58 %, arterial 15 %, delayed
15 %, non-contrast 12 %:

    =============  ==========  =========  ==========  =========  ==========  =========  =========
    phase          liver       spleen     kidney      aorta      portal v.   hepatic v. heart
    =============  ==========  =========  ==========  =========  ==========  =========  =========
    non-contrast   48-64       liver-14..-4  26-40    35-50      liver-22..-8  liver-24..-10  35-50
    arterial       65-85       95-140     170-250     250-380    110-170     liver-25..-8  220-360
    portal venous  95-130      liver-5..+18  150-220  140-200    liver+35..+75 liver+15..+60 140-200
    delayed        72-92       liver-8..+6   120-180  100-140    liver+8..+28  liver+5..+25  100-140
    =============  ==========  =========  ==========  =========  ==========  =========  =========

Every phase: air -1000, subcutaneous fat -115 to -90, visceral fat -105 to -80, muscle 40-65,
lung -880 to -820, gallbladder 0-25, bone 180-1000, table shells 150-450; liver texture 3-6
HU, a partial-volume blur, Gaussian noise of std 8-13 HU (partly spatially correlated), streak
and cupping (beam-hardening-like) artefacts in about a third of cases, and -1024 or -3024
outside the circular field of view. :data:`LIVER_HU_BY_PHASE` gives the liver ranges.

Example:
    >>> from keras_livseg.data.phantom import make_phantom_case
    >>> case = make_phantom_case(0, size=64, slices=(16, 16))
    >>> case.volume_hu.shape, case.volume_hu.dtype.name, case.labels.dtype.name
    ((64, 64, 16), 'int16', 'uint8')
    >>> sorted(set(case.labels.ravel().tolist())) <= [0, 1, 2]
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from scipy import ndimage
from scipy.special import expit

from keras_livseg.data.atomic import atomic_write_json
from keras_livseg.data.cases import lits_names

logger = logging.getLogger(__name__)

LABEL_BACKGROUND = 0
LABEL_LIVER = 1
LABEL_TUMOR = 2

AIR_HU = -1000
PAD_VALUES_HU = (-1024, -3024)
MIN_HU, MAX_HU = -1024, 3071

#: Bumped whenever the generator's output changes for the same arguments, so that caches of
#: generated data (``fit``'s phantom cache) are made again instead of silently reused.
GENERATOR_VERSION = 4

DEFAULT_SIZE = 256
DEFAULT_SLICES = (32, 64)
DEFAULT_SPACING_MM = (0.55, 1.0)  # in-plane, for a 512 x 512 matrix
DEFAULT_THICKNESS_MM = (1.0, 5.0)
REFERENCE_MATRIX = 512
# The scan covers the liver with margins, like the abdominal series of LiTS.
COVERAGE_MM = (150.0, 450.0)
TUMOR_FREE_PERIOD = 6  # one case in six without tumor in a written set

SMALL_TUMOR_MAX_MM = 10.0
LARGE_TUMOR_MIN_MM = 15.0
#: Share of tumor-bearing cases whose largest lesion is a dominant mass of 55 mm up to
#: :data:`DOMINANT_MASS_MAX_MM` (shrunk where the liver cannot hold it). LiTS holds masses of
#: several hundred millilitres (3D-IRCADb patient 7: 669 ml); below 55 mm only, a
#: phantom-trained model called most of such a mass liver.
DOMINANT_MASS_SHARE = 0.1
DOMINANT_MASS_MAX_MM = 100.0
#: Share of cases whose left lobe reaches the left flank, thick, up to the spleen (as in
#: 3D-IRCADb patient 7); with short left lobes only, a phantom-trained model missed that
#: part of the liver on real scans (sim-to-real liver Dice 0.84 there against 0.90).
LARGE_LEFT_LOBE_SHARE = 0.3

# Contrast phases and how often each is drawn: portal venous is the commonest in LiTS.
PHASES = ("non_contrast", "arterial", "portal", "delayed")
PHASE_WEIGHTS = (0.12, 0.15, 0.58, 0.15)
#: Share of tumor-bearing cases whose lesions are mostly hyperdense, per phase (each lesion
#: then takes the case's kind with probability 0.9). Hypervascular lesions (HCC, neuroendocrine
#: metastases) enhance in the arterial phase; in the portal venous and delayed phases most
#: lesions are darker than the enhanced liver (colorectal metastases, HCC wash-out), and
#: without contrast most are darker too. Equal odds in every phase gave portal-phase
#: phantoms bright lesions in the portal veins' HU range, which real portal-phase scans
#: rarely show (3D-IRCADb patient 1: six of seven lesions 33-39 HU darker than the liver).
HYPER_LESION_CASES = {"non_contrast": 0.1, "arterial": 0.6, "portal": 0.1, "delayed": 0.1}

# HU ranges drawn per case: (lo, hi), or (tissue, lo, hi) for an offset from a tissue drawn
# before it. Order matters (a tissue refers to one above it) and is part of determinism.
_COMMON_HU = {
    "subq_fat": (-115.0, -90.0), "visceral_fat": (-105.0, -80.0), "lung": (-880.0, -820.0),
    "cortical": (700.0, 1000.0), "cancellous": (180.0, 320.0), "rib_cortex": (500.0, 850.0),
    "disc": (70.0, 100.0), "csf": (5.0, 15.0), "sinus": (-60.0, -20.0), "gallbladder": (0.0, 25.0),
}
_PHASE_HU = {
    "non_contrast": {
        "liver": (48.0, 64.0), "spleen": ("liver", -14.0, -4.0), "kidney": (26.0, 40.0),
        "medulla": ("kidney", -4.0, 2.0), "aorta": (35.0, 50.0), "ivc": (35.0, 48.0),
        "portal": ("liver", -22.0, -8.0), "hepatic": ("liver", -24.0, -10.0), "heart_blood": (35.0, 50.0),
        "myocardium": (40.0, 55.0), "muscle": (40.0, 55.0), "bowel_wall": (30.0, 45.0),
        "pancreas": (35.0, 50.0), "gb_wall": (25.0, 40.0),
    },
    "arterial": {
        "liver": (65.0, 85.0), "spleen": (95.0, 140.0), "kidney": (170.0, 250.0), "medulla": (70.0, 110.0),
        "aorta": (250.0, 380.0), "ivc": (60.0, 110.0), "portal": (110.0, 170.0),
        "hepatic": ("liver", -25.0, -8.0), "heart_blood": (220.0, 360.0), "myocardium": (80.0, 120.0),
        "muscle": (48.0, 62.0), "bowel_wall": (60.0, 100.0), "pancreas": (90.0, 130.0), "gb_wall": (50.0, 90.0),
    },
    "portal": {
        "liver": (95.0, 130.0), "spleen": ("liver", -5.0, 18.0), "kidney": (150.0, 220.0),
        "medulla": ("kidney", -20.0, 0.0), "aorta": (140.0, 200.0), "ivc": (120.0, 175.0),
        "portal": ("liver", 35.0, 75.0), "hepatic": ("liver", 15.0, 60.0), "heart_blood": (140.0, 200.0),
        "myocardium": (80.0, 110.0), "muscle": (50.0, 65.0), "bowel_wall": (70.0, 110.0),
        "pancreas": (80.0, 115.0), "gb_wall": (50.0, 90.0),
    },
    "delayed": {
        "liver": (72.0, 92.0), "spleen": ("liver", -8.0, 6.0), "kidney": (120.0, 180.0),
        "medulla": ("kidney", 0.0, 40.0), "aorta": (100.0, 140.0), "ivc": (95.0, 130.0),
        "portal": ("liver", 8.0, 28.0), "hepatic": ("liver", 5.0, 25.0), "heart_blood": (100.0, 140.0),
        "myocardium": (75.0, 100.0), "muscle": (50.0, 62.0), "bowel_wall": (55.0, 80.0),
        "pancreas": (65.0, 90.0), "gb_wall": (45.0, 75.0),
    },
}
# The liver's mean HU range per phase (before texture, vessels and noise).
LIVER_HU_BY_PHASE = {phase: _PHASE_HU[phase]["liver"] for phase in PHASES}

_F32 = np.float32


@dataclasses.dataclass(frozen=True)
class TumorSpec:
    """One lesion as placed in the phantom.

    Attributes:
        center_ijk: voxel index ``(i, j, k)`` of the lesion's centre.
        diameter_mm: in-plane diameter in millimetres (before the blurred edge).
        kind: ``"hypo"`` (darker than liver) or ``"hyper"`` (brighter).
        contrast_hu: lesion minus liver intensity in HU at the lesion's core.
        voxels: voxels labelled tumor for this lesion (0 only if a later lesion covers it).
    """

    center_ijk: tuple[int, int, int]
    diameter_mm: float
    kind: str
    contrast_hu: float
    voxels: int


@dataclasses.dataclass(frozen=True)
class PhantomCase:
    """One synthetic CT case.

    Attributes:
        volume_hu: int16 array ``(X, Y, Z)``, Hounsfield units.
        labels: uint8 array ``(X, Y, Z)``: 0 background, 1 liver, 2 tumor.
        affine: float64 ``(4, 4)`` voxel-to-world (RAS+, mm) matrix, ``diag(-dx, -dy, dz)``
            plus a translation.
        pad_hu: the out-of-field value, -1024 or -3024.
        liver_hu: mean liver intensity before texture and noise.
        noise_hu: standard deviation of the added Gaussian noise.
        tumors: the lesions, largest first; empty for a tumor-free case.
        phase: contrast phase, one of :data:`PHASES`.
        anatomy: what was drawn besides the labels, for checks and for ``phantom.json``:
            ``hu`` (tissue -> HU before texture and noise), ``gallbladder`` (``neck_ijk``,
            ``fundus_ijk``, ``radius_mm``; None when absent), ``table_top_j`` (row of the
            table's top surface below the body's centre, None outside the field of view),
            ``liver_top_mm`` (height of the liver's dome above the first slice),
            ``streaks`` (whether streak artefacts were added).
    """

    volume_hu: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    pad_hu: int
    liver_hu: float
    noise_hu: float
    tumors: tuple[TumorSpec, ...]
    phase: str = "portal"
    anatomy: dict = dataclasses.field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size ``(dx, dy, dz)`` in mm, read from the affine."""
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))


# ----------------------------------------------------------------------------------------
# Small geometric helpers
# ----------------------------------------------------------------------------------------


def _kernel_weights(x: np.ndarray, cell: float) -> np.ndarray:
    """Rows of normalized Gaussian weights from positions ``x`` to nodes ``cell`` mm apart."""
    nodes = np.arange(x.min() - 2 * cell, x.max() + 3 * cell, cell)
    w = np.exp(-0.5 * ((x[:, None] - nodes[None, :]) / (0.7 * cell)) ** 2)
    w[w < 1e-6] = 0.0  # tails would be float32 denormals, which make matmul 10x slower
    w /= w.sum(axis=1, keepdims=True)
    return w.astype(_F32)


class _SmoothField:
    """A band-limited random field of about unit variance on the slice grid.

    Random values on a coarse lattice are interpolated with Gaussian weights, separably, so
    a slice (or a box of it) costs two small matrix products instead of a 3D filter over the
    whole volume.
    """

    def __init__(self, rng: np.random.Generator, u, v, z, cell_mm: float, cell_z_mm: float):
        self._wu = _kernel_weights(u, cell_mm)
        self._wv = _kernel_weights(v, cell_mm)
        self._wz = _kernel_weights(z, cell_z_mm)
        shape = (self._wu.shape[1], self._wv.shape[1], self._wz.shape[1])
        self._values = rng.standard_normal(shape, dtype=_F32)
        variance = (
            (self._wu**2).sum(1).mean() * (self._wv**2).sum(1).mean() * (self._wz**2).sum(1).mean()
        )
        self._scale = _F32(1.0 / math.sqrt(variance))

    def plane(self, k: int, box: tuple[slice, slice]) -> np.ndarray:
        coarse = self._values @ self._wz[k]
        return (self._wu[box[0]] @ coarse @ self._wv[box[1]].T) * self._scale


def _rho2(U, V, cu, cv, au, av, angle=0.0):
    """Squared normalized radius of a rotated ellipse: < 1 inside."""
    c, s = math.cos(angle), math.sin(angle)
    du, dv = U - cu, V - cv
    x = (du * c + dv * s) / au
    y = (dv * c - du * s) / av
    return x * x + y * y


def _phase_intensities(phase: str, rng: np.random.Generator) -> dict[str, float]:
    """Draws every tissue's HU for one case in ``phase``: common tissues, then phase ones."""
    drawn: dict[str, float] = {}
    for name, spec in (*_COMMON_HU.items(), *_PHASE_HU[phase].items()):
        if isinstance(spec[0], str):
            drawn[name] = drawn[spec[0]] + float(rng.uniform(spec[1], spec[2]))
        else:
            drawn[name] = float(rng.uniform(spec[0], spec[1]))
    drawn["stomach_lumen"] = float(rng.uniform(5.0, 20.0) if rng.random() < 0.5 else rng.uniform(35.0, 55.0))
    return drawn


def _profile(tau: float, peak: float = 0.5) -> float:
    """Craniocaudal scale in [0, 1] for ``tau`` in [0, 1]: 0 at both ends, 1 at ``peak``."""
    if tau <= 0.0 or tau >= 1.0:
        return 0.0
    power = math.log(0.5) / math.log(peak)
    return math.sin(math.pi * tau**power) ** 0.5


@dataclasses.dataclass
class _Organ:
    """An ellipsoid-like organ: an ellipse in plane whose size follows a profile along z."""

    cu: float
    cv: float
    au: float
    av: float
    angle: float
    z0: float
    z1: float
    hu: float
    peak: float = 0.5
    rim_mm: float = 0.0

    def scale(self, z: float) -> float:
        return _profile((z - self.z0) / (self.z1 - self.z0), self.peak)

    def radius(self) -> float:
        return max(self.au, self.av)


# ----------------------------------------------------------------------------------------
# The phantom builder
# ----------------------------------------------------------------------------------------


class _Builder:
    """Draws one case's anatomy, then renders it slice by slice into int16/uint8 arrays."""

    def __init__(
        self,
        rng: np.random.Generator,
        size: int,
        slices: tuple[int, int],
        spacing_mm: tuple[float, float],
        thickness_mm: tuple[float, float],
        tumor_free: bool | None,
    ):
        self.rng = rng
        u = rng.uniform
        self.nx = self.ny = size
        self.nz = int(rng.integers(slices[0], slices[1] + 1))

        # Body first: the field of view must fit it.
        self.a = u(125.0, 180.0)
        self.b = self.a * u(0.72, 0.88)
        self.ub, self.vb = u(-10.0, 10.0), u(-5.0, 15.0)
        needed = 2 * (max(self.a, self.b) * 1.06 + math.hypot(self.ub, self.vb) + 8.0) / size
        ratio = REFERENCE_MATRIX / size
        lo, hi = spacing_mm[0] * ratio, spacing_mm[1] * ratio
        self.dx = self.dy = u(max(lo, needed), hi) if needed < hi else needed

        lo, hi = thickness_mm
        lo, hi = max(lo, COVERAGE_MM[0] / self.nz), min(hi, COVERAGE_MM[1] / self.nz)
        if lo > hi:  # too few (or too many) slices for the coverage: keep the bound nearest
            lo = hi = thickness_mm[1] if self.nz * thickness_mm[1] < COVERAGE_MM[0] else thickness_mm[0]
        self.dz = u(lo, hi)

        self.u = ((np.arange(self.nx) - (self.nx - 1) / 2) * self.dx).astype(_F32)
        self.v = ((np.arange(self.ny) - (self.ny - 1) / 2) * self.dy).astype(_F32)
        self.z = (np.arange(self.nz) * self.dz).astype(_F32)
        coverage = self.nz * self.dz

        self.pad_hu = int(rng.choice(PAD_VALUES_HU))
        self.noise_hu = u(8.0, 13.0)
        self.noise_grain = u(0.0, 0.6)  # share of the noise that is spatially correlated
        self.blur_px = u(0.5, 0.8)

        # Contrast phase, then every tissue's intensity in it (see the module docstring).
        self.phase = PHASES[int(rng.choice(len(PHASES), p=PHASE_WEIGHTS))]
        self.hu = _phase_intensities(self.phase, rng)
        self.liver_hu = self.hu["liver"]
        self.liver_texture_hu = u(3.0, 6.0)
        self.spleen_texture_hu = u(12.0, 22.0) if self.phase == "arterial" else u(2.0, 5.0)

        # Liver: a right lobe and a left lobe that appear, grow and shrink along z. The dome
        # sits under the right diaphragm, a few centimetres below the top of the scan.
        a, b, ub, vb = self.a, self.b, self.ub, self.vb
        length = min(u(145.0, 200.0), 0.72 * coverage)
        top = u(8.0, 60.0) if rng.random() < 0.85 else u(60.0, 140.0)
        top = min(max(top, 0.08 * coverage, 1.5 * self.dz), coverage - length - 0.06 * coverage)
        top = max(top, 0.06 * coverage)
        self.zl1 = coverage - top
        self.zl0 = max(self.zl1 - length, 0.06 * coverage)
        zl0, lz = self.zl0, self.zl1 - self.zl0
        self.liver_right = _Organ(
            ub - u(0.34, 0.44) * a, vb - u(0.0, 0.1) * b, u(0.58, 0.7) * a, u(0.72, 0.84) * b,
            u(-0.25, 0.25), zl0, self.zl1, self.liver_hu, peak=u(0.6, 0.72),
        )
        self.large_left_lobe = bool(rng.random() < LARGE_LEFT_LOBE_SHARE)
        if self.large_left_lobe:
            # A left lobe reaching the left flank, thick, over the stomach and up to the spleen,
            # widest high up, under the heart.
            self.liver_left = _Organ(
                ub + u(0.25, 0.4) * a, vb - u(0.1, 0.3) * b, u(0.6, 0.75) * a, u(0.38, 0.5) * b,
                u(-0.3, 0.1), zl0 + u(0.25, 0.4) * lz, self.zl1 - u(0.0, 0.05) * lz, self.liver_hu,
                peak=u(0.7, 0.85),
            )
        else:
            self.liver_left = _Organ(
                ub + u(0.1, 0.25) * a, vb - u(0.3, 0.42) * b, u(0.45, 0.6) * a, u(0.28, 0.38) * b,
                u(-0.3, 0.1), zl0 + u(0.3, 0.45) * lz, self.zl1 - u(0.0, 0.05) * lz, self.liver_hu, peak=0.6,
            )
        self.liver_warp = u(0.06, 0.12)

        # Spine and what hangs on it.
        self.f_lat, self.f_ant, self.f_post = u(10.0, 35.0), u(10.0, 35.0), u(8.0, 18.0)
        self.muscle_mm = u(8.0, 14.0)
        self.rvb = u(15.0, 20.0)
        self.v_spine = vb + 0.92 * b - self.f_post - 50.0 - self.rvb
        self.disc_period, self.disc_phase = u(28.0, 34.0), u(0.0, 34.0)
        self.paraspinal = [(ub + side * u(28.0, 35.0), u(22.0, 28.0), u(20.0, 26.0)) for side in (-1, 1)]
        self.aorta = (ub + u(8.0, 20.0), self.v_spine - self.rvb - u(10.0, 14.0), u(10.0, 13.0))
        self.ivc = (ub - u(18.0, 28.0), self.v_spine - self.rvb - u(8.0, 14.0), u(11.0, 15.0), u(8.0, 11.0))

        # Neighbours of liver-like density.
        kz = zl0 + u(0.1, 0.3) * lz
        self.kidneys = []
        for side, z_shift in ((-1, 0.0), (1, u(10.0, 20.0))):
            half = u(45.0, 60.0)
            self.kidneys.append(
                _Organ(
                    ub + side * u(55.0, 75.0), self.v_spine + u(-5.0, 10.0), u(25.0, 32.0), u(20.0, 26.0),
                    -side * u(0.4, 0.8), kz + z_shift - half, kz + z_shift + half, self.hu["kidney"],
                    rim_mm=u(3.0, 6.0),
                )
            )
        zs, hs = zl0 + u(0.6, 0.8) * lz, u(45.0, 60.0)
        self.spleen = _Organ(
            ub + u(0.55, 0.65) * a, vb + u(0.15, 0.35) * b, u(0.18, 0.24) * a, u(0.38, 0.48) * b,
            u(-0.7, -0.3), zs - hs, zs + hs, self.hu["spleen"], rim_mm=u(2.0, 5.0),
        )
        zs, hs = zl0 + u(0.5, 0.7) * lz, u(45.0, 60.0)
        # A large left lobe lies in front of the stomach and pushes it back.
        stomach_v = vb + u(-0.05, 0.1) * b if self.large_left_lobe else vb - u(0.2, 0.35) * b
        self.stomach = _Organ(
            ub + u(0.25, 0.4) * a, stomach_v, u(0.22, 0.3) * a, u(0.22, 0.32) * b,
            u(-0.5, 0.5), zs - hs, zs + hs, self.hu["bowel_wall"], rim_mm=u(2.0, 5.0),
        )
        self.stomach_gas = rng.random() < 0.7
        # Pancreas: a soft band across the spine's front, below the liver's middle.
        zp = zl0 + u(0.2, 0.4) * lz
        self.pancreas = _Organ(
            ub + u(0.0, 0.1) * a, self.v_spine - self.rvb - u(35.0, 45.0), u(0.3, 0.4) * a, u(10.0, 14.0),
            u(-0.35, -0.1), zp - u(20.0, 30.0), zp + u(20.0, 30.0), self.hu["pancreas"], rim_mm=2.0,
        )

        # Gallbladder: a fluid pear in the fossa under the right lobe, neck up, fundus down
        # and forward (absent after cholecystectomy or when it lies below the scan).
        self.gallbladder = None
        if rng.random() < 0.85:
            right = self.liver_right
            neck = np.array([right.cu + u(0.35, 0.55) * right.au, right.cv - u(0.15, 0.3) * right.av,
                             zl0 + u(0.38, 0.5) * lz])
            tilt = np.array([u(-0.5, 0.1), -u(0.3, 0.7), -1.0])
            fundus = neck + tilt / np.linalg.norm(tilt) * u(45.0, 75.0)
            self.gallbladder = (neck, fundus, u(11.0, 17.0), u(1.5, 3.0))

        # Vessels: portal and hepatic venous trees inside the liver.
        self.vessel_segments = self._vessel_trees()

        # Lungs above the two diaphragm domes, the heart on the left one.
        self.dome_right = (self.zl1 + u(1.0, 4.0), self.liver_right.cu, self.liver_right.cv)
        self.dome_left = (self.zl1 - u(8.0, 25.0), ub + u(0.3, 0.45) * a, vb + u(0.0, 0.2) * b)
        self.dome_drop_mm = u(35.0, 55.0)
        zh, hh = self.dome_left[0] + u(35.0, 50.0), u(55.0, 70.0)
        self.heart = _Organ(
            ub + u(0.1, 0.2) * a, vb - u(0.25, 0.4) * b, u(0.26, 0.34) * a, u(0.26, 0.34) * b,
            u(-0.5, -0.1), zh - hh, zh + hh, self.hu["heart_blood"], rim_mm=u(3.0, 6.0),
        )
        self.myocardium_mm = u(8.0, 13.0)

        # Ribs: cross-sections along the wall, each seen in some slices only.
        self.rib_z_min = zl0 + u(0.2, 0.3) * lz
        self.rib_period = u(25.0, 32.0)
        left = np.linspace(-1.0, 1.15, 6) + rng.uniform(-0.08, 0.08, 6)
        self.ribs = [(float(t), float(u(0.0, 32.0))) for t in left] + [
            (float(math.pi - t), float(u(0.0, 32.0))) for t in left
        ]

        # Body outline: an ellipse with gentle lobulation and a back flattened by the table.
        self.body_wobble = [(m, u(0.0, 0.02), u(0.0, 2 * math.pi)) for m in (2, 3, 4)]
        self.body_zwave = (u(0.0, 0.03), u(200.0, 400.0), u(0.0, 2 * math.pi))

        # Scanner table under the back: a curved carbon shell around a foam core, on a pad.
        self.table = dict(
            gap=u(3.0, 25.0), half_width=u(190.0, 250.0), curve=u(0.0, 4e-4), top_mm=u(3.0, 5.0),
            core_mm=u(6.0, 20.0), bottom_mm=u(3.0, 6.0), shell_hu=u(150.0, 450.0), core_hu=u(-850.0, -550.0),
            shift=u(-8.0, 8.0),
        )
        # Beam hardening and streaks in some cases: angular stripes from the spine, cupping.
        self.streaks = None
        if rng.random() < 0.35:
            self.streaks = dict(
                amp=u(4.0, 12.0), cupping=u(0.0, 15.0),
                waves=[(int(rng.integers(12, 60)), u(0.0, 2 * math.pi), u(-0.3, 0.3)) for _ in range(6)],
            )

        # Smooth random fields for shapes and texture (cell sizes set the grain).
        def field(cell, cell_z):
            return _SmoothField(rng, self.u, self.v, self.z, cell, cell_z)

        self.f_liver_shape = field(35.0, 40.0)
        self.f_liver_texture = field(8.0, 10.0)
        self.f_organ_shape = field(30.0, 35.0)
        self.f_tissue = field(6.0, 8.0)
        self.f_bowel = field(20.0, 22.0)
        self.f_gas = field(14.0, 14.0)
        self.bowel_contrast = rng.random() < 0.2  # positive oral contrast in some cases
        self.bowel_fluid_hu = u(150.0, 350.0) if self.bowel_contrast else u(0.0, 30.0)

        self._static_arrays()
        # Drawn either way, so that forcing ``tumor_free`` leaves the rest of the case alone.
        drawn_free = bool(rng.random() < 1 / TUMOR_FREE_PERIOD)
        self.tumor_free = drawn_free if tumor_free is None else bool(tumor_free)
        plan = self._plan_tumors()
        self.tumor_plan = [] if self.tumor_free else plan

    # -- vessel trees ----------------------------------------------------------------------

    def _vessel_trees(self) -> dict[str, np.ndarray]:
        """Portal and hepatic venous trees as capsules ``(A, B, radius, kind)`` in mm.

        ``kind`` 0: portal branch, 1: hepatic vein branch (both drawn on liver voxels and
        labelled liver), 2: the portal trunk at the hilum (drawn wherever it runs, labelled
        background, as in LiTS masks).
        """
        rng, u = self.rng, self.rng.uniform
        right, left = self.liver_right, self.liver_left
        zl0, lz = self.zl0, self.zl1 - self.zl0
        segments: list[tuple[np.ndarray, np.ndarray, float, int]] = []

        def depth_in_liver(p) -> float:
            """Below 1 inside a lobe's ellipsoid (its largest section, within its z range)."""
            best = 9.0
            for lobe in (right, left):
                if lobe.z0 < p[2] < lobe.z1:
                    best = min(best, _rho2(p[0], p[1], lobe.cu, lobe.cv, lobe.au, lobe.av, lobe.angle))
            return best

        centre = np.array([right.cu, right.cv, 0.5 * (zl0 + self.zl1)])

        def grow(start, target, length, radius, depth, kind):
            direction = np.asarray(target, float) - start
            direction = direction / (np.linalg.norm(direction) + 1e-9)
            for _ in range(2):  # a gently curved branch: two capsules
                direction = direction + rng.normal(0.0, 0.2, 3)
                direction /= np.linalg.norm(direction)
                end = start + direction * length / 2
                if depth_in_liver(end) > 0.8:  # turn back toward the liver's middle
                    inward = centre - start
                    direction = direction + 1.5 * inward / (np.linalg.norm(inward) + 1e-9)
                    direction /= np.linalg.norm(direction)
                    end = start + direction * length / 2
                segments.append((start, end, radius, kind))
                start = end
            if depth == 0 or radius < 1.8:
                return
            for _ in range(2 if rng.random() < 0.7 else 3):
                child = direction + rng.normal(0.0, 0.6, 3)
                child[2] *= 0.6  # branches spread more in plane than along z
                grow(start, start + child, length * u(0.65, 0.85), radius * u(0.68, 0.82), depth - 1, kind)

        porta = np.array([right.cu + u(0.3, 0.45) * right.au, right.cv + u(-0.05, 0.15) * right.av,
                          zl0 + u(0.4, 0.5) * lz])
        confluence = np.array([self.ub + u(-5.0, 10.0), self.v_spine - self.rvb - u(25.0, 35.0),
                               zl0 + u(0.15, 0.3) * lz])
        segments.append((confluence, porta, u(6.0, 8.0), 2))
        grow(porta, (right.cu - 0.2 * right.au, right.cv + 0.1 * right.av, porta[2] + 10.0),
             u(40.0, 55.0), u(6.0, 7.5), 4, 0)
        grow(porta, (left.cu, left.cv, 0.5 * (left.z0 + left.z1)), u(40.0, 55.0), u(5.0, 6.5), 4, 0)
        cu, cv = self.ivc[0], self.ivc[1]
        hub = np.array([cu, cv - 5.0, self.zl1 - u(15.0, 30.0)])
        for target in (
            (right.cu - 0.35 * right.au, right.cv + 0.1 * right.av, zl0 + 0.35 * lz),
            (right.cu + 0.45 * right.au, right.cv - 0.55 * right.av, zl0 + 0.3 * lz),
            (left.cu, left.cv, zl0 + 0.65 * lz),
        ):
            grow(hub, target, u(45.0, 60.0), u(5.0, 7.0), 4, 1)
        a = np.array([s[0] for s in segments], _F32)
        b = np.array([s[1] for s in segments], _F32)
        r = np.array([s[2] for s in segments], _F32)
        return {"a": a, "b": b, "r": r, "kind": np.array([s[3] for s in segments], np.int8),
                "zmin": np.minimum(a[:, 2], b[:, 2]) - r, "zmax": np.maximum(a[:, 2], b[:, 2]) + r}

    # -- static per-case arrays -------------------------------------------------------------

    def _surface_radius(self, theta):
        """Body-outline radius (mm) along direction ``theta`` from the body centre."""
        c, s = np.cos(theta), np.sin(theta)
        r = 1.0 / np.sqrt((c / self.a) ** 2 + (s / self.b) ** 2)
        for m, amp, phase in self.body_wobble:
            r = r * (1.0 + amp * np.cos(m * theta + phase))
        return r * (1.0 - 0.08 * np.clip(s, 0.0, None) ** 2)  # supine: back flattened

    def _wall_mm(self, theta):
        """Subcutaneous fat thickness (mm) along ``theta``."""
        c, s = np.cos(theta), np.sin(theta)
        return self.f_lat * c**2 + np.where(s < 0, self.f_ant, self.f_post) * s**2

    def _static_arrays(self) -> None:
        du = self.u[:, None] - _F32(self.ub)
        dv = self.v[None, :] - _F32(self.vb)
        self.r = np.sqrt(du * du + dv * dv).astype(_F32)
        theta = np.arctan2(dv, du)
        self.r_surface = self._surface_radius(theta).astype(_F32)
        self.fat_mm = self._wall_mm(theta).astype(_F32)
        radius_fov = (self.nx / 2) * self.dx
        self.fov = (self.u[:, None] ** 2 + self.v[None, :] ** 2) < _F32(radius_fov**2)
        # Diaphragm domes: the lung begins where z exceeds apex - drop * q(u, v).
        self.dome_q = []
        for apex, cu, cv in (self.dome_right, self.dome_left):
            q = _rho2(self.u[:, None], self.v[None, :], cu, cv, 0.55 * self.a, 0.75 * self.b)
            self.dome_q.append(q.astype(_F32))
        self.left_side = (self.u[:, None] > _F32(self.ub)) & np.ones((1, self.ny), bool)
        # Gas floats to the front of the bowel in a supine patient.
        self.gas_bias = (-(self.v[None, :] - _F32(self.vb)) / _F32(self.b) * _F32(0.8)).astype(_F32)
        # Table: shell, foam core, shell, following a shallow curve under the back.
        t = self.table
        back = self.vb + float(self._surface_radius(np.array(math.pi / 2))) * (1.0 + self.body_zwave[0])
        du_t = self.u[:, None] - _F32(self.ub + t["shift"])
        top = _F32(back + t["gap"]) + _F32(t["curve"]) * du_t * du_t
        depth_t = self.v[None, :] - top
        across = np.abs(du_t) < _F32(t["half_width"])
        layers = np.cumsum([t["top_mm"], t["core_mm"], t["bottom_mm"]])
        self.table_hu = np.full((self.nx, self.ny), np.nan, _F32)
        self.table_hu[across & (depth_t >= 0) & (depth_t < layers[2])] = t["shell_hu"]
        self.table_hu[across & (depth_t >= layers[0]) & (depth_t < layers[1])] = t["core_hu"]
        self.table_mask = ~np.isnan(self.table_hu)
        self.table_top_mm = back + t["gap"]
        if self.streaks is not None:
            self.streak_theta = np.arctan2(self.v[None, :] - _F32(self.v_spine), self.u[:, None] - _F32(self.ub))
            r_spine = np.sqrt((self.u[:, None] - _F32(self.ub)) ** 2 + (self.v[None, :] - _F32(self.v_spine)) ** 2)
            self.streak_decay = np.exp(-r_spine / _F32(180.0)).astype(_F32)

    def _box(self, cu: float, cv: float, radius: float) -> tuple[slice, slice] | None:
        """Index box covering a disc of ``radius`` mm around ``(cu, cv)``; None if outside."""
        i0 = int(math.floor((cu - radius - self.u[0]) / self.dx))
        i1 = int(math.ceil((cu + radius - self.u[0]) / self.dx)) + 1
        j0 = int(math.floor((cv - radius - self.v[0]) / self.dy))
        j1 = int(math.ceil((cv + radius - self.v[0]) / self.dy)) + 1
        i0, i1, j0, j1 = max(i0, 0), min(i1, self.nx), max(j0, 0), min(j1, self.ny)
        if i0 >= i1 or j0 >= j1:
            return None
        return slice(i0, i1), slice(j0, j1)

    def _grid(self, box):
        return self.u[box[0], None], self.v[None, box[1]]

    # -- anatomy, one slice ---------------------------------------------------------------

    def render_anatomy(self, k: int, hu: np.ndarray, liver: np.ndarray) -> None:
        """Noise-free anatomy of slice ``k`` into ``hu`` (float32) and ``liver`` (bool)."""
        z = float(self.z[k])
        H = self.hu
        amp, period, phase = self.body_zwave
        depth = self.r_surface * _F32(1.0 + amp * math.sin(2 * math.pi * z / period + phase)) - self.r
        body = depth > 0
        hu.fill(AIR_HU)
        hu[body] = H["subq_fat"]
        wall = self.fat_mm
        hu[depth > wall] = H["muscle"]
        cavity = depth > wall + _F32(self.muscle_mm)
        hu[cavity] = H["visceral_fat"]
        table = self.table_mask & ~body
        hu[table] = self.table_hu[table]
        liver.fill(False)
        everything = (slice(None), slice(None))

        # Bowel loops, more of them low in the abdomen: an enhancing wall around fluid (or
        # positive oral contrast) and gas pockets at the front.
        tau = (z - self.zl0) / (self.zl1 - self.zl0)
        threshold = _F32(0.1 + 1.3 * float(np.clip(tau, 0.0, 1.0)))
        f = self.f_bowel.plane(k, everything)
        loops = cavity & (f > threshold)
        hu[loops] = H["bowel_wall"]
        lumen = cavity & (f > threshold + _F32(0.3))
        hu[lumen] = self.bowel_fluid_hu
        hu[lumen & (self.f_gas.plane(k, everything) + self.gas_bias > 0.9)] = AIR_HU

        self._paint_liver(k, z, hu, liver, cavity, depth)
        self._paint_liver_vessels(z, hu, liver, cavity)
        for kidney in self.kidneys:
            self._paint_kidney(kidney, z, hu, liver, cavity)
        self._paint_organ(self.pancreas, k, z, hu, liver, cavity, warp=0.15)
        self._paint_organ(self.spleen, k, z, hu, liver, cavity, warp=0.1, texture=self.spleen_texture_hu)
        self._paint_stomach(k, z, hu, liver, cavity)
        self._paint_gallbladder(z, hu, liver, cavity)
        self._paint_lungs(z, hu, liver, cavity)
        self._paint_organ(self.heart, k, z, hu, liver, cavity, warp=0.0, wall=(self.myocardium_mm, H["myocardium"]))
        self._paint_vessels(hu, liver)
        self._paint_spine(z, hu, liver, body)
        self._paint_ribs(z, hu, liver)
        hu[body] += self.f_tissue.plane(k, everything)[body] * _F32(3.0)

    def _paint_liver(self, k, z, hu, liver, cavity, depth) -> None:
        parts = []
        for lobe in (self.liver_right, self.liver_left):
            s = lobe.scale(z)
            if s > 0.03:
                parts.append((lobe, s))
        if not parts:
            return
        right = self.liver_right
        box = self._box(self.ub - 0.1 * self.a, self.vb, 1.1 * max(self.a, self.b))
        if box is None:
            return
        U, V = self._grid(box)
        rho = None
        for lobe, s in parts:
            # The inferior tip of the right lobe drifts lateral and anterior.
            drift = (1.0 - (z - right.z0) / (right.z1 - right.z0)) if lobe is right else 0.0
            r2 = _rho2(U, V, lobe.cu - 0.1 * self.a * drift, lobe.cv - 0.05 * self.b * drift,
                       lobe.au * s, lobe.av * s, lobe.angle)
            rho = r2 if rho is None else np.minimum(rho, r2)
        rho = np.sqrt(rho) + self.f_liver_shape.plane(k, box) * _F32(self.liver_warp)
        mask = (rho < 1.0) & cavity[box] & (depth[box] > self.fat_mm[box] + _F32(self.muscle_mm + 2.0))
        values = _F32(self.liver_hu) + self.f_liver_texture.plane(k, box) * _F32(self.liver_texture_hu)
        hu[box][mask] = values[mask]
        liver[box] |= mask

    def _paint(self, hu, liver, box, mask, value) -> None:
        hu[box][mask] = value
        liver[box][mask] = False

    def _capsules(self, z: float, kinds=None):
        """Vessel capsules crossing the plane at ``z``: yields ``(box, distance_mm, radius, kind)``."""
        vs = self.vessel_segments
        near = np.flatnonzero((vs["zmin"] <= z) & (vs["zmax"] >= z))
        for n in near:
            kind = int(vs["kind"][n])
            if kinds is not None and kind not in kinds:
                continue
            a, b, r = vs["a"][n], vs["b"][n], float(vs["r"][n])
            d = b - a
            # Part of the segment within r of the plane, projected in plane: the box to draw.
            if abs(d[2]) > 1e-3:
                t0, t1 = sorted(((z - r - a[2]) / d[2], (z + r - a[2]) / d[2]))
                t0, t1 = max(t0, 0.0), min(t1, 1.0)
            else:
                t0, t1 = 0.0, 1.0
            p0, p1 = a + t0 * d, a + t1 * d
            cu, cv = 0.5 * (p0[0] + p1[0]), 0.5 * (p0[1] + p1[1])
            half = 0.5 * math.hypot(p1[0] - p0[0], p1[1] - p0[1]) + r + 1.0
            box = self._box(cu, cv, half)
            if box is None:
                continue
            U, V = self._grid(box)
            length2 = float(d @ d) + 1e-9
            t = ((U - a[0]) * d[0] + (V - a[1]) * d[1] + (z - a[2]) * d[2]) / _F32(length2)
            np.clip(t, 0.0, 1.0, out=t)
            dist = np.sqrt((a[0] + t * d[0] - U) ** 2 + (a[1] + t * d[1] - V) ** 2 + (a[2] + t * d[2] - z) ** 2)
            yield box, dist, r, kind

    def _paint_liver_vessels(self, z, hu, liver, cavity) -> None:
        """Portal and hepatic veins: blended into the liver (partial volume), still liver."""
        values = (self.hu["portal"], self.hu["hepatic"], self.hu["portal"])
        for box, dist, r, kind in self._capsules(z):
            w = np.clip((_F32(r) - dist) / _F32(self.dx) + _F32(0.5), 0.0, 1.0)
            if kind == 2:  # the trunk at the hilum: background wherever it runs
                mask = (w > 0.5) & cavity[box]
                self._paint(hu, liver, box, mask, values[2])
                continue
            inside = liver[box]
            target = hu[box]
            target += np.where(inside, w * (_F32(values[kind]) - target), _F32(0.0))

    def _paint_gallbladder(self, z, hu, liver, cavity) -> None:
        if self.gallbladder is None:
            return
        neck, fundus, radius, wall = self.gallbladder
        if not (min(neck[2], fundus[2]) - radius - wall <= z <= max(neck[2], fundus[2]) + radius + wall):
            return
        d = fundus - neck
        t = (z - neck[2]) / d[2] if abs(d[2]) > 1e-3 else 0.5
        t = min(max(t, 0.0), 1.0)
        centre = neck + t * d
        box = self._box(centre[0], centre[1], radius + wall + abs(d[0]) + abs(d[1]) + 2.0)
        if box is None:
            return
        U, V = self._grid(box)
        s = ((U - neck[0]) * d[0] + (V - neck[1]) * d[1] + (z - neck[2]) * d[2]) / _F32(d @ d)
        s = np.clip(s, 0.0, 1.0)
        dist = np.sqrt((neck[0] + s * d[0] - U) ** 2 + (neck[1] + s * d[1] - V) ** 2 + (neck[2] + s * d[2] - z) ** 2)
        taper = _F32(radius) * (_F32(0.6) + _F32(0.4) * np.sqrt(s))  # a narrow neck, a round fundus
        inside = cavity[box]
        self._paint(hu, liver, box, (dist < taper + _F32(wall)) & inside, self.hu["gb_wall"])
        self._paint(hu, liver, box, (dist < taper) & inside, self.hu["gallbladder"])

    def _paint_organ(self, organ: _Organ, k, z, hu, liver, cavity, warp: float, texture: float = 0.0,
                     wall: tuple[float, float] | None = None) -> None:
        s = organ.scale(z)
        if s <= 0.03:
            return
        box = self._box(organ.cu, organ.cv, organ.radius() * s * 1.2 + organ.rim_mm + 5)
        if box is None:
            return
        U, V = self._grid(box)
        rho = np.sqrt(_rho2(U, V, organ.cu, organ.cv, organ.au * s, organ.av * s, organ.angle))
        if warp:
            rho = rho + self.f_organ_shape.plane(k, box) * _F32(warp)
        inside = cavity[box]
        rim = 1.0 + organ.rim_mm / (min(organ.au, organ.av) * s)
        self._paint(hu, liver, box, (rho < rim) & inside, self.hu["visceral_fat"])
        if wall is not None:  # e.g. the myocardium around the heart's blood pool
            self._paint(hu, liver, box, (rho < 1.0) & inside, wall[1])
            core = (rho < 1.0 - wall[0] / (min(organ.au, organ.av) * s)) & inside
            self._paint(hu, liver, box, core, organ.hu)
            return
        mask = (rho < 1.0) & inside
        if texture:
            values = _F32(organ.hu) + self.f_tissue.plane(k, box) * _F32(texture)
            hu[box][mask] = values[mask]
            liver[box][mask] = False
        else:
            self._paint(hu, liver, box, mask, organ.hu)

    def _paint_kidney(self, kidney: _Organ, z, hu, liver, cavity) -> None:
        s = kidney.scale(z)
        if s <= 0.03:
            return
        box = self._box(kidney.cu, kidney.cv, kidney.radius() * s + kidney.rim_mm + 5)
        if box is None:
            return
        U, V = self._grid(box)
        r2 = _rho2(U, V, kidney.cu, kidney.cv, kidney.au * s, kidney.av * s, kidney.angle)
        rim = (1.0 + kidney.rim_mm / (min(kidney.au, kidney.av) * s)) ** 2
        inside = cavity[box]
        self._paint(hu, liver, box, (r2 < rim) & inside, self.hu["visceral_fat"])
        self._paint(hu, liver, box, (r2 < 1.0) & inside, kidney.hu)
        if s > 0.5:  # medulla, darker than the cortex in the arterial phase
            self._paint(hu, liver, box, (r2 < 0.45) & inside, self.hu["medulla"])
        if s > 0.8:  # renal sinus at the hilum, facing the spine
            side = 1.0 if kidney.cu < self.ub else -1.0
            sinus = _rho2(U, V, kidney.cu + side * 0.45 * kidney.au, kidney.cv - 0.1 * kidney.av,
                          0.45 * kidney.au, 0.35 * kidney.av, kidney.angle)
            self._paint(hu, liver, box, (sinus < 1.0) & (r2 < 1.0) & inside, self.hu["sinus"])

    def _paint_stomach(self, k, z, hu, liver, cavity) -> None:
        st = self.stomach
        s = st.scale(z)
        if s <= 0.03:
            return
        box = self._box(st.cu, st.cv, st.radius() * s * 1.2 + st.rim_mm + 5)
        if box is None:
            return
        U, V = self._grid(box)
        rho = np.sqrt(_rho2(U, V, st.cu, st.cv, st.au * s, st.av * s, st.angle))
        rho = rho + self.f_organ_shape.plane(k, box) * _F32(0.08)
        inside = cavity[box]
        minor = min(st.au, st.av) * s
        self._paint(hu, liver, box, (rho < 1.0 + st.rim_mm / minor) & inside, self.hu["visceral_fat"])
        self._paint(hu, liver, box, (rho < 1.0) & inside, st.hu)
        lumen = (rho < 1.0 - 4.0 / minor) & inside
        self._paint(hu, liver, box, lumen, self.hu["stomach_lumen"])
        if self.stomach_gas:  # gas rises to the front in a supine patient
            gas = lumen & (V < _F32(st.cv - 0.35 * st.av * s))
            self._paint(hu, liver, box, gas, AIR_HU)

    def _paint_lungs(self, z, hu, liver, cavity) -> None:
        drop = self.dome_drop_mm
        lowest = min(self.dome_right[0], self.dome_left[0]) - drop * 3.0
        if z < lowest:
            return
        lung = np.zeros_like(liver)
        band = np.zeros_like(liver)
        for (apex, _, _), q, side in zip((self.dome_right, self.dome_left), self.dome_q, (False, True)):
            level = _F32((apex - z) / drop)
            half = self.left_side if side else ~self.left_side
            lung |= half & (q > level)
            band |= half & (q > level - _F32(3.0 / drop)) & (q <= level)
        mediastinum = np.abs(self.u[:, None] - _F32(self.ub)) < _F32(15.0)
        lung &= cavity & ~mediastinum
        band &= cavity & ~mediastinum
        box = (slice(None), slice(None))
        self._paint(hu, liver, box, band, self.hu["muscle"])
        self._paint(hu, liver, box, lung, self.hu["lung"])

    def _paint_vessels(self, hu, liver) -> None:
        cu, cv, r = self.aorta
        box = self._box(cu, cv, r + 4)
        if box is not None:
            U, V = self._grid(box)
            r2 = _rho2(U, V, cu, cv, r, r)
            self._paint(hu, liver, box, r2 < ((r + 2.0) / r) ** 2, self.hu["visceral_fat"])
            self._paint(hu, liver, box, r2 < 1.0, self.hu["aorta"])
        cu, cv, au, av = self.ivc
        box = self._box(cu, cv, max(au, av) + 2)
        if box is not None:
            U, V = self._grid(box)
            self._paint(hu, liver, box, _rho2(U, V, cu, cv, au, av) < 1.0, self.hu["ivc"])

    def _paint_spine(self, z, hu, liver, body) -> None:
        H = self.hu
        for cu, au, av in self.paraspinal:
            cv = self.v_spine + self.rvb + 22.0
            box = self._box(cu, cv, max(au, av) + 1)
            if box is not None:
                U, V = self._grid(box)
                self._paint(hu, liver, box, (_rho2(U, V, cu, cv, au, av) < 1.0) & body[box], H["muscle"])
        cu, cv, rv = self.ub, self.v_spine, self.rvb
        disc = (z + self.disc_phase) % self.disc_period < 7.0
        box = self._box(cu, cv, rv + 45.0)
        if box is None:
            return
        U, V = self._grid(box)
        r = np.sqrt(_rho2(U, V, cu, cv, 1.0, 1.0))
        if disc:
            self._paint(hu, liver, box, r < rv, H["disc"])
        else:
            self._paint(hu, liver, box, r < rv, H["cortical"])
            self._paint(hu, liver, box, r < rv - 2.0, H["cancellous"])
        canal_v = cv + rv + 9.0
        rc = np.sqrt(_rho2(U, V, cu, canal_v, 1.0, 1.0))
        if not disc:
            arch = (rc < 14.0) & (V > _F32(canal_v - 3.0))
            spinous = _rho2(U, V, cu, canal_v + 24.0, 5.0, 13.0) < 1.0
            self._paint(hu, liver, box, arch | spinous, H["cortical"])
            self._paint(hu, liver, box, (rc < 12.0) & (V > _F32(canal_v + 2.0)), H["cancellous"])
        self._paint(hu, liver, box, rc < 8.0, H["csf"])

    def _paint_ribs(self, z, hu, liver) -> None:
        if z < self.rib_z_min:
            return
        scale = 1.0 + self.body_zwave[0] * math.sin(2 * math.pi * z / self.body_zwave[1] + self.body_zwave[2])
        for theta, phase in self.ribs:
            # Ribs run obliquely, so each angle shows a rib in some slices only.
            if (z + phase + 8.0 * theta) % self.rib_period > 0.55 * self.rib_period:
                continue
            depth = float(self._wall_mm(theta)) + 0.5 * self.muscle_mm
            r = float(self._surface_radius(theta)) * scale - depth
            cu, cv = self.ub + r * math.cos(theta), self.vb + r * math.sin(theta)
            box = self._box(cu, cv, 9.0)
            if box is None:
                continue
            U, V = self._grid(box)
            r2 = _rho2(U, V, cu, cv, 4.5, 7.5, theta)
            self._paint(hu, liver, box, r2 < 1.0, self.hu["rib_cortex"])
            self._paint(hu, liver, box, r2 < 0.45, self.hu["cancellous"])

    # -- tumors --------------------------------------------------------------------------

    def _plan_tumors(self) -> list[tuple[float, str, float]]:
        """Diameters (mm), kinds and contrasts; most cases get one lesion of >= 15 mm."""
        rng, u = self.rng, self.rng.uniform
        case_kind = "hyper" if rng.random() < HYPER_LESION_CASES[self.phase] else "hypo"
        roll = rng.random()
        if roll < DOMINANT_MASS_SHARE:  # one mass filling much of a lobe
            diameters = [u(55.0, DOMINANT_MASS_MAX_MM)]
        else:
            diameters = [u(LARGE_TUMOR_MIN_MM, 55.0) if roll < 0.85 else u(SMALL_TUMOR_MAX_MM, LARGE_TUMOR_MIN_MM)]
        for _ in range(int(rng.choice(5, p=[0.35, 0.25, 0.18, 0.12, 0.10]))):
            category = rng.random()
            if category < 0.45:
                diameters.append(u(4.0, SMALL_TUMOR_MAX_MM))
            elif category < 0.75:
                diameters.append(u(SMALL_TUMOR_MAX_MM, 20.0))
            else:
                diameters.append(u(20.0, 45.0))
        plan = []
        for diameter in sorted(diameters, reverse=True):
            kind = case_kind if rng.random() < 0.9 else ("hyper" if case_kind == "hypo" else "hypo")
            contrast = -u(20.0, 60.0) if kind == "hypo" else u(30.0, 60.0)
            plan.append((diameter, kind, contrast))
        return plan

    def place_tumors(self, labels: np.ndarray) -> list[dict]:
        """Put each planned lesion's centre on a liver voxel deep enough to hold most of it."""
        placed: list[dict] = []
        if not self.tumor_plan:
            return placed
        liver_flat = np.flatnonzero(labels.ravel(order="F") == LABEL_LIVER)
        if liver_flat.size == 0:
            logger.warning("phantom liver is empty; case written without tumors")
            return placed
        rng, u = self.rng, self.rng.uniform
        spacing = np.array([self.dx, self.dy, self.dz])
        shape = np.array(labels.shape)
        for diameter, kind, contrast in self.tumor_plan:
            center = None
            for _ in range(4):
                radius = diameter / 2
                rz = radius * u(0.8, 1.2)
                reach = np.array([radius, radius, rz]) * 0.7 / spacing
                offsets = np.rint(np.diag(reach)).astype(int)
                offsets = np.concatenate([offsets, -offsets, np.zeros((1, 3), int)])
                picks = rng.choice(liver_flat, size=min(96, liver_flat.size))
                ijk = np.stack(np.unravel_index(picks, labels.shape, order="F"), axis=1)
                points = ijk[:, None, :] + offsets[None]
                inb = ((points >= 0) & (points < shape)).all(axis=2)
                clipped = np.clip(points, 0, shape - 1)
                deep = inb & (labels[clipped[..., 0], clipped[..., 1], clipped[..., 2]] == LABEL_LIVER)
                ok = deep.all(axis=1)
                for p in placed:  # lesions side by side, not inside each other
                    gap = np.linalg.norm((ijk - p["ijk"]) * spacing, axis=1)
                    ok &= gap > 0.9 * (radius + p["radius"])
                if ok.any():
                    center = ijk[int(np.argmax(ok))]
                    break
                diameter *= 0.75
            if center is None:
                logger.debug("no room for a %.1f mm lesion; skipped", diameter)
                continue
            big = radius >= 12.0
            placed.append(
                {
                    "ijk": center, "radius": radius, "rz": rz, "kind": kind, "contrast": contrast,
                    "diameter": diameter, "angle": u(0.0, math.pi), "aspect": u(0.8, 1.25),
                    "edge": u(0.8, min(2.5, max(0.9, radius / 2))),
                    "lobes": (int(rng.integers(2, 6)), u(0.0, 0.12), u(0.0, 2 * math.pi)),
                    "core": -u(10.0, 20.0) if (big and kind == "hypo" and rng.random() < 0.5) else 0.0,
                    "voxels": 0,
                }
            )
        return placed

    def render_tumors(self, k: int, hu: np.ndarray, labels: np.ndarray, tumors: list[dict]) -> None:
        """Blend lesions into slice ``k`` (liver voxels only) and label them."""
        z = float(self.z[k])
        for t in tumors:
            i, j, kc = t["ijk"]
            dzn = (z - float(self.z[kc])) / t["rz"]
            if abs(dzn) >= 1.0 + 3.0 * t["edge"] / t["rz"]:
                continue
            cu, cv = float(self.u[i]), float(self.v[j])
            radius = t["radius"]
            box = self._box(cu, cv, radius * 1.5 + 3.0 * t["edge"])
            if box is None:
                continue
            U, V = self._grid(box)
            in_plane = _rho2(U, V, cu, cv, radius * t["aspect"], radius / t["aspect"], t["angle"])
            m, amp, phase = t["lobes"]
            if amp:  # lobulated outline; in plane only, so the lesion's poles stay round
                in_plane = in_plane * (
                    1.0 + _F32(amp) * np.cos(m * np.arctan2(V - _F32(cv), U - _F32(cu)) + _F32(phase))
                ) ** 2
            d = np.sqrt(in_plane + _F32(dzn * dzn))
            # A soft edge a few millimetres wide: (1 - d) * radius is roughly the depth in mm.
            weight = expit((1.0 - d) * _F32(radius / t["edge"])).astype(_F32)
            in_liver = labels[box] >= LABEL_LIVER
            # The lesion replaces the parenchyma and the vessels it grows over.
            delta = weight * (_F32(self.liver_hu + t["contrast"]) - hu[box])
            if t["core"]:
                delta += expit((0.5 - d) * _F32(radius / t["edge"])).astype(_F32) * _F32(t["core"])
            hu[box] += np.where(in_liver, delta, _F32(0.0))
            lesion = in_liver & (weight > 0.5)
            labels[box][lesion] = LABEL_TUMOR
            t["voxels"] += int(lesion.sum())

    # -- whole case -----------------------------------------------------------------------

    def affine(self) -> np.ndarray:
        """``diag(-dx, -dy, dz)`` with the origin placed like a scanner's table coordinates."""
        aff = np.diag([-self.dx, -self.dy, self.dz, 1.0])
        aff[:3, 3] = [
            (self.nx - 1) / 2 * self.dx + self.rng.uniform(-20.0, 20.0),
            (self.ny - 1) / 2 * self.dy + self.rng.uniform(100.0, 250.0),
            -self.rng.uniform(300.0, 800.0),
        ]
        return aff

    def build(self) -> PhantomCase:
        shape = (self.nx, self.ny, self.nz)
        # Fortran order: a slice [:, :, k] is contiguous, and NIfTI stores this order on disk.
        volume = np.empty(shape, np.int16, order="F")
        labels = np.zeros(shape, np.uint8, order="F")
        hu = np.empty((self.nx, self.ny), _F32)
        liver = np.empty((self.nx, self.ny), bool)
        # Pass 1: noise-free anatomy, so lesions can then be placed on real liver voxels.
        for k in range(self.nz):
            self.render_anatomy(k, hu, liver)
            volume[:, :, k] = np.rint(np.clip(hu, MIN_HU, MAX_HU))
            labels[:, :, k] = liver
        tumors = self.place_tumors(labels)
        # Pass 2: lesions, partial-volume blur, noise, out-of-field padding.
        blurred = np.empty_like(hu)
        grain = np.empty_like(hu)
        white = _F32(self.noise_hu * math.sqrt(1.0 - self.noise_grain**2))
        # Gaussian filtering white noise with sigma 1 px leaves 1 / (2 sqrt(pi)) of its std.
        correlated = _F32(self.noise_hu * self.noise_grain * 2.0 * math.sqrt(math.pi))
        outside = ~self.fov
        body = volume[:, :, 0] > -500  # refreshed per slice below, for the streaks
        for k in range(self.nz):
            hu[...] = volume[:, :, k]
            lab = labels[:, :, k]
            self.render_tumors(k, hu, lab, tumors)
            ndimage.gaussian_filter(hu, self.blur_px, output=blurred, mode="nearest")
            if self.streaks is not None:
                body = hu > -500
                blurred += self._streak_plane(k) * body
            blurred += self.rng.standard_normal(blurred.shape, dtype=_F32) * white
            if correlated:
                ndimage.gaussian_filter(self.rng.standard_normal(blurred.shape, dtype=_F32), 1.0, output=grain)
                blurred += grain * correlated
            np.clip(blurred, MIN_HU, MAX_HU, out=blurred)
            blurred[outside] = self.pad_hu
            volume[:, :, k] = np.rint(blurred)
        specs = tuple(
            TumorSpec(
                center_ijk=tuple(int(c) for c in t["ijk"]), diameter_mm=round(float(t["diameter"]), 2),
                kind=t["kind"], contrast_hu=round(float(t["contrast"]), 2), voxels=int(t["voxels"]),
            )
            for t in tumors
        )
        return PhantomCase(
            volume_hu=volume, labels=labels, affine=self.affine(), pad_hu=self.pad_hu,
            liver_hu=float(self.liver_hu), noise_hu=float(self.noise_hu), tumors=specs,
            phase=self.phase, anatomy=self.anatomy(),
        )

    def _streak_plane(self, k: int) -> np.ndarray:
        """Streaks fanning out from the spine, changing from slice to slice, plus cupping."""
        st = self.streaks
        pattern = np.zeros_like(self.streak_theta)
        for n, phase, rate in st["waves"]:
            pattern += np.cos(n * self.streak_theta + _F32(phase + rate * k))
        pattern = np.sign(pattern) * pattern * pattern  # sharper, stripe-like
        out = pattern * self.streak_decay * _F32(st["amp"] / len(st["waves"]))
        if st["cupping"]:
            out -= _F32(st["cupping"]) * np.clip(1.0 - self.r / self.r_surface, 0.0, 1.0)
        return out

    def anatomy(self) -> dict:
        """The drawn anatomy that labels do not show, in voxel indices where it has a place."""

        def ijk(p):
            return [int(round((p[0] - self.u[0]) / self.dx)), int(round((p[1] - self.v[0]) / self.dy)),
                    int(round(p[2] / self.dz))]

        gb = None
        if self.gallbladder is not None:
            neck, fundus, radius, _ = self.gallbladder
            gb = {"neck_ijk": ijk(neck), "fundus_ijk": ijk(fundus), "radius_mm": round(float(radius), 2)}
        j = int(math.ceil((self.table_top_mm - self.v[0]) / self.dy))
        i = int(round((self.ub + self.table["shift"] - self.u[0]) / self.dx))
        table_j = j if 0 <= j < self.ny and 0 <= i < self.nx and self.fov[i, j] else None
        return {
            "phase": self.phase, "hu": {k: round(v, 1) for k, v in self.hu.items()},
            "gallbladder": gb, "table_top_j": table_j, "table_i": i,
            "liver_top_mm": round(float(self.zl1), 1), "streaks": self.streaks is not None,
            "large_left_lobe": self.large_left_lobe,
        }


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------


def _check_range(name: str, value: Sequence[float], minimum: float, integer: bool = False) -> tuple:
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (min, max) pair, got {value!r}") from None
    if integer and (int(lo) != lo or int(hi) != hi):
        raise ValueError(f"{name} must be whole numbers, got {value!r}")
    if not (minimum <= lo <= hi):
        raise ValueError(f"{name} must satisfy {minimum} <= min <= max, got {value!r}")
    return (int(lo), int(hi)) if integer else (float(lo), float(hi))


def make_phantom_case(
    seed: int | np.random.SeedSequence,
    *,
    size: int = DEFAULT_SIZE,
    slices: tuple[int, int] = DEFAULT_SLICES,
    spacing_mm: tuple[float, float] = DEFAULT_SPACING_MM,
    thickness_mm: tuple[float, float] = DEFAULT_THICKNESS_MM,
    tumor_free: bool | None = None,
) -> PhantomCase:
    """Makes one synthetic abdominal CT case with liver and tumor labels.

    Args:
        seed: int or ``numpy.random.SeedSequence``; the same seed gives byte-identical arrays.
        size: in-plane matrix size (``X = Y = size``), at least 32. Default 256.
        slices: ``(min, max)`` slice count, drawn per case, inclusive. Default ``(32, 64)``.
        spacing_mm: ``(min, max)`` in-plane spacing for a 512 matrix, scaled by ``512 / size``
            and raised where the body would not fit. Default ``(0.6, 1.0)``.
        thickness_mm: ``(min, max)`` slice thickness, narrowed to cover 150-450 mm where the
            slice count allows. Default ``(1.0, 5.0)``.
        tumor_free: True for no lesion, False for at least one planned lesion, None to draw
            (one case in six is tumor-free). Default None.

    Returns:
        A :class:`PhantomCase`: ``volume_hu`` int16 ``(size, size, Z)``, ``labels`` uint8 of
        the same shape (0 background, 1 liver, 2 tumor), ``affine`` float64 ``(4, 4)``
        (``diag(-dx, -dy, dz)`` plus a translation), and the lesions placed.

    Raises:
        ValueError: for a size below 32 or an invalid range.

    Example:
        >>> case = make_phantom_case(7, size=64, slices=(16, 16), tumor_free=False)
        >>> case.labels.shape, bool((case.labels == 2).any())
        ((64, 64, 16), True)
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 32:
        raise ValueError(f"size must be an integer >= 32, got {size!r}")
    slices = _check_range("slices", slices, 1, integer=True)
    spacing_mm = _check_range("spacing_mm", spacing_mm, 1e-3)
    thickness_mm = _check_range("thickness_mm", thickness_mm, 1e-3)
    sequence = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    rng = np.random.default_rng(sequence)
    return _Builder(rng, int(size), slices, spacing_mm, thickness_mm, tumor_free).build()


def _nifti(array: np.ndarray, affine: np.ndarray):
    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    image.header.set_data_dtype(array.dtype)
    image.header.set_xyzt_units("mm", "sec")
    # Scanner-anchored, as DICOM converters write them; zooms follow from the affine.
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return image


def tumor_free_cases(cases: int, seed: int) -> list[bool]:
    """Which cases of a set are tumor-free: one in six, at seed-dependent positions.

    Case ``i`` gets the same answer whatever the set's size, so a set grown later keeps its
    first cases.

    Example:
        >>> sum(tumor_free_cases(12, seed=0))
        2
    """
    offset = int(np.random.SeedSequence(seed).generate_state(1)[0]) % TUMOR_FREE_PERIOD
    return [(i + offset) % TUMOR_FREE_PERIOD == 0 for i in range(cases)]


#: LiTS's training set: 131 volumes, 58,638 slices, 74 to 987 per volume; by index, volumes 0-100
#: hold 39,307 slices, 101-115 hold 12,045 and 116-130 hold 7,286 (the KiU-Net split's counts, as
#: documented for LiTS17 by kaiko-ai/eva, docs/datasets/lits.md).
LITS_VOLUMES = 131
LITS_SLICES = 58_638
LITS_SLICE_RANGE = (74, 987)
LITS_GROUPS = ((101, 39_307), (15, 12_045), (15, 7_286))


def lits_slice_counts(seed: int = 0) -> list[int]:
    """Slice counts of a LiTS-sized set: 131 volumes, 58,638 slices, 74 to 987 each.

    LiTS publishes no per-volume list here, so the counts are drawn (log-normal around each
    index group's mean) and then adjusted to LiTS's facts exactly: the total, the range (its
    minimum and maximum both occur) and the slices of each index group (:data:`LITS_GROUPS`).

    Args:
        seed: seed of the draw; the same seed gives the same list.

    Returns:
        131 integers, case ``i``'s slice count at index ``i``.

    Example:
        >>> counts = lits_slice_counts()
        >>> len(counts), sum(counts), min(counts), max(counts)
        (131, 58638, 74, 987)
    """
    low, high = LITS_SLICE_RANGE
    rng = np.random.default_rng(np.random.SeedSequence([seed, 131]))
    counts: list[int] = []
    for group, (n, total) in enumerate(LITS_GROUPS):
        values = np.clip(rng.lognormal(math.log(total / n), 0.4, n), low, high)
        pinned = np.zeros(n, bool)
        if group == 0:  # the set's extremes, placed where their group's mean allows them
            values[int(np.argmin(values))], pinned[int(np.argmin(values))] = low, True
        if group == 1:
            values[int(np.argmax(values))], pinned[int(np.argmax(values))] = high, True
        free = ~pinned
        for _ in range(50):  # scale the free values to the group's total, within the range
            scale = (total - values[pinned].sum()) / values[free].sum()
            values[free] = np.clip(values[free] * scale, low, high)
        ints = np.round(values).astype(int)
        order = np.flatnonzero(free)
        step = 0
        while ints.sum() != total:  # rounding: move one slice at a time, within the range
            i = order[step % len(order)]
            delta = 1 if ints.sum() < total else -1
            if low <= ints[i] + delta <= high:
                ints[i] += delta
            step += 1
        counts += ints.tolist()
    return counts


def iter_phantom_cases(
    cases: int, seed: int = 0, *, slice_counts: Sequence[int] | None = None, **case_kwargs
) -> Iterator[tuple[int, PhantomCase]]:
    """Yields ``(index, case)`` for a set; case ``i`` depends only on ``seed`` and ``i``.

    Args:
        cases: number of cases, at least 1.
        seed: seed of the set; each case is seeded from ``SeedSequence(seed).spawn``.
        slice_counts: one slice count per case (e.g. :func:`lits_slice_counts`), replacing
            ``slices``; None (default) draws each from ``slices``.
        **case_kwargs: passed to :func:`make_phantom_case` (not ``tumor_free``).

    Example:
        >>> [i for i, _ in iter_phantom_cases(2, seed=1, size=32, slices=(8, 8))]
        [0, 1]
    """
    for index, args in _case_arguments(cases, seed, slice_counts, case_kwargs):
        yield index, make_phantom_case(**args)


def _case_arguments(cases, seed, slice_counts, case_kwargs) -> list[tuple[int, dict]]:
    """``(index, make_phantom_case keyword arguments)`` for each case of a set."""
    if isinstance(cases, bool) or not isinstance(cases, (int, np.integer)) or cases < 1:
        raise ValueError(f"cases must be a positive integer, got {cases!r}")
    if slice_counts is not None:
        slice_counts = [int(n) for n in slice_counts]
        if len(slice_counts) != cases or min(slice_counts) < 1:
            raise ValueError(f"slice_counts must hold {cases} positive counts, one per case; got {len(slice_counts)}")
    children = np.random.SeedSequence(seed).spawn(cases)
    arguments = []
    for index, (child, free) in enumerate(zip(children, tumor_free_cases(cases, seed))):
        kwargs = dict(case_kwargs, seed=child, tumor_free=free)
        if slice_counts is not None:
            kwargs["slices"] = (slice_counts[index], slice_counts[index])
        arguments.append((index, kwargs))
    return arguments


#: Thread-count variables of the BLAS and OpenMP runtimes NumPy and SciPy may load.
_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _one_blas_thread_each() -> Iterator[None]:
    """Processes started inside run NumPy's matrix products on one thread each.

    The cases' smooth fields are small matrix products. With one process per core, each
    process's BLAS would start a thread per core too, and the threads of the processes wait
    on each other. A spawned process reads these variables when it starts, so they are set
    here, around the pool, and restored after; a value the user set is kept.
    """
    saved = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
    for name, value in saved.items():
        if value is None:
            os.environ[name] = "1"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)


def _write_case(index: int, kwargs: dict, volume_path: Path, label_path: Path) -> dict:
    """Makes case ``index``, writes its two files atomically, returns its ``phantom.json`` entry."""
    from keras_livseg.data.volumes import write_nifti  # with nibabel, only where files are written

    case = make_phantom_case(**kwargs)
    # Atomic (a temporary name, then a rename), and deflated by zlib: the same bytes in any process.
    write_nifti(_nifti(case.volume_hu, case.affine), volume_path, reproducible=True)
    write_nifti(_nifti(case.labels, case.affine), label_path, reproducible=True)
    logger.info(
        "case %d: %s, spacing %s mm, %d lesion(s)", index, case.volume_hu.shape,
        "x".join(f"{s:.2f}" for s in case.spacing), len(case.tumors),
    )
    return {
        "id": index, "volume": volume_path.name, "segmentation": label_path.name,
        "shape": list(case.volume_hu.shape), "spacing_mm": [round(s, 4) for s in case.spacing],
        "pad_hu": case.pad_hu, "liver_hu": round(case.liver_hu, 2), "noise_hu": round(case.noise_hu, 2),
        "phase": case.phase, "gallbladder": case.anatomy.get("gallbladder"),
        "streaks": case.anatomy.get("streaks"),
        "tumors": [dataclasses.asdict(t) for t in case.tumors],
    }


def write_phantom_dataset(
    out_dir: str | os.PathLike,
    cases: int = 12,
    seed: int = 0,
    *,
    size: int = DEFAULT_SIZE,
    slices: tuple[int, int] = DEFAULT_SLICES,
    slice_counts: Sequence[int] | None = None,
    spacing_mm: tuple[float, float] = DEFAULT_SPACING_MM,
    thickness_mm: tuple[float, float] = DEFAULT_THICKNESS_MM,
    gzip: bool = True,
    overwrite: bool = False,
    progress: bool = False,
    workers: int = 1,
) -> list[Path]:
    """Writes a phantom set in the LiTS layout and a ``phantom.json`` describing it.

    Files are ``volume-<i>.nii[.gz]`` (int16 HU) and ``segmentation-<i>.nii[.gz]`` (uint8,
    0/1/2) for ``i = 0 .. cases - 1``, each written under a temporary name and renamed, so an
    interrupted run never leaves a half-written file under a final name. ``phantom.json``
    (written last) lists every case's shape, spacing, pad value and lesions. Cases are made
    and written one at a time per worker (memory: one case per worker), so a LiTS-sized set
    (``slice_counts=lits_slice_counts()``, ~13 GB at 512 px) is never all in memory.

    Args:
        out_dir: output folder, created if missing.
        cases: number of cases, at least 1. Default 12.
        seed: seed of the set. Default 0.
        size, slices, spacing_mm, thickness_mm: as in :func:`make_phantom_case`.
        slice_counts: one slice count per case, replacing ``slices`` (see
            :func:`iter_phantom_cases`). Default None.
        gzip: write ``.nii.gz`` (True, default) or ``.nii``.
        overwrite: replace existing case files; without it an existing file is an error.
        progress: show a tqdm bar on stderr.
        workers: processes making cases in parallel (default 1: in this process). The files
            are the same bytes whatever the count.

    Returns:
        Paths written: volume and segmentation of each case in order, then ``phantom.json``.

    Raises:
        ValueError: for invalid arguments.
        FileExistsError: when a case file exists and ``overwrite`` is False.
        OSError: when the folder cannot be created or written.

    Example:
        >>> import tempfile
        >>> paths = write_phantom_dataset(tempfile.mkdtemp(), cases=1, size=32, slices=(8, 8))
        >>> [p.name for p in paths]
        ['volume-0.nii.gz', 'segmentation-0.nii.gz', 'phantom.json']
    """
    kwargs = dict(size=size, slices=slices, spacing_mm=spacing_mm, thickness_mm=thickness_mm)
    arguments = _case_arguments(cases, seed, slice_counts, kwargs)
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to {out}; choose a writable --out")
    ext = ".nii.gz" if gzip else ".nii"
    names = [tuple(out / name for name in lits_names(str(i), ext)) for i in range(cases)]
    if not overwrite:
        existing = [p for pair in names for p in pair if p.exists()]
        if existing:
            raise FileExistsError(f"{existing[0]} already exists; pass overwrite=True (--overwrite) to replace it")

    from tqdm import tqdm

    jobs = [(index, case_kwargs, *names[index]) for index, case_kwargs in arguments]
    bar = tqdm(total=cases, desc="phantom", unit="case", disable=not progress)
    try:
        if workers == 1:
            described = []
            for job in jobs:
                described.append(_write_case(*job))
                bar.update(1)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # Spawned, not forked: fit generates its phantom with TensorFlow loaded, which a fork
            # would copy half-initialized; a spawned child imports only NumPy, SciPy and nibabel.
            with _one_blas_thread_each(), ProcessPoolExecutor(
                min(workers, cases), mp_context=multiprocessing.get_context("spawn")
            ) as pool:
                futures = [pool.submit(_write_case, *job) for job in jobs]
                described = []
                for future in futures:  # in case order, so phantom.json does not depend on timing
                    described.append(future.result())
                    bar.update(1)
    finally:
        bar.close()
    written = [p for pair in names for p in pair]
    meta = {"generator": "keras_livseg.data.phantom", "seed": seed, "cases": described, **{
        k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}
    if slice_counts is not None:
        meta["slice_counts"] = [int(n) for n in slice_counts]
    meta_path = out / "phantom.json"
    atomic_write_json(meta_path, meta, unique=True)  # several processes may make one cache's phantom
    written.append(meta_path)
    return written
