"""``scaling``: seconds per round and memory against how many clients exist.

PF2LoRA on the synthetic task (one 64x64 layer, small client data) on Ray with
one 1-CPU actor per core, with a fixed ``fed.clients_per_round`` so that a
round's work is the same whatever the number of clients: per-round time should
stay flat while memory grows with the clients' data and personal state.

Per point: the median wall time of the training-only rounds, split into the
busiest actor's compute and the rest (driver, object store, messages), the
last round (which also evaluates every client, so every client has personal
state), the set-up time (actors build every client's data) and the peak RSS of
driver plus actors. Memory per client is the slope of peak RSS against clients.
A PNG of both curves goes to ``OUT/scaling.png``.

``interleaved-clients-N``: the same sizes again, all alive at once (2 actors
each, sharing the cores) and trained round by round in turn, so that machine
load that drifts during the bench hits every size alike; per size the median
wall seconds of a training round and the CPU seconds of its local updates.

``population-*`` (:mod:`~pf2lora_ray.bench.population`): up to 100,000 clients
with MiniLM-sized personal state, spilled beyond a memory bound per actor.
The full bench runs only it (about 25 minutes on 2 shared cores); ``--quick``
runs the small parts above and the long run (10 to 1,000 clients, 200 rounds)
and a small population (100 to 3,000 clients).

``rounds-200`` (``--quick``): the 10-client job for 200 rounds,
comparing the first and the last 10% of the rounds: seconds per round and the
driver's own RSS, which must stay flat (results are appended per round, not
rewritten, and the driver keeps no rows).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pf2lora_ray.bench.common import RoundClock, cores, rows_for, start_ray
from pf2lora_ray.client import rss_mb
from pf2lora_ray.config import Config, build_config
from pf2lora_ray.driver import DriverState, RoundReport
from pf2lora_ray.experiment import run_experiment

QUICK = (10, 100, 1000)
CLIENTS_PER_ROUND = 10
LONG_ROUNDS = 200


def job(num_clients: int, rounds: int) -> dict[str, Any]:
    return {
        "seed": 0,
        "model": {"name": "synthetic"},
        "data": {"name": "synthetic", "batch_size": 16},
        "synthetic": {"dim": 64, "train_size": 32, "test_size": 16},
        "adapter": {"r": 2, "r_personal": 2, "alpha": 2.0},
        "fed": {
            "num_clients": num_clients,
            "clients_per_round": min(CLIENTS_PER_ROUND, num_clients),
            "rounds": rounds,
            "local_steps": 10,
            "eval_every": rounds,
        },
        "algorithm": {"name": "pf2lora", "lr": 0.01},
        "pf2lora": {"lr_lower": 0.05},
        "runtime": {"quiet": True, "backend": "ray"},
        "resources": {"num_cpus_per_actor": 1.0, "num_actors": cores()},
    }


def client_bytes(cfg: Config) -> dict[str, float]:
    """Bytes of one client's personal state and of its data tensors, measured on client 0."""
    from pf2lora_ray.client import ClientHost

    host = ClientHost(cfg, [0])
    personal = sum(a.nbytes for a in host.get_personal([0])[0].values())
    data = host.data[0]
    tensors = [t for split in (data.train, data.test) for t in vars(split).values()]
    return {
        "personal_state_bytes_per_client": float(personal),
        "data_bytes_per_client": float(sum(t.nbytes for t in tensors if torch.is_tensor(t))),
    }


class DriverRss:
    """Driver callback: the driver process's own RSS (MB) after each round."""

    def __init__(self) -> None:
        self.mb: list[float] = []

    def on_start(self, state: DriverState) -> None:
        pass

    def on_round_end(self, state: DriverState, report: RoundReport) -> None:
        self.mb.append(rss_mb())

    def on_end(self, state: DriverState, status: str) -> None:
        pass


def measure(num_clients: int, rounds: int, folder: Path) -> dict[str, float]:
    shutil.rmtree(folder, ignore_errors=True)
    clock = RoundClock()
    run_experiment(build_config(job(num_clients, rounds)), folder, extra_callbacks=[clock])
    system = pd.read_parquet(folder / "system.parquet")
    train = system.iloc[:-1]
    busiest = train["actor_compute_s"].map(max)
    return {
        "clients": num_clients,
        "s_per_round": float(train["wall_s"].median()),
        "busiest_actor_s_per_round": float(busiest.median()),
        "rest_s_per_round": float((train["wall_s"] - busiest).median()),
        "last_round_with_eval_s": float(system["wall_s"].iloc[-1]),
        "setup_s": clock.setup_s,
        "peak_rss_mb": float(system["peak_rss_mb"].max()),
    }


