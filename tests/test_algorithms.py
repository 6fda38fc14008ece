"""Baseline algorithms: each one's update or aggregation on hand-made tensors, then a smoke run."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

from pf2lora_ray.algorithms import ALGORITHMS
from pf2lora_ray.algorithms.base import ClientRound, Local, RoundContext
from pf2lora_ray.algorithms.hetlora import (
    RANK,
    client_rank,
    pruned_rank,
    update_norm,
)
from pf2lora_ray.client import ClientHost
from pf2lora_ray.config import load_config
from pf2lora_ray.experiment import run_experiment
from pf2lora_ray.tasks.base import ClientData

JOB = "jobs/synthetic_rank.yaml"


def synthetic(name: str, *sets: str):
    """The synthetic job, shrunk, on the in-process backend."""
    base = ["runtime.backend=local", "runtime.quiet=true", "synthetic.train_size=64"]
    return load_config(JOB, [*base, f"algorithm.name={name}", *sets])


def host_for(name: str, *sets: str, clients=(0, 1, 2, 3)) -> ClientHost:
    return ClientHost(synthetic(name, *sets), clients)


def torch_theta(host: ClientHost) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in host.initial_shared().items()}


def local_update(host: ClientHost, theta, client: int, round_: int = 1) -> Local:
    return host.algorithm.local_update(host.client_round(theta, round_, client))


def train_loss(host: ClientHost, params, client: int) -> float:
    data = host.data[client]
    batch = host.task.batch(data.train, np.arange(data.num_train))
    return float(host.task.loss(host.model, params, batch))


# ------------------------------------------------------------ homlora_ft


def test_homlora_ft_evaluation_fine_tunes_a_copy_and_lowers_train_loss() -> None:
    host = host_for("homlora_ft", "finetune.steps=20", "algorithm.lr=0.01")
    theta = torch_theta(host)
    before = {k: v.clone() for k, v in theta.items()}
    tuned = host.algorithm.eval_params(host.client_round(theta, 1, 0))
    assert train_loss(host, tuned, 0) < 0.9 * train_loss(host, theta, 0)
    for k in theta:  # nothing persisted: theta itself is untouched
        assert torch.equal(theta[k], before[k])
    assert not torch.equal(tuned["proj.lora_B"], theta["proj.lora_B"])


# ------------------------------------------------------------ per_fedavg


@dataclass
class Split:
    x: torch.Tensor  # (n, 2)
    y: torch.Tensor  # (n,)

    def __len__(self) -> int:
        return len(self.x)


class ScalarLinearTask:
    """f(w) = 0.5 * mean((X w - y)^2): gradient X^T (X w - y) / n, Hessian X^T X / n."""

    family = "synthetic"

    def batch(self, split: Split, idx: np.ndarray) -> dict:
        return {"x": split.x[idx], "y": split.y[idx]}

    def loss(self, model, params, batch) -> torch.Tensor:
        return 0.5 * ((batch["x"] @ params["w"] - batch["y"]) ** 2).mean()


def scalar_round(w0: np.ndarray, data: ClientData) -> ClientRound:
    """Client 0's round 1 of the scalar task from w0 (no model, no personal state)."""
    theta = {"w": torch.tensor(w0)}
    return ClientRound(ScalarLinearTask(), None, theta, {}, data, RoundContext(0, 1, 0))


@pytest.mark.parametrize("variant", ["first_order", "hessian_free"])
def test_per_fedavg_steps_match_the_hand_computation(variant: str) -> None:
    rng = np.random.default_rng(0)
    x, y, w0 = rng.standard_normal((4, 2)), rng.standard_normal(4), rng.standard_normal(2)
    alpha, beta, steps = 0.1, 0.05, 2
    cfg = load_config(
        JOB,
        [
            "algorithm.name=per_fedavg",
            f"per_fedavg.variant={variant}",
            f"per_fedavg.lr_inner={alpha}",
            f"algorithm.lr={beta}",
            f"fed.local_steps={steps}",
            "per_fedavg.delta=0.0001",
        ],
    )
    # 4 examples < batch size: every batch (D, D', D'') is the whole split.
    data = ClientData(0, Split(torch.tensor(x), torch.tensor(y)), None)
    algo = ALGORITHMS["per_fedavg"](cfg)
    out = algo.local_update(scalar_round(w0, data))

    def grad(w: np.ndarray) -> np.ndarray:
        return x.T @ (x @ w - y) / len(y)

    hessian = x.T @ x / len(y)
    w = w0
    for _ in range(steps):
        g = grad(w - alpha * grad(w))
        if variant == "hessian_free":  # exact for a quadratic: finite differences are exact
            g = g - alpha * hessian @ g
        w = w - beta * g
    np.testing.assert_allclose(out.theta["w"].numpy(), w, rtol=1e-7, atol=1e-9)
    assert out.phi == {}


