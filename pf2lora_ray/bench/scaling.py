"""``scaling``: seconds per round and memory against how many clients exist.

PF2LoRA on the synthetic task (one 64x64 layer, small client data) on Ray with
one 1-CPU actor per core, with a fixed ``fed.clients_per_round`` so that a
round's work is the same whatever the number of clients: per-round time should
stay flat while memory grows with the clients' data and personal state.

Per point: the median wall time of the training-only rounds, the last round
(which also evaluates every client, so every client has personal state), the
set-up time (actors build every client's data) and the peak RSS of driver plus
actors. Memory per client is the slope of peak RSS against clients. A PNG of
both curves goes to ``OUT/scaling.png``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pf2lora_ray.bench.common import RoundClock, cores, rows_for, start_ray
from pf2lora_ray.config import Config, build_config
from pf2lora_ray.experiment import run_experiment

FULL = (10, 100, 1000, 10000)
QUICK = (10, 100, 1000)
CLIENTS_PER_ROUND = 10


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


def measure(num_clients: int, rounds: int, folder: Path) -> dict[str, float]:
    shutil.rmtree(folder, ignore_errors=True)
    clock = RoundClock()
    run_experiment(build_config(job(num_clients, rounds)), folder, extra_callbacks=[clock])
    system = pd.read_parquet(folder / "system.parquet")
    return {
        "clients": num_clients,
        "s_per_round": float(system["wall_s"].iloc[:-1].median()),
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


def run(quick: bool, out: Path) -> list[dict[str, Any]]:
    import ray

    sizes, rounds = (QUICK, 4) if quick else (FULL, 6)
    start_ray(cores())
    try:
        points = [measure(n, rounds, out / "runs" / f"clients-{n}") for n in sizes]
    finally:
        ray.shutdown()
    plot(points, out / "scaling.png")
    rows = [r for p in points for r in rows_for(f"clients-{p['clients']}", p)]
    clients = np.array([p["clients"] for p in points], dtype=float)
    rss = np.array([p["peak_rss_mb"] for p in points])
    slope = float(np.polyfit(clients, rss, 1)[0])
    fit = {"rss_kb_per_client": slope * 1024}
    fit |= client_bytes(build_config(job(sizes[0], rounds)))
    return rows + rows_for("fit", fit)
