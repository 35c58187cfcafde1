"""The package's shape, checked from the source: data flows one way (DESIGN.md), no module imports one
that imports it back, and nothing keeps state in a module-level variable."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "peftkit"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every peftkit module `path` imports, at the top or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("peftkit"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not module.startswith("peftkit"):
                continue
            for alias in node.names:  # `from . import x` may name a module
                candidate = f"{module}.{alias.name}"
                found.add(candidate if candidate in MODULES else module)
    return found - {name}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports(path) for name, path in MODULES.items()}


def test_the_core_depends_on_no_method_trainer_command_line_or_package_root():
    allowed = ("peftkit.core", "peftkit.errors", "peftkit.version")
    bad = {name: sorted(d for d in deps if not d.startswith(allowed))
           for name, deps in GRAPH.items() if name.startswith("peftkit.core")}
    assert not {k: v for k, v in bad.items() if v}


@pytest.mark.parametrize("layer,forbidden", [
    ("peftkit.methods", ("peftkit.train", "peftkit.cli", "peftkit.bench")),
    ("peftkit.quant", ("peftkit.methods", "peftkit.train", "peftkit.cli")),
    ("peftkit.prune", ("peftkit.methods", "peftkit.train", "peftkit.cli")),
    ("peftkit.train", ("peftkit.cli",)),
])
def test_layers_import_downwards_only(layer, forbidden):
    bad = {name: sorted(d for d in deps if d.startswith(forbidden) or d == "peftkit")
           for name, deps in GRAPH.items() if name.startswith(layer)}
    assert not {k: v for k, v in bad.items() if v}


def test_no_import_cycles():
    """Depth-first search over module imports (lazy imports included); a package's __init__ counts as
    the package, so `import peftkit.core.files` and `from .files import x` are the same node."""
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(GRAPH.get(node, ())):
            if dep not in GRAPH:
                continue
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for name in sorted(n for n in GRAPH if n != "peftkit"):  # the root re-exports the API on purpose
        if name not in state:
            visit(name, [name])
    assert not [c for c in cycles if "peftkit" not in c], cycles


MUTATORS = {"append", "extend", "insert", "remove", "pop", "clear", "update", "setdefault", "add", "discard",
            "popitem"}
REGISTRIES = {"peftkit.core.registry._METHODS"}  # name -> method, filled once as methods are imported


def test_no_module_keeps_mutable_state_in_a_global():
    """A module-level list, dict or set that the module's code changes would be state shared by every
    model in the process (as a call registry once was); only the method registry may be one."""
    found = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        containers = set()
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            value = getattr(node, "value", None)
            if isinstance(value, ast.List | ast.Dict | ast.Set) or (
                    isinstance(value, ast.Call) and getattr(value.func, "id", "") in ("list", "dict", "set")):
                containers.update(t.id for t in targets if isinstance(t, ast.Name))
        for node in ast.walk(tree):
            changed = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
                changed = node.func.value
            elif isinstance(node, ast.Assign | ast.AugAssign | ast.Delete):
                for target in getattr(node, "targets", None) or [node.target]:
                    if isinstance(target, ast.Subscript):
                        changed = target.value
            if isinstance(changed, ast.Name) and changed.id in containers and f"{name}.{changed.id}" not in REGISTRIES:
                found.append(f"{name}.{changed.id}")
    assert not found
