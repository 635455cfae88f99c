"""Model bundles (``model.ichdet``): trained runs packed into one file, verified and loaded without pickle.

A bundle is a zip archive (stored, not compressed: weights do not compress) holding::

    manifest.json                         format, ichdet version, members, thresholds, sha256 per file
    members/<name>/config.yaml            the run's resolved config (safe YAML)
    members/<name>/fold<k>.safetensors    one fold's weights

Loading reads ``manifest.json`` (JSON), checks every member name (no absolute paths, no ``..``, only
the layout above), refuses any file whose sha256 differs from the manifest, naming it, and loads
weights with safetensors only: nothing is ever unpickled. The same :class:`Ensemble` comes from run
folders (``--run``), so ``predict``, ``predict-study`` and ``report`` treat both alike.

Ensemble rule (the seed's, as :func:`ichdet.ensemble.ensemble`): mean over a member's folds, then the
weighted mean over members.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from ichdet import __version__
from ichdet.config import Config, build_config, config_to_yaml
from ichdet.errors import CheckpointError, IchdetError
from ichdet.io import atomic_path
from ichdet.labels import LABELS, read_labels
from ichdet.models import build_model

__all__ = ["BUNDLE_FORMAT", "DEFAULT_THRESHOLD", "Ensemble", "Member", "load_ensemble", "write_bundle"]

BUNDLE_FORMAT = "ichdet-bundle"
BUNDLE_VERSION = 1
#: The decision threshold of a label without an operating point (runs, or no positive case in the OOF).
DEFAULT_THRESHOLD = 0.5
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_MEMBER_FILE = re.compile(r"^members/([A-Za-z0-9][A-Za-z0-9._-]{0,99})/(config\.yaml|fold(\d{1,3})\.safetensors)$")


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


# --------------------------------------------------------------------------------------------- members


@dataclass(frozen=True)
class Member:
    """One trained run of an ensemble: its config, folds and weight; loads its fold networks on demand.

    ``source`` is where the weights live: a run folder, or a bundle file (whose member files are checked
    against ``sha256`` again at every load, so a file changed after :func:`load_ensemble` is refused too).
    """

    name: str
    weight: float
    kind: str
    config: Config
    folds: tuple[int, ...]
    source: Path = field(repr=False)
    sha256: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def weight_bytes(self, fold: int) -> bytes:
        """The safetensors bytes of one fold, verified against the manifest when from a bundle."""
        if self.source.is_dir():
            return (self.source / f"fold{fold}" / "best.safetensors").read_bytes()
        entry = f"members/{self.name}/fold{fold}.safetensors"
        with zipfile.ZipFile(self.source) as zf:
            return _verified(zf, entry, self.sha256[entry], self.source)

    def load_models(self, device: torch.device) -> list[nn.Module]:
        """One network per fold, weights loaded, on ``device``, in eval mode (channels-last if configured)."""
        models = []
        for fold in self.folds:
            model = build_model(self.config.model, self.config.data.in_chans)
            _load_state(model, self.weight_bytes(fold), f"{self.source} member {self.name} fold {fold}")
            model = model.to(device).eval()
            if self.config.train.channels_last:
                model = model.to(memory_format=torch.channels_last)
            models.append(model)
        return models


def _load_state(model: nn.Module, data: bytes, what: str) -> None:
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


@dataclass(frozen=True)
class Ensemble:
    """Members, the per-label decision thresholds (operating points) and the manifest that identifies them.

    ``manifest`` holds ``bundle_sha256`` (None for run folders), ``ichdet_version`` (of the bundle's
    writer, or this one for runs), ``members`` (name, kind, weight, folds, backbone, image size and a
    sha256 per file) and ``operating_points`` (per label, or None where none were computed).
    """

    members: tuple[Member, ...]
    thresholds: dict[str, float]
    manifest: dict[str, Any]

    @property
    def weights(self) -> np.ndarray:
        """The members' weights, normalised to sum to 1."""
        w = np.array([m.weight for m in self.members], dtype=np.float64)
        return w / w.sum()

    def combine(self, member_probs: Sequence[np.ndarray]) -> np.ndarray:
        """The ensemble's (N, 6) probabilities from each member's fold-mean (N, 6) probabilities."""
        stacked = np.stack([np.asarray(p, dtype=np.float64) for p in member_probs])
        return np.clip(np.tensordot(self.weights, stacked, axes=1), 0.0, 1.0)


