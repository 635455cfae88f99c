"""DICOM reading on the real RSNA sample: HU against pydicom's own modality LUT, every lossless encoding,
header fields, and one DicomError per kind of bad file.

The sample holds no slice with the RSNA quirk itself (BitsStored 12, PixelRepresentation 0 and
RescaleIntercept > -100): its 12-bit slices have intercepts -1024 and -1000. The quirk is therefore
rebuilt from real slices (``_quirk_dataset``) so that a broken fix fails these tests.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from ichdet.dicom.read import (
    DicomMeta,
    Workspace,
    _value,
    hu_from_dataset,
    hu_from_stored,
    meta_from_dataset,
    read_dicom,
    read_hu,
    read_meta,
)
from ichdet.errors import DicomError


@pytest.fixture(autouse=True)
def _quiet_pydicom() -> Iterator[None]:
    """The tests' own pydicom calls see the same expected ``ID_…`` UID warnings; keep them quiet."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Invalid value for VR UI")
        yield


def _files(root: Path) -> list[Path]:
    return sorted(root.glob("stage_2_*_images/*.dcm"))


def _layout(ds: Dataset) -> tuple[int, int, float, str]:
    return ds.BitsStored, ds.PixelRepresentation, float(ds.RescaleIntercept), ds.file_meta.TransferSyntaxUID


def _reference_hu(ds: Dataset) -> np.ndarray:
    """HU the independent way: pixel_array, the RSNA fix via np.where/np.mod, pydicom's modality LUT."""
    raw = ds.pixel_array
    if ds.BitsStored == 12 and ds.PixelRepresentation == 0 and float(ds.RescaleIntercept) > -100:
        shifted = raw.astype(np.int64) + 1000
        raw = np.where(shifted >= 4096, np.mod(shifted, 4096), shifted)
        ds.RescaleIntercept = -1000
    return np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)


def _quirk_dataset(path: Path) -> tuple[Dataset, np.ndarray]:
    """A real BitsStored-12 slice with intercept -1000, stored the way the RSNA quirk slices are.

    Those slices hold ``HU mod 4096`` as unsigned 12-bit values with an intercept near 0 (here 0),
    so air (-1000 HU) is stored as 3096 and the fix (+1000, wrap at 4096, intercept -1000) undoes it.
    Returns the quirk dataset and the original slice's HU, which the fix must give back exactly.
    """
    ds = pydicom.dcmread(path)
    assert (ds.BitsStored, ds.PixelRepresentation, float(ds.RescaleIntercept)) == (12, 0, -1000.0)
    expected = hu_from_dataset(ds, path)
    stored = np.mod(ds.pixel_array.astype(np.int64) - 1000, 4096).astype(np.uint16)
    ds.PixelData = stored.tobytes()
    ds.RescaleIntercept = 0
    return ds, expected


def _representatives(root: Path) -> dict[tuple[int, int, float, str], Path]:
    """One file per layout (bits stored, pixel representation, intercept, transfer syntax)."""
    picks: dict[tuple[int, int, float, str], Path] = {}
    for path in _files(root):
        picks.setdefault(_layout(pydicom.dcmread(path, stop_before_pixels=True)), path)
    return picks


def _first_with_intercept_1000(root: Path) -> Path:
    return next(p for p in _files(root) if float(pydicom.dcmread(p, stop_before_pixels=True)
                                                 .RescaleIntercept) == -1000)


# ------------------------------------------------------------------------------------- HU, real files


def test_sample_covers_both_layouts_and_both_vr_encodings(rsna_sample: Path) -> None:
    layouts = Counter(_layout(pydicom.dcmread(p, stop_before_pixels=True)) for p in _files(rsna_sample))
    assert sum(layouts.values()) == 296
    assert {(bits, rep) for bits, rep, _, _ in layouts} == {(12, 0), (16, 1)}
    assert {ts for *_, ts in layouts} == {ImplicitVRLittleEndian, ExplicitVRLittleEndian}
    assert {icpt for _, _, icpt, _ in layouts} == {-1024.0, -1000.0}
    # no real quirk slice here: test_rsna_fix_* below rebuild them from real pixels
    assert not [key for key in layouts if key[0] == 12 and key[1] == 0 and key[2] > -100]


