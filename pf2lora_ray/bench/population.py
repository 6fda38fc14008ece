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
a callback that keeps none (as the results writer does): wall seconds, clients
scored, CPU seconds of the actors' processes (steadier than wall seconds on a
shared machine), peak RSS of the driver + that size's actors, bytes spilled and
read back, and the state on disk. On a shared machine an evaluation of 100,000
clients can outlast any budget, so it stops after :data:`EVAL_BUDGET_S`
(``pf2lora bench scaling --eval-budget-s S``; 0: none) and reports how many
clients it scored in how long (``complete`` 0 or 1) instead of nothing. Its
progress is printed every :data:`PROGRESS_EVERY` chunks.

Each row is also printed as it is measured, so a bench cut short keeps them.
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
# Per actor: ~55 MiniLM-sized clients, under a round's 64, so every round spills
# (--quick: 1 MB, its clients holding 12 KB each).
BOUND_MB = 4
ACTORS = 2
EVAL_BUDGET_S = 600.0  # --quick: no budget
PROGRESS_EVERY = 10  # chunks (of 2 x 512 clients) between progress lines


class OutOfTime(Exception):
    """The evaluation's time budget ran out (raised between chunks)."""


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
            "eval_chunk": 512,
        },
        "resources": {"num_cpus_per_actor": cores() / (ACTORS * 3), "num_actors": ACTORS},
    }


def disk_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder``."""
    total = 0
    for root, _, files in os.walk(folder):
        total += sum(os.stat(os.path.join(root, f)).st_size for f in files)
    return total


def shown(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Print ``rows`` now (a bench cut short keeps what it printed); returns them."""
    for row in rows:
        print(f"{row['variant']}  {row['metric']} = {row['value']:.6g}", flush=True)
    return rows


class Counter:
    """An ``on_chunk`` that keeps nothing but counts, as a results writer keeps nothing.

    Raises :class:`OutOfTime` after a chunk once ``budget_s`` seconds have passed.
    """

    def __init__(self, budget_s: float | None) -> None:
        self.chunks = self.clients = self.spilled = self.read = 0
        self.cpu_s = 0.0
        self.t0, self.budget_s = time.perf_counter(), budget_s

    def __call__(self, chunk: EvalResult) -> None:
        self.chunks += 1
        self.clients += len({r["client_id"] for r in chunk.rows})
        self.spilled += chunk.spilled_bytes
        self.read += chunk.read_bytes
        self.cpu_s += chunk.cpu_s
        if self.chunks % PROGRESS_EVERY == 0:
            wall = time.perf_counter() - self.t0
            print(
                f"population: evaluation {self.clients} clients scored, "
                f"{wall:.0f} s wall, {self.cpu_s:.0f} CPU-s",
                flush=True,
            )
        if self.budget_s is not None and time.perf_counter() - self.t0 > self.budget_s:
            raise OutOfTime


def eval_budget(quick: bool, given: float | None) -> float | None:
    """The evaluation's budget in seconds, None for none: ``given`` (0: none), else the default."""
    if given is not None:
        return given or None
    return None if quick else EVAL_BUDGET_S


def run(quick: bool, out: Path, eval_budget_s: float | None = None) -> list[dict[str, Any]]:
    """Rounds of every size interleaved, then one evaluation of the largest (module docstring).

    ``eval_budget_s``: see :func:`eval_budget`.
    """
    from pf2lora_ray.algorithms import ALGORITHMS
    from pf2lora_ray.driver import sample_clients
    from pf2lora_ray.runtime.ray_backend import RayBackend

    sizes, rounds = (QUICK, 4) if quick else (FULL, 7)
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
            print(f"population: round {t}/{rounds} trained at every size", flush=True)
        skip = 2  # the first rounds also warm up each actor
        for n in sizes:
            values = {k: float(np.median(v[skip:])) for k, v in got[n].items()}
            values["peak_rss_mb"] = backends[n].peak_rss_mb()
            values["driver_peak_rss_mb"] = peak_rss_mb()
            rows += shown(rows_for(f"population-clients-{n}", values))
        budget = eval_budget(quick, eval_budget_s)
        n = sizes[-1]
        rows += shown(evaluate_all(backends[n], thetas[n], rounds, out, n, budget))
    finally:
        for backend in backends.values():
            backend.close()
    return rows


def evaluate_all(
    backend, theta, round_: int, out: Path, n: int, budget_s: float | None
) -> list[dict[str, Any]]:
    """One streamed evaluation of every client of ``backend`` (module docstring)."""
    counter = Counter(budget_s)
    complete = True
    try:
        backend.evaluate(theta, round_, counter)
    except OutOfTime:
        complete = False
    wall = time.perf_counter() - counter.t0
    return rows_for(
        f"population-eval-{n}",
        {
            "eval_s": wall,
            "complete": float(complete),
            "clients_scored": float(counter.clients),
            "clients_per_s": counter.clients / wall,
            "cpu_s": counter.cpu_s,
            "cpu_ms_per_client": 1e3 * counter.cpu_s / max(counter.clients, 1),
            "chunks": float(counter.chunks),
            "peak_rss_mb": backend.peak_rss_mb(),
            "driver_peak_rss_mb": peak_rss_mb(),
            "spilled_mb": counter.spilled / 2**20,
            "read_back_mb": counter.read / 2**20,
            "state_on_disk_mb": disk_bytes(out / "state" / f"clients-{n}") / 2**20,
        },
    )
