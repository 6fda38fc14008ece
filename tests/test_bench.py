"""Benchmarks: the shared pieces without Ray, and a tiny real ``overhead`` run on Ray."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest

from pf2lora_ray.bench import BENCHES, population, run_bench
from pf2lora_ray.bench.common import (
    COLUMNS,
    cores,
    markdown_table,
    parallel_speedup,
    rows_needed,
    text_job,
    write_sst2_like,
)
from pf2lora_ray.cli import main
from pf2lora_ray.config import build_config
from pf2lora_ray.experiment import UsageError


def test_registry_names_the_benches() -> None:
    assert set(BENCHES) == {
        "overhead",
        "scaling",
        "cost",
        "flower",
        "partial",
        "storage",
        "cluster",
    }


def test_unknown_bench_is_a_usage_error_naming_the_choices(tmp_path) -> None:
    with pytest.raises(UsageError, match="overhead"):
        run_bench("overheads", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("given", ["-1", "soon", "nan"])
def test_eval_budget_must_be_seconds_at_least_zero(tmp_path, capsys, given) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "scaling", "--eval-budget-s", given, "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2
    assert "--eval-budget-s: must be a number of seconds >= 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(UsageError, match="takes no --eval-budget-s"):
        run_bench("cost", out=tmp_path / "y", eval_budget_s=5.0)
    assert not (tmp_path / "y").exists()


def test_eval_budget_default_none_and_zero() -> None:
    assert population.eval_budget(quick=False, given=None) == population.EVAL_BUDGET_S
    assert population.eval_budget(quick=True, given=None) is None
    assert population.eval_budget(quick=False, given=0.0) is None  # 0: no limit
    assert population.eval_budget(quick=True, given=30.0) == 30.0


def test_sst2_like_data_is_a_valid_glue_job(tmp_path) -> None:
    folder = write_sst2_like(tmp_path, rows_needed(4, 8), words=10)
    table = pd.read_csv(folder / "train.tsv", sep="\t")
    assert list(table.columns) == ["sentence", "label"]
    assert set(table["label"]) == {0, 1}
    assert 0.2 < table["label"].mean() < 0.8
    assert table["sentence"].str.split().str.len().eq(11).all()  # 10 words and "."
    overrides = text_job(
        folder, num_clients=4, clients_per_round=2, rounds=3, local_steps=1, train_per_client=8
    )
    cfg = build_config(overrides)
    assert cfg.fed.eval_every == 3 and cfg.data.path == str(folder.resolve())


def test_markdown_table_formats_numbers() -> None:
    df = pd.DataFrame({"metric": ["s", "n"], "a": [0.123456, np.nan]})
    assert markdown_table(df, ["metric", "a"]).splitlines() == [
        "| metric | a |",
        "|---|---|",
        "| s | 0.1235 |",
        "| n | nan |",
    ]


@pytest.mark.ray
def test_overhead_bench_writes_schema_and_sane_efficiency(tmp_path, monkeypatch) -> None:
    pytest.importorskip("ray")
    from pf2lora_ray.bench import overhead

    tiny = overhead.Workload(num_clients=4, rounds=2, local_steps=1, train_per_client=4)
    monkeypatch.setattr(overhead, "QUICK", tiny)
    monkeypatch.setattr(
        overhead, "parallel_speedup", functools.partial(parallel_speedup, iters=200, repeats=1)
    )
    df = run_bench("overhead", quick=True, out=tmp_path)

    stored = pd.read_parquet(tmp_path / "bench.parquet")
    assert list(stored.columns[: len(COLUMNS)]) == COLUMNS
    assert (stored["bench"] == "overhead").all() and (stored["cores"] == cores()).all()
    pd.testing.assert_frame_equal(stored, df.reset_index(drop=True))
    value = stored.set_index(["variant", "metric"])["value"]
    on_ray = f"ray-{cores()}-actors"
    for variant in ("local", on_ray):
        assert value[(variant, "rounds")] == 2
        assert value[(variant, "client_compute_s")] > 0
        assert 0 < value[(variant, "efficiency")] < 2
    assert value[(on_ray, "actors")] == cores()
    assert value[(on_ray, "ray_init_s")] > 0
    assert value[("machine", "machine_parallel_speedup")] > 0
    assert (tmp_path / "runs" / "ray" / "system.parquet").exists()
