"""PF2LoRA as the paper's Algorithm 1: weighting, scaling, init, persisted upper state,
diagnostics, and the centralized-LoRA reference row (PF2LORA.md, "What the paper prints")."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from test_algorithms import host_for, local_update, synthetic, torch_theta

from pf2lora_ray.algorithms.base import ClientRound, RoundContext
from pf2lora_ray.algorithms.centralized_lora import concat_splits
from pf2lora_ray.algorithms.pf2lora import ADAM, is_plus_zero, split_state
from pf2lora_ray.client import ClientHost
from pf2lora_ray.config import ConfigError
from pf2lora_ray.experiment import run_experiment
from pf2lora_ray.tasks.base import ClientData


def test_default_weighting_is_uniform_and_examples_is_n_k():
    data = ClientData(0, list(range(37)), [])
    uniform = host_for("homlora").algorithm
    examples = host_for("homlora", "fed.weighting=examples").algorithm
    assert uniform.cfg.fed.weighting == "uniform"
    assert uniform.weight(data) == 1.0
    assert examples.weight(data) == 37.0


def test_uniform_weighting_gives_the_plain_mean_of_unequal_clients(tmp_path):
    """Two clients with 64 and 16 examples: the driver's update is the unweighted mean."""
    host = host_for("homlora", "fed.local_steps=2", clients=(0, 1))
    host.data[1].train.x = host.data[1].train.x[:16]
    host.data[1].train.y = host.data[1].train.y[:16]
    theta = host.initial_shared()
    result = host.train(theta, 1, [0, 1])
    assert result.weight == 2.0
    deltas = []
    for k in (0, 1):
        local = local_update(host, torch_theta(host), k)
        deltas.append({n: (local.theta[n] - torch.from_numpy(theta[n])).double() for n in theta})
    for n in theta:
        mean = (deltas[0][n] + deltas[1][n]).numpy() / 2
        np.testing.assert_allclose(result.summed[n] / result.weight, mean, rtol=1e-6, atol=1e-9)


def test_personal_scale_equals_shared_scale_by_default():
    host = host_for("pf2lora", "adapter.r=4", "adapter.r_personal=2", "adapter.alpha=8")
    layer = host.model.proj
    assert layer.scaling == pytest.approx(2.0) and layer.scaling_personal == pytest.approx(2.0)
    louder = host_for("pf2lora", "adapter.r=4", "adapter.r_personal=2", "adapter.alpha=8",
                      "adapter.alpha_personal=8")
    assert louder.model.proj.scaling_personal == pytest.approx(4.0)


@pytest.mark.parametrize("init", ["gaussian", "kaiming"])
def test_adapter_init_draws_a_and_c_and_zeroes_b_and_d(init):
    host = host_for("pf2lora", f"adapter.init={init}", "adapter.r=4", "synthetic.dim=64")
    theta, phi = host.initial_shared(), host.personal_state(0)
    a, c = theta["proj.lora_A"], phi["proj.lora_C"].numpy()
    assert not theta["proj.lora_B"].any() and not phi["proj.lora_D"].any()
    if init == "gaussian":  # N(0, 1/r^2): std 0.25 at r = 4
        assert abs(a.std() - 0.25) < 0.03 and abs(c.std() - 0.25) < 0.05
        assert abs(a.mean()) < 0.03
    else:  # Kaiming-uniform(a=sqrt(5)): U(-1/sqrt(n), 1/sqrt(n)), n = 64
        assert np.abs(a).max() <= 1 / 8 and np.abs(a).max() > 0.1
    other = host_for("pf2lora", f"adapter.init={init}", "adapter.r=4").personal_state(1)
    assert not np.array_equal(c, other["proj.lora_C"].numpy())  # per-client draws


@pytest.mark.parametrize("estimator", ["paper", "shared_batches"])
@pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
def test_every_estimator_lowers_the_clients_training_loss(estimator, hvp):
    host = host_for("pf2lora", f"pf2lora.estimator={estimator}", f"pf2lora.hvp={hvp}",
                    "fed.local_steps=20", "algorithm.lr=0.05")
    theta = torch_theta(host)
    before = {**theta, **host.personal_state(2)}
    local = local_update(host, theta, 2)
    from test_algorithms import train_loss

    assert train_loss(host, {**local.theta, **local.phi}, 2) < 0.7 * train_loss(host, before, 2)