# --------------------------------------------------------------------------------------------- runs


def _run_member(run: Path, weight: float) -> Member:
    from ichdet.predict import fold_weights, run_config

    if not (run / "config.yaml").is_file():
        raise CheckpointError(f"{run}: no config.yaml; pass a run folder written by `ichdet train`")
    name = run.resolve().name
    if not _NAME.match(name):
        raise IchdetError(f"run folder name {name!r} is not a safe member name: use letters, digits, '.', '_', '-'")
    folds = fold_weights(run)
    files = {"config.yaml": sha256_file(run / "config.yaml")}
    files.update({f"fold{k}/best.safetensors": sha256_file(p) for k, p in folds})
    return Member(name, weight, "2d", run_config(run), tuple(k for k, _ in folds), run.resolve(), files)


def _resolve_weights(names: Sequence[str], weights: Mapping[str, float] | None) -> dict[str, float]:
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


def _runs_ensemble(runs: Sequence[Path], weights: Mapping[str, float] | None) -> Ensemble:
    names = run_names(runs)
    w = _resolve_weights(names, weights)
    members = tuple(_run_member(Path(r), w[n]) for r, n in zip(runs, names, strict=True))
    manifest = {"bundle_sha256": None, "ichdet_version": __version__, "runs": [str(m.source) for m in members],
                "members": [_member_manifest(m) for m in members], "operating_points": None,
                "thresholds_source": f"default {DEFAULT_THRESHOLD} (run folders carry no operating points)"}
    return Ensemble(members, dict.fromkeys(LABELS, DEFAULT_THRESHOLD), manifest)


def _member_manifest(m: Member, files: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {"name": m.name, "kind": m.kind, "weight": m.weight, "folds": list(m.folds),
            "backbone": m.config.model.backbone, "image_size": m.config.data.image_size,
            "sha256": dict(files if files is not None else m.sha256)}


# --------------------------------------------------------------------------------------------- operating points


def ensemble_oof(members: Sequence[Member]) -> pd.DataFrame:
    """The members' out-of-fold predictions (``RUN/oof.parquet``) ensembled: image_id x LABELS."""
    from ichdet.ensemble import ensemble

    parts = []
    for m in members:
        path = m.source / "oof.parquet"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; train the run with --fold all to write its out-of-fold "
                                  "predictions, or bundle without --labels")
        # out-of-fold: each image was predicted once, by the fold that held it out, so a run's OOF table
        # is one "fold" covering every image (ensemble() wants every fold of a model on the same images)
        parts.append(pd.read_parquet(path).assign(model=m.name, fold=0))
    return ensemble(pd.concat(parts, ignore_index=True), {m.name: m.weight for m in members})


def oof_operating_points(members: Sequence[Member], labels_csv: Path, sensitivity: float) -> pd.DataFrame:
    """Per label, the threshold reaching ``sensitivity`` on the ensembled out-of-fold predictions."""
    from ichdet.metrics import operating_points

    oof = ensemble_oof(members)
    truth = read_labels(labels_csv)
    common = oof.index.intersection(truth.index)
    if len(common) == 0:
        raise IchdetError(f"{labels_csv} labels none of the runs' out-of-fold images; pass the label CSV "
                          "of the cache the runs were trained on")
    return operating_points(truth.loc[common, list(LABELS)].to_numpy(np.float64),
                            oof.loc[common, list(LABELS)].to_numpy(np.float64), sensitivity)


