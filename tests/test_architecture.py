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


LOADS: list[tuple[str, tuple[str, ...]]] = [
    ("ichdet.infer", ("ichdet.train", "pydicom")),  # its face loads bundle, members, passes, predict
    ("ichdet.study", ("ichdet.train",)),
    ("ichdet.serve", ("ichdet.train", "torch")),  # the node loads torch only when it analyses
    ("ichdet.dicom", ("torch", "pydicom")),        # windowing at once, the reader on first use
    ("ichdet.cache", ("torch", "pydicom")),
    ("ichdet.evaluate", ("torch",)),
    ("ichdet.models", ("ichdet.train", "pydicom")),  # its face loads engine, inputs, rundir, sequence
    ("ichdet.train", ("pydicom",)),
]


@pytest.fixture(scope="module")
def loaded() -> dict[str, list[str]]:
    """Module -> every module a fresh process holds after importing it (the processes run side by side)."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    code = "import json, sys, {}; print(json.dumps(sorted(sys.modules)))"
    procs = {m: subprocess.Popen([sys.executable, "-c", code.format(m)], env=env, stdout=subprocess.PIPE, text=True)
             for m, _ in LOADS}
    return {m: json.loads(p.communicate()[0]) for m, p in procs.items()}


@pytest.mark.parametrize(("module", "forbidden"), LOADS)
def test_a_stage_does_not_load_what_it_must_not(loaded: dict[str, list[str]], module: str,
                                                forbidden: tuple[str, ...]) -> None:
    assert [m for m in loaded[module] if m.startswith(forbidden)] == []


def test_test_modules_have_unique_names() -> None:
    """pytest imports test modules by basename (no packages under tests/): two of one name cannot both run."""
    names = [p.name for p in (SRC.parent / "tests").rglob("*.py") if p.name != "conftest.py"]
    assert sorted({n for n in names if names.count(n) > 1}) == []