def test_read_hu_equals_pydicom_modality_lut_on_every_sample_file(rsna_sample: Path) -> None:
    mismatched = []
    for path in _files(rsna_sample):
        hu = read_hu(path)
        expected = _reference_hu(pydicom.dcmread(path))
        if hu.dtype != np.float32 or hu.shape != (512, 512) or not np.array_equal(hu, expected):
            mismatched.append(path.name)
    assert mismatched == []


def test_read_dicom_is_read_meta_plus_read_hu(rsna_sample: Path) -> None:
    for path in _files(rsna_sample)[:: 37]:
        meta, hu = read_dicom(path)
        assert meta == read_meta(path)
        assert np.array_equal(hu, read_hu(path))


def test_rsna_fix_restores_quirk_slices(rsna_sample: Path, tmp_path: Path) -> None:
    ds, expected = _quirk_dataset(_first_with_intercept_1000(rsna_sample))
    stored = ds.pixel_array
    assert stored.max() > 3096  # wrapped negative HU are present: without the fix they read as ~+3000
    target = tmp_path / "quirk.dcm"
    ds.save_as(target)
    hu = read_hu(target)
    assert np.array_equal(hu, expected)
    assert np.array_equal(hu, _reference_hu(pydicom.dcmread(target)))
    unfixed = apply_modality_lut(pydicom.dcmread(target).pixel_array, pydicom.dcmread(target))
    assert not np.array_equal(hu, unfixed)


FIXED = [0.0, 100.0, 3095.0, -1000.0, -1.0]  # x + 1000, minus 4096 where >= 4096, intercept -1000


@pytest.mark.parametrize(("bits_stored", "representation", "intercept", "expected"), [
    (12, 0, 0, FIXED),
    (12, 0, 1, FIXED),
    (12, 0, -99, FIXED),
    (12, 0, -100, [-100.0, 0.0, 2995.0, 2996.0, 3995.0]),  # the condition is intercept > -100, strictly
    (12, 0, -1024, [-1024.0, -924.0, 2071.0, 2072.0, 3071.0]),
    (16, 0, 0, [0.0, 100.0, 3095.0, 3096.0, 4095.0]),
    (12, 1, 0, [0.0, 100.0, -1001.0, -1000.0, -1.0]),  # signed 12-bit: pydicom sign-extends, no fix
])
def test_rsna_fix_condition(bits_stored: int, representation: int, intercept: int,
                            expected: list[float]) -> None:
    stored = [0, 100, 3095, 3096, 4095]
    ds = _tiny_dataset([stored], bits_stored, representation, intercept)
    if representation:  # the 12-bit two's complement patterns of the same stored values
        ds.PixelData = np.array(stored, dtype=np.uint16).tobytes()
    assert hu_from_dataset(ds, "tiny.dcm").tolist() == [expected]


@pytest.mark.parametrize(("slope", "intercept", "expected"), [
    (1, -1024, [-1024.0, -924.0, 2071.0]),
    (2, -1024, [-1024.0, -824.0, 5166.0]),
    (0.5, 10.25, [10.25, 60.25, 1557.75]),
])
def test_rescale_slope_and_intercept(slope: float, intercept: float, expected: list[float]) -> None:
    ds = _tiny_dataset([[0, 100, 3095]], 16, 0, intercept)
    ds.RescaleSlope = slope
    assert hu_from_dataset(ds, "tiny.dcm").tolist() == [expected]


def test_missing_rescale_means_slope_1_intercept_0() -> None:
    ds = _tiny_dataset([[-5, 0, 7]], 16, 1, 0)
    del ds.RescaleIntercept, ds.RescaleSlope
    assert hu_from_dataset(ds, "tiny.dcm").tolist() == [[-5.0, 0.0, 7.0]]


def test_bits_above_bits_stored_are_ignored(rsna_sample: Path, tmp_path: Path) -> None:
    """pydicom 3 masks bits above BitsStored, so garbage in bits 12-15 of a 12-bit slice changes nothing."""
    path = _representatives(rsna_sample)[(12, 0, -1024.0, ExplicitVRLittleEndian)]
    ds = pydicom.dcmread(path)
    raw = np.frombuffer(ds.PixelData, dtype="<u2")
    ds.PixelData = (raw | np.uint16(0xA000)).tobytes()
    ds.save_as(tmp_path / "high_bits.dcm")
    assert np.array_equal(read_hu(tmp_path / "high_bits.dcm"), read_hu(path))


