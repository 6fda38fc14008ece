"""Tests of results over seeds (analysis/stats, methods, study, study_report) and the report.

Expected numbers are worked out by hand; t quantiles are the published table values.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from matplotlib.container import BarContainer

from analysis.load import METRICS_SCHEMA, Results, empty_table, load_results
from analysis.methods import method_label, run_methods
from analysis.report import write_report
from analysis.stats import t_interval, t_quantile
from analysis.study import (
    paired_differences,
    per_run_summary,
    personal_failures,
    rank_summary,
    seed_summary,
)
from analysis.study_report import format_cell, method_task_table, plot_seed_bars

REPO_ROOT = Path(__file__).resolve().parents[1]
T_975 = {1: 12.706205, 2: 4.302653, 4: 2.776445, 9: 2.262157, 30: 2.042272}


# ------------------------------------------------------------------ builders
def runs_table(rows: list[tuple]) -> pd.DataFrame:
    """Rows of (run_id, algorithm, variant, seed, data.name, data.task)."""
    frame = pd.DataFrame(
        rows, columns=["run_id", "algorithm", "variant", "seed", "data.name", "data.task"]
    )
    frame["status"] = "finished"
    frame["wall_s"] = 1.0
    return frame.astype({"seed": "int64"})


def client_rows(run_id: str, round: int, metric: str, values: list[float]) -> list[tuple]:
    return [(run_id, round, client, "test", metric, value) for client, value in enumerate(values)]


def metrics_table(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(METRICS_SCHEMA)).astype(METRICS_SCHEMA)


def results_of(runs: pd.DataFrame, rows: list[tuple]) -> Results:
    return Results(runs, metrics_table(rows), empty_table("ranks"), empty_table("system"))


def sst2_study(means: dict[str, dict[int, float]]) -> Results:
    """Runs of SST-2 whose two clients score mean +- 0.05 at round 4 (0 at round 2)."""
    runs, rows = [], []
    for method, by_seed in means.items():
        algorithm = method.split("_")[0]
        for seed, mean in by_seed.items():
            run_id = f"{method}-{seed}"
            runs.append((run_id, algorithm, f"{method}-s{seed}", seed, "glue", "sst2"))
            rows += client_rows(run_id, 2, "accuracy", [0.0, 0.0])
            rows += client_rows(run_id, 4, "accuracy", [mean - 0.05, mean + 0.05])
            rows += client_rows(run_id, 4, "majority_accuracy", [0.5, 0.7])
    return results_of(runs_table(runs), rows)


# ------------------------------------------------------------------ stats
@pytest.mark.parametrize(("df", "expected"), sorted(T_975.items()))
def test_t_quantile_matches_table(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-6)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=2e-6)


def test_t_quantile_other_levels_and_limits() -> None:
    assert t_quantile(0.95, 4) == pytest.approx(2.131847, abs=2e-6)
    assert t_quantile(0.995, 2) == pytest.approx(9.924843, abs=2e-6)
    assert t_quantile(0.5, 3) == 0.0
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)  # the normal quantile
    with pytest.raises(ValueError, match="p must be"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="df must be"):
        t_quantile(0.9, 0)


def test_t_quantile_agrees_with_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")  # not a dependency; checked where installed
    for df in (1, 2, 3, 5, 7.5, 12, 29, 31, 200):
        for p in (0.6, 0.9, 0.95, 0.975, 0.99, 0.999):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


def test_t_interval_half_width() -> None:
    interval = t_interval([1.0, 2.0, 3.0])  # sd 1, n 3
    assert (interval.n, interval.mean) == (3, 2.0)
    assert interval.half_width == pytest.approx(4.302653 / math.sqrt(3), abs=1e-6)
    assert interval.low == pytest.approx(2.0 - 4.302653 / math.sqrt(3), abs=1e-6)
    five = t_interval([0.80, 0.82, 0.84, 0.86, 0.88])  # sd 0.0316228
    assert five.half_width == pytest.approx(2.776445 * 0.0316228 / math.sqrt(5), abs=1e-6)
    one = t_interval([0.7, float("nan")])
    assert (one.n, one.mean) == (1, 0.7)
    assert math.isnan(one.half_width)
    assert t_interval([]).n == 0


# ------------------------------------------------------------------ labels
@pytest.mark.parametrize(
    ("label", "seed", "method"),
    [
        ("pf2lora-s1", 1, "pf2lora"),  # the seeds: job key's folders
        ("pf2lora-s12", None, "pf2lora"),
        ("pf2lora-1", 1, "pf2lora"),  # sweep mapping {algorithm.name: [..], seed: [..]}
        ("1-pf2lora", 1, "pf2lora"),  # seed listed first
        ("pf2lora-0-0.01", 0, "pf2lora-0.01"),  # seed between other swept values
        ("hetlora-2-2", 2, "hetlora-2"),  # another value equal to the seed stays once
        ("pf2lora_first_order", 0, "pf2lora_first_order"),
        ("pf2lora-3", 0, "pf2lora-3"),  # 3 is not this run's seed
        ("0", 0, "0"),
    ],
)
def test_method_label(label: str, seed: int | None, method: str) -> None:
    assert method_label(label, seed) == method


def test_run_methods_task_and_fallbacks() -> None:
    runs = runs_table(
        [
            ("a", "pf2lora", "pf2lora-s0", 0, "glue", "sst2"),
            ("b", "homlora", None, 1, "synthetic", None),
            ("c", "hetlora", "", 2, "glue", "qnli"),
        ]
    )
    table = run_methods(runs)
    assert list(table["method"]) == ["pf2lora", "homlora", "hetlora"]
    assert list(table["task"]) == ["sst2", "synthetic", "qnli"]
    clash = runs_table(
        [
            ("a", "pf2lora", "pf2lora-s0", 0, "glue", "sst2"),
            ("b", "pf2lora", None, 0, "glue", "sst2"),
        ]
    )
    with pytest.raises(ValueError, match="distinct sweep labels"):
        run_methods(clash)


# ------------------------------------------------------------------ per run
def test_per_run_summary_last_round_lift_and_personal_level() -> None:
    runs = runs_table([("p", "pf2lora", "pf2lora-s0", 0, "glue", "sst2")])
    rows = client_rows("p", 2, "accuracy", [0.1] * 10)
    last = [0.9, 0.8, 0.7, 0.6, 0.5, 0.9, 0.8, 0.7, 0.6, 0.5]
    rows += client_rows("p", 4, "accuracy", last)
    rows += client_rows("p", 4, "majority_accuracy", [0.5] * 10)
    rows += client_rows("p", 4, "accuracy.shared_only", [0.8] * 10)  # helps clients 0 and 5
    rows += client_rows("p", 4, "norm_C", [2.0] * 10)
    rows += client_rows("p", 4, "norm_D", [0.1, 0.3] * 5)
    rows += [("p", 4, None, "test", "accuracy.mean", 99.0), ("p", 4, 0, "train", "accuracy", 9.0)]
    row = per_run_summary(results_of(runs, rows)).iloc[0]
    assert (row["task"], row["method"], row["metric"], row["round"]) == (
        "sst2",
        "pf2lora",
        "accuracy",
        4,
    )
    assert row["n_clients"] == 10
    assert row["mean"] == pytest.approx(0.7)
    assert row["worst_decile"] == pytest.approx(0.5)
    assert row["lift"] == pytest.approx(0.2)
    assert row["shared_only"] == pytest.approx(0.8)
    assert row["personal_gain"] == pytest.approx(-0.1)
    assert row["helped"] == pytest.approx(0.2)
    assert (row["norm_C"], row["norm_D"]) == (pytest.approx(2.0), pytest.approx(0.2))


def test_personal_failures_lists_clients_whose_personal_level_broke_them(tmp_path) -> None:
    runs = runs_table(
        [
            ("p", "pf2lora", "pf2lora-s2", 2, "webnlg", None),
            ("h", "homlora", "homlora-s2", 2, "webnlg", None),
            ("q", "pf2lora", "pf2lora-s1", 1, "webnlg", None),  # a second seed: a study report
        ]
    )
    rows = client_rows("p", 6, "bleu", [30.0, 0.5, 25.0])
    rows += client_rows("p", 6, "bleu.shared_only", [29.0, 40.0, 26.0])
    rows += client_rows("p", 6, "loss", [1.0, 9.5, 2.1])
    rows += client_rows("p", 6, "loss.shared_only", [1.1, 1.0, 1.05])  # 2.1 is 2x: not broken
    rows += client_rows("p", 6, "norm_D", [0.3, 7.6, 0.4])
    rows += client_rows("p", 3, "loss", [50.0, 50.0, 50.0])  # an earlier round: not read
    rows += client_rows("p", 3, "loss.shared_only", [1.0, 1.0, 1.0])
    rows += client_rows("h", 6, "bleu", [30.0, 0.5, 25.0]) + client_rows("h", 6, "loss", [9.0] * 3)
    rows += client_rows("q", 6, "bleu", [30.0] * 3) + client_rows("q", 6, "loss", [1.0] * 3)
    rows += client_rows("q", 6, "loss.shared_only", [0.9] * 3)
    results = results_of(runs, rows)
    broken = personal_failures(results)
    assert broken[["method", "seed", "client_id"]].values.tolist() == [["pf2lora", 2, 1]]
    row = broken.iloc[0]
    assert (row["loss"], row["loss_off"], row["metric"]) == (9.5, 1.0, "bleu")
    assert (row["value"], row["value_off"], row["norm_D"]) == (0.5, 40.0, 7.6)
    assert personal_failures(results, ratio=1.9)["client_id"].tolist() == [1, 2]
    assert personal_failures(results, split="val").empty
    # The report lists it under the study's sections.
    folder = tmp_path / "study"
    folder.mkdir()
    for name, table in (("runs", results.runs), ("metrics", results.metrics)):
        table.to_parquet(folder / f"{name}.parquet")
    write_report(folder)
    report = (folder / "report.md").read_text()
    assert "### Clients the personal level broke (loss > 2x with D_k C_k off)" in report
    assert "| webnlg | pf2lora | 2 | p | 1 | 9.5 | 1 | bleu | 0.5 | 40 | 7.6 |" in report


def test_per_run_summary_primary_metric_per_task() -> None:
    runs = runs_table(
        [
            ("c", "homlora", "homlora", 0, "glue", "cola"),
            ("s", "homlora", "homlora", 0, "synthetic", None),
        ]
    )
    rows = client_rows("c", 1, "accuracy", [0.8, 0.8]) + client_rows("c", 1, "mcc", [0.2, 0.4])
    rows += client_rows("s", 1, "loss", [1.0, 1.0]) + client_rows("s", 1, "mse", [0.1, 0.3])
    per_run = per_run_summary(results_of(runs, rows)).set_index("task")
    assert per_run.loc["cola", "metric"] == "mcc"
    assert per_run.loc["cola", "mean"] == pytest.approx(0.3)
    assert per_run.loc["synthetic", "metric"] == "mse"
    assert per_run.loc["synthetic", "worst_decile"] == pytest.approx(0.3)  # lower is better
    assert math.isnan(per_run.loc["synthetic", "lift"])


# ------------------------------------------------------------------ over seeds
def test_seed_summary_interval_over_seeds() -> None:
    study = sst2_study(
        {"pf2lora": {0: 0.80, 1: 0.85, 2: 0.90}, "homlora": {0: 0.77, 1: 0.81, 2: 0.86}}
    )
    summary = seed_summary(per_run_summary(study)).set_index("method")
    assert list(summary.index) == ["homlora", "pf2lora"]  # the paper's row order
    row = summary.loc["pf2lora"]
    assert (row["n_seeds"], row["seeds"], row["round"]) == (3, "0,1,2", 4)
    assert row["mean"] == pytest.approx(0.85)
    assert row["mean_hw"] == pytest.approx(4.302653 * 0.05 / math.sqrt(3), abs=1e-6)
    assert row["worst_decile"] == pytest.approx(0.80)  # 2 clients: the worse one, mean - 0.05
    assert row["lift"] == pytest.approx(0.85 - 0.6)
    assert row["lift_hw"] == pytest.approx(row["mean_hw"])  # majority baseline is constant
    assert math.isnan(row["personal_gain"])


def test_paired_differences_match_by_seed() -> None:
    study = sst2_study(
        {
            "pf2lora": {0: 0.80, 1: 0.85, 2: 0.90},
            "homlora": {2: 0.86, 0: 0.77, 1: 0.81},  # listed out of order
            "hetlora": {1: 0.95, 0: 0.70},  # seed 2 missing
        }
    )
    per_run = per_run_summary(study).sample(frac=1.0, random_state=3)  # row order must not matter
    table = paired_differences(per_run).set_index("baseline")
    assert list(table.index) == ["homlora", "hetlora"]
    homlora = table.loc["homlora"]
    # per-seed differences 0.03, 0.04, 0.04: mean 0.036667, sd 0.0057735
    assert homlora["n_pairs"] == 3
    assert homlora["diff"] == pytest.approx(0.11 / 3)
    assert homlora["diff_hw"] == pytest.approx(4.302653 * 0.0057735 / math.sqrt(3), abs=1e-6)
    assert homlora["favours"] == "pf2lora"  # [0.0223, 0.0510] excludes 0
    hetlora = table.loc["hetlora"]
    # differences 0.10 (seed 0) and -0.10 (seed 1); seed 2 is unmatched
    assert (hetlora["n_pairs"], hetlora["seeds"], hetlora["unmatched"]) == (2, "0,1", "2")
    assert hetlora["diff"] == pytest.approx(0.0)
    assert hetlora["diff_hw"] == pytest.approx(12.706205 * 0.1414214 / math.sqrt(2), abs=1e-5)
    assert hetlora["favours"] == "unresolved"


def test_paired_differences_sign_for_lower_is_better() -> None:
    runs, rows = [], []
    for method, values in {"pf2lora": [0.10, 0.12, 0.11], "homlora": [0.20, 0.21, 0.23]}.items():
        for seed, value in enumerate(values):
            runs.append((f"{method}{seed}", method, f"{method}-{seed}", seed, "synthetic", None))
            rows += client_rows(f"{method}{seed}", 3, "mse", [value, value])
    per_run = per_run_summary(results_of(runs_table(runs), rows))
    row = paired_differences(per_run).iloc[0]
    assert row["diff"] == pytest.approx(-0.31 / 3)  # pf2lora's mse is lower ...
    assert row["favours"] == "pf2lora"  # ... which is better
    assert paired_differences(per_run, reference="fedsa_lora").empty


def test_method_task_table_cells() -> None:
    study = sst2_study({"pf2lora": {0: 0.80, 1: 0.85, 2: 0.90}, "homlora": {0: 0.77}})
    table = method_task_table(seed_summary(per_run_summary(study)))
    assert list(table.index) == ["homlora", "pf2lora"]
    assert list(table.columns) == ["sst2 (accuracy, points)"]
    assert table.loc["pf2lora"].iloc[0] == "85.00 ± 12.42"  # 4.302653 * 5 / sqrt(3) points
    assert table.loc["homlora"].iloc[0] == "77.00 (n=1)"  # one seed: no interval
    assert format_cell(0.08714, 0.0173, "mse") == "0.08714 ± 0.0173"
    assert format_cell(float("nan"), 0.1, "mse") == ""


def test_plot_seed_bars_has_error_bars() -> None:
    study = sst2_study({"pf2lora": {0: 0.80, 1: 0.85, 2: 0.90}, "homlora": {0: 0.77, 1: 0.79}})
    figure = plot_seed_bars(seed_summary(per_run_summary(study)))
    ax = figure.axes[0]
    assert [patch.get_height() for patch in ax.patches] == pytest.approx([78.0, 85.0])
    assert [label.get_text() for label in ax.get_xticklabels()] == ["homlora", "pf2lora"]
    bars = next(c for c in ax.containers if isinstance(c, BarContainer))
    segments = bars.errorbar.lines[2][0].get_segments()  # one vertical error bar per method
    pf2lora_low, pf2lora_high = segments[1][:, 1]
    assert (pf2lora_low, pf2lora_high) == (
        pytest.approx(72.58, abs=0.01),
        pytest.approx(97.42, abs=0.01),
    )


# ------------------------------------------------------------------ folders and report
def write_study(root: Path, study: Results) -> None:
    """One folder per run, OUT/<task>/<variant>/, metrics as a Parquet dataset folder."""
    for _, run in study.runs.iterrows():
        folder = root / run["data.task"] / run["variant"]
        folder.mkdir(parents=True)
        study.runs[study.runs["run_id"] == run["run_id"]].to_parquet(folder / "runs.parquet")
        metrics = study.metrics[study.metrics["run_id"] == run["run_id"]]
        (folder / "metrics.parquet").mkdir()
        metrics.to_parquet(folder / "metrics.parquet" / "part-00001.parquet")


def test_report_on_a_nested_seed_folder(tmp_path: Path) -> None:
    study = sst2_study(
        {"pf2lora": {0: 0.80, 1: 0.85, 2: 0.90}, "homlora": {0: 0.77, 1: 0.81, 2: 0.86}}
    )
    write_study(tmp_path, study)
    assert len(load_results(tmp_path).runs) == 6
    written = {path.name for path in write_report(tmp_path)}
    assert {"seeds_bars.png", "report.md"} <= written
    report = (tmp_path / "report.md").read_text()
    assert "**Student-t interval over seeds**" in report
    assert "| pf2lora | 85.00 ± 12.42 |" in report
    assert "| sst2 | accuracy | pf2lora | homlora | 3 | 0,1,2 | 3.67 ± 1.43 |" in report
    assert "| homlora | 81.33 " in report  # the comparison table groups the seeds too


def test_report_without_seed_replicates_has_no_seed_section(tmp_path: Path) -> None:
    write_study(tmp_path, sst2_study({"pf2lora": {0: 0.8}, "homlora": {0: 0.7}}))
    write_report(tmp_path)
    assert "## Over seeds" not in (tmp_path / "report.md").read_text()


SYNTHETIC_SEEDS_JOB = {
    "model": {"name": "synthetic"},
    "data": {"name": "synthetic"},
    "synthetic": {"dim": 16, "common_rank": 2, "personal_ranks": [0, 1]},
    "adapter": {"r": 2, "r_personal": 1, "alpha": 2.0},
    "fed": {
        "num_clients": 4,
        "clients_per_round": 4,
        "rounds": 3,
        "local_steps": 2,
        "eval_every": 3,
    },
    "algorithm": {"lr": 0.01},
    "runtime": {"backend": "local"},
    "sweep": {"algorithm.name": ["pf2lora", "homlora"], "seed": [0, 1, 2]},
}


SEEDS_KEY_JOB = {
    **{key: value for key, value in SYNTHETIC_SEEDS_JOB.items() if key != "sweep"},
    "seeds": [0, 1, 2],
    "sweep": [
        {"label": "pf2lora", "algorithm.name": "pf2lora"},
        {"label": "homlora", "algorithm.name": "homlora"},
    ],
}


@pytest.mark.parametrize("form", ["sweep_seed_list", "seeds_key"])
def test_three_seed_synthetic_comparison_end_to_end(tmp_path: Path, form: str) -> None:
    """Both ways a job sweeps seeds: a ``sweep:`` mapping with a seed list (folders
    pf2lora-0, ...) and the ``seeds:`` key (folders pf2lora-s0, variant pf2lora)."""
    job, out = tmp_path / "job.yaml", tmp_path / "out"
    job.write_text(
        yaml.safe_dump(SYNTHETIC_SEEDS_JOB if form == "sweep_seed_list" else SEEDS_KEY_JOB)
    )
    cli = [sys.executable, "-m", "pf2lora_ray.cli"]
    for args in (["run", str(job), "--out", str(out), "--quiet"], ["report", str(out)]):
        done = subprocess.run(cli + args, cwd=REPO_ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    report = (out / "report.md").read_text()
    assert "## Over seeds" in report
    assert "| method | synthetic (mse) |" in report
    table1 = report.split("### Primary metric")[1].split("###")[0]
    assert table1.count(" ± ") == 2  # homlora and pf2lora, each with an interval
    assert "| synthetic | mse | pf2lora | homlora | 3 | 0,1,2 |" in report  # paired row
    assert (out / "seeds_bars.png").is_file()


def test_rank_summary_averages_last_round_over_seeds() -> None:
    runs = runs_table(
        [
            ("p0", "pf2lora", "pf2lora-s0", 0, "synthetic", None),
            ("p1", "pf2lora", "pf2lora-s1", 1, "synthetic", None),
            ("h0", "homlora", "homlora-s0", 0, "synthetic", None),
        ]
    )
    columns = [
        "run_id",
        "round",
        "client_id",
        "layer",
        "energy_rank",
        "threshold_rank",
        "true_rank",
    ]
    rows = [
        ("p0", 1, 0, "proj", 9, 9, 2),  # not the last round: ignored
        ("p0", 2, 0, "proj", 2, 2, 2),
        ("p0", 2, 1, "proj", 4, 4, 3),
        ("p1", 2, 0, "proj", 2, 2, 2),
        ("p1", 2, 1, "proj", 3, 3, 3),
        ("h0", 2, 0, "proj", 2, 2, None),
    ]
    ranks = pd.DataFrame(rows, columns=columns).astype({"true_rank": "Int64"})
    ranks["singular_values"] = [[1.0]] * len(ranks)
    table = rank_summary(ranks, runs).set_index("method")
    assert list(table.index) == ["homlora", "pf2lora"]
    pf2lora = table.loc["pf2lora"]
    assert pf2lora["n_seeds"] == 2
    assert pf2lora["energy_rank_mean"] == pytest.approx((3.0 + 2.5) / 2)
    assert (pf2lora["energy_rank_min"], pf2lora["energy_rank_max"]) == (2.0, 3.5)
    assert pf2lora["match"] == pytest.approx(0.75)  # seed 0: 1 of 2, seed 1: 2 of 2
    assert math.isnan(table.loc["homlora", "match"])
