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
import json
import math
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from ichdet import __version__
from ichdet.errors import CheckpointError, IchdetError
from ichdet.evaluate.calibration import apply_temperature
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


def verified(zf: zipfile.ZipFile, entry: str, expected: str, bundle: Path) -> bytes:
    """The bytes of bundle ``entry``; CheckpointError naming it when missing or when its sha256 differs."""
    try:
        data = zf.read(entry)
    except KeyError:
        raise CheckpointError(f"{bundle}: member {entry} is listed in the manifest but missing; "
                              "the bundle is incomplete, write it again with `ichdet bundle`") from None
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{bundle}: member {entry} cannot be read ({err})") from None
    if sha256_bytes(data) != expected:
        raise CheckpointError(f"{bundle}: member {entry} was modified (its sha256 differs from the "
                              "manifest); refusing to load it. Use an untampered copy of the bundle")
    return data


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
            return verified(zf, entry, self.sha256[entry], self.source)

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


def member_manifest(m: Member, files: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A member's manifest entry: name, kind, weight, folds, what it is, and a sha256 per file.

    2D: ``backbone`` and ``image_size``; sequence: ``sequence_model`` and ``bases`` (member names).
    """
    entry: dict[str, Any] = {"name": m.name, "kind": m.kind, "weight": m.weight, "folds": list(m.folds)}
    if m.kind == "seq":
        entry.update(sequence_model=m.seq_config.model.arch, bases=[b.name for b in m.bases])
    else:
        entry.update(backbone=m.run_config.model.backbone, image_size=m.run_config.data.image_size)
    entry["sha256"] = dict(files if files is not None else m.sha256)
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
        """The members' weights, normalised to sum to 1."""
        w = np.array([m.weight for m in self.members], dtype=np.float64)
        return w / w.sum()

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


# --------------------------------------------------------------------------------------------- run folders


def _run_files(run: Path, names: Sequence[str], folds: Sequence[tuple[int, Path]]) -> dict[str, str]:
    files = {name: sha256_file(run / name) for name in names}
    files.update({f"fold{k}/best.safetensors": sha256_file(p) for k, p in folds})
    return files


def _two_d_member(run: Path, weight: float) -> Member:
    folds = fold_weights(run)
    return Member(run.name, weight, "2d", run_config(run), tuple(k for k, _ in folds), run,
                  _run_files(run, ["config.yaml"], folds))


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
                  _run_files(run, ["config.yaml", SEQ_FILE], folds), tuple(bases))


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
    bad = {k: v for k, v in weights.items() if not (math.isfinite(v) and v > 0)}
    if bad:
        raise IchdetError(f"ensemble weights must be finite and > 0, got {bad}")
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
    manifest = {"bundle_sha256": None, "ichdet_version": __version__, "runs": [str(m.source) for m in members],
                "members": [member_manifest(m) for m in members],
                "bases": [member_manifest(b) for b in distinct_bases(members)], "operating_points": None,
                "thresholds_source": f"default {DEFAULT_THRESHOLD} (run folders carry no operating points)",
                "runtime": "torch"}
    return Ensemble(tuple(members), dict.fromkeys(LABELS, DEFAULT_THRESHOLD), manifest)


def _reweighted(m: Member, weight: float) -> Member:
    return Member(m.name, weight, m.kind, m.config, m.folds, m.source, m.sha256, m.bases)


def _with_bases(m: Member, known: Mapping[Path, Member]) -> Member:
    """``m`` with each base the one object of that run (a base given as a member too is that member)."""
    if not m.bases:
        return m
    return Member(m.name, m.weight, m.kind, m.config, m.folds, m.source, m.sha256,
                  tuple(known[b.source] for b in m.bases))
