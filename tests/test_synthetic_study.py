"""The synthetic rank-recovery study end to end on the in-process backend (PF2LORA.md)."""

from __future__ import annotations

import pandas as pd
import pytest

from pf2lora_ray.config import load_config
from pf2lora_ray.experiment import run_experiment


def final_rows(out):
    ranks = pd.read_parquet(out / "ranks.parquet")
    metrics = pd.read_parquet(out / "metrics.parquet")
    last = ranks["round"].max()
    mse = metrics[
        (metrics["round"] == last)
        & (metrics["split"] == "test")
        & (metrics["metric"] == "mse")
        & metrics["client_id"].notna()
    ]
    return ranks[ranks["round"] == last], mse.set_index("client_id")["value"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    sets = ["runtime.backend=local", "runtime.quiet=true"]
    run_experiment(load_config("jobs/synthetic_rank.yaml", sets), out / "pf2lora")
    run_experiment(
        load_config("jobs/synthetic_rank.yaml", [*sets, "algorithm.name=homlora"]), out / "homlora"
    )
    return out


def test_pf2lora_recovers_every_clients_true_rank(study):
    ranks, _ = final_rows(study / "pf2lora")
    assert len(ranks) == 10
    assert set(ranks["true_rank"]) == {4, 5, 6}
    assert (ranks["energy_rank"] == ranks["true_rank"]).all(), ranks[
        ["client_id", "energy_rank", "true_rank"]
    ]


def test_homlora_is_worse_on_every_client_with_extra_rank(study):
    ranks, pf2 = final_rows(study / "pf2lora")
    _, hom = final_rows(study / "homlora")
    common = load_config("jobs/synthetic_rank.yaml").synthetic.common_rank
    extra = ranks.loc[ranks["true_rank"] > common, "client_id"].tolist()
    assert extra
    assert all(hom[k] > pf2[k] for k in extra), pd.DataFrame({"pf2lora": pf2, "homlora": hom})


def test_results_directory_layout(study):
    out = study / "pf2lora"
    for name in (
        "config.yaml",
        "runs.parquet",
        "metrics.parquet",
        "ranks.parquet",
        "system.parquet",
        "checkpoints/latest.json",
    ):
        assert (out / name).exists(), name
    runs = pd.read_parquet(out / "runs.parquet")
    assert runs.loc[0, "status"] == "completed" and runs.loc[0, "algorithm"] == "pf2lora"
    assert runs.loc[0, "adapter.r"] == 4
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert list(metrics.columns) == ["run_id", "round", "client_id", "split", "metric", "value"]
    agg = metrics[metrics["client_id"].isna()]
    assert {"mse.mean", "mse.std", "mse.worst_decile"} <= set(agg["metric"])


def test_same_seed_same_results(tmp_path):
    sets = [
        "runtime.backend=local",
        "runtime.quiet=true",
        "fed.rounds=2",
        "synthetic.train_size=64",
        "fed.clients_per_round=4",
    ]
    for name in ("a", "b"):
        run_experiment(load_config("jobs/synthetic_rank.yaml", sets), tmp_path / name)
    a = pd.read_parquet(tmp_path / "a" / "metrics.parquet")
    b = pd.read_parquet(tmp_path / "b" / "metrics.parquet")
    pd.testing.assert_frame_equal(a, b)
