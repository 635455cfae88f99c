"""Synthetic head-CT studies in the RSNA 2019 Kaggle layout: the embedded data set of the demo and tests.

Three layers, kept apart (the math first, the I/O last):

1. **plan** (:func:`plan_dataset`): every random choice (anatomy, lesions, ids, DICOM style) is drawn from
   one ``np.random.default_rng(spec.seed)`` into frozen :class:`StudyPlan` objects, in a fixed order.
2. **phantom** (:func:`phantom_slice`, :func:`render_slice`): pure functions from a
   plan and a slice index to HU, blood masks and labels. The noise of a slice comes from
   ``default_rng([plan.noise_seed, k])``, so a slice renders the same every time, in any order.
3. **I/O** (:func:`make_dataset`): DICOM files and the Kaggle CSVs, each written atomically.

Geometry. Slice ``k`` of a study (``0`` = skull base, ``n-1`` = vertex) sits at the anatomical height
``t = t0 + (t1 - t0) k / (n - 1)`` in [0, 1]. In-plane coordinates are millimetres in the *head frame*
(``u`` to the patient's left = image right, ``v`` posterior = image down), a rotated, shifted copy of
the pixel grid. Layers are concentric ellipses: scalp, skull (thicker at the base), then the cranial
cavity holding cortex, white matter, deep grey nuclei, sulci, the interhemispheric fissure, ventricles
and basal cisterns (CSF), all shrinking toward base and vertex.

Hemorrhage (55–80 HU) is a :class:`Lesion` with a centre height and a half z-extent; its in-plane size
follows ``sqrt(1 - (dz / z_half)^2)``, so it grows and shrinks smoothly over several slices. A slice is
positive for a subtype when that lesion's mask there covers at least :func:`min_visible_px` pixels.

Pixel layouts (``StudyPlan.layout``), all with RescaleSlope 1:

============  =========  =======  ======  =========  =======================================
layout        BitsStored HighBit  PixRep  Intercept  stored value
============  =========  =======  ======  =========  =======================================
signed16      16         15       1       -1024      HU + 1024 (int16)
unsigned12    12         11       0       -1024      clip(HU + 1024, 0, 4095)
rsna12        12         11       0       0          HU mod 4096 (the RSNA quirk; see below)
============  =========  =======  ======  =========  =======================================

``rsna12`` mimics the broken files of the challenge: read naively (intercept 0) air shows at ~3096 HU.
The community fix (BitsStored 12, PixelRepresentation 0, intercept > -100: ``x = raw + 1000``, subtract
4096 where ``x >= 4096``, intercept -1000) restores HU exactly, because every phantom HU is in
[-1000, 3071].
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from ichdet.errors import ConfigError, IchdetError
from ichdet.io import atomic_path, remove_stale_temps
from ichdet.labels import LABELS, write_labels, write_submission

__all__ = [
    "HU_RANGE",
    "INSTANCE_ORDERS",
    "KINDS",
    "LAYOUTS",
    "Anatomy",
    "DicomStyle",
    "Lesion",
    "PhantomSlice",
    "StudyPlan",
    "SynthSpec",
    "SynthSummary",
    "build_dataset",
    "encode_pixels",
    "make_dataset",
    "min_visible_px",
    "phantom_slice",
    "plan_dataset",
    "render_slice",
    "visible_slices",
]

T = TypeVar("T")
Layout = Literal["signed16", "unsigned12", "rsna12"]
LAYOUTS: tuple[Layout, ...] = ("signed16", "unsigned12", "rsna12")
KINDS: tuple[str, ...] = LABELS[:5]
"""The five subtypes a lesion can be (``any`` is derived)."""
INSTANCE_ORDERS: tuple[str, ...] = ("ascending", "descending", "shuffled")
"""How InstanceNumber relates to z (base to vertex) in a study; real exports show all three."""
HU_RANGE = (-1000, 3071)
"""Every phantom HU lies here: representable in all three layouts, the RSNA fix inverts ``rsna12``."""

TRAIN_DIR, TEST_DIR = "stage_2_train_images", "stage_2_test_images"
TRAIN_CSV, SUBMISSION_CSV = "stage_2_train.csv", "stage_2_sample_submission.csv"

# Tissue values (HU). Acute blood is drawn per lesion in BLOOD_HU and clipped there after noise.
AIR, SCALP, CSF, EDEMA = -1000.0, 40.0, 6.0, 20.0
BONE_HU = (1000.0, 1800.0)
BLOOD_HU = (55.0, 80.0)
NOISE_HU = 5.0
SCALP_MM = 5.0
MIN_VISIBLE_MM2 = 12.0  # a lesion smaller than this on a slice does not make the slice positive

_KIND_WEIGHTS = np.array([0.08, 0.25, 0.17, 0.25, 0.25])  # EDH is rare, as in the real data
_WINDOWS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("30",), ("80",)),
    (("40",), ("80",)),
    (("50",), ("100",)),
    (("00036", "00036"), ("00080", "00080")),  # multi-valued, zero-padded, as in the real files
    (("00040", "00040"), ("00080", "00080")),
)


# ------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class SynthSpec:
    """What :func:`make_dataset` builds: study counts, image size (pixels), slices per study, seed.

    Whenever ``n_studies >= 3`` (the default is 12) the labelled set holds every subtype, every pixel
    layout and instance-number order, and both uncompressed transfer syntaxes (see :func:`plan_dataset`).
    """

    n_studies: int = 12
    n_test_studies: int = 2
    size: int = 128
    slices_per_study: tuple[int, int] = (16, 24)
    seed: int = 0

    def __post_init__(self) -> None:
        """Reject values the generator cannot honour, naming the value and the valid range."""
        lo, hi = self.slices_per_study
        if self.n_studies < 0 or self.n_test_studies < 0:
            raise ConfigError(f"study counts must be >= 0, got {self.n_studies}, {self.n_test_studies}")
        if not 32 <= self.size <= 1024:
            raise ConfigError(f"size must be in [32, 1024] pixels, got {self.size}")
        if not 8 <= lo <= hi <= 200:
            raise ConfigError(f"slices_per_study must be (lo, hi) with 8 <= lo <= hi <= 200, got {(lo, hi)}")


@dataclass(frozen=True)
class Lesion:
    """One hemorrhage: subtype, z-extent and in-plane shape (millimetres, head frame).

    ``z_mm`` is the centre height above slice 0 and ``z_half_mm`` the half extent. The other fields
    depend on ``kind``:

    ================  ===========================  ============================  =====================
    kind              angle (rad)                  extent_mm                     thickness
    ================  ===========================  ============================  =====================
    epidural          point on the inner table     half-length along the table   depth (mm)
    subdural          centre of the crescent       angular half-span (rad)       max thickness (mm)
    intraparenchymal  shape phase                  radius                        -
    intraventricular  -                            -                             fill fraction (0..1)
    subarachnoid      centre direction (sulci,     half-length (fissure),        -
                      cisterns)                    angular half-span (others)
    ================  ===========================  ============================  =====================

    ``variant``: ``left``/``right``/``both`` (intraventricular), ``fissure``/``sulci``/``cisterns``
    (subarachnoid). ``center_mm``: blob centre (intraparenchymal), ``(0, v)`` centre along the fissure.
    """

    kind: str
    z_mm: float
    z_half_mm: float
    hu: float
    angle: float = 0.0
    extent_mm: float = 0.0
    thickness: float = 0.0
    center_mm: tuple[float, float] = (0.0, 0.0)
    variant: str = ""

    def profile(self, z: float) -> float:
        """Relative in-plane size at height ``z`` (mm): 1 at the centre, 0 beyond ``z_half_mm``."""
        d = (z - self.z_mm) / self.z_half_mm
        return math.sqrt(1.0 - d * d) if abs(d) < 1.0 else 0.0


@dataclass(frozen=True)
class Anatomy:
    """The head of one study: size, pose, tissue values and the anatomical range its slices cover."""

    head_mm: tuple[float, float]  # outer semi-axes (left-right, antero-posterior) at the widest level
    offset_mm: tuple[float, float]  # head centre relative to the image centre
    rotation: float  # radians, in-plane
    t_range: tuple[float, float]  # anatomical heights of the first and last slice
    ventricle_scale: float
    sulci: tuple[int, float]  # number of sulci around the convexity, phase (rad)
    wm_gm_hu: tuple[float, float]
    bone_phase: tuple[float, float]


@dataclass(frozen=True)
class DicomStyle:
    """How a study's files are written: pixel layout, transfer syntax, windows, pose, instance order."""

    layout: Layout
    transfer_syntax: str
    window: tuple[tuple[str, ...], tuple[str, ...]]
    tilt_deg: float  # gantry tilt: ImageOrientationPatient column = (0, cos, -sin)
    origin_mm: tuple[float, float, float]  # ImagePositionPatient of slice 0
    step_mm: float
    spacing_mm: float