@pytest.mark.parametrize(("values", "bits_stored", "representation", "intercept", "slope", "dtype"), [
    ([[0, 100, 4095]], 12, 0, -1024, 1, np.int16),  # the usual CT slice
    ([[0, 100, 3095, 3096, 4095]], 12, 0, 0, 1, np.int16),  # RSNA quirk: fixed, then intercept -1000
    ([[-2000, 0, 3000]], 16, 1, -1024, 1, np.int16),  # signed with scanner padding
    ([[-2048, -1, 2047]], 12, 1, -1024, 1, np.int16),  # signed 12-bit, sign-extended
    ([[0, 1000, 65535]], 16, 0, -1024, 1, np.int32),  # 65535 - 1024 does not fit in int16
    ([[0, 40000]], 16, 0, -32768, 1, np.int32),  # every sum fits, but not the pixel 40000 itself
    ([[-32768, 32767]], 16, 1, -1, 1, np.int32),  # -32769
    ([[0, 10]], 16, 0, 40000, 1, np.int32),  # the intercept does not fit in int16
    ([[0, 100, 3095]], 16, 0, -1024, 2, np.float32),  # slope 2: float
    ([[0, 100, 3095]], 16, 0, 0.5, 1, np.float32),  # non-integral intercept: float
])
def test_integer_hu_is_exact_in_the_narrowest_type(tmp_path: Path, values: list[list[int]], bits_stored: int,
                                                   representation: int, intercept: float, slope: float,
                                                   dtype: type) -> None:
    ds = _tiny_dataset(values, bits_stored, representation, intercept)
    ds.RescaleSlope = slope
    if representation:  # store the two's complement patterns of bits_stored bits, as a scanner does
        ds.PixelData = (np.array(values, np.int64) % (1 << bits_stored)).astype(np.uint16).tobytes()
    path = tmp_path / "tiny.dcm"
    ds.save_as(path, enforce_file_format=True)
    exact = read_hu(path)
    for work in (None, Workspace()):
        hu = read_dicom(path, integer=True, work=work)[1]
        assert hu.dtype == dtype
        assert np.array_equal(hu.astype(np.float32), exact)


def test_integer_hu_equals_float_hu_on_every_sample_file(rsna_sample: Path) -> None:
    work, mismatched = Workspace(), []
    for path in _files(rsna_sample):
        hu = read_dicom(path, integer=True, work=work)[1]
        if hu.dtype != np.int16 or not np.array_equal(hu.astype(np.float32), read_hu(path)):
            mismatched.append(path.name)
    assert mismatched == []


HEADER_KEYWORDS = ["SOPInstanceUID", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "ImagePositionPatient",
                   "InstanceNumber", "PixelSpacing", "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel",
                   "PhotometricInterpretation", "BitsAllocated", "BitsStored", "PixelRepresentation",
                   "RescaleSlope", "RescaleIntercept", "WindowCenter", "Modality", "PatientName"]


def test_fast_element_values_equal_pydicom_get(rsna_sample: Path) -> None:
    """``_value`` converts raw elements itself; it must give what ``ds.get`` gives, in both VR encodings."""
    for path in _representatives(rsna_sample).values():
        for keyword in HEADER_KEYWORDS:
            fast = _value(pydicom.dcmread(path), keyword)
            expected = pydicom.dcmread(path).get(keyword)
            assert (fast, type(fast)) == (expected, type(expected)), (path.name, keyword)
        ds = pydicom.dcmread(path)
        ds.Rows = 7  # an element set in memory (not raw) is returned as set
        assert _value(ds, "Rows") == 7


def _tiny_dataset(values: list[list[int]], bits_stored: int, representation: int,
                  intercept: float) -> Dataset:
    """An in-memory native 16-bit CT slice."""
    arr = np.array(values, dtype=np.int16 if representation else np.uint16)
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, "1.2.3.4"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = representation
    ds.RescaleIntercept, ds.RescaleSlope = intercept, 1
    ds.PixelData = arr.tobytes()
    return ds


# ------------------------------------------------------------------------------------- re-encoding


