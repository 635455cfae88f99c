"""Tests of ichdet.synth: phantom anatomy and lesions (pure), the plan, and the Kaggle layout on disk."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from ichdet import synth
from ichdet.errors import ConfigError, IchdetError
from ichdet.names import LABELS
from ichdet.synth import Anatomy, DicomStyle, Lesion, StudyPlan, SynthSpec

SMALL = SynthSpec(n_studies=4, n_test_studies=2, size=64, slices_per_study=(8, 10), seed=3)
MID = 10  # slice index at t = 0.5 of the hand-made plan (21 slices, base to vertex)

# ------------------------------------------------------------------------------------------ helpers


def fixed_plan(lesions: tuple[Lesion, ...] = (), size: int = 128, layout: synth.Layout = "signed16") -> StudyPlan:
    """A centred, unrotated head, 21 slices from base (t=0) to vertex (t=1), 5 mm apart, 256 mm FOV."""
    n = 21
    anatomy = Anatomy(
        head_mm=(70.0, 90.0), offset_mm=(0.0, 0.0), rotation=0.0, t_range=(0.0, 1.0), ventricle_scale=1.0,
        sulci=(28, 0.0), wm_gm_hu=(28.0, 38.0), bone_phase=(0.0, 0.0),
    )  # fmt: skip
    style = DicomStyle(
        layout=layout, transfer_syntax=ExplicitVRLittleEndian, window=(("40",), ("80",)), tilt_deg=0.0,
        origin_mm=(-128.0, -128.0, 0.0), step_mm=5.0, spacing_mm=256.0 / size,
    )  # fmt: skip
    return StudyPlan(
        patient_id="ID_00000001", study_uid="ID_0000000001", series_uid="ID_0000000002",
        image_ids=tuple(f"ID_{i:09x}" for i in range(n)), media_uids=tuple(f"2.25.{i + 1}" for i in range(n)),
        instance_numbers=tuple(range(1, n + 1)), size=size, anatomy=anatomy, style=style, noise_seed=7,
        labelled=True, lesions=lesions,
    )  # fmt: skip


def pixel(u_mm: float, v_mm: float, size: int = 128, spacing: float = 2.0) -> tuple[int, int]:
    """(row, col) of the pixel nearest to head-frame point (u, v) in the fixed plan."""
    return round(v_mm / spacing + (size - 1) / 2), round(u_mm / spacing + (size - 1) / 2)


def touches_bone(mask: np.ndarray, hu: np.ndarray) -> bool:
    """Whether some pixel of ``mask`` has a 4-neighbour of bone (>= 1000 HU)."""
    bone = hu >= 1000
    near = np.zeros_like(bone)
    near[1:] |= bone[:-1]
    near[:-1] |= bone[1:]
    near[:, 1:] |= bone[:, :-1]
    near[:, :-1] |= bone[:, 1:]
    return bool((mask & near).any())


def fixed_hu(ds: pydicom.Dataset) -> np.ndarray:
    """HU from a file: pixel_array, the RSNA BitsStored-12 fix (inline, as the community wrote it), LUT."""
    raw = ds.pixel_array.astype(np.int32)
    intercept = float(ds.RescaleIntercept)
    if ds.BitsStored == 12 and ds.PixelRepresentation == 0 and intercept > -100:
        raw = raw + 1000
        raw[raw >= 4096] -= 4096
        intercept = -1000.0
    return raw * float(ds.RescaleSlope) + intercept


def read_long_csv(path: Path) -> list[tuple[str, str]]:
    """Rows (ID, Label) of a Kaggle long CSV, header checked."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ID", "Label"]
    return [(r[0], r[1]) for r in rows[1:]]


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))  # not lock, marker
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def default_set(tmp_path_factory: pytest.TempPathFactory) -> synth.SynthSummary:
    """The default data set (12 + 2 studies, 128 px), written once for this module."""
    return synth.make_dataset(tmp_path_factory.mktemp("synth-default"), SynthSpec())


@pytest.fixture(scope="module")
def default_plans() -> tuple[tuple[StudyPlan, ...], tuple[StudyPlan, ...]]:
    """The plan of the default data set: (labelled studies, test studies)."""
    return synth.plan_dataset(SynthSpec())


@pytest.fixture(scope="module")
def default_phantom(
    default_plans: tuple[tuple[StudyPlan, ...], tuple[StudyPlan, ...]],
) -> dict[str, tuple[StudyPlan, synth.PhantomSlice]]:
    """Every slice of the default set rendered by the phantom (no I/O), by image id."""
    return {
        image_id: (plan, synth.phantom_slice(plan, k))
        for plan in default_plans[0] + default_plans[1]
        for k, image_id in enumerate(plan.image_ids)
    }


