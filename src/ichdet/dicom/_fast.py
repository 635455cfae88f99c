"""The fast paths of DICOM reading, private to :mod:`ichdet.dicom.read`: header values and native pixels.

Both give exactly what pydicom gives (tests compare them on every sample file), only without
pydicom's per-element bookkeeping and decoder machinery, which cost a large share of reading a CT
slice. Anything unusual falls back to pydicom in :mod:`ichdet.dicom.read`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.values import convert_value

_NATIVE_LITTLE_ENDIAN = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian})
_MAX_SIDE = 2**16 - 1  # pydicom's limit on Rows and Columns
_PIXEL_DATA = 0x7FE00010
#: VRs whose values need no character set (binary numbers or ASCII by the standard): see value.
_PLAIN_VRS = frozenset({"US", "SS", "UL", "SL", "DS", "IS", "UI", "CS"})


def value(ds: Dataset, keyword: str) -> Any:
    """The value of the element named ``keyword`` (as ``ds.get(keyword)``), None when absent.

    An element read from a file stays raw until it is first accessed; ``ds.get`` then converts it and
    stores the result back into the dataset, with bookkeeping (tag and VR checks, ambiguous-VR fixes)
    that costs about 15 µs an element: over 20 fields that is a quarter of reading a CT slice. A raw
    element of a VR in :data:`_PLAIN_VRS` is converted here by pydicom's own ``convert_value`` and not
    stored; every other element (text in a character set, sequences, UN, ambiguous VRs) takes the
    normal path, so the value is always the one ``ds.get`` returns.
    """
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"{keyword!r} is not a DICOM keyword")
    elem = ds.get_item(tag)
    if elem is None:
        return None
    if isinstance(elem, RawDataElement):
        vr = elem.VR or dictionary_VR(tag)
        return convert_value(vr, elem) if vr in _PLAIN_VRS else ds[tag].value
    return elem.value


class Workspace:
    """Pixel buffers reused from one file to the next by a loop over many files (the preprocessor).

    A fresh megabyte-sized array per step and file costs page faults: glibc hands freed large blocks
    back to the OS, so every new one is faulted in again, which costs as much as the arithmetic. An
    array taken from here is overwritten by the next file read with the same workspace.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[tuple[int, ...], str], np.ndarray] = {}

    def get(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """An uninitialised array of ``shape`` and ``dtype``, the same one on every call."""
        key = (shape, np.dtype(dtype).str)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = np.empty(shape, dtype)
        return buf


def decode_native(ds: Dataset, uid: UID, size: tuple[int, int],
                   work: Workspace | None = None) -> np.ndarray | None:
    """``ds.pixel_array`` for the layout nearly every CT slice has, without pydicom's decoder machinery.

    That layout: Implicit or Explicit VR Little Endian, BitsAllocated (0028,0100) 16, valid Rows,
    Columns, BitsStored (0028,0101) and PixelRepresentation (0028,0103), SamplesPerPixel (0028,0002)
    present, and exactly Rows x Columns x 2 bytes of Pixel Data. The buffer is viewed as ``<u2``/``<i2``
    and, when BitsStored < 16, the unused high bits are masked off (unsigned) or replaced by the sign
    bit (signed), as pydicom does. Anything else (compressed, other widths, a missing or
    odd element, pixel data that is short or padded, which pydicom reports or trims) returns None and
    goes to pydicom, errors and warnings included. The result may be a read-only view of the buffer,
    or an array of ``work``.
    """
    if uid not in _NATIVE_LITTLE_ENDIAN or "SamplesPerPixel" not in ds or value(ds, "BitsAllocated") != 16:
        return None
    rows, cols = size
    bits_stored, representation = value(ds, "BitsStored"), value(ds, "PixelRepresentation")
    if not (isinstance(bits_stored, int) and rows <= _MAX_SIDE and cols <= _MAX_SIDE and 1 <= bits_stored <= 16
            and representation in (0, 1)):
        return None
    data = ds.get_item(_PIXEL_DATA).value  # the bytes as read, without pydicom's OB/OW resolution
    if not isinstance(data, bytes) or len(data) != rows * cols * 2:
        return None
    pixels = np.frombuffer(data, dtype="<i2" if representation else "<u2").reshape(rows, cols)
    unused = 16 - bits_stored
    if unused:
        out = None if work is None else work.get(pixels.shape, pixels.dtype)
        if representation:  # sign-extend: shift the sign bit to the top and back (arithmetic shift)
            pixels = np.left_shift(pixels, unused, out=out)
            np.right_shift(pixels, unused, out=pixels)
        else:
            pixels = np.bitwise_and(pixels, (1 << bits_stored) - 1, out=out)
    return pixels


