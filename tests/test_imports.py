"""The import graph, read from the source (AST, function-local imports included): one direction of flow.

No import cycles; ``dashboard/`` never imports torch (it does no tensor maths) and ``model/`` never
imports gradio; no module imports another module's ``_private`` names.
"""
from __future__ import annotations

import ast
from pathlib import Path

from model.paths import REPO_ROOT

PACKAGES = ("model", "dashboard")


def project_modules() -> dict[str, Path]:
    """Dotted name -> file, for the packages and app.py."""
    modules = {"app": REPO_ROOT / "app.py"}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path) -> list[tuple[str, str | None]]:
    """``(imported module, imported name or None)`` for every import statement anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found += [(module, alias.name) for alias in node.names]
    return found


def graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    modules = project_modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for module, imported in imports_of(name, path):
            target = f"{module}.{imported}" if f"{module}.{imported}" in modules else module
            if target in modules and target != name:
                edges[name].add(target)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_dashboard_does_no_tensor_maths_and_the_model_package_has_no_ui():
    bad = []
    for name, path in project_modules().items():
        roots = {module.split(".")[0] for module, _ in imports_of(name, path)}
        if name.startswith("dashboard") and roots & {"torch", "numpy"}:
            bad.append(f"{name} imports {sorted(roots & {'torch', 'numpy'})}")
        if name.startswith("model") and "gradio" in roots:
            bad.append(f"{name} imports gradio")
    assert not bad, bad


def test_no_module_imports_private_names_of_another():
    modules = project_modules()
    bad = [f"{name} imports {imported} from {module}"
           for name, path in modules.items() for module, imported in imports_of(name, path)
           if imported and imported.startswith("_") and not imported.startswith("__")
           and module in modules and module != name]
    assert not bad, bad
