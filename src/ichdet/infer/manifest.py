"""A bundle's ``manifest.json`` as a typed schema: every value checked before a bundle is trusted.

The manifest decides what a bundle predicts (member weights, decision thresholds) and which files it
may hold (names, folds, sha256), so nothing in it is taken on trust: :func:`parse_manifest` validates
the whole document (pydantic, strict types: a string is never read as a number, a bool never as an
int) and refuses a bad bundle in one line naming the field and its value, e.g.::

    model.ichdet: manifest members[0].weight = 1e+308: Input should be less than or equal to 1000000

Rules (format versions 1 and 2 are read; see :mod:`ichdet.infer.bundle` for the layout):

- ``members``: a non-empty list; each a name (:data:`NAME_PATTERN`), kind ``2d`` or ``seq``, a finite
  weight in (0, :data:`MAX_WEIGHT`] (weights are relative: the ensemble divides by their sum), folds
  (a non-empty list of distinct integers 0-999), ``sha256`` (archive path -> 64 lower-case hex digits)
  and, optionally, ``bytes`` (archive path -> uncompressed size, checked before any file is read).
- ``bases`` (version 2): the sequence members' base runs that are not members; the same entries, weight 0.
- ``thresholds``: label -> a finite number in [0, 1]; a label left out gets the default.
- optional: ``operating_points`` (label -> its out-of-fold quality, see :mod:`ichdet.evaluate.quality`),
  ``training`` (what the members were trained on, see :mod:`ichdet.infer.provenance`), ``runtime``
  (``torch``, the default, or ``onnx``), ``calibration`` (an object) and, per member, ``*.onnx``
  entries in ``sha256``. Unknown top-level or member keys are ignored (a newer writer's additions).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from ichdet.errors import CheckpointError
from ichdet.names import LABELS

__all__ = ["MAX_WEIGHT", "NAME_PATTERN", "BundleManifest", "ManifestEntry", "parse_manifest"]

BUNDLE_FORMAT = "ichdet-bundle"
#: Format versions this ichdet reads.
READS = (1, 2, 3)
#: A member (run) name: its run folder's name, safe as one path component of the archive.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
#: The largest member weight accepted. Weights are relative, so no meaningful ensemble needs more than
#: six orders of magnitude between members, and a bound keeps every sum of weights finite.
MAX_WEIGHT = 1e6

_Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
_Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
_Fold = Annotated[int, Field(ge=0, le=999)]
_Label = Annotated[str, StringConstraints(pattern="^(" + "|".join(LABELS) + ")$")]
_Threshold = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
_MemberWeight = Annotated[float, Field(gt=0.0, le=MAX_WEIGHT, allow_inf_nan=False)]
_BaseWeight = Annotated[float, Field(ge=0.0, le=MAX_WEIGHT, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class ManifestEntry(_Strict):
    """One stored run (a member, or a sequence member's base run): what it is and its files' sha256."""

    name: _Name
    kind: Literal["2d", "seq"]
    weight: _BaseWeight = 0.0
    folds: list[_Fold] = Field(min_length=1)
    sha256: dict[str, _Sha256]
    sizes: dict[str, Annotated[int, Field(ge=0)]] | None = Field(None, alias="bytes")
    bases: list[_Name] = []
    training: dict[str, Any] | str | None = None

    @field_validator("folds")
    @classmethod
    def _distinct(cls, folds: list[int]) -> list[int]:
        if len(set(folds)) != len(folds):
            raise ValueError("folds must be distinct")
        return folds


class MemberEntry(ManifestEntry):
    """A member of the ensemble: its weight must be > 0."""

    weight: _MemberWeight = 1.0


class BundleManifest(_Strict):
    """The validated ``manifest.json`` (see the module docstring for the rules)."""

    format: Literal["ichdet-bundle"]
    format_version: Literal[1, 2, 3]
    ichdet_version: str | None = None
    labels: list[str] | None = None
    members: list[MemberEntry] = Field(min_length=1)
    bases: list[ManifestEntry] = []
    thresholds: dict[_Label, _Threshold] = {}
    operating_points: dict[_Label, dict[str, Any]] | None = None
    thresholds_source: str | None = None
    runtime: Literal["torch", "onnx"] = "torch"
    calibration: dict[str, Any] | None = None
    training: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _graphs_match_runtime(self) -> BundleManifest:
        """An ONNX bundle has a graph for every fold of every network; a torch bundle has none."""
        onnx = self.runtime == "onnx"
        odd = [e.name for e in (*self.members, *self.bases)
               if onnx != all(f"members/{e.name}/fold{k}.onnx" in e.sha256 for k in e.folds)]
        if odd:
            raise ValueError(f"runtime {self.runtime} but members {odd} {'lack' if onnx else 'have'} ONNX graphs")
        return self

    @field_validator("calibration")
    @classmethod
    def _temperatures(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """A site calibration's temperatures (when present): a finite number > 0 for every label."""
        found = (value or {}).get("temperature")
        if found is not None and not (isinstance(found, dict) and all(
                type(found.get(label)) in (int, float) and 0 < found[label] < float("inf") for label in LABELS)):
            raise ValueError(f"temperature must give a finite number > 0 for each of {list(LABELS)}")
        return value


def _where(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as the manifest path: ``members[0].weight``, ``thresholds.any``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "manifest"


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _problem(err: ValidationError) -> str:
    """The first error of a manifest validation as ``field = value: reason``."""
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p in ("str", "dict[str,any]"))))
    if e["type"] == "missing":
        return f"{_where(loc)}: missing"
    if not loc:  # a rule across fields: its message says what is wrong
        return str(e["msg"]).removeprefix("Value error, ")
    return f"{_where(loc)} = {_shown(e.get('input'))}: {e['msg']}"


def parse_manifest(data: bytes, bundle: Path) -> BundleManifest:
    """The manifest of ``bundle`` validated; CheckpointError in one line naming the bad field and value."""
    try:
        tree = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{bundle}: manifest.json is not valid JSON ({err})") from None
    if not isinstance(tree, dict) or tree.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{bundle}: manifest.json is not an {BUNDLE_FORMAT} manifest")
    version = tree.get("format_version")
    if type(version) is not int or version not in READS:
        from ichdet import __version__

        raise CheckpointError(f"{bundle}: bundle format version {version!r}; this ichdet {__version__} reads "
                              f"versions {list(READS)}. Upgrade ichdet or rebuild the bundle")
    try:
        return BundleManifest.model_validate(tree)
    except ValidationError as err:
        raise CheckpointError(f"{bundle}: manifest {_problem(err)}; the bundle is damaged or was edited: "
                              "write it again with `ichdet bundle`") from None


#: Files of a member folder inside the archive; ``.onnx`` graphs are written by ``bundle --runtime onnx``.
MEMBER_FILE = re.compile(
    r"^members/([A-Za-z0-9][A-Za-z0-9._-]{0,99})/"
    r"(config\.yaml|seq\.json|fold(\d{1,3})\.safetensors|[A-Za-z0-9][A-Za-z0-9._-]{0,99}\.onnx)$")
