"""The federated driver loop: sample, broadcast theta, aggregate, evaluate, report.

The loop is deliberately short. Writing Parquet, checkpoints, the progress bar,
fault injection and Tune reporting are callbacks it calls after each round.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pf2lora_ray import seeds
from pf2lora_ray.algorithms import ALGORITHMS
from pf2lora_ray.algorithms.base import Partition
from pf2lora_ray.client import Arrays, EvalResult, TrainResult
from pf2lora_ray.config import Config
from pf2lora_ray.runtime.base import Backend


@dataclass
class RoundReport:
    """What happened in one round, handed to every callback."""

    round: int
    clients: list[int]
    train: TrainResult
    eval: EvalResult | None
    wall_s: float
    bytes_up: int
    bytes_down: int


@dataclass
class DriverState:
    """The driver's mutable state; callbacks may read it (checkpoints do)."""

    cfg: Config
    backend: Backend
    theta: Arrays
    round: int = 0
    last: RoundReport | None = None


class Callback(Protocol):
    """Hooks called by :func:`run_rounds`; implement the ones you need."""

    def on_start(self, state: DriverState) -> None: ...

    def on_round_end(self, state: DriverState, report: RoundReport) -> None: ...

    def on_end(self, state: DriverState, status: str) -> None: ...

    # Optional: ``on_eval_chunk(state, round, chunk: EvalResult)``, called with each
    # chunk of an evaluation that visits the clients in several chunks, as it is scored
    # (the round's report then carries a ``streamed`` result without rank rows).


def sample_clients(cfg: Config, round_: int) -> list[int]:
    """``fed.clients_per_round`` distinct clients, drawn from (seed, round) only."""
    n, m = cfg.fed.num_clients, cfg.fed.clients_per_round
    if m == n:
        return list(range(n))
    rng = seeds.rng(cfg.seed, seeds.CLIENT_SAMPLING, round_)
    return sorted(int(k) for k in rng.choice(n, size=m, replace=False))


def is_eval_round(cfg: Config, round_: int) -> bool:
    return round_ % cfg.fed.eval_every == 0 or round_ == cfg.fed.rounds


def _chunk_hook(state: DriverState, round_: int, callbacks: Sequence[Callback]):
    """The evaluation's ``on_chunk``: each chunk to every callback having ``on_eval_chunk``."""
    hooks = [cb.on_eval_chunk for cb in callbacks if hasattr(cb, "on_eval_chunk")]

    def on_chunk(chunk: EvalResult) -> None:
        for hook in hooks:
            hook(state, round_, chunk)

    return on_chunk


def run_rounds(
    cfg: Config,
    backend: Backend,
    callbacks: Sequence[Callback] = (),
    theta: Arrays | None = None,
    start_round: int = 1,
) -> DriverState:
    """Run rounds ``start_round..fed.rounds``; returns the final driver state.

    Callbacks get ``on_end(state, "failed")`` and the exception propagates if a
    round raises, so whatever was written stays readable.
    """
    algorithm = ALGORITHMS[cfg.algorithm.name](cfg)
    state = DriverState(
        cfg,
        backend,
        theta if theta is not None else backend.initial_shared(),
        round=start_round - 1,
    )
    # What a real deployment would send per sampled client each way (FFA-LoRA: B only).
    sent = algorithm.communicated_names(Partition(shared=sorted(state.theta), personal=[]))
    shared_bytes = sum(state.theta[k].nbytes for k in sent)
    for cb in callbacks:
        cb.on_start(state)
    try:
        for t in range(start_round, cfg.fed.rounds + 1):
            t0 = time.perf_counter()
            clients = algorithm.configure_round(t, sample_clients(cfg, t))
            result = backend.train(state.theta, t, clients)
            state.theta = algorithm.aggregate(state.theta, result.summed, result.weight)
            evaluation = None
            if is_eval_round(cfg, t):
                evaluation = backend.evaluate(state.theta, t, _chunk_hook(state, t, callbacks))
            state.round = t
            report = RoundReport(
                t,
                clients,
                result,
                evaluation,
                time.perf_counter() - t0,
                bytes_up=shared_bytes * len(clients),
                bytes_down=shared_bytes * len(clients),
            )
            state.last = report
            for cb in callbacks:
                cb.on_round_end(state, report)
    except BaseException:
        for cb in callbacks:
            cb.on_end(state, "failed")
        raise
    for cb in callbacks:
        cb.on_end(state, "completed")
    return state
