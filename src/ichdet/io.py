"""Atomic file writes: write to a temporary name in the target's directory, then rename.

``os.replace`` within one directory is atomic on POSIX and Windows, so a reader (or a rerun after a
crash) sees either the old file or the complete new one, never half of it. Every artifact ichdet writes
goes through :func:`atomic_path`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import resource
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ichdet.errors import IchdetError, LockError, RunFailed

__all__ = ["atomic_path", "folder_lock", "full_disk_reason", "is_temp_name", "naming_full_disk", "remove_stale_temps",
           "write_json_atomic", "write_parquet_atomic", "write_text_atomic"]


#: The names :func:`_temp_sibling` makes: ``.<name>.<12 hex digits>.tmp<suffix>``.
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp(\.[^.]*)?$")


def _temp_sibling(path: Path) -> Path:
    """A fresh hidden name next to ``path`` that keeps its suffix (writers that pick a format by suffix)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp{path.suffix}")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temporary name of :func:`atomic_path` (a writer's, or one a killed writer left)."""
    return _TEMP_NAME.match(name) is not None


def remove_stale_temps(folder: str | os.PathLike[str]) -> int:
    """Delete the temporary files a killed :func:`atomic_path` writer left in ``folder``; return how many.

    An interrupted (not killed) writer removes its own. Call it only where no other process is writing.
    """
    removed = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if _TEMP_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
    return removed


def _fsync_file(path: Path) -> None:
    """Flush ``path`` to disk so that the rename cannot land before the data does after a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: The errors of a file system without room, as ichdet words them, and what frees room.
_FULL: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on device", "free space on that file system"),
    errno.EFBIG: ("file too large", "raise the file size limit (ulimit -f) or write elsewhere"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota"),
}
#: Under this much free space a failed write is taken for a full disk (writers that do not say why).
_NEARLY_FULL = 1 << 20


def full_disk_reason(err: BaseException, path: str | os.PathLike[str]) -> tuple[str, str] | None:
    """(reason, fix) if writing ``path`` failed with ``err`` because the file system had no room, else None.

    Python's writes say so with an errno; native writers (pyarrow, safetensors, torch) put it in their
    message, or, like torch's zip writer ("file write failed"), say nothing: then the file system is
    asked (``path`` at the file size limit, or under 1 MiB free where it lies).
    """
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    for e in chain:
        if isinstance(e, OSError) and e.errno in _FULL:
            return _FULL[e.errno]
    text = " ".join(str(e) for e in chain).lower()
    for code, found in _FULL.items():
        if os.strerror(code).lower() in text or f"os error {code})" in text or f"errno {code}]" in text:
            return found
    target = Path(path)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    try:
        if limit != resource.RLIM_INFINITY and target.is_file() and target.stat().st_size >= limit:
            return _FULL[errno.EFBIG]
        if shutil.disk_usage(target.parent).free < _NEARLY_FULL:
            return _FULL[errno.ENOSPC]
    except OSError:
        pass
    return None


def _full_disk_error(err: BaseException, path: Path, final: Path | None = None) -> RunFailed | None:
    if isinstance(err, IchdetError):  # already says what went wrong (a nested write names its own file)
        return None
    found = full_disk_reason(err, path)
    if found is None:
        return None
    reason, fix = found
    return RunFailed(f"could not write {final or path}: {reason}; {fix} and run the command again "
                     "(files written before are as they were)")


@contextlib.contextmanager
def naming_full_disk(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a write failure for lack of room (:func:`full_disk_reason`) in the block into a
    :class:`~ichdet.errors.RunFailed` naming ``path``, the reason and the fix; other errors pass."""
    try:
        yield
    except Exception as err:
        failure = _full_disk_error(err, Path(path))
        if failure is None:
            raise
        raise failure from err


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` when the block succeeds.

    The body writes a *file* at the yielded path (any writer that takes a path: ``df.to_parquet``,
    ``open(..., "w")``, ``np.save``). On success the file is flushed (``fsync``) and moved onto ``path``
    with ``os.replace``, replacing any old file. If the body raises, the temporary file is removed and
    ``path`` is left untouched. The parent directory is created if missing. The temporary name is hidden
    (leading dot), unique, and keeps ``path``'s suffix.

    Example::

        with atomic_path(run_dir / "oof.parquet") as tmp:
            df.to_parquet(tmp)

    Raises:
        FileNotFoundError: the body finished without creating the file at the yielded path.
        RunFailed: the file system had no room for it (:func:`full_disk_reason`), naming ``path``.
    """
    final = Path(path)
    with naming_full_disk(final):
        final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"atomic write of {final}: the block did not write a file at {tmp}")
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, final)
    except Exception as err:
        failure = _full_disk_error(err, tmp, final)  # asked before the partial file goes
        tmp.unlink(missing_ok=True)
        if failure is None:
            raise
        raise failure from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; return ``path`` as a :class:`Path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def write_parquet_atomic(df: pd.DataFrame, path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Write ``df`` to Parquet at ``path`` atomically (``kwargs`` go to ``DataFrame.to_parquet``)."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, **kwargs)
    return Path(path)


def _json_default(obj: object) -> Any:
    """Make numpy scalars and arrays and paths JSON-serialisable; refuse anything else by name."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (UTF-8, trailing newline) to ``path`` atomically.

    numpy scalars/arrays and paths are converted; NaN and infinity are written as ``NaN``/``Infinity``
    as Python's :mod:`json` does (readable by :func:`json.loads` and pandas).
    """
    text = json.dumps(obj, indent=indent, default=_json_default, ensure_ascii=False) + "\n"
    return write_text_atomic(path, text)


#: The lock file :func:`folder_lock` holds in an output folder.
LOCK_NAME = ".ichdet.lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], command: str = "ichdet") -> Iterator[Path]:
    """Hold ``folder``'s writer lock for the block: one ichdet writer per output folder at a time.

    The lock is an exclusive ``flock`` on ``folder/.ichdet.lock``, which holds the holder's pid and
    command for the error message. The kernel releases it when its holder exits, however it exits, so
    a lock left by a killed process is stale and taken over at once. The folder is created if missing.

    Raises:
        LockError: another live process holds the lock (its pid and command are named).
    """
    path = Path(folder) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise LockError(f"{folder} is being written by {holder}; wait for it to finish or choose "
                            "another output folder") from None
        with naming_full_disk(path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} ({command})\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock
