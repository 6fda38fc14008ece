"""Summary tables built from results DataFrames, and a dependency-free Markdown writer.

Every function here is pure: DataFrames in, a new DataFrame (or Series, or str) out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from analysis.methods import run_methods

if TYPE_CHECKING:
    from analysis.load import Results

HIGHER_IS_BETTER = frozenset(
    {"accuracy", "mcc", "f1", "pearson", "spearman", "bleu", "rouge_l", "majority_accuracy"}
)
LOWER_IS_BETTER = frozenset({"loss", "mse"})
CONFIG_PREFIX = "config/"


def metric_direction(metric: str) -> bool:
    """Return True when a higher value of ``metric`` is better.

    Dotted names such as ``accuracy.mean`` or ``test.mse.mean`` are resolved by
    their first known part.

    Args:
        metric: A metric name, e.g. "accuracy", "loss", "test.accuracy.mean".

    Raises:
        ValueError: If no part of ``metric`` is a known metric.
    """
    for part in metric.split("."):
        if part in HIGHER_IS_BETTER:
            return True
        if part in LOWER_IS_BETTER:
            return False
    known = sorted(HIGHER_IS_BETTER | LOWER_IS_BETTER)
    raise ValueError(f"unknown metric {metric!r}; expected one of {known}")


def worst_decile(values: pd.Series, higher_is_better: bool) -> float:
    """Mean of the worst ceil(10%) of ``values`` (at least one value).

    Args:
        values: One value per client.
        higher_is_better: Whether the lowest (True) or the highest (False) values are worst.
    """
    count = max(1, -(-len(values) // 10))  # integer ceil: 0.1 * 30 is 3.0000000000000004
    ordered = values.sort_values(ascending=higher_is_better)
    return float(ordered.iloc[:count].mean())


def at_round(frame: pd.DataFrame, round: int | None, by: str = "run_id") -> pd.DataFrame:
    """Keep the rows of one round: ``round`` if given, else the last round of each ``by`` group.

    Raises:
        ValueError: If no row is left.
    """
    if round is None:
        last = frame.groupby(by)["round"].transform("max")
        selected = frame[frame["round"] == last]
    else:
        selected = frame[frame["round"] == round]
    if selected.empty:
        present = sorted(frame["round"].unique())
        raise ValueError(f"no rows at round {round}; rounds present: {present}")
    return selected


def client_rows(metrics: pd.DataFrame, metric: str, split: str = "test") -> pd.DataFrame:
    """Per-client rows (client_id not null) of one metric and split.

    Raises:
        ValueError: If there is no such row; the message lists the metrics present.
    """
    rows = metrics[
        metrics["client_id"].notna() & (metrics["split"] == split) & (metrics["metric"] == metric)
    ]
    if rows.empty:
        present = sorted(metrics.loc[metrics["client_id"].notna(), "metric"].unique())
        raise ValueError(
            f"no per-client rows for metric {metric!r} on split {split!r}; "
            f"per-client metrics present: {present}"
        )
    return rows


def client_summary(
    metrics: pd.DataFrame, metric: str, split: str = "test", round: int | None = None
) -> pd.DataFrame:
    """Summarize the per-client values of ``metric`` at one round, per run.

    Args:
        metrics: Long-format metrics (see analysis.load.METRICS_SCHEMA).
        metric: A per-client metric name, e.g. "accuracy".
        split: "train" or "test".
        round: The round to summarize; None means the last round of each run.

    Returns:
        Indexed by run_id, columns round, mean, std (ddof=0), worst_decile
        (see ``worst_decile``), min, max, n_clients.
    """
    higher_is_better = metric_direction(metric)
    rows = at_round(client_rows(metrics, metric, split), round)
    return rows.groupby("run_id").agg(
        round=("round", "first"),
        mean=("value", "mean"),
        std=("value", lambda values: values.std(ddof=0)),
        worst_decile=("value", lambda values: worst_decile(values, higher_is_better)),
        min=("value", "min"),
        max=("value", "max"),
        n_clients=("value", "size"),
    )


def lift_over_majority(metrics: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Per-client accuracy minus the accuracy of predicting the client's majority class.

    Returns:
        Columns run_id, round, client_id, accuracy, majority_accuracy, lift; one row
        per (run_id, round, client_id) that has both metrics.
    """
    keys = ["run_id", "round", "client_id"]
    wide = pd.concat(
        [
            client_rows(metrics, name, split).set_index(keys)["value"].rename(name)
            for name in ("accuracy", "majority_accuracy")
        ],
        axis=1,
        join="inner",
    )
    wide["lift"] = wide["accuracy"] - wide["majority_accuracy"]
    return wide.sort_index().reset_index()


def system_summary(system: pd.DataFrame) -> pd.DataFrame:
    """Per-run cost summary.

    Returns:
        Indexed by run_id: n_rounds, wall_s (total), then the per-round means
        wall_s_per_round, client_compute_s_per_round, bytes_up_per_round,
        bytes_down_per_round, and the maxima peak_rss_mb, actors.
    """
    grouped = system.groupby("run_id")
    return pd.DataFrame(
        {
            "n_rounds": grouped["round"].nunique(),
            "wall_s": grouped["wall_s"].sum(),
            "wall_s_per_round": grouped["wall_s"].mean(),
            "client_compute_s_per_round": grouped["client_compute_s"].mean(),
            "bytes_up_per_round": grouped["bytes_up"].mean(),
            "bytes_down_per_round": grouped["bytes_down"].mean(),
            "peak_rss_mb": grouped["peak_rss_mb"].max(),
            "actors": grouped["actors"].max(),
        }
    )


def comparison_table(results: Results, metric: str, split: str = "test") -> pd.DataFrame:
    """Compare algorithms: client statistics at the last round and system costs.

    Each run is summarized first (``client_summary`` at its last round; system
    columns are means over its rounds), then runs of the same algorithm (seeds)
    are averaged.

    Returns:
        Indexed by algorithm, columns mean, std, worst_decile, bytes_up_per_round,
        wall_s_per_round, peak_rss_mb. System columns are NaN without system rows.

    Raises:
        ValueError: If a run in ``results.metrics`` has no row in ``results.runs``.
    """
    per_run = client_summary(results.metrics, metric, split)[["mean", "std", "worst_decile"]]
    algorithms = results.runs.set_index("run_id")["algorithm"]
    missing = sorted(set(per_run.index) - set(algorithms.index))
    if missing:
        raise ValueError(f"runs {missing} have metrics but no row in runs.parquet")
    grouped = results.system.groupby("run_id")
    per_run["bytes_up_per_round"] = grouped["bytes_up"].mean()
    per_run["wall_s_per_round"] = grouped["wall_s"].mean()
    per_run["peak_rss_mb"] = grouped["peak_rss_mb"].mean()
    # Sweep variants (e.g. pf2lora vs its first_order ablation) stay apart; the
    # seeds of one variant (labels pf2lora-s0, pf2lora-s1, ...) are averaged.
    runs = results.runs.set_index("run_id")
    label = runs["variant"] if "variant" in runs else runs["algorithm"]
    runs = runs.assign(variant=label.fillna(runs["algorithm"])).reset_index()
    per_run["algorithm"] = run_methods(runs, unique=False).set_index("run_id")["method"]
    return per_run.groupby("algorithm").mean()


def rank_table(ranks: pd.DataFrame, round: int | None = None) -> pd.DataFrame:
    """Learned ranks per client and layer, next to the true rank when it is known.

    Args:
        ranks: Rank rows (see analysis.load.RANKS_SCHEMA).
        round: The round to show; None means the last round of each run.

    Returns:
        Columns run_id, round, client_id, layer, energy_rank, threshold_rank,
        true_rank, match; ``match`` (nullable boolean) is energy_rank == true_rank,
        <NA> where the true rank is unknown.
    """
    columns = ["run_id", "round", "client_id", "layer", "energy_rank", "threshold_rank"]
    table = at_round(ranks, round)[columns + ["true_rank"]].copy()
    table["true_rank"] = table["true_rank"].astype("Int64")
    table["match"] = (table["energy_rank"] == table["true_rank"]).astype("boolean")
    return table.sort_values(["run_id", "client_id", "layer"], ignore_index=True)


def trials_last_round(trials: pd.DataFrame) -> pd.DataFrame:
    """The last reported row of every trial, sorted by trial_id."""
    last = at_round(trials, None, by="trial_id")
    return last.sort_values("trial_id", ignore_index=True)


def config_columns(trials: pd.DataFrame) -> list[str]:
    """The searched config columns (prefixed ``config/``) of a trials table."""
    return [column for column in trials.columns if column.startswith(CONFIG_PREFIX)]


def best_trial(trials: pd.DataFrame, metric: str, mode: str = "max") -> pd.Series:
    """The trial whose last reported ``metric`` is best.

    Trials whose last reported value is NaN are skipped; ties go to the lowest trial_id.

    Args:
        trials: One row per (trial_id, round), as read by ``analysis.load.load_tune``.
        metric: A reported column, e.g. "test.accuracy.mean".
        mode: "max" or "min".

    Returns:
        trial_id, the metric value and the ``config/`` values of the best trial.

    Raises:
        ValueError: On an unknown mode or metric, or when no trial reported the metric.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if metric not in trials:
        raise ValueError(f"metric {metric!r} not in trials; columns: {list(trials.columns)}")
    last = trials_last_round(trials).dropna(subset=[metric])
    if last.empty:
        raise ValueError(f"no trial reported {metric!r} at its last round")
    best = last[metric].idxmax() if mode == "max" else last[metric].idxmin()
    return last.loc[best, ["trial_id", metric, *config_columns(trials)]]


def to_markdown(frame: pd.DataFrame) -> str:
    """Render ``frame`` as a GitHub Markdown table, without the tabulate package.

    A non-default index becomes the leading column(s). Floats are shown with 4
    significant digits, missing values as empty cells; numeric columns are
    right-aligned.
    """
    if not isinstance(frame.index, pd.RangeIndex) or frame.index.name is not None:
        frame = frame.reset_index()
    header = [_escape(str(column)) for column in frame.columns]
    align = ["---:" if _is_numeric(frame[column]) else "---" for column in frame.columns]
    rows = [[_format_cell(value) for value in row] for row in frame.itertuples(index=False)]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"


def _is_numeric(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def _format_cell(value: object) -> str:
    if isinstance(value, (list, tuple, np.ndarray)):
        return _escape(str(list(value)))
    if pd.isna(value):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return _escape(str(value))


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
