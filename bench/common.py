"""Helpers shared by the benchmark scripts: machine description, interleaved timing, medians, JSON.

Benchmarks here *measure*; they do not assert. On a shared, noisy machine a single timing means little,
so every script runs its variants several times, interleaved (variant A, B, C, then A, B, C again, ...)
so that a burst of load from elsewhere hits all of them alike, and reports medians and ratios of
medians taken in the same run.

Versions are read with :mod:`importlib.metadata`, not by importing the packages: importing torch into
a benchmark that forks worker processes would make every fork slower and skew the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "RSNA_SAMPLE",
    "Variant",
    "add_common_args",
    "add_input_args",
    "cpu_model",
    "format_machine",
    "input_folder",
    "machine_info",
    "median",
    "rate_table",
    "run_interleaved",
    "save_json",
    "symlink_farm",
    "table",
    "usable_cores",
    "verdict",
    "warm_files",
    "write_json",
]

#: The real RSNA sample next to the repository (never inside it): ../shared/data/rsna-sample.
RSNA_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "rsna-sample"

#: Distributions whose versions a benchmark report names (absent ones are reported as such).
PACKAGES = ("numpy", "torch", "opencv-python-headless", "pydicom", "pandas", "albumentations")


# ------------------------------------------------------------------------------------ the machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _version(distribution: str) -> str:
    from importlib import metadata  # here, not at the top: bench_labels_scale's measured child imports common

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask, not the machine's total (as ichdet counts them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_info() -> dict[str, Any]:
    """CPU model, cores (total and usable by this process), RAM, load, OS and package versions."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable_cores(),
        "ram_gib": _ram_gib(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
    }


def format_machine(info: dict[str, Any]) -> str:
    """The machine description as a few lines for the top of a report."""
    packages = ", ".join(f"{k} {v}" for k, v in info["packages"].items())
    return (f"machine: {info['cpu']}, {info['cores']} cores ({info['cores_usable']} usable), "
            f"{info['ram_gib']} GiB RAM, load {info['load_avg_1_5_15']}\n"
            f"         {info['os']}, Python {info['python']}\n"
            f"         {packages}")


# ------------------------------------------------------------------------------------ measuring


class Variant:
    """One thing to time: ``run()`` does the work once and returns how many items it handled.

    ``setup()`` (untimed, optional) runs before every timed call, e.g. to make a fresh output folder.
    """

    def __init__(self, name: str, run: Callable[[], int], setup: Callable[[], None] | None = None,
                 unit: str = "items") -> None:
        self.name, self.run, self.setup, self.unit = name, run, setup, unit


def run_interleaved(variants: Sequence[Variant], repeats: int, *, log: Callable[[str], None] | None = print,
                    sync: Callable[[], None] | None = None) -> dict[str, dict[str, Any]]:
    """Time every variant ``repeats`` times, interleaved, rotating the order each round.

    Returns per variant: ``seconds`` and ``rate`` (items/s) of every run, their medians, and ``items``.
    The rotation keeps a variant from always running right after the same neighbour (whose leftovers,
    such as dirty pages being written back, would then always land on it). ``sync`` (optional) is
    called right before the clock starts and right before it stops, e.g. to drain a GPU's queue.
    """
    runs: dict[str, list[tuple[float, int]]] = {v.name: [] for v in variants}
    for r in range(repeats):
        k = r % len(variants)
        for v in [*variants[k:], *variants[:k]]:
            if v.setup is not None:
                v.setup()
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            items = v.run()
            if sync is not None:
                sync()
            runs[v.name].append((time.perf_counter() - t0, items))
        if log is not None:
            log(f"  round {r + 1}/{repeats}: " + ", ".join(
                f"{name} {runs[name][-1][1] / runs[name][-1][0]:.0f}/s" for name in runs))
    out: dict[str, dict[str, Any]] = {}
    for v in variants:
        seconds = [s for s, _ in runs[v.name]]
        rates = [n / s for s, n in runs[v.name]]
        out[v.name] = {"unit": v.unit, "items": runs[v.name][0][1], "seconds": seconds, "rate": rates,
                       "median_seconds": median(seconds), "median_rate": median(rates)}
    return out


def median(values: Iterable[float]) -> float:
    """The median (of an odd or even number of values)."""
    return float(statistics.median(list(values)))


