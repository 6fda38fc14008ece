"""Figures built from results DataFrames.

Figures are created as ``matplotlib.figure.Figure`` objects rather than through
pyplot, so nothing is kept in pyplot's global figure list; callers save them
with ``fig.savefig``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import matplotlib

# Reports are written on headless machines (CI, cluster nodes) with no display.
matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from analysis.tables import config_columns, rank_table, trials_last_round  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def plot_metric_vs_round(
    metrics: pd.DataFrame,
    metric: str,
    split: str = "test",
    runs: pd.DataFrame | None = None,
) -> Figure:
    """One line per run: the aggregate ``<metric>.mean`` against the round.

    Args:
        metrics: Long-format metrics; only aggregate rows (client_id null) are used.
        metric: The per-client metric name, e.g. "accuracy".
        split: "train" or "test".
        runs: Optional runs table; when given, lines are labelled "algorithm (run_id)".

    Raises:
        ValueError: If there is no aggregate ``<metric>.mean`` row for ``split``.
    """
    name = f"{metric}.mean"
    rows = metrics[
        metrics["client_id"].isna() & (metrics["split"] == split) & (metrics["metric"] == name)
    ]
    if rows.empty:
        present = sorted(metrics.loc[metrics["client_id"].isna(), "metric"].unique())
        raise ValueError(
            f"no aggregate rows {name!r} on split {split!r}; aggregate metrics present: {present}"
        )
    algorithms = {} if runs is None else dict(zip(runs["run_id"], runs["algorithm"], strict=True))
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for run_id, run_rows in rows.sort_values("round").groupby("run_id"):
        label = f"{algorithms[run_id]} ({run_id})" if run_id in algorithms else run_id
        ax.plot(run_rows["round"], run_rows["value"], marker="o", label=label)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{split} {name}")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_rank_heatmap(
    ranks: pd.DataFrame, round: int | None = None, run_id: str | None = None
) -> Figure:
    """Heatmap of learned energy ranks, clients (rows) by layers (columns).

    Each cell is annotated with the energy rank, and with "/true rank" when the
    true rank is known.

    Args:
        ranks: Rank rows (see analysis.load.RANKS_SCHEMA).
        round: The round to show; None means the last round.
        run_id: The run to show; may be None only when ``ranks`` holds one run.

    Raises:
        ValueError: If ``run_id`` is None and several runs are present, or it has no rows.
    """
    table = rank_table(ranks, round)
    run_ids = sorted(table["run_id"].unique())
    if run_id is None and len(run_ids) > 1:
        raise ValueError(f"ranks hold several runs {run_ids}; pass run_id")
    if run_id is not None:
        table = table[table["run_id"] == run_id]
        if table.empty:
            raise ValueError(f"no rank rows for run_id {run_id!r}; runs present: {run_ids}")
    energy = table.pivot(index="client_id", columns="layer", values="energy_rank")
    true = table.pivot(index="client_id", columns="layer", values="true_rank")
    fig = Figure(
        figsize=(1.2 * energy.shape[1] + 3, 0.5 * energy.shape[0] + 2), layout="constrained"
    )
    ax = fig.add_subplot()
    image = ax.imshow(energy.to_numpy(dtype=float), cmap="viridis", aspect="auto")
    for (row, col), value in np.ndenumerate(energy.to_numpy()):
        text = "" if pd.isna(value) else str(int(value))
        if not pd.isna(true.iat[row, col]):
            text += f"/{int(true.iat[row, col])}"
        ax.text(col, row, text, ha="center", va="center", color="white", fontsize=8)
    ax.set_xticks(range(energy.shape[1]), energy.columns, rotation=45, ha="right")
    ax.set_yticks(range(energy.shape[0]), energy.index)
    ax.set_xlabel("layer")
    ax.set_ylabel("client")
    title = f"energy rank, round {int(table['round'].iloc[0])}"
    has_true = table["true_rank"].notna().any()
    ax.set_title(title + (" (energy/true)" if has_true else ""))
    fig.colorbar(image, ax=ax, label="energy rank")
    return fig


def plot_tune_scatter(trials: pd.DataFrame, metric: str) -> Figure:
    """One subplot per ``config/`` column: ``metric`` at each trial's last round vs that key.

    Numeric keys spanning two decades or more (e.g. learning rates) get a log x
    axis; non-numeric keys are placed at evenly spaced ticks.

    Raises:
        ValueError: If ``metric`` is not a column or there is no ``config/`` column.
    """
    if metric not in trials:
        raise ValueError(f"metric {metric!r} not in trials; columns: {list(trials.columns)}")
    keys = config_columns(trials)
    if not keys:
        raise ValueError(f"no config/ columns in trials; columns: {list(trials.columns)}")
    last = trials_last_round(trials)
    fig = Figure(figsize=(3.5 * len(keys), 3.5), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False, sharey=True)[0]
    for ax, key in zip(axes, keys, strict=True):
        _scatter_key(ax, last[key], last[metric])
        ax.set_xlabel(key.removeprefix("config/"))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    return fig


def _scatter_key(ax: Axes, values: pd.Series, scores: pd.Series) -> None:
    if not _is_numeric(values):
        categories = sorted(values.astype(str).unique())
        positions = values.astype(str).map({name: i for i, name in enumerate(categories)})
        ax.scatter(positions, scores)
        ax.set_xticks(range(len(categories)), categories, rotation=45, ha="right")
        return
    ax.scatter(values, scores)
    if values.min() > 0 and values.max() / values.min() >= 100:
        ax.set_xscale("log")


def _is_numeric(values: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
