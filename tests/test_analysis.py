"""Tests of analysis/ on small hand-made results; expected numbers are worked out by hand."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis import (
    Results,
    best_trial,
    client_summary,
    comparison_table,
    lift_over_majority,
    load_results,
    load_tune,
    metric_direction,
    plot_metric_vs_round,
    plot_rank_heatmap,
    plot_tune_scatter,
    rank_table,
    system_summary,
    to_markdown,
    write_report,
)
from analysis.load import METRICS_SCHEMA, RANKS_SCHEMA, RUNS_SCHEMA, SYSTEM_SCHEMA

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO_ROOT = Path(__file__).resolve().parents[1]


def make_metrics(rows: list[tuple]) -> pd.DataFrame:
    """Rows of (run_id, round, client_id or None, split, metric, value)."""
    frame = pd.DataFrame(rows, columns=list(METRICS_SCHEMA))
    return frame.astype(METRICS_SCHEMA)


def client_metric(run_id: str, round: int, metric: str, values: list[float]) -> list[tuple]:
    """One test row per client, client ids 0..len(values)-1."""
    return [(run_id, round, client, "test", metric, value) for client, value in enumerate(values)]


def make_runs(rows: list[tuple]) -> pd.DataFrame:
    """Rows of (run_id, algorithm, seed)."""
    frame = pd.DataFrame(rows, columns=["run_id", "algorithm", "seed"])
    frame["status"] = "finished"
    frame["wall_s"] = 1.0
    return frame.astype(RUNS_SCHEMA)


def make_system(rows: list[tuple]) -> pd.DataFrame:
    """Rows of (run_id, round, wall_s, bytes_up, peak_rss_mb)."""
    frame = pd.DataFrame(rows, columns=["run_id", "round", "wall_s", "bytes_up", "peak_rss_mb"])
    frame["client_compute_s"] = frame["wall_s"] / 2
    frame["bytes_down"] = 2 * frame["bytes_up"]
    frame["actors"] = 2
    return frame[list(SYSTEM_SCHEMA)].astype(SYSTEM_SCHEMA)


def make_ranks(rows: list[tuple]) -> pd.DataFrame:
    """Rows of (run_id, round, client_id, layer, energy_rank, threshold_rank, true_rank)."""
    columns = [
        "run_id",
        "round",
        "client_id",
        "layer",
        "energy_rank",
        "threshold_rank",
        "true_rank",
    ]
    frame = pd.DataFrame(rows, columns=columns)
    frame["singular_values"] = [[3.0, 1.0, 0.1]] * len(frame)
    return frame[list(RANKS_SCHEMA)].astype(RANKS_SCHEMA)


def make_trials() -> pd.DataFrame:
    """t0 peaks early (0.9) but ends at 0.5; t1 ends best at 0.7; t2 stopped after round 1."""
    return pd.DataFrame(
        {
            "trial_id": ["t0", "t0", "t1", "t1", "t2"],
            "round": [1, 2, 1, 2, 1],
            "test.accuracy.mean": [0.9, 0.5, 0.6, 0.7, 0.65],
            "config/adapter.r": [4, 4, 8, 8, 16],
            "config/pf2lora.lr_lower": [1e-3, 1e-3, 1e-2, 1e-2, 1e-1],
        }
    )


def write_run_folder(folder: Path, run_id: str, algorithm: str, values: list[float]) -> None:
    """A two-round, two-client run whose last-round test accuracies are ``values``."""
    folder.mkdir(parents=True, exist_ok=True)
    make_runs([(run_id, algorithm, 0)]).to_parquet(folder / "runs.parquet")
    rows = client_metric(run_id, 1, "accuracy", [0.5, 0.5]) + client_metric(
        run_id, 2, "accuracy", values
    )
    rows += [(run_id, 1, None, "test", "accuracy.mean", 0.5)]
    rows += [(run_id, 2, None, "test", "accuracy.mean", sum(values) / len(values))]
    make_metrics(rows).to_parquet(folder / "metrics.parquet")
    make_ranks([(run_id, 2, 0, "q_proj", 2, 3, 2), (run_id, 2, 1, "q_proj", 4, 4, 3)]).to_parquet(
        folder / "ranks.parquet"
    )
    make_system([(run_id, 1, 1.0, 100, 50.0), (run_id, 2, 3.0, 300, 70.0)]).to_parquet(
        folder / "system.parquet"
    )


def test_metric_direction() -> None:
    assert metric_direction("accuracy") is True
    assert metric_direction("majority_accuracy") is True
    assert metric_direction("mse") is False
    assert metric_direction("test.loss.mean") is False
    with pytest.raises(ValueError, match="perplexity"):
        metric_direction("perplexity")


def test_client_summary_uses_last_round_and_ignores_aggregate_rows() -> None:
    last = [0.4, 0.1, 0.9, 0.2, 1.0, 0.3, 0.5, 0.6, 0.7, 0.8]
    rows = client_metric("r", 1, "accuracy", [0.0] * 10) + client_metric("r", 2, "accuracy", last)
    rows += [("r", 2, None, "test", "accuracy.mean", 99.0), ("r", 2, 0, "train", "accuracy", 99.0)]
    summary = client_summary(make_metrics(rows), "accuracy")
    row = summary.loc["r"]
    assert row["round"] == 2
    assert row["mean"] == pytest.approx(0.55)
    assert row["std"] == pytest.approx(math.sqrt(0.0825))  # ddof=0: 0.01 * var(1..10)
    assert row["worst_decile"] == pytest.approx(0.1)  # 10 clients: the single worst
    assert (row["min"], row["max"], row["n_clients"]) == (pytest.approx(0.1), 1.0, 10)
    at_first = client_summary(make_metrics(rows), "accuracy", round=1)
    assert at_first.loc["r", "mean"] == 0.0


def test_worst_decile_rounds_up_and_follows_direction() -> None:
    mse = make_metrics(client_metric("r", 1, "mse", [float(v) for v in range(1, 12)]))
    assert client_summary(mse, "mse").loc["r", "worst_decile"] == pytest.approx(10.5)  # (11+10)/2
    accuracy = make_metrics(client_metric("r", 1, "accuracy", [float(v) for v in range(1, 31)]))
    assert client_summary(accuracy, "accuracy").loc["r", "worst_decile"] == pytest.approx(2.0)


def test_client_summary_names_missing_metric() -> None:
    metrics = make_metrics(client_metric("r", 1, "accuracy", [0.5]))
    with pytest.raises(ValueError, match="'mcc'.*\\['accuracy'\\]"):
        client_summary(metrics, "mcc")


def test_lift_over_majority() -> None:
    rows = client_metric("r", 1, "accuracy", [0.8, 0.6])
    rows += client_metric("r", 1, "majority_accuracy", [0.5, 0.7])
    lift = lift_over_majority(make_metrics(rows))
    assert list(lift["client_id"]) == [0, 1]
    assert list(lift["lift"]) == pytest.approx([0.3, -0.1])


def test_comparison_table_averages_runs_of_one_algorithm() -> None:
    rows = client_metric("a1", 1, "accuracy", [0.0, 0.0])
    rows += client_metric("a1", 2, "accuracy", [0.6, 0.8])
    rows += client_metric("a2", 2, "accuracy", [0.7, 0.9])
    rows += client_metric("b1", 2, "accuracy", [0.8, 1.0])
    system = make_system(
        [
            ("a1", 1, 1.0, 100, 100.0),
            ("a1", 2, 3.0, 300, 200.0),
            ("a2", 1, 2.0, 400, 250.0),
            ("a2", 2, 2.0, 400, 250.0),
            ("b1", 1, 4.0, 50, 300.0),
            ("b1", 2, 6.0, 50, 300.0),
        ]
    )
    runs = make_runs([("a1", "fedavg", 0), ("a2", "fedavg", 1), ("b1", "pf2lora", 0)])
    results = Results(runs, make_metrics(rows), make_ranks([]), system)
    table = comparison_table(results, "accuracy")
    assert list(table.columns) == [
        "mean",
        "std",
        "worst_decile",
        "bytes_up_per_round",
        "wall_s_per_round",
        "peak_rss_mb",
    ]
    assert table.loc["fedavg"].tolist() == pytest.approx([0.75, 0.1, 0.65, 300.0, 2.0, 200.0])
    assert table.loc["pf2lora"].tolist() == pytest.approx([0.9, 0.1, 0.8, 50.0, 5.0, 300.0])


def test_comparison_table_names_runs_missing_from_runs_table() -> None:
    metrics = make_metrics(client_metric("ghost", 1, "accuracy", [0.5]))
    results = Results(make_runs([]), metrics, make_ranks([]), make_system([]))
    with pytest.raises(ValueError, match="ghost"):
        comparison_table(results, "accuracy")


def test_system_summary() -> None:
    system = make_system([("r", 1, 1.0, 100, 50.0), ("r", 2, 3.0, 300, 70.0)])
    row = system_summary(system).loc["r"]
    assert row["n_rounds"] == 2
    assert row["wall_s"] == 4.0
    assert row["wall_s_per_round"] == 2.0
    assert row["bytes_up_per_round"] == 200.0
    assert row["bytes_down_per_round"] == 400.0
    assert row["peak_rss_mb"] == 70.0


def test_rank_table_last_round_and_match() -> None:
    ranks = make_ranks(
        [
            ("r", 1, 0, "q_proj", 8, 8, 2),
            ("r", 2, 1, "v_proj", 3, 4, 2),
            ("r", 2, 0, "q_proj", 2, 3, 2),
            ("real", 5, 0, "q_proj", 6, 7, None),
        ]
    )
    table = rank_table(ranks)
    assert list(table["run_id"]) == ["r", "r", "real"]
    assert list(table["energy_rank"]) == [2, 3, 6]
    assert table["match"].iloc[:2].tolist() == [True, False]
    assert pd.isna(table["match"].iloc[2])


def test_best_trial_uses_last_reported_round() -> None:
    trials = make_trials()
    best = best_trial(trials, "test.accuracy.mean", "max")
    assert list(best.index) == [
        "trial_id",
        "test.accuracy.mean",
        "config/adapter.r",
        "config/pf2lora.lr_lower",
    ]
    assert best.tolist() == ["t1", 0.7, 8, 0.01]
    assert best_trial(trials, "test.accuracy.mean", "min")["trial_id"] == "t0"
    with pytest.raises(ValueError, match="mode"):
        best_trial(trials, "test.accuracy.mean", "best")


def test_to_markdown() -> None:
    frame = pd.DataFrame(
        {
            "name": ["a|b", "c"],
            "value": [1.23456, float("nan")],
            "n": [1, 20000],
            "ok": [True, False],
        }
    )
    assert to_markdown(frame) == (
        "| name | value | n | ok |\n"
        "| --- | ---: | ---: | --- |\n"
        "| a\\|b | 1.235 | 1 | True |\n"
        "| c |  | 20000 | False |\n"
    )
    indexed = pd.DataFrame({"mean": [0.123456]}, index=pd.Index(["fedavg"], name="algorithm"))
    assert to_markdown(indexed) == "| algorithm | mean |\n| --- | ---: |\n| fedavg | 0.1235 |\n"


def test_plots_return_figures() -> None:
    rows = [("a", r, None, "test", "accuracy.mean", 0.1 * r) for r in (1, 2, 3)]
    rows += [("b", r, None, "test", "accuracy.mean", 0.2 * r) for r in (1, 2)]
    figure = plot_metric_vs_round(make_metrics(rows), "accuracy")
    assert [len(line.get_xdata()) for line in figure.axes[0].lines] == [3, 2]

    ranks = make_ranks([("r", 1, 0, "q", 2, 3, 2), ("r", 1, 0, "v", 4, 4, 3)])
    heatmap = plot_rank_heatmap(ranks)
    assert [text.get_text() for text in heatmap.axes[0].texts] == ["2/2", "4/3"]
    two_runs = pd.concat([ranks, ranks.assign(run_id="s")], ignore_index=True)
    with pytest.raises(ValueError, match="pass run_id"):
        plot_rank_heatmap(two_runs)

    scatter = plot_tune_scatter(make_trials(), "test.accuracy.mean")
    assert len(scatter.axes) == 2
    assert scatter.axes[1].get_xscale() == "log"  # lr spans 1e-3..1e-1


def test_load_results_single_folder_and_subfolders(tmp_path: Path) -> None:
    write_run_folder(tmp_path / "one", "run0", "fedavg", [0.6, 0.8])
    single = load_results(tmp_path / "one")
    assert single.metrics["client_id"].dtype == "Int64"
    assert single.metrics["client_id"].isna().sum() == 2

    write_run_folder(tmp_path / "many" / "b", "run_b", "pf2lora", [0.8, 1.0])
    write_run_folder(tmp_path / "many" / "a", "run_a", "fedavg", [0.6, 0.8])
    (tmp_path / "many" / "b" / "ranks.parquet").unlink()
    (tmp_path / "many" / "a" / "ranks.parquet").unlink()
    (tmp_path / "many" / "notes").mkdir()
    both = load_results(tmp_path / "many")
    assert list(both.runs["run_id"]) == ["run_a", "run_b"]
    assert both.metrics["run_id"].nunique() == 2
    assert both.ranks.empty
    assert list(both.ranks.columns) == list(RANKS_SCHEMA)

    with pytest.raises(FileNotFoundError, match="no run files"):
        load_results(tmp_path / "many" / "notes")


def test_load_tune_sorts(tmp_path: Path) -> None:
    make_trials().iloc[::-1].to_parquet(tmp_path / "trials.parquet")
    trials = load_tune(tmp_path)
    assert list(trials["trial_id"]) == ["t0", "t0", "t1", "t1", "t2"]
    assert list(trials["round"]) == [1, 2, 1, 2, 1]


def test_write_report_for_a_run(tmp_path: Path) -> None:
    write_run_folder(tmp_path, "run0", "fedavg", [0.6, 0.8])
    written = write_report(tmp_path)
    names = sorted(path.name for path in written)
    assert names == ["accuracy_vs_round.png", "rank_heatmap.png", "report.md"]
    for path in written:
        assert path.is_file()
    assert (tmp_path / "rank_heatmap.png").read_bytes().startswith(PNG_MAGIC)
    report = (tmp_path / "report.md").read_text()
    assert "Main metric: **accuracy** on test (higher is better)." in report
    assert "| run0 | 2 | 0.7 | 0.1 | 0.6 | 0.6 | 0.8 | 2 |" in report  # client summary
    assert "| run0 | 2 | 1 | q_proj | 4 | 4 | 3 | False |" in report  # rank table
    assert "| run0 | 2 | 4 | 2 | 1 | 200 | 400 | 70 | 2 |" in report  # system summary
    assert "## Comparison" not in report
    assert not list(tmp_path.glob("*.tmp"))


def test_write_report_for_a_comparison(tmp_path: Path) -> None:
    write_run_folder(tmp_path / "a", "run_a", "fedavg", [0.6, 0.8])
    write_run_folder(tmp_path / "b", "run_b", "pf2lora", [0.8, 1.0])
    written = write_report(tmp_path)
    assert {path.name for path in written} == {
        "accuracy_vs_round.png",
        "rank_heatmap_run_a.png",
        "rank_heatmap_run_b.png",
        "report.md",
    }
    report = (tmp_path / "report.md").read_text()
    assert "| pf2lora | 0.9 | 0.1 | 0.8 | 200 | 2 | 60 |" in report


def test_write_report_for_a_tune_folder(tmp_path: Path) -> None:
    make_trials().to_parquet(tmp_path / "trials.parquet")
    (tmp_path / "best.yaml").write_text("adapter:\n  r: 8\n")
    written = write_report(tmp_path)
    assert [path.name for path in written] == ["tune_scatter.png", "report.md"]
    assert (tmp_path / "tune_scatter.png").read_bytes().startswith(PNG_MAGIC)
    report = (tmp_path / "report.md").read_text()
    assert "Main metric: **test.accuracy.mean** (max)." in report
    assert "| trial_id | t1 |" in report
    assert "| test.accuracy.mean | 0.7 |" in report
    assert "| config/pf2lora.lr_lower | 0.01 |" in report
    assert "  r: 8" in report
    assert report.index("| t1 | 2 | 0.7 |") < report.index("| t2 | 1 | 0.65 |")


def test_write_report_rejects_an_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="trials.parquet"):
        write_report(tmp_path)


def test_analysis_does_not_import_ray_or_torch() -> None:
    code = "import sys, analysis; print(sorted({'ray', 'torch'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