def test_per_fedavg_adamw_outer_step_matches_the_hand_computation() -> None:
    """``per_fedavg.outer: adamw``: the first-order meta-gradient through AdamW (fresh moments)."""
    rng = np.random.default_rng(1)
    x, y, w0 = rng.standard_normal((4, 2)), rng.standard_normal(4), rng.standard_normal(2)
    alpha, lr, wd, steps = 0.1, 0.05, 0.01, 3
    overrides = [
        "algorithm.name=per_fedavg", "per_fedavg.outer=adamw", f"per_fedavg.lr_inner={alpha}",
        f"algorithm.lr={lr}", f"algorithm.weight_decay={wd}", f"fed.local_steps={steps}",
    ]
    algo = ALGORITHMS["per_fedavg"](load_config(JOB, overrides))
    data = ClientData(0, Split(torch.tensor(x), torch.tensor(y)), None)
    out = algo.local_update(scalar_round(w0, data))

    def grad(w: np.ndarray) -> np.ndarray:
        return x.T @ (x @ w - y) / len(y)

    w, m, v = w0, np.zeros(2), np.zeros(2)
    for t in range(1, steps + 1):
        g = grad(w - alpha * grad(w))
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.999**t)
        w = w * (1 - lr * wd) - lr * m_hat / (np.sqrt(v_hat) + 1e-8)
    np.testing.assert_allclose(out.theta["w"].numpy(), w, rtol=1e-7, atol=1e-9)
    sgd = ALGORITHMS["per_fedavg"](load_config(JOB, [*overrides, "per_fedavg.outer=sgd"]))
    plain = sgd.local_update(scalar_round(w0, data))
    assert not np.allclose(plain.theta["w"].numpy(), w)  # the option changes the update


def test_per_fedavg_evaluation_takes_one_inner_step() -> None:
    host = host_for("per_fedavg", "per_fedavg.lr_inner=0.01")
    theta = torch_theta(host)
    params = host.algorithm.eval_params(host.client_round(theta, 1, 0))
    assert train_loss(host, params, 0) < train_loss(host, theta, 0)
    torch.testing.assert_close(params["proj.lora_B"], theta["proj.lora_B"], atol=0.2, rtol=0)


# ------------------------------------------------------------ hetlora


def test_hetlora_norm_weighted_average_of_zero_padded_factors() -> None:
    cfg = load_config(
        JOB, ["algorithm.name=hetlora", "hetlora.r_min=1", "hetlora.r_max=2", "adapter.alpha=2"]
    )
    algo = ALGORITHMS["hetlora"](cfg)  # s = alpha / r_max = 1
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    # Client 0 has rank 1: its second row of A / column of B arrive as zero padding.
    c0 = {"proj.lora_A": t([[1, 0], [0, 0]]), "proj.lora_B": t([[2, 0], [0, 0]])}  # BA norm 2
    c1 = {"proj.lora_A": t([[1, 0], [0, 1]]), "proj.lora_B": t([[0, 3], [0, 0]])}  # BA norm 3
    theta_t = {k: torch.zeros(2, 2, dtype=torch.float64) for k in c0}
    data = ClientData(0, range(10), None)
    summed, total = {k: np.zeros((2, 2)) for k in c0}, 0.0
    for c, r in ((c0, 1), (c1, 2)):
        client = ClientRound(None, None, theta_t, {}, data, RoundContext(0, 1, 0))
        w, x = algo.contribution(client, Local(c, {RANK: torch.tensor([r])}))
        total += w
        for k in summed:
            summed[k] += w * x[k].numpy()
    assert total == pytest.approx(5.0)
    theta = {k: np.full((2, 2), 7.0) for k in c0}  # replaced, not moved by a delta
    new = algo.aggregate(theta, summed, total)
    np.testing.assert_allclose(new["proj.lora_A"], [[1.0, 0.0], [0.0, 0.6]])
    np.testing.assert_allclose(new["proj.lora_B"], [[0.8, 1.8], [0.0, 0.0]])


def test_hetlora_update_norm_is_the_frobenius_norm_of_the_product() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)
    params = {"l.lora_A": a, "l.lora_B": b, "head.weight": torch.ones(2)}
    assert update_norm(params, 0.5) == pytest.approx(float(torch.linalg.norm(0.5 * b @ a)))


def test_hetlora_client_trains_only_its_rank_and_sends_zero_padding() -> None:
    host = host_for("hetlora", "hetlora.r_min=1", "hetlora.r_max=4", clients=range(10))
    theta = torch_theta(host)
    client = next(k for k in range(10) if int(host.personal_state(k)[RANK]) < 4)
    r = int(host.personal_state(client)[RANK])
    assert theta["proj.lora_A"][r:].abs().sum() > 0  # the global A has rows beyond r
    out = local_update(host, theta, client)
    a, b = out.theta["proj.lora_A"], out.theta["proj.lora_B"]
    r_new = int(out.phi[RANK])
    assert 1 <= r_new <= r
    assert torch.all(a[r_new:] == 0) and torch.all(b[:, r_new:] == 0)
    assert b[:, :r_new].abs().sum() > 0
    weight, x = host.algorithm.contribution(host.client_round(theta, 1, client), out)
    assert weight > 0 and x.keys() == theta.keys()


