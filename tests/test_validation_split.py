"""data.val_fraction: each client's validation rows, carved from its training share."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers import tiny_synthetic

from pf2lora_ray.config import load_config
from pf2lora_ray.data.partition import SCHEMES, PartitionError, split_off_validation
from pf2lora_ray.tasks.text import ClientSplits


def _splits(scheme: str, **data: object) -> ClientSplits:
    n, clients = 400, 5
    sets = [
        "model.name=minilm", "data.name=glue", "data.task=sst2", f"data.partition={scheme}",
        f"fed.num_clients={clients}", f"fed.clients_per_round={clients}",
        *(f"data.{k}={v}" for k, v in data.items()),
    ]
    cfg = load_config(None, sets)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n)
    groups = np.arange(n) % clients
    return ClientSplits(cfg, n, labels=labels, groups=groups)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("caps", [{}, {"max_train_per_client": 20, "max_val_per_client": 3}])
def test_validation_rows_never_meet_train_or_test(scheme: str, caps: dict) -> None:
    splits = _splits(scheme, val_fraction=0.2, similarity=0.5, **caps)
    seen: set[int] = set()
    for k, (train, val, test) in splits(range(5)).items():
        assert val.size > 0 and train.size > 0 and test.size > 0
        tr, va, te = set(train.tolist()), set(val.tolist()), set(test.tolist())
        assert not (tr & va) and not (tr & te) and not (va & te), f"client {k} overlaps"
        assert not (seen & (tr | va | te)), "clients share rows"
        seen |= tr | va | te
        assert (tr | va | te) <= set(splits.parts[k].tolist())


def test_zero_val_fraction_keeps_todays_splits() -> None:
    with_val = _splits("iid", val_fraction=0.25)(range(5))
    without = _splits("iid", val_fraction=0.0)(range(5))
    for k in range(5):
        train, val, test = without[k]
        assert val.size == 0
        np.testing.assert_array_equal(test, with_val[k][2])  # the test rows do not move
        np.testing.assert_array_equal(np.sort(np.r_[with_val[k][0], with_val[k][1]]), train)


def test_split_off_validation_edges() -> None:
    train, val = split_off_validation(np.arange(10), 0.1, seed=0, client=3)
    assert val.size == 1 and train.size == 9
    again = split_off_validation(np.arange(10), 0.1, seed=0, client=3)
    np.testing.assert_array_equal(val, again[1])  # drawn from (seed, client) only
    with pytest.raises(PartitionError, match="client 2"):
        split_off_validation(np.arange(1), 0.1, seed=0, client=2)
    with pytest.raises(PartitionError, match="val_fraction"):
        split_off_validation(np.arange(4), 1.0, seed=0, client=0)


def test_evaluation_writes_val_rows_beside_test(tmp_path) -> None:
    from pf2lora_ray.experiment import run_experiment

    run_experiment(tiny_synthetic("data.val_fraction=0.25"), tmp_path / "val")
    metrics = pd.read_parquet(tmp_path / "val" / "metrics.parquet")
    evaluated = metrics[metrics["split"] != "train"]
    by_split = {s: set(g["metric"]) for s, g in evaluated.groupby("split")}
    assert set(by_split) == {"val", "test"}
    assert by_split["val"] == by_split["test"]  # diagnostics and aggregates included
    assert {"mse.shared_only", "norm_D", "mse.mean"} <= by_split["val"]
    run_experiment(tiny_synthetic("data.val_fraction=0"), tmp_path / "none")
    none = pd.read_parquet(tmp_path / "none" / "metrics.parquet")
    assert "val" not in set(none["split"])


def test_synthetic_validation_rows_come_from_the_training_draws() -> None:
    from pf2lora_ray.tasks import task_for

    full = task_for(tiny_synthetic("data.val_fraction=0")).client_data([1])[1]
    part = task_for(tiny_synthetic("data.val_fraction=0.25")).client_data([1])[1]
    assert full.val is None and len(full.train) == 64
    assert len(part.train) == 48 and len(part.val) == 16
    def rows(split) -> set[tuple]:
        return {tuple(x.tolist()) for x in split.x}

    assert rows(part.train) | rows(part.val) == rows(full.train)
    assert not rows(part.train) & rows(part.val)
    assert (full.test.x == part.test.x).all()  # the test draws do not depend on it
