"""Actor failures on a local Ray: lost work is restored and redone, or dropped and recorded.

``faults.kill_actor_at_round=R`` makes the actor holding the highest sampled
clients exit its process in the middle of round R's training. With retries left
the run must equal a fault-free run; with ``faults.max_retries=0`` that actor's
clients are dropped from round R and system.parquet says so.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray")

from pf2lora_ray.checkpoint import CheckpointWriter, restore_latest  # noqa: E402
from pf2lora_ray.config import Config, load_config  # noqa: E402
from pf2lora_ray.driver import DriverState, RoundReport, run_rounds, sample_clients  # noqa: E402
from pf2lora_ray.results import ResultsWriter  # noqa: E402
from pf2lora_ray.runtime.placement import static_blocks  # noqa: E402
from pf2lora_ray.runtime.ray_backend import RayBackend  # noqa: E402

JOB = Path(__file__).resolve().parents[1] / "jobs" / "synthetic_rank.yaml"
SHORT = [
    "fed.rounds=5",
    "fed.eval_every=1",
    "fed.clients_per_round=6",
    "synthetic.train_size=64",
    "synthetic.test_size=64",
    "runtime.quiet=true",
    "resources.num_actors=2",
    "checkpoint.every=2",
]
KEYS = ["round", "client_id", "split", "metric"]

pytestmark = pytest.mark.ray


def short_config(*sets: str) -> Config:
    """jobs/synthetic_rank.yaml: 5 rounds of 6 of 10 clients, 2 actors, checkpoints at 2 and 4."""
    return load_config(JOB, [*SHORT, *sets])


class PersonalEachRound:
    """Callback keeping, per round, every client's personal state, the training placement,
    how many clients' state moved and each client's home actor at the end of the round."""

    def __init__(self) -> None:
        self.rounds: dict[int, dict] = {}
        self.placement: dict[int, list[list[int]]] = {}
        self.moved: dict[int, int] = {}
        self.home: dict[int, dict[int, int]] = {}

    def on_start(self, state: DriverState) -> None:
        pass

    def on_round_end(self, state: DriverState, report: RoundReport) -> None:
        self.rounds[report.round] = state.backend.get_personal()
        stats = state.backend.round_stats()
        self.placement[report.round] = stats["placement"]
        self.moved[report.round] = stats["moved_clients"]
        self.home[report.round] = dict(state.backend.home)

    def on_end(self, state: DriverState, status: str) -> None:
        pass


def run(cfg: Config, out: Path, *extra) -> tuple[PersonalEachRound, dict]:
    """Run ``cfg`` on Ray, results and checkpoints in ``out``; returns the final personal state."""
    backend = RayBackend(cfg)
    rounds = PersonalEachRound()
    try:
        callbacks = [ResultsWriter(out, cfg), CheckpointWriter(out, cfg), rounds, *extra]
        run_rounds(cfg, backend, callbacks)
        return rounds, backend.get_personal()
    finally:
        backend.close()


def victim_clients(rounds: PersonalEachRound, round_: int) -> list[int]:
    """The clients of the actor the kill hits: the highest-numbered one with work."""
    return next(ks for ks in reversed(rounds.placement[round_]) if ks)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("faultfree")
    _, personal = run(short_config(), out)
    return out, personal


@pytest.mark.parametrize("kill_round, replayed", [(1, []), (4, [3])])
def test_actor_killed_mid_round_is_restored_and_equals_fault_free_run(
    tmp_path, reference, kill_round, replayed
):
    ref_out, ref_personal = reference
    cfg = short_config(f"faults.kill_actor_at_round={kill_round}")
    rounds, personal = run(cfg, tmp_path)
    assert victim_clients(rounds, kill_round)  # the kill hit an actor with work

    system = pd.read_parquet(tmp_path / "system.parquet").set_index("round")
    faults = system.loc[kill_round, "faults"]
    # Lost mid-train; restored from checkpoint round 2 (4) or the initial state (1) + replay.
    assert f"round {kill_round} train: actor 1 lost" in faults[0]
    assert faults[1].endswith(f"replayed rounds {replayed}, work redone")
    assert all(len(f) == 0 for r, f in system["faults"].items() if r != kill_round)
    assert all(len(d) == 0 for d in system["dropped_clients"])

    got = pd.read_parquet(tmp_path / "metrics.parquet").drop(columns="run_id")
    want = pd.read_parquet(ref_out / "metrics.parquet").drop(columns="run_id")
    assert not got.duplicated(KEYS).any()
    pd.testing.assert_frame_equal(got, want, rtol=1e-6)
    assert personal.keys() == ref_personal.keys()
    for k, arrays in ref_personal.items():
        for name, value in arrays.items():
            np.testing.assert_allclose(personal[k][name], value, rtol=1e-6, atol=1e-9)


def test_exhausted_retries_drop_the_actors_clients_for_that_round(tmp_path):
    cfg = short_config("faults.kill_actor_at_round=2", "faults.max_retries=0")
    states, _ = run(cfg, tmp_path)
    lost = victim_clients(states, 2)
    assert lost

    system = pd.read_parquet(tmp_path / "system.parquet").set_index("round")
    assert list(system.loc[2, "dropped_clients"]) == lost
    assert "round 2 train: actor 1 dropped after 0 retries" in system.loc[2, "faults"]
    assert all(len(system.loc[r, "dropped_clients"]) == 0 for r in (1, 3, 4, 5))
    # Ray will not restart it (max_restarts=0): a replacement is restored for round 2's eval.
    assert any("round 2 eval: actor 1" in f and "restored" in f for f in system.loc[2, "faults"])

    metrics = pd.read_parquet(tmp_path / "metrics.parquet")
    trained = metrics[(metrics["split"] == "train") & metrics["client_id"].notna()]
    by_round = trained.groupby("round")["client_id"].agg(lambda s: sorted(set(s)))
    assert by_round[2] == sorted(set(sample_clients(cfg, 2)) - set(lost))
    assert by_round[3] == sample_clients(cfg, 3)  # back in the next round
    tested = metrics[(metrics["split"] == "test") & (metrics["round"] == 5)].dropna()
    assert sorted(set(tested["client_id"])) == list(range(10))
    assert pd.read_parquet(tmp_path / "runs.parquet").loc[0, "status"] == "completed"

    # A dropped client kept its state from before round 2; the others trained on.
    before, after = states.rounds[1], states.rounds[2]
    for k in sample_clients(cfg, 2):
        same = all(np.array_equal(before[k][n], after[k][n]) for n in before[k])
        assert same == (k in lost), k


def test_resume_puts_clients_back_and_moves_only_what_an_uninterrupted_run_moves(tmp_path):
    # An evaluation spreads every client evenly, which sends them back to their blocks; with
    # the only one at round 5, round 4 ends with the clients where training left them.
    cfg = short_config("fed.eval_every=5")
    ref_rounds, ref_personal = run(cfg, tmp_path / "ref")
    # A driver that crashed after round 4 left exactly this run's round-4 checkpoint.
    ckpt = Path("checkpoints") / "round_000004"
    shutil.copytree(tmp_path / "ref" / ckpt, tmp_path / "resumed" / ckpt)
    latest = tmp_path / "resumed" / "checkpoints" / "latest.json"
    latest.write_text('{"round": 4, "dir": "round_000004"}')
    blocks = {k: i for i, block in enumerate(static_blocks(10, 2)) for k in block}
    assert ref_rounds.home[4] != blocks  # clients had moved: the blocks would place round 5 anew
    backend = RayBackend(cfg)
    resumed = PersonalEachRound()
    try:
        theta, done = restore_latest(tmp_path / "resumed", cfg, backend)
        assert done == 4 and backend.home == ref_rounds.home[4]
        held = ray.get([a.held.remote() for a in backend.actors])
        assert held == [backend.clients_of(i) for i in range(2)]  # each state on its home actor
        run_rounds(cfg, backend, [resumed], theta=theta, start_round=5)
        personal = backend.get_personal()
    finally:
        backend.close()
    assert resumed.placement[5] == ref_rounds.placement[5]
    assert resumed.moved[5] == ref_rounds.moved[5]
    assert resumed.home[5] == ref_rounds.home[5]
    for k, arrays in ref_personal.items():
        for name, value in arrays.items():
            np.testing.assert_allclose(personal[k][name], value, rtol=1e-6, atol=1e-9)