@dataclass(frozen=True)
class StudyPlan:
    """Everything needed to render and write one study; slice ``k`` runs from skull base to vertex."""

    patient_id: str
    study_uid: str
    series_uid: str
    image_ids: tuple[str, ...]
    media_uids: tuple[str, ...]  # numeric (0002,0003) UIDs; the dataset's SOPInstanceUID is the image id
    instance_numbers: tuple[int, ...]
    size: int
    anatomy: Anatomy
    style: DicomStyle
    noise_seed: int
    labelled: bool
    lesions: tuple[Lesion, ...] = ()

    @property
    def n_slices(self) -> int:
        """Number of slices (images) of the study."""
        return len(self.image_ids)

    def t(self, k: int) -> float:
        """Anatomical height (0 = skull base, 1 = vertex) of slice ``k``."""
        t0, t1 = self.anatomy.t_range
        return t0 + (t1 - t0) * k / (self.n_slices - 1)

    def z_mm(self, k: int) -> float:
        """Height of slice ``k`` above slice 0 along the slice normal, in mm."""
        return k * self.style.step_mm


@dataclass(frozen=True)
class PhantomSlice:
    """One rendered slice: HU, the cranial cavity, each lesion's blood mask, and the six labels."""

    hu: np.ndarray  # int16 (size, size)
    intracranial: np.ndarray  # bool: inside the inner table, where blood may lie
    blood: tuple[np.ndarray, ...]  # bool per lesion of the plan, in plan order
    labels: np.ndarray  # uint8 (6,), LABELS order


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`make_dataset` wrote."""

    out: Path
    train_dir: Path
    test_dir: Path
    train_csv: Path
    submission_csv: Path
    n_studies: int
    n_test_studies: int
    n_images: int
    n_test_images: int
    positives: dict[str, int] = field(default_factory=dict)  # labelled images positive, per label
    layouts: dict[str, int] = field(default_factory=dict)  # studies per pixel layout (train + test)


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
    Gaussian noise (``NOISE_HU``), rounding, then clipping (blood to ``BLOOD_HU``, skull to ``BONE_HU``,
    everything to ``HU_RANGE``).
    """
    g = _slice_geometry(plan, k)
    hu = _tissue(plan, g)
    blood = tuple(_lesion_mask(les, g, plan.z_mm(k)) for les in plan.lesions)
    for les, mask in zip(plan.lesions, blood, strict=True):
        if les.kind == "intraparenchymal":  # perihematomal edema, a low-density rim
            hu[_edema(les, g, plan.z_mm(k)) & ~mask] = EDEMA
    for les, mask in zip(plan.lesions, blood, strict=True):
        hu[mask] = les.hu
    rng = np.random.default_rng([plan.noise_seed, k])
    hu = np.rint(hu + rng.normal(0.0, NOISE_HU, hu.shape))
    any_blood = np.any(blood, axis=0) if blood else np.zeros(hu.shape, dtype=bool)
    hu = np.where(any_blood, np.clip(hu, *BLOOD_HU), np.where(g.skull, np.clip(hu, *BONE_HU), hu))
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


