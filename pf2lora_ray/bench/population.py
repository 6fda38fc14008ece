"""``scaling``'s population part: up to 100,000 clients with MiniLM-sized personal state.

PF2LoRA on the synthetic task shaped like MiniLM's adapters: 12 adapted
384 x 384 layers (``synthetic.layers=12``), r = r~ = 2, so a client's personal
state (C_k, D_k) is 18,432 floats, 72 KB, as MiniLM's with r~ = 2 on query and
value. Each size runs on Ray with 2 actors, each keeping at most
``runtime.state_memory_mb`` (:data:`BOUND_MB`) of personal state in memory and
spilling the rest to disk, with each client's data generated from (seed,
client) when it is used. 64 clients are sampled per round.

``population-clients-N``: the sizes alive at once and trained round by round
in turn (interleaved, so that load drifting on a shared machine hits every size
alike): median wall seconds and CPU seconds of local updates per training round,
bytes of state spilled to / read back from disk per round (median), and, after
the rounds, the driver + actors' peak RSS.

``population-eval-N`` (the largest size): one evaluation of every client, each
actor visiting its clients ``runtime.eval_chunk`` at a time with rows streamed to
a callback that keeps none (as the results writer does): wall seconds, peak RSS
of the driver + that size's actors after it, bytes spilled and read back, and
the state left on disk (every client then has state).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pf2lora_ray.bench.common import cores, rows_for
from pf2lora_ray.client import EvalResult, peak_rss_mb
from pf2lora_ray.config import build_config

FULL = (1_000, 10_000, 100_000)
QUICK = (100, 1_000, 3_000)
CLIENTS_PER_ROUND = 64
BOUND_MB = 32  # per actor, ~450 MiniLM-sized clients (--quick: 1 MB; its clients hold 12 KB)
ACTORS = 2


def job(num_clients: int, state_dir: Path, quick: bool) -> dict[str, Any]:
    """The MiniLM-shaped synthetic job for ``num_clients`` clients (module docstring)."""
    return {
        "seed": 0,
        "model": {"name": "synthetic"},
        "data": {"name": "synthetic", "batch_size": 8},
        "synthetic": {
            "dim": 64 if quick else 384,
            "layers": 12,
            "train_size": 16,
            "test_size": 8,
            "common_rank": 2,
            "personal_ranks": [0, 1, 2],
        },
        "adapter": {"r": 2, "r_personal": 2, "alpha": 2.0},
        "fed": {
            "num_clients": num_clients,
            "clients_per_round": min(CLIENTS_PER_ROUND, num_clients),
            "rounds": 1000,
            "local_steps": 1,
            "eval_every": 1000,
        },
        "algorithm": {"name": "pf2lora", "lr": 0.01},
        "pf2lora": {"lr_lower": 0.05},
        "runtime": {
            "quiet": True,
            "backend": "ray",
            "threads_per_actor": 1,
            "state_memory_mb": 1 if quick else BOUND_MB,
            "state_dir": str(state_dir),
            "eval_chunk": 512 if quick else 2048,
        },
        "resources": {"num_cpus_per_actor": cores() / (ACTORS * 3), "num_actors": ACTORS},
    }


def disk_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder``."""
    total = 0
    for root, _, files in os.walk(folder):
        total += sum(os.stat(os.path.join(root, f)).st_size for f in files)
    return total


class Counter:
    """An ``on_chunk`` that keeps nothing but counts, as a results writer keeps nothing."""

    def __init__(self) -> None:
        self.chunks = self.rows = 0

    def __call__(self, chunk: EvalResult) -> None:
        self.chunks += 1
        self.rows += len(chunk.rows) + len(chunk.ranks)


def run(quick: bool, out: Path) -> list[dict[str, Any]]:
    """Rounds of every size interleaved, then one evaluation of the largest (module docstring)."""
    from pf2lora_ray.algorithms import ALGORITHMS
    from pf2lora_ray.driver import sample_clients
    from pf2lora_ray.runtime.ray_backend import RayBackend

    sizes, rounds = (QUICK, 4) if quick else (FULL, 10)
    cfgs, backends, thetas = {}, {}, {}
    rows: list[dict[str, Any]] = []
    try:
        for n in sizes:
            folder = out / "state" / f"clients-{n}"
            folder.mkdir(parents=True, exist_ok=True)
            cfgs[n] = build_config(job(n, folder, quick))
            t0 = time.perf_counter()
            backends[n] = RayBackend(cfgs[n])
            thetas[n] = backends[n].initial_shared()
            rows += rows_for(f"population-clients-{n}", {"setup_s": time.perf_counter() - t0})
        algorithm = ALGORITHMS["pf2lora"](cfgs[sizes[0]])
        got: dict[int, dict[str, list[float]]] = {n: {} for n in sizes}
        for t in range(1, rounds + 1):
            for n in sizes:
                t0 = time.perf_counter()
                result = backends[n].train(thetas[n], t, sample_clients(cfgs[n], t))
                wall = time.perf_counter() - t0
                thetas[n] = algorithm.aggregate(thetas[n], result.summed, result.weight)
                for name, value in (
                    ("s_per_round", wall),
                    ("cpu_s_per_round", sum(result.client_s.values())),
                    ("spilled_mb_per_round", result.spilled_bytes / 2**20),
                    ("read_back_mb_per_round", result.read_bytes / 2**20),
                ):
                    got[n].setdefault(name, []).append(value)
        skip = 2  # the first rounds also warm up each actor
        for n in sizes:
            values = {k: float(np.median(v[skip:])) for k, v in got[n].items()}
            values["peak_rss_mb"] = backends[n].peak_rss_mb()
            values["driver_peak_rss_mb"] = peak_rss_mb()
            rows += rows_for(f"population-clients-{n}", values)
        rows += evaluate_all(backends[sizes[-1]], thetas[sizes[-1]], rounds, out, sizes[-1])
    finally:
        for backend in backends.values():
            backend.close()
    return rows


def evaluate_all(backend, theta, round_: int, out: Path, n: int) -> list[dict[str, Any]]:
    """One streamed evaluation of every client of ``backend`` (module docstring)."""
    counter = Counter()
    t0 = time.perf_counter()
    result = backend.evaluate(theta, round_, counter)
    wall = time.perf_counter() - t0
    scored = len({r["client_id"] for r in result.rows})
    return rows_for(
        f"population-eval-{n}",
        {
            "eval_s": wall,
            "clients_scored": float(scored),
            "chunks": float(counter.chunks),
            "peak_rss_mb": backend.peak_rss_mb(),
            "driver_peak_rss_mb": peak_rss_mb(),
            "spilled_mb": result.spilled_bytes / 2**20,
            "read_back_mb": result.read_bytes / 2**20,
            "state_on_disk_mb": disk_bytes(out / "state" / f"clients-{n}") / 2**20,
        },
    )
