"""The ``flower`` bench's Flower side: our HOMLoRA workload as a Flower 1.42 app.

Runs inside the Flower virtual environment (``.venv-flower``: flwr[simulation]
pins its own Ray), started by :mod:`pf2lora_ray.bench.flower` as::

    .venv-flower/bin/python -m pf2lora_ray.bench.flower_app SPEC.json RESULT.json

SPEC.json holds ``{"overrides": <config overrides>, "mode": "rebuild" | "cached",
"theta_out": <path>}``. The app uses Flower's Message API: a ``ClientApp``
whose ``@app.train()`` function does the local update with our
:class:`~pf2lora_ray.client.ClientHost` (same task, model, data, seeds and
AdamW steps as our runtime), and a ``ServerApp`` running Flower's own
``FedAvg`` (weighted by ``num-examples``, which is HOMLoRA's aggregate with
``fed.server_lr = 1``), executed by ``flwr.simulation.run_simulation`` on Ray
with one 1-CPU actor per core.

- ``rebuild`` (what a stateless ClientApp does): every call builds the client
  afresh: task, data of this client, base model, adapters.
- ``cached``: a ClientHost for all clients is built once per Ray worker
  process and kept in a module global, which isolates the engine's own cost
  (messages through the driver, per-call context) from the rebuilds.

RESULT.json: per-round wall seconds (from ``configure_train`` to the end of
``aggregate_train``), peak RSS of the driver and of each actor process, and
median per-call build/train seconds reported by the clients.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from pf2lora_ray.client import ClientHost
from pf2lora_ray.config import Config, build_config

SPEC_ENV = "PF2LORA_FLOWER_SPEC"  # Ray workers inherit the driver's environment

_spec: dict[str, Any] | None = None
_host: ClientHost | None = None  # ``cached`` mode: one per worker process


def spec() -> dict[str, Any]:
    global _spec
    if _spec is None:
        _spec = json.loads(Path(os.environ[SPEC_ENV]).read_text())
    return _spec


def config() -> Config:
    return build_config(spec()["overrides"])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(v)) for name, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


# ---------------------------------------------------------------- client side

client_app = ClientApp()


def client_host(cfg: Config, client_id: int) -> ClientHost:
    global _host
    if spec()["mode"] == "rebuild":
        return ClientHost(cfg, [client_id])
    if _host is None:
        _host = ClientHost(cfg, range(cfg.fed.num_clients))
    return _host


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One client's local HOMLoRA update; replies theta_k and its weight n_k."""
    torch.set_num_threads(1)  # as our actors: one thread per 1-CPU actor
    t0 = time.perf_counter()
    cfg = config()
    k = int(context.node_config["partition-id"])
    host = client_host(cfg, k)
    built = time.perf_counter()
    theta = from_record(msg.content["arrays"])
    result = host.train(theta, int(msg.content["config"]["server-round"]), [k])
    # host.train returns n_k * (theta_k - theta); Flower's FedAvg averages theta_k.
    theta_k = {
        name: (theta[name] + result.summed[name] / result.weight).astype(theta[name].dtype)
        for name in theta
    }
    metrics = MetricRecord(
        {
            "num-examples": int(result.weight),
            "build_s": built - t0,
            "train_s": result.compute_s,
            "peak_rss_mb": peak_rss_mb(),
            "pid": os.getpid(),
        }
    )
    return Message(RecordDict({"arrays": to_record(theta_k), "metrics": metrics}), reply_to=msg)


# ---------------------------------------------------------------- server side


class TimedFedAvg(FedAvg):
    """Flower's FedAvg, timing each round and keeping every client's reported metrics."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.round_start: dict[int, float] = {}
        self.round_s: dict[int, float] = {}
        self.client_metrics: list[dict[str, float]] = []

    def configure_train(self, server_round: int, *args: Any, **kwargs: Any):
        self.round_start[server_round] = time.perf_counter()
        return super().configure_train(server_round, *args, **kwargs)

    def aggregate_train(self, server_round: int, replies: Any):
        replies = list(replies)
        self.client_metrics += [dict(r.content["metrics"]) for r in replies if r.has_content()]
        out = super().aggregate_train(server_round, replies)
        self.round_s[server_round] = time.perf_counter() - self.round_start[server_round]
        return out


server_app = ServerApp()
_outcome: dict[str, Any] = {}


@server_app.main()
def main_loop(grid: Grid, context: Context) -> None:
    cfg = config()
    n = cfg.fed.num_clients
    theta0 = ClientHost(cfg, [0]).initial_shared()  # the same theta_0 as our runtime
    strategy = TimedFedAvg(
        fraction_train=cfg.fed.clients_per_round / n,
        fraction_evaluate=0.0,
        min_train_nodes=cfg.fed.clients_per_round,
        min_available_nodes=n,
    )
    result = strategy.start(grid, to_record(theta0), num_rounds=cfg.fed.rounds)
    np.savez(spec()["theta_out"], **from_record(result.arrays))
    _outcome.update(
        round_s=[strategy.round_s[t] for t in sorted(strategy.round_s)],
        client_metrics=strategy.client_metrics,
    )


def main(argv: list[str]) -> None:
    """Run the simulation described by SPEC.json; write RESULT.json."""
    spec_path, result_path = argv
    os.environ[SPEC_ENV] = str(Path(spec_path).resolve())
    cfg = config()
    t0 = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=cfg.fed.num_clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": len(os.sched_getaffinity(0)),
                "include_dashboard": False,
                "log_to_driver": False,
            },
        },
    )
    total_s = time.perf_counter() - t0
    if "round_s" not in _outcome:
        raise RuntimeError("the Flower ServerApp did not finish; see the log above")
    # Peak RSS: this process (driver + in-process SuperLink) plus each actor's own peak.
    actors: dict[int, float] = {}
    for m in _outcome["client_metrics"]:
        pid = int(m["pid"])
        actors[pid] = max(actors.get(pid, 0.0), float(m["peak_rss_mb"]))
    calls = _outcome["client_metrics"]
    out = {
        "round_s": _outcome["round_s"],
        "total_s": total_s,
        "peak_rss_mb": peak_rss_mb() + sum(actors.values()),
        "actors": len(actors),
        "build_s_per_call": float(np.median([m["build_s"] for m in calls])),
        "train_s_per_call": float(np.median([m["train_s"] for m in calls])),
    }
    Path(result_path).write_text(json.dumps(out))


if __name__ == "__main__":
    # Import this file as its module so Ray pickles the apps' functions by
    # reference and the ``cached`` host (a module global) lives across calls.
    from pf2lora_ray.bench import flower_app

    flower_app.main(sys.argv[1:])
