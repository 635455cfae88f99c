"""Ensemble members as the predictor sees them: trained runs (2D or sequence), from run folders or a bundle.

A 2D member (kind ``"2d"``) is a run of CNNs, one per fold. A sequence member (kind ``"seq"``) is a
sequence run (:mod:`ichdet.train.seq`): its SeqConfig, one sequence model per fold, and its base runs, each a
2D :class:`Member` itself, in the order of the sequence model's feature layout. Fold ``k``'s CNNs of
every base run embed each image, fold ``k``'s sequence model reads each series
(:mod:`ichdet.infer.seq_predict`). A base run is one object however many members use it: a 2D member of the
ensemble that is also a base, or a base shared by two sequence members, is loaded and stored once.

Members are named by their run folder's name; two different runs of one name are refused, so a name
always means one set of weights (in the ensemble, in the result's manifest and inside a bundle).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from ichdet import __version__
from ichdet.cache.provenance import read_run_record, training_summary
from ichdet.errors import CheckpointError, IchdetError
from ichdet.evaluate.calibration import apply_temperature
from ichdet.evaluate.ensembling import shares
from ichdet.infer.manifest import MAX_WEIGHT
from ichdet.models.backbones import build_model
from ichdet.models.config import Config, SeqConfig, load_seq_config
from ichdet.models.rundir import SEQ_FILE, check_2d_run, fold_weights, is_seq_run, run_config
from ichdet.names import LABELS

__all__ = ["DEFAULT_THRESHOLD", "Ensemble", "Member", "distinct_bases", "member_manifest", "run_names",
           "runs_ensemble", "sha256_bytes", "sha256_file"]

#: The decision threshold of a label without an operating point (runs, or no positive case in the OOF).
DEFAULT_THRESHOLD = 0.5
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: The largest uncompressed size of one bundle file, by kind, checked against the zip directory before a
#: byte is read (zipfile itself never inflates past the size the directory declares): a network's
#: weights or graph (seresnext50's are 100 MB; none of the configs approaches 1 GiB), a config or layout.
MAX_WEIGHTS_BYTES = 1 << 30
MAX_SMALL_BYTES = 1 << 20
#: ... and the manifest (one of a hundred members with their provenance records is ~100 kB).
MAX_MANIFEST_BYTES = 16 << 20
#: Bytes read (and hashed) at a time: reading a file of a bundle never holds more than this beyond the
#: file's own declared size, and checking a file without loading it holds only this.
READ_BLOCK = 1 << 20


def entry_cap(entry: str) -> int:
    """The size cap of bundle file ``entry``: :data:`MAX_WEIGHTS_BYTES` for weights and graphs,
    :data:`MAX_MANIFEST_BYTES` for the manifest, else :data:`MAX_SMALL_BYTES` (configs, sequence layouts)."""
    if entry == "manifest.json":
        return MAX_MANIFEST_BYTES
    return MAX_WEIGHTS_BYTES if entry.endswith((".safetensors", ".onnx")) else MAX_SMALL_BYTES


def check_entry_size(info: zipfile.ZipInfo, bundle: Path, declared: int | None = None) -> None:
    """Refuse, before reading it, a bundle file larger than its cap or than the manifest declares."""
    cap = entry_cap(info.filename)
    if info.file_size > cap:
        raise CheckpointError(f"{bundle}: member {info.filename} declares {info.file_size} bytes uncompressed, over "
                              f"the {cap} a bundle file may hold; refusing it unread (not a bundle ichdet wrote)")
    if declared is not None and info.file_size != declared:
        raise CheckpointError(f"{bundle}: member {info.filename} holds {info.file_size} bytes uncompressed, the "
                              f"manifest says {declared}; refusing a modified bundle")


def verified(zf: zipfile.ZipFile, entry: str, expected: str, bundle: Path, declared: int | None = None,
             keep: bool = True) -> bytes:
    """The bytes of bundle ``entry`` (``b""`` with ``keep=False``: only checked); CheckpointError naming it
    when missing, over its size cap or its ``declared`` size, or when its sha256 differs from ``expected``.

    The size is checked before reading and the file is hashed while streamed in :data:`READ_BLOCK`
    pieces, so a deflated "zip bomb" is refused unread and memory stays within the declared size.
    """
    try:
        info = zf.getinfo(entry)
    except KeyError:
        raise CheckpointError(f"{bundle}: member {entry} is listed in the manifest but missing; "
                              "the bundle is incomplete, write it again with `ichdet bundle`") from None
    check_entry_size(info, bundle, declared)
    digest, kept = hashlib.sha256(), io.BytesIO() if keep else None
    try:
        with zf.open(info) as f:
            for block in iter(lambda: f.read(READ_BLOCK), b""):
                digest.update(block)
                if kept is not None:
                    kept.write(block)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
        raise CheckpointError(f"{bundle}: member {entry} cannot be read ({err})") from None
    if digest.hexdigest() != expected:
        raise CheckpointError(f"{bundle}: member {entry} was modified (its sha256 differs from the "
                              "manifest); refusing to load it. Use an untampered copy of the bundle")
    return b"" if kept is None else kept.getvalue()


# --------------------------------------------------------------------------------------------- members


@dataclass(frozen=True)
class Member:
    """One trained run of an ensemble (or a sequence member's base run): config, folds, weight.

    ``config`` is a :class:`Config` for kind ``"2d"`` and a :class:`SeqConfig` for kind ``"seq"`` (use
    :attr:`run_config` / :attr:`seq_config` for the typed one). ``bases`` are a sequence member's base
    runs in feature-layout order (empty for a 2D member). ``source`` is where the weights live: a run
    folder, or a bundle file (whose files are checked against ``sha256`` again at every load, so a file
    changed after :func:`ichdet.infer.bundle.load_ensemble` is refused too).
    """

    name: str
    weight: float
    kind: str
    config: Config | SeqConfig
    folds: tuple[int, ...]
    source: Path = field(repr=False)
    sha256: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    bases: tuple[Member, ...] = field(default=(), repr=False)
    sizes: Mapping[str, int] = field(default_factory=dict, repr=False, compare=False)
    training: Mapping[str, Any] | str = field(default="unknown", repr=False, compare=False)

    @property
    def run_config(self) -> Config:
        """The 2D run's config; TypeError for a sequence member (its CNNs are its bases')."""
        if not isinstance(self.config, Config):
            raise TypeError(f"member {self.name} is a sequence member: its images go through its base runs "
                            f"{[b.name for b in self.bases]}")
        return self.config

    @property
    def seq_config(self) -> SeqConfig:
        """The sequence run's config; TypeError for a 2D member."""
        if not isinstance(self.config, SeqConfig):
            raise TypeError(f"member {self.name} is a 2D member, not a sequence member")
        return self.config

    def image_members(self) -> tuple[Member, ...]:
        """The 2D members whose CNNs see this member's pixels: itself, or a sequence member's bases."""
        return self.bases if self.kind == "seq" else (self,)

    def weight_bytes(self, fold: int) -> bytes:
        """The safetensors bytes of one fold, verified against the manifest when from a bundle."""
        if self.source.is_dir():
            return (self.source / f"fold{fold}" / "best.safetensors").read_bytes()
        entry = f"members/{self.name}/fold{fold}.safetensors"
        with zipfile.ZipFile(self.source) as zf:
            return verified(zf, entry, self.sha256[entry], self.source, self.sizes.get(entry))

    def load_fold(self, fold: int, device: torch.device) -> nn.Module:
        """A 2D member's network of one fold, weights loaded, on ``device``, in eval mode."""
        cfg = self.run_config
        model = build_model(cfg.model, cfg.data.in_chans)
        load_state(model, self.weight_bytes(fold), f"{self.source} member {self.name} fold {fold}")
        model = model.to(device).eval()
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    @property
    def onnx(self) -> bool:
        """Whether this member's networks run as ONNX graphs (a bundle written with ``--runtime onnx``)."""
        return bool(self.folds) and all(f"members/{self.name}/fold{k}.onnx" in self.sha256 for k in self.folds)

    def onnx_bytes(self, fold: int) -> bytes:
        """The ONNX graph of one fold, verified against the manifest (ONNX bundles only)."""
        entry = f"members/{self.name}/fold{fold}.onnx"
        with zipfile.ZipFile(self.source) as zf:
            return verified(zf, entry, self.sha256[entry], self.source)

    def load_net(self, fold: int, device: torch.device) -> nn.Module:
        """What embeds images for one fold: the ONNX graph's session where the bundle has one (see
        :mod:`ichdet.infer.onnx_runtime`), else the torch network (:meth:`load_fold`)."""
        if not self.onnx:
            return self.load_fold(fold, device)
        from ichdet.infer.onnx_runtime import OnnxEmbedder  # onnxruntime only where an ONNX bundle runs

        return OnnxEmbedder(self.onnx_bytes(fold), f"{self.source} member {self.name} fold {fold}", device)

    def load_models(self, device: torch.device) -> list[nn.Module]:
        """A 2D member's networks, one per fold (see :meth:`load_fold`)."""
        return [self.load_fold(fold, device) for fold in self.folds]


