"""``partial``: static blocks vs balanced placement when only some clients train.

Workload (the new user's trial of issue 14): PF2LoRA on tiny-bert, 200 clients
of a synthetic SST-2-like set, 10 sampled per round, 2 one-CPU Ray actors.
The same workload runs with ``placement="static"`` (contiguous blocks, one per
actor, for the whole run) and ``placement="balanced"`` (each round's clients
placed longest-processing-time first, preferring home actors; state moves
through the object store), alternated (static, balanced, static, ...) in one
Ray instance so that drifting machine load hits both alike.

Reported per variant, over the training rounds (the last round also evaluates
every client and is left out):

- ``efficiency``: client compute / (actors x round wall time), the issue's
  measure; ``compute_balance``: client compute / (actors x the busiest actor's
  compute), the placement's share of it without the driver's own time;
- ``s_per_round`` (median);
- ``moved_clients_per_round`` and ``moved_bytes_per_round`` (personal state
  moved between actors), and the same for the evaluation round;
- ``replay-<A>``: the measured per-client CPU seconds of both runs (each call
  a draw from them) replayed on A = 8, 16 and 64 simulated actors (500
  clients, 2A sampled per round; 2 actors with the run's own 10 of 200 as a
  check): static blocks, balanced on equal cost estimates (the simulated
  clients are alike), and an oracle that knows each call's seconds in
  advance: what a cluster would see.
- ``flower`` / ``ours-minilm``: Flower's simulation engine and ours on a
  partial-participation HOMLoRA workload with all-MiniLM-L6-v2 (Flower's
  stateless ClientApp builds the client, i.e. loads MiniLM, on every call),
  when the Flower environment can be built (:mod:`pf2lora_ray.bench.flower`);
  otherwise a row ``flower_skipped`` says why.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pf2lora_ray.bench.common import rows_for, rows_needed, start_ray, text_job, write_sst2_like
from pf2lora_ray.bench.venv import BenchSetupError
from pf2lora_ray.driver import DriverState, RoundReport

CLIENTS, PER_ROUND, ACTORS = 200, 10, 2
REPLAY = ((2, 10, 200), (8, 16, 500), (16, 32, 500), (64, 128, 500))  # actors, per round, clients
REPLAY_ROUNDS = 200
VARIANTS = ("static", "balanced")


def workload(data: Path, quick: bool) -> dict[str, Any]:
    rounds, steps = (4, 2) if quick else (12, 4)
    job = text_job(
        data,
        num_clients=CLIENTS,
        clients_per_round=PER_ROUND,
        rounds=rounds,
        local_steps=steps,
        train_per_client=8 if quick else 16,
        batch_size=8,
    )
    job["runtime"] |= {"backend": "ray", "threads_per_actor": 1}
    job["resources"] = {"num_actors": ACTORS, "num_cpus_per_actor": 1.0}
    return job


class Collect:
    """Driver callback keeping each round's wall time, placement stats and client seconds."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, Any]] = []

    def on_start(self, state: DriverState) -> None:
        pass

    def on_round_end(self, state: DriverState, report: RoundReport) -> None:
        stats = state.backend.round_stats()
        self.rounds.append(
            {
                "eval": report.eval is not None,
                "wall_s": report.wall_s,
                "client_s": dict(report.train.client_s),
                **stats,
            }
        )

    def on_end(self, state: DriverState, status: str) -> None:
        pass


def run_variant(cfg, placement: str, folder: Path) -> Collect:
    from pf2lora_ray.driver import run_rounds
    from pf2lora_ray.results import ResultsWriter
    from pf2lora_ray.runtime.ray_backend import RayBackend

    shutil.rmtree(folder, ignore_errors=True)
    collect = Collect()
    backend = RayBackend(cfg, placement=placement)
    try:
        run_rounds(cfg, backend, [ResultsWriter(folder, cfg, variant=placement), collect])
    finally:
        backend.close()
    return collect


def summarize(runs: list[Collect]) -> dict[str, float]:
    train = [r for c in runs for r in c.rounds if not r["eval"]]
    evals = [r for c in runs for r in c.rounds if r["eval"]]
    compute = [sum(r["actor_compute_s"]) for r in train]
    return {
        "efficiency": float(
            np.mean([c / (ACTORS * r["wall_s"]) for c, r in zip(compute, train, strict=True)])
        ),
        "compute_balance": float(
            np.mean(
                [
                    c / (ACTORS * max(r["actor_compute_s"]))
                    for c, r in zip(compute, train, strict=True)
                ]
            )
        ),
        "s_per_round": float(np.median([r["wall_s"] for r in train])),
        "busiest_actor_clients": float(np.mean([max(r["actor_clients"]) for r in train])),
        "moved_clients_per_round": float(np.mean([r["moved_clients"] for r in train])),
        "moved_bytes_per_round": float(np.mean([r["moved_bytes"] for r in train])),
        "eval_round_moved_clients": float(np.mean([r["moved_clients"] for r in evals])),
        "eval_round_moved_bytes": float(np.mean([r["moved_bytes"] for r in evals])),
        "rounds": float(len(train)),
    }


