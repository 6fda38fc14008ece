"""``overhead``: how close the Ray runtime gets to the machine's physical limit.

The same workload (PF2LoRA on a tiny BERT, every client sampled every round)
runs in-process (``runtime.backend=local``, one torch thread: the serial work)
and on Ray with one 1-CPU actor per core. Simulation efficiency is

    efficiency = (sum of client compute seconds / cores) / wall seconds of the rounds

where client compute is what the hosts spent inside ``train``/``evaluate``
(system.parquet ``client_compute_s``) and the rounds' wall time runs from the
first round's start to the end of the last round's callbacks (so driver work
such as aggregation, ``ray.put`` and Parquet writes counts against it). Ray
start-up and actor start-up (model building, data loading) are reported
separately as ``ray_init_s`` and ``setup_s``. 1.0 means every core computed
client updates all the time; the target is >= 0.85. ``efficiency_vs_serial``
compares instead with the in-process wall time divided by the cores, so it also
charges the actors' slowdown from sharing the machine (memory bandwidth, caches,
other tenants). The ``machine`` row is that sharing measured directly: how much
faster ``cores`` concurrent processes get through a fixed torch kernel than one
process alone (:func:`~pf2lora_ray.bench.common.parallel_speedup`; ``cores``
on idle, independent cores), the ceiling for ``speedup_vs_local``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pf2lora_ray.bench.common import (
    RoundClock,
    cores,
    parallel_speedup,
    rows_for,
    rows_needed,
    start_ray,
    text_job,
    write_sst2_like,
)
from pf2lora_ray.config import build_config
from pf2lora_ray.experiment import run_experiment


@dataclass(frozen=True)
class Workload:
    num_clients: int
    rounds: int
    local_steps: int
    train_per_client: int


FULL = Workload(num_clients=64, rounds=5, local_steps=10, train_per_client=32)
QUICK = Workload(num_clients=32, rounds=3, local_steps=5, train_per_client=16)


def job(data: Path, w: Workload) -> dict[str, Any]:
    return text_job(
        data,
        num_clients=w.num_clients,
        clients_per_round=w.num_clients,
        rounds=w.rounds,
        local_steps=w.local_steps,
        train_per_client=w.train_per_client,
    )


def measure(overrides: dict[str, Any], extra: dict[str, Any], folder: Path) -> dict[str, float]:
    """Run one config into ``folder`` (replacing an earlier bench run there); its timings."""
    shutil.rmtree(folder, ignore_errors=True)
    clock = RoundClock()
    cfg = build_config(overrides, extra=extra)
    run_experiment(cfg, folder, extra_callbacks=[clock])
    system = pd.read_parquet(folder / "system.parquet")
    compute = float(system["client_compute_s"].sum())
    n = cores()
    return {
        "rounds": len(system),
        "rounds_wall_s": clock.rounds_s,
        "s_per_round": clock.rounds_s / len(system),
        "driver_between_rounds_s": clock.rounds_s - float(system["wall_s"].sum()),
        "client_compute_s": compute,
        "efficiency": compute / n / clock.rounds_s,
        "setup_s": clock.setup_s,
        "peak_rss_mb": float(system["peak_rss_mb"].max()),
        "actors": float(system["actors"].iloc[-1]),
    }


def run(quick: bool, out: Path) -> list[dict[str, Any]]:
    """In-process and Ray runs of the same workload; efficiency of each, speedup of Ray."""
    import ray

    w = QUICK if quick else FULL
    n = cores()
    data = write_sst2_like(out / "data", rows_needed(w.num_clients, w.train_per_client))
    overrides = job(data, w)

    # The in-process reference runs on one torch thread: on a tiny model, intra-op
    # threads buy nothing, and on a loaded machine their spin-waits made a local
    # step 20x slower here (BENCHMARKS.md). One thread is the serial work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = measure(overrides, {"runtime.backend": "local"}, out / "runs" / "local")
    finally:
        torch.set_num_threads(threads)
    local["torch_threads"] = 1

    ray_init_s = start_ray(n)
    try:
        extra = {
            "runtime.backend": "ray",
            "resources.num_cpus_per_actor": 1.0,
            "resources.num_actors": n,
        }
        on_ray = measure(overrides, extra, out / "runs" / "ray")
    finally:
        ray.shutdown()
    on_ray["ray_init_s"] = ray_init_s
    on_ray["torch_threads"] = 1
    on_ray["speedup_vs_local"] = local["rounds_wall_s"] / on_ray["rounds_wall_s"]
    # Against the ideal: the serial run's wall time spread perfectly over the cores.
    on_ray["efficiency_vs_serial"] = on_ray["speedup_vs_local"] / n
    # What the machine itself gives n concurrent processes of a fixed kernel: the
    # ceiling for speedup_vs_local, measured after (not during) the runs.
    machine = parallel_speedup(n)
    return (
        rows_for("local", local)
        + rows_for(f"ray-{n}-actors", on_ray)
        + rows_for("machine", machine)
    )
