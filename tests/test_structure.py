"""The package's shape: commands are leaves, each declares its parser, the CLI lists them all."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import calm_lightning.commands as commands_pkg
from calm_lightning.commands import COMMANDS

SRC = Path(__file__).resolve().parents[1] / "src" / "calm_lightning"


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):  # function-level (lazy) imports count too
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_no_command_imports_another_command():
    files = sorted((SRC / "commands").glob("*.py"))
    assert len(files) > 5
    for path in files:
        if path.name == "__init__.py":
            continue
        bad = sorted(m for m in _imported_modules(path) if m.startswith("calm_lightning.commands."))
        assert not bad, f"{path.name} imports {bad}"


def test_library_modules_never_import_commands_or_the_cli():
    for path in SRC.rglob("*.py"):
        if "commands" in path.parts or path.name in ("cli.py", "__main__.py"):
            continue
        bad = sorted(m for m in _imported_modules(path) if m.startswith(("calm_lightning.commands", "calm_lightning.cli")))
        assert not bad, f"{path.relative_to(SRC)} imports {bad}"


def test_every_command_module_is_listed_and_declares_its_parser():
    found = {m.name for m in pkgutil.iter_modules(commands_pkg.__path__)}
    assert found == set(COMMANDS)
    for name in COMMANDS:
        module = importlib.import_module(f"calm_lightning.commands.{name}")
        assert isinstance(module.NAME, str) and module.HELP and callable(module.add_arguments)
        assert callable(module.run) and module.__doc__


def test_no_source_file_over_400_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these modules: {long}"
