"""Model bundles (``model.ichdet``): trained runs packed into one file, verified and loaded without pickle.

A bundle is a zip archive (stored, not compressed: weights do not compress) holding::

    manifest.json                         format, ichdet version, members, bases, thresholds, sha256 per file
    members/<name>/config.yaml            the run's resolved config (safe YAML): a Config, or a SeqConfig
    members/<name>/seq.json               sequence members only: {"bases": [member names]}, feature order
    members/<name>/fold<k>.safetensors    one fold's weights

``members`` in the manifest are the ensemble (2D and sequence runs, with their weights); ``bases`` are
the sequence members' base runs that are not members themselves. Every run is stored once, under its
name: a base that is also a 2D member, or that two sequence members share, is one folder of the archive.
Format version 1 (2D members only) is still written for bundles without a sequence member, so older
ichdet reads them; version 2 adds sequence members and ``bases``; both are read.

Loading reads ``manifest.json`` (JSON), checks every member name (no absolute paths, no ``..``, only
the layout above), refuses any file whose sha256 differs from the manifest and any file the manifest
does not list, naming it, and loads weights with safetensors only: nothing is ever unpickled. The same
:class:`Ensemble` comes from run folders (``--run``), so ``predict``, ``predict-study`` and ``report``
treat both alike.

Ensemble rule (the seed's, as :func:`ichdet.evaluate.ensembling.ensemble`): mean over a member's folds, then the
weighted mean over members.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import yaml
from pydantic import ValidationError

from ichdet import __version__
from ichdet.cache.labels import LABELS, read_labels
from ichdet.cache.provenance import UNKNOWN, training_summary
from ichdet.errors import CheckpointError, IchdetError
from ichdet.evaluate.ensembling import ensemble
from ichdet.evaluate.quality import point_quality
from ichdet.infer.manifest import BUNDLE_FORMAT, MEMBER_FILE, BundleManifest, ManifestEntry, parse_manifest
from ichdet.infer.members import (
    DEFAULT_THRESHOLD,
    READ_BLOCK,
    Ensemble,
    Member,
    check_entry_size,
    distinct_bases,
    member_manifest,
    resolve_weights,
    run_names,
    runs_ensemble,
    sha256_bytes,
    sha256_file,
    verified,
)
from ichdet.io import atomic_path
from ichdet.models.config import Config, SeqConfig, build_config, config_to_yaml

__all__ = ["BUNDLE_FORMAT", "BUNDLE_VERSION", "DEFAULT_THRESHOLD", "Ensemble", "Member", "load_ensemble",
           "run_names", "sha256_bytes", "sha256_file", "write_bundle"]

#: The newest format written: 2 (sequence members and ``bases``). 2D-only bundles are written as 1.
#: 3: ONNX graphs (``--runtime onnx``) or site temperatures (``ichdet calibrate``), which an older
#: ichdet must not run without; a bundle without them is written as 2 or 1, so older ichdet reads it.
BUNDLE_VERSION = 3
#: Where a bundle's networks run: torch (safetensors), or onnxruntime (ONNX graphs, safetensors kept for Grad-CAM).
RUNTIMES = ("torch", "onnx")


# --------------------------------------------------------------------------------------------- operating points


def ensemble_oof(members: Sequence[Member]) -> pd.DataFrame:
    """The members' out-of-fold predictions (``RUN/oof.parquet``) ensembled: image_id x LABELS."""
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


def oof_operating_points(members: Sequence[Member], labels_csv: Path, sensitivity: float
                         ) -> dict[str, dict[str, Any]]:
    """Per label, the threshold reaching ``sensitivity`` on the ensembled out-of-fold predictions, with
    its quality (AUC, sensitivity, specificity, positives, warnings: :func:`ichdet.evaluate.quality.point_quality`)."""
    oof = ensemble_oof(members)
    truth = read_labels(labels_csv)
    common = oof.index.intersection(truth.index)
    if len(common) == 0:
        raise IchdetError(f"{labels_csv} labels none of the runs' out-of-fold images; pass the label CSV "
                          "of the cache the runs were trained on")
    return point_quality(truth.loc[common, list(LABELS)].to_numpy(np.float64),
                         oof.loc[common, list(LABELS)].to_numpy(np.float64), sensitivity)


def _thresholds(points: Mapping[str, Mapping[str, Any]] | None) -> dict[str, float]:
    """Each label's threshold: its operating point's, or the default (no --labels, or no positive case)."""
    if points is None:
        return dict.fromkeys(LABELS, DEFAULT_THRESHOLD)
    return {label: DEFAULT_THRESHOLD if points[label]["threshold"] is None else float(points[label]["threshold"])
            for label in LABELS}


# --------------------------------------------------------------------------------------------- writing