@pytest.fixture(scope="module")
def default_files(default_set: synth.SynthSummary) -> dict[str, pydicom.Dataset]:
    """Every DICOM of the default set read back (pixels included), by image id."""
    files = sorted(default_set.train_dir.glob("*.dcm")) + sorted(default_set.test_dir.glob("*.dcm"))
    return {p.stem: pydicom.dcmread(p) for p in files}


@pytest.fixture(scope="module")
def default_labels(default_set: synth.SynthSummary) -> dict[str, dict[str, int]]:
    """stage_2_train.csv of the default set as {image id: {label: 0/1}}."""
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for row_id, value in read_long_csv(default_set.train_csv):
        image_id, label = row_id.rsplit("_", 1)
        out[image_id][label] = int(value)
    return dict(out)


# ---------------------------------------------------------------------------------- pixel encoding

HU_CASES = [-1000, -999, -1, 0, 40, 1000, 3071]


@pytest.mark.parametrize(
    ("layout", "dtype", "raw"),
    [
        ("signed16", np.int16, [24, 25, 1023, 1024, 1064, 2024, 4095]),
        ("unsigned12", np.uint16, [24, 25, 1023, 1024, 1064, 2024, 4095]),
        ("rsna12", np.uint16, [3096, 3097, 4095, 0, 40, 1000, 3071]),
    ],
)
def test_encode_pixels_table(layout: synth.Layout, dtype: type, raw: list[int]) -> None:
    stored = synth.encode_pixels(np.array(HU_CASES), layout)
    assert stored.dtype == dtype
    assert stored.tolist() == raw


def test_rsna_quirk_fix_restores_hu() -> None:
    """Read naively (intercept 0), rsna12 shows air at 3096 HU; the community fix gives HU back."""
    hu = np.arange(synth.HU_RANGE[0], synth.HU_RANGE[1] + 1)
    raw = synth.encode_pixels(hu, "rsna12").astype(np.int32)
    assert raw.min() >= 0 and raw.max() <= 4095  # fits 12 stored bits
    assert raw[0] == 3096  # naive: -1000 HU air would read as 3096 HU
    fixed = raw + 1000
    fixed[fixed >= 4096] -= 4096
    np.testing.assert_array_equal(fixed - 1000, hu)


def test_encode_pixels_unknown_layout() -> None:
    with pytest.raises(ValueError, match="unknown pixel layout 'jpeg'"):
        synth.encode_pixels(np.zeros((2, 2)), "jpeg")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ anatomy

# (name, slice, head-frame point in mm, low, high): 3x3 patch means on the hand-made plan.
ANATOMY = [
    ("air outside the head", MID, (-120, 0), -1000, -995),
    ("skull, lateral vault", MID, (-61, 0), 1000, 1800),
    ("white matter", MID, (-36, 20), 24, 32),
    ("lateral ventricle (CSF)", MID, (-8, -4), 0, 10),
    ("white matter where the ventricle was, near the vertex", 18, (-8, -4), 24, 34),
    ("white matter where the ventricle was, low", 2, (-8, -4), 24, 34),
    ("petrous ridge at the base", 0, (-36, 20), 1000, 1800),
    ("air beyond the vertex section", 20, (-50, 0), -1000, -995),
]


@pytest.mark.parametrize(("name", "k", "point", "lo", "hi"), ANATOMY, ids=[a[0] for a in ANATOMY])
def test_anatomy_values(name: str, k: int, point: tuple[float, float], lo: float, hi: float) -> None:
    hu = synth.render_slice(fixed_plan(), k)
    r, c = pixel(*point)
    assert lo <= hu[r - 1 : r + 2, c - 1 : c + 2].mean() <= hi, name


def test_scalp_and_fissure_pixels() -> None:
    """Structures one or two pixels thick: checked pixel by pixel, with a 4-sigma noise margin."""
    hu = synth.render_slice(fixed_plan(), MID)
    assert 20 <= hu[pixel(-67, 0)] <= 60  # scalp, soft tissue ~40 HU (one pixel thick: no patch)
    assert -10 <= hu[pixel(-1, -60)] <= 22  # interhemispheric fissure, CSF


def test_head_section_shrinks_toward_base_and_vertex() -> None:
    plan = fixed_plan()
    widths = [int((synth.render_slice(plan, k)[64] > -500).sum()) for k in (0, 5, MID, 15, 20)]
    assert widths[2] == max(widths)
    assert widths[0] < widths[2] and widths[4] < widths[3] < widths[2]


def test_skull_thicker_at_base() -> None:
    plan = fixed_plan()
    runs = []
    for k in (1, MID):
        row = synth.render_slice(plan, k)[64]
        first = int(np.argmax(row >= 1000))
        runs.append(int(np.argmax(row[first:] < 1000)))  # left lateral skull, in pixels
    assert runs[0] > runs[1] >= 2


