"""Preprocessing throughput (DICOM files/s): ichdet's cache builder against a naive baseline and a floor.

What is measured, on the same list of files (default: the real RSNA sample, stage_2_train_images +
stage_2_test_images, 296 slices of 512x512), each variant timed end to end, wall clock:

``baseline``
    the naive 2019 pipeline, one process: per file ``pydicom.dcmread`` -> HU (``pixel_array * slope +
    intercept``, float64) -> brain 40/80, subdural 80/200, soft tissue 40/380 windows as float math ->
    stack -> ``cv2.imwrite`` of a 512x512 RGB PNG into a fresh temporary folder.
``floor``
    ``pydicom.dcmread`` + ``.pixel_array`` and nothing else (nothing written), in one process
    (``floor_1p``) and in a pool of 2 worker processes (``floor_2p``, pool start included, files in
    the same chunks as ichdet uses). No reader of these files can beat it without a faster decoder.
``ichdet``
    ``ichdet.cache.writer.preprocess(images, out, None, PreprocessOptions(size=512, workers=W, progress=False))``
    into a fresh folder each time, W = 2 (``ichdet_2w``) and 1 (``ichdet_1w``): header + HU + store
    conversion, int16 shards, manifests, index, errors.csv, every file written atomically (temporary
    name + rename); index.parquet, errors.csv and cache.json also fsynced (the shards and manifests
    are not: a killed run cannot leave half a file, and a power cut is caught by the resume check).

Diagnostics (not targets), timed in the same rounds, to show where the gap to the floor is:

``diag_compute_1p``
    ichdet's per-file work inside the preprocessor (read, HU, int16 store conversion) in one process,
    nothing written: compare with ``floor_1p``.
``diag_2w_2chunks``
    ``ichdet_2w`` with two chunks of n/2 files instead of the default chunks of 16 (for fewer than
    ~1000 files; 256 per chunk on the full data set), so each chunk's fixed costs (manifest, task
    round trip) are amortised as they are at scale.
``diag_2w_nofsync``
    ``ichdet_2w`` with ``ichdet.io``'s fsync replaced by a no-op (in the forked workers too), to show
    what the durability guarantee costs on this disk.

After the rounds, ``preprocess(workers=1)`` is run a few more times with ichdet's internal steps
wrapped in timers (``--no-breakdown`` skips this) and the report lists milliseconds per file per step.

Before timing, every file is read once so that the OS page cache holds it (the disk is not measured).
Output folders go under ``--tmp`` (default: the system temporary folder), whose filesystem the report
names, because fsync costs depend on it. The variants run ``--repeats`` rounds, interleaved with the
order rotated each round; the report gives median files/s, the ratios of medians and PASS/FAIL for the
two targets (ichdet_2w / baseline >= 8, ichdet_2w / floor_2p >= 0.6). The exit status is 0 whatever the
verdicts: this is a measurement, not a test.

Usage::

    .venv/bin/python bench/bench_preprocess.py [--repeats 5] [--json out.json]
        [--images DIR ...] [--files-from LIST] [--synthetic-studies N] [--tmp DIR] [--no-breakdown]
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from common import (
    RSNA_SAMPLE,
    Variant,
    add_common_args,
    add_input_args,
    format_machine,
    input_folder,
    machine_info,
    median,
    rate_table,
    run_interleaved,
    save_json,
    verdict,
    warm_files,
)

import ichdet.io
from ichdet.cache.index import list_dicom_files
from ichdet.cache.writer import PreprocessOptions, _default_chunk_size, preprocess
from ichdet.dicom.windowing import SEED_WINDOWS  # brain 40/80, subdural 80/200, soft tissue 40/380 (center/width HU)

DEFAULT_IMAGES = (RSNA_SAMPLE / "stage_2_train_images", RSNA_SAMPLE / "stage_2_test_images")
SIZE = 512
TARGET_VS_BASELINE = 8.0
TARGET_VS_FLOOR = 0.6


# ------------------------------------------------------------------------------------ the variants


def naive_2019(path: str, out_dir: Path) -> None:
    """One file the way 2019 kernels did it: float64 HU, float windows, PNG."""
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    channels = []
    for window in SEED_WINDOWS:
        lo, hi = window.low, window.high  # center -/+ width / 2
        channels.append((np.clip(hu, lo, hi) - lo) / (hi - lo))
    image = (np.stack(channels, axis=-1) * 255).astype(np.uint8)
    cv2.imwrite(str(out_dir / f"{Path(path).stem}.png"), image)


def _floor_chunk(paths: Sequence[str]) -> int:
    """dcmread + pixel_array of every path; only a count goes back (no pixels through the pipe)."""
    for path in paths:
        pydicom.dcmread(path).pixel_array  # noqa: B018 - decoding is the point
    return len(paths)


def floor_pool(chunks: Sequence[Sequence[str]], workers: int) -> int:
    """The floor in a pool of ``workers`` processes (started and stopped inside the timing)."""
    with ProcessPoolExecutor(workers) as pool:
        return sum(pool.map(_floor_chunk, chunks))


def chunked(files: Sequence[str]) -> list[list[str]]:
    """The files in the chunks ichdet.cache.writer would use (~64 chunks, 16 to 256 files each)."""
    step = _default_chunk_size(len(files))
    return [list(files[i:i + step]) for i in range(0, len(files), step)]


@contextmanager
def no_fsync() -> Iterator[None]:
    """ichdet.io's fsync as a no-op (forked workers inherit the patch)."""
    original = ichdet.io._fsync_file
    ichdet.io._fsync_file = lambda path: None  # type: ignore[assignment]
    try:
        yield
    finally:
        ichdet.io._fsync_file = original  # type: ignore[assignment]


