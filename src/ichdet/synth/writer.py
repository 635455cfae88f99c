"""The DICOM writer: a plan's slices as Part 10 files with RSNA-like headers, and the Kaggle layout on
disk (images, label CSV, sample submission), every file written atomically."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

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
    RLELossless,
)

from ichdet.cache.labels import LABELS, write_labels, write_submission
from ichdet.cache.provenance import SYNTH_IMPLEMENTATION_VERSION
from ichdet.errors import IchdetError
from ichdet.io import atomic_path, folder_lock, remove_stale_temps, write_text_atomic
from ichdet.synth.phantom import phantom_slice
from ichdet.synth.plan import plan_dataset
from ichdet.synth.spec import (
    LAYOUTS,
    SUBMISSION_CSV,
    TEST_DIR,
    TRAIN_CSV,
    TRAIN_DIR,
    Layout,
    StudyPlan,
    SynthSpec,
    SynthSummary,
)

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
    meta.ImplementationVersionName = SYNTH_IMPLEMENTATION_VERSION  # how preprocess knows synthetic data
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


MARKER = ".ichdet_synth.json"
"""The hidden file by which ``make_dataset`` knows a folder as its own: the spec that wrote it."""


def _spec_json(spec: SynthSpec) -> dict[str, object]:
    return dict(json.loads(json.dumps(dataclasses.asdict(spec))))


def _check_foreign(folder: Path, expected: set[str]) -> None:
    """Drop temporary files a killed run left in ``folder``; refuse DICOMs this spec does not make."""
    if not folder.is_dir():
        return
    remove_stale_temps(folder)
    foreign = sorted(p.name for p in folder.glob("*.dcm") if p.stem not in expected)
    if foreign:
        raise IchdetError(
            f"{folder} holds {len(foreign)} DICOM file(s) that this SynthSpec does not produce "
            f"(e.g. {foreign[0]}); generate into an empty folder or delete {folder}"
        )


def _claim(out: Path, spec: SynthSpec, force: bool) -> None:
    """Make ``out`` this spec's folder, or refuse: never overwrite what another spec or program wrote.

    A folder whose marker names this spec is ours (a rerun completes it). Any other folder that already
    holds one of our output files is refused unless ``force``; only then is the marker (re)written.
    """
    marker, want = out / MARKER, _spec_json(spec)
    if marker.is_file():
        try:
            have = json.loads(marker.read_text())
        except (ValueError, UnicodeDecodeError):
            have = None
        if isinstance(have, dict):  # a marker from before the families: the classic family, the only one then
            have.setdefault("family", "classic")
        if have == want:
            return
        changed = sorted(k for k in want if not isinstance(have, dict) or have.get(k) != want[k])
        if not force:
            raise IchdetError(f"{out} holds a synthetic data set of another spec (differs in "
                              f"{', '.join(changed) or 'its marker'}); pass --force to overwrite it, "
                              "or choose a new --out")
    elif not force:
        ours = [out / TRAIN_CSV, out / SUBMISSION_CSV, *(f for d in (TRAIN_DIR, TEST_DIR) if (out / d).is_dir()
                                                         for f in (out / d).iterdir() if not f.name.startswith("."))]
        existing = [p for p in ours if p.exists()]
        if existing:
            raise IchdetError(f"{out} already holds {existing[0].relative_to(out)} (and {len(existing) - 1} other "
                              "file(s)) that `ichdet synth` did not write; pass --force to overwrite, or "
                              "choose a new --out")
    write_text_atomic(marker, json.dumps(want, sort_keys=True) + "\n")


def _write_study(plan: StudyPlan, folder: Path) -> np.ndarray:
    """Render and write every slice of ``plan`` into ``folder``; return its labels ``(n, 6)``."""
    labels = []
    for k in range(plan.n_slices):
        sl = phantom_slice(plan, k)
        _write_atomic(folder / f"{plan.image_ids[k]}.dcm", _dicom_bytes(build_dataset(plan, k, sl.hu)))
        labels.append(sl.labels)
    return np.stack(labels)


def make_dataset(out: Path, spec: SynthSpec, force: bool = False) -> SynthSummary:
    """Write the synthetic data set of ``spec`` under ``out`` in the Kaggle layout; return a summary.

    Files: ``stage_2_train_images/ID_*.dcm`` + ``stage_2_train.csv`` (labelled studies),
    ``stage_2_test_images/ID_*.dcm`` + ``stage_2_sample_submission.csv`` (Label 0.5). Every file is
    written atomically; the same spec always gives byte-identical files, so a rerun (after an
    interruption, say) simply completes the set. The folder is locked (:func:`ichdet.io.folder_lock`)
    and remembers its spec in :data:`MARKER`: files that another spec or program wrote there are never
    overwritten unless ``force``.

    Raises:
        IchdetError: an image folder holds DICOM files that this spec does not produce, or ``out``
            holds output files this spec did not write (and not ``force``).
        LockError: another process is writing ``out``.
    """
    out = Path(out)
    train, test = plan_dataset(spec)
    train_dir, test_dir = out / TRAIN_DIR, out / TEST_DIR
    with folder_lock(out, "ichdet synth"):
        remove_stale_temps(out)  # temporary files of a killed run
        _check_foreign(train_dir, {i for p in train for i in p.image_ids})
        _check_foreign(test_dir, {i for p in test for i in p.image_ids})
        _claim(out, spec, force)
        train_dir.mkdir(exist_ok=True)
        test_dir.mkdir(exist_ok=True)
        return _write_all(out, train, test)


def _write_all(out: Path, train: tuple[StudyPlan, ...], test: tuple[StudyPlan, ...]) -> SynthSummary:
    """Render and write every study, then the two CSVs; the summary of what was written."""
    train_dir, test_dir = out / TRAIN_DIR, out / TEST_DIR
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