def load_state(model: nn.Module, data: bytes, what: str) -> None:
    """Load safetensors bytes into ``model``; CheckpointError naming ``what`` if unreadable or unfit."""
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError) as err:
        raise CheckpointError(f"{what}: not a readable safetensors file ({err})") from None
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:
        raise CheckpointError(f"{what}: weights do not fit the configured architecture: "
                              f"{str(err).splitlines()[0]}") from None


def distinct_bases(members: Sequence[Member]) -> list[Member]:
    """The base runs of the sequence members that are not members themselves, each once, by name."""
    names = {m.name for m in members}
    out: dict[str, Member] = {}
    for m in members:
        for base in m.bases:
            if base.name not in names:
                out.setdefault(base.name, base)
    return list(out.values())


def member_manifest(m: Member, files: Mapping[str, str] | None = None,
                    sizes: Mapping[str, int] | None = None) -> dict[str, Any]:
    """A member's manifest entry: name, kind, weight, folds, what it is, a sha256 per file, the files'
    sizes (``bytes``, where known) and what the run was trained on (``training``, or "unknown").

    2D: ``backbone`` and ``image_size``; sequence: ``sequence_model`` and ``bases`` (member names).
    """
    entry: dict[str, Any] = {"name": m.name, "kind": m.kind, "weight": m.weight, "folds": list(m.folds)}
    if m.kind == "seq":
        entry.update(sequence_model=m.seq_config.model.arch, bases=[b.name for b in m.bases])
    else:
        entry.update(backbone=m.run_config.model.backbone, image_size=m.run_config.data.image_size)
    entry["sha256"] = dict(files if files is not None else m.sha256)
    known = sizes if sizes is not None else m.sizes
    if known:
        entry["bytes"] = dict(known)
    entry["training"] = m.training if isinstance(m.training, str) else dict(m.training)
    return entry