def test_paper_estimator_draws_four_independent_batch_streams():
    from pf2lora_ray.algorithms.pf2lora import PI, XI, XI_TILDE, ZETA

    host = host_for("pf2lora")
    client = ClientRound(host.task, host.model, {}, {}, host.data[1], RoundContext(0, 3, 1))
    firsts = [next(host.algorithm.batches(client, p))["x"] for p in (PI, XI, XI_TILDE, ZETA)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(firsts[i], firsts[j])


def test_the_paper_estimator_takes_one_lower_step():
    with pytest.raises(ConfigError, match="pf2lora.lower_steps"):
        synthetic("pf2lora", "pf2lora.lower_steps=2")
    assert synthetic("pf2lora", "pf2lora.lower_steps=2",
                     "pf2lora.estimator=shared_batches").pf2lora.lower_steps == 2


def test_persisted_upper_state_carries_adamw_moments_between_rounds():
    host = host_for("pf2lora", "pf2lora.upper_state=persist", "fed.local_steps=3")
    theta = host.initial_shared()
    host.train(theta, 1, [0])
    phi = host.personal_state(0)
    assert int(phi[f"{ADAM}t"]) == 3
    moments = sorted(k for k in phi if k.startswith(f"{ADAM}m."))
    assert moments == sorted(f"{ADAM}m.{k}" for k in theta)
    host.train(theta, 2, [0])
    assert int(host.personal_state(0)[f"{ADAM}t"]) == 6
    # Model parameters seen by evaluation exclude the optimizer entries.
    assert set(split_state(host.personal_state(0))) == {"proj.lora_C", "proj.lora_D"}
    # reset (default): nothing but C, D is kept.
    plain = host_for("pf2lora", "fed.local_steps=3")
    plain.train(plain.initial_shared(), 1, [0])
    assert set(plain.personal_state(0)) == {"proj.lora_C", "proj.lora_D"}


def test_persisted_moments_change_the_next_round_and_survive_a_checkpoint(tmp_path):
    from pf2lora_ray.checkpoint import load_checkpoint

    sets = ["pf2lora.upper_state=persist", "fed.rounds=2", "fed.eval_every=2",
            "fed.num_clients=4", "fed.clients_per_round=4"]
    run_experiment(synthetic("pf2lora", *sets), tmp_path / "persist")
    run_experiment(synthetic("pf2lora", *sets[1:]), tmp_path / "reset")
    cfg = synthetic("pf2lora", *sets)
    _, _, personal = load_checkpoint(tmp_path / "persist", cfg)
    assert int(personal[0][f"{ADAM}t"][0]) == 2 * cfg.fed.local_steps
    a = pd.read_parquet(tmp_path / "persist" / "metrics.parquet")
    b = pd.read_parquet(tmp_path / "reset" / "metrics.parquet")
    last = lambda m: m[(m["round"] == 2) & (m["metric"] == "mse")]["value"].to_numpy()  # noqa: E731
    assert not np.allclose(last(a), last(b))


def test_diagnostics_report_shared_only_metric_and_personal_norms(tmp_path):
    run_experiment(synthetic("pf2lora", "fed.rounds=2", "fed.eval_every=1"), tmp_path / "r")
    m = pd.read_parquet(tmp_path / "r" / "metrics.parquet")
    per_client = m[m["client_id"].notna() & (m["split"] == "test")]
    assert {"mse", "mse.shared_only", "norm_C", "norm_D"} <= set(per_client["metric"])
    wide = per_client[per_client["round"] == 2].pivot(index="client_id", columns="metric",
                                                      values="value")
    assert (wide["norm_D"] > 0).all() and (wide["norm_C"] > 0).all()
    assert not np.allclose(wide["mse"], wide["mse.shared_only"])
    # Round 1 before any personal training would give equal values; check the definition:
    host = host_for("pf2lora")
    theta = torch_theta(host)
    params = {**theta, **host.personal_state(0)}
    diag = host.algorithm.diagnostics(host.client_round(theta, 1, 0), params)
    assert diag["norm_D"] == 0.0  # D starts at zero ...
    full = host.task.evaluate(host.model, params, host.data[0])
    assert diag["mse.shared_only"] == pytest.approx(full["mse"])  # ... so nothing is switched off
    c = float(torch.linalg.norm(params["proj.lora_C"]))
    assert diag["norm_C"] == pytest.approx(c)


def test_shared_only_metrics_reused_exactly_when_d_is_plus_zero(monkeypatch):
    """A never-trained client (D_k = +0.0) reuses the evaluated metrics; others evaluate.

    Either way the values equal the two-pass definition bit for bit.
    """
    host = host_for("pf2lora", "synthetic.layers=2", "data.val_fraction=0.25")
    host.train(host.initial_shared(), 1, [0])  # client 0's D_k leaves zero, client 1's does not
    theta_t = torch_theta(host)
    calls = []
    evaluate = host.task.evaluate
    monkeypatch.setattr(host.task, "evaluate", lambda *a: calls.append(1) or evaluate(*a))
    for client, trained in ((0, True), (1, False)):
        params = host.eval_params(theta_t, 2, client)
        data = host.data[client].for_split("test")
        metrics = host.task.evaluate(host.model, params, data)
        scored = replace(host.client_round(theta_t, 2, client), data=data)
        calls.clear()
        reused = host.algorithm.diagnostics(scored, params, dict(metrics))
        assert len(calls) == (1 if trained else 0)
        two_pass = host.algorithm.diagnostics(scored, params)
        assert reused.keys() == two_pass.keys()
        assert all(repr(reused[m]) == repr(two_pass[m]) for m in reused)  # bit for bit
    assert not is_plus_zero(torch.tensor([0.0, -0.0]))
    assert not is_plus_zero(torch.tensor([0.0, float("nan")]))
    assert is_plus_zero(torch.zeros(3, 2)) and is_plus_zero(torch.zeros(0))


def test_algorithms_without_a_personal_level_report_no_diagnostics():
    host = host_for("homlora")
    params = torch_theta(host)
    assert host.algorithm.diagnostics(host.client_round(params, 1, 0), params) == {}


# ------------------------------------------------------------ centralized_lora


def test_concat_splits_joins_every_field_in_order():
    host = host_for("homlora")
    a, b = host.data[0].train, host.data[1].train
    joined = concat_splits([a, b])
    assert len(joined) == len(a) + len(b)
    assert torch.equal(joined.x[len(a):], b.x) and torch.equal(joined.y[: len(a)], a.y)


def test_centralized_lora_trains_one_chain_on_the_pooled_data(tmp_path):
    cfg = synthetic("centralized_lora", "fed.num_clients=4", "fed.clients_per_round=4",
                    "fed.local_steps=2", "fed.rounds=1")
    host = ClientHost(cfg, range(4))
    assert host.algorithm.configure_round(1, [0, 1, 2, 3]) == [0]
    pooled = host.algorithm.pooled(host.task)
    assert pooled.num_train == sum(host.data[k].num_train for k in range(4))
    theta = torch_theta(host)
    ctx = RoundContext(cfg.seed, 1, 0)
    local = host.algorithm.local_update(host.client_round(theta, 1, 0))
    # Same total step count as a federated round: clients_per_round x local_steps AdamW steps.
    from pf2lora_ray.algorithms.base import AdamW, BatchStream, loss_and_grads

    batches = BatchStream(host.task, pooled, cfg.data.batch_size, ctx.rng())
    opt, params = AdamW(cfg.algorithm.lr), {k: v.clone() for k, v in theta.items()}
    for _ in range(4 * 2):
        _, g = loss_and_grads(host.task, host.model, params, sorted(params), next(batches))
        params = opt.step(params, g)
    for k in theta:
        torch.testing.assert_close(local.theta[k], params[k], rtol=0, atol=0)


def test_centralized_lora_run_evaluates_every_client_and_beats_nothing_trained(tmp_path):
    cfg = synthetic("centralized_lora", "fed.rounds=3", "fed.eval_every=3")
    run_experiment(cfg, tmp_path / "c")
    m = pd.read_parquet(tmp_path / "c" / "metrics.parquet")
    test = m[
        (m["metric"] == "mse") & (m["split"] == "test") & m["client_id"].notna() & (m["round"] == 3)
    ]
    assert sorted(test["client_id"]) == list(range(cfg.fed.num_clients))
    train = m[(m["split"] == "train") & m["client_id"].notna()]
    assert set(train["client_id"]) == {0}  # one trainer per round
    assert test["value"].notna().all() and math.isfinite(test["value"].mean())


def test_centralized_lora_refuses_a_personal_head():
    with pytest.raises(ConfigError, match="model.head"):
        host_for("centralized_lora", "model.head=personal")
