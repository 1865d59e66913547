"""The package's layers, read from the source: every import statement, lazy ones inside functions too.

- The runtime (what a device team embeds) imports nothing above it: not export, calibration, serve or the command
  line. One marked exception: runtime/cli.py, the old name of the command line, imports omniguard_edge.cli.
- No import circle between the package's modules.
- One spelling: inside the package, modules import each other relatively (it resolves both from the source tree,
  through the package-dir mapping, and installed). One exception: serve/triton_model.py is copied into a Triton
  model repository as model.py, where it is no module of the package and imports it by its name.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"omniguard_edge": "omniguard_edge", "omniguard_edge.runtime": "runtime", "omniguard_edge.export": "export",
            "omniguard_edge.calibration": "calibration", "omniguard_edge.serve": "serve"}  # pyproject's package-dir
ABOVE_RUNTIME = ("omniguard_edge.export", "omniguard_edge.calibration", "omniguard_edge.serve", "omniguard_edge.cli")
SHIM = ("omniguard_edge.runtime.cli", "omniguard_edge.cli")
COPIED_OUT = "omniguard_edge.serve.triton_model"


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            if package == "omniguard_edge" and len(rel) > 1:
                continue
            name = ".".join((package, *rel))
            out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(absolute module imported, line, written relatively) for every import statement of a module."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, False) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[: len(here) - node.level + 1]) if node.level else ""
            target = ".".join(p for p in (base, node.module or "") if p)
            for a in node.names:  # `from . import x` imports the module x when there is one
                sub = f"{target}.{a.name}"
                out.append((sub if sub in MODULES else target, node.lineno, node.level > 0))
    return [(m, line, rel) for m, line, rel in out if m.split(".")[0] == "omniguard_edge"]


def test_the_module_list_is_the_package():
    assert "omniguard_edge.runtime.guard" in MODULES and "omniguard_edge.cli" in MODULES
    assert len(MODULES) > 80


def test_the_runtime_imports_nothing_above_it():
    bad = [f"{name}:{line} imports {target}" for name, path in MODULES.items() if name.startswith("omniguard_edge.runtime")
           for target, line, _ in _imports(name, path)
           if target.startswith(ABOVE_RUNTIME) and (name, target) != SHIM]
    assert bad == []


def test_no_import_circle():
    graph = {name: {t for t, _, _ in _imports(name, path) if t in MODULES and t != name} for name, path in MODULES.items()}
    # a package's __init__ importing its own modules is how packages work: leave those edges out
    graph = {n: {t for t in ts if not (MODULES[n].name == "__init__.py" and t.startswith(n + "."))} for n, ts in graph.items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert cycles == []


def test_one_import_spelling_inside_the_package():
    absolute = [f"{name}:{line} imports {target}" for name, path in MODULES.items()
                for target, line, relative in _imports(name, path) if not relative and name != COPIED_OUT]
    assert absolute == []
