"""The README as a newcomer reads it: every command and option it shows exists, every command is shown,
its links resolve, and nothing points outside the repository."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from ichdet import __version__
from ichdet.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
#: ``ichdet <command> [<subcommand>]`` and the rest of the line, wherever the README shows a command.
COMMAND_LINE = re.compile(r"ichdet ((?:seq )?[a-z][a-z-]*)([^`\n]*)")


def _commands() -> dict[str, Any]:
    """Every command of the CLI by its full name (``seq train`` for a subcommand)."""
    root: Any = typer.main.get_command(app)  # typer's own click: a group is what has commands
    found: dict[str, Any] = {}
    for name, cmd in root.commands.items():
        if hasattr(cmd, "commands"):
            found.update({f"{name} {sub}": subcmd for sub, subcmd in cmd.commands.items()})
        else:
            found[name] = cmd
    return found


def _help(command: str) -> str:
    result = CliRunner().invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def _shown() -> dict[str, set[str]]:
    """Command -> the options the README shows with it."""
    shown: dict[str, set[str]] = {}
    for match in COMMAND_LINE.finditer(README):
        command, rest = match.group(1), match.group(2)
        if command in _commands():
            shown.setdefault(command, set()).update(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest))
    return shown


def test_every_command_is_in_the_readme() -> None:
    assert sorted(set(_commands()) - set(_shown())) == []


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_option_the_readme_shows_is_in_the_help(command: str) -> None:
    text = _help(command)
    missing = sorted(o for o in _shown().get(command, set()) if not re.search(rf"(?<![\w-]){o}(?![\w-])", text))
    assert missing == [], f"README shows ichdet {command} {missing}, its --help does not"


@pytest.mark.parametrize("command", ["", *sorted(_commands())])
def test_no_bool_placeholder_after_a_flag(command: str) -> None:
    assert "<bool>" not in _help(command)


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert (result.exit_code, result.output) == (0, f"ichdet {__version__}\n")


def test_no_path_outside_the_repository() -> None:
    assert "../" not in README


@pytest.mark.parametrize("link", sorted(set(re.findall(r"\]\(((?!https?:)[^)#]+)\)", README))))
def test_every_link_resolves(link: str) -> None:
    assert (ROOT / link).exists(), link


def test_intended_use_is_in_the_first_screen() -> None:
    first = "\n".join(README.splitlines()[:25])
    assert "Not for diagnostic use" in first and "No trained weights ship" in first
