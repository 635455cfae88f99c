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

import io
import json
import math
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import yaml
from pydantic import ValidationError

from ichdet import __version__
from ichdet.cache.labels import LABELS, read_labels
from ichdet.errors import CheckpointError, IchdetError
from ichdet.evaluate.ensembling import ensemble
from ichdet.evaluate.metrics import operating_points
from ichdet.infer.members import (
    DEFAULT_THRESHOLD,
    NAME,
    Ensemble,
    Member,
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
from ichdet.models.config import SeqConfig, build_config, config_to_yaml

__all__ = ["BUNDLE_FORMAT", "BUNDLE_VERSION", "DEFAULT_THRESHOLD", "Ensemble", "Member", "load_ensemble",
           "run_names", "sha256_bytes", "sha256_file", "write_bundle"]

BUNDLE_FORMAT = "ichdet-bundle"
#: The newest format written: 2 (sequence members and ``bases``). 2D-only bundles are written as 1.
BUNDLE_VERSION = 3
_READS = (1, 2, 3)
#: Where a bundle's networks run: torch (safetensors), or onnxruntime (ONNX graphs, safetensors kept for Grad-CAM).
RUNTIMES = ("torch", "onnx")
_MEMBER_FILE = re.compile(
    r"^members/([A-Za-z0-9][A-Za-z0-9._-]{0,99})/(config\.yaml|seq\.json|fold(\d{1,3})\.(safetensors|onnx))$")


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


def oof_operating_points(members: Sequence[Member], labels_csv: Path, sensitivity: float) -> pd.DataFrame:
    """Per label, the threshold reaching ``sensitivity`` on the ensembled out-of-fold predictions."""
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
        return member_manifest(m, {name: sha256_bytes(data) for name, data in files.items()})

    members_json = [packed(m) for m in ens.members]
    bases_json = [packed(b) for b in distinct_bases(ens.members)]
    has_seq = any(m.kind == "seq" for m in ens.members)
    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT, "format_version": 3 if runtime == "onnx" else 2 if has_seq else 1,
        "ichdet_version": __version__,
        "labels": list(LABELS), "members": members_json, "thresholds": _thresholds(points),
        "operating_points": None if points is None else _points_json(points),
        "thresholds_source": (f"default {DEFAULT_THRESHOLD} (bundled without --labels)" if points is None else
                              f"out-of-fold operating points at sensitivity {sensitivity}"),
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
    if manifest.get("format_version") not in _READS:
        raise CheckpointError(f"{bundle}: bundle format version {manifest.get('format_version')!r}; this ichdet "
                              f"{__version__} reads versions {list(_READS)}. Upgrade ichdet or rebuild the bundle")
    return manifest


def _entry_files(zf: zipfile.ZipFile, bundle: Path, entry: Mapping[str, Any], kind: str
                 ) -> tuple[str, tuple[int, ...], dict[str, str], dict[str, bytes]]:
    """Name, folds, hashes and the verified small files (config, layout) of one manifest entry of ``kind``.

    Every fold's weights are verified here too (and again when loaded), so a tampered file is refused
    before any work, by name."""
    name = str(entry.get("name", ""))
    if not NAME.match(name) or entry.get("kind") != kind:
        raise CheckpointError(f"{bundle}: member {name!r} of kind {entry.get('kind')!r} is not supported here "
                              f"(expected kind {kind!r}; this ichdet loads 2d and seq members)")
    hashes = {str(k): str(v) for k, v in dict(entry.get("sha256", {})).items()}
    folds = tuple(int(f) for f in entry.get("folds", []))
    small = [f"members/{name}/config.yaml", *([f"members/{name}/seq.json"] if kind == "seq" else [])]
    graphs = [f"members/{name}/fold{k}.onnx" for k in folds] if any(h.endswith(".onnx") for h in hashes) else []
    wanted = [*small, *(f"members/{name}/fold{k}.safetensors" for k in folds), *graphs]
    if not folds or sorted(hashes) != sorted(wanted):
        raise CheckpointError(f"{bundle}: member {name!r} lists files {sorted(hashes)}, expected {wanted}")
    for path in wanted[len(small):]:
        verified(zf, path, hashes[path], bundle)
    return name, folds, hashes, {path: verified(zf, path, hashes[path], bundle) for path in small}


def _yaml_tree(data: bytes, where: str) -> dict[str, Any]:
    try:
        tree = yaml.safe_load(data.decode()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{where}: not a readable YAML config ({err})") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{where}: a config is a mapping of sections")
    return tree


def _bundle_member(zf: zipfile.ZipFile, bundle: Path, entry: Mapping[str, Any], weight: float) -> Member:
    name, folds, hashes, small = _entry_files(zf, bundle, entry, "2d")
    where = f"{bundle}:members/{name}/config.yaml"
    cfg = build_config(_yaml_tree(small[f"members/{name}/config.yaml"], where), ["model.pretrained=false"],
                       source=where)
    return Member(name, weight, "2d", cfg, folds, bundle, hashes)


def _bundle_seq_member(zf: zipfile.ZipFile, bundle: Path, entry: Mapping[str, Any], weight: float,
                       runs: Mapping[str, Member]) -> Member:
    name, folds, hashes, small = _entry_files(zf, bundle, entry, "seq")
    where = f"{bundle}:members/{name}/config.yaml"
    try:  # the stored SeqConfig, validated as load_seq_config validates a file (unknown keys are errors)
        cfg = SeqConfig.model_validate(_yaml_tree(small[f"members/{name}/config.yaml"], where))
    except ValidationError as err:
        raise CheckpointError(f"{where}: not a sequence config this ichdet reads ({err.errors()[0]['msg']})") from None
    try:
        base_names = [str(b) for b in json.loads(small[f"members/{name}/seq.json"])["bases"]]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{bundle}: members/{name}/seq.json is not a sequence layout ({err})") from None
    if base_names != list(entry.get("bases", [])) or not base_names:
        raise CheckpointError(f"{bundle}: member {name!r}: seq.json names base runs {base_names}, the manifest "
                              f"{entry.get('bases')}; the bundle is inconsistent, write it again")
    unknown = [b for b in base_names if b not in runs]
    if unknown:
        raise CheckpointError(f"{bundle}: member {name!r} needs base runs {unknown}, which the bundle does not hold")
    short = {b: sorted(set(folds) - set(runs[b].folds)) for b in base_names if set(folds) - set(runs[b].folds)}
    if short:
        raise CheckpointError(f"{bundle}: member {name!r}: base runs lack the folds of its sequence model: {short}")
    return Member(name, weight, "seq", cfg, folds, bundle, hashes, tuple(runs[b] for b in base_names))


def _bundle_members(zf: zipfile.ZipFile, bundle: Path, manifest: Mapping[str, Any],
                    weights: Mapping[str, float] | None) -> tuple[tuple[Member, ...], list[Member]]:
    """The ensemble's members (in manifest order) and the base runs that are not members."""
    entries, base_entries = list(manifest.get("members", [])), list(manifest.get("bases", []))
    names = [str(e.get("name")) for e in entries]
    every = names + [str(e.get("name")) for e in base_entries]
    if len(set(every)) != len(every):
        raise CheckpointError(f"{bundle}: member names {every} are not distinct; the bundle is inconsistent")
    w = resolve_weights(names, weights) if weights is not None else {
        str(e.get("name")): float(e.get("weight", 1.0)) for e in entries}
    runs = {str(e.get("name")): _bundle_member(zf, bundle, e, w[str(e.get("name"))])
            for e in entries if e.get("kind") != "seq"}
    bases = {str(e.get("name")): _bundle_member(zf, bundle, e, 0.0) for e in base_entries}
    runs.update(bases)
    members = tuple(runs[n] if e.get("kind") != "seq" else _bundle_seq_member(zf, bundle, e, w[n], runs)
                    for e, n in zip(entries, names, strict=True))
    return members, list(bases.values())


def _check_runtime(manifest: Mapping[str, Any], runs: Sequence[Member], bundle: Path) -> None:
    """Refuse a runtime this ichdet does not know, and an ONNX bundle with a network lacking its graphs."""
    runtime = manifest.get("runtime", "torch")
    if runtime not in RUNTIMES:
        raise CheckpointError(f"{bundle}: runtime {runtime!r}; this ichdet runs {list(RUNTIMES)}")
    lacking = [m.name for m in runs if (runtime == "onnx") != m.onnx]
    if lacking:
        raise CheckpointError(f"{bundle}: runtime {runtime} but members {lacking} "
                              f"{'lack' if runtime == 'onnx' else 'have'} ONNX graphs; the bundle is inconsistent, "
                              "write it again")


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
        members, bases = _bundle_members(zf, bundle, manifest, weights)
        _check_runtime(manifest, (*members, *bases), bundle)
        listed = {f for m in (*members, *bases) for f in m.sha256} | {"manifest.json"}
        extra = sorted(set(zf.namelist()) - listed)
        if extra:
            raise CheckpointError(f"{bundle}: files {extra} are not in the manifest; refusing a modified bundle")
    if not members:
        raise CheckpointError(f"{bundle}: the manifest lists no members")
    thresholds = {label: float(manifest.get("thresholds", {}).get(label, DEFAULT_THRESHOLD)) for label in LABELS}
    info = {"bundle_sha256": sha256_bytes(data), "ichdet_version": manifest.get("ichdet_version"), "runs": None,
            "members": [member_manifest(m) for m in members], "bases": [member_manifest(b) for b in bases],
            "operating_points": manifest.get("operating_points"),
            "thresholds_source": manifest.get("thresholds_source"), "runtime": manifest.get("runtime", "torch"),
            "calibration": manifest.get("calibration")}
    return Ensemble(members, thresholds, info, _temperature(manifest, bundle))


def _temperature(manifest: Mapping[str, Any], bundle: Path) -> dict[str, float] | None:
    """The per-label temperatures of a site-calibrated bundle (``calibration.temperature``), or None."""
    found = (manifest.get("calibration") or {}).get("temperature")
    if found is None:
        return None
    try:
        temperature = {label: float(found[label]) for label in LABELS}
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{bundle}: calibration.temperature must give a number for each of {list(LABELS)}; "
                              "calibrate the bundle again") from None
    bad = {k: v for k, v in temperature.items() if not (math.isfinite(v) and v > 0)}
    if bad:
        raise CheckpointError(f"{bundle}: calibration temperatures must be finite and > 0, got {bad}")
    return temperature


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