def test_hetlora_self_pruning_rule() -> None:
    assert pruned_rank(4, 0.99, 1, tail_now=0.5, tail_prev=math.nan) == 4  # no previous round
    assert pruned_rank(4, 0.99, 1, tail_now=0.5, tail_prev=0.6) == 3  # tail fell: prune
    assert pruned_rank(4, 0.99, 1, tail_now=0.7, tail_prev=0.6) == 4  # tail grew: keep
    assert pruned_rank(8, 0.5, 2, tail_now=0.1, tail_prev=0.6) == 4
    assert pruned_rank(2, 0.99, 2, tail_now=0.1, tail_prev=0.6) == 2  # never below r_min


def test_hetlora_client_ranks_are_deterministic_and_cover_the_range() -> None:
    ranks = [client_rank(0, k, 2, 5) for k in range(200)]
    assert ranks == [client_rank(0, k, 2, 5) for k in range(200)]
    assert set(ranks) == {2, 3, 4, 5}
    assert ranks != [client_rank(1, k, 2, 5) for k in range(200)]


def test_hetlora_personal_rank_survives_a_checkpoint_round_trip() -> None:
    host = host_for("hetlora", clients=(0, 1))
    saved = host.get_personal()
    fresh = host_for("hetlora", clients=(0, 1))
    fresh.set_personal({k: {**v, RANK: np.array([1])} for k, v in saved.items()})
    assert int(fresh.personal_state(0)[RANK]) == 1
    assert {RANK, "hetlora.tail_norm"} <= set(saved[0])


# ------------------------------------------------------------ ffa_lora, fedsa_lora, local_lora


def test_ffa_lora_leaves_a_at_its_shared_init_and_sends_b_only() -> None:
    host = host_for("ffa_lora")
    theta = torch_theta(host)
    out = local_update(host, theta, 0)
    assert torch.equal(out.theta["proj.lora_A"], theta["proj.lora_A"])
    assert not torch.equal(out.theta["proj.lora_B"], theta["proj.lora_B"])
    _, delta = host.algorithm.contribution(host.client_round(theta, 1, 0), out)
    assert torch.all(delta["proj.lora_A"] == 0)
    assert host.algorithm.communicated_names(host.roles) == ["proj.lora_B"]
    assert host.algorithm.trainable_names(host.roles) == ["proj.lora_B"]


def test_fedsa_lora_aggregates_a_only_and_keeps_b_personal() -> None:
    host = host_for("fedsa_lora")
    theta0 = host.initial_shared()
    assert sorted(theta0) == ["proj.lora_A"]
    result = host.train(theta0, 1, [0, 1])
    assert sorted(result.summed) == ["proj.lora_A"]
    theta1 = host.algorithm.aggregate(theta0, result.summed, result.weight)
    assert not np.array_equal(theta1["proj.lora_A"], theta0["proj.lora_A"])
    b0, b1 = (host.personal[k]["proj.lora_B"] for k in (0, 1))
    assert b0.abs().sum() > 0 and not torch.equal(b0, b1)


def test_local_lora_never_communicates_and_inits_per_client() -> None:
    host = host_for("local_lora")
    assert host.initial_shared() == {}
    assert host.model.proj.r == host.cfg.adapter.r + host.cfg.adapter.r_personal
    a0, a1 = (host.personal_state(k)["proj.lora_A"].clone() for k in (0, 1))
    assert not torch.equal(a0, a1)
    result = host.train({}, 1, [0, 1])
    assert result.summed == {} and result.weight > 0
    assert host.algorithm.aggregate({}, result.summed, result.weight) == {}
    assert not torch.equal(host.personal[0]["proj.lora_A"], a0)  # trained locally
    assert host.algorithm.communicated_names(host.roles) == []


def test_default_accounting_counts_shared_and_personal() -> None:
    host = host_for("pf2lora")
    assert host.algorithm.communicated_names(host.roles) == ["proj.lora_A", "proj.lora_B"]
    assert host.algorithm.trainable_names(host.roles) == [
        "proj.lora_A",
        "proj.lora_B",
        "proj.lora_C",
        "proj.lora_D",
    ]


# ------------------------------------------------------------ every algorithm end to end


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_runs_the_synthetic_job(name: str, tmp_path) -> None:
    cfg = synthetic(name, "fed.rounds=2")
    run_experiment(cfg, tmp_path / name)
    metrics = pd.read_parquet(tmp_path / name / "metrics.parquet")
    assert len(metrics) > 0
    assert np.isfinite(metrics["value"].to_numpy(np.float64)).all()
    test_mse = metrics[(metrics["split"] == "test") & (metrics["metric"] == "mse")]
    assert len(test_mse) == cfg.fed.num_clients
    assert (tmp_path / name / "checkpoints" / "latest.json").exists()
