"""The floor of the WebNLG study: the frozen model's zero-shot scores on the study's entries.

    python jobs/study/webnlg_floor.py [JOB] [--set KEY=VALUE ...] [--out DIR]

Builds every client of ``JOB`` (default ``jobs/study/webnlg.yaml``, the study's base
job) with the code a run uses and evaluates the shared adapter at its initialisation:
B = 0 (and D_k = 0), so every client's model is exactly the frozen base model, and
its scores are what fine-tuning must beat, on the same validation and test entries,
prompt and decoding as the study. Prints, per split, the mean over clients of each
client's corpus score (the aggregate the study's tables use), writes the per-client
rows to ``DIR/floor.parquet`` and the wall and CPU seconds of the evaluation (one
thread) to ``DIR/floor_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

from pf2lora_ray.client import ClientHost
from pf2lora_ray.config import load_config

JOB = Path(__file__).resolve().parent / "webnlg.yaml"


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("job", nargs="?", default=str(JOB))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="results/webnlg_floor")
    args = parser.parse_args(argv)
    # homlora: one shared adapter and nothing personal, so theta_0 is the whole model.
    cfg = load_config(args.job, [*args.set, "algorithm.name=homlora"])
    torch.set_num_threads(1)
    host = ClientHost(cfg, range(cfg.fed.num_clients))
    wall, cpu = time.perf_counter(), time.process_time()
    result = host.evaluate(host.initial_shared(), 0)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rows = pd.DataFrame(result.rows)
    data = host.data.values()
    entries = {s: sum(len(getattr(d, s) or ()) for d in data) for s in ("val", "test")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(out / "floor.parquet", index=False)
    cost = {"eval_wall_s": wall, "eval_cpu_s": cpu, "entries": entries,
            "clients": cfg.fed.num_clients, "max_new_tokens": cfg.data.max_new_tokens}
    (out / "floor_cost.json").write_text(json.dumps(cost, indent=2) + "\n")
    table = rows.pivot_table(index="metric", columns="split", values="value", aggfunc="mean")
    print(f"zero-shot {cfg.model.name}, {cfg.fed.num_clients} clients, mean over clients:")
    print(table.to_string(float_format=lambda v: f"{v:.2f}"))
    print(json.dumps(cost))
    return rows


if __name__ == "__main__":
    main()
