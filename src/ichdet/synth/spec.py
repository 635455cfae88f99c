"""Specs and constants of the synthetic data set: what to build (:class:`SynthSpec`), the frozen plan
types (:class:`StudyPlan`, :class:`Lesion`, ...), tissue values and the Kaggle file names."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np

from ichdet.errors import ConfigError
from ichdet.names import LABELS

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

# Tissue values (HU). Acute blood: see Family.blood_hu (the classic family clips it to 55-80 HU after noise).
AIR, SCALP, CSF, EDEMA = -1000.0, 40.0, 6.0, 20.0
BONE_HU = (1000.0, 1800.0)
NOISE_HU = 5.0
SCALP_MM = 5.0
CONTEXT_TAPER = 1.6  # context-matters lesions: z extent x this (more tapering edge slices)
CONTEXT_FADE = 0.75  # ... and blood contrast min(1, profile / this)²: faint where the lesion is thin
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
class Family:
    """How a family of synthetic studies looks: what a recipe tuned on one family may not have seen.

    Lesion density is drawn per lesion in ``blood_hu`` and, after the noise, clipped to 5 HU below and
    4 HU above it. ``lesion_scale`` multiplies every lesion's in-plane size (not its z extent).
    ``iph_radius`` is where an intraparenchymal blob's centre lies, as a fraction of the cranial cavity's
    elliptical radius (near 1: against the inner table). ``fov_mm``: the field of view; a smaller one makes
    the head fill the image, so a crop or a shift can cut a lesion at its edge out of the picture.
    """

    description: str
    slices_per_study: tuple[int, int] = (16, 24)
    fov_mm: tuple[float, float] = (220.0, 260.0)
    lesion_scale: float = 1.0
    blood_hu: tuple[float, float] = (60.0, 76.0)
    noise_hu: float = NOISE_HU
    iph_radius: tuple[float, float] = (0.15, 0.5)

    @property
    def blood_clip(self) -> tuple[float, float]:
        """The range full-contrast blood is clipped to after the noise."""
        return self.blood_hu[0] - 5.0, self.blood_hu[1] + 4.0


FAMILIES: dict[str, Family] = {
    "classic": Family("the demo's set: large, dense lesions, a head well inside a 220-260 mm field of view"),
    "subtle": Family("smaller (0.7x), fainter (54-70 HU), noisier (8 HU) lesions, intraparenchymal ones near the "
                     "skull, a head filling a 175-205 mm field of view, 12-18 slices per study",
                     slices_per_study=(12, 18), fov_mm=(175.0, 205.0), lesion_scale=0.7, blood_hu=(54.0, 70.0),
                     noise_hu=8.0, iph_radius=(0.55, 0.8)),
}
"""The synthetic families (``ichdet synth --family``): ``classic`` is what the demo and the tests use;
``subtle`` is a second generator for checking that a training recipe holds beyond the family it was
tuned on (issue 20, ``bench/bench_recipe.py --family``)."""


@dataclass(frozen=True)
class SynthSpec:
    """What :func:`make_dataset` builds: study counts, image size (pixels), slices per study, seed.

    Whenever ``n_studies >= 3`` (the default is 12) the labelled set holds every subtype, every pixel
    layout and instance-number order, and both uncompressed transfer syntaxes (see :func:`plan_dataset`).
    """

    n_studies: int = 12
    n_test_studies: int = 2
    size: int = 128
    slices_per_study: tuple[int, int] | None = None
    """(lo, hi) slices per study; None: the family's."""
    seed: int = 0
    context: bool = False
    """"Context matters" (issue 10): each lesion extends ``CONTEXT_TAPER`` times further in z and fades
    in over its edge slices (:attr:`Lesion.fade`), so the thin, faint first and last positive slices
    are hard to call alone but plain to a model that sees the neighbours. Off: the classic set, byte
    for byte."""
    family: str = "classic"
    """Which :data:`FAMILIES` entry the studies look like."""

    def __post_init__(self) -> None:
        """Reject values the generator cannot honour, naming the value and the valid range."""
        if self.family not in FAMILIES:
            raise ConfigError(f"family {self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.slices_per_study is None:  # the family's range, written into the spec for everyone who reads it
            object.__setattr__(self, "slices_per_study", FAMILIES[self.family].slices_per_study)
        lo, hi = self.slices
        if self.n_studies < 0 or self.n_test_studies < 0:
            raise ConfigError(f"study counts must be >= 0, got {self.n_studies}, {self.n_test_studies}")
        if not 32 <= self.size <= 1024:
            raise ConfigError(f"size must be in [32, 1024] pixels, got {self.size}")
        if not 8 <= lo <= hi <= 200:
            raise ConfigError(f"slices_per_study must be (lo, hi) with 8 <= lo <= hi <= 200, got {(lo, hi)}")

    @property
    def slices(self) -> tuple[int, int]:
        """(lo, hi) slices per study: ``slices_per_study`` as ``__post_init__`` filled it in (never None)."""
        assert self.slices_per_study is not None
        return self.slices_per_study


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
    fade: float = 0.0  # 0: full contrast everywhere; > 0: see contrast() (faint edges)

    def contrast(self, z: float) -> float:
        """Blood contrast at ``z`` relative to full (1): ``min(1, profile / fade)²``, faint where the lesion is thin."""
        return 1.0 if self.fade <= 0.0 else min(1.0, self.profile(z) / self.fade) ** 2

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
    family: str = "classic"  # a FAMILIES key: the noise and blood range the phantom renders with

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