def _thresholds(points: pd.DataFrame | None) -> dict[str, float]:
    if points is None:
        return dict.fromkeys(LABELS, DEFAULT_THRESHOLD)
    return {str(label): float(t) if math.isfinite(t) else DEFAULT_THRESHOLD
            for label, t in points["threshold"].items()}


def _points_json(points: pd.DataFrame) -> dict[str, dict[str, float | int | None]]:
    """The operating-point table as JSON (NaN, where a label had no positive case, as null)."""
    out: dict[str, dict[str, float | int | None]] = {}
    for label, row in points.iterrows():
        out[str(label)] = {str(k): (None if isinstance(v, float) and not math.isfinite(v) else
                                    int(v) if str(k).startswith("n_") else float(v)) for k, v in row.items()}
    return out


# --------------------------------------------------------------------------------------------- writing


def write_bundle(runs: Sequence[Path], out: Path, weights: dict[str, float] | None = None,
                 sensitivity: float = 0.95, labels: Path | None = None) -> Path:
    """Pack ``runs`` into one bundle file at ``out`` (atomically); return ``out``.

    With ``labels`` (the Kaggle label CSV of the cache the runs were trained on), each label's decision
    threshold is the operating point reaching ``sensitivity`` on the ensembled out-of-fold predictions;
    without it, every threshold is :data:`DEFAULT_THRESHOLD` and the manifest says so.
    """
    if not runs:
        raise IchdetError("no runs to bundle; pass --run RUN at least once")
    if not 0.0 < sensitivity <= 1.0:
        raise IchdetError(f"sensitivity {sensitivity} must be in (0, 1], e.g. 0.95")
    ens = _runs_ensemble([Path(r) for r in runs], weights)
    points = None if labels is None else oof_operating_points(ens.members, Path(labels), sensitivity)
    entries: dict[str, bytes] = {}
    members_json = []
    for m in ens.members:
        files = {f"members/{m.name}/config.yaml": config_to_yaml(m.config).encode()}
        files.update({f"members/{m.name}/fold{k}.safetensors": m.weight_bytes(k) for k in m.folds})
        entries.update(files)
        members_json.append(_member_manifest(m, {name: sha256_bytes(data) for name, data in files.items()}))
    manifest = {
        "format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "ichdet_version": __version__,
        "labels": list(LABELS), "members": members_json, "thresholds": _thresholds(points),
        "operating_points": None if points is None else _points_json(points),
        "thresholds_source": (f"default {DEFAULT_THRESHOLD} (bundled without --labels)" if points is None else
                              f"out-of-fold operating points at sensitivity {sensitivity}"),
    }
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("manifest.json", json.dumps(manifest, indent=2, allow_nan=False))
        for name, data in entries.items():
            zf.writestr(name, data)
    return Path(out)


# --------------------------------------------------------------------------------------------- loading


def _verified(zf: zipfile.ZipFile, entry: str, expected: str, bundle: Path) -> bytes:
    """The bytes of ``entry``; CheckpointError naming it when missing or when its sha256 differs."""
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


def _check_entry_names(zf: zipfile.ZipFile, bundle: Path) -> None:
    """Refuse absolute paths, ``..``, any name outside the bundle layout (no path traversal) and a name
    stored twice (a zip may hold two entries of one name, and tools disagree on which one counts)."""
    names = zf.namelist()
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise CheckpointError(f"{bundle}: member names {twice} occur more than once; the file is not a safe bundle")
    for name in names:
        parts = PurePosixPath(name).parts
        if name.startswith(("/", "\\")) or "\\" in name or ".." in parts or (
                name != "manifest.json" and not _MEMBER_FILE.match(name)):
            raise CheckpointError(f"{bundle}: refused member name {name!r} (outside the bundle layout "
                                  "manifest.json, members/<name>/...); the file is not a safe bundle")


