"""Ray backend against the in-process reference on a 4-CPU local Ray.

The synthetic rank task is small enough that a 4-round run takes well under a
second of compute; what these tests pay for is Ray and actor start-up.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from pf2lora_ray.client import peak_rss_mb  # noqa: E402
from pf2lora_ray.config import Config, ConfigError, load_config  # noqa: E402
from pf2lora_ray.driver import DriverState, run_rounds  # noqa: E402
from pf2lora_ray.runtime.local import LocalBackend  # noqa: E402
from pf2lora_ray.runtime.ray_backend import ActorStateLost, RayBackend  # noqa: E402

JOB = Path(__file__).resolve().parents[1] / "jobs" / "synthetic_rank.yaml"
SHORT = [
    "fed.rounds=4",
    "fed.eval_every=2",
    "fed.clients_per_round=6",
    "synthetic.train_size=64",
    "synthetic.test_size=64",
    "runtime.quiet=true",
]

pytestmark = pytest.mark.ray


def short_config(*sets: str) -> Config:
    """jobs/synthetic_rank.yaml cut to 4 rounds of 6 sampled clients out of 10."""
    return load_config(JOB, [*SHORT, *sets])


def final_metrics(state: DriverState) -> dict[tuple[int, str], float]:
    """Last evaluation's per-client test metrics keyed by (client, metric)."""
    return {(r["client_id"], r["metric"]): r["value"] for r in state.last.eval.rows}


def assert_same(got: dict, want: dict, rtol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=rtol, abs=1e-12), key


def wait_until_alive(actor, timeout_s: float = 60.0) -> None:
    """Block until a restarting actor answers calls again."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.node_id.remote())
            return
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference() -> DriverState:
    """The in-process backend's run: what every Ray run must reproduce."""
    cfg = short_config()
    return run_rounds(cfg, LocalBackend(cfg))


def test_more_gpu_than_the_cluster_has_is_a_config_error():
    with pytest.raises(ConfigError, match=r"num_gpus_per_actor=0\.5.*short by 0\.5 GPU"):
        RayBackend(short_config("resources.num_gpus_per_actor=0.5"))


def test_more_actors_than_free_cpus_is_a_config_error():
    # Runs before any test starts actors, so all 4 CPUs are free.
    cfg = short_config("resources.num_actors=6", "resources.num_cpus_per_actor=1")
    with pytest.raises(ConfigError, match=r"6 actors .* need 6 CPU .*short by 2 CPU"):
        RayBackend(cfg)
    assert ray.available_resources().get("CPU") == pytest.approx(4.0)  # nothing was started


