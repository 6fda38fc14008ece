"""Import structure: the config is a leaf, and no two modules import each other.

The cycle check draws the graph of every import statement in ``pf2lora_ray/`` and
``analysis/``: at module level, inside functions and under ``if TYPE_CHECKING:``.
An import moved into a function, or kept for type checkers only, hides a circle
from Python at import time but not from a reader: the two modules still need
each other.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "transformers", "pf2lora_ray.algorithms", "pf2lora_ray.tasks")


def test_building_a_config_imports_nothing_heavy():
    code = (
        "import sys, json\n"
        "from pf2lora_ray.config import load_config, expand_job, read_yaml\n"
        "load_config('jobs/synthetic_rank.yaml', ['algorithm.name=homlora'])\n"
        "expand_job(read_yaml('jobs/compare_synthetic.yaml'))\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = json.loads(out.stdout)
    heavy = [m for m in loaded if m.startswith(HEAVY)]
    assert heavy == [], f"importing pf2lora_ray.config imported {heavy[:5]}"


def _modules(root: Path, package: str) -> dict[str, Path]:
    mods = {}
    for f in sorted((root / package).rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _imports(file: Path, name: str, known: dict[str, Path]) -> set[str]:
    """Modules of ``known`` that ``file`` imports: at module level, in functions, TYPE_CHECKING."""
    found: set[str] = set()
    is_package = file.name == "__init__.py"
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_package else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, base] if base else pkg)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    return {m for m in found if m in known and m != name}


def import_cycles(root: Path, packages: tuple[str, ...]) -> list[list[str]]:
    """Cycles in the graph of imports between the modules of ``packages`` (one graph for all)."""
    mods = {m: f for package in packages for m, f in _modules(root, package).items()}
    graph = {m: sorted(_imports(f, m, mods)) for m, f in mods.items()}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []
    cycles: list[list[str]] = []

    def dfs(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in graph[u]:
            if state.get(v) == 1:
                cycles.append([*stack[stack.index(v) :], v])
            elif v not in state:
                dfs(v)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)
    return cycles


def test_the_package_and_analysis_have_no_import_cycle():
    assert import_cycles(ROOT, ("pf2lora_ray", "analysis")) == []


@pytest.mark.parametrize(
    "b_imports_a",
    [
        "from . import a\n",  # at module level
        "def f():\n    from pkg import a\n",  # inside a function
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import X\n",
    ],
)
def test_the_cycle_check_finds_a_cycle_however_it_is_imported(tmp_path, b_imports_a):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\nX = 1\n")
    (pkg / "b.py").write_text(b_imports_a)
    (pkg / "c.py").write_text("from pkg import a, b\n")  # imports both, part of no cycle
    assert import_cycles(tmp_path, ("pkg",)) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_the_cycle_check_finds_a_cycle_across_packages(tmp_path):
    for package, other in (("one", "two"), ("two", "one")):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / "m.py").write_text(f"import {other}.m\n")
    assert import_cycles(tmp_path, ("one", "two")) == [["one.m", "two.m", "one.m"]]
    assert import_cycles(tmp_path, ("one",)) == []