@dataclass(frozen=True)
class Ensemble:
    """Members, the per-label decision thresholds (operating points) and the manifest that identifies them.

    ``manifest`` holds ``bundle_sha256`` (None for run folders), ``ichdet_version`` (of the bundle's
    writer, or this one for runs), ``members`` (see :func:`member_manifest`), ``bases`` (the sequence
    members' base runs that are not members, same entries) and ``operating_points`` (per label, or None
    where none were computed).
    """

    members: tuple[Member, ...]
    thresholds: dict[str, float]
    manifest: dict[str, Any]
    #: Per-label temperatures fitted by ``ichdet calibrate --temperature`` (None: none, all 1).
    temperature: dict[str, float] | None = None

    @property
    def weights(self) -> np.ndarray:
        """The members' weights, normalised to sum to 1 (see :func:`normalised`)."""
        return normalised([m.weight for m in self.members])

    def combine(self, member_probs: Sequence[np.ndarray]) -> np.ndarray:
        """The ensemble's (N, 6) probabilities from each member's fold-mean (N, 6) probabilities.

        With per-label temperatures (a site-calibrated bundle), each label's weighted mean is scaled by
        its temperature (:func:`ichdet.evaluate.calibration.apply_temperature`) after the mean.
        """
        stacked = np.stack([np.asarray(p, dtype=np.float64) for p in member_probs])
        mean = np.clip(np.tensordot(self.weights, stacked, axes=1), 0.0, 1.0)
        if self.temperature is None:
            return mean
        return apply_temperature(mean, np.array([self.temperature[label] for label in LABELS]))


def normalised(weights: Sequence[float]) -> np.ndarray:
    """``weights`` (finite, >= 0, not all 0) divided by their sum, computed without overflow by the rule
    ``ichdet ensemble`` uses (:func:`ichdet.evaluate.ensembling.shares`)."""
    share = shares({str(i): float(w) for i, w in enumerate(weights)})
    return np.array([share[str(i)] for i in range(len(weights))], dtype=np.float64)


# --------------------------------------------------------------------------------------------- run folders


def _run_files(run: Path, names: Sequence[str], folds: Sequence[tuple[int, Path]]) -> dict[str, str]:
    files = {name: sha256_file(run / name) for name in names}
    files.update({f"fold{k}/best.safetensors": sha256_file(p) for k, p in folds})
    return files


def _two_d_member(run: Path, weight: float) -> Member:
    folds = fold_weights(run)
    return Member(run.name, weight, "2d", run_config(run), tuple(k for k, _ in folds), run,
                  _run_files(run, ["config.yaml"], folds), training=read_run_record(run))


