"""Benchmarks: ``pf2lora bench NAME [--quick] [--out DIR]`` (BENCHMARKS.md has the results).

Each bench is a module with ``run(quick: bool, out: Path) -> list[dict]`` (rows
``{"variant", "metric", "value"}``), found by name in :data:`BENCHES`:

- ``overhead``: in-process vs Ray actors on the same workload; simulation
  efficiency = (client compute seconds / cores) / wall seconds of the rounds.
- ``scaling``: seconds per round and peak RSS against the number of clients.
- ``cost``: PF2LoRA (unrolled, first_order) vs HOMLoRA per local step.
- ``flower``: the same FedAvg-LoRA workload on Flower's simulation engine and ours.
- ``partial``: static blocks vs balanced placement when only some clients train
  (efficiency, seconds per round, state moved, replay on 8/16/64 actors, Flower).

Modules are imported on use: ``flower_app`` runs inside Flower's own virtual
environment and must not pull in what only the other benches need.

Example::

    from pf2lora_ray.bench import run_bench
    df = run_bench("overhead", quick=True)   # also writes results/bench/overhead/
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd


def _lazy(module: str) -> Callable[..., list[dict[str, Any]]]:
    def run(quick: bool, out: Path) -> list[dict[str, Any]]:
        return importlib.import_module(f"pf2lora_ray.bench.{module}").run(quick=quick, out=out)

    run.__name__ = f"{module}.run"
    return run


BENCHES: dict[str, Callable[..., list[dict[str, Any]]]] = {
    name: _lazy(name) for name in ("overhead", "scaling", "cost", "flower", "partial")
}


def run_bench(name: str, quick: bool = False, out: str | Path | None = None) -> pd.DataFrame:
    """Run bench ``name``; write ``out/bench.parquet`` and print a Markdown table.

    Args:
        name: a key of :data:`BENCHES`.
        quick: the small variant (minutes, for CI-like budgets).
        out: output folder (default ``results/bench/<name>``); a bench may also
            write its runs, data and plots there.

    Returns:
        The long-format result table (bench, variant, metric, value, machine columns).

    Raises:
        UsageError: ``name`` is not a bench.
    """
    from pf2lora_ray.bench.common import finish, machine_info
    from pf2lora_ray.experiment import UsageError

    if name not in BENCHES:
        raise UsageError(f"bench {name!r}: unknown benchmark; choose one of {sorted(BENCHES)}")
    out = Path(out) if out is not None else Path("results") / "bench" / name
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    rows = BENCHES[name](quick=quick, out=out)
    return finish(name, rows, out, info)