def _member_files(m: Member) -> dict[str, bytes]:
    """The archive entries of one run: config, the sequence layout (base names) and every fold's weights."""
    prefix = f"members/{m.name}/"
    files = {prefix + "config.yaml": config_to_yaml(m.config).encode()}
    if m.kind == "seq":
        files[prefix + "seq.json"] = (json.dumps({"bases": [b.name for b in m.bases]}, indent=1) + "\n").encode()
    files.update({f"{prefix}fold{k}.safetensors": m.weight_bytes(k) for k in m.folds})
    return files


def write_bundle(runs: Sequence[Path], out: Path, weights: dict[str, float] | None = None,
                 sensitivity: float = 0.95, labels: Path | None = None, runtime: str = "torch") -> Path:
    """Pack ``runs`` (2D or sequence runs) into one bundle file at ``out`` (atomically); return ``out``.

    A sequence run brings its base runs (config and every fold), stored once each. With ``labels``
    (the Kaggle label CSV of the cache the runs were trained on), each label's decision threshold is
    the operating point reaching ``sensitivity`` on the ensembled out-of-fold predictions; without it,
    every threshold is :data:`DEFAULT_THRESHOLD` and the manifest says so. With ``runtime="onnx"``
    every network is also stored as an ONNX graph (``fold<k>.onnx``, checked against torch before
    anything is written: :mod:`ichdet.infer.onnx_export`), and prediction runs the graphs through
    onnxruntime; such a bundle is format version 3 (an older ichdet would run its torch weights instead).
    """
    if runtime not in RUNTIMES:
        raise IchdetError(f"--runtime {runtime!r}: choose one of {list(RUNTIMES)}")
    if not runs:
        raise IchdetError("no runs to bundle; pass --run RUN at least once")
    if not 0.0 < sensitivity <= 1.0:
        raise IchdetError(f"sensitivity {sensitivity} must be in (0, 1], e.g. 0.95")
    ens = runs_ensemble([Path(r) for r in runs], weights)
    points = None if labels is None else oof_operating_points(ens.members, Path(labels), sensitivity)
    entries: dict[str, bytes] = {}
    worst = [0.0]

    def packed(m: Member) -> dict[str, Any]:
        files = _member_files(m)
        if runtime == "onnx":
            from ichdet.infer.onnx_export import member_graphs  # torch.onnx and onnx: only when exporting

            graphs, diff = member_graphs(m)
            files.update(graphs)
            worst[0] = max(worst[0], diff)
        entries.update(files)
        return member_manifest(m, {name: sha256_bytes(data) for name, data in files.items()},
                               {name: len(data) for name, data in files.items()})

    members_json = [packed(m) for m in ens.members]
    bases_json = [packed(b) for b in distinct_bases(ens.members)]
    has_seq = any(m.kind == "seq" for m in ens.members)
    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT, "format_version": 3 if runtime == "onnx" else 2 if has_seq else 1,
        "ichdet_version": __version__,
        "labels": list(LABELS), "members": members_json, "thresholds": _thresholds(points),
        "operating_points": points,
        "thresholds_source": (f"default {DEFAULT_THRESHOLD} (bundled without --labels)" if points is None else
                              f"out-of-fold operating points at sensitivity {sensitivity}"),
        "training": ens.manifest["training"],
    }
    if has_seq:
        manifest["bases"] = bases_json
    if runtime == "onnx":
        from ichdet.infer.onnx_export import OPSET, TOLERANCE

        manifest["runtime"] = "onnx"
        manifest["onnx_check"] = {"opset": OPSET, "max_abs_diff": worst[0], "tolerance": TOLERANCE}
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("manifest.json", json.dumps(manifest, indent=2, allow_nan=False))
        for name, data in entries.items():
            zf.writestr(name, data)
    return Path(out)


# --------------------------------------------------------------------------------------------- loading


def _check_entries(zf: zipfile.ZipFile, bundle: Path) -> None:
    """Refuse absolute paths, ``..``, any name outside the bundle layout (no path traversal), a name
    stored twice (a zip may hold two entries of one name, and tools disagree on which one counts) and
    any file over its size cap (:func:`ichdet.infer.members.check_entry_size`), all before reading one."""
    names = zf.namelist()
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise CheckpointError(f"{bundle}: member names {twice} occur more than once; the file is not a safe bundle")
    for name in names:
        parts = PurePosixPath(name).parts
        if name.startswith(("/", "\\")) or "\\" in name or ".." in parts or (
                name != "manifest.json" and not MEMBER_FILE.match(name)):
            raise CheckpointError(f"{bundle}: refused member name {name!r} (outside the bundle layout "
                                  "manifest.json, members/<name>/...); the file is not a safe bundle")
    for info in zf.infolist():
        check_entry_size(info, bundle)


