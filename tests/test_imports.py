"""Import structure: the config is a leaf, and no module imports itself back at import time."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

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


def _top_level_imports(file: Path, name: str, known: dict[str, Path]) -> set[str]:
    """Modules of ``known`` that ``file`` imports when it is imported (not inside functions).

    ``if TYPE_CHECKING:`` blocks are skipped: they never run.
    """
    found: set[str] = set()
    is_package = file.name == "__init__.py"

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                visit(getattr(node, "body", []))
                visit(getattr(node, "orelse", []))
                visit(getattr(node, "finalbody", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.Import):
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

    visit(ast.parse(file.read_text()).body)
    return {m for m in found if m in known and m != name}


def import_cycles(root: Path, package: str) -> list[list[str]]:
    """Cycles in the graph of module-level imports between ``package``'s modules."""
    mods = _modules(root, package)
    graph = {m: sorted(_top_level_imports(f, m, mods)) for m, f in mods.items()}
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


def test_the_package_has_no_import_cycle():
    assert import_cycles(ROOT, "pf2lora_ray") == []


def test_the_cycle_check_finds_a_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\n"
        "from . import a\n"
    )
    (pkg / "c.py").write_text("def f():\n    from pkg import a\n")  # lazy: not a cycle
    assert import_cycles(tmp_path, "pkg") == [["pkg.a", "pkg.b", "pkg.a"]]
