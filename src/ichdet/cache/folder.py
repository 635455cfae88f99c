"""The life cycle of a cache folder, private to :mod:`ichdet.cache.writer`: who may write it, its generations,
and the commit that makes a new generation current (see the layout in :mod:`ichdet.cache.writer`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd

from ichdet.cache.store import CacheManifest, CacheSettings, generation_dir
from ichdet.errors import IchdetError
from ichdet.io import LOCK_NAME, atomic_path, is_temp_name, remove_stale_temps, write_json_atomic, write_parquet_atomic


def check_out(out: Path, previous: CacheManifest | None) -> None:
    """Refuse an --out that is not a writable folder, or a folder ichdet did not create."""
    if out.exists() and not out.is_dir():
        raise IchdetError(f"--out {out} is a file, not a folder; choose a folder for the cache")
    if not out.exists():
        return
    if not os.access(out, os.W_OK | os.X_OK):
        raise IchdetError(f"--out {out}: permission denied, the folder is not writable; choose another")
    if previous is not None:
        return
    names = {p.name for p in out.iterdir() if not is_temp_name(p.name)}
    ours = {LOCK_NAME, "pixels", "index.parquet", "errors.csv"}
    if not names <= ours or (names - {LOCK_NAME} and "pixels" not in names):
        raise IchdetError(f"--out {out} holds files that are not an ichdet cache (no cache.json), e.g. "
                          f"{sorted(names - ours)[:3] or sorted(names)[:3]}; preprocess never overwrites "
                          "a file it did not create: choose a new or empty folder")


def check_compatible(out: Path, old: CacheManifest | None, settings: CacheSettings) -> None:
    """Refuse to update a cache built with another size, store range, format or input folder."""
    for key in ("size", "store_range", "version", "images"):
        if old is not None and getattr(old, key) != getattr(settings, key):
            raise IchdetError(f"{out} holds a cache built with {key}={getattr(old, key)!r}, not "
                              f"{getattr(settings, key)!r}; choose another --out or delete that folder")


def start_generation(out: Path, current: int) -> None:
    """Create the folder of generation ``current + 1``, or keep the one a killed run left (resume), and
    delete every other generation but ``current`` (left by a run killed after its commit)."""
    pixels = out / "pixels"
    pixels.mkdir(parents=True, exist_ok=True)
    new = generation_dir(out, current + 1)
    keep = {generation_dir(out, current).name, new.name}
    for entry in pixels.iterdir():
        if entry.name not in keep:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    new.mkdir(exist_ok=True)
    remove_stale_temps(new)  # left by a killed run (an interrupted one removes its own)


def commit(out: Path, index: pd.DataFrame, errors: pd.DataFrame, manifest: CacheManifest,
           previous: CacheManifest | None) -> None:
    """index.parquet (stamped with the generation), errors.csv, then cache.json, which makes the new
    generation current; then the old generation is deleted. Each file is atomic and fsynced."""
    index.attrs["generation"] = manifest.generation
    write_parquet_atomic(index, out / "index.parquet", index=False)
    with atomic_path(out / "errors.csv") as tmp:
        errors.to_csv(tmp, index=False)
    write_json_atomic(out / "cache.json", manifest.model_dump(mode="json"))
    if previous is not None:
        shutil.rmtree(generation_dir(out, previous.generation), ignore_errors=True)