def test_noise_is_ct_like_and_render_is_pure() -> None:
    plan = fixed_plan()
    hu = synth.render_slice(plan, MID)
    np.testing.assert_array_equal(hu, synth.render_slice(plan, MID))
    r, c = pixel(-36, 20)
    patch = hu[r - 3 : r + 4, c - 3 : c + 4].astype(float)
    assert 3.0 <= patch.std() <= 7.0  # ~5 HU Gaussian noise
    assert hu.dtype == np.int16
    assert synth.HU_RANGE[0] <= hu.min() and hu.max() <= synth.HU_RANGE[1]


# ------------------------------------------------------------------------------------------ lesions


def _les(kind: str, **kw: object) -> Lesion:
    base: dict[str, object] = {"kind": kind, "z_mm": 5.0 * MID, "z_half_mm": 14.0, "hu": 68.0}
    base.update(kw)
    return Lesion(**base)  # type: ignore[arg-type]


LESIONS = [
    ("epidural", _les("epidural", angle=0.0, extent_mm=25.0, thickness=10.0), MID),
    ("subdural", _les("subdural", z_half_mm=25.0, angle=math.pi, extent_mm=1.0, thickness=10.0), MID),
    ("intraparenchymal", _les("intraparenchymal", center_mm=(-25.0, 10.0), extent_mm=10.0), MID),
    ("intraventricular", _les("intraventricular", thickness=0.4, variant="left"), MID),
    ("sah-fissure", _les("subarachnoid", center_mm=(0.0, -50.0), extent_mm=20.0, variant="fissure"), MID),
    ("sah-sulci", _les("subarachnoid", angle=0.0, extent_mm=0.8, variant="sulci"), MID),
    (
        "sah-cisterns",
        _les("subarachnoid", z_mm=20.0, z_half_mm=8.0, extent_mm=math.pi, variant="cisterns"),
        4,
    ),
]


@pytest.mark.parametrize(("name", "lesion", "k"), LESIONS, ids=[x[0] for x in LESIONS])
def test_lesion_blood_range_place_and_labels(name: str, lesion: Lesion, k: int) -> None:
    plan = fixed_plan((lesion,))
    sl = synth.phantom_slice(plan, k)
    blood = sl.blood[0]
    assert blood.sum() >= synth.min_visible_px(2.0)
    assert sl.hu[blood].min() >= 55 and sl.hu[blood].max() <= 80
    assert not (blood & ~sl.intracranial).any()
    expected = [int(lab in (lesion.kind, "any")) for lab in LABELS]
    assert sl.labels.tolist() == expected
    far = synth.phantom_slice(plan, 20 if k < 15 else 0)
    assert not far.blood[0].any() and far.labels.tolist() == [0] * 6