def _seq_member(run: Path, weight: float, known: dict[Path, Member]) -> Member:
    bases = []
    for base in json.loads((run / SEQ_FILE).read_text())["bases"]:
        path = check_2d_run(base, f"a base run of {run}")
        bases.append(known.get(path) or run_member(path, 0.0, known))
    folds = fold_weights(run)
    missing = {b.name: sorted(set(k for k, _ in folds) - set(b.folds)) for b in bases}
    missing = {name: ks for name, ks in missing.items() if ks}
    if missing:
        raise CheckpointError(f"{run}: its base runs lack the folds its sequence model needs: {missing}; "
                              "fold k's sequence model reads fold k's CNNs")
    return Member(run.name, weight, "seq", load_seq_config(run / "config.yaml"), tuple(k for k, _ in folds), run,
                  _run_files(run, ["config.yaml", SEQ_FILE], folds), tuple(bases), training=read_run_record(run))


def run_member(run: str | Path, weight: float, known: dict[Path, Member] | None = None) -> Member:
    """The member of one run folder (2D, or sequence with its base runs); ``known`` (resolved path ->
    member) lets runs met earlier be reused as bases, and collects every run loaded."""
    path = Path(run).resolve()
    known = {} if known is None else known
    if not (path / "config.yaml").is_file():
        raise CheckpointError(f"{run}: no config.yaml; pass a run folder written by `ichdet train` or "
                              "`ichdet seq train`")
    if not NAME.match(path.name):
        raise IchdetError(f"run folder name {path.name!r} is not a safe member name: "
                          "use letters, digits, '.', '_', '-'")
    member = _seq_member(path, weight, known) if is_seq_run(path) else _two_d_member(path, weight)
    known[path] = member
    return member


def resolve_weights(names: Sequence[str], weights: Mapping[str, float] | None) -> dict[str, float]:
    """Member name -> weight (default 1 each); IchdetError when the names differ or a weight is not > 0."""
    if weights is None:
        return dict.fromkeys(names, 1.0)
    if set(weights) != set(names):
        raise IchdetError(f"--weight names {sorted(weights)}, but the members are {sorted(names)}; "
                          "give one weight per member (or none for equal weights)")
    bad = {k: v for k, v in weights.items() if not (math.isfinite(v) and 0 < v <= MAX_WEIGHT)}
    if bad:
        raise IchdetError(f"ensemble weights must be finite, > 0 and <= {MAX_WEIGHT:g} (they are relative), got {bad}")
    return {n: float(weights[n]) for n in names}


def run_names(runs: Sequence[str | Path]) -> list[str]:
    """The member name of each run folder (its folder name); IchdetError if two runs share one."""
    names = [Path(r).resolve().name for r in runs]
    if len(set(names)) != len(names):
        raise IchdetError(f"runs must have distinct folder names to be told apart: {names}")
    return names


def _check_one_run_per_name(known: Mapping[Path, Member]) -> None:
    by_name: dict[str, list[str]] = {}
    for path in known:
        by_name.setdefault(path.name, []).append(str(path))
    clash = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    if clash:
        raise IchdetError(f"different runs share a folder name, so a member name would mean two sets of weights: "
                          f"{clash}; rename one of the folders (a base run keeps its name inside a bundle)")


def runs_ensemble(runs: Sequence[Path], weights: Mapping[str, float] | None) -> Ensemble:
    """The ensemble of run folders (2D or sequence), equal weights unless given; default thresholds."""
    names = run_names(runs)
    w = resolve_weights(names, weights)
    known: dict[Path, Member] = {}
    members = []
    for run, name in zip(runs, names, strict=True):
        # a run already loaded as another member's base is reused, with its own weight as a member
        found = known.get(Path(run).resolve())
        member = run_member(run, w[name], known) if found is None else _reweighted(found, w[name])
        known[Path(run).resolve()] = member
        members.append(member)
    _check_one_run_per_name(known)
    members = [_with_bases(m, known) for m in members]
    bases = distinct_bases(members)
    manifest = {"bundle_sha256": None, "ichdet_version": __version__, "runs": [str(m.source) for m in members],
                "members": [member_manifest(m) for m in members],
                "bases": [member_manifest(b) for b in bases], "operating_points": None,
                "thresholds_source": f"default {DEFAULT_THRESHOLD} (run folders carry no operating points)",
                "runtime": "torch", "calibration": None,
                "training": training_summary([m.training for m in (*members, *bases)])}
    return Ensemble(tuple(members), dict.fromkeys(LABELS, DEFAULT_THRESHOLD), manifest)


def _reweighted(m: Member, weight: float) -> Member:
    return replace(m, weight=weight)


def _with_bases(m: Member, known: Mapping[Path, Member]) -> Member:
    """``m`` with each base the one object of that run (a base given as a member too is that member)."""
    if not m.bases:
        return m
    return replace(m, bases=tuple(known[b.source] for b in m.bases))