def _jpeg_lossless(arr: np.ndarray, precision: int, predictor: int) -> bytes:
    """A lossless JPEG (ITU T.81 process 14) codestream: one component, one fixed Huffman table.

    pydicom has no JPEG Lossless encoder, so this small one writes the test files. Every category
    0..16 gets a 5-bit code (valid, never all ones); residuals are taken modulo 2**16.
    """
    x = arr.astype(np.uint16).astype(np.int64)  # signed samples as their unsigned bit pattern
    ra = np.roll(x, 1, axis=1)  # left
    rb = np.roll(x, 1, axis=0)  # above
    rc = np.roll(rb, 1, axis=1)  # above left
    pred = {1: ra, 2: rb, 3: rc, 4: ra + rb - rc, 5: ra + ((rb - rc) >> 1),
            6: rb + ((ra - rc) >> 1), 7: (ra + rb) >> 1}[predictor]
    pred[1:, 0] = x[:-1, 0]  # first column: the sample above
    pred[0, 1:] = x[0, :-1]  # first row: the sample to the left
    pred[0, 0] = 1 << (precision - 1)
    diff = np.mod(x - pred, 65536).ravel()
    diff = np.where(diff > 32768, diff - 65536, diff)
    size = np.searchsorted(1 << np.arange(17), np.abs(diff), side="right")  # bit length, 0..16
    extra = np.where(diff < 0, diff + (1 << size) - 1, diff)
    extra_bits = np.where(size == 16, 0, size)  # category 16 (diff 32768) has no extra bits
    code = (size << extra_bits) | np.where(size == 16, 0, extra)
    length = 5 + extra_bits
    shift = length[:, None] - 1 - np.arange(21)[None, :]
    bits = (code[:, None] >> np.maximum(shift, 0)) & 1
    stream = bits[shift >= 0].astype(np.uint8)
    stream = np.concatenate([stream, np.ones(-len(stream) % 8, np.uint8)])  # pad with 1-bits
    data = np.packbits(stream)
    data = np.insert(data, np.flatnonzero(data == 0xFF) + 1, 0)  # byte stuffing
    rows, cols = arr.shape
    sof = b"\xff\xc3\x00\x0b" + bytes([precision]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big")
    sof += b"\x01\x01\x11\x00"
    dht = b"\xff\xc4\x00\x24\x00" + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    sos = b"\xff\xda\x00\x08\x01\x01\x00" + bytes([predictor, 0, 0])
    return b"\xff\xd8" + sof + dht + sos + data.tobytes() + b"\xff\xd9"


def _encode_jpeg_lossless(ds: Dataset, uid: UID, predictor: int) -> None:
    frame = _jpeg_lossless(ds.pixel_array, ds.BitsStored, predictor)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = uid


ENCODERS: dict[str, Callable[[Dataset], None]] = {
    "rle": lambda ds: ds.compress(RLELossless, generate_instance_uid=False),
    "jpeg_ls": lambda ds: ds.compress(JPEGLSLossless, generate_instance_uid=False),
    "jpeg2000": lambda ds: ds.compress(JPEG2000Lossless, generate_instance_uid=False),
    "jpeg_lossless_sv1": lambda ds: _encode_jpeg_lossless(ds, JPEGLosslessSV1, predictor=1),
    "jpeg_lossless_p6": lambda ds: _encode_jpeg_lossless(ds, JPEGLossless, predictor=6),
}
EXPECTED_SYNTAX = {"rle": RLELossless, "jpeg_ls": JPEGLSLossless, "jpeg2000": JPEG2000Lossless,
                   "jpeg_lossless_sv1": JPEGLosslessSV1, "jpeg_lossless_p6": JPEGLossless}


@pytest.mark.parametrize("encoding", list(ENCODERS))
def test_lossless_encodings_give_identical_hu(rsna_sample: Path, tmp_path: Path, encoding: str) -> None:
    sources = list(_representatives(rsna_sample).values())
    assert len(sources) == 4  # 12-bit/-1024 (implicit and explicit VR), 12-bit/-1000, 16-bit signed
    cases: list[tuple[Dataset, np.ndarray, str]] = [(pydicom.dcmread(p), read_hu(p), p.stem) for p in sources]
    quirk, quirk_hu = _quirk_dataset(_first_with_intercept_1000(rsna_sample))
    cases.append((quirk, quirk_hu, "quirk"))
    for ds, expected, stem in cases:
        ENCODERS[encoding](ds)
        target = tmp_path / f"{stem}.dcm"
        ds.save_as(target)
        meta, hu = read_dicom(target)
        assert meta.transfer_syntax == EXPECTED_SYNTAX[encoding]
        assert np.array_equal(hu, expected), f"{stem} via {encoding}"


def test_jpeg_lossless_encoder_handles_extreme_differences(tmp_path: Path) -> None:
    """Residual categories 15 and 16 (difference 32768) of the test encoder decode correctly."""
    values = [[-32768, 32767, 0, -32768], [32767, -32768, 1, 0]]
    ds = _tiny_dataset(values, 16, 1, 0)
    _encode_jpeg_lossless(ds, JPEGLossless, predictor=7)
    ds.save_as(tmp_path / "extreme.dcm", enforce_file_format=True)
    assert read_hu(tmp_path / "extreme.dcm").tolist() == values


# ------------------------------------------------------------------------------------- header


def test_read_meta_explicit_vr_file(rsna_sample: Path) -> None:
    meta = read_meta(rsna_sample / "stage_2_test_images" / "ID_000a50137.dcm")
    assert meta == DicomMeta(
        image_id="ID_000a50137", patient_id="ID_d1217a66", study_uid="ID_d7fd39e49b",
        series_uid="ID_bf6f6d5d34", z=147.892371, instance_number=-1,
        pixel_spacing_row=0.45703125, pixel_spacing_col=0.45703125, rows=512, cols=512,
        transfer_syntax="1.2.840.10008.1.2.1", implementation_version="dcm4che-1.4.38",
    )
    assert meta.as_row() == {  # the index row: no implementation_version
        "image_id": "ID_000a50137", "patient_id": "ID_d1217a66", "study_uid": "ID_d7fd39e49b",
        "series_uid": "ID_bf6f6d5d34", "z": 147.892371, "instance_number": -1,
        "pixel_spacing_row": 0.45703125, "pixel_spacing_col": 0.45703125, "rows": 512, "cols": 512,
        "transfer_syntax": "1.2.840.10008.1.2.1",
    }


def test_read_meta_implicit_vr_file(rsna_sample: Path) -> None:
    meta = read_meta(rsna_sample / "stage_2_train_images" / "ID_ffb70299c.dcm")
    assert (meta.image_id, meta.patient_id, meta.study_uid, meta.series_uid) == (
        "ID_ffb70299c", "ID_df70c823", "ID_04ef429610", "ID_245e16180c")
    assert (meta.z, meta.pixel_spacing_row, meta.pixel_spacing_col) == (347.0, 0.4609375, 0.4609375)
    assert meta.transfer_syntax == "1.2.840.10008.1.2"


def test_image_id_is_the_file_stem_on_every_sample_file(rsna_sample: Path) -> None:
    assert all(read_meta(p).image_id == p.stem for p in _files(rsna_sample))


def _edited(rsna_sample: Path, edit: Callable[[Dataset], None]) -> Dataset:
    ds = pydicom.dcmread(rsna_sample / "stage_2_test_images" / "ID_000a50137.dcm", stop_before_pixels=True)
    edit(ds)
    return ds


def test_meta_defaults_for_absent_fields(rsna_sample: Path) -> None:
    def strip(ds: Dataset) -> None:
        del ds.SOPInstanceUID, ds.ImagePositionPatient, ds.PixelSpacing, ds.PatientID

    meta = meta_from_dataset(_edited(rsna_sample, strip), Path("/data/ID_fallback01.dcm"))
    assert meta.image_id == "ID_fallback01"
    assert math.isnan(meta.z) and math.isnan(meta.pixel_spacing_row) and math.isnan(meta.pixel_spacing_col)
    assert meta.patient_id == ""
    assert meta.instance_number == -1


def test_meta_reads_instance_number_and_empty_uid_falls_back(rsna_sample: Path) -> None:
    def edit(ds: Dataset) -> None:
        ds.InstanceNumber = 17
        ds.SOPInstanceUID = ""

    meta = meta_from_dataset(_edited(rsna_sample, edit), "ID_stem.dcm")
    assert (meta.instance_number, meta.image_id) == (17, "ID_stem")


@pytest.mark.parametrize(("uid", "path"), [
    ("../../etc/passwd", "a.dcm"),
    ("ID_a/b", "a.dcm"),
    ("ID a", "a.dcm"),
    ("..", "a.dcm"),
    ("", "/data/..dcm"),  # the stem is '.'
])
def test_unsafe_image_ids_are_rejected(rsna_sample: Path, uid: str, path: str) -> None:
    ds = _edited(rsna_sample, lambda d: setattr(d, "SOPInstanceUID", uid))
    with pytest.raises(DicomError, match="is not a safe id"):
        meta_from_dataset(ds, path)


@pytest.mark.parametrize(("keyword", "value", "match"), [
    ("ImagePositionPatient", [1.0, 2.0], r"malformed ImagePositionPatient .*2 values, expected 3"),
    ("PixelSpacing", [0.5], r"malformed PixelSpacing .*1 values, expected 2"),
])
def test_malformed_header_values(rsna_sample: Path, keyword: str, value: list[float], match: str) -> None:
    ds = _edited(rsna_sample, lambda d: setattr(d, keyword, value))
    with pytest.raises(DicomError, match=match):
        meta_from_dataset(ds, "x.dcm")


# ------------------------------------------------------------------------------------- bad files


def _sample_bytes(rsna_sample: Path) -> bytes:
    return (rsna_sample / "stage_2_test_images" / "ID_000a50137.dcm").read_bytes()


def _compressed(rsna_sample: Path, uid: UID, tmp_path: Path) -> bytes:
    ds = pydicom.dcmread(rsna_sample / "stage_2_test_images" / "ID_000a50137.dcm")
    ds.compress(uid, generate_instance_uid=False)
    ds.save_as(tmp_path / "compressed.dcm")
    return (tmp_path / "compressed.dcm").read_bytes()


def _corrupt_header(data: bytes, marker: bytes) -> bytes:
    """Overwrite 16 bytes at the first codestream ``marker`` (the frame header) with 0x55.

    Header damage is what a decoder can detect: random bytes inside a JPEG-LS or JPEG 2000 stream
    decode without any error to wrong pixels (these formats carry no checksum).
    """
    at = data.index(marker)
    return data[:at] + b"\x55" * 16 + data[at + 16:]


def _corrupt_rle_header(data: bytes) -> bytes:
    """Overwrite the RLE header (segment count and offsets) of the first frame with 0x55."""
    item = b"\xfe\xff\x00\xe0"  # (FFFE,E000) Item: the offset table, then the first frame
    at = data.index(item, data.index(item) + 8) + 8
    return data[:at] + b"\x55" * 16 + data[at + 16:]


def _scramble_middle(data: bytes) -> bytes:
    """200 random bytes in the middle of the file: inside the compressed stream, headers intact."""
    middle = len(data) // 2
    return data[:middle] + np.random.default_rng(1).bytes(200) + data[middle + 200:]


def _without_pixel_data(rsna_sample: Path, tmp_path: Path) -> bytes:
    ds = pydicom.dcmread(rsna_sample / "stage_2_test_images" / "ID_000a50137.dcm")
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    return (tmp_path / "nopix.dcm").read_bytes()


def _edited_bytes(rsna_sample: Path, tmp_path: Path, edit: Callable[[Dataset], None]) -> bytes:
    ds = pydicom.dcmread(rsna_sample / "stage_2_test_images" / "ID_000a50137.dcm")
    edit(ds)
    ds.save_as(tmp_path / "edited.dcm", enforce_file_format=False)
    return (tmp_path / "edited.dcm").read_bytes()


def _no_preamble(ds: Dataset) -> None:
    ds.preamble = None


def _multi_frame(ds: Dataset) -> None:
    ds.NumberOfFrames = 2


def _rgb(ds: Dataset) -> None:
    ds.PhotometricInterpretation, ds.SamplesPerPixel = "RGB", 3


def _unknown_syntax(ds: Dataset) -> None:
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = UID("1.2.826.0.1.3680043.9.9999.1")


J2K_SOC_SIZ = b"\xff\x4f\xff\x51"  # JPEG 2000 start of codestream + image size markers
BadFile = Callable[[Path, Path], bytes]
BAD_FILES: list[tuple[str, BadFile, str]] = [
    ("empty", lambda s, t: b"", "not a DICOM file"),
    ("text", lambda s, t: b"patient notes, not an image\n" * 40, "not a DICOM file"),
    ("random_bytes", lambda s, t: np.random.default_rng(0).bytes(4096), "not a DICOM file"),
    ("no_preamble", lambda s, t: _edited_bytes(s, t, _no_preamble), "not a DICOM file"),
    ("truncated_60pct", lambda s, t: _sample_bytes(s)[: len(_sample_bytes(s)) * 6 // 10],
     "truncated pixel data"),
    ("truncated_header", lambda s, t: _sample_bytes(s)[:200], "truncated"),
    ("truncated_jpeg_ls", lambda s, t: (lambda b: b[: len(b) * 6 // 10])(_compressed(s, JPEGLSLossless, t)),
     "truncated file"),
    ("no_pixel_data", _without_pixel_data, r"no Pixel Data \(7FE0,0010\)"),
    ("corrupt_jpeg_ls", lambda s, t: _corrupt_header(_compressed(s, JPEGLSLossless, t), b"\xff\xd8\xff"),
     r"undecodable JPEG-LS Lossless Image Compression \(1\.2\.840\.10008\.1\.2\.4\.80\)"),
    ("corrupt_jpeg2000", lambda s, t: _corrupt_header(_compressed(s, JPEG2000Lossless, t), J2K_SOC_SIZ),
     r"undecodable JPEG 2000 Image Compression \(Lossless Only\)"),
    ("corrupt_rle", lambda s, t: _corrupt_rle_header(_compressed(s, RLELossless, t)),
     r"undecodable RLE Lossless"),
    # pylibjpeg-rle panics here (a BaseException from Rust) before pydicom can try its own decoder
    ("scrambled_rle", lambda s, t: _scramble_middle(_compressed(s, RLELossless, t)),
     r"undecodable RLE Lossless .*PanicException"),
    ("unknown_syntax", lambda s, t: _edited_bytes(s, t, _unknown_syntax),
     r"no decoder for unknown transfer syntax 1\.2\.826\.0\.1\.3680043\.9\.9999\.1"),
    ("multi_frame", lambda s, t: _edited_bytes(s, t, _multi_frame), "unsupported NumberOfFrames 2"),
    ("rgb", lambda s, t: _edited_bytes(s, t, _rgb),
     r"unsupported image type \(PhotometricInterpretation 'RGB'"),
]


@pytest.mark.parametrize(("kind", "make", "match"), BAD_FILES, ids=[case[0] for case in BAD_FILES])
@pytest.mark.parametrize("reader", [read_hu, read_dicom], ids=["read_hu", "read_dicom"])
def test_bad_files_raise_dicom_error(rsna_sample: Path, tmp_path: Path, kind: str, make: BadFile,
                                     match: str, reader: Callable[[Path], object]) -> None:
    path = tmp_path / f"{kind}.dcm"
    path.write_bytes(make(rsna_sample, tmp_path))
    with pytest.raises(DicomError, match=match) as caught:
        reader(path)
    assert caught.value.path == str(path)
    assert str(caught.value).startswith(f"{path}: ")


@pytest.mark.parametrize(("kind", "match"), [
    ("empty", "not a DICOM file"),
    ("text", "not a DICOM file"),
    ("truncated_header", "truncated"),
])
def test_read_meta_rejects_bad_headers(rsna_sample: Path, tmp_path: Path, kind: str, match: str) -> None:
    make = next(m for k, m, _ in BAD_FILES if k == kind)
    path = tmp_path / f"{kind}.dcm"
    path.write_bytes(make(rsna_sample, tmp_path))
    with pytest.raises(DicomError, match=match):
        read_meta(path)


def test_read_meta_does_not_see_truncated_pixels(rsna_sample: Path, tmp_path: Path) -> None:
    """Documented limit: the header of a file cut inside its pixels is intact, read_meta returns it."""
    data = _sample_bytes(rsna_sample)
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) * 6 // 10])
    assert read_meta(tmp_path / "cut.dcm").image_id == "ID_000a50137"


@pytest.mark.parametrize("reader", [read_hu, read_meta, read_dicom])
def test_missing_path_and_directory(tmp_path: Path, reader: Callable[[Path], object]) -> None:
    with pytest.raises(DicomError, match="cannot read the file"):
        reader(tmp_path / "absent.dcm")
    with pytest.raises(DicomError, match="cannot read the file"):
        reader(tmp_path)


def test_expected_uid_warnings_are_silenced(rsna_sample: Path) -> None:
    path = rsna_sample / "stage_2_test_images" / "ID_000a50137.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_dicom(path)
        read_meta(path)


# ------------------------------------------------------------------------------------ the pure HU function

U16, I16 = np.uint16, np.int16


@pytest.mark.parametrize(("pixels", "bits", "rep", "slope", "intercept", "integer", "expected", "dtype"), [
    # RSNA fix on (12 bits stored, unsigned, intercept > -100): x = raw + 1000 wrapped at 4096, intercept -1000
    ([[0, 3095], [3096, 4095]], 12, 0, 1.0, 0.0, False, [[0, 3095], [-1000, -1]], np.float32),
    ([[0, 3096]], 12, 0, 1.0, -99.0, True, [[0, -1000]], np.int16),
    # fix off: intercept -1024 (<= -100), 16 bits stored, signed pixels
    ([[0, 1024], [2000, 4095]], 12, 0, 1.0, -1024.0, False, [[-1024, 0], [976, 3071]], np.float32),
    ([[0, 3096]], 16, 0, 1.0, 0.0, False, [[0, 3096]], np.float32),
    ([[-5, 100]], 12, 1, 1.0, 0.0, False, [[-5, 100]], np.float32),
    # slope != 1: always float32, even when integer HU are asked for
    ([[0, 600]], 16, 0, 2.0, -1024.0, True, [[-1024, 176]], np.float32),
    ([[1, 3]], 16, 0, 0.5, 0.25, False, [[0.75, 1.75]], np.float32),
    # exact-integer rule: int16 where every value fits, int32 where not, float32 for a fractional intercept
    ([[0, 4095]], 12, 0, 1.0, -1024.0, True, [[-1024, 3071]], np.int16),
    ([[0, 65535]], 16, 0, 1.0, 0.0, True, [[0, 65535]], np.int32),
    ([[0, 2]], 16, 0, 1.0, -0.5, True, [[-0.5, 1.5]], np.float32),
    ([[-5, 100]], 16, 1, 1.0, -1024.0, True, [[-1029, -924]], np.int16),
])
def test_hu_from_stored(pixels: list[list[int]], bits: int, rep: int, slope: float, intercept: float,
                        integer: bool, expected: list[list[float]], dtype: type) -> None:
    raw = np.array(pixels, dtype=I16 if rep else U16)
    hu = hu_from_stored(raw, bits, rep, slope, intercept, integer=integer)
    assert hu.dtype == dtype
    np.testing.assert_array_equal(hu, np.array(expected, dtype=dtype))
    assert raw.tolist() == pixels  # the input is never changed


@pytest.mark.parametrize(("slope", "intercept"), [(float("nan"), 0.0), (1.0, float("inf")), (float("-inf"), 0.0)])
def test_hu_from_stored_refuses_non_finite_rescale(slope: float, intercept: float) -> None:
    with pytest.raises(ValueError, match="must be finite"):
        hu_from_stored(np.zeros((1, 1), U16), 16, 0, slope, intercept)


@pytest.mark.parametrize(("keyword", "value"), [("RescaleSlope", "NaN"), ("RescaleIntercept", "inf"),
                                                ("RescaleSlope", "-Infinity"), ("RescaleSlope", "0")])
def test_non_finite_rescale_is_an_error_not_a_blank_image(rsna_sample: Path, tmp_path: Path, keyword: str,
                                                          value: str) -> None:
    ds = pydicom.dcmread(rsna_sample / "stage_2_test_images" / "ID_000a50137.dcm")
    ds[keyword] = pydicom.DataElement(tag_for_keyword(keyword), "DS", value, validation_mode=0)
    ds.save_as(tmp_path / "bad.dcm")
    for reader in (read_hu, read_dicom):
        with pytest.raises(DicomError, match=r"unusable RescaleSlope .*must be finite, slope not 0"):
            reader(tmp_path / "bad.dcm")


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.dcm")
    for reader in (read_hu, read_meta, read_dicom):
        with pytest.raises(DicomError, match="not a regular file"):
            reader(tmp_path / "pipe.dcm")