# -------------------------------------------------------------------------------------------- plan


def plan_dataset(spec: SynthSpec) -> tuple[tuple[StudyPlan, ...], tuple[StudyPlan, ...]]:
    """Draw every study of ``spec``: (labelled studies, test studies), deterministic in ``spec.seed``.

    In the labelled set, when ``spec.n_studies >= 3``: every subtype has a lesion, and every pixel
    layout, both uncompressed transfer syntaxes and every instance-number order (:data:`INSTANCE_ORDERS`)
    occur. One test study (if any) is stored RLE Lossless.
    """
    rng = np.random.default_rng(spec.seed)
    ids = _IdPool(rng)
    n_train, n_test = spec.n_studies, spec.n_test_studies
    layouts = _balanced(rng, LAYOUTS, n_train) + _balanced(rng, LAYOUTS, n_test)
    syntaxes = _balanced(rng, (ExplicitVRLittleEndian, ImplicitVRLittleEndian), n_train + n_test)
    orders = _balanced(rng, INSTANCE_ORDERS, n_train) + _balanced(rng, INSTANCE_ORDERS, n_test)
    kinds = _lesion_kinds(rng, n_train, guarantee=True) + _lesion_kinds(rng, n_test, guarantee=False)
    rle = n_train + int(rng.integers(n_test)) if n_test else -1
    plans = []
    for i in range(n_train + n_test):
        syntax = RLELossless if i == rle else syntaxes[i]
        plan = _plan_study(rng, spec, ids, (layouts[i], syntax, orders[i]), labelled=i < n_train)
        plans.append(replace(plan, lesions=tuple(_plan_lesion(rng, plan, kind) for kind in kinds[i])))
    return tuple(plans[:n_train]), tuple(plans[n_train:])


