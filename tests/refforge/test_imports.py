"""The project's import graph: no cycle among its modules, no project import hidden in a function."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
FOLDERS = {"refforge": "refforge", "flows": "refforge.flows", "stages": "refforge.stages",
           "schemas": "refforge.schemas", "storage": "refforge.storage", "prompts": "refforge.prompts",
           "configs": "refforge.configs"}

# Function-local imports of project modules that stay, and why: each one loads Prefect (~2 s), which
# `refforge --help` and `import refforge` must not pay for.
ALLOWED_LOCAL = {
    ("refforge", "refforge.flows.build"),
    ("refforge.commands.build", "refforge.flows.build"),
    ("refforge.commands.review", "refforge.flows.review"),  # Prefect loads only for the commands that need it
    ("refforge.commands.serve", "refforge.flows.serve"),
    ("refforge.commands.serve", "refforge.flows.export"),
    ("refforge.testing", "refforge.testing.openai_server"),  # `python -m` runs it as a script too
}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for p in (ROOT / folder).rglob("*.py"):
            rel = p.relative_to(ROOT / folder).with_suffix("")
            parts = [x for x in rel.parts if x != "__init__"]
            out[".".join([package, *parts])] = p
    return out


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom | ast.Import) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for _ in range(node.level - 1):
            pkg = pkg.rsplit(".", 1)[0]
        base = f"{pkg}.{base}" if base else pkg
    names = [f"{base}.{a.name}" for a in node.names]
    return [n for n in names if n in MODULES] or [base]


def _imports(module: str, path: Path) -> tuple[set[str], set[str]]:
    """(module-level project imports, function-local project imports); TYPE_CHECKING blocks excluded."""
    tree = ast.parse(path.read_text())
    top, local = set(), set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                for name in _resolve(module, path, child):
                    target = next((m for m in (name, name.rsplit(".", 1)[0]) if m in MODULES), None)
                    if target and target != module:
                        (local if in_function else top).add(target)
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(tree, False)
    return top, local


def test_the_module_map_sees_the_layout():
    assert {"refforge.config", "refforge.flows.registry", "refforge.stages.paths", "refforge.stages.paths.search",
            "refforge.pipeline.stage", "refforge.storage.build"} <= set(MODULES)


def test_no_project_import_inside_a_function():
    found = {(m, t) for m, p in MODULES.items() for t in _imports(m, p)[1]}
    assert found - ALLOWED_LOCAL == set()


def test_no_import_cycle_among_project_modules():
    graph: dict[str, set[str]] = {}
    for m, p in MODULES.items():
        edges = set()
        for t in _imports(m, p)[0]:
            edges.add(t)
            # importing a.b.c runs a.b's __init__ first (unless it is the importer's own package)
            parent = t.rsplit(".", 1)[0]
            if parent in MODULES and not m.startswith(parent + ".") and parent != m:
                edges.add(parent)
        graph[m] = edges
    # Tarjan's strongly connected components: any component of more than one module is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    assert cycles == []


def test_the_checks_can_fail(tmp_path):
    """The cycle and local-import detectors find planted ones."""
    pkg = tmp_path / "m.py"
    pkg.write_text("def f():\n    from refforge.stages.scene import keys\n")
    MODULES["refforge.planted"] = pkg
    try:
        assert _imports("refforge.planted", pkg)[1] == {"refforge.stages.scene.keys"}
    finally:
        del MODULES["refforge.planted"]
