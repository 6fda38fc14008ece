"""Every registered algorithm runs the synthetic job on Ray and matches the in-process run."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from helpers import tiny_synthetic  # noqa: E402

from pf2lora_ray.algorithms import ALGORITHMS  # noqa: E402
from pf2lora_ray.driver import run_rounds  # noqa: E402
from pf2lora_ray.runtime.local import LocalBackend  # noqa: E402
from pf2lora_ray.runtime.ray_backend import RayBackend  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def per_client(state) -> dict[tuple[int, str], float]:
    return {(r["client_id"], r["metric"]): r["value"] for r in state.last.eval.rows}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_algorithm_on_ray_equals_in_process(name):
    cfg = tiny_synthetic(f"algorithm.name={name}", "fed.rounds=2", "fed.eval_every=2",
                         "fed.clients_per_round=6", "resources.num_actors=2",
                         "resources.num_cpus_per_actor=0.5", backend="ray")
    backend = RayBackend(cfg)
    try:
        got = per_client(run_rounds(cfg, backend))
    finally:
        backend.close()
    want = per_client(run_rounds(cfg, LocalBackend(cfg)))
    assert got.keys() == want.keys() and len(want) >= 10
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-12), key
