"""Two-key sweeps in the report: grids and heatmaps of the metric and the personal gain."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_analysis_study import T_975, client_rows, results_of, runs_table

from analysis.load import load_results
from analysis.report import write_report
from analysis.sweep import sweep_cells, sweep_table, varying_keys

BETAS, ROUNDS, SEEDS = (0.03, 0.1), (8, 24), (0, 1, 2)


def sweep_study() -> tuple:
    """PF2LoRA runs over beta x rounds x seeds; accuracy = 0.7 + beta + rounds/100 + seed/100,
    and the personal level adds beta (two clients at mean -+ 0.05)."""
    runs, rows = [], []
    for beta in BETAS:
        for rounds in ROUNDS:
            for seed in SEEDS:
                run_id = f"b{beta}-r{rounds}-s{seed}"
                runs.append((run_id, "pf2lora", f"b{beta}-r{rounds}", seed, "glue", "sst2"))
                mean = 0.7 + beta + rounds / 100 + seed / 100
                rows += client_rows(run_id, rounds, "accuracy", [mean - 0.05, mean + 0.05])
                rows += client_rows(
                    run_id, rounds, "accuracy.shared_only", [mean - beta - 0.05, mean - beta + 0.05]
                )
    table = runs_table(runs)
    table["pf2lora.lr_lower"] = [float(r.split("-")[0][1:]) for r in table["run_id"]]
    table["fed.rounds"] = [int(r.split("-")[1][1:]) for r in table["run_id"]]
    table["fed.num_clients"] = 2  # the same in every run: not a sweep key
    table["data_check.truncated.train"] = [0.01 * i for i in range(len(table))]
    return results_of(table, rows), table


def test_varying_keys_are_the_swept_config_keys() -> None:
    _, runs = sweep_study()
    assert varying_keys(runs) == ["fed.rounds", "pf2lora.lr_lower"]


def test_cells_carry_mean_and_interval_over_seeds() -> None:
    results, _ = sweep_study()
    keys = ["pf2lora.lr_lower", "fed.rounds"]
    cells = sweep_cells(results, keys).set_index(keys)
    assert len(cells) == 4 and (cells["n_seeds"] == 3).all()
    cell = cells.loc[(0.1, 24)]
    # seeds add 0, 0.01, 0.02: mean +0.01, sd 0.01, half-width t(2) * 0.01 / sqrt(3)
    assert cell["mean"] == pytest.approx(0.7 + 0.1 + 0.24 + 0.01)
    assert cell["mean_hw"] == pytest.approx(T_975[2] * 0.01 / 3**0.5, rel=1e-5)
    assert cell["personal_gain"] == pytest.approx(0.1)
    assert cell["personal_gain_hw"] == pytest.approx(0.0, abs=1e-12)
    grid = sweep_table(cells.reset_index(), keys, "personal_gain")
    assert list(grid.columns) == ["fed.rounds=8", "fed.rounds=24"]
    assert grid.loc[0.03, "fed.rounds=8"] == "3.00 ± 0.00"  # points


def test_report_draws_the_sweep(tmp_path: Path) -> None:
    results, _ = sweep_study()
    results.runs.to_parquet(tmp_path / "runs.parquet")
    results.metrics.to_parquet(tmp_path / "metrics.parquet")
    assert load_results(tmp_path).runs.shape[0] == 12
    written = write_report(tmp_path)
    assert tmp_path / "sweep_heatmap.png" in written
    report = (tmp_path / "report.md").read_text()
    assert "## Sweep: fed.rounds x pf2lora.lr_lower" in report
    assert "### personal level's gain (accuracy)" in report
    assert "![fed.rounds x pf2lora.lr_lower](sweep_heatmap.png)" in report


def test_no_sweep_section_for_one_key(tmp_path: Path) -> None:
    results, _ = sweep_study()
    keep = results.runs["fed.rounds"] == 8
    runs = results.runs[keep]
    metrics = results.metrics[results.metrics["run_id"].isin(runs["run_id"])]
    runs.to_parquet(tmp_path / "runs.parquet")
    metrics.to_parquet(tmp_path / "metrics.parquet")
    write_report(tmp_path)
    assert "## Sweep" not in (tmp_path / "report.md").read_text()
    assert not (tmp_path / "sweep_heatmap.png").exists()


def test_every_evaluation_with_and_without_the_personal_level(tmp_path: Path) -> None:
    from analysis.study import evaluation_rounds

    runs = runs_table(
        [
            ("h", "homlora", "homlora", 0, "glue", "sst2"),
            ("p", "pf2lora", "pf2lora", 0, "glue", "sst2"),
        ]
    )
    rows = []
    for round_ in (8, 16, 24):
        for split in ("val", "test"):
            for client in (0, 1):
                rows.append(("h", round_, client, split, "accuracy", 0.80 + round_ / 1000))
                rows.append(("p", round_, client, split, "accuracy", 0.78 + round_ / 1000))
                rows.append(("p", round_, client, split, "accuracy.shared_only", 0.75))
    results = results_of(runs, rows)
    table = evaluation_rounds(results, "accuracy")
    pf2 = table[table["method"] == "pf2lora"].set_index("round")
    assert list(pf2.index) == [8, 16, 24]
    assert pf2.loc[24, "test gain"] == pytest.approx(0.78 + 0.024 - 0.75)
    assert pf2.loc[8, "val off"] == pytest.approx(0.75)
    assert table[table["method"] == "homlora"]["test gain"].isna().all()
    results.runs.to_parquet(tmp_path / "runs.parquet")
    results.metrics.to_parquet(tmp_path / "metrics.parquet")
    write_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "## Every evaluation: accuracy (points), with the personal level and without" in report