class _IdPool:
    """Kaggle-style ids (``ID_`` + hex) drawn from the plan's rng, never repeated within a data set."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.seen: set[str] = set()

    def draw(self, digits: int) -> str:
        """A fresh ``ID_`` + ``digits`` lowercase hex digits."""
        while True:
            value = "".join(f"{d:x}" for d in self.rng.integers(0, 16, size=digits))
            if value not in self.seen:
                self.seen.add(value)
                return f"ID_{value}"

    def uid(self) -> str:
        """A numeric DICOM UID under the ``2.25`` (UUID-derived) root, 38 decimal digits at most."""
        hi, lo = (int(x) for x in self.rng.integers(0, 2**62, size=2))
        return f"2.25.{(hi << 62 | lo) % 10**38}"


def _balanced(rng: np.random.Generator, options: Sequence[T], n: int) -> list[T]:
    """``n`` draws from ``options`` in random order, each option at least once when ``n`` allows."""
    base = [options[i] for i in rng.permutation(len(options))][:n]
    rest = [options[i] for i in rng.integers(0, len(options), size=n - len(base))]
    both = base + rest
    return [both[i] for i in rng.permutation(n)]


def _lesion_kinds(rng: np.random.Generator, n: int, *, guarantee: bool) -> list[tuple[str, ...]]:
    """Subtypes per study: 0–2 distinct lesions each; with ``guarantee`` (and n >= 3) all five occur."""
    counts = rng.choice([0, 1, 2], p=[0.15, 0.35, 0.5], size=n)
    while guarantee and n >= 3 and counts.sum() < len(KINDS):
        counts[int(np.argmin(counts))] += 1
    slots = [i for i in range(n) for _ in range(counts[i])]
    kinds: list[str | None] = [None] * len(slots)
    if guarantee and len(slots) >= len(KINDS):
        for j, kind in zip(rng.permutation(len(slots)), rng.permutation(len(KINDS)), strict=False):
            kinds[j] = KINDS[kind]
    for j, study in enumerate(slots):
        if kinds[j] is None:
            taken = {kinds[m] for m, s in enumerate(slots) if s == study}
            w = np.array([0.0 if k in taken else p for k, p in zip(KINDS, _KIND_WEIGHTS, strict=True)])
            kinds[j] = KINDS[int(rng.choice(len(KINDS), p=w / w.sum()))]
    return [tuple(k for k, s in zip(kinds, slots, strict=True) if s == i and k) for i in range(n)]


def _plan_study(
    rng: np.random.Generator,
    spec: SynthSpec,
    ids: _IdPool,
    how: tuple[Layout, str, str],
    *,
    labelled: bool,
) -> StudyPlan:
    """One study without lesions; ``how`` = (pixel layout, transfer syntax, instance-number order)."""
    layout, syntax, order = how
    n = int(rng.integers(spec.slices_per_study[0], spec.slices_per_study[1] + 1))
    fov = float(rng.uniform(220.0, 260.0))
    anatomy = Anatomy(
        head_mm=(float(rng.uniform(66, 76)), float(rng.uniform(84, 96))),
        offset_mm=(float(rng.uniform(-6, 6)), float(rng.uniform(-8, 4))),
        rotation=float(rng.uniform(-0.1, 0.1)),
        t_range=(float(rng.uniform(0.0, 0.06)), float(rng.uniform(0.93, 1.0))),
        ventricle_scale=float(rng.uniform(0.8, 1.3)),
        sulci=(int(rng.integers(24, 34)), float(rng.uniform(0, 2 * np.pi))),
        wm_gm_hu=(float(rng.uniform(26, 30)), float(rng.uniform(36, 40))),
        bone_phase=(float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 2 * np.pi))),
    )
    style = DicomStyle(
        layout=layout,
        transfer_syntax=syntax,
        window=_WINDOWS[int(rng.integers(len(_WINDOWS)))],
        tilt_deg=0.0 if rng.random() < 0.35 else round(float(rng.uniform(-8, 25)), 2),
        origin_mm=(
            -fov / 2,
            round(-fov / 2 + float(rng.uniform(-20, 20)), 3),
            round(float(rng.uniform(-60, 0)), 3),
        ),
        step_mm=float(rng.choice([4.0, 5.0], p=[0.25, 0.75])),
        spacing_mm=fov / spec.size,
    )
    return StudyPlan(
        patient_id=ids.draw(8), study_uid=ids.draw(10), series_uid=ids.draw(10),
        image_ids=tuple(ids.draw(9) for _ in range(n)), media_uids=tuple(ids.uid() for _ in range(n)),
        instance_numbers=_instance_numbers(rng, n, order), size=spec.size, anatomy=anatomy, style=style,
        noise_seed=int(rng.integers(0, 2**63)), labelled=labelled,
    )  # fmt: skip


def _instance_numbers(rng: np.random.Generator, n: int, order: str) -> tuple[int, ...]:
    """InstanceNumber per slice (base to vertex): ascending, descending, or shuffled, as in real exports."""
    numbers = np.arange(1, n + 1)
    if order == "descending":
        numbers = numbers[::-1]
    elif order == "shuffled":
        numbers = rng.permutation(numbers)
    return tuple(int(x) for x in numbers)


_T_RANGE = {
    "epidural": (0.3, 0.75),
    "subdural": (0.4, 0.8),
    "intraparenchymal": (0.3, 0.75),
    "intraventricular": (0.46, 0.62),
    "fissure": (0.45, 0.85),
    "sulci": (0.45, 0.85),
    "cisterns": (0.18, 0.26),
}


def _plan_lesion(rng: np.random.Generator, plan: StudyPlan, kind: str) -> Lesion:
    """Draw a lesion of ``kind`` until it is visible on a run of >= 2 neighbouring slices."""
    for _ in range(200):
        lesion = _draw_lesion(rng, plan, kind)
        visible = visible_slices(replace(plan, lesions=(lesion,)), 0)
        if len(visible) >= 2 and visible[-1] - visible[0] == len(visible) - 1:
            return lesion
    raise RuntimeError(f"could not place a visible {kind} lesion in a {plan.n_slices}-slice study")


def _draw_lesion(rng: np.random.Generator, plan: StudyPlan, kind: str) -> Lesion:
    """One lesion of ``kind`` with random height, side, size and density (see :class:`Lesion`)."""
    variant = ""
    if kind == "subarachnoid":
        variant = str(rng.choice(["fissure", "sulci", "cisterns"]))
    elif kind == "intraventricular":
        variant = str(rng.choice(["left", "right", "both"]))
    t = float(rng.uniform(*_T_RANGE[variant if kind == "subarachnoid" else kind]))
    t0, t1 = plan.anatomy.t_range
    z = (t - t0) / (t1 - t0) * (plan.n_slices - 1) * plan.style.step_mm
    _, _, a_in, b_in = _axes(plan.anatomy, t)
    lateral = float(rng.choice([0.0, np.pi]))
    u = rng.uniform
    base = {"kind": kind, "z_mm": z, "hu": round(float(u(60, 76)), 1), "variant": variant}
    shape: dict[str, dict[str, object]] = {
        "epidural": {"z_half_mm": u(10, 18), "angle": lateral + u(-0.7, 0.7), "extent_mm": u(18, 32),
                     "thickness": u(7, 14)},
        "subdural": {"z_half_mm": u(18, 32), "angle": lateral + u(-0.4, 0.4), "extent_mm": u(0.7, 1.2),
                     "thickness": u(6, 14)},
        "intraparenchymal": {"z_half_mm": u(8, 16), "angle": u(0, 2 * np.pi), "extent_mm": u(6, 14),
                             "center_mm": _inside(rng, a_in, b_in, 0.15, 0.5)},
        "intraventricular": {"z_half_mm": u(8, 15), "thickness": u(0.25, 0.5)},
        "subarachnoid": {"z_half_mm": u(8, 12) if variant == "cisterns" else u(10, 22),
                         "angle": u(0, 2 * np.pi), "center_mm": (0.0, float(u(-0.6, 0.6)) * b_in),
                         "extent_mm": u(15, 35) if variant == "fissure" else u(0.5, 1.2)},
    }  # fmt: skip
    params = {k: float(v) if isinstance(v, np.floating | float) else v for k, v in shape[kind].items()}
    return Lesion(**base, **params)  # type: ignore[arg-type]


def _inside(rng: np.random.Generator, a: float, b: float, lo: float, hi: float) -> tuple[float, float]:
    """A random point of the ellipse (a, b) at elliptical radius in [lo, hi]."""
    ang, r = float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(lo, hi))
    return r * a * math.cos(ang), r * b * math.sin(ang)


def visible_slices(plan: StudyPlan, index: int) -> list[int]:
    """Slices on which lesion ``index`` of ``plan`` covers at least :func:`min_visible_px` pixels."""
    les, need = plan.lesions[index], min_visible_px(plan.style.spacing_mm)
    out = []
    for k in range(plan.n_slices):
        z = plan.z_mm(k)
        if les.profile(z) > 0 and int(_lesion_mask(les, _slice_geometry(plan, k), z).sum()) >= need:
            out.append(k)
    return out


# --------------------------------------------------------------------------------------------- DICOM

_PIXEL_MODULE: dict[str, tuple[int, int, int]] = {  # layout -> BitsStored, PixelRepresentation, intercept
    "signed16": (16, 1, -1024),
    "unsigned12": (12, 0, -1024),
    "rsna12": (12, 0, 0),
}


def encode_pixels(hu: np.ndarray, layout: Layout) -> np.ndarray:
    """Stored pixel values for ``hu`` in ``layout`` (int16 for signed16, uint16 otherwise).

    ``hu`` must lie in :data:`HU_RANGE`; see the module docstring for the table of layouts.
    """
    h = np.asarray(hu, dtype=np.int32)
    if layout == "signed16":
        return (h + 1024).astype(np.int16)
    if layout == "unsigned12":
        return np.clip(h + 1024, 0, 4095).astype(np.uint16)
    if layout == "rsna12":
        return np.mod(h, 4096).astype(np.uint16)
    raise ValueError(f"unknown pixel layout {layout!r}; expected one of {LAYOUTS}")


def build_dataset(plan: StudyPlan, k: int, hu: np.ndarray) -> Dataset:
    """DICOM dataset (with file meta) of slice ``k``, headers like the RSNA files, pixels from ``hu``.

    The RSNA ids are not valid UIDs (pydicom warns when it reads them); that is the real data's quirk.
    """
    st = plan.style
    meta = FileMetaDataset()
    meta.FileMetaInformationGroupLength = 0  # recomputed by the writer
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(plan.media_uids[k])
    meta.TransferSyntaxUID = UID(ExplicitVRLittleEndian if st.transfer_syntax == RLELossless else st.transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "ICHDET_SYNTH"
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    _identity(ds, plan, k)
    _geometry(ds, plan, k)
    _pixels(ds, plan, hu)
    if st.transfer_syntax == RLELossless:
        ds.compress(RLELossless, generate_instance_uid=False)
    return ds


def _identity(ds: Dataset, plan: StudyPlan, k: int) -> None:
    """SOP, patient, study and series identity (Kaggle ids), modality, instance number."""
    ds.SOPClassUID = CTImageStorage
    # Kaggle ids where DICOM expects numeric UIDs, as in the real files: skip pydicom's UI validation
    for keyword, value in (
        ("SOPInstanceUID", plan.image_ids[k]),
        ("StudyInstanceUID", plan.study_uid),
        ("SeriesInstanceUID", plan.series_uid),
    ):
        ds.add(DataElement(keyword, "UI", value, validation_mode=pydicom.config.IGNORE))
    ds.Modality = "CT"
    ds.PatientID = plan.patient_id
    ds.StudyID = ""
    ds.InstanceNumber = plan.instance_numbers[k]


def _geometry(ds: Dataset, plan: StudyPlan, k: int) -> None:
    """Image plane: position along the (tilted) slice normal, orientation, spacing, windows."""
    st = plan.style
    c, s = math.cos(math.radians(st.tilt_deg)), math.sin(math.radians(st.tilt_deg))
    x0, y0, z0 = st.origin_mm
    d = plan.z_mm(k)
    ds.ImagePositionPatient = [f"{x0:.6f}", f"{y0 + d * s:.6f}", f"{z0 + d * c:.6f}"]
    ds.ImageOrientationPatient = ["1.000000", "0.000000", "0.000000", "0.000000", f"{c:.6f}", f"{-s:.6f}"]
    ds.PixelSpacing = [f"{st.spacing_mm:.6f}"] * 2
    center, width = st.window
    ds.WindowCenter = list(center) if len(center) > 1 else center[0]
    ds.WindowWidth = list(width) if len(width) > 1 else width[0]


def _pixels(ds: Dataset, plan: StudyPlan, hu: np.ndarray) -> None:
    """Image pixel module and modality LUT (rescale) for the plan's layout; native pixel data."""
    bits, signed, intercept = _PIXEL_MODULE[plan.style.layout]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = hu.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = signed
    ds.RescaleIntercept = str(intercept)
    ds.RescaleSlope = "1"
    ds.PixelData = encode_pixels(hu, plan.style.layout).astype("<i2" if signed else "<u2").tobytes()
    ds["PixelData"].VR = "OW"


