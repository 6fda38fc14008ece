"""Placement that follows the sampled clients: the pure rules, then on Ray against in-process.

The Ray tests run 12 clients with 4 sampled per round, so clients move between
actors every round; every algorithm must still equal the in-process backend.
"""

from __future__ import annotations

import numpy as np
import pytest

from pf2lora_ray.runtime import placement as place


def homes(num_clients: int, num_actors: int) -> dict[int, int]:
    return {k: i for i, b in enumerate(place.static_blocks(num_clients, num_actors)) for k in b}


def test_balance_evens_out_a_lopsided_sample_and_keeps_the_rest_home():
    home = homes(200, 2)  # clients 0-99 on actor 0, 100-199 on actor 1
    sample = [1, 5, 9, 20, 33, 41, 60, 77, 150, 199]  # 8 on actor 0, 2 on actor 1
    plan = place.balance(dict.fromkeys(sample, 1.0), home, 2)
    assert [len(plan.clients[i]) for i in (0, 1)] == [5, 5]
    assert plan.moved == 3 and all(src == 0 and dst == 1 for src, dst in plan.moves)
    assert sorted(k for ks in plan.clients.values() for k in ks) == sample  # none lost or doubled
    assert plan.clients[1][:2] == [150, 199] or {150, 199} <= set(plan.clients[1])


def test_balance_is_deterministic_and_lpt_on_costs():
    costs = {0: 5.0, 1: 4.0, 2: 3.0, 3: 3.0, 4: 2.0, 5: 1.0}
    home = dict.fromkeys(costs, 0)
    plans = [place.balance(costs, home, 3) for _ in range(3)]
    assert all(p == plans[0] for p in plans)
    loads = place.loads_of(plans[0], costs, 3)
    assert max(loads) == pytest.approx(place.lpt_makespan(list(costs.values()), 3))
    assert sum(loads) == pytest.approx(sum(costs.values()))


def test_clients_stay_home_when_the_sample_is_already_balanced():
    home = homes(12, 4)
    plan = place.balance(dict.fromkeys([0, 3, 6, 9], 1.0), home, 4)
    assert plan.moves == {} and plan.clients == {0: [0], 1: [3], 2: [6], 3: [9]}


def test_spread_puts_every_client_on_an_actor_evenly():
    home = {k: 0 if k < 150 else 1 for k in range(200)}  # drifted homes
    plan = place.spread(range(200), home, 2)
    assert [len(plan.clients[i]) for i in (0, 1)] == [100, 100]
    assert plan.moved == 50


def test_replay_of_random_samples_reaches_the_issue_targets():
    rng = np.random.default_rng(0)
    rounds = [{int(k): 1.0 for k in rng.choice(200, size=10, replace=False)} for _ in range(50)]
    static = np.mean(place.replay(rounds, 200, 2, balanced=False))
    balanced = np.mean(place.replay(rounds, 200, 2, balanced=True))
    assert static < 0.95 and balanced == pytest.approx(1.0)


def test_client_cost_is_local_steps_times_batch_tokens():
    from types import SimpleNamespace

    from pf2lora_ray.runtime.actor import client_cost

    cfg = SimpleNamespace(fed=SimpleNamespace(local_steps=3), data=SimpleNamespace(batch_size=4))
    text = SimpleNamespace(rows=[{"input_ids": [0] * n} for n in (10, 20, 30, 40, 50)])
    few = [{"input_ids": [0] * 8}, {"input_ids": [0] * 12}]

    class Split(list):
        @property
        def rows(self):
            return self

    assert client_cost(cfg, SimpleNamespace(train=Split(text.rows))) == 3 * 4 * 30.0
    assert client_cost(cfg, SimpleNamespace(train=Split(few))) == 3 * 2 * 10.0  # 2 rows < batch
    assert client_cost(cfg, SimpleNamespace(train=np.zeros((64, 8)))) == 3 * 4 * 1.0  # no tokens


def test_a_client_handed_over_between_hosts_trains_on_as_if_it_had_stayed():
    from helpers import tiny_synthetic

    from pf2lora_ray.client import ClientHost

    cfg = tiny_synthetic("fed.num_clients=4", "fed.clients_per_round=2")
    stay_host, giver, taker = (ClientHost(cfg, ids) for ids in ([0, 1, 2, 3], [0, 1], [2, 3]))
    theta = stay_host.initial_shared()
    for host in (stay_host, giver):
        host.train(theta, 1, [0, 1])
    moved = giver.take_state([1, 3])  # 3 never trained: nothing to hand over for it
    assert sorted(moved) == [1] and 1 not in giver.personal and giver.client_ids == [0]
    taker.put_state(moved)
    assert taker.client_ids == [1, 2, 3]
    want = stay_host.train(theta, 2, [1, 3])
    got = taker.train(theta, 2, [1, 3])
    for name, value in want.summed.items():
        np.testing.assert_array_equal(got.summed[name], value)
    for k in (1, 3):
        for name, value in stay_host.get_personal([k])[k].items():
            np.testing.assert_array_equal(taker.get_personal([k])[k][name], value)


