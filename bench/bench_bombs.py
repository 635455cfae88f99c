"""Peak memory of one preprocessing worker on memory-bomb DICOM files (issue 8), against a normal slice.

Each file below is put alone in a folder and preprocessed by ``ichdet.cache.writer.preprocess(workers=1)``
in a fresh process, so the process is the worker; its peak resident set (``ru_maxrss``) is reported,
together with the same process's peak after the imports alone (``idle``) and on one real 512x512 RSNA
slice (``normal``). The bombs are a few kilobytes on disk and claim gigabytes:

``rle_20000`` / ``rle_60000``
    RLE Lossless with Rows = Columns = 20000 (60000): decoding would allocate 800 MB (7.2 GB).
``deflate_60000``
    Deflated Explicit VR Little Endian claiming 60000 x 60000 (7.2 GB decoded).
``deflate_800mb``
    an honest 512 x 512 header with 800 MB of deflated zeros as Pixel Data (~0.8 MB on disk): pydicom
    inflates the whole data set before any header can be checked.
``strip``
    1 x 65535 uncompressed: padding it to a square for resizing would ask OpenCV for 17 GB.

Every bomb must be refused (reason in errors.csv) with the worker's peak near ``normal``.
``largest_admitted`` (an uncompressed 4096 x 4096 slice, the default cap) is stored: its peak is the
bound on a worker's memory. Usage::

    .venv/bin/python bench/bench_bombs.py [--repeats 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

import pydicom
from common import RSNA_SAMPLE, add_common_args, format_machine, machine_info, median, save_json, table
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

SOURCE = RSNA_SAMPLE / "stage_2_test_images" / "ID_000a50137.dcm"

#: Run in a fresh process: preprocess one folder with one worker, print peak RSS (KiB) and the errors.
WORKER = """
import json, resource, sys
from ichdet.cache.writer import PreprocessOptions, preprocess
idle = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
summary = preprocess(sys.argv[1], sys.argv[2], None, PreprocessOptions(size=512, workers=1, progress=False))
import pandas as pd
errors = pd.read_csv(sys.argv[2] + "/errors.csv")["reason"].tolist()
print(json.dumps({"idle_kib": idle, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "images": summary.n_images, "errors": errors}))
"""


def _crafted(syntax: pydicom.uid.UID | None, rows: int, cols: int, pixel_data: bytes) -> pydicom.Dataset:
    ds = pydicom.dcmread(SOURCE)
    ds.Rows, ds.Columns = rows, cols
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = pixel_data
    ds["PixelData"].VR = "OB" if syntax == RLELossless else "OW"
    return ds


def _deflate_bomb(path: Path, inflated_pixels: int) -> None:
    """A deflated file with an honest 512x512 header and ``inflated_pixels`` bytes of zeros as Pixel Data,
    streamed through zlib (never held in memory)."""
    ds = _crafted(DeflatedExplicitVRLittleEndian, 512, 512, b"")
    del ds.PixelData
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, inflated_pixels)
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(2**22)
    with open(path, "wb") as fh:
        fh.write(b"\0" * 128 + b"DICM" + meta.getvalue())
        fh.write(squeeze.compress(body.getvalue() + header))
        for start in range(0, inflated_pixels, len(zeros)):
            fh.write(squeeze.compress(zeros[: min(len(zeros), inflated_pixels - start)]))
        fh.write(squeeze.flush())


def make_files(folder: Path) -> dict[str, Path]:
    """One folder per case, each holding one file; returns case -> folder."""
    cases: dict[str, Path] = {}

    def folder_of(name: str) -> Path:
        cases[name] = folder / name
        cases[name].mkdir()
        return cases[name] / f"{name}.dcm"

    folder_of("normal").write_bytes(SOURCE.read_bytes())
    _crafted(RLELossless, 20000, 20000, encapsulate([b"\0" * 64])).save_as(folder_of("rle_20000"))
    _crafted(RLELossless, 60000, 60000, encapsulate([b"\0" * 64])).save_as(folder_of("rle_60000"))
    _crafted(DeflatedExplicitVRLittleEndian, 60000, 60000, bytes(128)).save_as(folder_of("deflate_60000"))
    _deflate_bomb(folder_of("deflate_800mb"), 20000 * 20000 * 2)
    _crafted(None, 1, 65535, bytes(2 * 65535)).save_as(folder_of("strip"))
    _crafted(None, 4096, 4096, bytes(2 * 4096 * 4096)).save_as(folder_of("largest_admitted"))
    return cases


def measure(folder: Path, out: Path) -> dict[str, Any]:
    src = Path(__file__).resolve().parents[1] / "src"
    run = subprocess.run([sys.executable, "-c", WORKER, str(folder), str(out)], capture_output=True, text=True,
                         env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, check=True)
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, repeats=1)
    args = parser.parse_args()
    info = machine_info()
    print(format_machine(info))
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_bombs_") as tmp:
        for name, folder in make_files(Path(tmp)).items():
            size = next(folder.iterdir()).stat().st_size
            runs = [measure(folder, Path(tmp) / f"out_{name}_{r}") for r in range(args.repeats)]
            peak = median(run["peak_kib"] for run in runs)  # peak RSS barely varies; the median of repeats
            results[name] = {"file_bytes": size, **runs[0], "peak_kib": peak}
    rows = [[name, f"{r['file_bytes'] / 1024:.0f}", f"{r['idle_kib'] / 1024:.0f}", f"{r['peak_kib'] / 1024:.0f}",
             f"{(r['peak_kib'] - results['normal']['peak_kib']) / 1024:+.0f}", r["images"],
             (r["errors"] or [""])[0][:90]] for name, r in results.items()]
    print(table(["file", "KiB on disk", "idle MiB", "peak MiB", "vs normal MiB", "images", "reason"], rows))
    save_json(args.json, {"benchmark": "bombs", "machine": info, "results": results})


if __name__ == "__main__":
    main()
