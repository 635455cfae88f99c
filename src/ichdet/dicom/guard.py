"""What is checked before a DICOM file is read or decoded, private to :mod:`ichdet.dicom.read`.

A hostile or broken file must not hang a worker or make it allocate gigabytes: only regular files are
opened (a FIFO would block), a deflated data set is inflated only while it stays under the pixel cap,
and the decoded size a header claims is checked against the cap before any decode or resize.
"""

from __future__ import annotations

import os
import stat
import zlib
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian

from ichdet.errors import DicomError

PathLike = str | Path


def open_regular(path: PathLike) -> BinaryIO:
    """``open(path, "rb")`` that never blocks: a FIFO, socket or device is refused, not read."""
    try:  # O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer
        fh = open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK))  # noqa: SIM115
    except OSError as err:
        raise DicomError(path, f"cannot read the file: {err.strerror or err}") from err
    mode = os.fstat(fh.fileno()).st_mode
    if not stat.S_ISREG(mode):
        fh.close()
        what = "it is a folder" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
        raise DicomError(path, f"cannot read the file: {what}; pass a DICOM file")
    os.set_blocking(fh.fileno(), True)
    return fh


def check_inflated_size(fh: BinaryIO, path: PathLike, max_pixels: int) -> None:
    """Refuse a Deflated Explicit VR Little Endian file whose data set inflates past the pixel cap.

    pydicom inflates the whole data set before any header can be checked, so a few kilobytes of
    deflated zeros could claim gigabytes; this counts the inflated bytes, 1 MiB at a time, up to the
    cap (plus 1 MiB for the header) and stops there. Other files (the transfer syntax UID is absent
    from their first kilobyte) pay one small read. The file position is restored to the start.
    """
    head = fh.read(1024)
    fh.seek(0)
    if str(DeflatedExplicitVRLittleEndian).encode() not in head:
        return
    try:
        pydicom.filereader.read_preamble(fh, False)
        meta = pydicom.filereader._read_file_meta_info(fh)  # pydicom's own meta reader (no public name)
        deflated = meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
        limit = 2 * max_pixels + 2**20
        too_big = deflated and _inflated_size(fh.read(), limit) >= limit
    except Exception:  # a malformed file: pydicom reports it when it reads the file
        too_big = False
    fh.seek(0)
    if too_big:
        raise DicomError(path, f"image too large: the deflated data set inflates to over {limit} bytes, over the "
                         f"limit of {max_pixels} 16-bit pixels; skipped before inflating it (raise --max-pixels "
                         "if the file is genuine)")


def _inflated_size(data: bytes, limit: int) -> int:
    """How many bytes the raw deflate stream ``data`` inflates to, counting in 1 MiB steps (each step's
    output is dropped, so memory stays at about 1 MiB) and stopping once ``limit`` is reached."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    while data and total < limit:
        total += len(inflater.decompress(data, 2**20))
        data = inflater.unconsumed_tail
    return total


def check_decoded_size(path: PathLike, size: tuple[int, int], frames: int, samples: int, bits_allocated: int,
                       max_pixels: int) -> None:
    """Refuse, before any decode, inflation or resize, an image whose decoded size is over ``max_pixels``.

    Two sizes count, in 16-bit pixels: the decoded pixels (rows x columns x frames x samples x bytes
    per sample / 2) and the square the store pads the image to before resizing (a 1 x 65535 strip
    becomes 65535 x 65535). A tiny compressed file can claim either.
    """
    frames, samples = max(frames, 1), max(samples, 1)
    nbytes = -(-max(bits_allocated, 1) // 8)
    decoded = size[0] * size[1] * frames * samples * nbytes // 2
    padded = max(size) ** 2
    if max(decoded, padded) > max_pixels:
        raise DicomError(path, f"image too large: {size[0]} x {size[1]} pixels x {frames} frame(s) x {nbytes} "
                         f"byte(s) (padded square {max(size)}^2) is over the limit of {max_pixels} 16-bit "
                         "pixels; skipped before decoding (raise --max-pixels if the file is genuine)")
