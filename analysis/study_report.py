"""Results over seeds for people: table cells, Markdown tables, a bar figure, the report section.

The numbers come from :mod:`analysis.study`. Accuracy, MCC and F1 (and lifts
and gains in them) are shown in points (x 100), as the paper's Table 1 does;
other metrics in their own units.

Every function is pure: DataFrames in, a DataFrame, str or Figure out.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.methods import method_order
from analysis.stats import CONFIDENCE
from analysis.study import (
    BROKEN_LOSS_RATIO,
    NORMS,
    REFERENCE,
    paired_differences,
    per_run_summary,
    personal_failures,
    reference_method,
    seed_summary,
    single_metric,
)
from analysis.tables import metric_direction, to_markdown

if TYPE_CHECKING:
    from analysis.load import Results

# Shown in points (x 100), as the paper's Table 1 does.
POINTS_METRICS = frozenset({"accuracy", "mcc", "f1", "majority_accuracy"})


def method_task_table(summary: pd.DataFrame, quantity: str = "mean") -> pd.DataFrame:
    """The paper's Table 1 shape: rows methods, columns tasks, cells ``mean ± half-width``.

    Accuracy, MCC and F1 (and lifts and gains in them) are in points (x 100), as
    in the paper; other metrics (mse, pearson, bleu) in their own units. A cell
    without an interval (one seed) shows the mean alone; a cell with fewer seeds
    than the table's largest count says ``(n=k)``. Empty cells: the
    method did not run on the task or has no such quantity.
    """
    if summary.empty:
        return pd.DataFrame()
    typical = int(summary["n_seeds"].max())
    cells = summary.assign(
        cell=[
            format_cell(
                row[quantity], row[f"{quantity}_hw"], row["metric"], row["n_seeds"], typical
            )
            for _, row in summary.iterrows()
        ],
        column=[
            f"{task} ({_unit(metric)})"
            for task, metric in zip(summary["task"], summary["metric"], strict=True)
        ],
    )
    table = cells.pivot(index="method", columns="column", values="cell").fillna("")
    table = table.loc[method_order(list(table.index))]
    table.columns.name = None
    return table


def format_cell(mean: float, half_width: float, metric: str, n: int = 0, typical: int = 0) -> str:
    """``mean ± half-width`` in the metric's display units ('' for NaN mean)."""
    if mean is None or pd.isna(mean):
        return ""
    scale = 100.0 if metric in POINTS_METRICS else 1.0
    text = _number(mean * scale, metric)
    if not pd.isna(half_width):
        text += f" ± {_number(half_width * scale, metric)}"
    if n and typical and n != typical:
        text += f" (n={n})"
    return text


def _number(value: float, metric: str) -> str:
    return f"{value:.2f}" if metric in POINTS_METRICS else f"{value:.4g}"


def _unit(metric: str) -> str:
    return f"{metric}, points" if metric in POINTS_METRICS else metric


def differences_table(differences: pd.DataFrame) -> pd.DataFrame:
    """``paired_differences`` for display: differences and intervals in display units."""
    if differences.empty:
        return differences
    table = differences[["task", "metric", "reference", "baseline", "n_pairs", "seeds"]].copy()
    table["difference"] = [
        format_cell(row["diff"], row["diff_hw"], row["metric"]) for _, row in differences.iterrows()
    ]
    table["95% CI"] = [
        ""
        if pd.isna(row["low"])
        else f"[{format_cell(row['low'], math.nan, row['metric'])}, "
        f"{format_cell(row['high'], math.nan, row['metric'])}]"
        for _, row in differences.iterrows()
    ]
    table["favours"] = differences["favours"]
    table["unmatched seeds"] = differences["unmatched"]
    return table


