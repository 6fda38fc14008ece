"""Compact study results: small, and the report made from them equals the full report."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from test_analysis_study import sst2_study

from analysis.compact import search_rows, search_summary
from analysis.report import write_report
from pf2lora_ray.cli import main


def study_tree(root: Path) -> Path:
    """A study folder as jobs/study/run_study.py leaves it: runs/<task>/<run>/ and tune/..."""
    results = sst2_study(
        {"homlora": {0: 0.80, 1: 0.82, 2: 0.78}, "pf2lora": {0: 0.76, 1: 0.77, 2: 0.75}}
    )
    for run_id in results.runs["run_id"]:
        folder = root / "runs" / "sst2" / run_id
        folder.mkdir(parents=True)
        results.runs[results.runs["run_id"] == run_id].to_parquet(folder / "runs.parquet")
        metrics = results.metrics[results.metrics["run_id"] == run_id]
        train = metrics.assign(split="train", metric="train_loss")  # left out of the compact
        pd.concat([metrics, train]).to_parquet(folder / "metrics.parquet")
    for method, rounds in (("homlora", [4, 4, 4, 4, 4]), ("pf2lora", [4, 4, 2, 4, 1])):
        folder = root / "tune" / "sst2" / method
        folder.mkdir(parents=True)
        pd.DataFrame(
            {
                "trial_id": [f"t{i}" for i in range(5)],
                "round": rounds,
                "rounds_planned": 4,
                "val.accuracy.mean": [0.7, 0.8, 0.6, 0.75, 0.5],
                "config/algorithm.lr": [1e-3, 2e-3, 3e-3, 4e-3, 5e-3],
            }
        ).to_parquet(folder / "trials.parquet")
    return root


def test_search_summary_counts_trials_and_stops(tmp_path: Path) -> None:
    summary = search_summary(search_rows(study_tree(tmp_path))).set_index("search")
    assert summary.loc["tune/sst2/homlora", "trials"] == 5
    assert summary.loc["tune/sst2/homlora", "ran to the end"] == 5
    assert summary.loc["tune/sst2/homlora", "stopped at rounds"] == "-"
    assert summary.loc["tune/sst2/pf2lora", "ran to the end"] == 3
    assert summary.loc["tune/sst2/pf2lora", "stopped at rounds"] == "1, 2"


def test_compact_report_equals_the_full_report(tmp_path: Path, capsys) -> None:
    study = study_tree(tmp_path / "study")
    assert main(["report", str(study), "--compact", str(tmp_path / "compact")]) == 0
    compact = tmp_path / "compact"
    metrics = pd.read_parquet(compact / "metrics.parquet")
    assert set(metrics["split"]) == {"test"}
    assert (compact / "search.parquet").is_file()
    write_report(study)
    write_report(compact)
    full = (study / "report.md").read_text().splitlines()[1:]  # the title names the folder
    small = (compact / "report.md").read_text().splitlines()[1:]
    assert full == small
    assert "## Search (Ray Tune, per method)" in small
    assert sum(f.stat().st_size for f in compact.glob("*.parquet")) < 200_000


def test_compact_refuses_a_file_as_destination(tmp_path: Path, capsys) -> None:
    study = study_tree(tmp_path / "study")
    (tmp_path / "file").write_text("")
    assert main(["report", str(study), "--compact", str(tmp_path / "file")]) == 2
    assert "--compact" in capsys.readouterr().err


def test_compact_to_a_bucket_reports_like_the_full_study(tmp_path: Path, s3: str, capsys) -> None:
    from pf2lora_ray.storage import location

    study = study_tree(tmp_path / "study")
    dest = f"{s3}/study/compact"
    assert main(["report", str(study), "--compact", dest]) == 0
    assert f"{dest}/metrics.parquet" in capsys.readouterr().out
    assert main(["report", dest]) == 0
    write_report(study)
    full = (study / "report.md").read_text().splitlines()[1:]
    assert (location(dest) / "report.md").read_text().splitlines()[1:] == full


def test_compact_to_a_missing_bucket_is_one_line(tmp_path: Path, s3: str, capsys) -> None:
    study = study_tree(tmp_path / "study")
    assert main(["report", str(study), "--compact", "s3://no-such-bucket/compact"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-bucket" in err[0] and "does not exist" in err[0]
