"""Results over seeds: per method and task, means with Student-t intervals, paired differences.

A study folder holds one run per (method, task, seed). The method of a run is its
sweep label (runs.parquet ``variant``, else ``algorithm``) with the seed part
removed (:func:`method_label`), so ``pf2lora-s1`` (a ``seeds:`` job) and
``pf2lora-1`` (a ``sweep:`` mapping with a ``seed`` list) are both ``pf2lora``.
The task is ``data.task`` (GLUE) or ``data.name`` (synthetic, webnlg).

Every run is first reduced to numbers over its clients at its last evaluation
round (:func:`per_run_summary`): the clients' mean of the task's primary metric,
its worst decile, the lift over the clients' majority-label accuracy, and the
personal level's contribution. Those per-run numbers are then treated as one
draw per seed: a mean and a two-sided 95% **Student-t interval over seeds**
(n - 1 degrees of freedom, no bootstrap; :func:`analysis.stats.t_interval`).
Paired differences subtract, seed by seed, a baseline's run from the
reference method's run on the same seed, then take the t-interval of those
differences. With one seed there is a mean and no interval.

Every function is pure: DataFrames in, a DataFrame, str or Figure out.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.stats import CONFIDENCE, t_interval
from analysis.tables import metric_direction, to_markdown, worst_decile

if TYPE_CHECKING:
    from analysis.load import Results

# The paper's metric per task (Table 1: MCC for CoLA, accuracy otherwise); any
# other task falls back to the first of FALLBACK_METRICS it logged.
PRIMARY_METRICS = {
    "cola": "mcc",
    "stsb": "pearson",
    "synthetic": "mse",
    "webnlg": "bleu",
}
FALLBACK_METRICS = ("accuracy", "mcc", "pearson", "bleu", "mse", "loss")
# Shown in points (x 100), as the paper's Table 1 does.
POINTS_METRICS = frozenset({"accuracy", "mcc", "f1", "majority_accuracy"})
SHARED_ONLY = "shared_only"
NORMS = ("norm_C", "norm_D")
REFERENCE = "pf2lora"
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
# Per-run quantities summarized over seeds (columns of per_run_summary).
QUANTITIES = ("mean", "worst_decile", "lift", "shared_only", "personal_gain", "helped", *NORMS)


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


def primary_metric(task: str, present: set[str]) -> str | None:
    """The task's metric (PRIMARY_METRICS, else accuracy) if logged, else a fallback present."""
    wanted = PRIMARY_METRICS.get(task, "accuracy")
    if wanted in present:
        return wanted
    return next((metric for metric in FALLBACK_METRICS if metric in present), None)


def per_run_summary(results: Results, split: str = "test") -> pd.DataFrame:
    """Reduce every run to numbers over its clients at its last evaluation round.

    The last evaluation round of a run is the last round with per-client rows of
    its primary metric on ``split``; every other quantity is read at that round.

    Returns:
        One row per run: run_id, task, method, algorithm, seed, metric, round,
        n_clients, and the clients' mean of
        - ``mean``: the primary metric;
        - ``worst_decile``: the mean of the worst ceil(10%) clients' metric;
        - ``lift``: accuracy - majority_accuracy (NaN without majority_accuracy;
          always in accuracy, since the majority baseline is an accuracy);
        - ``shared_only``: the metric with the personal level switched off
          (``<metric>.shared_only``; NaN for methods without a personal level);
        - ``personal_gain``: metric - metric.shared_only, in the metric's own sign
          (for mse a negative gain means the personal level helps);
        - ``helped``: the fraction of clients the personal level improves;
        - ``norm_C``, ``norm_D``: the Frobenius norms of C_k, D_k summed over layers.
        Runs whose task logged no known metric on ``split`` are left out.
    """
    methods = run_methods(results.runs).set_index("run_id")
    rows = results.metrics[
        results.metrics["client_id"].notna() & (results.metrics["split"] == split)
    ]
    records = []
    for run_id, run_rows in rows.groupby("run_id", sort=True):
        if run_id not in methods.index:
            raise ValueError(f"run {run_id!r} has metrics but no row in runs.parquet")
        info = methods.loc[run_id]
        metric = primary_metric(info["task"], set(run_rows["metric"]))
        if metric is None:
            continue
        record = {"run_id": run_id, **info.to_dict(), "metric": metric}
        record.update(_client_numbers(run_rows, metric))
        records.append(record)
    columns = ["run_id", "task", "method", "algorithm", "seed", "metric", "round", "n_clients"]
    table = pd.DataFrame(records, columns=[*columns, *QUANTITIES])
    return table.astype({"seed": "Int64"}).sort_values(
        ["task", "method", "seed"], ignore_index=True
    )


