"""The stage layout (docs/architecture.md): faces, the contract names, and what each side loads at run time.

import-linter (`make test` runs `lint-imports`) checks the static arrows; these check what a process
really loads, which the faces' lazy names could get wrong.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import ichdet

SRC = Path(__file__).resolve().parents[1] / "src"
STAGES = ["dicom", "cache", "models", "train", "infer", "evaluate", "study", "serve", "synth"]

#: The names benchmarks and external scripts import from the faces (DESIGN.md, "Contracts").
CONTRACT = [("ichdet", "LABELS"), ("ichdet.dicom", "read_hu"), ("ichdet.dicom", "apply_windows"),
            ("ichdet.cache", "PixelCache"), ("ichdet.cache", "read_labels"), ("ichdet.cache", "assign_folds"),
            ("ichdet.models", "build_model"), ("ichdet.models", "load_config"),
            ("ichdet.evaluate", "weighted_log_loss")]


@pytest.mark.parametrize(("face", "name"), CONTRACT)
def test_contract_names_are_importable_from_the_faces(face: str, name: str) -> None:
    assert callable(getattr(importlib.import_module(face), name)) or name == "LABELS"


def test_labels_are_the_challenge_labels_in_order() -> None:
    assert ichdet.LABELS == ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")


@pytest.mark.parametrize("stage", STAGES)
def test_every_face_name_exists_and_no_submodule_is_shadowed(stage: str) -> None:
    face = importlib.import_module(f"ichdet.{stage}")
    for name in getattr(face, "__all__", []):
        assert getattr(face, name) is not None, f"ichdet.{stage}.{name}"
    for info in pkgutil.iter_modules(face.__path__):
        sub = importlib.import_module(f"ichdet.{stage}.{info.name}")
        assert getattr(face, info.name) is sub, f"ichdet.{stage}.{info.name} is shadowed by a name of the face"


def test_at_most_eight_modules_stay_at_the_top() -> None:
    top = [i.name for i in pkgutil.iter_modules(ichdet.__path__) if not i.ispkg]
    assert len(top) <= 8, top
    assert {i.name for i in pkgutil.iter_modules(ichdet.__path__) if i.ispkg} == set(STAGES)


def _loaded(module: str, prefixes: tuple[str, ...]) -> list[str]:
    """The modules under ``prefixes`` that a fresh process holds after ``import module``."""
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return [m for m in json.loads(out) if m.startswith(prefixes)]


@pytest.mark.parametrize(("module", "forbidden"), [
    ("ichdet.infer", ("ichdet.train",)),
    ("ichdet.study", ("ichdet.train",)),
    ("ichdet.serve", ("ichdet.train", "torch")),  # the node loads torch only when it analyses
    ("ichdet.dicom", ("torch", "pydicom")),        # windowing at once, the reader on first use
    ("ichdet.cache", ("torch", "pydicom")),
    ("ichdet.evaluate", ("torch",)),
    ("ichdet.models", ("pydicom",)),
    ("ichdet.infer", ("pydicom",)),
    ("ichdet.train", ("pydicom",)),
])
def test_a_stage_does_not_load_what_it_must_not(module: str, forbidden: tuple[str, ...]) -> None:
    assert _loaded(module, forbidden) == []
