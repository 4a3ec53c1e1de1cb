"""The CLI's layout: refforge.cli only assembles the app; each command imports the leaf UI module, never
refforge.cli; `refforge --help` does not load Prefect."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import refforge.commands

COMMANDS = Path(refforge.commands.__file__).parent


def test_importing_the_cli_does_not_import_prefect():
    code = ("import json, sys; import refforge.cli; "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports, anywhere in it (relative imports resolved)."""
    package = "refforge.commands"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return names


def test_no_command_module_imports_the_cli():
    modules = sorted(COMMANDS.glob("*.py"))
    assert {p.stem for p in modules} >= {"_ui", "build", "evaluate", "export", "report"}
    for path in modules:
        imported = _imported_modules(path)
        assert not {n for n in imported if n == "refforge.cli" or n.startswith("refforge.cli.")}, path.name


def test_the_ui_module_is_a_leaf():
    assert not {n for n in _imported_modules(COMMANDS / "_ui.py") if n.startswith("refforge")}
