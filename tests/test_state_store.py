"""Personal state beyond memory (issue 23): the spill store, data on demand, streamed evaluation.

Tiny bounds on a few clients: with ``runtime.state_memory_mb`` a few KB, most
clients' state lives on disk, and results must equal the all-in-memory run bit
for bit.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pf2lora_ray.cli import main
from pf2lora_ray.client import ClientHost
from pf2lora_ray.experiment import run_experiment
from pf2lora_ray.faults import CRASH_EXIT_CODE
from pf2lora_ray.state_store import StateCorrupted, StateStore
from tests.helpers import cli_process, synthetic_run_args, tiny_synthetic

BOUND = "runtime.state_memory_mb=0.004"  # ~4 KB: two or three clients' state of the tiny job
SETS = [
    "runtime.backend=local",
    "fed.num_clients=8",
    "fed.clients_per_round=3",
    "fed.rounds=4",
    "fed.eval_every=2",
    "synthetic.train_size=32",
    "synthetic.test_size=16",
    "fed.local_steps=3",
    "checkpoint.every=2",
]


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(4, 8, generator=g), "b": torch.randn(8, generator=g).double()}


def test_store_spills_past_its_budget_and_reads_back_bit_for_bit(tmp_path):
    store = StateStore(budget_bytes=300, folder=tmp_path)
    states = {k: state(k) for k in range(5)}  # 192 bytes each: one fits in memory at a time
    for k, s in states.items():
        store.put(k, s)
    assert list(store) == list(range(5)) and store.memory_bytes <= 300
    spilled, read = store.take_counts()
    assert spilled > 0 and read == 0
    for k, s in states.items():
        got = store[k]
        assert all(torch.equal(got[n], s[n]) and got[n].dtype == s[n].dtype for n in s)
    assert store.take_counts()[1] > 0
    assert store.pop(3) is not None and 3 not in store and store.get(3) is None
    root = store.root
    store.close()
    assert not root.exists()


def test_a_state_read_back_unchanged_is_not_written_again(tmp_path):
    store = StateStore(budget_bytes=300, folder=tmp_path)
    for k in range(3):
        store.put(k, state(k))
    for k in range(3):  # the last one put is written once, when first evicted
        store.get(k)
    store.take_counts()
    for k in range(3):  # read only: their files stay current
        store.get(k)
    spilled, read = store.take_counts()
    assert read > 0 and spilled == 0


def test_a_fresh_state_is_dropped_not_written_when_evicted(tmp_path):
    store = StateStore(budget_bytes=300, folder=tmp_path)
    for k in range(3):
        store.put(k, state(k), fresh=True)  # initial states: drawn again when needed
    assert store.take_counts() == (0, 0) and 0 not in store and 2 in store
    store.put(5, state(5))
    store.put(6, state(6))  # 5 was trained: it is written
    assert store.take_counts()[0] > 0 and 5 in store


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_corrupted_spill_file_is_an_error_naming_the_client(tmp_path, damage):
    store = StateStore(budget_bytes=300, folder=tmp_path)
    for k in range(3):
        store.put(k, state(k))
    path = store._path(0)
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[-1] ^= 1  # one bit of the last tensor's data: still a valid safetensors file
        path.write_bytes(bytes(blob))
    elif damage == "truncate":
        path.write_bytes(bytes(blob[:-10]))
    else:
        path.unlink()
    with pytest.raises(StateCorrupted, match=r"^client 0: .*0\.safetensors"):
        store.get(0)


def final_state(cfg) -> dict[int, dict[str, np.ndarray]]:
    host = ClientHost(cfg, range(cfg.fed.num_clients))
    theta = host.initial_shared()
    for t in (1, 2):
        host.train(theta, t, [0, 2, 5, 7])
        host.train(theta, t, [1, 5])
    host.evaluate(theta, 2)
    return host.get_personal(), host.personal


def test_spilled_host_equals_in_memory_host_bit_for_bit():
    sets = ("fed.num_clients=8", "fed.clients_per_round=4", "fed.local_steps=3")
    want, _ = final_state(tiny_synthetic(*sets))
    got, store = final_state(tiny_synthetic(*sets, BOUND))
    assert store.on_disk  # the bound did spill
    assert want.keys() == got.keys()
    for k in want:
        assert all(np.array_equal(want[k][n], got[k][n]) for n in want[k]), k


def test_clients_handed_over_from_disk_train_on_bit_identically():
    """take_state / put_state of spilled clients equal the same moves in memory."""

    def moved(*sets):
        sizes = ("fed.num_clients=6", "fed.clients_per_round=3", "fed.local_steps=3")
        cfg = tiny_synthetic(*sizes, *sets)
        giver, taker = ClientHost(cfg, range(6)), ClientHost(cfg, [])
        theta = giver.initial_shared()
        giver.train(theta, 1, range(6))
        taker.put_state(giver.take_state([0, 1, 4]))
        taker.train(theta, 2, [0, 1, 4])
        return giver.get_personal() | taker.get_personal(), giver.personal

    want, _ = moved()
    got, store = moved(BOUND)
    assert store.on_disk
    for k in range(6):
        assert all(np.array_equal(want[k][n], got[k][n]) for n in want[k]), k


def run_args(out, *extra):
    return synthetic_run_args(out, *SETS, *extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(run_args(out)) == 0
    return out


def tables(out) -> dict[str, pd.DataFrame]:
    got = {}
    for name in ("metrics", "ranks"):
        df = pd.read_parquet(out / f"{name}.parquet")
        key = ["round", "client_id", "split", "metric"] if name == "metrics" else [
            "round", "client_id", "layer"]
        got[name] = df.sort_values(key, na_position="first").reset_index(drop=True)
    return got


def test_spilled_run_with_streamed_evaluation_equals_in_memory_run(tmp_path, reference):
    out = tmp_path / "run"
    assert main(run_args(out, BOUND, "runtime.eval_chunk=3")) == 0
    parts = sorted(p.name for p in (out / "metrics.parquet").iterdir())
    assert "part-000002-00001.parquet" in parts and "part-000004-00003.parquet" in parts
    want, got = tables(reference), tables(out)
    for name in want:  # bit for bit: no tolerance
        pd.testing.assert_frame_equal(got[name], want[name], check_exact=True)
    system = pd.read_parquet(out / "system.parquet")
    assert system["state_spilled_bytes"].sum() > 0 and system["state_read_bytes"].sum() > 0
    assert (pd.read_parquet(reference / "system.parquet")["state_spilled_bytes"] == 0).all()


def test_checkpoint_and_resume_with_spilled_clients_equal_the_run_without_a_crash(
    tmp_path, reference
):
    out = tmp_path / "run"
    crashed = cli_process(*run_args(out, BOUND, "faults.crash_driver_at_round=3"))
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr
    assert main([*run_args(out, BOUND), "--resume"]) == 0
    want, got = tables(reference), tables(out)
    for name in want:
        pd.testing.assert_frame_equal(got[name], want[name], check_exact=True)


class StopAfterFirstChunk:
    """A callback that fails once the first evaluation chunk of round 2 is written."""

    def on_start(self, state): ...

    def on_round_end(self, state, report): ...

    def on_end(self, state, status): ...

    def on_eval_chunk(self, state, round_, chunk):
        raise RuntimeError("crash in the middle of an evaluation")


def test_a_crash_in_the_middle_of_an_evaluation_keeps_the_chunks_scored(tmp_path):
    cfg = tiny_synthetic(*SETS, BOUND, "runtime.eval_chunk=3")
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="middle of an evaluation"):
        run_experiment(cfg, out, extra_callbacks=[StopAfterFirstChunk()])
    metrics = pd.read_parquet(out / "metrics.parquet")
    scored = metrics[(metrics["round"] == 2) & (metrics["split"] == "test")]
    assert sorted(scored["client_id"].unique()) == [0, 1, 2]  # the first chunk, on disk
