"""DICOM I/O: one CT slice in, its header fields and its pixels in Hounsfield units out.

Only this module talks to pydicom. Every unusable file raises :class:`~ichdet.errors.DicomError`
(path + reason + what to do); nothing is ever replaced by a substitute image.

Reading is not thread-safe in one process: pydicom's expected ``ID_…``-as-UID warnings are silenced
with :func:`warnings.catch_warnings`, which swaps process-global state. Use processes for parallel
reads (as the preprocessor and the torch DataLoader workers do).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.uid import UID

from ichdet.dicom._fast import Workspace
from ichdet.dicom._fast import decode_native as _decode_native
from ichdet.dicom._fast import value as _value
from ichdet.dicom.guard import check_decoded_size, check_inflated_size, open_regular
from ichdet.errors import DicomError

__all__ = ["DEFAULT_MAX_PIXELS", "DicomMeta", "check_pixel_header", "hu_from_dataset", "hu_from_stored",
           "meta_from_dataset", "read_dicom", "read_header", "read_hu", "read_meta"]

PathLike = str | Path

_IMAGE_ID = re.compile(r"^[A-Za-z0-9._-]+$")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_MAX_REASON = 300  # characters of a library's error message kept in a DicomError reason
_EXACT_INTERCEPT = 2**23  # see hu_from_stored: keeps raw + intercept below 2**24, exact in float32
#: The default cap on a decoded image, in 16-bit pixels: one 4096 x 4096 slice (32 MiB), 8x a CT slice.
DEFAULT_MAX_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class DicomMeta:
    """Header fields of one slice that indexing, ordering and grouping need.

    ``z`` is ImagePositionPatient[2] (NaN if absent), ``instance_number`` is InstanceNumber (-1 if
    absent), the spacings come from PixelSpacing ``[row, column]`` in mm (NaN if absent),
    ``transfer_syntax`` is the Transfer Syntax UID string and ``implementation_version`` the file meta
    header's Implementation Version Name (0002,0013), "" if absent (not an index column: it says which
    program wrote the file, e.g. ``ichdet synth``).
    """

    image_id: str
    patient_id: str
    study_uid: str
    series_uid: str
    z: float
    instance_number: int
    pixel_spacing_row: float
    pixel_spacing_col: float
    rows: int
    cols: int
    transfer_syntax: str
    implementation_version: str = ""

    def as_row(self) -> dict[str, str | int | float]:
        """The index fields as a plain dict, one DataFrame row (not ``dataclasses.asdict``: 10x slower)."""
        return {name: getattr(self, name) for name in ROW_FIELDS}


#: The DicomMeta fields an index row holds, in order.
ROW_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(DicomMeta) if f.name != "implementation_version")


# --------------------------------------------------------------------------------------------- reading


@contextmanager
def _pydicom_reading() -> Iterator[None]:
    """How every reader here runs pydicom: value validation off (see :func:`_values_unchecked`), the
    expected ``ID_…`` UID warnings silenced, and pydicom's end-of-file warning turned into an error.

    pydicom only *warns* when a file ends inside a data element, and then drops every element read
    so far; raising instead lets the caller report the file as truncated.
    """
    with warnings.catch_warnings(), _values_unchecked():
        warnings.filterwarnings("ignore", message=r"Invalid value for VR UI", category=UserWarning)
        warnings.filterwarnings("error", message=r"End of file reached", category=UserWarning)
        yield


def _values_unchecked() -> AbstractContextManager[object]:
    """pydicom's value validation off while reading, unless the user asked for RAISE.

    With the default (WARN) validation only warns, and values read the same either way. On RSNA files
    every ``ID_…`` UID warns (a log record and a warning), which
    costs ~15 % of reading a slice. Process-global state, like the warning filters.
    """
    if pydicom.config.settings.reading_validation_mode == pydicom.config.WARN:
        return pydicom.config.disable_value_validation()
    return nullcontext()


def _dcmread(path: PathLike, *, stop_before_pixels: bool, max_pixels: int = DEFAULT_MAX_PIXELS) -> Dataset:
    """``pydicom.dcmread`` with every failure mapped to DicomError (call inside _pydicom_reading).

    Only regular files are opened (:func:`_open_regular`), and a deflated data set is inflated only if
    it stays under ``max_pixels`` (:func:`_check_inflated_size`).
    """
    with open_regular(path) as fh:
        check_inflated_size(fh, path, max_pixels)
        try:
            return pydicom.dcmread(fh, force=False, stop_before_pixels=stop_before_pixels)
        except InvalidDicomError:
            raise DicomError(
                path, "not a DICOM file (no 'DICM' prefix after the 128-byte preamble); "
                "check the path, or rewrite the file with a DICOM tool (e.g. dcmconv) to add the header"
            ) from None
        except UserWarning as warning:  # only the end-of-file warning is an error here
            raise DicomError(path, f"truncated file ({warning}); copy or download it again") from None
        except OSError as err:
            raise DicomError(path, f"cannot read the file: {err.strerror or err}") from err
        except Exception as err:  # a malformed header can make the parser fail in many ways
            raise DicomError(path, f"malformed DICOM header: {_describe(err)}") from err


def _describe(err: BaseException) -> str:
    """``Type: message`` on one line, shortened."""
    text = " ".join(str(err).split())
    if len(text) > _MAX_REASON:
        text = text[:_MAX_REASON] + "…"
    return f"{type(err).__name__}: {text}"


def _transfer_syntax(ds: Dataset, path: PathLike) -> UID:
    """The Transfer Syntax UID (0002,0010) from the file meta header, or DicomError."""
    file_meta = getattr(ds, "file_meta", None)
    uid = None if file_meta is None else _value(file_meta, "TransferSyntaxUID")
    if not uid:
        raise DicomError(
            path, "no Transfer Syntax UID (0002,0010) in the file meta header: the header is truncated "
            "or malformed; copy or export the file again"
        )
    return UID(str(uid))


# --------------------------------------------------------------------------------------------- header


def _text(ds: Dataset, keyword: str) -> str:
    value = _value(ds, keyword)
    return "" if value is None else str(value).strip()


def _validate_image_id(image_id: str, path: PathLike) -> str:
    """Image ids become file names and keys: letters, digits, '.', '_', '-' only, never '.' or '..'."""
    if not _IMAGE_ID.match(image_id) or image_id in (".", ".."):
        raise DicomError(
            path, f"image id {image_id!r} (SOPInstanceUID, else the file stem) is not a safe id: "
            "only letters, digits, '.', '_' and '-' are allowed; rename the file or fix the UID"
        )
    return image_id


def _floats(ds: Dataset, keyword: str, count: int, path: PathLike) -> list[float] | None:
    """A multi-valued decimal element as ``count`` floats; None if absent or empty."""
    value = _value(ds, keyword)
    if value is None or value == "":
        return None
    try:
        items = value if isinstance(value, Sequence) and not isinstance(value, str | bytes) else [value]
        values = [float(v) for v in items]
        if len(values) != count:
            raise ValueError(f"{len(values)} values, expected {count}")
    except (TypeError, ValueError) as err:
        raise DicomError(path, f"malformed {keyword} {value!r}: {err}") from None
    return values


def _int(ds: Dataset, keyword: str, default: int, path: PathLike) -> int:
    value = _value(ds, keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DicomError(path, f"malformed {keyword} {value!r}: expected an integer") from None


def _size(ds: Dataset, path: PathLike) -> tuple[int, int]:
    rows, cols = _int(ds, "Rows", -1, path), _int(ds, "Columns", -1, path)
    if rows <= 0 or cols <= 0:
        raise DicomError(
            path, "no valid Rows/Columns (0028,0010/0011): not an image, or the file is truncated; "
            "skip it or export it again"
        )
    return rows, cols


def meta_from_dataset(ds: Dataset, path: PathLike) -> DicomMeta:
    """The :class:`DicomMeta` of a dataset read from ``path`` (used for the fallback id and messages).

    ``image_id`` is SOPInstanceUID (0008,0018) when present and non-empty, else the file stem.
    """
    image_id = _validate_image_id(_text(ds, "SOPInstanceUID") or Path(path).stem, path)
    position = _floats(ds, "ImagePositionPatient", 3, path)
    spacing = _floats(ds, "PixelSpacing", 2, path) or [math.nan, math.nan]
    rows, cols = _size(ds, path)
    return DicomMeta(
        image_id=image_id,
        patient_id=_text(ds, "PatientID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        z=math.nan if position is None else position[2],
        instance_number=_int(ds, "InstanceNumber", -1, path),
        pixel_spacing_row=spacing[0],
        pixel_spacing_col=spacing[1],
        rows=rows,
        cols=cols,
        transfer_syntax=str(_transfer_syntax(ds, path)),
        implementation_version=_text(ds.file_meta, "ImplementationVersionName"),
    )


# --------------------------------------------------------------------------------------------- pixels


def _check_image(ds: Dataset, path: PathLike) -> None:
    """Only single-frame, single-sample monochrome images with Pixel Data are supported."""
    if "PixelData" not in ds:
        raise DicomError(
            path, "no Pixel Data (7FE0,0010) element: the file holds no image (or only a header); skip it"
        )
    frames = _int(ds, "NumberOfFrames", 1, path)
    if frames != 1:
        raise DicomError(path, f"unsupported NumberOfFrames {frames}: only single-frame 2-D slices are read")
    samples = _int(ds, "SamplesPerPixel", 1, path)
    photometric = _text(ds, "PhotometricInterpretation")
    if samples != 1 or photometric not in _MONOCHROME:
        raise DicomError(
            path, f"unsupported image type (PhotometricInterpretation {photometric!r}, SamplesPerPixel "
            f"{samples}): only MONOCHROME1/2 grey-level CT slices are read"
        )


def _decode(ds: Dataset, path: PathLike, size: tuple[int, int], work: Workspace | None = None) -> np.ndarray:
    """The stored pixel values as pydicom decodes them (unused high bits masked, sign applied).

    ``size`` is (Rows, Columns) as :func:`_size` read them.
    """
    uid = _transfer_syntax(ds, path)
    native = _decode_native(ds, uid, size, work)
    if native is not None:
        return native
    try:
        return ds.pixel_array
    except Exception as err:
        raise DicomError(path, _decode_reason(err, uid)) from err
    except BaseException as err:
        # pyo3-based decoders (pylibjpeg-rle) panic on some corrupt streams; PanicException derives
        # from BaseException and cannot be imported, so it is recognised by name.
        if type(err).__name__ != "PanicException":
            raise
        raise DicomError(path, _decode_reason(err, uid)) from err


def _decode_reason(err: BaseException, uid: UID) -> str:
    syntax = f"{uid.name} ({uid})" if uid.name != str(uid) else f"unknown transfer syntax {uid}"
    if isinstance(err, ValueError) and "less than expected" in str(err):
        return f"truncated pixel data ({_describe(err)}); copy or download the file again"
    if isinstance(err, NotImplementedError):
        return (f"no decoder for {syntax}: install one that supports it (pylibjpeg with its "
                f"-libjpeg/-openjpeg/-rle plugins, pyjpegls, or gdcm); {_describe(err)}")
    return f"undecodable {syntax} pixel data, the compressed stream is corrupt: {_describe(err)}"


def _rescale(ds: Dataset, path: PathLike) -> tuple[float, float]:
    """RescaleSlope (0028,1053) and RescaleIntercept (0028,1052), defaults 1 and 0; finite, slope != 0."""
    slope = _floats(ds, "RescaleSlope", 1, path)
    intercept = _floats(ds, "RescaleIntercept", 1, path)
    pair = (1.0 if slope is None else slope[0]), (0.0 if intercept is None else intercept[0])
    if not all(math.isfinite(v) for v in pair) or pair[0] == 0:
        raise DicomError(path, f"unusable RescaleSlope {pair[0]!r} / RescaleIntercept {pair[1]!r} (must be "
                         "finite, slope not 0): the image would be blank; fix the header or skip the file")
    return pair


def hu_from_stored(pixels: np.ndarray, bits_stored: int, pixel_representation: int, slope: float,
                   intercept: float, *, integer: bool = False, work: Workspace | None = None) -> np.ndarray:
    """Hounsfield units from decoded stored values and the header numbers: the RSNA fix, then rescale.

    Order of operations (pure; no header access):

    1. the RSNA 2019 fix, only when ``bits_stored`` (0028,0101) == 12, ``pixel_representation``
       (0028,0103) == 0 and ``intercept`` (0028,1052) > -100: some challenge slices store 12-bit values
       that wrap below 0 HU, so ``x = raw + 1000; x[x >= 4096] -= 4096`` and the intercept becomes -1000;
    2. the modality rescale ``HU = x * slope + intercept`` (RescaleSlope (0028,1053)).

    Returns float32, except that with ``integer`` the exact-integer rule applies: slope 1, an integral
    intercept of at most 2**23 and 8- or 16-bit integer pixels give int16 (when every value fits) or
    int32 HU, which cast exactly to the float32 result. With ``work``, the result may be one of its
    arrays. Raises ValueError for a non-finite slope or intercept.
    """
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        raise ValueError(f"RescaleSlope {slope!r} and RescaleIntercept {intercept!r} must be finite")
    intercept = float(intercept)
    if bits_stored == 12 and pixel_representation == 0 and intercept > -100:
        pixels = np.bitwise_and(pixels + 1000, 0xFFF)  # 12-bit values: + 1000 stays below 2**16, & wraps at 4096
        intercept = -1000.0
    if slope == 1.0 and intercept.is_integer():
        if integer and pixels.dtype.kind in "iu" and pixels.dtype.itemsize <= 2 \
                and abs(intercept) <= _EXACT_INTERCEPT:
            return _integer_hu(pixels, int(intercept), work)
        # integers below 2**24 are exact in float32: one cast and an in-place add, no float64 pass
        hu32 = pixels.astype(np.float32)
        hu32 += np.float32(intercept)
        return hu32
    return (pixels * slope + intercept).astype(np.float32)


def hu_from_dataset(ds: Dataset, path: PathLike) -> np.ndarray:
    """Hounsfield units, float32 (Rows, Columns), of a single-frame monochrome CT dataset.

    Order of operations:

    1. decode Pixel Data (7FE0,0010) as pydicom does (``ds.pixel_array``: bits above BitsStored masked,
       PixelRepresentation (0028,0103) applied; native 16-bit little-endian data is read straight from
       the buffer with the same result, see :func:`_decode_native`);
    2. the RSNA 2019 fix, FIRST and only when BitsStored (0028,0101) == 12, PixelRepresentation == 0
       and RescaleIntercept (0028,1052) > -100: some challenge slices store 12-bit values that wrap
       below 0 HU, so ``x = raw + 1000; x[x >= 4096] -= 4096`` and the intercept becomes -1000;
    3. the modality LUT: ``HU = x * RescaleSlope (0028,1053) + RescaleIntercept`` (defaults 1 and 0),
       or pydicom's ``apply_modality_lut`` when a Modality LUT Sequence (0028,3000) replaces them.

    Raises DicomError for missing Pixel Data, multi-frame, colour, truncated or undecodable pixels.
    """
    return _hu(ds, path, integer=False)


def _hu(ds: Dataset, path: PathLike, *, integer: bool, work: Workspace | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """:func:`hu_from_dataset`; with ``integer``, int16 or int32 wherever that is exact.

    See :func:`hu_from_stored` for the exact-integer rule (the cache stores integer HU and so skips
    float32 altogether). With ``work``, the result may be one of its arrays. An image over
    ``max_pixels`` is refused before its pixels are decoded (:func:`_check_decoded_size`).
    """
    size, (slope, intercept) = _pixel_header(ds, path, max_pixels)  # before the decode, the expensive part
    raw = _decode(ds, path, size, work)
    if raw.shape != size:
        raise DicomError(path, f"decoded pixels have shape {raw.shape}, header says {size}")
    if "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
    return hu_from_stored(raw, _int(ds, "BitsStored", 16, path), _int(ds, "PixelRepresentation", 0, path),
                          slope, intercept, integer=integer, work=work)


def _pixel_header(ds: Dataset, path: PathLike, max_pixels: int) -> tuple[tuple[int, int], tuple[float, float]]:
    """(Rows, Columns) and (slope, intercept) after every check that needs no decode; DicomError otherwise."""
    _check_image(ds, path)
    size = _size(ds, path)
    check_decoded_size(path, size, _int(ds, "NumberOfFrames", 1, path), _int(ds, "SamplesPerPixel", 1, path),
                       _int(ds, "BitsAllocated", 16, path), max_pixels)
    return size, _rescale(ds, path)


def check_pixel_header(ds: Dataset, path: PathLike = "instance", *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse (DicomError) an image the readers here would refuse on its header alone, before any decode.

    The same rule as :func:`read_hu` and :func:`read_dicom` apply before decoding: Pixel Data present,
    one frame, one grey-level sample, valid Rows/Columns, the decoded size under ``max_pixels`` 16-bit
    pixels, a usable rescale. The DICOM node checks each instance with it before acknowledging it.
    """
    _pixel_header(ds, path, max_pixels)