def _blood_and_clean(lesion: Lesion, k: int = MID) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blood mask, HU with the lesion, HU of the same slice without it (same noise)."""
    sl = synth.phantom_slice(fixed_plan((lesion,)), k)
    return sl.blood[0], sl.hu, synth.render_slice(fixed_plan(), k)


def _uv(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.nonzero(mask)
    return (cols - 63.5) * 2.0, (rows - 63.5) * 2.0


def test_epidural_is_a_lens_on_the_inner_table() -> None:
    blood, hu, _ = _blood_and_clean(LESIONS[0][1])
    u, v = _uv(blood)
    assert touches_bone(blood, hu)
    assert u.min() >= 57.4 - 10.0 - 2.0  # within its depth of the inner table (a_in = 57.4 mm at t=0.5)
    assert np.ptp(v) >= 2.5 * np.ptp(u)  # long along the skull, thin across: biconvex lens


def test_subdural_is_a_crescent_over_one_hemisphere() -> None:
    blood, hu, _ = _blood_and_clean(LESIONS[1][1])
    u, v = _uv(blood)
    assert touches_bone(blood, hu)
    assert u.max() < 0  # patient's right only (image left)
    assert np.ptp(v) >= 4 * 10.0  # spans a long arc of the table


def test_intraparenchymal_is_a_blob_inside_the_brain() -> None:
    blood, hu, _ = _blood_and_clean(LESIONS[2][1])
    u, v = _uv(blood)
    assert abs(u.mean() + 25.0) < 3.0 and abs(v.mean() - 10.0) < 3.0
    assert not touches_bone(blood, hu)


@pytest.mark.parametrize(("name", "lesion", "k"), LESIONS[3:], ids=[x[0] for x in LESIONS[3:]])
def test_csf_space_bleeds_replace_csf(name: str, lesion: Lesion, k: int) -> None:
    """Intraventricular and subarachnoid blood lies where the clean slice shows CSF."""
    blood, _, clean = _blood_and_clean(lesion, k)
    assert clean[blood].max() < 25


@pytest.mark.parametrize(
    ("name", "region"),
    [
        ("intraventricular", lambda u, v: (u > 0) & (v > -4.0)),  # left ventricle, dependent (posterior) part
        ("sah-fissure", lambda u, v: (np.abs(u) <= 2.0) & (v > -72.0) & (v < -28.0)),
        ("sah-sulci", lambda u, v: u > 0),
        ("sah-cisterns", lambda u, v: np.abs(np.hypot(u, v - 4.0) - 16.5) <= 3.5),
    ],
)
def test_csf_space_bleeds_place(name: str, region: object) -> None:
    lesion, k = next((les, kk) for n, les, kk in LESIONS if n == name)
    blood, _, _ = _blood_and_clean(lesion, k)
    assert blood.any()
    assert region(*_uv(blood)).all()  # type: ignore[operator]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_lesion_size_varies_smoothly_over_slices(index: int) -> None:
    plan = fixed_plan((LESIONS[index][1],))
    areas = [int(synth.phantom_slice(plan, k).blood[0].sum()) for k in range(plan.n_slices)]
    peak = int(np.argmax(areas))
    assert abs(peak - MID) <= 1
    assert all(a <= b for a, b in itertools.pairwise(areas[: peak + 1]))
    assert all(a >= b for a, b in itertools.pairwise(areas[peak:]))
    assert len(synth.visible_slices(plan, 0)) >= 3


# --------------------------------------------------------------------------------------------- plan


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_studies": -1}, "study counts must be >= 0"),
        ({"size": 16}, r"size must be in \[32, 1024\] pixels, got 16"),
        ({"slices_per_study": (10, 9)}, r"slices_per_study .* got \(10, 9\)"),
        ({"slices_per_study": (4, 6)}, r"8 <= lo <= hi <= 200"),
    ],
)
def test_spec_rejects_bad_values(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SynthSpec(**kwargs)  # type: ignore[arg-type]


def test_plan_is_deterministic_and_ids_are_kaggle_like() -> None:
    train, test = synth.plan_dataset(SMALL)
    assert (train, test) == synth.plan_dataset(SMALL)
    assert synth.plan_dataset(SMALL) != synth.plan_dataset(SynthSpec(**{**SMALL.__dict__, "seed": 4}))
    plans = train + test
    image_ids = [i for p in plans for i in p.image_ids]
    assert len(set(image_ids)) == len(image_ids)
    assert all(re.fullmatch(r"ID_[0-9a-f]{9}", i) for i in image_ids)
    assert all(re.fullmatch(r"ID_[0-9a-f]{8}", p.patient_id) for p in plans)
    assert all(re.fullmatch(r"ID_[0-9a-f]{10}", p.study_uid) for p in plans)
    for p in plans:
        assert 8 <= p.n_slices <= 10
        assert sorted(p.instance_numbers) == list(range(1, p.n_slices + 1))
        assert all(re.fullmatch(r"2\.25\.[1-9][0-9]*", uid) for uid in p.media_uids)


def test_default_plan_guarantees(default_plans: tuple[tuple[StudyPlan, ...], tuple[StudyPlan, ...]]) -> None:
    train, test = default_plans
    assert {les.kind for p in train for les in p.lesions} == set(synth.KINDS)
    assert {p.style.layout for p in train} == set(synth.LAYOUTS)
    assert {p.style.transfer_syntax for p in train} == {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
    assert [p.style.transfer_syntax for p in test].count(RLELossless) == 1
    assert all(len(p.lesions) <= 2 and len({les.kind for les in p.lesions}) == len(p.lesions) for p in train)
    assert {_order(p.instance_numbers) for p in train} == set(synth.INSTANCE_ORDERS)


def _order(numbers: tuple[int, ...]) -> str:
    if list(numbers) == sorted(numbers):
        return "ascending"
    return "descending" if list(numbers) == sorted(numbers, reverse=True) else "shuffled"


# --------------------------------------------------------------------------------------- on disk


def test_layout_on_disk(default_set: synth.SynthSummary) -> None:
    out = default_set.out
    assert sorted(p.name for p in out.iterdir()) == [
        ".ichdet.lock",  # the writer lock (free once make_dataset returns)
        ".ichdet_synth.json",  # the spec that wrote the folder
        "stage_2_sample_submission.csv",
        "stage_2_test_images",
        "stage_2_train.csv",
        "stage_2_train_images",
    ]
    train = list(default_set.train_dir.iterdir())
    test = list(default_set.test_dir.iterdir())
    assert all(re.fullmatch(r"ID_[0-9a-f]{9}\.dcm", p.name) for p in train + test)  # no temp leftovers
    assert (len(train), len(test)) == (default_set.n_images, default_set.n_test_images)
    assert (default_set.n_studies, default_set.n_test_studies) == (12, 2)
    assert 12 * 16 <= default_set.n_images <= 12 * 24


def test_train_csv_long_form(default_set: synth.SynthSummary) -> None:
    rows = read_long_csv(default_set.train_csv)
    assert len(rows) == 6 * default_set.n_images
    stems = {p.stem for p in default_set.train_dir.glob("*.dcm")}
    for start in range(0, len(rows), 6):
        block = rows[start : start + 6]
        image = block[0][0].rsplit("_", 1)[0]
        assert [r[0] for r in block] == [f"{image}_{lab}" for lab in LABELS]
        values = [int(r[1]) for r in block]
        assert set(values) <= {0, 1} and values[5] == max(values[:5])
        stems.discard(image)
    assert stems == set()


def test_default_set_positives(default_set: synth.SynthSummary, default_labels: dict[str, dict[str, int]]) -> None:
    counts = {lab: sum(row[lab] for row in default_labels.values()) for lab in LABELS}
    assert counts == default_set.positives
    assert all(counts[lab] >= 1 for lab in LABELS)  # every subtype at least once
    assert 0.3 <= counts["any"] / len(default_labels) <= 0.5


def test_sample_submission(default_set: synth.SynthSummary) -> None:
    rows = read_long_csv(default_set.submission_csv)
    stems = sorted(p.stem for p in default_set.test_dir.glob("*.dcm"))
    assert sorted(r[0] for r in rows) == sorted(f"{s}_{lab}" for s in stems for lab in LABELS)
    assert {r[1] for r in rows} == {"0.5"}


# (BitsStored, HighBit, PixelRepresentation, RescaleIntercept) per layout
PIXEL_TAGS = {
    "signed16": (16, 15, 1, -1024.0),
    "unsigned12": (12, 11, 0, -1024.0),
    "rsna12": (12, 11, 0, 0.0),
}


def test_headers_like_rsna(default_set: synth.SynthSummary, default_files: dict[str, pydicom.Dataset]) -> None:
    seen_tags, seen_syntax, multi_window = set(), set(), False
    for image_id, ds in default_files.items():
        assert ds.SOPInstanceUID == image_id and ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert (ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation) == ("CT", 1, "MONOCHROME2")
        assert (ds.Rows, ds.Columns, ds.BitsAllocated, float(ds.RescaleSlope)) == (128, 128, 16, 1.0)
        assert re.fullmatch(r"ID_[0-9a-f]{8}", ds.PatientID)
        assert re.fullmatch(r"ID_[0-9a-f]{10}", ds.StudyInstanceUID)
        assert re.fullmatch(r"ID_[0-9a-f]{10}", ds.SeriesInstanceUID)
        assert len(ds.ImagePositionPatient) == 3 and len(ds.ImageOrientationPatient) == 6
        tags = (ds.BitsStored, ds.HighBit, ds.PixelRepresentation, float(ds.RescaleIntercept))
        assert tags in PIXEL_TAGS.values()
        if (default_set.train_dir / f"{image_id}.dcm").exists():
            seen_tags.add(tags)
        seen_syntax.add(ds.file_meta.TransferSyntaxUID)
        multi_window |= ds["WindowCenter"].VM > 1
    assert seen_tags == set(PIXEL_TAGS.values())
    assert seen_syntax == {ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless}
    assert multi_window


def _series(files: dict[str, pydicom.Dataset]) -> dict[str, list[pydicom.Dataset]]:
    """Datasets per series, sorted by position along the slice normal (base to vertex)."""
    out: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for ds in files.values():
        out[ds.SeriesInstanceUID].append(ds)

    def along_normal(ds: pydicom.Dataset) -> float:
        row, col = (
            np.array(ds.ImageOrientationPatient[:3], float),
            np.array(ds.ImageOrientationPatient[3:], float),
        )
        return float(np.dot(np.cross(row, col), np.array(ds.ImagePositionPatient, float)))

    return {k: sorted(v, key=along_normal) for k, v in out.items()}


def test_slices_evenly_spaced_and_instance_order_varies(default_files: dict[str, pydicom.Dataset]) -> None:
    orders = set()
    for stack in _series(default_files).values():
        pos = np.array([[float(x) for x in ds.ImagePositionPatient] for ds in stack])
        steps = np.linalg.norm(np.diff(pos, axis=0), axis=1)
        assert np.allclose(steps, steps[0], atol=1e-4) and round(float(steps[0]), 3) in (4.0, 5.0)
        orders.add(_order(tuple(int(ds.InstanceNumber) for ds in stack)))
    assert orders == set(synth.INSTANCE_ORDERS)


def test_lesions_span_neighbouring_slices(
    default_files: dict[str, pydicom.Dataset], default_labels: dict[str, dict[str, int]]
) -> None:
    """Per series in z order, each subtype is positive on one run of >= 2 neighbouring slices (or none)."""
    checked: set[str] = set()
    for stack in _series(default_files).values():
        if stack[0].SOPInstanceUID not in default_labels:
            continue  # test study: no labels
        for lab in LABELS[:5]:
            hits = [i for i, ds in enumerate(stack) if default_labels[ds.SOPInstanceUID][lab]]
            if hits:
                assert len(hits) >= 2 and hits[-1] - hits[0] == len(hits) - 1, (lab, hits)
                checked.add(lab)
    assert checked == set(LABELS[:5])  # every subtype occurs somewhere, so every one was checked


@pytest.mark.parametrize("layout", synth.LAYOUTS)
def test_hu_read_back_equals_phantom(
    layout: str,
    default_files: dict[str, pydicom.Dataset],
    default_phantom: dict[str, tuple[StudyPlan, synth.PhantomSlice]],
) -> None:
    """pixel_array -> RSNA fix -> slope/intercept gives exactly the phantom's HU, in every layout."""
    ids = [i for i, (plan, _) in default_phantom.items() if plan.style.layout == layout]
    assert ids
    for image_id in ids:
        np.testing.assert_array_equal(fixed_hu(default_files[image_id]), default_phantom[image_id][1].hu)


