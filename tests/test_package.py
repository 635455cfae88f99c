"""The package installs from a wheel and runs outside the checkout (configs shipped as package data)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with ichdet installed from a wheel built here; returns its python.

    The dependencies come from the running environment through a .pth file (no download, no torch
    reinstall); ichdet itself only from the wheel.
    """
    tmp = tmp_path_factory.mktemp("package")
    tree = tmp / "tree"  # build from a copy so build/ and *.egg-info never land in the checkout
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    for name in ("src", "configs"):
        shutil.copytree(ROOT / name, tree / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "dist"), str(tree)], check=True, capture_output=True)
    wheel = next((tmp / "dist").glob("ichdet-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "shared_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True)
    return python


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    return subprocess.run(args, cwd=cwd, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=300)


def test_installed_ichdet_is_the_wheel_and_finds_its_configs(installed: Path, tmp_path: Path) -> None:
    code = ("import ichdet, ichdet.demo; from ichdet.models.config import load_config; "
            "print(ichdet.__file__); print(ichdet.demo.CONFIG_DIR); "
            "print(load_config(ichdet.demo.CONFIG_DIR / 'demo.yaml').model.backbone)")
    result = _run([str(installed), "-c", code], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    module, configs, backbone = result.stdout.split()
    venv = installed.parents[1]
    assert Path(module).is_relative_to(venv) and Path(configs).is_relative_to(venv)
    assert sorted(p.name for p in Path(configs).iterdir()) == sorted(p.name for p in (ROOT / "configs").iterdir())
    assert backbone == "resnet10t"


@pytest.mark.parametrize("argv", [["-m", "ichdet", "demo", "--help"], ["SCRIPT", "demo", "--help"]])
def test_installed_demo_help_runs_outside_the_checkout(installed: Path, tmp_path: Path, argv: list[str]) -> None:
    args = [str(installed.parent / "ichdet"), *argv[1:]] if argv[0] == "SCRIPT" else [str(installed), *argv]
    result = _run(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "The whole pipeline on synthetic data" in result.stdout