def test_automatic_actors_fill_free_cpus_and_match_in_process(reference):
    # 4 free CPUs / 2 per actor -> 2 actors, clients 0-4 and 5-9.
    cfg = short_config("resources.num_cpus_per_actor=2")
    backend = RayBackend(cfg)
    try:
        assert backend.num_actors == 2
        assert backend.blocks == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]  # first homes
        state = run_rounds(cfg, backend)
        personal = backend.get_personal()
        assert backend.peak_rss_mb() > peak_rss_mb()  # the actors' memory is counted
        # set_personal routes each client to its home actor, leaving the rest.
        changed = {k: {n: v + 1.0 + k for n, v in personal[k].items()} for k in (0, 4, 9)}
        backend.set_personal(changed)
        after = backend.get_personal()
    finally:
        backend.close()
    for k in range(10):
        for name, value in changed.get(k, personal[k]).items():
            np.testing.assert_array_equal(after[k][name], value)
    assert ray.is_initialized()  # the fixture's Ray is reused, not shut down
    assert_same(final_metrics(state), final_metrics(reference))
    for name, value in reference.theta.items():
        np.testing.assert_allclose(state.theta[name], value, rtol=1e-5, atol=1e-7)
    want = reference.backend.get_personal()
    assert sorted(personal) == list(range(10))
    for k in range(10):
        for name, value in want[k].items():
            np.testing.assert_allclose(personal[k][name], value, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("num_actors", [1, 4])
def test_result_does_not_depend_on_actor_count(reference, num_actors):
    cfg = short_config(f"resources.num_actors={num_actors}", "resources.num_cpus_per_actor=0.5")
    backend = RayBackend(cfg)
    try:
        assert backend.num_actors == num_actors
        assert sorted(k for block in backend.blocks for k in block) == list(range(10))
        state = run_rounds(cfg, backend)
    finally:
        backend.close()
    assert_same(final_metrics(state), final_metrics(reference))


def test_restarted_actor_refuses_to_train_until_its_state_is_restored(reference):
    cfg = short_config("resources.num_actors=2", "resources.num_cpus_per_actor=0.5")
    backend = RayBackend(cfg)
    try:
        theta = backend.initial_shared()
        backend.train(theta, 1, [0, 9])
        saved = backend.get_personal()
        ray.kill(backend.actors[1], no_restart=False)  # Ray restarts it (max_restarts)
        wait_until_alive(backend.actors[1])
        # The actor itself refuses; RayBackend.train would restore it (test_faults_ray.py).
        with pytest.raises(ActorStateLost, match=r"actor 1 was restarted"):
            # ray.kill is asynchronous: a call may still reach the restarting actor.
            deadline = time.monotonic() + 60
            while True:
                try:
                    ray.get(backend.actors[1].train.remote(theta, 2, [9]))
                    break
                except ray.exceptions.ActorUnavailableError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        backend.set_personal({k: v for k, v in saved.items() if k >= 5})
        assert backend.get_personal()[9].keys() == saved[9].keys()
        for name, value in saved[9].items():
            np.testing.assert_array_equal(backend.get_personal()[9][name], value)
    finally:
        backend.close()


def test_get_personal_reads_and_snapshot_sets_the_restore_point():
    cfg = short_config("resources.num_actors=2", "resources.num_cpus_per_actor=0.5")
    backend = RayBackend(cfg)
    try:
        theta = backend.initial_shared()
        backend.train(theta, 1, [0, 1, 2, 3])  # 0-3 start on actor 0: two move to actor 1
        assert backend.round_stats()["actor_clients"] == [2, 2]
        assert backend.recovery.snapshot is None and len(backend.recovery.log) == 1
        before = backend.get_personal()
        assert backend.recovery.snapshot is None and len(backend.recovery.log) == 1  # untouched
        taken = backend.snapshot()
        assert backend.recovery.snapshot is not None and backend.recovery.log == []
        for k in range(10):
            for name, value in before[k].items():
                np.testing.assert_array_equal(taken[k][name], value)
    finally:
        backend.close()


def test_without_checkpoints_the_replay_log_stays_bounded(reference, monkeypatch):
    from pf2lora_ray.runtime import recovery

    cfg = short_config("resources.num_actors=2", "resources.num_cpus_per_actor=0.5")
    theta_bytes = sum(v.nbytes for v in reference.theta.values())
    monkeypatch.setattr(recovery, "LOG_BYTES_MAX", 2.5 * theta_bytes)  # a snapshot every 3 rounds
    backend = RayBackend(cfg)
    lengths = []

    class LogLength:
        def on_start(self, state):
            pass

        def on_round_end(self, state, report):
            lengths.append(len(state.backend.recovery.log))

        def on_end(self, state, status):
            pass

    try:
        state = run_rounds(cfg, backend, [LogLength()])
    finally:
        backend.close()
    assert lengths == [1, 2, 0, 1]  # round 3 went over the bound: snapshot, empty log
    assert_same(final_metrics(state), final_metrics(reference))


def test_combine_refuses_contributions_with_other_names_or_shapes():
    from pf2lora_ray.client import TrainResult
    from pf2lora_ray.runtime.base import combine

    a = TrainResult({"lora_A": np.zeros((2, 4)), "lora_B": np.zeros((4, 2))}, 1.0, [0])
    other_shape = TrainResult({"lora_A": np.zeros((3, 4)), "lora_B": np.zeros((4, 2))}, 1.0, [1])
    other_name = TrainResult({"lora_A": np.zeros((2, 4))}, 1.0, [2])
    with pytest.raises(ValueError, match=r"tensor 'lora_A': clients \[1\] sent shape \(3, 4\)"):
        combine([a, other_shape])
    with pytest.raises(ValueError, match=r"clients \[2\] .* lacks \['lora_B'\]"):
        combine([a, other_name])
    assert combine([a, a]).weight == 2.0


def test_quiet_keeps_rays_start_up_notices_off_the_terminal():
    import logging

    from pf2lora_ray.runtime.sizing import NOTICE_LOGGERS, _notices_silenced

    notice = logging.getLogger(f"{NOTICE_LOGGERS[0]}.authentication_token_setup")
    with _notices_silenced(quiet=True):
        assert not notice.isEnabledFor(logging.WARNING)
    assert notice.isEnabledFor(logging.WARNING)  # restored afterwards
    with _notices_silenced(quiet=False):
        assert notice.isEnabledFor(logging.WARNING)


class StateTraffic:
    """Callback: evaluation chunks streamed and personal-state bytes spilled, over the run."""

    def __init__(self) -> None:
        self.chunks, self.spilled, self.read = [], 0, 0

    def on_start(self, state) -> None: ...

    def on_eval_chunk(self, state, round_, chunk) -> None:
        self.chunks.append((round_, sorted({r["client_id"] for r in chunk.rows})))

    def on_round_end(self, state, report) -> None:
        for part in (report.train, report.eval):
            if part is not None:
                self.spilled += part.spilled_bytes
                self.read += part.read_bytes

    def on_end(self, state, status) -> None: ...


def test_spilled_clients_and_chunked_evaluation_on_ray_match_in_process(reference):
    """A few KB per actor: clients move between actors from disk; evaluation in chunks of 2."""
    cfg = short_config(
        "resources.num_actors=2",
        "resources.num_cpus_per_actor=0.5",
        "runtime.state_memory_mb=0.004",
        "runtime.eval_chunk=2",
    )
    traffic = StateTraffic()
    backend = RayBackend(cfg)
    try:
        state = run_rounds(cfg, backend, [traffic])
    finally:
        backend.close()
    assert_same(final_metrics(state), final_metrics(reference))
    assert state.last.eval.streamed and not state.last.eval.ranks
    last = [ks for round_, ks in traffic.chunks if round_ == 4]
    assert len(last) == 3 and sorted(k for ks in last for k in ks) == list(range(10))
    assert traffic.spilled > 0 and traffic.read > 0