def test_rle_study_reads_back(
    default_files: dict[str, pydicom.Dataset],
    default_phantom: dict[str, tuple[StudyPlan, synth.PhantomSlice]],
) -> None:
    ids = [i for i, (p, _) in default_phantom.items() if p.style.transfer_syntax == RLELossless]
    assert len(ids) >= 8
    for image_id in ids:
        ds = default_files[image_id]
        assert ds.file_meta.TransferSyntaxUID == RLELossless
        np.testing.assert_array_equal(fixed_hu(ds), default_phantom[image_id][1].hu)


def test_blood_in_files_is_acute_and_enclosed_by_skull(
    default_files: dict[str, pydicom.Dataset],
    default_phantom: dict[str, tuple[StudyPlan, synth.PhantomSlice]],
) -> None:
    """Blood pixels read 55–80 HU and have skull (>= 1000 HU) on both sides along their row and column."""
    n_blood = 0
    for image_id, (_, sl) in default_phantom.items():
        blood = np.any(sl.blood, axis=0) if sl.blood else np.zeros(sl.hu.shape, dtype=bool)
        assert blood.any() or not sl.labels[-1]  # a positive slice shows blood
        if not blood.any():
            continue
        n_blood += 1
        hu = fixed_hu(default_files[image_id])
        assert hu[blood].min() >= 55 and hu[blood].max() <= 80
        bone = hu >= 1000
        for r, c in zip(*np.nonzero(blood), strict=True):
            assert bone[r, :c].any() and bone[r, c:].any() and bone[:r, c].any() and bone[r:, c].any()
    assert n_blood >= 80


