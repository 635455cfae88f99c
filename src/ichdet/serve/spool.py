"""The node's state on disk, the only state it has: a restart (after ``kill -9`` too) reads it back.

Layout of a spool folder::

    studies/<StudyInstanceUID>/received/<SOPInstanceUID>_<sha>.dcm   every acknowledged instance (fsync + rename)
    studies/<uid>/results/gen-0001/inputs.json                the instances that generation analysed
    studies/<uid>/results/gen-0001/out/...                    result.json, SR and SC files from the analysis
    studies/<uid>/results/gen-0001/sends.json                 the DICOM files to C-STORE (relative paths)
    studies/<uid>/results/gen-0001/sent/<n>                   one empty marker per file the destination took
    studies/<uid>/results/.work-gen-0002/                     an analysis in progress (removed on restart)
    studies/<uid>/failed-gen-0002.json                        an analysis that raised, with the reason
    quarantine/<sha>.dcm + <sha>.reason.txt                   instances never analysed, with why
    outbox/<uid>.gen-0001.json                                each generation's JSON result

A generation becomes visible only by renaming its finished work folder, so it exists completely or not
at all: a study is analysed again exactly when its received instances differ from the newest
generation's (or failed attempt's) inputs, which makes "analysed exactly once" a property of the files.
A received file's name carries the SHA-256 (16 hex digits) of the bytes received, so an instance sent
again with other content (same SOP Instance UID, other pixels) is a new name and the study is analysed
again; sent again unchanged, it changes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ichdet.errors import IchdetError
from ichdet.io import atomic_path, remove_stale_temps, write_json_atomic, write_text_atomic

__all__ = ["PendingSend", "Spool", "StudyState", "sop_of", "study_key", "valid_uid"]

#: A DICOM UID: dot-separated numbers, no leading zeros, at most 64 characters. Only these become paths.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_GEN = re.compile(r"^gen-(\d{4,})$")


def valid_uid(uid: str) -> bool:
    """True for a syntactically valid DICOM UID (the only strings the spool turns into file names)."""
    return len(uid) <= 64 and bool(_UID.match(uid))


def study_key(uid: str) -> str:
    """The name logs use for a study: 12 hex digits of the UID's SHA-256 (no UID, no PHI in logs)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class StudyState:
    """What the disk says about one study."""

    uid: str
    received: frozenset[str]        # SOP file names in received/
    last_arrival: float              # newest received file's mtime (epoch seconds); 0 when none
    generations: tuple[int, ...]     # committed result generations, ascending
    last_inputs: frozenset[str]      # the newest committed generation's inputs (empty when none)
    failed_inputs: frozenset[str]    # the newest failed attempt's inputs, if newer than the last success

    @property
    def next_generation(self) -> int:
        """The number the next analysis gets (failed attempts use numbers too)."""
        return max((*self.generations, self._failed_gen), default=0) + 1

    _failed_gen: int = 0

    def needs_analysis(self) -> bool:
        """Instances that no committed generation (nor the last failed attempt) has seen."""
        return bool(self.received) and self.received != self.last_inputs and self.received != self.failed_inputs

    def is_due(self, now: float, quiet_seconds: float) -> bool:
        """Needs analysis and nothing has arrived for ``quiet_seconds``."""
        return self.needs_analysis() and now - self.last_arrival >= quiet_seconds


@dataclass(frozen=True)
class PendingSend:
    """One result file still to C-STORE."""

    study_uid: str
    generation: int
    index: int
    path: Path
    marker: Path


