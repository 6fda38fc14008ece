"""Two-key sweeps: the metric and the personal level's gain over a grid of two config keys.

A sweep that varies two keys, for example ``pf2lora.lr_lower`` x ``fed.rounds``, is
read as a grid: each cell holds the runs with that pair of values (one per seed),
reduced as the study reduces them (:func:`analysis.study.per_run_summary`: the
clients' mean at the last evaluation), then averaged over seeds with a Student-t
interval. Two quantities are shown: the metric itself and the personal level's
gain, metric minus ``<metric>.shared_only`` (NaN for methods without one).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.load import Results
from analysis.stats import t_interval
from analysis.study import per_run_summary
from analysis.study_report import format_cell
from analysis.tables import to_markdown

# runs.parquet columns that are not config keys, or vary with every run by design.
_NOT_KEYS = {"run_id", "algorithm", "variant", "seed", "status", "wall_s", "config_hash"}
QUANTITIES = {"mean": "metric", "personal_gain": "personal level's gain"}


def varying_keys(runs: pd.DataFrame) -> list[str]:
    """The config keys (dotted columns of runs.parquet) whose value differs between runs.

    The seed, the run's bookkeeping and the data check's measurements
    (``data_check.*``) are not keys of a sweep.
    """
    keys = []
    for column in runs.columns:
        if column in _NOT_KEYS or "." not in column or column.startswith("data_check."):
            continue
        if runs[column].astype(str).nunique() > 1:
            keys.append(column)
    return sorted(keys)


def sweep_cells(results: Results, keys: list[str], split: str = "test") -> pd.DataFrame:
    """One row per pair of values of ``keys``: each quantity's mean and half-width over seeds.

    Returns:
        The two key columns, ``metric``, ``n_seeds``, and ``<q>`` / ``<q>_hw`` for
        ``q`` in ``mean`` and ``personal_gain``.
    """
    per_run = per_run_summary(results, split)
    values = results.runs.set_index("run_id")[keys]
    per_run = per_run.join(values, on="run_id")
    records = []
    for pair, group in per_run.groupby(keys, sort=True):
        record = dict(zip(keys, pair, strict=True))
        record["metric"] = group["metric"].iloc[0]
        record["n_seeds"] = group["seed"].nunique()
        for quantity in QUANTITIES:
            interval = t_interval(group[quantity])
            record[quantity], record[f"{quantity}_hw"] = interval.mean, interval.half_width
        records.append(record)
    return pd.DataFrame(records)


def sweep_table(cells: pd.DataFrame, keys: list[str], quantity: str) -> pd.DataFrame:
    """``quantity`` as a grid: rows the first key, columns the second, cells ``mean ± hw``."""
    shown = cells.assign(
        cell=[
            format_cell(m, hw, metric)
            for m, hw, metric in zip(
                cells[quantity], cells[f"{quantity}_hw"], cells["metric"], strict=True
            )
        ]
    )
    table = shown.pivot(index=keys[0], columns=keys[1], values="cell").fillna("")
    table.columns = [f"{keys[1]}={value}" for value in table.columns]
    return table


def sweep_markdown(cells: pd.DataFrame, keys: list[str]) -> list[str]:
    """The report's sweep section: one grid per quantity that some cell has."""
    metric = cells["metric"].iloc[0]
    seeds = int(cells["n_seeds"].max())
    lines = [
        f"## Sweep: {keys[0]} x {keys[1]}",
        "",
        f"Each cell: the clients' mean {metric} at the last evaluation, "
        + (
            f"mean over {seeds} seeds ± the half-width of a 95% Student-t interval."
            if seeds > 1
            else "one seed (no interval)."
        ),
        "",
    ]
    for quantity, title in QUANTITIES.items():
        if cells[quantity].notna().any():
            grid = sweep_table(cells, keys, quantity)
            lines += [f"### {title} ({metric})", "", to_markdown(grid)]
    return lines


def plot_sweep_heatmaps(cells: pd.DataFrame, keys: list[str]) -> Figure:
    """One heatmap per quantity present: rows the first key, columns the second, annotated."""
    shown = [q for q in QUANTITIES if cells[q].notna().any()]
    figure = Figure(figsize=(5.5 * len(shown), 4.2), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(shown)))
    rows = sorted(cells[keys[0]].unique())
    columns = sorted(cells[keys[1]].unique())
    metric = cells["metric"].iloc[0]
    for ax, quantity in zip(axes, shown, strict=True):
        grid = np.full((len(rows), len(columns)), np.nan)
        labels = [["" for _ in columns] for _ in rows]
        for row, column, mean, hw in zip(
            cells[keys[0]], cells[keys[1]], cells[quantity], cells[f"{quantity}_hw"], strict=True
        ):
            i, j = rows.index(row), columns.index(column)
            grid[i, j] = mean
            labels[i][j] = format_cell(mean, hw, metric).replace(" ± ", "\n± ")
        cmap = "RdBu" if quantity == "personal_gain" else "viridis"
        limit = np.nanmax(np.abs(grid)) if quantity == "personal_gain" else None
        image = ax.imshow(
            grid, cmap=cmap, aspect="auto",
            vmin=-limit if limit else None, vmax=limit if limit else None,
        )
        for i in range(len(rows)):
            for j in range(len(columns)):
                ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(columns)), [str(c) for c in columns])
        ax.set_yticks(range(len(rows)), [str(r) for r in rows])
        ax.set_xlabel(keys[1])
        ax.set_ylabel(keys[0])
        ax.set_title(f"{QUANTITIES[quantity]} ({metric})")
        figure.colorbar(image, ax=ax)
    return figure
