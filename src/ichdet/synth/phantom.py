"""The phantom: pure functions from a :class:`~ichdet.synth.spec.StudyPlan` and a slice index to HU,
the anatomical masks, each lesion's blood mask and the six labels (see the package docstring)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from ichdet.names import LABELS
from ichdet.synth.spec import (
    AIR,
    BONE_HU,
    CSF,
    EDEMA,
    FAMILIES,
    HU_RANGE,
    MIN_VISIBLE_MM2,
    SCALP,
    SCALP_MM,
    Anatomy,
    Lesion,
    PhantomSlice,
    StudyPlan,
)

# ----------------------------------------------------------------------------------------- geometry


@lru_cache(maxsize=8)
def _pixel_grid(size: int, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in mm (x to image right, y down), origin at the image centre."""
    c = (np.arange(size, dtype=np.float64) - (size - 1) / 2) * spacing
    x, y = np.meshgrid(c, c)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _ellipse(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    """Mask of the axis-aligned ellipse with semi-axes ``a`` (u) and ``b`` (v) around the origin."""
    if a <= 0 or b <= 0:
        return np.zeros(u.shape, dtype=bool)
    return np.asarray((u / a) ** 2 + (v / b) ** 2 <= 1.0)


def _rotated(u: np.ndarray, v: np.ndarray, c: tuple[float, float], ang: float) -> tuple[np.ndarray, ...]:
    """Coordinates relative to centre ``c`` in a frame rotated by ``ang`` (along, across)."""
    du, dv = u - c[0], v - c[1]
    return du * math.sin(ang) + dv * math.cos(ang), du * math.cos(ang) - dv * math.sin(ang)


def _wrap(a: np.ndarray) -> np.ndarray:
    """Angles wrapped to [-pi, pi)."""
    return np.asarray((a + np.pi) % (2 * np.pi) - np.pi)


def _head_scale(t: float) -> float:
    """Relative size of the axial head section at height ``t``: widest a little below mid-height."""
    return max(0.3, math.sqrt(max(0.0, 1.0 - ((t - 0.42) / 0.68) ** 2)))


def _bone_mm(t: float) -> float:
    """Skull thickness (mm) at height ``t``: thick at the base, ~6 mm over the vault."""
    return 6.0 + 9.0 * (1.0 - t) ** 3


def _axes(anat: Anatomy, t: float) -> tuple[float, float, float, float]:
    """Outer-skull and inner-table semi-axes (a_out, b_out, a_in, b_in) in mm at height ``t``."""
    s = _head_scale(t)
    a, b = anat.head_mm[0] * s - SCALP_MM, anat.head_mm[1] * s - SCALP_MM
    bone = _bone_mm(t)
    return a, b, max(a - bone, 1.0), max(b - bone, 1.0)


@dataclass(frozen=True)
class _Slice:
    """Geometry and anatomical masks of one slice in the head frame (internal to the phantom)."""

    t: float
    spacing: float
    u: np.ndarray
    v: np.ndarray
    a_in: float
    b_in: float
    rho: np.ndarray  # elliptical radius w.r.t. the inner table (1 on the table)
    phi: np.ndarray  # parametric angle on the inner-table ellipse
    head: np.ndarray
    cranium: np.ndarray  # inside the outer surface of the skull
    skull: np.ndarray  # bone: the vault ring and, at the base, the petrous ridges
    sinus: np.ndarray  # air in the sphenoid sinus (base slices)
    intracranial: np.ndarray
    ventricles: tuple[tuple[np.ndarray, np.ndarray, float], ...]  # (mask, along-axis mm, half-length)
    fissure: np.ndarray
    sulci: np.ndarray
    cisterns: np.ndarray
    cistern_angle: np.ndarray


def _slice_geometry(plan: StudyPlan, k: int) -> _Slice:
    """Head-frame coordinates and every anatomical mask of slice ``k``."""
    anat, sp = plan.anatomy, plan.style.spacing_mm
    x, y = _pixel_grid(plan.size, sp)
    v, u = _rotated(x, y, anat.offset_mm, anat.rotation)
    t = plan.t(k)
    a_out, b_out, a_in, b_in = _axes(anat, t)
    rho = np.sqrt((u / a_in) ** 2 + (v / b_in) ** 2)
    cranium = _ellipse(u, v, a_out, b_out)
    petrous = (rho <= 1.0) & (t < 0.2) & _petrous(u, v)
    sinus = (rho <= 1.0) & (t < 0.16) & _ellipse(u, v + 30.0, 10.0, 7.0) & ~petrous
    intracranial = (rho <= 1.0) & ~petrous & ~sinus
    cistern_r = np.hypot(u, v - 4.0)
    return _Slice(
        t=t, spacing=sp, u=u, v=v, a_in=a_in, b_in=b_in, rho=rho,
        phi=np.arctan2(v / b_in, u / a_in),
        head=_ellipse(u, v, a_out + SCALP_MM, b_out + SCALP_MM),
        cranium=cranium,
        skull=(cranium & (rho > 1.0)) | petrous,
        sinus=sinus,
        intracranial=intracranial,
        ventricles=_ventricles(u, v, t, anat.ventricle_scale),
        fissure=intracranial & _fissure(u, v, t, b_in, sp),
        sulci=intracranial & _sulci(rho, t, a_in, b_in, anat.sulci, np.arctan2(v, u)),
        cisterns=intracranial & (0.14 < t < 0.3) & (cistern_r > 14.0) & (cistern_r < 19.0),
        cistern_angle=np.arctan2(v - 4.0, u),
    )  # fmt: skip


def _petrous(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Petrous ridges: two bony bars running postero-laterally from the skull base centre."""
    bars = [_rotated(u, v, (s * 26.0, 12.0), s * math.radians(50)) for s in (-1.0, 1.0)]
    return np.asarray(np.any([(al / 22.0) ** 2 + (ac / 4.0) ** 2 <= 1.0 for al, ac in bars], axis=0))


def _ventricles(
    u: np.ndarray, v: np.ndarray, t: float, scale: float
) -> tuple[tuple[np.ndarray, np.ndarray, float], ...]:
    """Lateral ventricles (left, right): frontal horns near the midline, occipital horns diverging."""
    if not 0.36 < t < 0.72:
        empty = np.zeros(u.shape, dtype=bool)
        return ((empty, np.zeros(u.shape), 0.0), (empty, np.zeros(u.shape), 0.0))
    vs = math.sqrt(1.0 - ((t - 0.54) / 0.18) ** 2)
    half_len, half_w = 26.0 * vs * scale, 3.0 + 3.0 * vs * scale
    out = []
    for side in (-1.0, 1.0):  # -1: patient's right (image left)
        along, across = _rotated(u, v, (side * (5.0 + 3.0 * scale), -4.0), -side * math.radians(14))
        out.append((np.asarray((along / half_len) ** 2 + (across / half_w) ** 2 <= 1.0), along, half_len))
    return tuple(out)


def _fissure(u: np.ndarray, v: np.ndarray, t: float, b_in: float, spacing: float) -> np.ndarray:
    """Interhemispheric fissure: a midline line, interrupted by the corpus callosum at mid levels."""
    if t < 0.3:
        return np.zeros(u.shape, dtype=bool)
    line = np.abs(u) < max(1.0, 0.55 * spacing)
    return np.asarray(line & (np.abs(v) > 0.35 * b_in)) if t < 0.7 else np.asarray(line)


def _sulci(
    rho: np.ndarray, t: float, a_in: float, b_in: float, sulci: tuple[int, float], theta: np.ndarray
) -> np.ndarray:
    """Cortical sulci: thin CSF clefts running inward from the brain surface over the convexity."""
    if t < 0.3:
        return np.zeros(rho.shape, dtype=bool)
    depth = 1.0 - 14.0 / (0.5 * (a_in + b_in))
    n, phase = sulci
    wiggle = 0.5 * np.sin(9.0 * rho + 3.0 * t)
    return np.asarray((rho > depth) & (np.cos(n * theta + phase + 4.0 * t + wiggle) > 0.92))


# ------------------------------------------------------------------------------------------ lesions


def _lesion_mask(les: Lesion, g: _Slice, z: float) -> np.ndarray:
    """Blood mask of ``les`` on the slice at height ``z`` (mm); empty outside its z-extent."""
    f = les.profile(z)
    if f <= 0.0:
        return np.zeros(g.u.shape, dtype=bool)
    shape = {
        "epidural": _epidural,
        "subdural": _subdural,
        "intraparenchymal": _intraparenchymal,
        "intraventricular": _intraventricular,
        "subarachnoid": _subarachnoid,
    }[les.kind]
    return np.asarray(shape(les, g, f) & g.intracranial)


def _epidural(les: Lesion, g: _Slice, f: float) -> np.ndarray:
    """Biconvex lens: half an ellipse bulging inward from a point of the inner table."""
    c, s = math.cos(les.angle), math.sin(les.angle)
    q = (g.a_in * c, g.b_in * s)  # the point on the inner table
    n = np.array([c / g.a_in, s / g.b_in])
    n /= np.linalg.norm(n)  # outward normal of the ellipse at q
    du, dv = g.u - q[0], g.v - q[1]
    inward, along = -(du * n[0] + dv * n[1]), du * n[1] - dv * n[0]
    return np.asarray((along / (les.extent_mm * f)) ** 2 + (inward / (les.thickness * f)) ** 2 <= 1.0)


def _subdural(les: Lesion, g: _Slice, f: float) -> np.ndarray:
    """Crescent along the inner table over one hemisphere, tapering to nothing at both ends."""
    d = np.abs(_wrap(g.phi - les.angle)) / les.extent_mm
    width = np.where(d < 1.0, les.thickness * f * np.cos(0.5 * np.pi * np.minimum(d, 1.0)), 0.0)
    depth = (1.0 - g.rho) * 0.5 * (g.a_in + g.b_in)  # approximate distance to the inner table
    return np.asarray(depth < width)


def _intraparenchymal(les: Lesion, g: _Slice, f: float) -> np.ndarray:
    """Irregular round blob in the parenchyma (a radius modulated by two harmonics)."""
    du, dv = g.u - les.center_mm[0], g.v - les.center_mm[1]
    psi = np.arctan2(dv, du)
    edge = les.extent_mm * f * (1.0 + 0.2 * np.sin(3 * psi + les.angle) + 0.1 * np.sin(5 * psi - les.angle))
    return np.asarray(np.hypot(du, dv) < edge)


def _intraventricular(les: Lesion, g: _Slice, f: float) -> np.ndarray:
    """Blood layering in the dependent (posterior) part of one or both lateral ventricles."""
    sides = {"right": (0,), "left": (1,), "both": (0, 1)}[les.variant]
    masks = [
        g.ventricles[i][0] & (g.ventricles[i][1] > g.ventricles[i][2] * (1.0 - 2.0 * les.thickness * f)) for i in sides
    ]
    return np.asarray(np.any(masks, axis=0))


def _subarachnoid(les: Lesion, g: _Slice, f: float) -> np.ndarray:
    """Thin hyperdense lines: a stretch of the fissure, a group of sulci, or part of the cisterns."""
    if les.variant == "fissure":
        return np.asarray(g.fissure & (np.abs(g.v - les.center_mm[1]) < les.extent_mm * f))
    if les.variant == "sulci":
        return np.asarray(g.sulci & (np.abs(_wrap(g.phi - les.angle)) < les.extent_mm * f))
    return np.asarray(g.cisterns & (np.abs(_wrap(g.cistern_angle - les.angle)) < les.extent_mm * f))


def min_visible_px(spacing_mm: float) -> int:
    """Smallest blood area (pixels) that makes a slice positive: ``MIN_VISIBLE_MM2``, at least 3 px."""
    return max(3, math.ceil(MIN_VISIBLE_MM2 / spacing_mm**2))


# ----------------------------------------------------------------------------------------- phantom


def _tissue(plan: StudyPlan, g: _Slice) -> np.ndarray:
    """Noise-free HU of the anatomy (no blood): air, scalp, skull, brain, CSF spaces."""
    anat = plan.anatomy
    wm, gm = anat.wm_gm_hu
    theta = np.arctan2(g.v, g.u)
    bone = 1400.0 + 250.0 * np.cos(2 * theta + anat.bone_phase[0]) + 150.0 * np.cos(5 * theta + anat.bone_phase[1])
    hu = np.full(g.u.shape, AIR)
    hu[g.head] = SCALP
    hu[g.skull] = bone[g.skull]
    hu[g.sinus] = AIR
    hu[g.intracranial] = wm
    cortex = g.intracranial & (g.rho > 1.0 - 4.0 / (0.5 * (g.a_in + g.b_in)))
    nuclei = (0.36 < g.t < 0.56) & (_ellipse(np.abs(g.u) - 18.0, g.v - 2.0, 8.0, 14.0))
    hu[cortex | (nuclei & g.intracranial)] = gm
    csf = g.sulci | g.fissure | g.cisterns | g.ventricles[0][0] | g.ventricles[1][0] | _small_csf(g)
    hu[csf & g.intracranial] = CSF
    return hu


def _small_csf(g: _Slice) -> np.ndarray:
    """Third ventricle (a midline slit) and fourth ventricle (posterior fossa)."""
    third = (0.28 < g.t < 0.42) & (np.abs(g.u) < max(2.0, 0.55 * g.spacing)) & (np.abs(g.v + 2.0) < 11.0)
    fourth = (0.1 < g.t < 0.24) & _ellipse(g.u, g.v - 28.0, 7.0, 5.0)
    return np.asarray(third | fourth)


def phantom_slice(plan: StudyPlan, k: int) -> PhantomSlice:
    """Render slice ``k`` of ``plan``: HU (int16, noise included), the cranial cavity, blood and labels.

    Pure: the same plan and index give the same arrays. Order of operations: anatomy, edema, blood,
    Gaussian noise (the family's ``noise_hu``), rounding, then clipping (full-contrast blood to the family's
    :attr:`~ichdet.synth.spec.Family.blood_clip`, skull to
    ``BONE_HU``, everything to ``HU_RANGE``). A faded lesion edge (:meth:`Lesion.contrast` < 1) is blood
    blended with the tissue under it.
    """
    g = _slice_geometry(plan, k)
    hu = _tissue(plan, g)
    blood = tuple(_lesion_mask(les, g, plan.z_mm(k)) for les in plan.lesions)
    for les, mask in zip(plan.lesions, blood, strict=True):
        if les.kind == "intraparenchymal":  # perihematomal edema, a low-density rim
            hu[_edema(les, g, plan.z_mm(k)) & ~mask] = EDEMA
    contrast = [les.contrast(plan.z_mm(k)) for les in plan.lesions]
    for les, mask, c in zip(plan.lesions, blood, contrast, strict=True):
        # a faded lesion (context-matters sets) blends into the tissue under it: faint, not clipped
        hu[mask] = les.hu if c >= 1.0 else hu[mask] + c * (les.hu - hu[mask])
    rng = np.random.default_rng([plan.noise_seed, k])
    family = FAMILIES[plan.family]
    hu = np.rint(hu + rng.normal(0.0, family.noise_hu, hu.shape))
    full = [mask for mask, c in zip(blood, contrast, strict=True) if c >= 1.0]
    any_blood = np.any(full, axis=0) if full else np.zeros(hu.shape, dtype=bool)
    hu = np.where(any_blood, np.clip(hu, *family.blood_clip), np.where(g.skull, np.clip(hu, *BONE_HU), hu))
    hu = np.clip(hu, *HU_RANGE).astype(np.int16)
    return PhantomSlice(hu=hu, intracranial=g.intracranial, blood=blood, labels=_labels(plan, blood))


def _edema(les: Lesion, g: _Slice, z: float) -> np.ndarray:
    """The edema rim around an intraparenchymal blob: 30% wider than the blood, plus 2 mm."""
    f = les.profile(z)
    if f <= 0.0:
        return np.zeros(g.u.shape, dtype=bool)
    grown = replace(les, extent_mm=les.extent_mm * 1.3 + 2.0 / f)
    return np.asarray(_intraparenchymal(grown, g, f) & g.intracranial)


def _labels(plan: StudyPlan, blood: Sequence[np.ndarray]) -> np.ndarray:
    """Six labels of a slice: a subtype is positive when its lesion covers the minimum visible area."""
    out = np.zeros(len(LABELS), dtype=np.uint8)
    need = min_visible_px(plan.style.spacing_mm)
    for les, mask in zip(plan.lesions, blood, strict=True):
        if int(mask.sum()) >= need:
            out[LABELS.index(les.kind)] = 1
    out[-1] = out[:-1].max()
    return out


def render_slice(plan: StudyPlan, k: int) -> np.ndarray:
    """HU image (int16, ``(size, size)``) of slice ``k`` of ``plan``; see :func:`phantom_slice`."""
    return phantom_slice(plan, k).hu
