"""Pure pandas/matplotlib analysis of results folders; never imports Ray or torch."""

from __future__ import annotations

from analysis.load import Results, load_results, load_tune
from analysis.methods import method_label
from analysis.plots import plot_metric_vs_round, plot_rank_heatmap, plot_tune_scatter
from analysis.report import main_metric, main_tune_metric, write_report
from analysis.stats import t_interval, t_quantile
from analysis.study import (
    paired_differences,
    per_run_summary,
    personal_failures,
    rank_summary,
    seed_summary,
)
from analysis.study_report import method_task_table, personal_table, plot_seed_bars
from analysis.tables import (
    best_trial,
    client_summary,
    comparison_table,
    lift_over_majority,
    metric_direction,
    rank_table,
    system_summary,
    to_markdown,
    trials_last_round,
    worst_decile,
)

__all__ = [
    "Results",
    "best_trial",
    "client_summary",
    "comparison_table",
    "lift_over_majority",
    "load_results",
    "load_tune",
    "main_metric",
    "main_tune_metric",
    "method_label",
    "method_task_table",
    "metric_direction",
    "paired_differences",
    "per_run_summary",
    "personal_failures",
    "personal_table",
    "plot_metric_vs_round",
    "plot_rank_heatmap",
    "plot_seed_bars",
    "plot_tune_scatter",
    "rank_summary",
    "rank_table",
    "seed_summary",
    "system_summary",
    "t_interval",
    "t_quantile",
    "to_markdown",
    "trials_last_round",
    "worst_decile",
    "write_report",
]
