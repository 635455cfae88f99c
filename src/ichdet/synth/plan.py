"""The planner: every random choice of a data set (anatomy, lesions, ids, DICOM style) drawn from one
``np.random.default_rng(spec.seed)`` into frozen :class:`~ichdet.synth.spec.StudyPlan` objects, in a
fixed order, so the same spec always plans the same studies."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from ichdet.synth.phantom import _axes, _lesion_mask, _slice_geometry, min_visible_px
from ichdet.synth.spec import (
    _KIND_WEIGHTS,
    _WINDOWS,
    CONTEXT_FADE,
    CONTEXT_TAPER,
    FAMILIES,
    INSTANCE_ORDERS,
    KINDS,
    LAYOUTS,
    Anatomy,
    DicomStyle,
    Layout,
    Lesion,
    StudyPlan,
    SynthSpec,
    T,
)

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
        plans.append(replace(plan, lesions=tuple(_plan_lesion(rng, plan, kind, spec.context) for kind in kinds[i])))
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
    n = int(rng.integers(spec.slices[0], spec.slices[1] + 1))
    fov = float(rng.uniform(*FAMILIES[spec.family].fov_mm))
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
        noise_seed=int(rng.integers(0, 2**63)), labelled=labelled, family=spec.family,
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


def _plan_lesion(rng: np.random.Generator, plan: StudyPlan, kind: str, context: bool = False) -> Lesion:
    """Draw a lesion of ``kind`` until it is visible on a run of >= 2 neighbouring slices.

    With ``context`` (:attr:`SynthSpec.context`) it tapers over ``CONTEXT_TAPER`` times the z extent and
    fades in at its edges (``CONTEXT_FADE``); the draws from ``rng`` are the same either way.
    """
    for _ in range(200):
        lesion = _draw_lesion(rng, plan, kind)
        if context:
            lesion = replace(lesion, z_half_mm=lesion.z_half_mm * CONTEXT_TAPER, fade=CONTEXT_FADE)
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
    family = FAMILIES[plan.family]
    t = float(rng.uniform(*_T_RANGE[variant if kind == "subarachnoid" else kind]))
    t0, t1 = plan.anatomy.t_range
    z = (t - t0) / (t1 - t0) * (plan.n_slices - 1) * plan.style.step_mm
    _, _, a_in, b_in = _axes(plan.anatomy, t)
    lateral = float(rng.choice([0.0, np.pi]))
    u = rng.uniform
    base = {"kind": kind, "z_mm": z, "hu": round(float(u(*family.blood_hu)), 1), "variant": variant}
    shape: dict[str, dict[str, object]] = {
        "epidural": {"z_half_mm": u(10, 18), "angle": lateral + u(-0.7, 0.7), "extent_mm": u(18, 32),
                     "thickness": u(7, 14)},
        "subdural": {"z_half_mm": u(18, 32), "angle": lateral + u(-0.4, 0.4), "extent_mm": u(0.7, 1.2),
                     "thickness": u(6, 14)},
        "intraparenchymal": {"z_half_mm": u(8, 16), "angle": u(0, 2 * np.pi), "extent_mm": u(6, 14),
                             "center_mm": _inside(rng, a_in, b_in, *family.iph_radius)},
        "intraventricular": {"z_half_mm": u(8, 15), "thickness": u(0.25, 0.5)},
        "subarachnoid": {"z_half_mm": u(8, 12) if variant == "cisterns" else u(10, 22),
                         "angle": u(0, 2 * np.pi), "center_mm": (0.0, float(u(-0.6, 0.6)) * b_in),
                         "extent_mm": u(15, 35) if variant == "fissure" else u(0.5, 1.2)},
    }  # fmt: skip
    params = {k: float(v) if isinstance(v, np.floating | float) else v for k, v in shape[kind].items()}
    if family.lesion_scale != 1.0:  # in-plane size only (the z extent decides how many slices show it)
        for key in ("extent_mm", "thickness"):
            if key in params:
                params[key] = float(params[key]) * family.lesion_scale  # type: ignore[arg-type]
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

