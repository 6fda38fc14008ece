"""Node loss on a multi-node Ray cluster: no client's personal adapter is lost.

A ``ray.cluster_utils.Cluster`` (head without CPUs + two 2-CPU worker nodes)
runs two 1-CPU client actors. After round 3 the node holding actor 0 is removed;
Ray restarts the actors it held on the surviving node, the backend restores
their clients from the round-2 checkpoint and replays round 3, and the run ends
equal to the fault-free in-process run. Kept apart from the local-Ray test
modules because it joins its own cluster through ``runtime.address``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from pf2lora_ray.checkpoint import CheckpointWriter  # noqa: E402
from pf2lora_ray.config import load_config  # noqa: E402
from pf2lora_ray.driver import DriverState, RoundReport, run_rounds  # noqa: E402
from pf2lora_ray.results import ResultsWriter  # noqa: E402
from pf2lora_ray.runtime.local import LocalBackend  # noqa: E402
from pf2lora_ray.runtime.ray_backend import RayBackend  # noqa: E402

JOB = Path(__file__).resolve().parents[1] / "jobs" / "synthetic_rank.yaml"

pytestmark = pytest.mark.ray


@pytest.fixture
def cluster():
    if ray.is_initialized():  # another module's Ray must not swallow the connection
        ray.shutdown()
    # Fast health checks, so a removed node is declared dead in about a second.
    health = {"health_check_period_ms": 200, "health_check_failure_threshold": 3}
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": health}
    )
    for _ in range(2):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


class RemoveNode:
    """Callback: after round ``at``, remove the worker node that holds actor 0."""

    def __init__(self, cluster: Cluster, at: int) -> None:
        self.cluster, self.at = cluster, at
        self.removed: str | None = None

    def on_start(self, state: DriverState) -> None:
        pass

    def on_round_end(self, state: DriverState, report: RoundReport) -> None:
        if report.round == self.at:
            self.removed = state.backend.node_ids()[0]
            node = next(n for n in self.cluster.worker_nodes if n.node_id == self.removed)
            self.cluster.remove_node(node)

    def on_end(self, state: DriverState, status: str) -> None:
        pass


def test_removing_a_worker_node_loses_no_personal_adapter(cluster, tmp_path):
    sets = [
        "fed.rounds=5",
        "fed.eval_every=1",
        "fed.clients_per_round=6",
        "synthetic.train_size=64",
        "synthetic.test_size=64",
        "runtime.quiet=true",
        "checkpoint.every=2",
        f"runtime.address={cluster.address}",
        "resources.num_actors=2",
        "resources.num_cpus_per_actor=1",
    ]
    cfg = load_config(JOB, sets)
    remove = RemoveNode(cluster, at=3)
    backend = RayBackend(cfg)
    try:
        callbacks = [ResultsWriter(tmp_path, cfg), CheckpointWriter(tmp_path, cfg), remove]
        state = run_rounds(cfg, backend, callbacks)
        nodes = backend.node_ids()
        personal = backend.get_personal()
    finally:
        backend.close()
    assert remove.removed is not None and remove.removed not in nodes  # actors moved
    faults = [f for fs in pd.read_parquet(tmp_path / "system.parquet")["faults"] for f in fs]
    assert any("actor 0" in f and "replayed rounds [3]" in f for f in faults), faults

    local = LocalBackend(cfg)
    want = run_rounds(cfg, local)
    assert sorted(personal) == list(range(10))
    for k, arrays in local.get_personal().items():
        for name, value in arrays.items():
            np.testing.assert_allclose(personal[k][name], value, rtol=1e-6, atol=1e-9)
    got = {(r["client_id"], r["metric"]): r["value"] for r in state.last.eval.rows}
    expected = {(r["client_id"], r["metric"]): r["value"] for r in want.last.eval.rows}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