class Scratch:
    """A fresh, empty output folder per timed call (the previous one is removed, untimed)."""

    def __init__(self, parent: Path, name: str) -> None:
        self.parent, self.name, self.count, self.path = parent, name, 0, parent / name

    def fresh(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.count += 1
        self.path = self.parent / f"{self.name}_{self.count}"
        self.path.mkdir()


def _compute_only(files: Sequence[str]) -> int:
    """ichdet's per-file work in the preprocessor (read, HU, store conversion) with nothing written."""
    from ichdet.cache.writer import hu_to_store
    from ichdet.dicom.read import Workspace, read_dicom

    work, out = Workspace(), np.empty((SIZE, SIZE), np.int16)
    for path in files:
        hu_to_store(read_dicom(path, integer=True, work=work)[1], SIZE, out=out)
    return len(files)


def build_variants(farm: Path, files: list[str], scratch_root: Path) -> list[Variant]:
    """Every timed variant over the same ``files`` (paths inside the symlink ``farm``)."""
    chunks = chunked(files)
    out: dict[str, Scratch] = {}

    def baseline() -> int:
        for path in files:
            naive_2019(path, out["baseline"].path)
        return len(files)

    def ichdet_run(name: str, workers: int, fsync: bool = True, chunk_size: int | None = None) -> Variant:
        out[name] = Scratch(scratch_root, name)

        def run() -> int:
            opts = PreprocessOptions(size=SIZE, workers=workers, chunk_size=chunk_size, progress=False)
            with nullcontext() if fsync else no_fsync():
                summary = preprocess(farm, out[name].path, None, opts)
            if summary.n_errors or summary.n_images != len(files):
                raise SystemExit(f"{name}: {summary.n_images} images, {summary.n_errors} errors "
                                 f"(see {out[name].path}/errors.csv); expected {len(files)} and 0")
            return summary.n_files

        return Variant(name, run, out[name].fresh, "files")

    out["baseline"] = Scratch(scratch_root, "baseline")
    variants = [
        Variant("baseline", baseline, out["baseline"].fresh, "files"),
        Variant("floor_1p", lambda: _floor_chunk(files), None, "files"),
        Variant("floor_2p", lambda: floor_pool(chunks, 2), None, "files"),
        ichdet_run("ichdet_1w", 1),
        ichdet_run("ichdet_2w", 2),
        # diagnostics: where the gap to the floor is
        Variant("diag_compute_1p", lambda: _compute_only(files), None, "files"),
        ichdet_run("diag_2w_2chunks", 2, chunk_size=-(-len(files) // 2)),
    ]
    if multiprocessing.get_start_method() == "fork":  # the patch only reaches forked workers
        variants.append(ichdet_run("diag_2w_nofsync", 2, fsync=False))
    return variants


PROCESS_CHUNK = "_process_chunk"


def breakdown(farm: Path, scratch_root: Path, repeats: int) -> dict[str, float]:
    """Wall seconds per file of each step inside ``preprocess(workers=1)``, median over ``repeats`` runs.

    The steps are timed by wrapping ichdet's internal functions (in this process: workers=1), so the
    figures add up to roughly the whole run; a step whose function is renamed is simply left out.
    """
    import ichdet.cache.writer as cache_mod

    steps = {"read DICOM + HU (read_dicom)": (cache_mod, "read_dicom"),
             "HU -> int16 store (hu_to_store)": (cache_mod, "hu_to_store"),
             "shard manifests (_write_manifest)": (cache_mod, "_write_manifest"),
             PROCESS_CHUNK: (cache_mod, "_process_chunk"),
             "list files, plan chunks (_plan_chunks)": (cache_mod, "_plan_chunks"),
             "merge manifest rows (_collect)": (cache_mod, "_collect"),
             "build_index": (cache_mod, "build_index"),
             "index/errors/cache.json + fsync (_commit)": (cache_mod, "_commit")}
    spent: dict[str, list[float]] = {name: [] for name in steps}
    totals: list[float] = []
    n_files = 0
    for r in range(repeats):
        seconds = dict.fromkeys(steps, 0.0)
        originals = {name: getattr(mod, attr) for name, (mod, attr) in steps.items() if hasattr(mod, attr)}
        for name, fn in originals.items():
            mod, attr = steps[name]
            setattr(mod, attr, _timed(fn, name, seconds))
        try:
            t0 = time.perf_counter()
            n_files = preprocess(farm, scratch_root / f"breakdown_{r}", None,
                                 PreprocessOptions(size=SIZE, workers=1, progress=False)).n_files
            totals.append(time.perf_counter() - t0)
        finally:
            for name, fn in originals.items():
                mod, attr = steps[name]
                setattr(mod, attr, fn)
            shutil.rmtree(scratch_root / f"breakdown_{r}", ignore_errors=True)
        for name in originals:
            spent[name].append(seconds[name])
    result = {name: median(v) / n_files for name, v in spent.items() if v}
    if PROCESS_CHUNK in result:  # the part of a chunk's time not in the steps inside it: the pixel writes
        chunk = result.pop(PROCESS_CHUNK)
        inside = ("read DICOM + HU (read_dicom)", "HU -> int16 store (hu_to_store)",
                  "shard manifests (_write_manifest)")
        result["shard writes, rows (rest of _process_chunk)"] = chunk - sum(result.get(k, 0.0) for k in inside)
    result["other (pool, cache.json, ...)"] = median(totals) / n_files - sum(result.values())
    result["total"] = median(totals) / n_files
    return result


def _timed(fn: Callable[..., Any], name: str, seconds: dict[str, float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - t0
    return wrapper


# ------------------------------------------------------------------------------------ the input


def gather(args: argparse.Namespace, tmp: Path) -> Path:
    """One folder of the source files: --files-from, else the --images folders, plus an optional synthetic set."""
    if args.files_from:
        files, folders = [Path(line.strip()) for line in args.files_from.read_text().splitlines() if line.strip()], []
    else:
        files, folders = [], args.images or list(DEFAULT_IMAGES)
    return input_folder(tmp, folders, files, synthetic_studies=args.synthetic_studies, size=SIZE,
                        hint="pass --images DIR or --files-from LIST")


def filesystem_of(path: Path) -> str:
    """``device type`` of the mount that holds ``path`` (from /proc/mounts), for the report."""
    best, found = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return found
    resolved = str(path.resolve())
    for line in mounts:
        device, mount, fstype = line.split()[:3]
        if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, found = mount, f"{fstype} on {device} (mounted at {mount})"
    return found


# ------------------------------------------------------------------------------------ the report


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios of medians (same run) and the two verdicts."""
    rate = {name: r["median_rate"] for name, r in results.items()}
    pairs = [("ichdet_2w", "baseline"), ("ichdet_2w", "floor_2p"), ("ichdet_1w", "floor_1p"),
             ("ichdet_2w", "ichdet_1w"), ("floor_2p", "floor_1p"), ("diag_compute_1p", "floor_1p"),
             ("diag_2w_2chunks", "ichdet_2w"), ("diag_2w_nofsync", "ichdet_2w")]
    ratios = {f"{a}/{b}": rate[a] / rate[b] for a, b in pairs if a in rate and b in rate}
    targets = {
        "ichdet_2w/baseline": {"target": TARGET_VS_BASELINE,
                               "pass": ratios["ichdet_2w/baseline"] >= TARGET_VS_BASELINE},
        "ichdet_2w/floor_2p": {"target": TARGET_VS_FLOOR, "pass": ratios["ichdet_2w/floor_2p"] >= TARGET_VS_FLOOR},
    }
    return {"ratios": ratios, "targets": targets}


def report(results: dict[str, dict[str, Any]], summary: dict[str, Any], steps: dict[str, float] | None) -> str:
    """The table of medians, the ratios, the verdicts and the breakdown."""
    lines = [rate_table(results, "s (median)", lambda r: f"{r['median_seconds']:.3f}"), ""]
    for name, value in summary["ratios"].items():
        target = summary["targets"].get(name)
        tail = f"   target >= {target['target']:g}: {verdict(target['pass'])}" if target else ""
        lines.append(f"{name:<30} {value:6.2f}x{tail}")
    if steps:
        lines += ["", "where ichdet_1w's time goes (ms per file, median of the breakdown runs):"]
        lines += [f"  {name:<48} {1e3 * sec:6.3f}" for name, sec in steps.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Gather and warm the files, time the variants interleaved, print, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    add_input_args(parser, SIZE)
    parser.add_argument("--files-from", type=Path, metavar="LIST", help="text file, one DICOM path per line")
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()),
                        help="where inputs links and outputs go (default: the system temp folder)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-step breakdown runs")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\..*")  # ID_… UIDs, expected

    machine = machine_info()
    print(format_machine(machine))
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_", dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        farm = gather(args, tmp)
        files = [str(p) for p in list_dicom_files(farm)]  # in ichdet's order
        nbytes = warm_files(files)
        fs = filesystem_of(tmp)
        print(f"input: {len(files)} files, {nbytes / 1e6:.0f} MB; OS file cache warmed (every file read once "
              f"before timing, so the disk read is not measured)\n"
              f"output: {tmp} ({fs}); {args.repeats} rounds, variants interleaved, order rotated\n")
        (tmp / "out").mkdir()
        results = run_interleaved(build_variants(farm, files, tmp / "out"), args.repeats)
        steps = None if args.no_breakdown else breakdown(farm, tmp / "out", max(3, args.repeats // 2))
    summary = summarise(results)
    print()
    print(report(results, summary, steps))
    save_json(args.json, {
        "benchmark": "preprocess", "machine": machine,
        "setup": {"files": len(files), "bytes": nbytes, "size": SIZE, "repeats": args.repeats,
                  "output_filesystem": fs, "os_cache_warmed": True, "start_method": multiprocessing.get_start_method()},
        "results": results, **summary, "breakdown_s_per_file": steps})
    return 0


if __name__ == "__main__":
    sys.exit(main())
