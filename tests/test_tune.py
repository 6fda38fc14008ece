"""`pf2lora tune`: space parsing and validation (no Ray), and one small real tune."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import SYNTHETIC_JOB

from pf2lora_ray.config import ConfigError, load_config
from pf2lora_ray.tune import (
    TuneReporter,
    concurrency,
    load_space,
    overrides_of,
    parse_space,
    trial_bundles,
    trial_config,
)

BASE = load_config(SYNTHETIC_JOB)


def _space(**changes: object) -> dict:
    data = {
        "metric": "test.mse.mean",
        "mode": "min",
        "space": {
            "adapter.r_personal": {"grid": [1, 2]},
            "algorithm.lr": {"loguniform": [0.001, 0.03]},
            "fed.local_steps": {"randint": [2, 5]},
        },
    }
    return {**data, **changes}


def test_ready_spaces_parse() -> None:
    space = load_space("jobs/spaces/synthetic.yaml", BASE)
    assert space.metric == "val.mse.mean" and space.mode == "min"
    assert set(space.params) >= {"adapter.r_personal", "pf2lora.lr_lower", "algorithm.lr"}
    assert "adapter.alpha" in space.params
    sst2 = load_space("jobs/spaces/sst2.yaml", BASE)
    assert sst2.mode == "max" and "adapter.r" in sst2.params


def test_param_space_maps_to_tune() -> None:
    space = parse_space(_space(), BASE)
    tuned = space.param_space()
    assert tuned["adapter.r_personal"] == {"grid_search": [1, 2]}
    assert (tuned["algorithm.lr"].lower, tuned["algorithm.lr"].upper) == (0.001, 0.03)
    assert space.params["fed.local_steps"].candidates() == [2, 4]  # randint's high is exclusive


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"space": {"adapter.rr": {"choice": [1]}}}, "adapter.rr"),
        ({"space": {"adapter.r": {"gird": [1]}}}, "space.adapter.r"),
        ({"space": {"adapter.r": {"choice": [2, 0]}}}, "adapter.r"),  # r = 0 is impossible
        ({"space": {"adapter.r": {"uniform": [1.0, 4.0]}}}, "adapter.r"),  # r is an integer
        ({"space": {"algorithm.lr": {"loguniform": [0.0, 0.1]}}}, "algorithm.lr"),
        ({"space": {"algorithm.lr": {"uniform": [0.1, 0.01]}}}, "algorithm.lr"),
        ({"space": {}}, "space"),
        ({"metric": "test.mse"}, "metric"),
        ({"metric": "test.msee.mean"}, "metric"),
        ({"mode": "max"}, "mode"),  # mse is better low
        ({"mode": "best"}, "mode"),
        ({"search": "bayes"}, "search"),
        ({"search": "grid"}, "space.algorithm.lr"),  # grid search needs only grids
        ({"scheduler": "pbt"}, "scheduler"),
        ({"fixed": {"fed.roundz": 3}}, "fed.roundz"),
        ({"samples": 3}, "samples"),
    ],
)
def test_bad_spaces_name_the_key(changes: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        parse_space(_space(**changes), BASE)


def test_cli_bad_space_exits_2(tmp_path: Path) -> None:
    from pf2lora_ray.cli import main

    bad = tmp_path / "space.yaml"
    bad.write_text(yaml.safe_dump(_space(space={"adapter.nope": {"choice": [1]}})))
    out = tmp_path / "out"
    assert main(["tune", SYNTHETIC_JOB, "--space", str(bad), "--out", str(out)]) == 2
    assert not out.exists()


def test_trial_config_and_bundles() -> None:
    cfg = trial_config(BASE, {"adapter.r_personal": 3, "resources.num_cpus_per_actor": 0.5})
    assert cfg.adapter.r_personal == 3 and cfg.runtime.quiet
    assert cfg.checkpoint.every == cfg.fed.eval_every  # so a resumed trial continues
    assert trial_bundles(cfg) == [{"CPU": 0.5}, {"CPU": 0.5}]
    four = trial_config(BASE, {"resources.num_actors": 4, "resources.num_gpus_per_actor": 0.25})
    assert trial_bundles(four, driver_cpus=1.0) == [{"CPU": 1.0}] + [{"CPU": 1.0, "GPU": 0.25}] * 4
    local = trial_config(BASE, {"runtime.backend": "local"})
    assert trial_bundles(local) == [{"CPU": 1.0}]


def test_concurrency_from_cluster() -> None:
    one_cpu_trial = [{"CPU": 0.5}, {"CPU": 0.5}]
    assert concurrency(one_cpu_trial, {"CPU": 2.0}, 0) == 2
    assert concurrency(one_cpu_trial, {"CPU": 8.0}, 3) == 3
    gpu_trial = [{"CPU": 0.5}, {"CPU": 1.0, "GPU": 0.5}]
    assert concurrency(gpu_trial, {"CPU": 16.0, "GPU": 1.0}, 0) == 2
    with pytest.raises(ConfigError, match="reserves"):
        concurrency([{"CPU": 0.5}, {"CPU": 4.0}], {"CPU": 2.0}, 0)


def test_overrides_rebuild_the_config() -> None:
    from pf2lora_ray.config import Config, flatten, from_dict, to_dict

    job = overrides_of(BASE)
    defaults = flatten(to_dict(Config()))
    assert job and all(defaults[k] != v for k, v in flatten(job).items())  # only overrides
    assert "r_personal" not in job["adapter"]  # the job keeps the default r~ = 2
    assert from_dict(job) == BASE


def test_reporter_reports_eval_rounds_and_a_resumed_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from helpers import tiny_synthetic

    import pf2lora_ray.tune.trial as tune_module
    from pf2lora_ray.driver import DriverState
    from pf2lora_ray.experiment import run_experiment

    reported: list[dict] = []
    monkeypatch.setattr(tune_module.tune, "report", reported.append)
    cfg = tiny_synthetic("fed.rounds=4", "fed.eval_every=2")
    run_experiment(cfg, tmp_path, extra_callbacks=[TuneReporter("test.mse.mean", tmp_path)])
    assert [r["round"] for r in reported] == [2, 4]
    metrics = pd.read_parquet(tmp_path / "metrics.parquet")
    test_rows = metrics[metrics["split"] == "test"]
    mean = test_rows[(test_rows["metric"] == "mse.mean") & (test_rows["round"] == 4)]["value"]
    assert reported[1]["test.mse.mean"] == pytest.approx(float(mean.iloc[0]))
    assert "train.train_loss.mean" in reported[1]
    # A run resumed from round 4's checkpoint first re-reports round 4 from its folder.
    reported.clear()
    state = DriverState(cfg, backend=None, theta={}, round=4)
    TuneReporter("test.mse.mean", tmp_path).on_start(state)
    assert len(reported) == 1 and reported[0]["round"] == 4
    assert reported[0]["test.mse.mean"] == pytest.approx(float(mean.iloc[0]))
    with pytest.raises(ConfigError, match="test.accuracy.mean"):
        run_experiment(cfg, tmp_path / "acc", extra_callbacks=[TuneReporter("test.accuracy.mean")])


@pytest.mark.ray
def test_small_tune_end_to_end(tmp_path: Path) -> None:
    import ray

    from pf2lora_ray.tune import run_tune

    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "metric": "val.mse.mean",
                "mode": "min",
                "fixed": {"resources.num_cpus_per_actor": 0.5},
                "space": {
                    "adapter.r_personal": {"grid": [1, 2]},
                    "pf2lora.lr_lower": {"loguniform": [0.01, 0.3]},
                },
            }
        )
    )
    cfg = load_config(
        SYNTHETIC_JOB, ["fed.rounds=2", "synthetic.train_size=64", "runtime.quiet=true"]
    )
    out = tmp_path / "tune"
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        best = run_tune(cfg, space, out, samples=1)
    finally:
        ray.shutdown()
    trials = pd.read_parquet(out / "trials.parquet")
    assert trials["trial_id"].nunique() == 2
    assert {"config/adapter.r_personal", "config/pf2lora.lr_lower"} <= set(trials.columns)
    assert sorted(trials["config/adapter.r_personal"]) == [1, 2]
    # eval_every 5 > rounds 2: the only evaluation is the final one, and Tune saw it.
    assert (trials["round"] == 2).all() and (trials["rounds_planned"] == 2).all()
    assert trials["val.mse.mean"].notna().all() and trials["test.mse.mean"].notna().all()
    for trial_id in trials["trial_id"]:
        assert (out / "trials" / trial_id / "metrics.parquet").exists()  # file or dataset folder
    job = load_config(best)
    assert job.fed.rounds == 2 and job.synthetic.train_size == 64
    chosen = trials.loc[trials["val.mse.mean"].idxmin()]
    assert job.adapter.r_personal == chosen["config/adapter.r_personal"]
    assert job.pf2lora.lr_lower == pytest.approx(chosen["config/pf2lora.lr_lower"])


def test_trials_completed_from_run_folders(tmp_path: Path) -> None:
    """An evaluation a run wrote but Tune never saw is added to trials.parquet."""
    from helpers import tiny_synthetic

    from pf2lora_ray.experiment import run_experiment
    from pf2lora_ray.tune.outputs import TRIALS_FILE, complete_from_runs

    cfg = tiny_synthetic("fed.rounds=3", "fed.eval_every=2", "adapter.r=4")
    run_experiment(cfg, tmp_path / "trials" / "t0")
    seen = pd.DataFrame(  # Tune saw round 2 only
        [{"trial_id": "t0", "round": 2, "val.mse.mean": 1.0, "config/adapter.r": 4}]
    )
    seen.to_parquet(tmp_path / TRIALS_FILE)
    complete_from_runs(tmp_path, ["adapter.r"])
    trials = pd.read_parquet(tmp_path / TRIALS_FILE).set_index("round")
    assert list(trials.index) == [2, 3]
    assert trials.loc[2, "val.mse.mean"] == 1.0  # what Tune saw is kept
    metrics = pd.read_parquet(tmp_path / "trials" / "t0" / "metrics.parquet")
    final = metrics[metrics["client_id"].isna() & (metrics["round"] == 3)]
    final = final.set_index(final["split"] + "." + final["metric"])["value"]
    assert trials.loc[3, "val.mse.mean"] == pytest.approx(final["val.mse.mean"])
    assert trials.loc[3, "test.mse.mean"] == pytest.approx(final["test.mse.mean"])
    assert trials.loc[3, "rounds_planned"] == 3 and trials.loc[3, "config/adapter.r"] == 4


@pytest.mark.parametrize(
    ("rounds", "eval_every", "grace", "cut"),
    [(8, 4, 0.75, 8), (8, 2, 0.75, 6), (8, 1, 0.75, 6), (24, 4, 0.75, 20), (8, 4, 0.5, 4)],
)
def test_asha_first_cut_never_before_grace(rounds, eval_every, grace, cut) -> None:
    from pf2lora_ray.config import FedConfig
    from pf2lora_ray.tune.search import first_cut

    fed = FedConfig(num_clients=2, clients_per_round=2, rounds=rounds, eval_every=eval_every)
    assert first_cut(fed, grace) == cut
    assert cut >= grace * rounds


def test_val_metric_needs_validation_rows(capsys) -> None:
    data = {"metric": "val.mse.mean", "mode": "min", "space": {"algorithm.lr": {"grid": [0.01]}}}
    assert parse_space(data, BASE).split == "val"
    no_val = load_config(SYNTHETIC_JOB, ["data.val_fraction=0"])
    with pytest.raises(ConfigError, match="data.val_fraction"):
        parse_space(data, no_val)
    with pytest.raises(ConfigError, match="grace"):
        parse_space({**data, "scheduler": "asha", "grace": 1.5}, BASE)
    parse_space({**data, "scheduler": "asha", "grace": 0.25}, BASE)
    assert "can stop slow starters" in capsys.readouterr().err