def _read_manifest(zf: zipfile.ZipFile, bundle: Path) -> BundleManifest:
    if "manifest.json" not in zf.namelist():
        raise CheckpointError(f"{bundle}: no manifest.json; not a bundle written by `ichdet bundle`")
    with zf.open("manifest.json") as f:  # its size was checked against its cap (check_entry_size)
        data = f.read()
    return parse_manifest(data, bundle)


def _entry_files(zf: zipfile.ZipFile, bundle: Path, entry: ManifestEntry, kind: str) -> dict[str, bytes]:
    """The verified small files (config, layout) of one manifest entry of ``kind``.

    Every other file it lists (each fold's weights, ONNX graphs) is verified here too, streamed
    without being kept (and the weights again when loaded), so a tampered file is refused before any
    work, by name."""
    name = entry.name
    if entry.kind != kind:
        raise CheckpointError(f"{bundle}: member {name!r} of kind {entry.kind!r} is not supported here "
                              f"(expected kind {kind!r}; this ichdet loads 2d and seq members)")
    small = [f"members/{name}/config.yaml", *([f"members/{name}/seq.json"] if kind == "seq" else [])]
    wanted = [*small, *(f"members/{name}/fold{k}.safetensors" for k in entry.folds)]
    graphs = sorted(f for f in entry.sha256 if f.endswith(".onnx"))
    if sorted(set(entry.sha256) - set(graphs)) != sorted(wanted) or any(_owner(g) != name for g in graphs):
        raise CheckpointError(f"{bundle}: member {name!r} lists files {sorted(entry.sha256)}, expected {wanted}"
                              + (" and ONNX graphs of its own" if graphs else ""))
    sizes = entry.sizes or {}
    unknown = sorted(set(sizes) - set(entry.sha256))
    if unknown:
        raise CheckpointError(f"{bundle}: member {name!r} gives sizes of files it does not list: {unknown}")
    for path in [*wanted[len(small):], *graphs]:
        verified(zf, path, entry.sha256[path], bundle, sizes.get(path), keep=False)
    return {path: verified(zf, path, entry.sha256[path], bundle, sizes.get(path)) for path in small}


def _owner(path: str) -> str | None:
    """The member folder name of archive path ``path`` (None outside the layout)."""
    found = MEMBER_FILE.match(path)
    return None if found is None else found[1]


def _yaml_tree(data: bytes, where: str) -> dict[str, Any]:
    try:
        tree = yaml.safe_load(data.decode()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{where}: not a readable YAML config ({err})") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{where}: a config is a mapping of sections")
    return tree


def _member(entry: ManifestEntry, weight: float, kind: str, cfg: Config | SeqConfig, bundle: Path,
            bases: tuple[Member, ...] = ()) -> Member:
    training = entry.training if entry.training is not None else UNKNOWN
    return Member(entry.name, weight, kind, cfg, tuple(entry.folds), bundle, dict(entry.sha256), bases,
                  dict(entry.sizes or {}), training)


def _bundle_member(zf: zipfile.ZipFile, bundle: Path, entry: ManifestEntry, weight: float) -> Member:
    small = _entry_files(zf, bundle, entry, "2d")
    where = f"{bundle}:members/{entry.name}/config.yaml"
    cfg = build_config(_yaml_tree(small[f"members/{entry.name}/config.yaml"], where), ["model.pretrained=false"],
                       source=where)
    return _member(entry, weight, "2d", cfg, bundle)


def _bundle_seq_member(zf: zipfile.ZipFile, bundle: Path, entry: ManifestEntry, weight: float,
                       runs: Mapping[str, Member]) -> Member:
    name = entry.name
    small = _entry_files(zf, bundle, entry, "seq")
    where = f"{bundle}:members/{name}/config.yaml"
    try:  # the stored SeqConfig, validated as load_seq_config validates a file (unknown keys are errors)
        cfg = SeqConfig.model_validate(_yaml_tree(small[f"members/{name}/config.yaml"], where))
    except ValidationError as err:
        raise CheckpointError(f"{where}: not a sequence config this ichdet reads ({err.errors()[0]['msg']})") from None
    try:
        base_names = [str(b) for b in json.loads(small[f"members/{name}/seq.json"])["bases"]]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{bundle}: members/{name}/seq.json is not a sequence layout ({err})") from None
    if base_names != list(entry.bases) or not base_names:
        raise CheckpointError(f"{bundle}: member {name!r}: seq.json names base runs {base_names}, the manifest "
                              f"{entry.bases}; the bundle is inconsistent, write it again")
    unknown = [b for b in base_names if b not in runs]
    if unknown:
        raise CheckpointError(f"{bundle}: member {name!r} needs base runs {unknown}, which the bundle does not hold")
    folds = entry.folds
    short = {b: sorted(set(folds) - set(runs[b].folds)) for b in base_names if set(folds) - set(runs[b].folds)}
    if short:
        raise CheckpointError(f"{bundle}: member {name!r}: base runs lack the folds of its sequence model: {short}")
    return _member(entry, weight, "seq", cfg, bundle, tuple(runs[b] for b in base_names))


