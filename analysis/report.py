"""Write ``report.md`` and PNG figures into a run, comparison or Tune folder.

This is what ``pf2lora report DIR`` calls. Every file is written atomically
(temp file in the same folder, then ``os.replace``), so a reader never sees a
half-written report.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis.compact import SEARCH_FILE, search_rows, search_summary
from analysis.load import (
    TRIALS_FILE,
    Results,
    has_run_files,
    load_results,
    load_tune,
    run_folders,
)
from analysis.methods import first_seed_runs, has_seed_replicates
from analysis.plots import plot_metric_vs_round, plot_rank_heatmap, plot_tune_scatter
from analysis.study import evaluation_rounds, rank_summary
from analysis.study_report import POINTS_METRICS, plot_seed_bars, study_markdown
from analysis.sweep import plot_sweep_heatmaps, sweep_cells, sweep_markdown, varying_keys
from analysis.tables import (
    best_trial,
    client_summary,
    comparison_table,
    config_columns,
    metric_direction,
    rank_table,
    system_summary,
    to_markdown,
    trials_last_round,
)
from pf2lora_ray.storage import Location, location

MAIN_METRICS = ("accuracy", "mcc", "pearson", "bleu", "mse", "loss")
REPORT_FILE = "report.md"


def main_metric(metrics: pd.DataFrame, split: str = "test") -> str | None:
    """The first of MAIN_METRICS logged per client (or as ``<metric>.mean``) on ``split``."""
    present = set(metrics.loc[metrics["split"] == split, "metric"])
    for metric in MAIN_METRICS:
        if metric in present or f"{metric}.mean" in present:
            return metric
    return None


def main_tune_metric(trials: pd.DataFrame) -> str | None:
    """The first column naming one of MAIN_METRICS, preferring ``val.``, then ``test.`` columns.

    For example "val.accuracy.mean" is chosen over "test.accuracy.mean", and that
    over "train.accuracy.mean".
    """
    reported = [column for column in trials.columns if column not in config_columns(trials)]
    for metric in MAIN_METRICS:
        matches = [column for column in reported if metric in column.split(".")]
        # The split a search selects on: validation first, then test.
        matches.sort(key=lambda c: (not c.startswith("val."), not c.startswith("test.")))
        if matches:
            return matches[0]
    return None


def write_report(path: str | Path | Location) -> list[Path | Location]:
    """Write ``report.md`` and PNG figures into a results folder.

    A folder holding ``trials.parquet`` gets a Tune report (best trial, trials
    table, scatter of the metric against each searched key). A folder holding run
    files, at the top or in subfolders, gets a run report (comparison by
    algorithm when there are several runs, client summary, ranks, system costs,
    metric against round, rank heatmaps). When some method was run with several
    seeds, the report opens with the "Over seeds" sections of
    ``analysis.study_report.study_markdown`` (means with Student-t intervals over seeds,
    worst decile, lift over the majority label, paired differences, the personal
    level) and ``seeds_bars.png``.

    Args:
        path: The results folder (a local path or a URI); files are written into it.

    Returns:
        The written files, figures first and ``report.md`` last: Paths for a local
        folder, :class:`~pf2lora_ray.storage.Location` for a URI.

    Raises:
        FileNotFoundError: If the folder holds neither a trials file nor run files.
    """
    folder = location(path)
    if (folder / TRIALS_FILE).is_file():
        return _as_paths(_write_tune_report(folder))
    if folder.is_dir() and (has_run_files(folder) or _holds_runs(folder)):
        return _as_paths(_write_run_report(folder))
    raise FileNotFoundError(
        f"{folder} holds neither {TRIALS_FILE} nor run files (runs/metrics/ranks/system.parquet)"
    )


def _as_paths(written: list[Location]) -> list[Path | Location]:
    return [loc.local if loc.is_local else loc for loc in written]


def _holds_runs(folder: Location) -> bool:
    try:
        return bool(run_folders(folder))
    except FileNotFoundError:
        return False


def _write_run_report(folder: Location) -> list[Location]:
    results = load_results(folder)
    metric = main_metric(results.metrics)
    written: list[Location] = []
    lines = [f"# Report: {folder.name}", ""]
    if metric is None:
        lines += [f"No test metric among {list(MAIN_METRICS)} was logged.", ""]
    else:
        direction = "higher" if metric_direction(metric) else "lower"
        lines += [f"Main metric: **{metric}** on test ({direction} is better).", ""]
        written += _seed_sections(results, folder, lines)
        lines += _search_section(folder)
        lines += _evaluation_section(results, metric)
        written += _sweep_sections(results, folder, lines)
        lines += _metric_sections(results, metric)
        written += _metric_figure(results, metric, folder, lines)
    if not results.ranks.empty and has_seed_replicates(results):
        # A study holds runs x clients x layers rank rows: summarize per method.
        lines += [
            "## Ranks (last round, per method; mean over seeds of each run's client-layer ranks)",
            "",
            to_markdown(rank_summary(results.ranks, results.runs)),
            "Heatmaps: each method's lowest seed.",
            "",
        ]
        first = results.ranks["run_id"].isin(first_seed_runs(results.runs))
        written += _rank_figures(results.ranks[first], folder, lines)
    elif not results.ranks.empty:
        lines += ["## Ranks (last round)", "", to_markdown(rank_table(results.ranks))]
        written += _rank_figures(results.ranks, folder, lines)
    if not results.system.empty:
        lines += ["## System", "", to_markdown(system_summary(results.system))]
    written.append(_write_atomic(folder / REPORT_FILE, "\n".join(lines).encode()))
    return written


def _metric_sections(results: Results, metric: str) -> list[str]:
    is_client_row = results.metrics["client_id"].notna() & (results.metrics["metric"] == metric)
    if not is_client_row.any():
        return []
    lines: list[str] = []
    if results.metrics["run_id"].nunique() > 1:
        table = comparison_table(results, metric)
        lines += ["## Comparison by algorithm (last round)", "", to_markdown(table)]
    lines += [
        "## Client summary (last round)",
        "",
        to_markdown(client_summary(results.metrics, metric)),
    ]
    return lines


def _seed_sections(results: Results, folder: Location, lines: list[str]) -> list[Location]:
    if not has_seed_replicates(results):
        return []
    study_lines, summary = study_markdown(results)
    lines += study_lines
    if summary.empty:
        return []
    path = _save_figure(plot_seed_bars(summary), folder / "seeds_bars.png")
    lines += [f"![mean over seeds with 95% t-intervals]({path.name})", ""]
    return [path]


def _evaluation_section(results: Results, metric: str) -> list[str]:
    """Runs evaluated more than once: the metric at every evaluation, personal level on and off."""
    table = evaluation_rounds(results, metric)
    if table.empty or table.groupby(["method", "seed"])["round"].nunique().max() < 2:
        return []
    scale = 100.0 if metric in POINTS_METRICS else 1.0
    shown = table.copy()
    numbers = [c for c in shown.columns if c not in ("method", "seed", "round")]
    shown[numbers] = (shown[numbers] * scale).round(2 if scale == 100.0 else 6)
    unit = " (points)" if scale == 100.0 else ""
    return [
        f"## Every evaluation: {metric}{unit}, with the personal level and without (off)",
        "",
        "The clients' mean at each evaluation round; `off` = the same model with D_k C_k "
        "switched off, `gain` = the difference (methods without a personal level: empty).",
        "",
        to_markdown(shown),
    ]


def _search_section(folder: Location) -> list[str]:
    """How each method was searched: the Tune folders under ``folder``, or a compact copy."""
    file = folder / SEARCH_FILE
    rows = file.read_parquet() if file.is_file() else search_rows(folder)
    if rows.empty:
        return []
    return [
        "## Search (Ray Tune, per method)",
        "",
        "Trials per search, how many ran every planned round, and the rounds at which a "
        "scheduler stopped the others. Each search chose its best trial by its last reported "
        "validation metric.",
        "",
        to_markdown(search_summary(rows)),
    ]


def _sweep_sections(results: Results, folder: Location, lines: list[str]) -> list[Location]:
    """A sweep over exactly two config keys: grids and heatmaps of the metric and the gain."""
    keys = varying_keys(results.runs)
    if len(keys) != 2:
        return []
    cells = sweep_cells(results, keys)
    if cells.empty:
        return []
    lines += sweep_markdown(cells, keys)
    path = _save_figure(plot_sweep_heatmaps(cells, keys), folder / "sweep_heatmap.png")
    lines += [f"![{keys[0]} x {keys[1]}]({path.name})", ""]
    return [path]


def _metric_figure(
    results: Results, metric: str, folder: Location, lines: list[str]
) -> list[Location]:
    is_mean_row = results.metrics["client_id"].isna() & (
        results.metrics["metric"] == f"{metric}.mean"
    )
    if not is_mean_row.any():
        return []
    figure = plot_metric_vs_round(results.metrics, metric, runs=results.runs)
    path = _save_figure(figure, folder / f"{metric}_vs_round.png")
    lines += [f"![{metric} vs round]({path.name})", ""]
    return [path]


def _rank_figures(ranks: pd.DataFrame, folder: Location, lines: list[str]) -> list[Location]:
    run_ids = sorted(ranks["run_id"].unique())
    written = []
    for run_id in run_ids:
        name = "rank_heatmap.png" if len(run_ids) == 1 else f"rank_heatmap_{_safe(run_id)}.png"
        path = _save_figure(plot_rank_heatmap(ranks, run_id=run_id), folder / name)
        lines += [f"![ranks of {run_id}]({path.name})", ""]
        written.append(path)
    return written


def _write_tune_report(folder: Location) -> list[Location]:
    trials = load_tune(folder)
    metric = main_tune_metric(trials)
    last = trials_last_round(trials)
    written: list[Location] = []
    lines = [f"# Tune report: {folder.name}", ""]
    lines += [to_markdown(search_summary(search_rows(folder).assign(search=folder.name)))]
    if metric is not None:
        mode = "max" if metric_direction(metric) else "min"
        best = best_trial(trials, metric, mode).rename_axis("key").to_frame("value")
        lines += [f"Main metric: **{metric}** ({mode}).", ""]
        lines += ["## Best trial", "", to_markdown(best)]
        last = last.sort_values(metric, ascending=mode == "min", ignore_index=True)
    best_yaml = folder / "best.yaml"
    if best_yaml.is_file():
        lines += ["## best.yaml", "", "```yaml", best_yaml.read_text().rstrip(), "```", ""]
    lines += ["## Trials at their last round", "", to_markdown(last)]
    if metric is not None and config_columns(trials):
        path = _save_figure(plot_tune_scatter(trials, metric), folder / "tune_scatter.png")
        lines += [f"![{metric} vs searched keys]({path.name})", ""]
        written.append(path)
    written.append(_write_atomic(folder / REPORT_FILE, "\n".join(lines).encode()))
    return written


def _save_figure(figure: Figure, path: Location) -> Location:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return _write_atomic(path, buffer.getvalue())


def _write_atomic(target: Location, data: bytes) -> Location:
    target.write_bytes(data)  # temp file + rename locally, one whole PUT on object stores
    return target


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)