class _Gate:
    """Many instance writers at once, or one cleaner alone (so a study is never removed under a new arrival)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._writers = 0
        self._cleaning = False

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._cleaning)
            self._writers += 1
        try:
            yield
        finally:
            with self._cond:
                self._writers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def cleaning(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._cleaning and self._writers == 0)
            self._cleaning = True
        try:
            yield
        finally:
            with self._cond:
                self._cleaning = False
                self._cond.notify_all()


class Spool:
    """Reads and writes the spool folder; every write is atomic; safe to share between the node's threads."""

    def __init__(self, root: Path, *, create: bool = True) -> None:
        """Open the spool at ``root``, creating its folders; with ``create=False`` an absent spool is refused
        (IchdetError "no spool at ROOT") and nothing is created (``serve --status``)."""
        self.root = Path(root)
        self._gate = _Gate()
        self._versions = threading.Lock()
        self.studies = self.root / "studies"
        self.quarantine_dir = self.root / "quarantine"
        self.outbox = self.root / "outbox"
        if not create:
            if not self.studies.is_dir():
                raise IchdetError(f"no spool at {self.root}: check --spool (or spool: in the serve config)")
            return
        for folder in (self.studies, self.quarantine_dir, self.outbox):
            folder.mkdir(parents=True, exist_ok=True)

    # -- receiving -------------------------------------------------------------------------------------
    def study_dir(self, study_uid: str) -> Path:
        """The folder of a study; refuses anything but a valid UID (it becomes a path)."""
        if not valid_uid(study_uid):
            raise IchdetError(f"Study Instance UID {study_uid!r} is not a valid DICOM UID")
        return self.studies / study_uid

    def store(self, study_uid: str, sop_uid: str, data: bytes) -> Path:
        """Write one instance's bytes, fsync them, rename them into ``received/`` and fsync the folder, so the
        instance survives a power cut once this returns (only then may the sender be told success).

        The file is named by the SOP Instance UID and the bytes' digest: the same bytes again change nothing;
        other bytes for the same SOP Instance UID replace the older version (a change of the study).
        """
        if not valid_uid(sop_uid):
            raise IchdetError(f"SOP Instance UID {sop_uid!r} is not a valid DICOM UID")
        received = self.study_dir(study_uid) / "received"
        final = received / f"{sop_uid}_{hashlib.sha256(data).hexdigest()[:16]}.dcm"
        with self._gate.writing():
            if not final.exists():
                with atomic_path(final) as tmp:
                    tmp.write_bytes(data)
                _fsync_dir(received)
            with self._versions:  # two versions arriving at once: exactly one stays
                if final.exists():
                    self._drop_other_versions(received, sop_uid, keep=final.name)
        return final

    def _drop_other_versions(self, received: Path, sop_uid: str, keep: str) -> None:
        old = [name for name in _names(received) if sop_of(name) == sop_uid and name != keep]
        for name in old:
            (received / name).unlink(missing_ok=True)
        if old:
            _fsync_dir(received)

    def quarantine(self, data: bytes, reason: str) -> Path:
        """Keep an instance that will never be analysed, with its reason next to it; return its path."""
        name = hashlib.sha256(data).hexdigest()[:24]
        path = self.quarantine_dir / f"{name}.dcm"
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        write_text_atomic(self.quarantine_dir / f"{name}.reason.txt", reason + "\n")
        return path

    # -- state -----------------------------------------------------------------------------------------
    def study_uids(self) -> list[str]:
        """Every study folder's UID (folders whose name is not a UID are ignored)."""
        return sorted(p.name for p in self.studies.iterdir() if p.is_dir() and valid_uid(p.name))

    def state(self, study_uid: str) -> StudyState:
        """Read one study's state from its folder."""
        folder = self.study_dir(study_uid)
        received: dict[str, float] = {}
        if (folder / "received").is_dir():
            with os.scandir(folder / "received") as entries:
                for entry in entries:
                    if _is_instance(entry.name):
                        with contextlib.suppress(FileNotFoundError):  # replaced by a new version meanwhile
                            received[entry.name] = entry.stat().st_mtime
        gens = sorted(self._generations(folder))
        last_inputs = frozenset(self._inputs(folder / "results" / _gen_name(gens[-1]))) if gens else frozenset()
        failed_gen, failed_inputs = 0, frozenset[str]()
        for path in folder.glob("failed-gen-*.json"):
            number = int(path.stem.split("-")[-1])
            if number > failed_gen and (not gens or number > gens[-1]):
                failed_gen = number
                failed_inputs = frozenset(json.loads(path.read_text())["inputs"])
        return StudyState(study_uid, frozenset(received), max(received.values(), default=0.0), tuple(gens),
                          last_inputs, failed_inputs, failed_gen)

    @staticmethod
    def _generations(folder: Path) -> Iterator[int]:
        results = folder / "results"
        if results.is_dir():
            for path in results.iterdir():
                match = _GEN.match(path.name)
                if match:
                    yield int(match[1])

    @staticmethod
    def _inputs(gen_dir: Path) -> list[str]:
        return list(json.loads((gen_dir / "inputs.json").read_text())["inputs"])

    def recover(self) -> int:
        """Remove what a killed node left half-done (analysis work folders, temp files, an instance's older
        version still next to its new one, study folders holding nothing); return how many."""
        removed = remove_stale_temps(self.quarantine_dir) + remove_stale_temps(self.outbox)
        for uid in self.study_uids():
            folder = self.studies / uid
            received = folder / "received"
            if received.is_dir():
                removed += remove_stale_temps(received) + self._drop_superseded(received)
            for work in (folder / "results").glob(".work-gen-*"):
                shutil.rmtree(work)
                removed += 1
            state = self.state(uid)
            if not state.received and not state.generations and not list(folder.glob("failed-gen-*.json")):
                shutil.rmtree(folder)  # e.g. the disk was full before its first instance was written
                removed += 1
        return removed

    @staticmethod
    def _drop_superseded(received: Path) -> int:
        """Keep the newest version of each instance (a kill between a new version's rename and the old one's
        removal leaves both); return how many were removed."""
        versions: dict[str, list[tuple[int, str]]] = {}
        for name in _names(received):
            versions.setdefault(sop_of(name), []).append(((received / name).stat().st_mtime_ns, name))
        removed = 0
        for found in versions.values():
            for _, name in sorted(found)[:-1]:
                (received / name).unlink()
                removed += 1
        return removed

    # -- analysis generations --------------------------------------------------------------------------
    def begin(self, study_uid: str, generation: int, inputs: frozenset[str]) -> Path:
        """A fresh work folder holding hard links to exactly ``inputs`` (so later arrivals wait their turn)."""
        folder = self.study_dir(study_uid)
        work = folder / "results" / f".work-{_gen_name(generation)}"
        shutil.rmtree(work, ignore_errors=True)
        (work / "input").mkdir(parents=True)
        for name in sorted(inputs):
            os.link(folder / "received" / name, work / "input" / name)
        return work

    def commit(self, study_uid: str, generation: int, work: Path, inputs: frozenset[str],
               json_path: Path, dicom_files: list[Path]) -> Path:
        """Make a finished analysis a generation (one rename) and put its JSON in the outbox."""
        out = work / "out"
        sends = [str(p.resolve().relative_to(out.resolve())) for p in dicom_files]
        write_json_atomic(work / "inputs.json", {"inputs": sorted(inputs)})
        write_json_atomic(work / "sends.json", {"files": sends, "json": str(json_path.resolve().relative_to(
            out.resolve()))})
        shutil.rmtree(work / "input")
        final = self.study_dir(study_uid) / "results" / _gen_name(generation)
        os.rename(work, final)
        self.publish(study_uid, generation)
        return final

    def fail(self, study_uid: str, generation: int, work: Path, inputs: frozenset[str], reason: str) -> None:
        """Record an analysis that raised; the study waits for new instances before it is tried again."""
        write_json_atomic(self.study_dir(study_uid) / f"failed-{_gen_name(generation)}.json",
                          {"inputs": sorted(inputs), "reason": reason})
        shutil.rmtree(work, ignore_errors=True)

    def publish(self, study_uid: str, generation: int) -> Path:
        """Copy a generation's JSON result into the outbox (idempotent; redone after a crash)."""
        gen_dir = self.study_dir(study_uid) / "results" / _gen_name(generation)
        target = self.outbox / f"{study_uid}.{_gen_name(generation)}.json"
        if not target.exists():
            source = gen_dir / "out" / json.loads((gen_dir / "sends.json").read_text())["json"]
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
        return target

    # -- sending ---------------------------------------------------------------------------------------
    def pending_sends(self, study_uid: str) -> list[PendingSend]:
        """The result files of every generation of a study that the destination has not acknowledged."""
        pending = []
        folder = self.study_dir(study_uid)
        for gen in sorted(self._generations(folder)):
            gen_dir = folder / "results" / _gen_name(gen)
            files = json.loads((gen_dir / "sends.json").read_text())["files"]
            for index, rel in enumerate(files):
                marker = gen_dir / "sent" / str(index)
                if not marker.exists():
                    pending.append(PendingSend(study_uid, gen, index, gen_dir / "out" / rel, marker))
        return pending

    def unacknowledged_notifications(self, study_uid: str) -> list[Path]:
        """The worklist notifications of a study's generations not acknowledged yet (:mod:`ichdet.serve.notify`)."""
        return [p for p in self.study_dir(study_uid).glob("results/gen-*/notify/*.pending")
                if not p.with_suffix(".acked").exists()]

    @staticmethod
    def mark_sent(send: PendingSend) -> None:
        """Record that the destination took ``send`` (an empty marker file)."""
        send.marker.parent.mkdir(exist_ok=True)
        send.marker.touch()

    # -- bounded disk use ------------------------------------------------------------------------------
    def clean(self, max_age_days: float, now: float | None = None) -> list[str]:
        """Delete studies analysed and fully sent whose last instance is older than the age, and old outbox files.

        Returns the removed studies' UIDs. A study still waiting for analysis, a send or the acknowledgement
        of a notification is never removed.
        """
        now = time.time() if now is None else now
        limit = now - max_age_days * 86400
        removed = []
        for uid in self.study_uids():
            with self._gate.cleaning():  # no instance lands in the study between the check and the removal
                state = self.state(uid)
                if (state.needs_analysis() or state.last_arrival > limit or self.pending_sends(uid)
                        or self.unacknowledged_notifications(uid)):
                    continue
                shutil.rmtree(self.studies / uid)
            removed.append(uid)
        for path in self.outbox.glob("*.json"):
            if path.stat().st_mtime < limit:
                path.unlink()
        return removed


def _gen_name(generation: int) -> str:
    return f"gen-{generation:04d}"


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it, an unlink) to disk: acknowledged means on disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_instance(name: str) -> bool:
    return name.endswith(".dcm") and not name.startswith(".")  # not a temporary file


def _names(received: Path) -> list[str]:
    with os.scandir(received) as entries:
        return [e.name for e in entries if _is_instance(e.name)]


def sop_of(name: str) -> str:
    """The SOP Instance UID of a received file's name (``<uid>_<digest>.dcm``, or ``<uid>.dcm`` before
    names carried the digest)."""
    return name.removesuffix(".dcm").split("_", 1)[0]