# ------------------------------------------------------------------------------ determinism, resume


def test_two_runs_are_byte_identical(tmp_path: Path) -> None:
    a = synth.make_dataset(tmp_path / "a", SMALL)
    synth.make_dataset(tmp_path / "b", SMALL)
    first = digest(tmp_path / "a")
    assert first == digest(tmp_path / "b")
    assert len(first) == a.n_images + a.n_test_images + 2
    synth.make_dataset(tmp_path / "a", SMALL)  # rerun in place: same bytes
    assert digest(tmp_path / "a") == first


def test_interrupted_run_leaves_no_partial_file_and_rerun_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = synth.writer._dicom_bytes

    def dying(ds: pydicom.Dataset) -> bytes:
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(ds)

    monkeypatch.setattr(synth.writer, "_dicom_bytes", dying)
    with pytest.raises(KeyboardInterrupt):
        synth.make_dataset(tmp_path / "run", SMALL)
    written = [p.name for p in (tmp_path / "run").rglob("*") if p.is_file() and not p.name.startswith(".ichdet")]
    assert len(written) == 6 and all(n.endswith(".dcm") and n.startswith("ID_") for n in written)
    monkeypatch.setattr(synth.writer, "_dicom_bytes", real)
    synth.make_dataset(tmp_path / "run", SMALL)
    synth.make_dataset(tmp_path / "fresh", SMALL)
    assert digest(tmp_path / "run") == digest(tmp_path / "fresh")


def test_refuses_folder_with_foreign_dicoms(tmp_path: Path) -> None:
    (tmp_path / "stage_2_train_images").mkdir(parents=True)
    (tmp_path / "stage_2_train_images" / "ID_ffffffff0.dcm").write_bytes(b"x")
    with pytest.raises(IchdetError, match=r"1 DICOM file\(s\) that this SynthSpec does not produce .*ID_ffffffff0"):
        synth.make_dataset(tmp_path, SMALL)