# ---------------------------------------------------------------- on Ray

ray = pytest.importorskip("ray")

from helpers import tiny_synthetic  # noqa: E402

from pf2lora_ray.algorithms import ALGORITHMS  # noqa: E402
from pf2lora_ray.driver import run_rounds  # noqa: E402
from pf2lora_ray.runtime.local import LocalBackend  # noqa: E402
from pf2lora_ray.runtime.ray_backend import RayBackend  # noqa: E402

PARTIAL = ["fed.num_clients=12", "fed.clients_per_round=4", "fed.rounds=3", "fed.eval_every=2"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def partial(name: str, actors: int, *sets: str):
    return tiny_synthetic(
        f"algorithm.name={name}",
        *PARTIAL,
        f"resources.num_actors={actors}",
        "resources.num_cpus_per_actor=0.25",
        "runtime.threads_per_actor=1",  # in-process too: the same float rounding in matmuls
        *sets,
        backend="ray",
    )


def run_ray(cfg, placement: str | None = "balanced"):
    """The run's final state, its final personal state and every round's placement stats."""
    backend = RayBackend(cfg, placement=placement)
    stats = []

    class Stats:
        def on_start(self, state):
            pass

        def on_round_end(self, state, report):
            stats.append(state.backend.round_stats())

        def on_end(self, state, status):
            pass

    try:
        state = run_rounds(cfg, backend, [Stats()])
        assert sorted(backend.costs) == list(range(cfg.fed.num_clients))  # estimated at start
        held = ray.get([a.held.remote() for a in backend.actors])
        # Every client's state is held once, by its home actor: none lost or doubled.
        assert sorted(k for ks in held for k in ks) == list(range(cfg.fed.num_clients))
        assert all(backend.home[k] == i for i, ks in enumerate(held) for k in ks)
        return state, backend.get_personal(), stats
    finally:
        backend.close()


def close(got: np.ndarray, want: np.ndarray, rtol: float) -> None:
    """At most ``rtol`` maximum relative difference: max |got - want| <= rtol * max |want|."""
    scale = float(np.max(np.abs(want))) if np.size(want) else 0.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def assert_equal(got_state, got_personal, want_state, want_personal, rtol: float) -> None:
    got = {(r["client_id"], r["metric"]): r["value"] for r in got_state.last.eval.rows}
    want = {(r["client_id"], r["metric"]): r["value"] for r in want_state.last.eval.rows}
    assert got.keys() == want.keys() and len(want) >= 12
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=rtol, abs=1e-12), key
    for name, value in want_state.theta.items():
        close(got_state.theta[name], value, rtol)
    assert sorted(got_personal) == sorted(want_personal) == list(range(12))
    for k, arrays in want_personal.items():
        assert got_personal[k].keys() == arrays.keys()
        for name, value in arrays.items():
            close(got_personal[k][name], value, rtol)


def reference(cfg):
    backend = LocalBackend(cfg)
    state = run_rounds(cfg, backend)
    return state, backend.get_personal()


@pytest.mark.ray
@pytest.mark.parametrize("actors", [2, 4])
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_with_moving_clients_equals_in_process(local_ray, name, actors):
    cfg = partial(name, actors)
    state, personal, stats = run_ray(cfg)
    for s in stats:  # evenly spread (centralized_lora trains one client per round)
        assert max(s["actor_clients"]) == -(-sum(s["actor_clients"]) // actors)
    if all(sum(s["actor_clients"]) == 4 for s in stats):  # (centralized_lora trains one)
        assert sum(s["moved_clients"] for s in stats) > 0  # clients did move
    assert_equal(state, personal, *reference(cfg), rtol=1e-6)


@pytest.mark.ray
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_on_one_actor_is_bit_identical_to_in_process(local_ray, name):
    cfg = partial(name, 1)  # the in-process placement: one host, clients in id order
    state, personal, _ = run_ray(cfg)
    assert_equal(state, personal, *reference(cfg), rtol=0.0)


@pytest.mark.ray
@pytest.mark.parametrize("placement", ["static", "measured"])
def test_results_do_not_depend_on_placement(local_ray, placement):
    # "measured" places by measured seconds, which vary from run to run; the results must not.
    cfg = partial("pf2lora", 2, "fed.rounds=4", f"runtime.placement={placement}")
    state, personal, stats = run_ray(cfg, placement=None)  # from runtime.placement
    if placement == "static":
        assert all(s["moved_clients"] == 0 for s in stats)
    assert_equal(state, personal, *reference(cfg), rtol=1e-6)
