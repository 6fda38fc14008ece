"""The partition is drawn once, by the driver's data check; hosts build from the rows it hands them.

A GLUE-format file with a tiny random BERT: the driver's check (``validate_run``)
keeps every client's rows; the in-process host and every Ray actor then build
their clients' data from those rows alone. To show that no host draws the
partition, ``ClientSplits`` raises in every host (in this process after the
check, and in every Ray worker through a setup hook) while the runs still
equal a reference run whose host drew the partition itself, bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from test_tasks_glue import cfg_for, write_sentiment

from pf2lora_ray.client import ClientHost
from pf2lora_ray.driver import DriverState, run_rounds
from pf2lora_ray.experiment import run_experiment
from pf2lora_ray.runtime.local import LocalBackend
from pf2lora_ray.runtime.ray_backend import RayBackend
from pf2lora_ray.tasks import task_for
from pf2lora_ray.tasks.text import ClientSplits
from pf2lora_ray.validate import validate_run

ray = pytest.importorskip("ray")

CLIENTS = 6


def glue(folder: Path, backend: str, *extra: tuple[str, object]):
    """Sentiment rows over 6 clients (Dirichlet labels, validation rows), 4 sampled per round."""
    data = {"task": "sst2", "path": str(folder), "partition": "dirichlet", "alpha": 2.0}
    sections = {
        "fed.num_clients": CLIENTS,
        "fed.clients_per_round": 4,
        "fed.rounds": 2,
        "fed.local_steps": 2,
        "fed.eval_every": 2,
        "data.val_fraction": 0.2,
        "data.batch_size": 8,
        "runtime.backend": backend,
        "runtime.threads_per_actor": 1,  # in-process too: the same float rounding
        "resources.num_actors": 2,
        **dict(extra),
    }
    return cfg_for(data, **sections)


def refuse(*args, **kwargs):
    raise AssertionError("a host drew the partition")


def hosts_never_partition() -> None:
    """Ray worker setup hook: drawing the partition in this process raises."""
    from pf2lora_ray.tasks.text import ClientSplits

    ClientSplits.__init__ = refuse


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_sentiment(tmp_path_factory.mktemp("sst"), 120)


@pytest.fixture(scope="module")
def reference(data) -> tuple[DriverState, dict]:
    """The in-process run without a data check (its host draws the partition itself):
    its final state and every client's personal state."""
    cfg = glue(data, "local")
    backend = LocalBackend(cfg)
    try:
        return run_rounds(cfg, backend), backend.get_personal()
    finally:
        backend.close()


def assert_identical(state: DriverState, reference: tuple[DriverState, dict]) -> None:
    """The same final evaluation (every client, val and test) and theta, bit for bit."""
    want = reference[0]
    rows = {(r["client_id"], r["split"], r["metric"]): r["value"] for r in state.last.eval.rows}
    expected = {(r["client_id"], r["split"], r["metric"]): r["value"] for r in want.last.eval.rows}
    assert rows == expected and {split for _, split, _ in rows} == {"val", "test"}
    assert state.theta.keys() == want.theta.keys()
    for name, value in want.theta.items():
        assert np.array_equal(state.theta[name], value), name


def assert_same_personal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want) == list(range(CLIENTS))
    for k, arrays in want.items():
        assert got[k].keys() == arrays.keys()
        for name, value in arrays.items():
            assert np.array_equal(got[k][name], value), (k, name)


def test_the_check_keeps_the_partition_a_host_would_draw(data):
    cfg = glue(data, "local")
    rows = validate_run(cfg).rows
    drawn = task_for(cfg).client_rows(range(CLIENTS))
    assert sorted(rows) == sorted(drawn) == list(range(CLIENTS))
    for k, r in rows.items():
        for got, want in zip(r, drawn[k], strict=True):
            assert got.dtype == np.int64 and np.array_equal(got, want)
        assert r.val.size > 0
    every = np.concatenate([np.concatenate(r) for r in rows.values()])
    assert np.array_equal(np.sort(every), np.arange(120))  # disjoint, every row used


def test_the_local_host_builds_from_the_drivers_rows_and_never_partitions(
    data, reference, tmp_path, monkeypatch
):
    cfg = glue(data, "local")
    check = validate_run(cfg)  # the driver draws the partition: the one draw of the run
    monkeypatch.setattr(ClientSplits, "__init__", refuse)
    with pytest.raises(AssertionError, match="drew the partition"):
        ClientHost(cfg, [0])  # without rows a host would draw it
    assert_identical(run_experiment(cfg, tmp_path, data_check=check), reference)


def test_a_host_hands_over_a_clients_rows_and_refuses_clients_it_has_none_for(data):
    cfg = glue(data, "local")
    rows = validate_run(cfg).rows
    giver = ClientHost(cfg, [0, 1, 2], rows={k: rows[k] for k in (0, 1, 2)})
    taker = ClientHost(cfg, [3], rows={3: rows[3]})
    before = giver.data[2].train.rows
    taker.take_over(giver.hand_over([2]))
    assert sorted(giver.data.rows) == [0, 1] and sorted(taker.data.rows) == [2, 3]
    assert taker.data[2].train.rows == before
    with pytest.raises(KeyError, match="client 2: this host was not given its rows"):
        giver.data.hold([2])


class OwnRowsOnly:
    """Callback: after every round each actor holds the rows of its home clients, no others."""

    def __init__(self) -> None:
        self.moved = 0

    def on_start(self, state) -> None:
        pass

    def on_round_end(self, state, report) -> None:
        self.check(state.backend)
        self.moved += state.backend.round_stats()["moved_clients"]

    def on_end(self, state, status) -> None:
        pass

    @staticmethod
    def check(backend) -> None:
        held = ray.get([a.rows_held.remote() for a in backend.actors])
        assert held == [backend.clients_of(i) for i in range(backend.num_actors)]


@pytest.fixture(scope="module")
def ray_hosts_never_partition():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": hosts_never_partition},
    )
    yield
    ray.shutdown()


@pytest.mark.ray
def test_two_actors_equal_in_process_bit_for_bit_on_their_own_rows_alone(
    data, reference, ray_hosts_never_partition
):
    cfg = glue(data, "ray")
    check = validate_run(cfg)

    @ray.remote
    def draw() -> None:
        task_for(cfg).client_rows([0])

    with pytest.raises(ray.exceptions.RayTaskError, match="drew the partition"):
        ray.get(draw.remote())  # the hook bites in Ray's workers

    backend = RayBackend(cfg, rows=check.rows)
    own = OwnRowsOnly()
    try:
        own.check(backend)  # each actor was created with its block's rows
        # Restored with a lopsided placement (as --resume does): the driver sends each actor
        # its new clients' rows, and evaluation must move clients to spread them evenly.
        saved = backend.placement_state()
        saved["home"] = np.array([0, 0, 0, 0, 0, 1])
        assert backend.restore_placement(saved)
        own.check(backend)
        state = run_rounds(cfg, backend, [own])
        assert own.moved > 0  # clients, and with them their rows, moved between the actors
        personal = backend.get_personal()
        backend.recovery.recover(1)  # as after a fault: restore (rows from the driver), replay
        own.check(backend)
        assert_same_personal(backend.get_personal(), personal)
    finally:
        backend.close()
    assert_identical(state, reference)
    assert_same_personal(personal, reference[1])