def test_leftover_temp_files_of_a_killed_run_are_removed(tmp_path: Path) -> None:
    (tmp_path / "stage_2_train_images").mkdir(parents=True)
    stale = [tmp_path / "stage_2_train_images" / ".ID_0123456789.dcm.0123456789ab.tmp.dcm",  # atomic_path's names
             tmp_path / ".stage_2_train.csv.0123456789ab.tmp.csv"]
    for p in stale:
        p.write_bytes(b"half")
    synth.make_dataset(tmp_path, SMALL)
    assert not any(p.exists() for p in stale)


# ------------------------------------------------------------------- ownership of the output folder


@pytest.mark.parametrize("existing", ["stage_2_train.csv", "stage_2_sample_submission.csv",
                                      "stage_2_test_images/notes.txt"])
def test_refuses_to_overwrite_files_it_did_not_write(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / existing).write_text("mine\n")
    with pytest.raises(IchdetError, match=rf"already holds {re.escape(existing)} .*did not write; pass --force"):
        synth.make_dataset(tmp_path, SMALL)
    assert (tmp_path / existing).read_text() == "mine\n"
    assert not list((tmp_path / "stage_2_train_images").glob("*.dcm")) if existing != "stage_2_test_images/notes.txt" \
        else True
    synth.make_dataset(tmp_path, SMALL, force=True)
    assert (tmp_path / "stage_2_train.csv").read_text().startswith("ID,Label\n")


def test_refuses_a_folder_of_another_spec_unless_forced(tmp_path: Path) -> None:
    synth.make_dataset(tmp_path, SMALL)
    before = digest(tmp_path)
    other = SynthSpec(n_studies=4, n_test_studies=2, size=48, slices_per_study=(8, 10), seed=3)
    with pytest.raises(IchdetError, match=r"another spec \(differs in size\); pass --force"):
        synth.make_dataset(tmp_path, other)
    assert digest(tmp_path) == before
    synth.make_dataset(tmp_path, other, force=True)
    assert digest(tmp_path) != before and len(digest(tmp_path)) == len(before)


def test_cli_synth_refuses_an_existing_label_csv(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ichdet.cli import app

    (tmp_path / "stage_2_train.csv").write_text("ID,Label\nID_0_any,1\n")
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path), "--studies", "3", "--size", "32"])
    assert result.exit_code == 2 and "pass --force" in result.output
    assert (tmp_path / "stage_2_train.csv").read_text() == "ID,Label\nID_0_any,1\n"


# ------------------------------------------------------------------------------ context matters


CONTEXT = SynthSpec(n_studies=6, n_test_studies=0, size=64, slices_per_study=(16, 20), seed=5, context=True)


def test_context_option_keeps_the_plan_and_tapers_every_lesion() -> None:
    plain, _ = synth.plan_dataset(SynthSpec(**{**CONTEXT.__dict__, "context": False}))
    ctx, _ = synth.plan_dataset(CONTEXT)
    assert [p.image_ids for p in plain] == [p.image_ids for p in ctx]
    for a, b in zip(plain, ctx, strict=True):
        assert [les.kind for les in a.lesions] == [les.kind for les in b.lesions]
        assert all(les.fade == 0.0 for les in a.lesions) and all(les.fade == 0.75 for les in b.lesions)
        assert all(les.z_half_mm > 0 for les in b.lesions)


def test_context_edge_slices_are_positive_but_faint() -> None:
    ctx, _ = synth.plan_dataset(CONTEXT)
    faint, full = [], []
    for plan in ctx:
        for k in range(plan.n_slices):
            sl = synth.phantom_slice(plan, k)
            for les, mask in zip(plan.lesions, sl.blood, strict=True):
                if mask.sum() >= synth.min_visible_px(plan.style.spacing_mm):
                    (full if les.contrast(plan.z_mm(k)) >= 1.0 else faint).append(float(sl.hu[mask].mean()))
    assert len(faint) >= 10 and len(full) >= 10
    assert np.median(faint) < 55.0 <= min(full)  # faint edges fall below the blood range; the core stays in it


# ------------------------------------------------------------------------------------------- families


SUBTLE = SynthSpec(n_studies=8, n_test_studies=0, size=64, seed=5, family="subtle")


def test_classic_family_is_the_set_before_families() -> None:
    """The default family draws and renders what the generator did before families existed (the digest
    of commit c16bf57)."""
    plans, _ = synth.plan_dataset(SMALL)
    digest = hashlib.sha256(b"".join(synth.render_slice(p, k).tobytes() for p in plans for k in range(p.n_slices)))
    assert digest.hexdigest() == "1d40dc27a2b10bcd74e388ac5f05f96a734ebdd43c232923d044d2fea022dbd9"


