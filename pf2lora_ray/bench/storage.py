"""``pf2lora bench storage``: what writing results and checkpoints to object storage costs.

One simulation of the SST-2 job (jobs/glue_sst2.yaml: MiniLM, 8 clients, data
from ``data.path``, default ../shared/data/glue/SST-2) runs a few rounds with
a checkpoint after every round, and hands every round to two sets of writers:
results + checkpoints into a local folder, and the same into an S3 bucket. So
both stores get the very same bytes in the same run, and each writer's seconds
and bytes per round are measured on its own. The S3 server is moto's (the one
the tests use) on 127.0.0.1: the numbers are the cost of the S3 protocol path
(HTTP requests, whole-object PUTs, listing) without a network's latency; a
remote bucket adds its round trips (about 3 requests per results table and 4
per checkpoint per round). At the end, each checkpoint is read back as
``--resume`` would (``checkpoint_load_s``).

Needs ``moto[server]`` (the ``dev`` extra).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pf2lora_ray.bench.common import rows_for
from pf2lora_ray.bench.s3 import LocalS3
from pf2lora_ray.checkpoint import CheckpointWriter, load_checkpoint
from pf2lora_ray.config import load_config
from pf2lora_ray.driver import DriverState, RoundReport, run_rounds
from pf2lora_ray.experiment import BACKENDS
from pf2lora_ray.results import SCHEMAS, ResultsWriter, part_name
from pf2lora_ray.storage import Location, location

JOB = "jobs/glue_sst2.yaml"
DATA = "../shared/data/glue/SST-2"
BUCKET = "bench"


class Timed:
    """Wraps a driver callback; records its seconds and the bytes it left per round."""

    def __init__(self, callback: Any, size_of: Any) -> None:
        self.callback, self.size_of = callback, size_of
        self.seconds: list[float] = []
        self.bytes: list[int] = []
        self.round_wall_s: list[float] = []  # the rounds' own wall time, for scale

    def on_start(self, state: DriverState) -> None:
        self.callback.on_start(state)

    def on_round_end(self, state: DriverState, report: RoundReport) -> None:
        start = time.perf_counter()
        self.callback.on_round_end(state, report)
        self.seconds.append(time.perf_counter() - start)
        self.bytes.append(self.size_of(report.round))
        self.round_wall_s.append(report.wall_s)

    def on_end(self, state: DriverState, status: str) -> None:
        self.callback.on_end(state, status)


def _size(files: list[Location]) -> int:
    return sum(info.size or 0 for info in (f.info() for f in files) if info.size is not None)


def _result_files(run: Location, round_: int) -> list[Location]:
    parts = [run / f"{name}.parquet" / part_name(round_) for name in SCHEMAS]
    return [p for p in parts if p.exists()] + [run / "runs.parquet"]


def _checkpoint_files(run: Location, round_: int) -> list[Location]:
    folder = run / "checkpoints" / f"round_{round_:06d}"
    return [*folder.iterdir(), run / "checkpoints" / "latest.json"]


def run(quick: bool, out: Path) -> list[dict[str, Any]]:
    """Rows per store (variant ``local`` / ``s3``): seconds and bytes per round."""
    rounds = 2 if quick else 4
    data = os.environ.get("PF2LORA_SST2", DATA)
    sets = [
        f"data.path={data}",
        "runtime.backend=local",
        "runtime.quiet=true",
        f"fed.rounds={rounds}",
        f"fed.eval_every={rounds}",
        "fed.local_steps=1",
        "data.max_test_per_client=40",
        "checkpoint.every=1",
    ]
    cfg = load_config(JOB, sets)
    with LocalS3() as s3:
        stores = {"local": location(out / "local-run"), "s3": location(f"{s3.bucket(BUCKET)}/run")}
        stores["local"].delete()
        writers: dict[str, tuple[Timed, Timed]] = {}
        for name, run_dir in stores.items():
            results = Timed(
                ResultsWriter(run_dir, cfg), lambda r, d=run_dir: _size(_result_files(d, r))
            )
            ckpt = Timed(
                CheckpointWriter(run_dir, cfg), lambda r, d=run_dir: _size(_checkpoint_files(d, r))
            )
            writers[name] = (results, ckpt)
        callbacks = [w for pair in writers.values() for w in pair]
        backend = BACKENDS[cfg.runtime.backend](cfg, None)  # unchecked: hosts draw the partition
        try:
            run_rounds(cfg, backend, callbacks)
        finally:
            backend.close()
        rows: list[dict[str, Any]] = []
        for name, (results, ckpt) in writers.items():
            start = time.perf_counter()
            load_checkpoint(stores[name], cfg)
            load_s = time.perf_counter() - start
            rows += rows_for(
                name,
                {
                    "rounds": rounds,
                    "results_s_per_round": sum(results.seconds) / rounds,
                    "results_bytes_per_round": sum(results.bytes) / rounds,
                    "checkpoint_s_per_round": sum(ckpt.seconds) / rounds,
                    "checkpoint_bytes_per_round": sum(ckpt.bytes) / rounds,
                    "checkpoint_load_s": load_s,
                    "round_wall_s": sum(results.round_wall_s) / rounds,
                },
            )
        return rows
