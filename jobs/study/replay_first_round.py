"""Replay clients' first round of a finished run; print their training loss and ||D_k||.

Every draw depends only on (seed, round, client), so round 1 of a client replays
exactly from the run's config: the same batches, the same initial C_k and theta.
Used by REPRODUCTION.md ("Generation: WebNLG", the diverged personal adapter):

    .venv/bin/python jobs/study/replay_first_round.py RUN_DIR 3 0

RUN_DIR is one run's folder (its config.yaml); the clients must be among those the
run sampled in round 1 (runs.parquet / metrics.parquet say which) for the replay to
be the run's own round.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from pf2lora_ray.client import ClientHost
from pf2lora_ray.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run's folder (holds config.yaml)")
    parser.add_argument("clients", type=int, nargs="+")
    parser.add_argument("--top", type=int, default=3, help="largest D adapters to list")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the study's runs
    cfg = load_config(f"{args.run}/config.yaml")
    host = ClientHost(cfg, args.clients)
    result = host.train(host.initial_shared(), 1, args.clients)
    rows = [row for row in result.rows if row["metric"] == "train_loss"]
    losses = {row["client_id"]: row["value"] for row in rows}
    for k, state in host.get_personal(args.clients).items():
        d = {n: float(np.linalg.norm(v)) for n, v in state.items() if n.endswith("lora_D")}
        if not d:
            raise SystemExit(f"{args.run}: the run's method has no personal D adapters")
        total = float(np.sqrt(sum(v * v for v in d.values())))
        largest = sorted(d.items(), key=lambda item: -item[1])[: args.top]
        top = ", ".join(f"{n} {v:.3f}" for n, v in largest)
        print(f"client {k}: round-1 train_loss {losses[k]:.4f}, ||D|| {total:.3f}; largest: {top}")


if __name__ == "__main__":
    main()