def _bundle_members(zf: zipfile.ZipFile, bundle: Path, manifest: BundleManifest,
                    weights: Mapping[str, float] | None) -> tuple[tuple[Member, ...], list[Member]]:
    """The ensemble's members (in manifest order) and the base runs that are not members."""
    names = [e.name for e in manifest.members]
    every = names + [e.name for e in manifest.bases]
    if len(set(every)) != len(every):
        raise CheckpointError(f"{bundle}: member names {every} are not distinct; the bundle is inconsistent")
    w = resolve_weights(names, weights) if weights is not None else {e.name: e.weight for e in manifest.members}
    runs = {e.name: _bundle_member(zf, bundle, e, w[e.name]) for e in manifest.members if e.kind != "seq"}
    bases = {e.name: _bundle_member(zf, bundle, e, 0.0) for e in manifest.bases}
    runs.update(bases)
    members = tuple(runs[e.name] if e.kind != "seq" else _bundle_seq_member(zf, bundle, e, w[e.name], runs)
                    for e in manifest.members)
    return members, list(bases.values())


def _open_bundle(bundle: Path) -> BinaryIO:
    """The bundle file opened for reading; CheckpointError saying what ``bundle`` is when it is not a file."""
    if bundle.is_dir():
        raise CheckpointError(f"{bundle}: is a folder, not a bundle file; pass the model.ichdet file that "
                              "`ichdet bundle` wrote (a run folder goes to --run)")
    if bundle.exists() and not bundle.is_file():
        raise CheckpointError(f"{bundle}: is not a regular file (a FIFO, socket or device); pass the model.ichdet "
                              "file that `ichdet bundle` wrote")
    if not bundle.exists():
        raise CheckpointError(f"{bundle}: bundle not found; write one with `ichdet bundle --run RUN --out {bundle}`")
    return open(bundle, "rb")


def _file_sha256(f: BinaryIO) -> str:
    digest = hashlib.sha256()
    f.seek(0)
    for block in iter(lambda: f.read(READ_BLOCK), b""):
        digest.update(block)
    f.seek(0)
    return digest.hexdigest()


def _bundle_ensemble(bundle: Path, weights: Mapping[str, float] | None) -> Ensemble:
    with _open_bundle(bundle) as f:
        bundle_sha256 = _file_sha256(f)  # streamed: a bundle of many networks is never held in memory whole
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, EOFError):
            raise CheckpointError(f"{bundle}: not a bundle (not a zip archive)") from None
        with zf:
            _check_entries(zf, bundle)
            manifest = _read_manifest(zf, bundle)
            members, bases = _bundle_members(zf, bundle, manifest, weights)
            listed = {f for m in (*members, *bases) for f in m.sha256} | {"manifest.json"}
            extra = sorted(set(zf.namelist()) - listed)
            if extra:
                raise CheckpointError(f"{bundle}: files {extra} are not in the manifest; refusing a modified bundle")
    thresholds = {label: manifest.thresholds.get(label, DEFAULT_THRESHOLD) for label in LABELS}
    info = {"bundle_sha256": bundle_sha256, "ichdet_version": manifest.ichdet_version, "runs": None,
            "members": [member_manifest(m) for m in members], "bases": [member_manifest(b) for b in bases],
            "operating_points": manifest.operating_points, "thresholds_source": manifest.thresholds_source,
            "runtime": manifest.runtime, "calibration": manifest.calibration,
            "training": manifest.training if manifest.training is not None else training_summary(
                [m.training for m in (*members, *bases)])}
    return Ensemble(members, thresholds, info, _temperature(manifest))



def _temperature(manifest: BundleManifest) -> dict[str, float] | None:
    """The per-label temperatures of a site-calibrated bundle (``calibration.temperature``, checked by the
    manifest's schema), or None."""
    found = (manifest.calibration or {}).get("temperature")
    return None if found is None else {label: float(found[label]) for label in LABELS}

def load_ensemble(bundle: Path | None = None, runs: Sequence[Path] = (),
                  weights: dict[str, float] | None = None) -> Ensemble:
    """The ensemble of a bundle file, or of run folders (exactly one of the two), 2D and sequence runs.

    ``weights`` (member name -> weight) overrides the bundle's weights, or sets the runs' (default 1
    each). Every bundle file is verified against its sha256 before anything is loaded.
    """
    if (bundle is None) == (not runs):
        raise IchdetError("give either --bundle or at least one --run (not both, not neither)")
    if bundle is not None:
        return _bundle_ensemble(Path(bundle), weights)
    return runs_ensemble([Path(r) for r in runs], weights)