def _integer_hu(pixels: np.ndarray, intercept: int, work: Workspace | None) -> np.ndarray:
    """``pixels + intercept`` exactly: int16 when the pixels, the intercept and every sum fit in int16
    (a CT slice: 12-bit values, intercept -1024), one pass with no widening; int32 otherwise."""
    lo, hi = int(pixels.min()), int(pixels.max())
    int16 = np.iinfo(np.int16)
    dtype = np.int16 if (int16.min <= min(lo, lo + intercept) and max(hi, hi + intercept) <= int16.max
                         and int16.min <= intercept <= int16.max) else np.int32
    out = np.empty(pixels.shape, dtype) if work is None else work.get(pixels.shape, dtype)
    if dtype == np.int16 and pixels.dtype != np.int16:
        # exact: every value is in int16's range (uint16 below 2**15 has the same bits as int16)
        pixels = pixels.view(np.int16) if pixels.dtype == np.uint16 else pixels.astype(np.int16)
    return np.add(pixels, dtype(intercept), out=out)


# --------------------------------------------------------------------------------------------- public


def read_dicom(path: PathLike, *, integer: bool = False, work: Workspace | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[DicomMeta, np.ndarray]:
    """Header and HU pixels of one slice from a single read and a single decode.

    HU are float32 (as :func:`read_hu`); with ``integer``, int16 or int32 wherever that is exact (see
    :func:`hu_from_stored`). With ``work`` (a loop over many files), the HU array may belong to it: use
    it before the next read with the same workspace. An image over ``max_pixels`` (16-bit pixels,
    decoded or padded to a square) is refused with DicomError before it is inflated or decoded.
    """
    with _pydicom_reading():
        ds = _dcmread(path, stop_before_pixels=False, max_pixels=max_pixels)
        return meta_from_dataset(ds, path), _hu(ds, path, integer=integer, work=work, max_pixels=max_pixels)


def read_hu(path: PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Pixels of one slice in Hounsfield units, float32 (H, W); see :func:`hu_from_dataset`."""
    with _pydicom_reading():
        ds = _dcmread(path, stop_before_pixels=False, max_pixels=max_pixels)
        return _hu(ds, path, integer=False, max_pixels=max_pixels)


def read_meta(path: PathLike) -> DicomMeta:
    """Header fields of one slice, without reading the pixel data (truncated pixels go unnoticed)."""
    with _pydicom_reading():
        return meta_from_dataset(_dcmread(path, stop_before_pixels=True), path)


def read_header(path: PathLike) -> Dataset:
    """The whole header of a file (everything before Pixel Data), read as every reader here reads.

    For callers that need more than :class:`DicomMeta` (series selection in :mod:`ichdet.study.predict`);
    raises DicomError for a file that is not DICOM, truncated or malformed.
    """
    with _pydicom_reading():
        ds = _dcmread(path, stop_before_pixels=True)
        for elem in ds:  # convert every value now, while ID_… UID warnings are silenced
            _ = elem.value
        return ds
