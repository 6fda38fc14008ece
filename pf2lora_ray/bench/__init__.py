"""Benchmarks: ``pf2lora bench NAME [--quick] [--out DIR]`` (BENCHMARKS.md has the results).

Each bench is a module with ``run(quick: bool, out: Path) -> list[dict]`` (rows
``{"variant", "metric", "value"}``), found by name in :data:`BENCHES`:

- ``overhead``: in-process vs Ray actors on the same workload; simulation
  efficiency = (client compute seconds / cores) / wall seconds of the rounds.
- ``scaling``: seconds per round and peak RSS against the number of clients.
- ``cost``: PF2LoRA (unrolled, first_order) vs HOMLoRA per local step
  (``model="smollm2"``: the causal-LM row, before/after target-only logits).
- ``flower``: the same FedAvg-LoRA workload on Flower's simulation engine and ours.
- ``partial``: static blocks vs balanced placement when only some clients train
  (efficiency, seconds per round, state moved, replay on 8/16/64 actors, Flower).
- ``storage``: seconds and bytes per round of results and checkpoints written to
  a local folder vs an S3 bucket (moto's server on 127.0.0.1), SST-2 job.
- ``cluster``: the README's cluster recipe (``ray start`` head + 2 workers, token
  auth, ``ray job submit`` of the wheel, results in S3), with a worker node killed.

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
    def run(quick: bool, out: Path, **options: Any) -> list[dict[str, Any]]:
        bench = importlib.import_module(f"pf2lora_ray.bench.{module}")
        return bench.run(quick=quick, out=out, **options)

    run.__name__ = f"{module}.run"
    return run


BENCHES: dict[str, Callable[..., list[dict[str, Any]]]] = {
    name: _lazy(name)
    for name in ("overhead", "scaling", "cost", "flower", "partial", "storage", "cluster")
}
# Options a bench takes besides quick/out (``pf2lora bench NAME --model M``,
# ``pf2lora bench scaling --eval-budget-s S``).
OPTIONS: dict[str, frozenset[str]] = {
    "cost": frozenset({"model"}),
    "scaling": frozenset({"eval_budget_s"}),
}


def run_bench(
    name: str, quick: bool = False, out: str | Path | None = None, **options: Any
) -> pd.DataFrame:
    """Run bench ``name``; write ``out/bench.parquet`` and print a Markdown table.

    Args:
        name: a key of :data:`BENCHES`.
        quick: the small variant (minutes, for CI-like budgets).
        out: output folder (default ``results/bench/<name>``); a bench may also
            write its runs, data and plots there.
        options: what the bench takes besides (:data:`OPTIONS`), e.g. ``model="smollm2"``
            for ``cost``; None values are left out.

    Returns:
        The long-format result table (bench, variant, metric, value, machine columns).

    Raises:
        UsageError: ``name`` is not a bench, or it takes no such option.
    """
    from pf2lora_ray.bench.common import finish, machine_info
    from pf2lora_ray.experiment import UsageError

    if name not in BENCHES:
        raise UsageError(f"bench {name!r}: unknown benchmark; choose one of {sorted(BENCHES)}")
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - OPTIONS.get(name, frozenset()))
    if unknown:
        raise UsageError(f"bench {name}: takes no --{unknown[0].replace('_', '-')} "
            f"(benches with options: {OPTIONS})")
    out = Path(out) if out is not None else Path("results") / "bench" / name
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    rows = BENCHES[name](quick=quick, out=out, **options)
    return finish(name, rows, out, info)
