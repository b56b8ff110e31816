"""No import cycles in the package, the model or the benchmarks: each module's imports (at any
depth of the file, function-level ones included) form a graph without a cycle, so any module
can be read, imported and tested on its own terms."""
import ast
import os
import pathlib
from typing import Dict, List, Set

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Each folder and the package name it installs as (setup.cfg: benchmarks/ is kphi3_bench).
PACKAGES = {"kphi3_kernels": "kphi3_kernels", "kphi3_model": "kphi3_model",
            "benchmarks": "kphi3_bench"}


def module_names(folder: str, package: str) -> Dict[str, pathlib.Path]:
    names = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        parts = path.relative_to(ROOT / folder).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join((package, *parts))] = path
    return names


def imports_of(name: str, path: pathlib.Path, known: Set[str]) -> Set[str]:
    """The modules of ``known`` that ``name`` imports; ``from . import x`` of a name that is no
    module is an import of the package itself."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                child = f"{module}.{alias.name}"
                found.add(child if child in known else module)
    return {m for m in found if m in known and m != name}


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle of ``graph`` (a list of modules, the first repeated at the end), or []."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


@pytest.mark.parametrize("folder", PACKAGES)
def test_no_import_cycles(folder):
    modules = module_names(folder, PACKAGES[folder])
    known = set(modules)
    graph = {name: imports_of(name, path, known) for name, path in modules.items()}
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_the_stack_diagram_names_every_module_and_only_modules_that_exist():
    """docs/layers.md's "How the package is built" diagram matches the package's files."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "layers.md")) as f:
        text = f.read()
    section = text.split("## How the package is built", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"((?:ops/)?[a-z_]+\.py)", section))
    package = os.path.join(root, "kphi3_kernels")
    files = {name for name in os.listdir(package) if name.endswith(".py")}
    files |= {f"ops/{name}" for name in os.listdir(os.path.join(package, "ops"))
              if name.endswith(".py")}
    files -= {"__init__.py", "ops/__init__.py"}
    assert named - {"modeling_kphi3.py"} <= files, f"named but missing: {named - files}"
    assert files <= named, f"modules the diagram does not name: {files - named}"