def _read_manifest(zf: zipfile.ZipFile, bundle: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(zf.read("manifest.json"))
    except KeyError:
        raise CheckpointError(f"{bundle}: no manifest.json; not a bundle written by `ichdet bundle`") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{bundle}: manifest.json is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{bundle}: manifest.json is not an {BUNDLE_FORMAT} manifest")
    if manifest.get("format_version") != BUNDLE_VERSION:
        raise CheckpointError(f"{bundle}: bundle format version {manifest.get('format_version')!r}; this ichdet "
                              f"{__version__} reads version {BUNDLE_VERSION}. Upgrade ichdet or rebuild the bundle")
    return manifest


def _bundle_member(zf: zipfile.ZipFile, bundle: Path, entry: dict[str, Any], weight: float) -> Member:
    name = str(entry.get("name", ""))
    if not _NAME.match(name) or entry.get("kind") != "2d":
        raise CheckpointError(f"{bundle}: member {name!r} of kind {entry.get('kind')!r} is not supported "
                              "(this ichdet loads 2d members)")
    hashes = {str(k): str(v) for k, v in dict(entry.get("sha256", {})).items()}
    folds = tuple(int(f) for f in entry.get("folds", []))
    wanted = [f"members/{name}/config.yaml", *(f"members/{name}/fold{k}.safetensors" for k in folds)]
    if not folds or sorted(hashes) != sorted(wanted):
        raise CheckpointError(f"{bundle}: member {name!r} lists files {sorted(hashes)}, expected {wanted}")
    for path in wanted[1:]:
        _verified(zf, path, hashes[path], bundle)
    text = _verified(zf, wanted[0], hashes[wanted[0]], bundle).decode()
    cfg = build_config(yaml.safe_load(text) or {}, ["model.pretrained=false"], source=f"{bundle}:{wanted[0]}")
    return Member(name, weight, "2d", cfg, folds, bundle, hashes)


def _bundle_ensemble(bundle: Path, weights: Mapping[str, float] | None) -> Ensemble:
    if not bundle.is_file():
        raise CheckpointError(f"{bundle}: bundle not found; write one with `ichdet bundle --run RUN --out {bundle}`")
    data = bundle.read_bytes()
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise CheckpointError(f"{bundle}: not a bundle (not a zip archive)") from None
    with zf:
        _check_entry_names(zf, bundle)
        manifest = _read_manifest(zf, bundle)
        entries = list(manifest.get("members", []))
        names = [str(e.get("name")) for e in entries]
        w = _resolve_weights(names, weights) if weights is not None else {
            str(e.get("name")): float(e.get("weight", 1.0)) for e in entries}
        members = tuple(_bundle_member(zf, bundle, e, w[n]) for e, n in zip(entries, names, strict=True))
        listed = {f for m in members for f in m.sha256} | {"manifest.json"}
        extra = sorted(set(zf.namelist()) - listed)
        if extra:
            raise CheckpointError(f"{bundle}: files {extra} are not in the manifest; refusing a modified bundle")
    if not members:
        raise CheckpointError(f"{bundle}: the manifest lists no members")
    thresholds = {label: float(manifest.get("thresholds", {}).get(label, DEFAULT_THRESHOLD)) for label in LABELS}
    info = {"bundle_sha256": sha256_bytes(data), "ichdet_version": manifest.get("ichdet_version"), "runs": None,
            "members": [_member_manifest(m) for m in members],
            "operating_points": manifest.get("operating_points"),
            "thresholds_source": manifest.get("thresholds_source")}
    return Ensemble(members, thresholds, info)


def load_ensemble(bundle: Path | None = None, runs: Sequence[Path] = (),
                  weights: dict[str, float] | None = None) -> Ensemble:
    """The ensemble of a bundle file, or of run folders (exactly one of the two).

    ``weights`` (member name -> weight) overrides the bundle's weights, or sets the runs' (default 1
    each). Every bundle member is verified against its sha256 before anything is loaded.
    """
    if (bundle is None) == (not runs):
        raise IchdetError("give either --bundle or at least one --run (not both, not neither)")
    if bundle is not None:
        return _bundle_ensemble(Path(bundle), weights)
    return _runs_ensemble([Path(r) for r in runs], weights)