def personal_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The personal level's contribution, for methods that logged ``<metric>.shared_only``.

    Columns task, method, n_seeds, as trained, shared only (personal level off),
    gain (as trained - shared only, metric's sign), clients helped (fraction, mean
    over seeds), norm_C, norm_D; each ``mean ± half-width`` over seeds.
    """
    rows = summary[summary["shared_only"].notna() | summary["norm_D"].notna()]
    records = []
    for _, row in rows.iterrows():
        metric = row["metric"]
        records.append(
            {
                "task": row["task"],
                "method": row["method"],
                "n_seeds": row["n_seeds"],
                "as trained": format_cell(row["mean"], row["mean_hw"], metric),
                "shared only": format_cell(row["shared_only"], row["shared_only_hw"], metric),
                "gain": format_cell(row["personal_gain"], row["personal_gain_hw"], metric),
                "clients helped": format_cell(row["helped"], row["helped_hw"], "fraction"),
                "norm_C": format_cell(row["norm_C"], row["norm_C_hw"], "norm"),
                "norm_D": format_cell(row["norm_D"], row["norm_D_hw"], "norm"),
            }
        )
    columns = ["task", "method", "n_seeds", "as trained", "shared only", "gain"]
    return pd.DataFrame(records, columns=[*columns, "clients helped", *NORMS])


def plot_seed_bars(summary: pd.DataFrame, quantity: str = "mean") -> Figure:
    """One panel per task: a bar per method at its mean over seeds, with the t-interval.

    Bars without an interval (one seed) have no error bar. Units as in
    ``method_task_table`` (accuracy/MCC in points).

    Raises:
        ValueError: If ``summary`` is empty.
    """
    if summary.empty:
        raise ValueError("no per-method summary to plot")
    tasks = sorted(summary["task"].unique())
    fig = Figure(figsize=(max(5.0, 4.2 * len(tasks)), 4.2), layout="constrained")
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks, strict=True):
        rows = summary[summary["task"] == task]
        rows = rows.set_index("method").loc[method_order(list(rows["method"]))]
        metric = single_metric(rows["metric"], task)
        scale = 100.0 if metric in POINTS_METRICS else 1.0
        means = rows[quantity].to_numpy(float) * scale
        errors = np.nan_to_num(rows[f"{quantity}_hw"].to_numpy(float) * scale)
        positions = np.arange(len(rows))
        ax.bar(positions, means, yerr=errors, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(positions, list(rows.index), rotation=35, ha="right")
        ax.set_title(f"{task} (n={rows['n_seeds'].max()} seeds)")
        better = "higher" if metric_direction(metric) else "lower"
        ax.set_ylabel(f"{_unit(metric)} ({better} is better), mean ± 95% t-CI")
        finite = means[np.isfinite(means)]
        if finite.size and metric_direction(metric) and finite.min() > 0:
            spread = np.max(finite + errors[np.isfinite(means)]) - np.min(finite)
            ax.set_ylim(max(0.0, finite.min() - 2 * spread - 1e-9), None)
        ax.grid(axis="y", alpha=0.3)
    return fig


def study_markdown(results: Results, split: str = "test") -> tuple[list[str], pd.DataFrame]:
    """The report's "over seeds" sections as Markdown lines, and the seed summary they show."""
    per_run = per_run_summary(results, split)
    summary = seed_summary(per_run)
    if summary.empty:
        return [], summary
    seeds = sorted(per_run["seed"].dropna().unique())
    lines = [
        "## Over seeds",
        "",
        f"{len(per_run)} runs, seeds {', '.join(str(s) for s in seeds)}. "
        f"Each run is reduced to its clients' mean {split} metric at its last evaluation "
        "round; cells are the mean over seeds "
        f"± the half-width of a two-sided {CONFIDENCE:.0%} **Student-t interval over seeds** "
        "(n - 1 degrees of freedom; no bootstrap). One seed gives a mean and no interval. "
        "Accuracy and MCC are in points (x 100). Methods are sweep labels without the seed part.",
        "",
        "### Primary metric (the paper's Table 1 shape)",
        "",
        to_markdown(method_task_table(summary, "mean")),
        "### Worst decile (mean of the worst ceil(10%) clients per run, then over seeds)",
        "",
        to_markdown(method_task_table(summary, "worst_decile")),
    ]
    if summary["lift"].notna().any():
        lift = summary.assign(metric="accuracy")
        lines += [
            "### Lift over the majority label (accuracy - majority_accuracy, client mean per run)",
            "",
            to_markdown(method_task_table(lift, "lift")),
        ]
    reference = reference_method(per_run["method"])
    if reference is None:
        lines += [f"No `{REFERENCE}` method in these runs, so no paired differences.", ""]
    else:
        differences = paired_differences(per_run, reference)
        lines += [
            f"### Paired differences: {reference} minus each baseline, matched by seed",
            "",
            "difference = mean over matched seeds of (reference - baseline) in the metric's own "
            "sign, ± the Student-t half-width of those per-seed differences. For accuracy/MCC "
            "positive favours the reference; for mse (lower is better) negative does. "
            "`favours` names the better method only when the interval excludes 0.",
            "",
            to_markdown(differences_table(differences)),
        ]
    personal = personal_table(summary)
    if not personal.empty:
        lines += [
            "### The personal level (personalized vs the same model with D_k C_k switched off)",
            "",
            "gain = metric as trained - metric with the personal level off, same clients and "
            "split (for mse negative = the personal level helps); clients helped = fraction of "
            "clients it improves; norm_C, norm_D = Frobenius norms of C_k, D_k summed over layers, "
            "client mean.",
            "",
            to_markdown(personal),
        ]
    broken = personal_failures(results, split)
    if not broken.empty:
        lines += [
            "### Clients the personal level broke "
            f"(loss > {BROKEN_LOSS_RATIO:g}x with D_k C_k off)",
            "",
            "Each client whose loss on this split, as trained, exceeds "
            f"{BROKEN_LOSS_RATIO:g} times the same model's with the personal level switched "
            "off: `value` / `value_off` are the primary metric with it on / off, norm_D the "
            "client's ||D_k||. The means above include them.",
            "",
            to_markdown(broken),
        ]
    lines += ["### Per run", "", to_markdown(_per_run_display(per_run))]
    return lines, summary


def _per_run_display(per_run: pd.DataFrame) -> pd.DataFrame:
    shown = ["task", "method", "seed", "run_id", "metric", "round", "n_clients", "mean"]
    shown += ["worst_decile", "lift", "personal_gain", "norm_D"]
    return per_run[shown].dropna(axis=1, how="all")