@pytest.mark.parametrize(
    ("name", "check"),
    [
        ("slices per study from the family", lambda p, fam: fam.slices_per_study[0] <= p.n_slices
         <= fam.slices_per_study[1]),
        ("field of view from the family", lambda p, fam: fam.fov_mm[0] <= p.style.spacing_mm * p.size
         <= fam.fov_mm[1]),
        ("lesion density from the family", lambda p, fam: all(fam.blood_hu[0] <= les.hu <= fam.blood_hu[1]
                                                             for les in p.lesions)),
        ("the family is on the plan", lambda p, fam: p.family == "subtle"),
    ],
)
def test_subtle_family_plan(name: str, check: object) -> None:
    plans, _ = synth.plan_dataset(SUBTLE)
    fam = synth.FAMILIES["subtle"]
    assert all(check(p, fam) for p in plans), name  # type: ignore[operator]


def test_subtle_lesions_are_smaller_fainter_and_noisier() -> None:
    """Same seed, other family: in-plane lesion sizes scale by lesion_scale, blood is clipped to the
    family's range, the noise has the family's spread, intraparenchymal blobs lie near the skull."""
    classic, _ = synth.plan_dataset(SynthSpec(**{**SUBTLE.__dict__, "family": "classic"}))
    subtle, _ = synth.plan_dataset(SUBTLE)
    fam = synth.FAMILIES["subtle"]
    blood: list[int] = []
    assert any(les.kind == "intraparenchymal" for plan in subtle for les in plan.lesions)  # the check below runs
    for plan in subtle:
        for les in plan.lesions:
            if les.kind == "intraparenchymal":  # the centre was drawn in the cavity's section at the lesion's height
                t0, t1 = plan.anatomy.t_range
                t = t0 + (t1 - t0) * les.z_mm / ((plan.n_slices - 1) * plan.style.step_mm)
                _, _, a_in, b_in = synth.phantom._axes(plan.anatomy, t)
                u, v = les.center_mm
                assert fam.iph_radius[0] - 1e-6 <= math.hypot(u / a_in, v / b_in) <= fam.iph_radius[1] + 1e-6
        sl = synth.phantom_slice(plan, plan.n_slices // 2)
        for mask in sl.blood:
            blood.extend(sl.hu[mask].tolist())
    assert blood and fam.blood_clip[0] <= min(blood) and max(blood) <= fam.blood_clip[1]
    mean_extent = {name: np.mean([les.extent_mm for p in plans for les in p.lesions if les.kind == "intraparenchymal"])
                   for name, plans in (("classic", classic), ("subtle", subtle))}
    assert mean_extent["subtle"] < 0.8 * mean_extent["classic"]


@pytest.mark.parametrize(("family", "noise"), [("classic", 5.0), ("subtle", 8.0)])
def test_family_noise(family: str, noise: float) -> None:
    """Brain tissue's spread around its mean is the family's noise (one slice, a central square)."""
    plan = dataclasses.replace(fixed_plan(size=128), family=family)
    hu = synth.render_slice(plan, MID).astype(float)
    r, c = pixel(-36, 20)  # the white-matter patch of test_noise_is_ct_like_and_render_is_pure
    patch = hu[r - 3 : r + 4, c - 3 : c + 4]
    assert 0.6 * noise <= patch.std() <= 1.4 * noise


def test_unknown_family_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"family 'bogus' is not one of classic, subtle"):
        SynthSpec(family="bogus")


def test_cli_synth_family(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ichdet.cli import app

    out = tmp_path / "subtle"
    result = CliRunner().invoke(app, ["synth", "--out", str(out), "--studies", "2", "--test-studies", "0",
                                      "--size", "32", "--family", "subtle"])
    assert result.exit_code == 0, result.output
    marker = json.loads((out / synth.writer.MARKER).read_text())
    assert marker["family"] == "subtle" and marker["slices_per_study"] == [12, 18]
    refused = CliRunner().invoke(app, ["synth", "--out", str(out), "--studies", "2", "--test-studies", "0",
                                       "--size", "32"])
    assert refused.exit_code != 0 and "family" in refused.output


def test_marker_before_families_is_the_classic_family(tmp_path: Path) -> None:
    spec = SynthSpec(n_studies=1, n_test_studies=0, size=32, slices_per_study=(8, 8), seed=1)
    synth.make_dataset(tmp_path, spec)
    marker = tmp_path / synth.writer.MARKER
    old = json.loads(marker.read_text())
    del old["family"]
    marker.write_text(json.dumps(old))
    synth.make_dataset(tmp_path, spec)  # no refusal: the same spec
