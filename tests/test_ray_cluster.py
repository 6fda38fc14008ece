"""A simulation on a multi-node Ray cluster (head + 2 worker nodes on this machine).

Kept apart from test_ray_backend.py: that module holds its own local Ray, and
this one joins a ``ray.cluster_utils.Cluster`` through ``runtime.address``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from pf2lora_ray.config import load_config  # noqa: E402
from pf2lora_ray.driver import run_rounds  # noqa: E402
from pf2lora_ray.runtime.local import LocalBackend  # noqa: E402
from pf2lora_ray.runtime.ray_backend import RayBackend  # noqa: E402

JOB = Path(__file__).resolve().parents[1] / "jobs" / "synthetic_rank.yaml"

pytestmark = pytest.mark.ray


@pytest.fixture
def cluster():
    if ray.is_initialized():  # another module's Ray must not swallow the connection
        ray.shutdown()
    # The head has no CPU, so every 1-CPU actor must go to a worker node.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_actors_span_worker_nodes_and_match_in_process(cluster):
    sets = [
        "fed.rounds=2",
        "fed.eval_every=2",
        "synthetic.train_size=64",
        "synthetic.test_size=64",
        "runtime.quiet=true",
        f"runtime.address={cluster.address}",
        "resources.num_cpus_per_actor=1",
    ]
    cfg = load_config(JOB, sets)
    backend = RayBackend(cfg)
    try:
        assert backend.owns_ray  # connected through runtime.address
        assert backend.num_actors == 2  # one per free CPU
        nodes = backend.node_ids()
        state = run_rounds(cfg, backend)
    finally:
        backend.close()
    assert not ray.is_initialized()  # close() disconnects what it connected
    head = cluster.head_node.node_id
    assert len(set(nodes)) == 2 and head not in nodes
    want = run_rounds(cfg, LocalBackend(cfg)).last.eval.rows
    got = state.last.eval.rows
    assert [(r["client_id"], r["metric"]) for r in got] == [
        (r["client_id"], r["metric"]) for r in want
    ]
    for g, w in zip(got, want, strict=True):
        assert g["value"] == pytest.approx(w["value"], rel=1e-5, abs=1e-12)