def replay_rows(pool: list[float], seed: int = 0) -> list[dict[str, Any]]:
    """Replay measured client seconds on more actors: static blocks vs balanced (module doc)."""
    from pf2lora_ray.runtime.placement import replay

    rng = np.random.default_rng(seed)
    rows = []
    for actors, per_round, clients in REPLAY:
        rounds = [
            {int(k): float(rng.choice(pool)) for k in rng.choice(clients, per_round, replace=False)}
            for _ in range(REPLAY_ROUNDS)
        ]
        estimates = dict.fromkeys(range(clients), 1.0)  # simulated clients are alike
        values = {
            "clients_per_round": per_round,
            "clients": clients,
            "static_efficiency": float(np.mean(replay(rounds, clients, actors, False))),
            "balanced_efficiency": float(
                np.mean(replay(rounds, clients, actors, True, costs=estimates))
            ),
            # Knowing each call's seconds in advance: the most any placement could reach.
            "oracle_efficiency": float(np.mean(replay(rounds, clients, actors, True))),
        }
        rows += rows_for(f"replay-{actors}", values)
    return rows


def flower_rows(out: Path, quick: bool) -> list[dict[str, Any]]:
    """Flower vs ours on partial participation with MiniLM (fresh processes, alternated)."""
    from pf2lora_ray.bench import flower

    try:
        python = flower.flower_python()
    except (BenchSetupError, OSError) as err:
        return [
            {
                "variant": "flower",
                "metric": "flower_skipped",
                "value": np.nan,
                "note": str(err)[:500],
            }
        ]
    clients, per_round, rounds = (12, 4, 3) if quick else (24, 4, 5)
    job = text_job(
        write_sst2_like(out / "minilm-data", rows_needed(clients, 8)),
        model="minilm",
        algorithm="homlora",
        num_clients=clients,
        clients_per_round=per_round,
        rounds=rounds,
        local_steps=1,
        train_per_client=8,
        batch_size=8,
        max_length=32,
    )
    job["runtime"]["backend"] = "ray"
    variants = {"flower": "flower", "ours-minilm": "ours"}
    repeats = 1 if quick else 2
    trials: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for rep in range(repeats):
        for name, kind in variants.items():
            folder = out / "flower-trials" / f"{name}-{rep}"
            shutil.rmtree(folder, ignore_errors=True)
            trials[name].append(flower.trial(kind, job, folder, python))
    rows = []
    for name, runs in trials.items():
        # Flower's first round also starts its workers (ours does that before round 1).
        steady = [s for r in runs for s in r["round_s"][1:]]
        values = {
            "s_per_round": float(np.median(steady)),
            "first_round_s": float(np.median([r["round_s"][0] for r in runs])),
            "peak_rss_mb": float(np.median([r["peak_rss_mb"] for r in runs])),
            "clients": clients,
            "clients_per_round": per_round,
        }
        if name == "flower":
            values["build_s_per_call"] = float(np.median([r["build_s_per_call"] for r in runs]))
            values["train_s_per_call"] = float(np.median([r["train_s_per_call"] for r in runs]))
        rows += rows_for(name, values)
    ratio = rows_value(rows, "ours-minilm") / rows_value(rows, "flower")
    return rows + rows_for("ours-minilm", {"s_per_round_vs_flower": ratio})


def rows_value(rows: list[dict[str, Any]], variant: str, metric: str = "s_per_round") -> float:
    return next(r["value"] for r in rows if r["variant"] == variant and r["metric"] == metric)


def run(quick: bool, out: Path) -> list[dict[str, Any]]:
    import ray

    from pf2lora_ray.config import build_config

    data = write_sst2_like(out / "data", rows_needed(CLIENTS, 16))
    cfg = build_config(workload(data, quick))
    repeats = 1 if quick else 2
    runs: dict[str, list[Collect]] = {v: [] for v in VARIANTS}
    start_ray(ACTORS)
    try:
        for rep in range(repeats):
            for v in VARIANTS:
                runs[v].append(run_variant(cfg, v, out / "runs" / f"{v}-{rep}"))
    finally:
        ray.shutdown()
    rows = [r for v in VARIANTS for r in rows_for(v, summarize(runs[v]))]
    pool = [s for v in VARIANTS for c in runs[v] for r in c.rounds for s in r["client_s"].values()]
    rows += replay_rows(pool)
    rows += flower_rows(out, quick)
    pd.DataFrame({"client_s": pool}).to_parquet(out / "client_seconds.parquet", index=False)
    return rows