def plot(points: list[dict[str, float]], path: Path) -> None:
    """Two panels against clients (log scale): seconds per round, peak RSS."""
    from matplotlib.figure import Figure

    clients = [p["clients"] for p in points]
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(clients, [p["s_per_round"] for p in points], "o-")
    left.set(xscale="log", xlabel="clients", ylabel="seconds per round", ylim=(0, None))
    left.set_title(f"{CLIENTS_PER_ROUND} clients sampled per round")
    right.plot(clients, [p["peak_rss_mb"] for p in points], "o-")
    right.set(xscale="log", xlabel="clients", ylabel="peak RSS, driver + actors (MB)")
    right.set_ylim(0, None)
    right.set_title(f"{cores()} Ray actors")
    fig.savefig(path, dpi=120)


def interleaved(sizes: tuple[int, ...], rounds: int) -> list[dict[str, Any]]:
    """Rounds of every size in turn on backends alive at once (module docstring)."""
    from pf2lora_ray.algorithms import ALGORITHMS
    from pf2lora_ray.driver import sample_clients
    from pf2lora_ray.runtime.ray_backend import RayBackend

    cpus = cores() / (2 * len(sizes))
    cfgs, backends, thetas = {}, {}, {}
    try:
        for n in sizes:
            overrides = job(n, rounds)
            overrides["resources"] = {"num_cpus_per_actor": cpus, "num_actors": 2}
            overrides["runtime"]["threads_per_actor"] = 1
            cfgs[n] = build_config(overrides)
            backends[n] = RayBackend(cfgs[n])
            thetas[n] = backends[n].initial_shared()
        algorithm = ALGORITHMS[cfgs[sizes[0]].algorithm.name](cfgs[sizes[0]])
        wall: dict[int, list[float]] = {n: [] for n in sizes}
        cpu: dict[int, list[float]] = {n: [] for n in sizes}
        for t in range(1, rounds + 1):
            for n in sizes:
                t0 = time.perf_counter()
                result = backends[n].train(thetas[n], t, sample_clients(cfgs[n], t))
                wall[n].append(time.perf_counter() - t0)
                cpu[n].append(sum(result.client_s.values()))
                thetas[n] = algorithm.aggregate(thetas[n], result.summed, result.weight)
    finally:
        for backend in backends.values():
            backend.close()
    skip = 2  # the first rounds also warm up each actor
    return [
        r
        for n in sizes
        for r in rows_for(
            f"interleaved-clients-{n}",
            {
                "s_per_round": float(np.median(wall[n][skip:])),
                "cpu_s_per_round": float(np.median(cpu[n][skip:])),
            },
        )
    ]


def long_run(rounds: int, folder: Path) -> dict[str, float]:
    """The 10-client job for ``rounds`` rounds: first vs last 10% of the rounds."""
    shutil.rmtree(folder, ignore_errors=True)
    overrides = job(CLIENTS_PER_ROUND, rounds)
    overrides["fed"] |= {"local_steps": 1, "eval_every": rounds}
    driver = DriverRss()
    run_experiment(build_config(overrides), folder, extra_callbacks=[driver])
    wall = pd.read_parquet(folder / "system.parquet")["wall_s"].to_numpy()[:-1]
    tenth = max(1, rounds // 10)
    return {
        "rounds": rounds,
        "first_s_per_round": float(np.median(wall[:tenth])),
        "last_s_per_round": float(np.median(wall[-tenth:])),
        "first_driver_rss_mb": float(np.median(driver.mb[:tenth])),
        "last_driver_rss_mb": float(np.median(driver.mb[-tenth:])),
    }


def run(quick: bool, out: Path, eval_budget_s: float | None = None) -> list[dict[str, Any]]:
    """The bench (module docstring); ``eval_budget_s``: the population evaluation's budget.

    ``eval_budget_s`` None keeps :func:`population.eval_budget`'s default; 0 is no limit.
    """
    import ray

    from pf2lora_ray.bench import population

    long_rounds = LONG_ROUNDS
    # One BLAS thread per process (actors inherit it): numpy's OpenBLAS threads spin
    # against each other and the torch threads on a shared machine, which made drawing
    # a synthetic client's data 20x slower than its arithmetic.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    start_ray(cores())
    try:
        if not quick:
            return population.run(quick, out, eval_budget_s)
        points = [measure(n, 4, out / "runs" / f"clients-{n}") for n in QUICK]
        mixed = interleaved(QUICK, 8)
        long = long_run(long_rounds, out / "runs" / f"rounds-{long_rounds}")
        mixed += population.run(quick, out, eval_budget_s)
    finally:
        ray.shutdown()
    sizes, rounds = QUICK, 4
    plot(points, out / "scaling.png")
    rows = [r for p in points for r in rows_for(f"clients-{p['clients']}", p)]
    clients = np.array([p["clients"] for p in points], dtype=float)
    rss = np.array([p["peak_rss_mb"] for p in points])
    slope = float(np.polyfit(clients, rss, 1)[0])
    fit = {"rss_kb_per_client": slope * 1024}
    fit |= client_bytes(build_config(job(sizes[0], rounds)))
    return rows + mixed + rows_for("fit", fit) + rows_for(f"rounds-{long_rounds}", long)
