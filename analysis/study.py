"""Results over seeds: per method and task, means with Student-t intervals, paired differences.

Which method, task and seed a run is comes from :mod:`analysis.methods`.
Every run is first reduced to numbers over its clients at its last evaluation
round (:func:`per_run_summary`): the clients' mean of the task's primary metric,
its worst decile, the lift over the clients' majority-label accuracy, and the
personal level's contribution. Those per-run numbers are then treated as one
draw per seed: a mean and a two-sided 95% **Student-t interval over seeds**
(n - 1 degrees of freedom, no bootstrap; :func:`analysis.stats.t_interval`).
Paired differences subtract, seed by seed, a baseline's run from the
reference method's run on the same seed, then take the t-interval of those
differences. With one seed there is a mean and no interval. How these numbers
are shown (cells, tables, a figure, the report section) is
:mod:`analysis.study_report`.

Every function is pure: DataFrames in, a DataFrame out.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pandas as pd

from analysis.methods import method_order, run_methods, sort_by_method
from analysis.stats import CONFIDENCE, t_interval
from analysis.tables import metric_direction, worst_decile

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
SHARED_ONLY = "shared_only"
NORMS = ("norm_C", "norm_D")
REFERENCE = "pf2lora"
# A client's personal level "broke" it when its loss exceeds this multiple of the same
# model's loss with D_k C_k off (personal_failures).
BROKEN_LOSS_RATIO = 2.0
# Per-run quantities summarized over seeds (columns of per_run_summary).
QUANTITIES = ("mean", "worst_decile", "lift", "shared_only", "personal_gain", "helped", *NORMS)


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
    records = []
    for run_id, info, run_rows in _client_rows_by_run(results, split):
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


def _client_rows_by_run(
    results: Results, split: str
) -> Iterator[tuple[str, pd.Series, pd.DataFrame]]:
    """(run_id, its methods row, its per-client rows on ``split``) for every run, in order."""
    methods = run_methods(results.runs).set_index("run_id")
    rows = results.metrics[
        results.metrics["client_id"].notna() & (results.metrics["split"] == split)
    ]
    for run_id, run_rows in rows.groupby("run_id", sort=True):
        if run_id not in methods.index:
            raise ValueError(f"run {run_id!r} has metrics but no row in runs.parquet")
        yield run_id, methods.loc[run_id], run_rows


def _at_last_round(run_rows: pd.DataFrame, metric: str) -> tuple[int, pd.DataFrame]:
    """The last round with ``metric``, and every metric per client at it (client x metric)."""
    last = run_rows.loc[run_rows["metric"] == metric, "round"].max()
    at_last = run_rows[run_rows["round"] == last]
    wide = at_last.pivot_table(index="client_id", columns="metric", values="value", aggfunc="mean")
    return int(last), wide


def _client_numbers(run_rows: pd.DataFrame, metric: str) -> dict[str, float]:
    last, wide = _at_last_round(run_rows, metric)
    higher = metric_direction(metric)
    values = wide[metric].dropna()
    numbers = {
        "round": last,
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


def personal_failures(
    results: Results, split: str = "test", ratio: float = BROKEN_LOSS_RATIO
) -> pd.DataFrame:
    """Clients whose personal level broke their model: loss > ``ratio`` x loss with it off.

    A mean over clients hides such a client (REPRODUCTION.md, WebNLG: one client at
    BLEU 0.67 against 39.94 with D_k C_k switched off), so the report lists them.
    Read at each run's last round with ``loss.shared_only`` on ``split``; methods
    without a personal level log none and are never listed.

    Returns:
        One row per such client: task, method, seed, run_id, client_id, loss,
        loss_off (D_k C_k off), metric (the task's primary), value, value_off,
        norm_D. Empty (same columns) when none broke.
    """
    off = f"loss.{SHARED_ONLY}"
    records = []
    for run_id, info, run_rows in _client_rows_by_run(results, split):
        if off not in set(run_rows["metric"]):
            continue
        metric = primary_metric(info["task"], set(run_rows["metric"]))
        _, wide = _at_last_round(run_rows, off)
        for client_id, row in wide[wide["loss"] > ratio * wide[off]].iterrows():
            records.append(
                {
                    "task": info["task"],
                    "method": info["method"],
                    "seed": info["seed"],
                    "run_id": run_id,
                    "client_id": int(client_id),
                    "loss": row["loss"],
                    "loss_off": row[off],
                    "metric": metric,
                    "value": row.get(metric, math.nan),
                    "value_off": row.get(f"{metric}.{SHARED_ONLY}", math.nan),
                    "norm_D": row.get("norm_D", math.nan),
                }
            )
    columns = ["task", "method", "seed", "run_id", "client_id", "loss", "loss_off"]
    table = pd.DataFrame(records, columns=[*columns, "metric", "value", "value_off", "norm_D"])
    return table.sort_values(["task", "method", "seed", "client_id"], ignore_index=True)


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
            "metric": single_metric(group["metric"], f"{task}/{method}"),
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
    return sort_by_method(pd.DataFrame(records, columns=columns))


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
        metric = single_metric(runs["metric"], task)
        higher = metric_direction(metric)
        seeds_of = runs.groupby("method")["seed"].apply(set)
        for baseline in method_order([m for m in by_method.columns if m != reference]):
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
    return sort_by_method(table.reset_index())


def single_metric(values: pd.Series, where: str) -> str:
    """The one metric ``values`` hold.

    Raises:
        ValueError: If the runs at ``where`` use different metrics.
    """
    distinct = sorted(set(values))
    if len(distinct) != 1:
        raise ValueError(f"{where}: runs use different metrics {distinct}")
    return distinct[0]


def evaluation_rounds(results: Results, metric: str) -> pd.DataFrame:
    """Every evaluation of every run: the clients' mean ``metric``, with and without D_k C_k.

    Returns:
        One row per (method, seed, round): for each split present (``val``, ``test``)
        the clients' mean ``metric``, the mean of ``<metric>.shared_only`` and their
        difference (the personal level's gain; NaN without a personal level).
    """
    methods = run_methods(results.runs).set_index("run_id")
    rows = results.metrics[results.metrics["client_id"].notna()]
    names = {metric: "", f"{metric}.{SHARED_ONLY}": " off"}
    rows = rows[rows["metric"].isin(names) & (rows["split"] != "train")]
    if rows.empty:
        return pd.DataFrame()
    means = rows.groupby(["run_id", "round", "split", "metric"])["value"].mean().reset_index()
    means["column"] = means["split"] + means["metric"].map(names)
    table = means.pivot(index=["run_id", "round"], columns="column", values="value")
    for split in ("val", "test"):
        if split in table and f"{split} off" in table:
            table[f"{split} gain"] = table[split] - table[f"{split} off"]
    table = table.reset_index().join(methods[["method", "seed"]], on="run_id")
    columns = ("val", "val off", "val gain", "test", "test off", "test gain")
    order = [c for c in columns if c in table]
    table = table[["method", "seed", "round", *order]]
    return table.sort_values(["method", "seed", "round"], ignore_index=True)
