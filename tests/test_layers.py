"""The package's layers, read from its source: what each subpackage may import, and no cycle.

Every import statement counts, including those inside functions (a lazy import is still a
dependency); relative imports are resolved to the module they name.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ultralytics_dp"
# subpackage -> top-level names (of the package's own, or third-party) it must never import
FORBIDDEN = {
    "mechanism": {"ultralytics", "ultralytics_dp.accounting", "ultralytics_dp.losses", "ultralytics_dp.integration",
                  "ultralytics_dp.datasets", "ultralytics_dp.tools", "ultralytics_dp.cli"},
    "accounting": {"torch", "torchvision", "ultralytics", "ultralytics_dp.mechanism", "ultralytics_dp.losses",
                   "ultralytics_dp.integration", "ultralytics_dp.datasets", "ultralytics_dp.tools", "ultralytics_dp.cli"},
    "losses": {"ultralytics_dp.integration", "ultralytics_dp.accounting", "ultralytics_dp.datasets",
               "ultralytics_dp.tools", "ultralytics_dp.cli"},
    "auditing.bound": {"torch", "ultralytics", "ultralytics_dp.mechanism", "ultralytics_dp.losses",
                    "ultralytics_dp.integration", "ultralytics_dp.datasets", "ultralytics_dp.tools", "ultralytics_dp.cli"},
    "auditing": {"ultralytics_dp.tools", "ultralytics_dp.cli"},
    "datasets": {"ultralytics_dp.mechanism", "ultralytics_dp.accounting", "ultralytics_dp.losses",
                 "ultralytics_dp.integration", "ultralytics_dp.tools", "ultralytics_dp.cli"},
}
STDLIB_ONLY = ("ultralytics_dp", "ultralytics_dp.integration", "ultralytics_dp.version", "ultralytics_dp.checks", "ultralytics_dp.config",
               "ultralytics_dp.integration.plugin", "ultralytics_dp.integration.keys", "ultralytics_dp.integration.explicit",
               "ultralytics_dp.integration.hooks")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute dotted names; ``from p import m`` counts p.m if m is a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            out.add(base)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                if (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists() or \
                        (PACKAGE.parent / candidate.replace(".", "/") / "__init__.py").exists():
                    out.add(candidate)
    return out


GRAPH = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _matches(module: str, names: set[str]) -> str | None:
    return next((n for n in names if module == n or module.startswith(n + ".")), None)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_only_what_it_may(layer):
    broken = [(m, i) for m, imports in GRAPH.items() if m.startswith(f"ultralytics_dp.{layer}")
              for i in imports if _matches(i, FORBIDDEN[layer])]
    assert not broken, broken


def test_the_rules_see_imports_inside_functions():
    # sanity check of the reader: the plugin imports the adapter lazily, inside a function
    assert "ultralytics_dp.integration.adapter" in GRAPH["ultralytics_dp.integration.plugin"]
    assert _matches("ultralytics.nn.tasks", {"ultralytics"}) and "ultralytics.nn.tasks" in GRAPH[
        "ultralytics_dp.losses.per_image"]


def test_the_package_has_no_import_cycle():
    # importing a module imports its parent packages first anyway: edges to them are not cycles of ours
    own = {m: {i for i in imports if i in GRAPH and not m.startswith(i + ".") and i != m}
           for m, imports in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(own[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(own):
        if m not in state:
            visit(m)


def test_the_start_up_file_loads_only_the_standard_library():
    code = ("import sys, ultralytics_dp\n"
            "own = {m for m in sys.modules if m.split('.')[0] not in sys.stdlib_module_names}\n"
            "print(sorted(m for m in own if not m.startswith('ultralytics_dp') and not m.startswith('_')))\n"
            "print(sorted(m for m in sys.modules if m.startswith('ultralytics_dp.')))")
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert lines[0] == "[]"
    assert set(eval(lines[1])) <= set(STDLIB_ONLY)