def _client_numbers(run_rows: pd.DataFrame, metric: str) -> dict[str, float]:
    last = run_rows.loc[run_rows["metric"] == metric, "round"].max()
    at_last = run_rows[run_rows["round"] == last]
    wide = at_last.pivot_table(index="client_id", columns="metric", values="value", aggfunc="mean")
    higher = metric_direction(metric)
    values = wide[metric].dropna()
    numbers = {
        "round": int(last),
        "n_clients": len(values),
        "mean": float(values.mean()),
        "worst_decile": worst_decile(values, higher),
    }
    numbers["lift"] = _mean_of(wide, "accuracy", "majority_accuracy")
    shared = f"{metric}.{SHARED_ONLY}"
    if shared in wide:
        gain = (wide[metric] - wide[shared]).dropna()
        numbers["shared_only"] = float(wide[shared].mean())
        numbers["personal_gain"] = float(gain.mean())
        numbers["helped"] = float(((gain > 0) if higher else (gain < 0)).mean())
    for norm in NORMS:
        if norm in wide:
            numbers[norm] = float(wide[norm].mean())
    return numbers


def _mean_of(wide: pd.DataFrame, minuend: str, subtrahend: str) -> float:
    if minuend not in wide or subtrahend not in wide:
        return math.nan
    return float((wide[minuend] - wide[subtrahend]).mean())


