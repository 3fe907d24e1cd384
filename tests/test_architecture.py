"""The shape of the house (docs/ARCHITECTURE.md), checked from the source: which sub-package
may import which, that PySyncObj stays behind ``synapse/cluster/``, and that loading the
settings or the CLI does not load (and patch) PySyncObj."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "synapse"
# PySyncObj's names, which nothing outside synapse/cluster/ may use (as words: prose may
# still say "PySyncObj").
PYSYNCOBJ_NAMES = re.compile(r"\b(SyncObj|addNodeToCluster|removeNodeFromCluster|transferLeadership|"
                             r"forceLogCompaction)\b|_SyncObj__")


def _part(module: str) -> str:
    """The part of synapse a module belongs to: its sub-package, or the top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every synapse module ``path`` imports, type-only imports included."""
    return {m for m in _all_imports(path) if m == "synapse" or m.startswith("synapse.")}


def _all_imports(path: Path) -> set[str]:
    """Every module ``path`` imports (and each name imported from one, as module.name)."""
    tree = ast.parse(path.read_text(), str(path))
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    """part -> the other parts it imports."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        src = _part(_module_name(path))
        for target in _imports(path):
            if target in ("synapse", "synapse._core"):
                continue
            dst = _part(target)
            if dst != src and ((PACKAGE / dst).is_dir() or (PACKAGE / f"{dst}.py").exists()):
                graph.setdefault(src, set()).add(dst)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycle_between_parts():
    cycle = _cycle(_graph())
    assert cycle is None, f"import cycle between parts of synapse: {' -> '.join(cycle)}"


def test_only_the_cli_and_the_package_import_the_node():
    importers = sorted(_module_name(p) for p in PACKAGE.rglob("*.py") if "synapse.node" in _imports(p))
    assert set(importers) <= {"synapse", "synapse.cli.main"}, importers


def test_pysyncobj_stays_inside_cluster():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.is_relative_to(PACKAGE / "cluster"):
            continue
        where = path.relative_to(PACKAGE.parent)
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if (found := PYSYNCOBJ_NAMES.search(line)):
                offenders.append(f"{where}:{n}: {found.group(0)}")
        if any(m == "pysyncobj" or m.startswith("pysyncobj.") for m in _all_imports(path)):
            offenders.append(f"{where}: imports pysyncobj")
    assert not offenders, offenders


def test_loading_the_settings_and_the_cli_does_not_load_pysyncobj():
    code = "import synapse.config, synapse.cli.main, sys; assert 'pysyncobj' not in sys.modules, 'loaded'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