def warm_files(paths: Iterable[str | os.PathLike[str]]) -> int:
    """Read every file once so that the OS page cache holds it; returns the bytes read."""
    total = 0
    for path in paths:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                total += len(chunk)
    return total


def symlink_farm(sources: Iterable[Path], farm: Path) -> list[Path]:
    """Symlinks to ``sources`` under one folder ``farm`` (for tools that take one folder); returns the links.

    Files keep their names (a DICOM's image id may fall back to its stem), in one subfolder per source
    folder, so same-named files from different folders do not clash. Links are per file because a
    folder walk does not follow directory links.
    """
    parents: dict[Path, Path] = {}
    links = []
    for src in sources:
        parent = parents.setdefault(src.parent, farm / f"d{len(parents):03d}_{src.parent.name}")
        parent.mkdir(parents=True, exist_ok=True)
        link = parent / src.name
        if link.exists():
            raise SystemExit(f"{src}: listed twice; every file may appear once")
        link.symlink_to(src.resolve())
        links.append(link)
    return links


def input_folder(tmp: Path, folders: Sequence[Path] = (), files: Sequence[Path] = (), *, synthetic_studies: int = 0,
                 size: int = 512, hint: str = "pass --images DIR") -> Path:
    """One folder holding every input DICOM file, for tools that take one folder (ichdet.cache.writer.preprocess).

    The inputs: ``files``, every DICOM file under ``folders`` (each must be a folder, else exit with
    ``hint``) and, with ``synthetic_studies``, that many synthetic studies at ``size`` px generated
    (untimed) under ``tmp/synth``. Returned: the folder itself where the inputs are exactly one folder,
    else ``tmp/images``, a :func:`symlink_farm` of all the files. ichdet is imported only here.
    """
    folders = list(folders)
    for folder in folders:
        if not Path(folder).is_dir():
            raise SystemExit(f"{folder}: no such folder; {hint}")
    if synthetic_studies:
        from ichdet.synth import SynthSpec, make_dataset

        spec = SynthSpec(n_studies=synthetic_studies, n_test_studies=0, size=size, seed=0)
        folders.append(make_dataset(tmp / "synth", spec).train_dir)
    if len(folders) == 1 and not files:
        return Path(folders[0])
    from ichdet.cache.index import list_dicom_files

    sources = [*files, *(p for folder in folders for p in list_dicom_files(folder))]
    if not sources:
        raise SystemExit("no input files")
    symlink_farm(sources, tmp / "images")
    return tmp / "images"


# ------------------------------------------------------------------------------------ reporting


def verdict(ok: bool) -> str:
    """PASS or FAIL."""
    return "PASS" if ok else "FAIL"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table, first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *map(line, cells[1:])])


def rate_table(results: dict[str, dict[str, Any]], column: str, value: Callable[[dict[str, Any]], str]) -> str:
    """:func:`run_interleaved`'s results as a table: median rate, ``column`` (``value(result)``), min-max rate."""
    unit = next(iter(results.values()))["unit"]
    rows = [[name, f"{r['median_rate']:.0f}", value(r), f"{min(r['rate']):.0f}-{max(r['rate']):.0f}"]
            for name, r in results.items()]
    return table(["variant", f"{unit}/s (median)", column, f"{unit}/s (min-max)"], rows)


def add_common_args(parser: argparse.ArgumentParser, repeats: int = 5) -> None:
    """``--repeats N`` and ``--json PATH``, the options every benchmark script takes."""
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed rounds per variant (default {repeats})")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON here")


def add_input_args(parser: argparse.ArgumentParser, size: int) -> None:
    """``--images DIR`` (repeatable) and ``--synthetic-studies N``: the inputs of :func:`input_folder`."""
    parser.add_argument("--images", type=Path, action="append", metavar="DIR",
                        help="DICOM folder (repeatable; default: the RSNA sample's train and test images)")
    parser.add_argument("--synthetic-studies", type=int, default=0, metavar="N",
                        help=f"also generate N synthetic {size} px studies (untimed) and include their files")


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON with a trailing newline (the parent folder is created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def save_json(path: str | os.PathLike[str] | None, obj: Any) -> None:
    """:func:`write_json` where ``path`` is given (``--json``), and a line saying so."""
    if path:
        write_json(path, obj)
        print(f"\nwrote {path}")