def seed_summary(per_run: pd.DataFrame, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Mean and t-interval half-width over seeds of every per-run quantity, per (task, method).

    Returns:
        One row per (task, method) in METHOD_ORDER: task, method, metric, round,
        n_seeds, seeds (e.g. "0,1,2"), then for each quantity q of QUANTITIES the
        columns ``q`` (mean over seeds) and ``q_hw`` (half-width of the
        ``confidence`` Student-t interval, n_seeds - 1 df; NaN with one seed).
    """
    records = []
    for (task, method), group in per_run.groupby(["task", "method"], sort=False):
        record = {
            "task": task,
            "method": method,
            "metric": _single(group["metric"], f"{task}/{method}"),
            "round": int(group["round"].max()),
            "n_seeds": group["seed"].nunique(),
            "seeds": ",".join(str(seed) for seed in sorted(group["seed"].dropna().unique())),
        }
        for quantity in QUANTITIES:
            interval = t_interval(group[quantity], confidence)
            record[quantity], record[f"{quantity}_hw"] = interval.mean, interval.half_width
        records.append(record)
    columns = ["task", "method", "metric", "round", "n_seeds", "seeds"]
    columns += [name for quantity in QUANTITIES for name in (quantity, f"{quantity}_hw")]
    return _ordered(pd.DataFrame(records, columns=columns))


def reference_method(methods: pd.Series | list[str], reference: str = REFERENCE) -> str | None:
    """``reference`` if present among ``methods``, else None."""
    return reference if reference in set(methods) else None


def paired_differences(
    per_run: pd.DataFrame,
    reference: str = REFERENCE,
    quantity: str = "mean",
    confidence: float = CONFIDENCE,
) -> pd.DataFrame:
    """Reference minus each baseline, matched by seed, per task.

    For every seed run by both methods, d_seed = reference's ``quantity`` minus
    the baseline's; the table gives the mean of the d_seed and its Student-t
    interval (n_pairs - 1 df). The sign is the metric's own: for accuracy or MCC
    a positive difference favours the reference, for mse (lower is better) a
    negative one does; ``favours`` reads that off for you, and says "unresolved"
    when the interval contains 0 (or there is no interval, one pair).

    Returns:
        One row per (task, baseline): task, metric, reference, baseline, n_pairs,
        seeds (the matched seeds), unmatched (seeds run by only one of the two),
        diff, diff_hw, low, high, favours. Empty when ``reference`` is absent.
    """
    records = []
    for task, runs in per_run.groupby("task", sort=True):
        by_method = runs.pivot_table(index="seed", columns="method", values=quantity, dropna=False)
        if reference not in by_method:
            continue
        metric = _single(runs["metric"], task)
        higher = metric_direction(metric)
        seeds_of = runs.groupby("method")["seed"].apply(set)
        for baseline in _method_order([m for m in by_method.columns if m != reference]):
            diffs = (by_method[reference] - by_method[baseline]).dropna()
            interval = t_interval(diffs, confidence)
            unmatched = sorted(seeds_of[reference] ^ seeds_of[baseline])
            records.append(
                {
                    "task": task,
                    "metric": metric,
                    "reference": reference,
                    "baseline": baseline,
                    "n_pairs": interval.n,
                    "seeds": ",".join(str(seed) for seed in diffs.index),
                    "unmatched": ",".join(str(seed) for seed in unmatched),
                    "diff": interval.mean,
                    "diff_hw": interval.half_width,
                    "low": interval.low,
                    "high": interval.high,
                    "favours": _favours(interval.low, interval.high, higher, reference, baseline),
                }
            )
    columns = ["task", "metric", "reference", "baseline", "n_pairs", "seeds", "unmatched"]
    columns += ["diff", "diff_hw", "low", "high", "favours"]
    return pd.DataFrame(records, columns=columns)


def _favours(low: float, high: float, higher: bool, reference: str, baseline: str) -> str:
    if math.isnan(low) or math.isnan(high) or low <= 0 <= high:
        return "unresolved"
    reference_better = (low > 0) == higher
    return reference if reference_better else baseline


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
    table = table.loc[_method_order(list(table.index))]
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
        rows = rows.set_index("method").loc[_method_order(list(rows["method"]))]
        metric = _single(rows["metric"], task)
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
    lines += ["### Per run", "", to_markdown(_per_run_display(per_run))]
    return lines, summary


def rank_summary(ranks: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Learned ranks per (task, method), averaged over seeds (a study's rank table).

    Each run's last-round rows (every client and layer) are reduced to the mean,
    min and max energy rank and, where the true rank is known (synthetic), the
    fraction of (client, layer) rows whose energy rank equals it; those are then
    averaged over the method's seeds.

    Returns:
        Columns task, method, n_seeds, energy_rank_mean, energy_rank_min,
        energy_rank_max, match (NaN without true ranks); rows in METHOD_ORDER.
    """
    if ranks.empty:
        return pd.DataFrame()
    last = ranks[ranks["round"] == ranks.groupby("run_id")["round"].transform("max")]
    known = last["true_rank"].notna()
    matched = (last["energy_rank"] == last["true_rank"]).where(known).astype(float)
    per_run = (
        last.assign(match=matched)
        .groupby("run_id")
        .agg(
            energy_rank_mean=("energy_rank", "mean"),
            energy_rank_min=("energy_rank", "min"),
            energy_rank_max=("energy_rank", "max"),
            match=("match", "mean"),
        )
    )
    methods = run_methods(runs, unique=False).set_index("run_id")
    per_run = per_run.join(methods[["task", "method", "seed"]], how="inner")
    table = per_run.groupby(["task", "method"]).agg(
        n_seeds=("seed", "nunique"),
        energy_rank_mean=("energy_rank_mean", "mean"),
        energy_rank_min=("energy_rank_min", "mean"),
        energy_rank_max=("energy_rank_max", "mean"),
        match=("match", "mean"),
    )
    return _ordered(table.reset_index())


def first_seed_runs(runs: pd.DataFrame) -> list[str]:
    """The run_id of each (task, method)'s lowest seed (whose rank heatmap a study report shows)."""
    methods = run_methods(runs, unique=False).sort_values(["task", "method", "seed"])
    return list(methods.drop_duplicates(["task", "method"])["run_id"])


def _per_run_display(per_run: pd.DataFrame) -> pd.DataFrame:
    shown = ["task", "method", "seed", "run_id", "metric", "round", "n_clients", "mean"]
    shown += ["worst_decile", "lift", "personal_gain", "norm_D"]
    return per_run[shown].dropna(axis=1, how="all")


def has_seed_replicates(results: Results) -> bool:
    """Whether some (task, method) was run with two or more seeds."""
    if results.runs.empty:
        return False
    try:
        methods = run_methods(results.runs)
    except ValueError:
        return True  # let the study section report the clash
    return bool((methods.groupby(["task", "method"])["seed"].nunique() > 1).any())


def _single(values: pd.Series, where: str) -> str:
    distinct = sorted(set(values))
    if len(distinct) != 1:
        raise ValueError(f"{where}: runs use different metrics {distinct}")
    return distinct[0]


def _method_order(methods: list[str]) -> list[str]:
    def key(method: str) -> tuple[int, str]:
        exact = METHOD_ORDER.index(method) if method in METHOD_ORDER else None
        if exact is not None:
            return exact, method
        prefix = [i for i, name in enumerate(METHOD_ORDER) if method.startswith(name)]
        return (max(prefix) if prefix else len(METHOD_ORDER)), method

    return sorted(methods, key=key)


def _ordered(summary: pd.DataFrame) -> pd.DataFrame:
    if summary.empty:
        return summary
    order = {method: i for i, method in enumerate(_method_order(list(summary["method"].unique())))}
    rank = summary["method"].map(order)
    return (
        summary.assign(_rank=rank)
        .sort_values(["task", "_rank"])
        .drop(columns="_rank")
        .reset_index(drop=True)
    )
