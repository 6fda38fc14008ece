"""Which method, task and seed each run is, and the order methods are shown in.

A study folder holds one run per (method, task, seed). The method of a run is its
sweep label (runs.parquet ``variant``, else ``algorithm``) with the seed part
removed (:func:`method_label`), so ``pf2lora-s1`` (a ``seeds:`` job) and
``pf2lora-1`` (a ``sweep:`` mapping with a ``seed`` list) are both ``pf2lora``.
The task is ``data.task`` (GLUE) or ``data.name`` (synthetic, webnlg).

Every function is pure: DataFrames in, a DataFrame, list or str out.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from analysis.load import Results

# Row order of the tables: the paper's Table 1 order, then the other baselines.
METHOD_ORDER = (
    "centralized_lora",
    "homlora",
    "homlora_ft",
    "per_fedavg",
    "hetlora",
    "ffa_lora",
    "fedsa_lora",
    "local_lora",
    "pf2lora_first_order",
    "pf2lora",
)


def method_label(label: str, seed: int | None = None) -> str:
    """The method a run belongs to: its sweep label without the seed part.

    ``pf2lora-s1`` -> ``pf2lora`` (the ``seeds:`` job key's folders), and with
    ``seed`` known, the one ``-``-separated part equal to the seed (or ``s<seed>``)
    is removed, last occurrence first: ``pf2lora-1`` -> ``pf2lora`` (a ``sweep:``
    mapping ``{algorithm.name: [...], seed: [...]}``), ``1-pf2lora`` -> ``pf2lora``.
    A label that is only the seed is kept.
    """
    parts = label.split("-")
    if len(parts) < 2:
        return label
    wanted = {f"s{seed}", str(seed)} if seed is not None else set()
    for i in reversed(range(len(parts))):
        if parts[i] in wanted:
            return "-".join(parts[:i] + parts[i + 1 :])
    if re.fullmatch(r"s\d+", parts[-1]):
        return "-".join(parts[:-1])
    return label


def task_of(runs: pd.DataFrame) -> pd.Series:
    """Each run's task: ``data.task`` where set (GLUE), else ``data.name`` (synthetic, webnlg)."""
    task = runs["data.task"] if "data.task" in runs else pd.Series(None, index=runs.index)
    name = runs["data.name"] if "data.name" in runs else pd.Series("unknown", index=runs.index)
    return task.where(task.notna() & (task.astype(str) != ""), name).astype(str)


def run_methods(runs: pd.DataFrame, unique: bool = True) -> pd.DataFrame:
    """One row per run: run_id, method, algorithm, seed, task.

    Args:
        runs: The runs table (run_id, algorithm, seed, optional variant, data.task, data.name).
        unique: Check that no two runs share a (task, method, seed).

    Raises:
        ValueError: If ``unique`` and two runs of one (task, method) have the same
            seed, which means the method labels do not tell them apart.
    """
    label = runs["variant"] if "variant" in runs else pd.Series(None, index=runs.index)
    label = label.where(label.notna() & (label.astype(str) != ""), runs["algorithm"]).astype(str)
    table = pd.DataFrame(
        {
            "run_id": runs["run_id"].astype(str),
            "method": [
                method_label(text, None if pd.isna(seed) else int(seed))
                for text, seed in zip(label, runs["seed"], strict=True)
            ],
            "algorithm": runs["algorithm"].astype(str),
            "seed": runs["seed"].astype("Int64"),
            "task": task_of(runs),
        }
    )
    table = table.drop_duplicates("run_id")
    twice = table[table.duplicated(["task", "method", "seed"], keep=False)]
    if unique and not twice.empty:
        listed = twice.sort_values(["task", "method", "seed"])[["task", "method", "seed", "run_id"]]
        raise ValueError(
            "several runs share a (task, method, seed); give them distinct sweep labels:\n"
            + listed.to_string(index=False)
        )
    return table.reset_index(drop=True)


def has_seed_replicates(results: Results) -> bool:
    """Whether some (task, method) was run with two or more seeds."""
    if results.runs.empty:
        return False
    try:
        methods = run_methods(results.runs)
    except ValueError:
        return True  # let the study section report the clash
    return bool((methods.groupby(["task", "method"])["seed"].nunique() > 1).any())


def first_seed_runs(runs: pd.DataFrame) -> list[str]:
    """The run_id of each (task, method)'s lowest seed (whose rank heatmap a study report shows)."""
    methods = run_methods(runs, unique=False).sort_values(["task", "method", "seed"])
    return list(methods.drop_duplicates(["task", "method"])["run_id"])


def method_order(methods: list[str]) -> list[str]:
    """``methods`` in METHOD_ORDER; a variant follows the longest-listed name it starts with.

    ``pf2lora_lr3`` comes after ``pf2lora``; a method matching no name comes last;
    ties are broken by name.
    """

    def key(method: str) -> tuple[int, str]:
        exact = METHOD_ORDER.index(method) if method in METHOD_ORDER else None
        if exact is not None:
            return exact, method
        prefix = [i for i, name in enumerate(METHOD_ORDER) if method.startswith(name)]
        return (max(prefix) if prefix else len(METHOD_ORDER)), method

    return sorted(methods, key=key)


def sort_by_method(summary: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by task, then method in :func:`method_order`."""
    if summary.empty:
        return summary
    order = {method: i for i, method in enumerate(method_order(list(summary["method"].unique())))}
    rank = summary["method"].map(order)
    return (
        summary.assign(_rank=rank)
        .sort_values(["task", "_rank"])
        .drop(columns="_rank")
        .reset_index(drop=True)
    )