def _dicom_bytes(ds: Dataset) -> bytes:
    """The Part 10 file (preamble, file meta, dataset) of ``ds`` as bytes."""
    buffer = io.BytesIO()
    # not enforce_file_format: it would overwrite the numeric (0002,0003) with the 'ID_…' instance id
    pydicom.dcmwrite(buffer, ds)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- files


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`ichdet.io.atomic_path` (hidden temporary name, rename).

    No fsync: the data set is regenerated in seconds, and a killed process cannot leave a partial file.
    """
    with atomic_path(path, fsync=False) as tmp:
        tmp.write_bytes(data)


def _prepare_folder(folder: Path, expected: set[str]) -> None:
    """Create ``folder``, drop temporary files a killed run left, refuse DICOMs this spec does not make."""
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    foreign = sorted(p.name for p in folder.glob("*.dcm") if p.stem not in expected)
    if foreign:
        raise IchdetError(
            f"{folder} holds {len(foreign)} DICOM file(s) that this SynthSpec does not produce "
            f"(e.g. {foreign[0]}); generate into an empty folder or delete {folder}"
        )


def _write_study(plan: StudyPlan, folder: Path) -> np.ndarray:
    """Render and write every slice of ``plan`` into ``folder``; return its labels ``(n, 6)``."""
    labels = []
    for k in range(plan.n_slices):
        sl = phantom_slice(plan, k)
        _write_atomic(folder / f"{plan.image_ids[k]}.dcm", _dicom_bytes(build_dataset(plan, k, sl.hu)))
        labels.append(sl.labels)
    return np.stack(labels)


def make_dataset(out: Path, spec: SynthSpec) -> SynthSummary:
    """Write the synthetic data set of ``spec`` under ``out`` in the Kaggle layout; return a summary.

    Files: ``stage_2_train_images/ID_*.dcm`` + ``stage_2_train.csv`` (labelled studies),
    ``stage_2_test_images/ID_*.dcm`` + ``stage_2_sample_submission.csv`` (Label 0.5). Every file is
    written atomically; the same spec always gives byte-identical files, so a rerun (after an
    interruption, say) simply completes the set.

    Raises:
        IchdetError: an image folder holds DICOM files that this spec does not produce.
    """
    out = Path(out)
    train, test = plan_dataset(spec)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)  # temporary files of a killed run
    train_dir, test_dir = out / TRAIN_DIR, out / TEST_DIR
    _prepare_folder(train_dir, {i for p in train for i in p.image_ids})
    _prepare_folder(test_dir, {i for p in test for i in p.image_ids})
    rows = [_write_study(plan, train_dir) for plan in train]
    labels = pd.DataFrame(np.concatenate(rows).astype(np.uint8) if rows else np.zeros((0, len(LABELS)), np.uint8),
                          index=[i for p in train for i in p.image_ids], columns=list(LABELS)).sort_index()
    for plan in test:
        _write_study(plan, test_dir)
    test_ids = sorted(i for p in test for i in p.image_ids)
    write_labels(labels, out / TRAIN_CSV)
    write_submission(pd.DataFrame(0.5, index=test_ids, columns=list(LABELS)), out / SUBMISSION_CSV)
    positives = {lab: int(labels[lab].sum()) for lab in LABELS}
    return SynthSummary(
        out=out, train_dir=train_dir, test_dir=test_dir, train_csv=out / TRAIN_CSV,
        submission_csv=out / SUBMISSION_CSV, n_studies=len(train), n_test_studies=len(test),
        n_images=len(labels), n_test_images=len(test_ids), positives=positives,
        layouts={lay: sum(p.style.layout == lay for p in train + test) for lay in LAYOUTS},
    )  # fmt: skip
